"""``python -m ssmkernels warmup``: run each primitive once (forward and, where differentiable,
backward) at a given batch and length, so Triton kernels are compiled (Triton keeps them in its
own on-disk cache) and the CUDA extension is loaded before real work starts.

Triton keeps the compiled kernels and, for the autotuned kernels (``ssmkernels/_core/autotune.py``),
the chosen configs on disk (``cache_results``, keyed by the kernel's source, the GPU and the tuning
key), so a later process with the same shapes neither compiles nor tunes again. The first and second
call times are reported so that a slow first call is visible, not hidden; ``python -m ssmkernels
robustness --only first-call`` measures cold and warm first calls in fresh processes.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from .. import BackendUnavailable
from ..ops.causal_conv1d.op import causal_conv1d, causal_conv1d_update
from ..ops.selective_scan.op import selective_scan
from ..ops.ssd.op import ssd_chunk_scan
from ..ops.state_update.op import selective_state_update

PRIMITIVES = ("causal_conv1d", "selective_scan", "ssd", "state_update")


def _calls(primitive: str, backend: str | None, dtype: torch.dtype, device: torch.device, b: int, l: int):
    """(label, closure) pairs: a typical model-sized call of ``primitive`` (d 2048, 32 heads of 64)."""
    f32 = torch.float32
    rnd = lambda *s, dt=dtype: torch.randn(*s, device=device, dtype=dt)  # noqa: E731
    if primitive == "causal_conv1d":
        d, w = 2048, 4
        x, weight, bias = rnd(b, d, l), rnd(d, w), rnd(d)
        state = rnd(b, d, w - 1)
        return [("causal_conv1d fwd+bwd", lambda: _backward(causal_conv1d(x.requires_grad_(), weight, bias,
                                                                          activation="silu", backend=backend))),
                ("causal_conv1d_update", lambda: causal_conv1d_update(x[:, :, 0].detach(), state, weight, bias, "silu",
                                                                      backend=backend))]
    if primitive == "selective_scan":
        d, n = 2048, 16
        u, delta, z = rnd(b, d, l), rnd(b, d, l) - 2, rnd(b, d, l)
        A, B, C, D = -torch.rand(d, n, device=device, dtype=f32) - 0.5, rnd(b, n, l), rnd(b, n, l), rnd(d, dt=f32)
        return [("selective_scan fwd+bwd", lambda: _backward(selective_scan(
            u.requires_grad_(), delta, A, B, C, D, z, None, True, backend=backend)))]
    if primitive == "ssd":
        h, p, n, g = 32, 64, 128, 1
        x, dt = rnd(b, l, h, p), rnd(b, l, h) - 2
        A, B, C = -torch.rand(h, device=device, dtype=f32) - 0.5, rnd(b, l, g, n), rnd(b, l, g, n)
        return [("ssd_chunk_scan fwd+bwd", lambda: _backward(ssd_chunk_scan(
            x.requires_grad_(), dt, A, B, C, 256, D=rnd(h, dt=f32), dt_softplus=True, backend=backend)))]
    h, p, n, g = 32, 64, 128, 1
    state = torch.randn(b, h, p, n, device=device, dtype=f32)
    x, dt = rnd(b, h, p), rnd(b, h)[..., None].expand(b, h, p)
    A = (-torch.rand(h, device=device, dtype=f32) - 0.5)[:, None, None].expand(h, p, n)
    B, C = rnd(b, g, n), rnd(b, g, n)
    return [("selective_state_update", lambda: selective_state_update(state, x, dt, A, B, C, dt_softplus=True,
                                                                      backend=backend))]


def _backward(out) -> None:
    out = out[0] if isinstance(out, tuple) else out
    out.float().sum().backward()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(primitives: list[str] | None, backend: str | None, dtypes: list[torch.dtype] | None, batch: int,
        seqlen: int, log: Callable[[str], None] = print) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = dtypes or [torch.bfloat16 if device.type == "cuda" else torch.float32]
    log(f"warmup on {device}, backend {backend or 'default (dispatch picks)'}, batch {batch}, length {seqlen} "
        f"(autotune results are not cached on disk yet: issue 10)")
    failures = 0
    for primitive in primitives or PRIMITIVES:
        for dtype in dtypes:
            for label, call in _calls(primitive, backend, dtype, device, batch, seqlen):
                try:
                    times = []
                    for _ in range(2):
                        started = time.perf_counter()
                        call()
                        _sync(device)
                        times.append(time.perf_counter() - started)
                    log(f"  {label:<24} {str(dtype).replace('torch.', ''):<9} first call {times[0] * 1e3:9.1f} ms, "
                        f"second {times[1] * 1e3:9.1f} ms")
                except BackendUnavailable as exc:
                    log(f"  {label:<24} skipped: {exc}")
                except Exception as exc:
                    failures += 1
                    log(f"  {label:<24} FAILED: {type(exc).__name__}: {exc}")
    return 1 if failures else 0
