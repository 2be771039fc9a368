"""Two forward+backward calls each of causal-conv1d's and our CUDA causal_conv1d at the bench's
channel-first shape (the bench case conv1d-cf-fwdbwd: B4 D10240 L4096 W4 bf16 silu): a target for
Nsight Compute on the GPU machine, to compare the two implementations' kernels side by side.

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

from ssmkernels.bench import cases, runner  # noqa: E402

(case,) = cases.select(None, ["conv1d-cf-fwdbwd"])
for label in ("ssmkernels:cuda", "causal_conv1d"):
    try:
        steps = runner.build_steps(case, label)  # (runs the first call)
    except runner.Unavailable as exc:
        print(f"{label} unavailable ({exc}): skipped")
        continue
    steps[0]()
    torch.cuda.synchronize()
    print(label, "done")
