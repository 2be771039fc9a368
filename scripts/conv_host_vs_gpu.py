"""Host time against GPU time of bench cases, ours and the peers': the host's enqueue time per call
and the GPU time per call with the host taken out (``timing.queued_times``: calls queued behind a
sleep kernel), next to the per-call CUDA events as the bench takes them (``timing.measure``). Where
the host time nears the GPU time, per-call events turn bimodal (the GPU waits for the host). GPU
machine, with the peers importable (scripts/gpu_suite.sh peers):

    python scripts/conv_host_vs_gpu.py [--case conv1d-cf-fwd --case conv1d-cf-fwdbwd]
                                       [--impl ssmkernels:cuda --impl causal_conv1d] [--reps 3]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssmkernels.bench import cases, runner, timing  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", help="bench case names (default: channel-first conv fwd, fwd+bwd)")
    parser.add_argument("--impl", action="append", help="implementation labels (default: ours on cuda, causal_conv1d)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--calls", type=int, default=40, help="calls queued per repetition")
    args = parser.parse_args()
    for case in cases.select(None, args.case or ["conv1d-cf-fwd", "conv1d-cf-fwdbwd"]):
        for label in args.impl or ["ssmkernels:cuda", "causal_conv1d"]:
            try:
                steps = runner.build_steps(case, label)
            except runner.Unavailable as exc:
                print(f"{case.name:18} {label:16} unavailable: {exc}")
                continue
            for rep in range(args.reps):
                gpu_us, host_us = timing.queued_times(steps, calls=args.calls)
                events = timing.measure(steps)
                print(f"{case.name:18} {label:16} rep {rep}: host {host_us:6.0f} us/call  queued GPU {gpu_us:6.1f} "
                      f"us/call  per-call events p20/p50/p80 {events.p20_ms * 1e3:.0f}/{events.median_ms * 1e3:.0f}/"
                      f"{events.p80_ms * 1e3:.0f} us", flush=True)


if __name__ == "__main__":
    main()
