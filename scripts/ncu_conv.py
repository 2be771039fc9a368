"""Two calls each of causal-conv1d's and our CUDA causal_conv1d, forward and forward+backward, at the
bench's channel-first shape (B4 D10240 L4096 W4 bf16 silu): a target for Nsight Compute on the GPU
machine, to compare the two implementations' kernels side by side.

    ncu --clock-control none -k regex:"conv1d|first" -c 16 --section SpeedOfLight --section Occupancy \\
        --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \\
        python scripts/ncu_conv.py

causal_conv1d must be importable (the bench's peer setup: scripts/gpu_suite.sh peers); without it
only our kernels run.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssmkernels.ops.causal_conv1d.op import causal_conv1d  # noqa: E402

b, d, l, w = 4, 10240, 4096, 4
x = torch.randn(b, d, l, device="cuda", dtype=torch.bfloat16, requires_grad=True)
weight = (torch.randn(d, w, device="cuda", dtype=torch.bfloat16) * 0.5).requires_grad_()
bias = (torch.randn(d, device="cuda", dtype=torch.bfloat16) * 0.5).requires_grad_()
grad = torch.randn(b, d, l, device="cuda", dtype=torch.bfloat16)
implementations = {"ssmkernels": lambda: causal_conv1d(x, weight, bias, activation="silu", backend="cuda")}
try:
    from causal_conv1d import causal_conv1d_fn
    implementations["causal_conv1d"] = lambda: causal_conv1d_fn(x, weight, bias, activation="silu")
except ImportError as error:
    print(f"causal_conv1d not importable ({error}): only ours runs")
for name, fn in implementations.items():
    for _ in range(2):
        fn().backward(grad)
    torch.cuda.synchronize()
    print(name, "done")
