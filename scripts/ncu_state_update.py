"""Two launches of each selective_state_update kernel (CUDA, then Triton) per state dtype, at the
bench's batch-256 decode shape (H128 P64 N128 G8, bf16 x/B/C, stride-0 A/dt/D/dt_bias, softplus):
a target for Nsight Compute on the GPU machine.

    ncu --clock-control none -k regex:state_update -c 8 --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats python scripts/ncu_state_update.py

(benchmarks/results/ncu_state_update_h200.txt is such a run.)
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssmkernels.ops.state_update import cuda as su_cuda  # noqa: E402
from ssmkernels.ops.state_update import triton as su_triton  # noqa: E402

b, h, p, n, g = 256, 128, 64, 128, 8
for state_dtype in (torch.float32, torch.bfloat16):
    state = torch.randn(b, h, p, n, device="cuda", dtype=state_dtype)
    x = torch.randn(b, h, p, device="cuda", dtype=torch.bfloat16)
    dt = torch.rand(b, h, device="cuda", dtype=torch.bfloat16)[..., None].expand(-1, h, p)
    A = (-torch.rand(h, device="cuda") - 0.5)[:, None, None].expand(h, p, n)
    B = torch.randn(b, g, n, device="cuda", dtype=torch.bfloat16)
    C = torch.randn(b, g, n, device="cuda", dtype=torch.bfloat16)
    D = torch.randn(h, device="cuda")[:, None].expand(h, p)
    dt_bias = torch.rand(h, device="cuda")[:, None].expand(h, p)
    out = torch.empty_like(x)
    args = (state, x, dt, A, B, C, D, None, dt_bias, True, None, -1, out)
    for kernels in (su_cuda, su_triton):
        for _ in range(2):
            kernels.update(*args)
torch.cuda.synchronize()
