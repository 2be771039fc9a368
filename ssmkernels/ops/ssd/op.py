"""Public ssd_chunk_scan (Mamba-2 SSD): validation -> dispatch -> custom op (SPEC.md section 3)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..._core import dispatch
from ..._core.dtypes import accumulation_dtype
from ..._core import validation as v
from ..._core.custom_op import (absent, call_op, eager_autograd, empty_like, kernels, needs_grad, new_empty,
                                on_device_of, placeholder, qualified)
from . import reference

PRIMITIVE = "ssd"


# ----------------------------------------------------------------------------- custom ops
# Outputs: out, final_states (b, h, p, n) of each row's last sequence, varlen_states (s, h, p, n)
# (placeholder without cu_seqlens), and an opaque float32 ``checkpoints`` tensor whose shape the
# backend defines (``checkpoint_shape``) for the backward to reuse (e.g. the chunk states).
@torch.library.custom_op(qualified("ssd_fwd"), mutates_args=())
def _ssd_fwd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             z: Optional[Tensor], dt_bias: Optional[Tensor], initial_states: Optional[Tensor],
             seq_idx: Optional[Tensor], cu_seqlens: Optional[Tensor], chunk_size: int,
             dt_softplus: bool, dt_min: float, dt_max: float, backend: str
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = kernels(PRIMITIVE, backend)
    b, l, h, p = x.shape
    n = B.shape[-1]
    sd = accumulation_dtype(x.dtype)
    out = empty_like(x)
    final_states = new_empty(x, (b, h, p, n), sd)
    varlen_states = placeholder(x) if cu_seqlens is None else new_empty(x, (cu_seqlens.numel() - 1, h, p, n), sd)
    checkpoints = new_empty(x, impl.checkpoint_shape(x.shape, n, chunk_size), sd)
    with on_device_of(x):
        impl.forward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, chunk_size,
                     dt_softplus, dt_min, dt_max, out, final_states, varlen_states, checkpoints)
    return out, final_states, varlen_states, checkpoints


@_ssd_fwd.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, chunk_size, dt_softplus,
      dt_min, dt_max, backend):
    b, l, h, p = x.shape
    n = B.shape[-1]
    sd = accumulation_dtype(x.dtype)
    varlen = placeholder(x) if cu_seqlens is None else x.new_empty(cu_seqlens.shape[0] - 1, h, p, n, dtype=sd)
    shape = kernels(PRIMITIVE, backend).checkpoint_shape(x.shape, n, chunk_size)
    return torch.empty_like(x), x.new_empty(b, h, p, n, dtype=sd), varlen, x.new_empty(shape, dtype=sd)


@torch.library.custom_op(qualified("ssd_bwd"), mutates_args=())
def _ssd_bwd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             z: Optional[Tensor], dt_bias: Optional[Tensor], initial_states: Optional[Tensor],
             seq_idx: Optional[Tensor], cu_seqlens: Optional[Tensor], chunk_size: int,
             dt_softplus: bool, dt_min: float, dt_max: float, out: Tensor, checkpoints: Tensor,
             dout: Tensor, dfinal_states: Optional[Tensor], dvarlen_states: Optional[Tensor],
             backend: str) -> list[Tensor]:
    f32 = torch.float32
    grads = [empty_like(x), empty_like(dt, dtype=f32), torch.zeros_like(A, dtype=f32),
             torch.zeros_like(B, dtype=f32), torch.zeros_like(C, dtype=f32),
             None if D is None else torch.zeros_like(D, dtype=f32),
             None if z is None else empty_like(z),
             None if dt_bias is None else torch.zeros_like(dt_bias, dtype=f32),
             None if initial_states is None else empty_like(initial_states)]
    with on_device_of(x):
        kernels(PRIMITIVE, backend).backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                                             chunk_size, dt_softplus, dt_min, dt_max, out, checkpoints, dout,
                                             dfinal_states, dvarlen_states, *grads)
    inputs = (x, dt, A, B, C, D, z, dt_bias, initial_states)
    return [placeholder(x) if g is None else g.to(t.dtype) for g, t in zip(grads, inputs)]


@_ssd_bwd.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, chunk_size, dt_softplus,
      dt_min, dt_max, out, checkpoints, dout, dfinal_states, dvarlen_states, backend):
    return [placeholder(x) if t is None else torch.empty_like(t)
            for t in (x, dt, A, B, C, D, z, dt_bias, initial_states)]


def _setup_context(ctx, inputs, output):
    *tensors, chunk_size, dt_softplus, dt_min, dt_max, backend = inputs
    ctx.save_for_backward(*tensors, output[0], output[3])
    ctx.options = (chunk_size, dt_softplus, dt_min, dt_max)
    ctx.backend = backend
    # Outputs without a gradient get None, not zeros (a fill as large as the chunk states for the
    # checkpoints in every backward, and one per unused state output).
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dfinal_states, dvarlen_states, _dcheckpoints):
    *tensors, out, checkpoints = ctx.saved_tensors
    if dvarlen_states is not None and dvarlen_states.numel() == 0:
        dvarlen_states = None
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()  # (a loss on the states only)
    grads = call_op(_ssd_bwd, *tensors, *ctx.options, out, checkpoints, dout, dfinal_states, dvarlen_states,
                    ctx.backend)
    grads = [None if absent(g) else g for g in grads]
    return (*grads, None, None, None, None, None, None, None)


_ssd_fwd.register_autograd(_backward, setup_context=_setup_context)
_ssd_fwd_autograd = eager_autograd(_ssd_fwd, _setup_context, _backward)


# ----------------------------------------------------------------------------- public API
def ssd_chunk_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    initial_states: Optional[Tensor] = None,
    seq_idx: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
    backend: Optional[str] = None,
):
    """Mamba-2 SSD scan, chunked (drop-in for ``mamba_ssm``'s ``mamba_chunk_scan_combined``).

    Per head: ``H_t = exp(dt'_t A) H_{t-1} + dt'_t x_t B_t^T``, ``y_t = H_t C_t + D x_t``, then
    ``y * silu(z)``; ``dt' = clamp(softplus(dt + dt_bias) or dt + dt_bias, *dt_limit)``.

    Args:
        x: ``(b, l, h, p)``; dt: ``(b, l, h)``; A: ``(h,)`` (negative).
        B, C: ``(b, l, g, n)``; head i uses group ``i // (h // g)``.
        chunk_size: power of two in [16, 256]; the result does not depend on it beyond rounding.
        D: ``(h,)`` or ``(h, p)``; z: ``(b, l, h, p)``; dt_bias: ``(h,)``.
        initial_states: ``(b, h, p, n)`` (``(s, h, p, n)`` with cu_seqlens).
        seq_idx: ``(b, l)`` int32, non-decreasing: the state restarts where it changes.
        cu_seqlens: ``(s+1,)`` int32 boundaries of packed sequences of any length (``b == 1``).
        dt_softplus, dt_limit: see above.
        return_final_states: also return the final state ``(b, h, p, n)`` of each row's last sequence.
        return_varlen_states: also return each sequence's final state ``(s, h, p, n)`` (needs cu_seqlens).
        backend: None, ``"reference"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``out (b, l, h, p)``, followed by final_states and/or varlen_states when asked.
    """
    v.check_tensor("x", x)
    v.check_ndim("x", x, (4,))
    b, l, h, p = x.shape
    dev = x.device
    v.check_tensor("dt", dt, (b, l, h), device=dev)
    v.check_tensor("A", A, (h,), device=dev)
    v.check_ndim("B", B, (4,))
    v.check_tensor("B", B, (b, l, None, None), device=dev)
    g, n = B.shape[2], B.shape[3]
    if g == 0 or h % g:
        raise ValueError(f"B has {g} groups, which must divide the {h} heads")
    v.check_tensor("C", C, (b, l, g, n), device=dev)
    v.check_chunk_size(chunk_size)
    if D is not None:
        v.check_ndim("D", D, (1, 2))
        v.check_tensor("D", D, (h,) if D.dim() == 1 else (h, p), device=dev)
    v.check_tensor("z", z, (b, l, h, p), device=dev, optional=True)
    v.check_tensor("dt_bias", dt_bias, (h,), device=dev, optional=True)
    dt_min, dt_max = v.check_dt_limit(dt_limit)
    if seq_idx is not None and cu_seqlens is not None:
        raise ValueError("pass either seq_idx or cu_seqlens, not both")
    if seq_idx is not None:
        v.check_seq_idx(seq_idx, b, l, dev)
    count = b if cu_seqlens is None else v.check_cu_seqlens(cu_seqlens, b, l, dev)
    if return_varlen_states and cu_seqlens is None:
        raise ValueError("return_varlen_states=True needs cu_seqlens")
    v.check_tensor("initial_states", initial_states, (count, h, p, n), device=dev, optional=True)

    features = {"dtype": x.dtype, "headdim": p, "d_state": n, "ngroups": g, "chunk_size": chunk_size,
                "seq_idx": seq_idx is not None, "cu_seqlens": cu_seqlens is not None,
                "initial_states": initial_states is not None, "z": z is not None,
                "D_per_channel": D is not None and D.dim() == 2,
                "needs_grad": needs_grad(x, dt, A, B, C, D, z, dt_bias, initial_states)}
    chosen = dispatch.traced_select_backend(PRIMITIVE, backend, dev, features)
    if chosen == "reference":
        return reference.ssd_chunk_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx,
                                        cu_seqlens, dt_softplus, (dt_min, dt_max), return_final_states,
                                        return_varlen_states)
    out, final_states, varlen_states, _ = _ssd_fwd_autograd(
        x.contiguous(), dt.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
        None if D is None else D.contiguous(), None if z is None else z.contiguous(),
        None if dt_bias is None else dt_bias.contiguous(),
        None if initial_states is None else initial_states.to(accumulation_dtype(x.dtype)).contiguous(),
        v.as_int32(seq_idx), v.as_int32(cu_seqlens), chunk_size, bool(dt_softplus), dt_min, dt_max, chosen)
    result = [out]
    if return_final_states:
        result.append(final_states)
    if return_varlen_states:
        result.append(varlen_states)
    return result[0] if len(result) == 1 else tuple(result)
