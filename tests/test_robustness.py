"""`python -m ssmkernels robustness` (ssmkernels.bench.robustness) and scripts/sanitize_kernels.py on
the CPU: toy shapes in float32, Triton through its interpreter (conftest sets TRITON_INTERPRET=1 on
machines without a GPU). The GPU figures themselves come from scripts/gpu_suite.sh's robustness stage."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssmkernels import cli
from ssmkernels._core import config
from ssmkernels.bench import robustness

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One CPU run of every section through the CLI (about 15 s), shared by the tests below."""
    path = tmp_path_factory.mktemp("robustness") / "robustness.json"
    code = cli.main(["robustness", "--quick", "--device", "cpu", "--json", str(path),
                     "--only", ",".join(robustness.SECTIONS)])
    return code, json.loads(path.read_text())


def rows(data: dict, section: str, **match) -> list[dict]:
    return [r for r in data["sections"][section]["rows"] if all(r.get(k) == v for k, v in match.items())]


def test_runs_every_section_and_exits_zero(report):
    code, data = report
    assert code == 0, data["failures"]
    assert list(data["sections"]) == list(robustness.SECTIONS)
    assert data["meta"]["device"] == "cpu" and data["meta"]["size"] == "toy" and data["meta"]["dtype"] == "float32"
    assert data["meta"]["torch"] == torch.__version__
    assert all(count == 0 for count in data["failures"].values())


def test_gpu_only_sections_say_they_were_skipped(report):
    _, data = report
    for name in ("first-call", "sanitizer"):
        section = data["sections"][name]
        assert section["status"] == "skipped" and section["reason"] == robustness.NEEDS_GPU
        assert section["rows"] == []


def test_batch_invariance_rows(report):
    _, data = report
    section = data["sections"]["batch-invariance"]
    assert section["status"] == "ran"
    assert {r["primitive"] for r in section["rows"]} == {"ssd_chunk_scan", "selective_scan", "causal_conv1d"}
    for row in rows(data, "batch-invariance", status="ok"):
        assert 0 <= row["differ"] <= row["elements"] > 0
        assert 0.0 <= row["differ_fraction"] <= 1.0
        assert row["differ_fraction"] == pytest.approx(row["differ"] / row["elements"])
        assert 0.0 <= row["max_abs_diff"] < 1e-4  # float32: at most a few ulps of reordering
        assert (row["differ"] == 0) == (row["max_abs_diff"] == 0.0)
    # The float32 reference on a CPU is not bitwise batch invariant (vectorised reductions), so
    # only its presence is asserted; the Triton kernels compute every row alike: bitwise invariant.
    assert len(rows(data, "batch-invariance", impl="ssmkernels", backend="reference", status="ok")) == 3
    triton = rows(data, "batch-invariance", impl="ssmkernels", backend="triton")
    assert len(triton) == 3
    for row in triton:
        if config.triton_interpret():
            assert row["status"] == "ok" and row["differ"] == 0, row
        else:
            assert row["status"] == "skipped" and "TRITON_INTERPRET" in row["reason"]
    for row in rows(data, "batch-invariance", backend="cuda"):
        assert row["status"] == "skipped" and row["reason"]


def test_prefill_decode_rows_are_within_the_spec_tolerance(report):
    _, data = report
    ran = rows(data, "prefill-decode", status="ok")
    expected = 6 if config.triton_interpret() else 3  # reference (+ triton) x 3 primitives
    assert len(ran) == expected
    for row in ran:
        assert row["steps"] == robustness.STEPS and row["elements"] > 0
        assert 0.0 <= row["differ_fraction"] <= 1.0
        assert row["full_within_tol"] and row["steps_within_tol"], row
        assert row["max_abs_diff"] <= 2 * row["tolerance"]  # both paths are within tol of float64
        assert 0 < row["tolerance"] < 1e-3 and row["max_abs_out"] > 0.1
    peers = [r for r in data["sections"]["prefill-decode"]["rows"] if r["impl"] != "ssmkernels"]
    assert peers and all(r["status"] == "skipped" and "GPU" in r["reason"] for r in peers)


def test_long_windows_pass_against_float64(report):
    _, data = report
    section = data["sections"]["long"]
    if not config.triton_interpret():
        assert all(r["status"] == "skipped" for r in section["rows"])
        return
    assert {r["primitive"] for r in section["rows"]} == {"ssd_chunk_scan", "selective_scan"}
    for row in section["rows"]:
        assert row["status"] == "PASS" and row["all_finite"], row
        names = {"out", "final_state"} | {f"d{n}" for n in ("B", "C", "z")}
        assert names <= set(row["checks"])
        for check in row["checks"].values():
            assert check["ok"] and 0 <= check["error"] <= check["tolerance"]
        starts = [start for start, _ in row["windows"]]
        assert starts[0] == 0 and row["windows"][-1][1] == row["length"] and starts[1] % 16 != 0


def test_deterministic_mode_rows(report):
    """Each primitive in both modes, each mode in its own process: times, and two identical
    runs that agree bitwise in deterministic mode (the row's status says so)."""
    _, data = report
    section = data["sections"]["deterministic"]
    assert {r["primitive"] for r in section["rows"]} == {"ssd_chunk_scan", "selective_scan", "causal_conv1d"}
    if not config.triton_interpret():
        assert all(r["status"] == "skipped" for r in section["rows"])
        return
    for row in section["rows"]:
        assert row["status"] == "ok", row
        assert row["default_ms"] > 0 and row["deterministic_ms"] > 0
        assert row["cost"] == pytest.approx(row["deterministic_ms"] / row["default_ms"] - 1)
        assert row["deterministic_repeat_differ"] == 0 and row["elements"] > 0


def test_deterministic_child_reports_its_mode(tmp_path):
    """The child reads SSMKERNELS_DETERMINISTIC from its environment, not from the parent's state."""
    env = robustness._child_env(SSMKERNELS_DETERMINISTIC="1")
    result = robustness._run_child("causal_conv1d", "reference", env, entry="deterministic_child")
    assert result["deterministic"] is True and result["repeat_differ"] == 0, result
    env = robustness._child_env(SSMKERNELS_DETERMINISTIC="0")
    assert robustness._run_child("causal_conv1d", "reference", env, entry="deterministic_child")["deterministic"] is False


def test_windows_cover_start_unaligned_middle_and_end():
    for length, window, chunk in ((262144, 256, 256), (4096, 256, 256), (96, 16, 16)):
        windows = robustness._windows(length, window, chunk)
        assert windows[0] == (0, window) and windows[-1] == (length - window, length)
        (_, first_end), (middle, middle_end), (last, _) = windows
        assert first_end <= middle and middle_end <= last and middle % chunk != 0


def test_bitwise_differ_counts_bits_not_values():
    a = torch.tensor([0.0, 1.0, float("nan"), 2.0])
    b = torch.tensor([-0.0, 1.0, float("nan"), 2.0 + 2e-7])
    assert robustness.bitwise_differ(a, b) == 2  # -0.0 and the last ulp; identical NaNs match
    assert robustness.bitwise_differ(a.bfloat16(), a.bfloat16()) == 0
    assert robustness.max_abs_diff(a, a) == 0.0
    assert robustness.max_abs_diff(torch.tensor([1.0]), torch.tensor([float("nan")])) == math.inf
    with pytest.raises(ValueError):
        robustness.bitwise_differ(a, a.double())


def test_table_is_markdown():
    text = robustness.table([("name", lambda r: r["name"]), ("value", lambda r: r.get("value"))],
                            [{"name": "a", "value": 0.000123456}, {"name": "bb"}])
    lines = text.splitlines()
    assert len(lines) == 4 and all(line.count("|") == 3 for line in lines)
    assert "1.23e-04" in lines[2] and "| -" in lines[3]


def test_sanitizer_without_compute_sanitizer_says_not_available(monkeypatch):
    monkeypatch.setattr(robustness, "find_compute_sanitizer", lambda: None)
    ctx = robustness.Context(torch.device("cuda"), "gpu", torch.bfloat16, log=lambda message: None)
    section = robustness.section_sanitizer(ctx)  # no CUDA call happens before the tool is looked up
    assert section["status"] == "skipped" and section["reason"].startswith("not available")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script would run the real kernels")
def test_sanitizer_section_runs_the_script_under_the_tool(monkeypatch, tmp_path):
    """The plumbing, with a stand-in for compute-sanitizer that runs the command and prints a summary
    (on a CPU the script runs the reference backend: the section removes TRITON_INTERPRET)."""
    fake = tmp_path / "compute-sanitizer"
    fake.write_text('#!/bin/sh\nshift 6  # --tool memcheck --error-exitcode 1 --print-limit 50\n"$@"\ncode=$?\n'
                    'echo "========= ERROR SUMMARY: 0 errors"\nexit $code\n')
    fake.chmod(0o755)
    monkeypatch.setattr(robustness, "find_compute_sanitizer", lambda: str(fake))
    ctx = robustness.Context(torch.device("cuda"), "gpu", torch.bfloat16, log=lambda message: None)
    section = robustness.section_sanitizer(ctx)
    assert section["status"] == "ran" and section["tool"] == str(fake)
    plain, *memchecks = section["rows"]
    assert plain["exit_code"] == 0 and plain["error_summary"] is None
    assert any("13 ok, 0 skipped, 0 failed" in line for line in plain["tail"]), plain["tail"]
    assert [row["run"] for row in memchecks] == ["memcheck cuda", "memcheck triton"]  # one run per backend
    for memcheck in memchecks:
        assert memcheck["exit_code"] == 0 and memcheck["error_summary"] == "========= ERROR SUMMARY: 0 errors"
    assert robustness.failures(section) == 0


def test_primitive_filter_limits_the_deterministic_rows():
    results = robustness.run(["deterministic"], device=torch.device("cpu"), log=lambda message: None,
                             primitives=["causal_conv1d"])
    rows = results["sections"]["deterministic"]["rows"]
    assert rows and {row["primitive"] for row in rows} == {"causal_conv1d"}


def test_unknown_primitive_is_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        robustness.main(["--only", "deterministic", "--primitive", "conv"])
    assert info.value.code == 2 and "conv" in capsys.readouterr().err


def test_unknown_section_is_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        robustness.main(["--only", "first-call,nonsense"])
    assert info.value.code == 2 and "nonsense" in capsys.readouterr().err


def test_sanitize_script_runs_on_cpu():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "sanitize_kernels.py"), "--device", "cpu",
                             "--backends", "reference,triton", "--case", "selective_state_update,causal_conv1d"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "14 ok, 0 skipped, 0 failed" in result.stdout
