"""Backend selection: which of reference / triton / cuda serves a call.

Each primitive's ``triton.py`` and ``cuda.py`` expose ``unsupported(features) -> str | None``: a
reason the backend cannot serve a call with these features (``None`` = it can). ``features`` is a
plain dict the op builds (dtype, layout, optional inputs ...). A backend the caller asked for that
cannot serve the call raises :class:`BackendUnavailable` with that reason; there is no silent
fallback. ``backend=None`` takes ``SSMKERNELS_BACKEND`` if set, else the first backend of
:func:`preferred_order` (measured, per primitive and case) that can serve the call.
"""
from __future__ import annotations

import functools
import importlib
import sys
from typing import Any

import torch

from . import config

# Preference when the caller names no backend: Triton first where nothing was measured.
DEFAULT_ORDER = ("triton", "cuda", "reference")
CUDA_FIRST = ("cuda", "triton", "reference")


def preferred_order(primitive: str, features: dict[str, Any]) -> tuple[str, ...]:
    """Fastest backend first, per primitive and case, from `python -m ssmkernels bench` on an H100
    (2026-11-23) and an H200 (2026-12-02, two sessions; README "Status and measured numbers"). Both kernel backends
    passed the GPU suite there for the primitives that have both."""
    if primitive == "causal_conv1d":
        # H200: channel-first fwd 0.213 (cuda) vs 0.479 ms, channel-last fwd 0.232 vs 0.363 ms,
        # fwd+bwd 1.05-1.08 vs 2.74-3.49 ms; the update's GPU time 40 (cuda, before its
        # register-window store) vs 35 us (triton)
        return CUDA_FIRST
    if primitive == "selective_scan":
        return CUDA_FIRST  # H200: fwd 1.80 (cuda) vs 6.27 ms, fwd+bwd 9.29 vs 25.8 ms
    if primitive == "state_update":
        # H200: batch 1 wall clock 10.3-11.4 (cuda) vs 36-41 us; batch 256 0.640 vs 0.565 ms (triton,
        # fp32 state) and 0.459 vs 0.320 ms (bf16 state; cuda = the head kernel, fifth session)
        return CUDA_FIRST if features.get("small_batch") else DEFAULT_ORDER
    # ssd: the chunked Triton kernels first; the CUDA backend (the recurrence on the selective-scan
    # kernels, ops/ssd/cuda.py) is exact but not tuned, so it comes second.
    return DEFAULT_ORDER


class BackendUnavailable(RuntimeError):
    """The requested backend cannot serve this call; the message says why."""


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def triton_device_reason(device: torch.device) -> str | None:
    reason = triton_import_error()
    if reason:
        return reason
    if device.type == "cuda":
        return None
    if device.type == "cpu" and config.triton_interpret():
        return None
    return (f"Triton kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1); "
            f"the inputs are on {device}")


def cuda_device_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"the CUDA backend needs CUDA tensors; the inputs are on {device}"
    from . import ext

    return ext.load_error()


def _backend_module(primitive: str, backend: str):
    return importlib.import_module(f"ssmkernels.ops.{primitive}.{backend}")


def unavailable_reason(primitive: str, backend: str, device: torch.device,
                       features: dict[str, Any]) -> str | None:
    """Why ``backend`` cannot serve this call of ``primitive``, or ``None`` when it can."""
    if backend == "reference":
        return None
    if backend == "triton":
        reason = triton_device_reason(device)
    elif backend == "cuda":
        reason = cuda_device_reason(device)
    else:
        raise ValueError(f"backend must be one of {config.BACKENDS} or None, got {backend!r}")
    if reason:
        return reason
    return _backend_module(primitive, backend).unsupported(features)


def select_backend(primitive: str, requested: str | None, device: torch.device,
                   features: dict[str, Any]) -> str:
    """Resolve ``backend=`` (or ``SSMKERNELS_BACKEND``) to a backend that can serve the call."""
    if requested is not None and requested not in config.BACKENDS:
        raise ValueError(f"backend must be one of {config.BACKENDS} or None, got {requested!r}")
    chosen = requested or config.default_backend()
    if chosen is not None:
        reason = unavailable_reason(primitive, chosen, device, features)
        if reason:
            source = "backend=" if requested else "SSMKERNELS_BACKEND="
            raise BackendUnavailable(f"{primitive}: {source}{chosen!r} cannot serve this call: {reason}")
        return chosen
    if device.type != "cuda":
        return "reference"  # Triton on CPU (interpreter) is for testing only: ask for it by name
    for candidate in preferred_order(primitive, features):
        if unavailable_reason(primitive, candidate, device, features) is None:
            return candidate
    return "reference"


def availability(primitive: str, device: torch.device, features: dict[str, Any]) -> dict[str, str | None]:
    """backend -> reason it is unavailable (None when available), for ``info`` and ``check``."""
    return {b: unavailable_reason(primitive, b, device, features) for b in config.BACKENDS}


def assume_constant_result(fn):
    """``torch._dynamo.assume_constant_result`` without importing ``torch._dynamo`` at import time
    (1.3 s of the 1.7 s that ``import ssmkernels`` took on the CPU development machine): that
    decorator only sets this attribute, which Dynamo reads when it traces a call (torch 2.4 to 2.13).
    When Dynamo is already imported, its own decorator. The torch.compile tests would fail if the
    attribute stopped working (Dynamo would trace into the function and break the graph)."""
    if "torch._dynamo" in sys.modules:
        return torch._dynamo.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@assume_constant_result
def traced_select_backend(primitive: str, requested: str | None, device: torch.device,
                          features: dict[str, Any]) -> str:
    """:func:`select_backend` for the ops' public functions: under ``torch.compile`` it runs once at
    trace time as a constant (it imports modules and reads the environment, which Dynamo cannot
    trace; the choice depends only on these constant arguments)."""
    return select_backend(primitive, requested, device, features)
