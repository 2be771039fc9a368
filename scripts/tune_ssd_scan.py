"""Times the Triton SSD kernels under other configurations than the ``_*_CFG`` dicts at the top of
``ssmkernels/ops/ssd/triton.py``, at the bench's SSD shape (B4 L4096 H128 P64 N128 G8 chunk 256
bf16, D, dt_bias, softplus). A tuning tool for the GPU machine:

    python scripts/tune_ssd_scan.py [--sweep scan-fwd,scan-bwd,segment,pass] [--json out.json]

Sweeps (``bench --profile`` on the H200 put 81% of the forward and 90% of fwd+bwd in the scan
kernel before its retune; the segment and state-pass kernels are the next largest):
- scan-fwd: ``_SCAN_CFG`` (the scan kernel with bf16 operands), timing the whole forward;
- scan-bwd: ``_SCAN_CFG_F32`` (the backward's float32-operand scans at tf32), timing fwd+bwd;
- segment: ``_SEGMENT_CFG`` (chunk states, forward), timing the whole forward;
- pass: ``_PASS_CFG`` (the sequential state pass), timing the whole forward.

Each row: the configuration, median time, and the largest difference of the outputs (forward) or
of all gradients (fwd+bwd) from the library's configuration, so that a tiling that computes something else
shows. The library's current choice comes first, marked with '*'.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssmkernels.bench import cases, runner, timing  # noqa: E402
from ssmkernels.ops.ssd import triton as ssd_triton  # noqa: E402

# name -> (config dict in triton.py, bench case, candidate overrides)
SWEEPS = {
    "scan-fwd": ("_SCAN_CFG", "ssd-fwd", [
        dict(BLOCK_M=64, BLOCK_K=32, num_warps=4, num_stages=2), dict(BLOCK_M=64, BLOCK_K=32, num_warps=4, num_stages=4),
        dict(BLOCK_M=128, BLOCK_K=32, num_warps=4, num_stages=3), dict(BLOCK_M=64, BLOCK_K=16, num_warps=4, num_stages=3),
        dict(BLOCK_M=32, BLOCK_K=32, num_warps=4, num_stages=3), dict(BLOCK_M=64, BLOCK_K=32, num_warps=8, num_stages=3),
        dict(BLOCK_M=64, BLOCK_K=64, num_warps=8, num_stages=3)]),
    "scan-bwd": ("_SCAN_CFG_F32", "ssd-fwdbwd", [
        dict(BLOCK_M=32, BLOCK_K=32, num_warps=2, num_stages=2), dict(BLOCK_M=32, BLOCK_K=32, num_warps=4, num_stages=3),
        dict(BLOCK_M=32, BLOCK_K=16, num_warps=4, num_stages=2), dict(BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=2),
        dict(BLOCK_M=32, BLOCK_K=32, num_warps=8, num_stages=2),
        # the dB/dC scans' value tile (d_state 128: two 64-wide tiles by default)
        dict(BLOCK_V_MAX=128), dict(BLOCK_V_MAX=32), dict(BLOCK_V_MAX=128, num_warps=2, num_stages=2),
        dict(BLOCK_V_MAX=32, num_warps=2, num_stages=2)]),
    "segment": ("_SEGMENT_CFG", "ssd-fwd", [
        dict(BLOCK_T=32, num_warps=4), dict(BLOCK_T=64, num_warps=4), dict(BLOCK_T=32, num_warps=8),
        dict(BLOCK_T=128, num_warps=8), dict(BLOCK_P=32, num_warps=4), dict(BLOCK_N=64, num_warps=4),
        dict(num_stages=2), dict(num_stages=4)]),
    "pass": ("_PASS_CFG", "ssd-fwd", [
        dict(BLOCK=512, num_warps=4), dict(BLOCK=2048, num_warps=4), dict(BLOCK=2048, num_warps=8),
        dict(BLOCK=4096, num_warps=8), dict(BLOCK=1024, num_warps=2)]),
}


def _time(case_name: str, cfg_name: str, overrides: dict):
    """(median ms, every output or gradient as one float32 vector) of the case with ``overrides`` applied to the
    config dict ``cfg_name`` of triton.py (restored afterwards)."""
    case = next(c for c in cases.all_cases() if c.name == case_name)
    cfg = getattr(ssd_triton, cfg_name)
    saved = dict(cfg)
    cfg.update(overrides)
    try:
        build, _ = runner.implementation(case, "ssmkernels:triton")
        torch.manual_seed(0)
        forward, leaves = build(case.make(torch.device("cuda")))
        step = runner.make_step(forward, leaves, case.backward)
        result = step()
        # every gradient (fwd+bwd) or output, flattened: a tile of the dB/dC scans shows in dB/dC
        parts = result if isinstance(result, (tuple, list)) else [result]
        result = torch.cat([t.detach().float().flatten() for t in parts if t is not None])
        return timing.measure([step], warmup_ms=25, rep_ms=150).median_ms, result
    finally:
        cfg.clear()
        cfg.update(saved)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", default=",".join(SWEEPS), help=f"comma-separated, of {', '.join(SWEEPS)}")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    rows = []
    for name in args.sweep.split(","):
        cfg_name, case_name, candidates = SWEEPS[name]
        reference = None
        for overrides in [{}] + candidates:  # {}: the library's configuration
            label = f"{name:9s} {case_name:11s} " + (", ".join(f"{k}={v}" for k, v in overrides.items()) or
                                                      f"library: {getattr(ssd_triton, cfg_name)}")
            started = time.perf_counter()
            try:
                ms, out = _time(case_name, cfg_name, overrides)
            except Exception as exc:  # out of shared memory, a compile failure: reported, the sweep goes on
                print(f"  {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
                continue
            reference = out if reference is None else reference
            diff = (out - reference).abs().max().item()
            print(f"{'*' if not overrides else ' '} {label}  {ms:8.3f} ms  max diff {diff:.3g}  "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
            rows.append({"sweep": name, "case": case_name, "overrides": overrides, "median_ms": ms, "max_diff": diff})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
