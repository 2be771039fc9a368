"""Host time against GPU time of causal_conv1d at the bench's channel-first shape (B4 D10240 L4096 W4 bf16
silu), ours and causal-conv1d's, forward and forward+backward: the host's enqueue time per call, the
GPU time per call with the host taken out (calls queued behind a sleep kernel), and per-call CUDA
events as the bench takes them. Where the host time nears the GPU time, per-call events turn
bimodal (the GPU waits for the host). GPU machine: `python scripts/conv_host_vs_gpu.py` with
causal_conv1d importable (scripts/gpu_suite.sh peers)."""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssmkernels.ops.causal_conv1d.op import causal_conv1d  # noqa: E402

try:
    from causal_conv1d import causal_conv1d_fn
except ImportError as error:
    causal_conv1d_fn = None
    print(f"causal_conv1d not importable ({error}): only ours runs")

b, d, l, w = 4, 10240, 4096, 4
x = torch.randn(b, d, l, device="cuda", dtype=torch.bfloat16, requires_grad=True)
weight = (torch.randn(d, w, device="cuda", dtype=torch.bfloat16) * 0.5).requires_grad_()
bias = (torch.randn(d, device="cuda", dtype=torch.bfloat16) * 0.5).requires_grad_()
g = torch.randn(b, d, l, device="cuda", dtype=torch.bfloat16)
impls = {"ssmkernels": lambda: causal_conv1d(x, weight, bias, activation="silu", backend="cuda")}
if causal_conv1d_fn is not None:
    impls["causal_conv1d"] = lambda: causal_conv1d_fn(x, weight, bias, activation="silu")
for name, fwd in impls.items():
    for kind, step in (("fwd", lambda: fwd()), ("fwd+bwd", lambda: torch.autograd.grad(fwd(), [x, weight, bias], g))):
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        for rep in range(3):
            n = 40
            torch.cuda._sleep(int(4e8))  # ~0.2 s: the host enqueues behind it
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t = time.perf_counter()
            start.record()
            for _ in range(n):
                step()
            end.record()
            host = (time.perf_counter() - t) / n * 1e6
            torch.cuda.synchronize()
            queued = start.elapsed_time(end) / n * 1e3
            per_call = []
            for _ in range(n):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record(); step(); e.record()
                per_call.append((s, e))
            torch.cuda.synchronize()
            times = sorted(s.elapsed_time(e) * 1e3 for s, e in per_call)
            print(f"{name:14} {kind:8} rep {rep}: host {host:6.0f} us/call  queued GPU {queued:6.1f} us/call  "
                  f"per-call events p20/p50/p80 {times[n // 5]:.0f}/{times[n // 2]:.0f}/{times[4 * n // 5]:.0f} us", flush=True)
