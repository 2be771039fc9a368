"""CUDA kernels of causal_conv1d (csrc/causal_conv1d): fills the native params structs from tensors.

The native module is torch-free: this file passes addresses, sizes, 64-bit strides, dtype codes and
the current stream. Forward (both layouts, seq_idx, cu_seqlens, initial/final states), backward
(dx, dweight, dbias, d(initial states), gradients through the final states) and the decode update.
"""
from __future__ import annotations

import torch

from ..._core import ext
from ..._core.native import DTYPE_CODES, address, dtype_code, raw_stream, stream_of

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_WIDTHS = (2, 3, 4)
# backward() writes dweight / dbias whole, in the parameters' dtypes: op.py allocates them unfilled.
WRITES_PARAM_GRADS = True
_KERNELS = ("causal_conv1d_fwd_channel_first", "causal_conv1d_fwd_channel_last", "causal_conv1d_final_states",
            "causal_conv1d_bwd", "causal_conv1d_bwd_partial_rows", "causal_conv1d_update",
            "causal_conv1d_update_at")


def unsupported(features: dict) -> str | None:
    missing = [name for name in _KERNELS if not ext.has_kernel(name)]
    if missing:
        return f"the loaded CUDA extension lacks the causal_conv1d kernels ({', '.join(missing)})"
    dtype, weight_dtype = features.get("dtype"), features.get("weight_dtype")
    if dtype not in _FLOATS or (weight_dtype is not None and weight_dtype not in _FLOATS):
        return (f"the cuda kernels take float32/float16/bfloat16 x and weight, got x {dtype} and "
                f"weight {weight_dtype}")
    state_dtype = features.get("state_dtype")
    if state_dtype is not None and state_dtype not in DTYPE_CODES:
        return f"the cuda update kernel cannot hold a conv_state of dtype {state_dtype}"
    width = features.get("width")
    if width is not None and width not in _WIDTHS:
        return f"the cuda kernels support widths {_WIDTHS[0]}..{_WIDTHS[-1]}, got {width}"
    return None


def _code_or_zero(t: torch.Tensor | None) -> int:
    return 0 if t is None else dtype_code(t)


def _fill_forward(p, x, weight, bias, seq_idx, initial_states, cu_seqlens, silu) -> None:
    b, d, l = x.shape
    p.batch, p.dim, p.seqlen, p.width = b, d, l, weight.shape[1]
    p.dtype, p.weight_dtype, p.bias_dtype = dtype_code(x), dtype_code(weight), _code_or_zero(bias)
    p.silu = bool(silu)
    p.x, p.weight, p.bias = address(x), address(weight), address(bias)
    p.initial_states, p.seq_idx, p.cu_seqlens = address(initial_states), address(seq_idx), address(cu_seqlens)
    p.num_seqs = 0 if cu_seqlens is None else cu_seqlens.numel() - 1
    p.x_batch_stride, p.x_c_stride, p.x_l_stride = x.stride()
    p.weight_c_stride, p.weight_width_stride = weight.stride()
    p.bias_stride = 0 if bias is None else bias.stride(0)
    if initial_states is not None:
        p.init_batch_stride, p.init_c_stride, p.init_l_stride = initial_states.stride()
    if seq_idx is not None:
        p.seq_batch_stride, p.seq_l_stride = seq_idx.stride()
    p.stream = stream_of(x)


def forward(x, weight, bias, seq_idx, initial_states, cu_seqlens, silu, out, final_states):
    """Writes ``out (b, d, l)`` (x's layout) and, when given, ``final_states (count, d, w-1)``."""
    native = ext.module()
    p = native.CausalConv1dForwardParams()
    _fill_forward(p, x, weight, bias, seq_idx, initial_states, cu_seqlens, silu)
    p.out = address(out)
    p.out_batch_stride, p.out_c_stride, p.out_l_stride = out.stride()
    # Channel-last kernel when d is the contiguous axis (and for single steps, where it is the
    # better fit whatever the layout); both kernels accept any strides.
    if (x.stride(1) == 1 and x.stride(2) != 1) or x.shape[2] == 1:
        native.causal_conv1d_fwd_channel_last(p)
    else:
        native.causal_conv1d_fwd_channel_first(p)
    if final_states is not None and final_states.numel() > 0:
        p.final_states = address(final_states)
        p.final_batch_stride, p.final_c_stride, p.final_l_stride = final_states.stride()
        native.causal_conv1d_final_states(p)


def backward(x, weight, bias, seq_idx, initial_states, cu_seqlens, dout, dfinal_states, silu,
             dx, dweight, dbias, dinitial):
    """Writes dx, dinitial, and dweight / dbias whole in weight's / bias's dtype (WRITES_PARAM_GRADS).

    The kernel leaves one float32 partial sum per (block, channel); a last kernel adds them in a
    fixed order into dweight and dbias, so the gradients are bitwise reproducible (no atomics) and
    no fill, sum or cast kernels run around it.
    """
    native = ext.module()
    b, d, l = x.shape
    w = weight.shape[1]
    p = native.CausalConv1dBackwardParams()
    _fill_forward(p, x, weight, bias, seq_idx, initial_states, cu_seqlens, silu)
    p.dout, p.dx = address(dout), address(dx)
    p.dout_batch_stride, p.dout_c_stride, p.dout_l_stride = dout.stride()
    p.dx_batch_stride, p.dx_c_stride, p.dx_l_stride = dx.stride()
    if dfinal_states is not None and dfinal_states.numel() > 0:
        p.dfinal_states = address(dfinal_states)
        p.dfinal_batch_stride, p.dfinal_c_stride, p.dfinal_l_stride = dfinal_states.stride()
    if dinitial is not None and dinitial.numel() > 0:
        p.dinitial_states = address(dinitial)
        p.dinit_batch_stride, p.dinit_c_stride, p.dinit_l_stride = dinitial.stride()
    p.dweight = address(dweight)
    p.dweight_c_stride, p.dweight_width_stride = dweight.stride()
    if dbias is not None:
        p.dbias, p.dbias_stride = address(dbias), dbias.stride(0)
    # The kernel the params select decides how many blocks leave partial sums.
    blocks = native.causal_conv1d_bwd_partial_rows(p)
    dw_partial = torch.empty(blocks, d, w, device=x.device, dtype=torch.float32)
    db_partial = torch.empty(blocks, d, device=x.device, dtype=torch.float32)
    p.dweight_partial, p.dbias_partial = address(dw_partial), address(db_partial)
    native.causal_conv1d_bwd(p)


def prepare_update(x, conv_state, weight, bias, silu, cache_seqlens, conv_state_indices, out):
    """The native update params of a kind of call: sizes, strides, dtypes, flags (addresses left 0).
    They depend only on the tensors' shapes, strides and dtypes, so they serve every call that
    agrees on those (the decode loop's plan, op.py)."""
    xs = x.unsqueeze(-1) if x.dim() == 2 else x
    outs = out.unsqueeze(-1) if out.dim() == 2 else out
    p = ext.module().CausalConv1dUpdateParams()
    p.batch, p.dim, p.tokens = xs.shape
    p.slots, p.state_len, p.width = conv_state.shape[0], conv_state.shape[2], weight.shape[1]
    p.dtype, p.state_dtype = dtype_code(x), dtype_code(conv_state)
    p.weight_dtype, p.bias_dtype = dtype_code(weight), _code_or_zero(bias)
    p.silu = bool(silu)
    p.x_batch_stride, p.x_c_stride, p.x_l_stride = xs.stride()
    p.state_batch_stride, p.state_c_stride, p.state_l_stride = conv_state.stride()
    p.out_batch_stride, p.out_c_stride, p.out_l_stride = outs.stride()
    p.weight_c_stride, p.weight_width_stride = weight.stride()
    p.bias_stride = 0 if bias is None else bias.stride(0)
    return p


def launch_update(prepared, x, conv_state, weight, bias, cache_seqlens, conv_state_indices, out) -> None:
    """Launch the update with ``prepared`` (:func:`prepare_update`) on torch's current stream."""
    _update_at(prepared, x.data_ptr(), conv_state.data_ptr(), weight.data_ptr(), address(bias), out.data_ptr(),
               address(cache_seqlens), address(conv_state_indices), raw_stream(x.get_device()))


def _update_at(*args):
    """First call: bind the extension's function in place of this one (``ext.module()`` and the
    attribute lookup cost ~0.2 us per call otherwise)."""
    global _update_at
    _update_at = ext.module().causal_conv1d_update_at
    _update_at(*args)


def update(x, conv_state, weight, bias, silu, cache_seqlens, conv_state_indices, out):
    """Writes ``out`` (x's shape) and shifts the new tokens into ``conv_state`` in place. No host sync."""
    prepared = prepare_update(x, conv_state, weight, bias, silu, cache_seqlens, conv_state_indices, out)
    launch_update(prepared, x, conv_state, weight, bias, cache_seqlens, conv_state_indices, out)
