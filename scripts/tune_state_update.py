"""Times the Triton selective_state_update kernel under other tile choices than
``ssmkernels/ops/state_update/triton.py: _launch_config`` makes, at the bench's decode shapes
(H128 P64 N128 G8, bf16 x/B/C, stride-0 A/dt/D/dt_bias, softplus), next to a device copy.
A tuning tool for the GPU machine:

    python scripts/tune_state_update.py [--batch 256] [--json out.json] [--cuda-packs 1,2,4]
        [--cuda-kernels default,rows] [--no-triton]

Each row: state dtype, tile (state elements per program), warps, programs per SM (0: one program per
tile; k: the pipelined kernel, at most k programs per SM looping over tiles; ``--programs-per-sm``
picks the values), median time, GB/s and % of copy.
The library's current choice is marked with '*'. ``--cuda-packs`` also times the CUDA kernel with
each cap on the 16-byte state packs per thread (SSMKERNELS_STATE_UPDATE_PACKS, one process each,
since the launcher reads it once; 0 = the launcher's own choice), on the per-row kernel;
``--cuda-kernels`` times the CUDA launcher's kernels (SSMKERNELS_STATE_UPDATE_KERNEL: ``rows``
forces the per-row kernel, ``default`` leaves the launcher's choice, the head kernel for Mamba-2
steps). Each CUDA child first times an in-place ``state.mul_`` (the read-modify-write ceiling).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssmkernels.bench import timing  # noqa: E402
from ssmkernels.ops.state_update import cuda as su_cuda  # noqa: E402
from ssmkernels.ops.state_update import triton as su_triton  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (default 256)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--programs-per-sm", type=lambda text: [int(v) for v in text.split(",")], default=[0],
                        help="comma-separated programs per SM of the Triton kernel to time (default 0)")
    parser.add_argument("--cuda-packs", help="comma-separated caps on the per-row CUDA kernel's packs per thread to time")
    parser.add_argument("--cuda-kernels", help="comma-separated SSMKERNELS_STATE_UPDATE_KERNEL values to time "
                        "(rows = the per-row kernel; default = the launcher's choice)")
    parser.add_argument("--cuda-only", action="store_true", help=argparse.SUPPRESS)  # one --cuda-packs/--cuda-kernels child
    parser.add_argument("--no-triton", action="store_true", help="time the CUDA kernels only")
    args = parser.parse_args()
    if (args.cuda_packs or args.cuda_kernels) and not args.cuda_only:
        command = [sys.executable, __file__, "--cuda-only"] + [f"--batch={b}" for b in args.batch or [256]]
        for packs in args.cuda_packs.split(",") if args.cuda_packs else []:
            subprocess.run(command, check=False, env=dict(os.environ, SSMKERNELS_STATE_UPDATE_PACKS=packs,
                                                          SSMKERNELS_STATE_UPDATE_KERNEL="rows"))
        for kernel in args.cuda_kernels.split(",") if args.cuda_kernels else []:
            subprocess.run(command, check=False, env=dict(os.environ, SSMKERNELS_STATE_UPDATE_KERNEL=kernel))
        if args.no_triton:
            return
    h, p, n, g = 128, 64, 128, 8
    peaks = timing.peaks()
    print(f"copy {peaks.copy_gbps:.0f} GB/s", flush=True)
    default_config = su_triton._launch_config
    rows = []
    for batch in args.batch or [256]:
        for state_dtype in (torch.float32, torch.bfloat16):
            copies = max(1, min(8, int(3 * 60e6 // (batch * h * p * n * state_dtype.itemsize)) + 1))
            sets = []
            for _ in range(copies):
                state = torch.randn(batch, h, p, n, device="cuda", dtype=state_dtype)
                x = torch.randn(batch, h, p, device="cuda", dtype=torch.bfloat16)
                dt = (torch.rand(batch, h, device="cuda", dtype=torch.bfloat16) * 3 - 4)[..., None].expand(-1, h, p)
                A = (-torch.rand(h, device="cuda") * 4 - 0.5)[:, None, None].expand(h, p, n)
                B = torch.randn(batch, g, n, device="cuda", dtype=torch.bfloat16)
                C = torch.randn(batch, g, n, device="cuda", dtype=torch.bfloat16)
                D = torch.randn(h, device="cuda")[:, None].expand(h, p)
                dt_bias = (torch.rand(h, device="cuda") - 0.5)[:, None].expand(h, p)
                out = torch.empty_like(x)
                sets.append((state, x, dt, A, B, C, D, None, dt_bias, True, None, -1, out))
            nbytes = 2 * batch * h * p * n * state_dtype.itemsize + (2 * batch * h * p + 2 * batch * g * n) * 2
            if args.cuda_only:
                # What an in-place read-modify-write of the state alone reaches (torch's mul_): the
                # ceiling for a kernel that reads and writes the state once.
                t = timing.measure([lambda s=s: s[0].mul_(1.0) for s in sets])
                gbps = 2 * sets[0][0].numel() * state_dtype.itemsize / (t.median_ms * 1e-3) / 1e9
                print(f"  b{batch} {str(state_dtype):15} state.mul_ (in place)  {t.median_ms:.4f} ms "
                      f"{gbps:6.0f} GB/s {100 * gbps / peaks.copy_gbps:5.1f}%", flush=True)
                packs = os.environ.get("SSMKERNELS_STATE_UPDATE_PACKS", "0")
                kernel = os.environ.get("SSMKERNELS_STATE_UPDATE_KERNEL", "default")
                t = timing.measure([lambda s=s: su_cuda.update(*s) for s in sets])
                gbps = nbytes / (t.median_ms * 1e-3) / 1e9
                print(f"  b{batch} {str(state_dtype):15} cuda {kernel:7} packs {packs:>2}  {t.median_ms:.4f} ms "
                      f"{gbps:6.0f} GB/s {100 * gbps / peaks.copy_gbps:5.1f}%", flush=True)
                continue
            chosen = default_config(batch, h, p, n, state_dtype.itemsize)
            for tile, warps, per_sm in itertools.product((1024, 2048, 4096, 8192), (2, 4, 8), args.programs_per_sm):
                block_p = min(p, tile // n)
                if block_p < 1 or tile // (32 * warps) < 1:
                    continue
                config = (block_p, n, warps, per_sm)
                su_triton._launch_config = lambda *a, config=config: config
                steps = [lambda s=s: su_triton.update(*s) for s in sets]
                try:
                    t = timing.measure(steps)
                except Exception as exc:  # noqa: BLE001 (a config the compiler rejects)
                    print(f"{state_dtype} tile {tile} warps {warps} per SM {per_sm}: {type(exc).__name__}", flush=True)
                    continue
                gbps = nbytes / (t.median_ms * 1e-3) / 1e9
                mark = "*" if config == chosen else " "
                row = dict(batch=batch, state=str(state_dtype), tile=tile, warps=warps, programs_per_sm=per_sm,
                           ms=t.median_ms, gbps=gbps, pct_copy=100 * gbps / peaks.copy_gbps)
                rows.append(row)
                print(f"{mark} b{batch} {str(state_dtype):15} tile {tile:5} warps {warps:2} per SM {per_sm:2}  "
                      f"{t.median_ms:.4f} ms {gbps:6.0f} GB/s {row['pct_copy']:5.1f}%", flush=True)
            su_triton._launch_config = default_config
    if args.json:
        Path(args.json).write_text(json.dumps(dict(copy_gbps=peaks.copy_gbps, gpu=torch.cuda.get_device_name(),
                                                   rows=rows), indent=1))


if __name__ == "__main__":
    main()
