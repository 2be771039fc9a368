"""CUDA kernel of selective_state_update: a thin call into ``ssmkernels._C.state_update``
(csrc/state_update/). Tensors arrive as the caller passed them; ``layout.mamba2_layout`` gives
their sizes and strides in the multi-token Mamba-2 indexing the kernel uses."""
from __future__ import annotations

import torch

from ..._core import ext
from ..._core.native import DTYPE_CODES
from .layout import mamba2_layout

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ABSENT_CODE = 0  # dtype code passed for a missing optional tensor (never read: its address is 0)


def unsupported(features: dict) -> str | None:
    if not ext.has_kernel("state_update"):
        return ext.load_error() or "the loaded ssmkernels._C has no state_update kernel (rebuild it)"
    if features.get("dtype") not in _KERNEL_DTYPES or features.get("state_dtype") not in _KERNEL_DTYPES:
        return (f"the cuda kernel takes float32/float16/bfloat16 inputs and state, got inputs "
                f"{features.get('dtype')} and state {features.get('state_dtype')}")
    limit = ext.module().state_update_max_dstate
    if features.get("d_state", 0) > limit:
        return f"the cuda kernel keeps the state in registers and takes d_state <= {limit}, got {features['d_state']}"
    return None


def _code(t) -> int:
    return _ABSENT_CODE if t is None else DTYPE_CODES[t.dtype]


def _address(t) -> int:
    return 0 if t is None else t.data_ptr()


def update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, pad_slot_id, out):
    """Apply the call's tokens to ``state`` in place and write ``out`` (shaped like ``x``)."""
    lay = mamba2_layout(state, x, dt, A, B, C, D, z, dt_bias, out)
    idx = state_batch_indices
    ext.module().state_update(
        (state.data_ptr(), x.data_ptr(), dt.data_ptr(), A.data_ptr(), B.data_ptr(), C.data_ptr(), _address(D),
         _address(z), _address(dt_bias), _address(idx), out.data_ptr()),
        (DTYPE_CODES[state.dtype], DTYPE_CODES[x.dtype], DTYPE_CODES[dt.dtype], DTYPE_CODES[A.dtype],
         DTYPE_CODES[B.dtype], DTYPE_CODES[C.dtype], _code(D), _code(z), _code(dt_bias), DTYPE_CODES[out.dtype]),
        (lay.batch, lay.tokens, lay.heads, lay.headdim, lay.dstate, lay.heads // lay.groups, lay.slots,
         pad_slot_id, int(bool(dt_softplus)), int(idx is not None and idx.dtype == torch.int64)),
        (*lay.state, *lay.x, *lay.dt, *lay.A, *lay.B, *lay.C, *lay.D, *lay.z, *lay.dt_bias, *lay.out),
        _current_stream(x.device.index),
    )


def _current_stream(device_index) -> int:
    # torch's current stream as a raw handle: what native.stream_of gives, without building a
    # Stream object (~2 us of the decode step's host time); inductor's generated code uses it too.
    return torch._C._cuda_getCurrentRawStream(device_index)
