"""Times the Triton SSD scan kernel (``_scan_kernel``, 81% of the forward and 90% of fwd+bwd in
``bench --profile`` on the H200) under other tile configurations than
``ssmkernels/ops/ssd/triton.py: _SCAN_CFG / _SCAN_CFG_F32``, at the bench's SSD shape (B4 L4096 H128
P64 N128 G8 chunk 256 bf16, D, dt_bias, softplus). A tuning tool for the GPU machine:

    python scripts/tune_ssd_scan.py [--forward-only] [--json out.json]

Each row: the configuration, median time of the whole forward (or forward + backward), and the
largest difference of the outputs (or of dx) from the library's configuration, so that a tiling that
computes something else shows. The library's current choice is marked with '*'.
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

# bf16-operand forward scan: (BLOCK_M, BLOCK_K, num_warps, num_stages)
FORWARD = [(64, 32, 4, 3), (64, 32, 4, 4), (64, 32, 4, 2), (128, 32, 4, 3), (64, 16, 4, 3), (32, 32, 4, 3),
           (64, 32, 2, 3), (64, 64, 8, 3)]
# float32-operand backward scans at tf32 (bf16 inputs): (BLOCK_M, BLOCK_K, num_warps, num_stages)
BACKWARD = [(32, 32, 4, 2), (32, 32, 2, 2), (32, 16, 4, 2), (16, 32, 4, 2), (32, 32, 8, 2)]


def _time(case_name: str, fwd_cfg: dict, f32_cfg: dict):
    case = next(c for c in cases.all_cases() if c.name == case_name)
    saved = dict(ssd_triton._SCAN_CFG), dict(ssd_triton._SCAN_CFG_F32)
    ssd_triton._SCAN_CFG.update(fwd_cfg)
    ssd_triton._SCAN_CFG_F32.clear()
    ssd_triton._SCAN_CFG_F32.update(f32_cfg)
    try:
        build, _ = runner.implementation(case, "ssmkernels:triton")
        torch.manual_seed(0)
        forward, leaves = build(case.make(torch.device("cuda")))
        step = runner.make_step(forward, leaves, case.backward)
        result = step()
        result = result[0] if isinstance(result, (tuple, list)) else result
        result = result.float().clone()
        t = timing.measure([step], warmup_ms=25, rep_ms=150)
        return t.median_ms, result
    finally:
        ssd_triton._SCAN_CFG.clear()
        ssd_triton._SCAN_CFG.update(saved[0])
        ssd_triton._SCAN_CFG_F32.clear()
        ssd_triton._SCAN_CFG_F32.update(saved[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    rows = []
    default_fwd = (ssd_triton._SCAN_CFG["BLOCK_M"], ssd_triton._SCAN_CFG["BLOCK_K"], ssd_triton._SCAN_CFG["num_warps"],
                   ssd_triton._SCAN_CFG.get("num_stages", 3))
    reference = None
    for bm, bk, warps, stages in [default_fwd] + [c for c in FORWARD if c != default_fwd]:
        label = f"fwd BLOCK_M {bm:3d} BLOCK_K {bk:3d} warps {warps} stages {stages}"
        started = time.perf_counter()
        try:
            ms, out = _time("ssd-fwd", {"BLOCK_M": bm, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages},
                            dict(ssd_triton._SCAN_CFG_F32))
        except Exception as exc:  # out of shared memory, a compile failure: reported, the sweep goes on
            print(f"  {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
            continue
        reference = out if reference is None else reference
        diff = (out - reference).abs().max().item()
        mark = "*" if (bm, bk, warps, stages) == default_fwd else " "
        print(f"{mark} {label}  {ms:8.3f} ms  max diff {diff:.3g}  ({time.perf_counter() - started:.0f} s)", flush=True)
        rows.append({"mode": "fwd", "BLOCK_M": bm, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages,
                     "median_ms": ms, "max_diff": diff})
    if not args.forward_only:
        f32 = ssd_triton._SCAN_CFG_F32
        default_bwd = (f32["BLOCK_M"], f32["BLOCK_K"], ssd_triton._SCAN_CFG["num_warps"], f32.get("num_stages", 3))
        reference = None
        for bm, bk, warps, stages in [default_bwd] + [c for c in BACKWARD if c != default_bwd]:
            label = f"fwd+bwd f32 BLOCK_M {bm:3d} BLOCK_K {bk:3d} warps {warps} stages {stages}"
            started = time.perf_counter()
            try:
                ms, out = _time("ssd-fwdbwd", {},  # (the forward's bf16 scan keeps its configuration)
                                {"BLOCK_M": bm, "BLOCK_K": bk, "num_stages": stages, "num_warps": warps})
            except Exception as exc:
                print(f"  {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
                continue
            reference = out if reference is None else reference
            diff = (out - reference).abs().max().item()
            mark = "*" if (bm, bk, warps, stages) == default_bwd else " "
            print(f"{mark} {label}  {ms:8.3f} ms  max dx diff {diff:.3g}  ({time.perf_counter() - started:.0f} s)",
                  flush=True)
            rows.append({"mode": "fwd+bwd", "BLOCK_M": bm, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages,
                         "median_ms": ms, "max_diff": diff})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
