"""CUDA kernel of selective_state_update: a thin call into ``ssmkernels._C.state_update``
(csrc/state_update/). Tensors arrive as the caller passed them; ``layout.mamba2_layout`` gives
their sizes and strides in the multi-token Mamba-2 indexing the kernel uses.

The decode step is host-bound, so a call is split in two: :func:`prepare` turns what stays the
same from one call to the next (dtypes, sizes, strides, flags) into the tuple the binding reads,
once per kind of call (``op.py`` caches it); :func:`launch` adds what changes (addresses, stream).
"""
from __future__ import annotations

import torch

from ..._core import ext, native
from ..._core.native import DTYPE_CODES
from .layout import mamba2_layout

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ABSENT_CODE = 0  # dtype code passed for a missing optional tensor (never read: its address is 0)
BINDING_VERSION = 2  # csrc/state_update/binding.cpp's kBindingVersion: the argument lists below


def unsupported(features: dict) -> str | None:
    if not ext.has_kernel("state_update"):
        return ext.load_error() or "the loaded ssmkernels._C has no state_update kernel (rebuild it)"
    built = getattr(ext.module(), "state_update_binding_version", 1)
    if built != BINDING_VERSION:
        return (f"the loaded ssmkernels._C has state_update binding version {built}, this package needs "
                f"{BINDING_VERSION}: rebuild it (python -m ssmkernels build)")
    if features.get("dtype") not in _KERNEL_DTYPES or features.get("state_dtype") not in _KERNEL_DTYPES:
        return (f"the cuda kernel takes float32/float16/bfloat16 inputs and state, got inputs "
                f"{features.get('dtype')} and state {features.get('state_dtype')}")
    limit = ext.module().state_update_max_dstate
    if features.get("d_state", 0) > limit:
        return f"the cuda kernel keeps the state in registers and takes d_state <= {limit}, got {features['d_state']}"
    return None


def _code(t) -> int:
    return _ABSENT_CODE if t is None else DTYPE_CODES[t.dtype]


def prepare(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, pad_slot_id, out) -> tuple:
    """``(params, device index)``: the binding's ``params`` tuple of dtype codes, sizes and strides
    (csrc/state_update/binding.cpp) and the device to take the stream of. It depends only on the
    tensors' shapes, strides, dtypes and device and on the flags, so it serves every call that
    agrees on those."""
    lay = mamba2_layout(state, x, dt, A, B, C, D, z, dt_bias, out)
    idx = state_batch_indices
    params = (
        DTYPE_CODES[state.dtype], DTYPE_CODES[x.dtype], DTYPE_CODES[dt.dtype], DTYPE_CODES[A.dtype],
        DTYPE_CODES[B.dtype], DTYPE_CODES[C.dtype], _code(D), _code(z), _code(dt_bias), DTYPE_CODES[out.dtype],
        lay.batch, lay.tokens, lay.heads, lay.headdim, lay.dstate, lay.heads // lay.groups, lay.slots,
        int(pad_slot_id), int(bool(dt_softplus)), int(idx is not None and idx.dtype == torch.int64),
        1 if idx is None else idx.stride(0),
        *lay.state, *lay.x, *lay.dt, *lay.A, *lay.B, *lay.C, *lay.D, *lay.z, *lay.dt_bias, *lay.out,
    )
    return params, x.get_device()


def launch(prepared: tuple, state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, out) -> None:
    """Launch on torch's current stream of the tensors' device, with ``prepared`` from :func:`prepare`."""
    params, device_index = prepared
    _kernel(params,
            (state.data_ptr(), x.data_ptr(), dt.data_ptr(), A.data_ptr(), B.data_ptr(), C.data_ptr(),
             0 if D is None else D.data_ptr(), 0 if z is None else z.data_ptr(),
             0 if dt_bias is None else dt_bias.data_ptr(),
             0 if state_batch_indices is None else state_batch_indices.data_ptr(), out.data_ptr()),
            _raw_stream(device_index))


def update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, pad_slot_id, out):
    """Apply the call's tokens to ``state`` in place and write ``out`` (shaped like ``x``)."""
    prepared = prepare(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, pad_slot_id, out)
    launch(prepared, state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, out)


def _kernel(params, addresses, stream):
    """First call: bind the extension's function in place of this one (``ext.module()`` and the
    attribute lookup cost ~0.2 us per call otherwise)."""
    global _kernel
    _kernel = ext.module().state_update
    _kernel(params, addresses, stream)


# (a module attribute, so tests and scripts/state_update_overhead.py can stub it)
_raw_stream = native.raw_stream
