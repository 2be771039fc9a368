"""Where the host time of a benchmark case's step goes: for cases whose bench time exceeds the sum
of their GPU kernels (``bench --profile``), i.e. the GPU waits for the host.

    python scripts/profile_case_host.py CASE [--impl ssmkernels:cuda] [--steps 50]

Prints the step's wall time without a synchronize (host time, when the host is the bottleneck)
and with one after every step, then a cProfile of the unsynchronised steps (top functions by own
time and by cumulative time). Uses the bench's own cases and step closures.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssmkernels.bench import cases, runner  # noqa: E402


def _per_step_us(steps, count: int, sync_each: bool) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    for i in range(count):
        steps[i % len(steps)]()
        if sync_each:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", help="a bench case name (python -m ssmkernels bench --dry-run)")
    parser.add_argument("--impl", default="ssmkernels:cuda", help="implementation label")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    (case,) = cases.select(None, [args.case])
    steps = runner.build_steps(case, args.impl)
    for _ in range(5):
        for step in steps:
            step()
    print(f"{case.name} [{args.impl}]: {_per_step_us(steps, args.steps, False):.1f} us/step back to back, "
          f"{_per_step_us(steps, args.steps, True):.1f} us/step with a synchronize after each")
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    for i in range(args.steps):
        steps[i % len(steps)]()
    profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(18)
    stats.sort_stats("cumulative").print_stats(18)


if __name__ == "__main__":
    main()
