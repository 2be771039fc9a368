"""The command line (python -m ssmkernels ...) and the check/bench harness behind it, on the CPU."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssmkernels import cli
from ssmkernels.bench import cases as bench_cases
from ssmkernels.bench import checks, peers, report

ROOT = Path(__file__).resolve().parents[1]
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().out


def test_module_entry_point_runs_info():
    result = subprocess.run([sys.executable, "-m", "ssmkernels", "info"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ssmkernels" in result.stdout and "torch" in result.stdout


def test_info_lists_every_primitive_and_backend(capsys):
    code, out = run_cli(capsys, "info")
    assert code == 0
    for label in ("causal_conv1d ", "causal_conv1d_update", "selective_scan", "ssd_chunk_scan",
                  "selective_state_update"):
        assert label in out
    lines = [line for line in out.splitlines() if line.strip().startswith(("causal", "selective", "ssd_"))]
    for backend in ("reference", "triton", "cuda"):
        assert sum(f" {backend} " in line for line in lines) == 5, backend
    assert "reference  available" in out
    for word in ("GPU", "extension", "cache dir", "SSMKERNELS_BACKEND", "triton"):
        assert word in out


def test_representative_features_name_what_the_ops_use():
    """info asks each backend with a features dict shaped like the one the op builds."""
    for label, primitive, features in cli.representative_calls(torch.device("cpu")):
        assert primitive in checks.PRIMITIVES
        assert "dtype" in features, label


def test_check_quick_reference_passes_and_prints_the_table(capsys):
    code, out = run_cli(capsys, "check", "--quick", "--backend", "reference")
    assert code == 0, out
    header = next(line for line in out.splitlines() if "primitive" in line and "feature" in line)
    for column in ("backend", "dtype", "max err", "tol", "status"):
        assert column in header
    assert "PASS" in out and "FAIL" not in out.replace("0 failed", "")
    for primitive in checks.PRIMITIVES:
        assert primitive in out
    assert "vs quadratic form" in out  # the second formulation of SSD
    assert " passed, 0 failed" in out


def test_check_writes_json(capsys, tmp_path):
    code, out = run_cli(capsys, "check", "--quick", "-b", "reference", "-p", "state_update", "--json",
                        str(tmp_path / "check.json"))
    data = json.loads((tmp_path / "check.json").read_text())
    assert code == 0 and data["results"] and {r["status"] for r in data["results"]} == {"PASS"}
    assert data["meta"]["torch"] == torch.__version__


@needs_no_gpu
def test_check_reports_unavailable_backends_as_skips(capsys):
    code, out = run_cli(capsys, "check", "--quick", "--backend", "cuda", "--primitive", "ssd")
    assert code == 0
    assert "SKIP" in out and "CUDA tensors" in out and "PASS" not in out


def _failing_cases():
    def make(r):
        return {"x": r.normal(2, 3, 5), "weight": r.normal(3, 4), "bias": r.normal(3)}

    def call(x, weight, bias, backend=None):
        return cli_conv(x, weight, bias, backend)

    def wrong(x, weight, bias):
        return cli_conv(x, weight, bias, "reference") * 1.5

    def crash(x, weight, bias):
        raise RuntimeError("kernel exploded")

    return [checks.CheckCase("causal_conv1d", "fake wrong answer", make, call, ("x",), backends=("reference",),
                             alternative=wrong, quick=True),
            checks.CheckCase("causal_conv1d", "fake crash", make, call, backends=("reference",), alternative=crash,
                             quick=True),
            checks.CheckCase("causal_conv1d", "fake fine", make, call, ("x", "weight"), backends=("reference",),
                             quick=True)]


def cli_conv(x, weight, bias, backend):
    from ssmkernels import causal_conv1d

    return causal_conv1d(x, weight, bias, activation="silu", backend=backend)


def test_check_exits_nonzero_when_a_case_fails(capsys, monkeypatch):
    monkeypatch.setattr(checks, "all_cases", _failing_cases)
    code, out = run_cli(capsys, "check", "--backend", "reference", "--dtype", "float32")
    assert code == 1
    assert "fake wrong answer" in out and "exceeds tolerance" in out
    assert "RuntimeError: kernel exploded" in out
    assert "1 passed, 2 failed" in out


def test_run_case_returns_comparisons_not_exceptions():
    wrong, crash, fine = _failing_cases()
    cpu = torch.device("cpu")
    bad = checks.run_case(wrong, "reference", torch.float32, cpu)
    assert bad.status == "FAIL" and bad.error > bad.tolerance
    assert checks.run_case(crash, "reference", torch.float32, cpu).status == "FAIL"
    good = checks.run_case(fine, "reference", torch.float16, cpu)
    assert good.status == "PASS" and good.error <= good.tolerance and good.worst


@pytest.mark.parametrize("case", [c for c in checks.all_cases() if "reference" in c.backends],
                         ids=lambda c: c.name.replace(" ", "_"))
def test_every_check_case_passes_on_the_reference(case):
    """The rows of `check` are well formed: the reference passes them (float32, or float64 where pinned).
    Kernel-only rows (SSD chunk sizes, which the reference does not have) are left out."""
    dtype = case.dtypes[0] if case.dtypes else torch.float32
    result = checks.run_case(case, "reference", dtype, torch.device("cpu"))
    assert result.status == "PASS", f"{case.name}: {result.detail} {result.error} {result.tolerance}"


def test_check_plan_filters():
    cpu = torch.device("cpu")
    full = checks.plan(device=cpu)
    quick = checks.plan(quick=True, device=cpu)
    assert 0 < len(quick) < len(full)
    only = checks.plan(["ssd"], ["reference"], [torch.float16], device=cpu)
    assert {(c.primitive, b, d) for c, b, d, _ in only if d != torch.float64} == {("ssd", "reference", torch.float16)}
    # the interpreter cannot check bf16 Triton kernels: those rows are skipped with a reason
    rows = checks.plan(["state_update"], ["triton"], [torch.bfloat16], device=cpu)
    assert all(skip for *_, skip in rows)


def test_bench_dry_run_lists_the_issue_shapes(capsys):
    code, out = run_cli(capsys, "bench", "--dry-run", "--compare")
    assert code == 0
    for name in ("conv1d-cf-fwd", "conv1d-cl-fwdbwd", "conv1d-update-b256", "scan-n16-fwdbwd", "scan-n128-fwd",
                 "ssd-fwdbwd", "ssd-chunk64-fwd", "ssd-n64-fwd", "ssd-varlen-fwd", "state-update-b256-f32state",
                 "state-update-b1-bf16state"):
        assert name in out
    for peer in ("causal_conv1d", "mamba_ssm", "fla", "torch"):
        assert peer in out


def test_bench_filters(capsys):
    code, out = run_cli(capsys, "bench", "--dry-run", "--primitive", "ssd", "--case", "varlen")
    assert code == 0 and "ssd-varlen-fwd" in out and "conv1d-" not in out
    code, out = run_cli(capsys, "bench", "--dry-run", "--case", "ssd-fwd")  # exact name: that case only
    assert code == 0 and "ssd-fwdbwd" not in out and "ssd-fwd " in out
    code, out = run_cli(capsys, "bench", "--dry-run", "--case", "no-such-case")
    assert code == 2


@needs_no_gpu
def test_bench_without_gpu_says_so_and_exits_2(capsys):
    code, out = run_cli(capsys, "bench")
    assert code == 2
    assert "needs a CUDA GPU" in out and "--dry-run" in out


def test_bench_cases_have_traffic_and_flops():
    names = [c.name for c in bench_cases.all_cases()]
    assert len(names) == len(set(names))
    for case in bench_cases.all_cases():
        assert case.bytes > 0 and case.flops > 0, case.name
        assert case.mode in ("fwd", "fwd+bwd", "decode")
        assert bool(case.grads) == case.backward, case.name
    assert any(c.wall_loop for c in bench_cases.all_cases())


def test_bench_inputs_build_at_small_scale():
    """The cases' input builders and call closures agree with the public API (run at their real shapes
    only on a GPU; here the state-update case, which is small, runs on the reference)."""
    case = next(c for c in bench_cases.all_cases() if c.name == "state-update-b1-f32state")
    inputs = case.make(torch.device("cpu"))
    out = case.ours(inputs, "reference")()
    assert out.shape == inputs["x"].shape and torch.isfinite(out).all()


def test_peers_report_why_they_are_missing():
    loaded = peers.load()
    assert set(loaded) == {"causal_conv1d", "mamba_ssm", "fla", "torch"}
    assert loaded["torch"].get("conv1d") is not None
    for peer in loaded.values():
        for function in ("causal_conv1d_fn", "mamba_chunk_scan_combined", "chunk_simple_gla"):
            if peer.get(function) is None:
                assert peer.why_missing(function)


def _fake_rows():
    rows = [report.Row("ssd-fwd", "ssd", "fwd", "B4 ...", "ssmkernels:triton", "ok", median_ms=1.5, p20_ms=1.4,
                       p80_ms=1.6, bytes=10**9, flops=10**11, gbps=666.0, tflops=66.0, pct_copy_bw=22.0,
                       pct_matmul_peak=9.0, speedup_vs_best_peer=1.2),
            report.Row("ssd-fwd", "ssd", "fwd", "B4 ...", "ssmkernels:cuda", "unavailable", reason="not built"),
            report.Row("ssd-fwd", "ssd", "fwd", "B4 ...", "mamba_ssm", "ok", median_ms=1.8, p20_ms=1.7, p80_ms=1.9,
                       gbps=555.0, tflops=55.0)]
    meta = {"gpu": "fake GPU", "timestamp": "now", "versions": {"torch": "x"}, "peers": {"fla": "0.6"},
            "peaks": {"copy_gbps": 3000.0, "matmul_tflops": 700.0, "matmul_n": 8192}, "timing": "events"}
    return meta, rows


def test_report_outputs(tmp_path):
    meta, rows = _fake_rows()
    text = report.table(rows)
    assert "ssmkernels:triton" in text and "unavailable: not built" in text and "1.20x" in text
    report.write_json(tmp_path / "b.json", meta, rows)
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["meta"]["gpu"] == "fake GPU" and len(data["results"]) == 3
    report.write_markdown(tmp_path / "b.md", meta, rows)
    md = (tmp_path / "b.md").read_text()
    assert "| ssd-fwd |" in md and "fake GPU" in md and "3000 GB/s" in md
    pytest.importorskip("matplotlib")
    assert report.write_plot(tmp_path / "b.png", meta, rows) is None
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_build_without_nvcc_says_so(capsys, monkeypatch):
    from ssmkernels._core import build

    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    code, out = run_cli(capsys, "build")
    assert code == 2 and "nvcc not found" in out


def test_warmup_runs_on_the_reference(capsys):
    code, out = run_cli(capsys, "warmup", "--backend", "reference", "--seqlen", "5")
    assert code == 0, out
    assert "first call" in out and "issue 10" in out


def test_demo_without_a_name_explains(capsys):
    code, out = run_cli(capsys, "demo")
    assert code == 2 and "demo" in out


def test_unknown_primitive_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown primitive"):
        cli.main(["check", "--primitive", "mamba3"])


# ----------------------------------------------------------------------------- bench harness on the CPU
def _tiny_conv_case(peer_list):
    from ssmkernels import causal_conv1d

    def make(device):
        torch.manual_seed(0)
        return {"x": torch.randn(2, 8, 33), "weight": torch.randn(8, 4), "bias": torch.randn(8)}

    def ours(kw, backend):
        return lambda: causal_conv1d(kw["x"], kw["weight"], kw["bias"], activation="silu", backend=backend)

    return bench_cases.BenchCase("causal_conv1d", "tiny-conv-fwdbwd", "fwd+bwd", "B2 D8 L33", make, ours,
                                 ("x", "weight", "bias"), 10**9, 10**9, peer_list)  # big: no input rotation


def test_runner_assembles_rows(monkeypatch):
    """run_case on the CPU with a wall-clock stand-in for the CUDA-event timer: rows, rates, peers."""
    import time as _time

    from ssmkernels.bench import runner, timing

    def fake_measure(steps, warmup_ms=0, rep_ms=0):
        started = _time.perf_counter()
        for step in steps * 3:
            step()
        ms = (_time.perf_counter() - started) * 1e3 / (3 * len(steps))
        return timing.Timing(ms, ms, ms, ms, 3 * len(steps))

    monkeypatch.setattr(runner, "measure", fake_measure)
    conv = bench_cases.all_cases()[0].peers  # causal_conv1d_fn (missing here) and torch
    missing = bench_cases.PeerImpl("fla", "fla", "no_such_function", lambda kw, fn: (None, []))
    case = _tiny_conv_case(list(conv) + [missing])
    peaks = timing.Peaks(copy_gbps=1000.0, matmul_tflops=100.0, copy_bytes=1, matmul_n=1)
    rows = runner.run_case(case, ("reference",), True, peaks, 1, 1, device=torch.device("cpu"), deterministic=True)
    by_impl = {r.impl: r for r in rows}
    assert by_impl["ssmkernels:reference:deterministic"].status == "ok"
    ours = by_impl["ssmkernels:reference"]
    assert ours.status == "ok" and ours.median_ms > 0 and ours.gbps > 0 and ours.pct_copy_bw is not None
    assert by_impl["torch"].status == "ok"
    assert ours.speedup_vs_best_peer == pytest.approx(by_impl["torch"].median_ms / ours.median_ms)
    assert by_impl["fla"].status == "unavailable" and by_impl["fla"].reason
    if peers.load()["causal_conv1d"].get("causal_conv1d_fn") is None:
        assert by_impl["causal_conv1d"].status == "unavailable"
    # the inputs were left as they were given (no grad flags leak into the next implementation)
    assert "unavailable" in report.table(rows)


def test_torch_conv_peer_computes_the_same_convolution():
    from ssmkernels import causal_conv1d
    from ssmkernels._core.tolerance import compare

    case = next(c for c in bench_cases.all_cases() if c.name == "conv1d-cf-fwd")
    torch_peer = next(p for p in case.peers if p.label == "torch")
    d = 6
    kw = {"x": torch.randn(1, d, 5, dtype=torch.float64), "weight": torch.randn(d, 4, dtype=torch.float64),
          "bias": torch.randn(d, dtype=torch.float64)}
    forward, leaves = torch_peer.build(kw, torch.nn.functional.conv1d)
    ref = causal_conv1d(kw["x"], kw["weight"], kw["bias"], activation="silu", backend="reference")
    assert compare(forward(), ref, ref, torch.float64).ok and len(leaves) == 3


def test_fla_mapping_computes_ssd():
    """The fla peer is fed q=C, k=B (per head), v=x*dt, g=A*dt: with fla's own naive recurrence
    this must equal our SSD reference without D (checked where fla and einops are importable)."""
    naive = pytest.importorskip("fla.ops.simple_gla.naive")
    from ssmkernels import ssd_chunk_scan
    from ssmkernels._core.tolerance import compare

    case = next(c for c in bench_cases.all_cases() if c.name == "ssd-fwd")
    fla_peer = next(p for p in case.peers if p.label == "fla")
    b, l, h, p, g, n = 1, 6, 128, 2, 8, 4
    kw = {"x": torch.randn(b, l, h, p), "dt": torch.randn(b, l, h), "A": -torch.rand(h) - 0.5,
          "B": torch.randn(b, l, g, n), "C": torch.randn(b, l, g, n), "D": torch.randn(h), "dt_bias": torch.rand(h)}
    kw = {k: v.to(torch.bfloat16) if k in ("x", "dt", "B", "C") else v for k, v in kw.items()}

    def fla_naive(q, k, v, g, scale, cu_seqlens=None, output_final_state=False):
        return naive.naive_recurrent_simple_gla(q.float(), k.float(), v.float(), g, scale=scale)

    forward, _ = fla_peer.build(kw, fla_naive)
    out = forward()[0]
    kw64 = {k: v.double() for k, v in kw.items()}
    ref64 = ssd_chunk_scan(kw64["x"], kw64["dt"], kw64["A"], kw64["B"], kw64["C"], 16, dt_bias=kw64["dt_bias"],
                           dt_softplus=True, backend="reference")
    ref = ssd_chunk_scan(kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], 16, dt_bias=kw["dt_bias"], dt_softplus=True,
                         backend="reference")
    assert compare(out, ref64, ref, torch.bfloat16).ok


def test_timing_logic_with_stand_in_events(monkeypatch):
    """measure()'s warm-up, repetition count and percentiles, with a wall-clock stand-in for CUDA events."""
    import time as _time

    from ssmkernels.bench import timing

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = _time.perf_counter()

        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    calls = []
    result = timing.measure([lambda: calls.append(_time.sleep(0.001))] * 2, warmup_ms=5, rep_ms=20)
    assert 10 <= result.reps <= 40 and len(calls) > result.reps
    assert result.min_ms <= result.p20_ms <= result.median_ms <= result.p80_ms
    assert 0.5 < result.median_ms < 50
    assert timing.wall_per_call_us([lambda: None], calls=10) >= 0


def test_runner_main_writes_every_output(monkeypatch, tmp_path):
    """The whole `bench` flow on the CPU: stand-ins for the GPU name, the peaks and the timer."""
    from ssmkernels.bench import runner, timing

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in GPU")
    monkeypatch.setattr(runner, "peaks", lambda: timing.Peaks(1000.0, 100.0, 1, 1))
    monkeypatch.setattr(runner, "measure", lambda steps, *a: (steps[0](), timing.Timing(1.0, 0.9, 1.1, 0.8, 3))[1])
    real_run_case = runner.run_case
    monkeypatch.setattr(runner, "run_case",
                        lambda *a, **k: real_run_case(*a, **{**k, "device": torch.device("cpu")}))
    lines = []
    case = _tiny_conv_case(list(bench_cases.all_cases()[0].peers))
    code = runner.main([case], backends=["reference"], compare=True, json_path=str(tmp_path / "b.json"),
                       markdown_path=str(tmp_path / "b.md"), plot_path=str(tmp_path / "b.png"), log=lines.append)
    assert code == 0, lines
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["meta"]["peaks"]["copy_gbps"] == 1000.0 and data["meta"]["timestamp"]
    assert {r["impl"] for r in data["results"]} >= {"ssmkernels:reference", "torch", "causal_conv1d"}
    assert "tiny-conv-fwdbwd" in (tmp_path / "b.md").read_text()
    assert (tmp_path / "b.png").exists()
    assert any("median ms" in line for line in lines)
