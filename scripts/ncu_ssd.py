"""One forward+backward of our Triton SSD and one forward of mamba_ssm's at the bench's SSD shape
(B4 L4096 H128 P64 N128 G8 chunk 256 bf16, D, dt_bias, softplus): a target for Nsight Compute on
the GPU machine, to see what bounds the scan kernels (ours: forward, dy, dx, dB, dC in that order).

    ncu --clock-control none -k regex:"_scan_kernel|_chunk_scan_fwd_kernel" -c 6 --section SpeedOfLight \\
        --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \\
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis python scripts/ncu_ssd.py

mamba_ssm's Triton ops must be importable (scripts/gpu_suite.sh peers puts them on PYTHONPATH);
without them only ours runs.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ssmkernels  # noqa: E402

torch.manual_seed(0)
b, l, h, p, g, n, chunk = 4, 4096, 128, 64, 8, 128, 256
dev, bf16 = "cuda", torch.bfloat16
x = torch.randn(b, l, h, p, device=dev, dtype=bf16, requires_grad=True)
dt = torch.randn(b, l, h, device=dev, dtype=bf16, requires_grad=True)
A = (-torch.rand(h, device=dev) - 0.5).requires_grad_()
B = torch.randn(b, l, g, n, device=dev, dtype=bf16, requires_grad=True)
C = torch.randn(b, l, g, n, device=dev, dtype=bf16, requires_grad=True)
D = torch.randn(h, device=dev, requires_grad=True)
bias = torch.randn(h, device=dev, requires_grad=True)
grad = torch.randn(b, l, h, p, device=dev, dtype=bf16)
out = ssmkernels.ssd_chunk_scan(x, dt, A, B, C, chunk, D=D, dt_bias=bias, dt_softplus=True, backend="triton")
out.backward(grad)
torch.cuda.synchronize()
print("ssmkernels done")
try:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except ImportError as error:
    print(f"mamba_ssm not importable ({error}): only ours ran")
else:
    with torch.no_grad():
        mamba_chunk_scan_combined(x, dt, A, B, C, chunk, D=D, dt_bias=bias, dt_softplus=True)
    torch.cuda.synchronize()
    print("mamba_ssm done")
