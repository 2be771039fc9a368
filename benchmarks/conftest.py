"""pytest-benchmark wrappers of the `python -m ssmkernels bench` cases (same cases, same harness).

    python -m pytest benchmarks/ --benchmark-columns=median,iqr,rounds --benchmark-json=out.json

Files are named ``bench_<primitive>.py`` (collected by the hook below). Every case is
parametrized over the ssmkernels backends and the peers of ``ssmkernels.bench.peers``; an
implementation that cannot run here (no GPU, a peer not installed, a backend that cannot serve the
call) is skipped with its reason. pytest-benchmark's own timer measures wall time per call with a
device synchronisation; the CUDA-event median, GB/s and TFLOP/s of the same closures go into each
result's ``extra_info``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself; collect the others once.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU (scripts/gpu_suite.sh runs them on the GPU machine)")
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:  # this hook sees every collected item
            item.add_marker(skip)


@pytest.fixture
def bench_case(benchmark):
    """``bench_case(case, label)`` times one implementation of one case with pytest-benchmark."""
    from ssmkernels.bench import runner, timing

    def run(case, label):
        try:
            steps = runner.build_steps(case, label)
        except runner.Unavailable as exc:
            pytest.skip(f"{label} unavailable: {exc}")
        counter = {"i": 0}

        def call():
            steps[counter["i"] % len(steps)]()
            counter["i"] += 1
            torch.cuda.synchronize()

        benchmark.pedantic(call, rounds=20, iterations=1, warmup_rounds=3)
        measured = timing.measure(steps)
        seconds = measured.median_ms * 1e-3
        benchmark.extra_info.update({
            "case": case.name, "impl": label, "shape": case.shape, "mode": case.mode,
            "cuda_event_median_ms": measured.median_ms, "p20_ms": measured.p20_ms, "p80_ms": measured.p80_ms,
            "gbps": case.bytes / seconds / 1e9, "tflops": case.flops / seconds / 1e12,
            "gpu": torch.cuda.get_device_name(0),
        })
        torch.cuda.empty_cache()

    return run
