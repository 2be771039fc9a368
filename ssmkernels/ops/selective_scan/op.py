"""Public selective_scan (Mamba-1): validation -> dispatch -> custom op (SPEC.md section 2)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._core import dispatch
from ..._core.dtypes import accumulation_dtype
from ..._core import validation as v
from ..._core.custom_op import (absent, call_op, eager_autograd, empty_like, kernels, needs_grad, new_empty,
                                on_device_of, placeholder, qualified)
from . import reference

PRIMITIVE = "selective_scan"


# ----------------------------------------------------------------------------- custom ops
# The forward returns, besides out and the last state, an opaque float32 ``checkpoints`` tensor
# whose shape the backend defines (``checkpoint_shape``): the states it keeps at chunk boundaries
# so that the backward recomputes inside chunks instead of storing every step's state. And
# ``pregate``: with z, a backward to come (``keep_pregate``) and a backend that asks for it
# (``KEEPS_PREGATE``), the output before the gate, ``y + D u`` in u's dtype, from which its backward
# takes dz without recomputing y (as mamba_ssm keeps its ``out``); else an empty tensor.
def _keeps_pregate(impl, z: Optional[Tensor], keep_pregate: bool) -> bool:
    return keep_pregate and z is not None and getattr(impl, "KEEPS_PREGATE", False)


@torch.library.custom_op(qualified("selective_scan_fwd"), mutates_args=())
def _scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
              cu_seqlens: Optional[Tensor], delta_softplus: bool, keep_pregate: bool, backend: str
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = kernels(PRIMITIVE, backend)
    count = u.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    out = empty_like(u)
    last_state = new_empty(u, (count, u.shape[1], A.shape[1]), accumulation_dtype(u.dtype))
    checkpoints = new_empty(u, impl.checkpoint_shape(u.shape, A.shape[1], count), accumulation_dtype(u.dtype))
    keeps = _keeps_pregate(impl, z, keep_pregate)
    pregate = empty_like(u) if keeps else new_empty(u, (0,), u.dtype)
    extra = {"pregate": pregate} if keeps else {}
    with on_device_of(u):
        impl.forward(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus,
                     out, last_state, checkpoints, **extra)
    return out, last_state, checkpoints, pregate


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus, keep_pregate, backend):
    impl = kernels(PRIMITIVE, backend)
    count = u.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    shape = impl.checkpoint_shape(u.shape, A.shape[1], count)
    pregate = torch.empty_like(u) if _keeps_pregate(impl, z, keep_pregate) else u.new_empty(0)
    return (torch.empty_like(u), u.new_empty(count, u.shape[1], A.shape[1], dtype=accumulation_dtype(u.dtype)),
            u.new_empty(shape, dtype=accumulation_dtype(u.dtype)), pregate)


@torch.library.custom_op(qualified("selective_scan_bwd"), mutates_args=())
def _scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
              cu_seqlens: Optional[Tensor], delta_softplus: bool, checkpoints: Tensor, pregate: Tensor,
              dout: Tensor, dlast_state: Optional[Tensor], backend: str) -> list[Tensor]:
    impl = kernels(PRIMITIVE, backend)
    # dA, dD, ddelta_bias: zeros to add into, or unfilled where the backend writes them whole
    # (WRITES_PARAM_GRADS: two small kernels less each, a fill and an add).
    param_grad = empty_like if getattr(impl, "WRITES_PARAM_GRADS", False) else torch.zeros_like
    f32 = torch.float32
    grads = [empty_like(u), empty_like(delta),
             param_grad(A, dtype=f32), torch.zeros_like(B, dtype=f32), torch.zeros_like(C, dtype=f32),
             None if D is None else param_grad(D, dtype=f32),
             None if z is None else empty_like(z),
             None if delta_bias is None else param_grad(delta_bias, dtype=f32),
             None if initial_state is None else empty_like(initial_state)]
    extra = {"pregate": pregate} if pregate.numel() else {}
    with on_device_of(u):
        impl.backward(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus, checkpoints,
                      dout, dlast_state, *grads, **extra)
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    return [placeholder(u) if g is None else g.to(t.dtype) for g, t in zip(grads, inputs)]


@_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus, checkpoints,
      pregate, dout, dlast_state, backend):
    return [placeholder(u) if t is None else torch.empty_like(t)
            for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)]


def _setup_context(ctx, inputs, output):
    *tensors, delta_softplus, _keep_pregate, backend = inputs
    ctx.save_for_backward(*tensors, output[2], output[3])
    ctx.delta_softplus, ctx.backend = delta_softplus, backend
    # Outputs without a gradient get None, not zeros: checkpoints and pregate never have one, and
    # pregate's zeros would be a fill as large as u in every backward.
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlast_state, _dcheckpoints, _dpregate):
    *tensors, checkpoints, pregate = ctx.saved_tensors
    dout = torch.zeros_like(tensors[0]) if dout is None else dout.contiguous()  # (a loss on last_state only)
    grads = call_op(_scan_bwd, *tensors, ctx.delta_softplus, checkpoints, pregate, dout, dlast_state, ctx.backend)
    grads = [None if absent(g) else g for g in grads]
    return (*grads, None, None, None, None)


_scan_fwd.register_autograd(_backward, setup_context=_setup_context)
_scan_fwd_autograd = eager_autograd(_scan_fwd, _setup_context, _backward)


# ----------------------------------------------------------------------------- public API
def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    initial_state: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    backend: Optional[str] = None,
):
    """Mamba-1 selective scan (drop-in for ``mamba_ssm``'s ``selective_scan_fn``).

    ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t``, ``y_t = C_t . h_t + D u_t``, ``out = y silu(z)``,
    with ``dt = softplus(delta + delta_bias)`` (softplus only when delta_softplus).

    Args:
        u, delta: ``(b, d, l)`` input and step size.
        A: ``(d, n)`` real state matrix (diagonal per channel; negative for a stable scan).
        B, C: ``(b, n, l)``, grouped ``(b, g, n, l)`` (channel c uses group ``c // (d // g)``), or a
            fixed ``(d, n)``.
        D: ``(d,)`` skip connection; z: ``(b, d, l)`` gate; delta_bias: ``(d,)``.
        return_last_state: also return the final state ``(b, d, n)`` (float32, float64 for float64).
        initial_state: ``(b, d, n)`` state before position 0 (``(s, d, n)`` with cu_seqlens).
        cu_seqlens: ``(s+1,)`` int32 boundaries of packed sequences along l (``b == 1``); the state
            restarts at each sequence, and last states are per sequence.
        backend: None, ``"reference"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``out (b, d, l)`` in u's dtype, or ``(out, last_state)``.

    Memory kept for the backward: the inputs, float32 states every 2048 steps (``(d, n)`` per
    chunk and sequence) and, on the CUDA backend with z, the output before the gate (``(b, d, l)``
    in u's dtype, as mamba_ssm keeps its ``out``): linear in ``b d l``, never a state per step.
    """
    v.check_tensor("u", u)
    v.check_ndim("u", u, (3,))
    b, d, l = u.shape
    dev = u.device
    v.check_tensor("delta", delta, (b, d, l), device=dev)
    v.check_ndim("A", A, (2,))
    v.check_tensor("A", A, (d, None), device=dev)
    n = A.shape[1]
    if A.is_complex():
        raise TypeError("A must be real: complex A is not supported")
    for name, M in (("B", B), ("C", C)):
        v.check_ndim(name, M, (2, 3, 4))
        if M.dim() == 2:
            v.check_tensor(name, M, (d, n), device=dev)
        elif M.dim() == 3:
            v.check_tensor(name, M, (b, n, l), device=dev)
        else:
            v.check_tensor(name, M, (b, None, n, l), device=dev)
            if M.shape[1] == 0 or d % M.shape[1]:
                raise ValueError(f"{name} has {M.shape[1]} groups, which must divide d = {d}")
    v.check_tensor("D", D, (d,), device=dev, optional=True)
    v.check_tensor("z", z, (b, d, l), device=dev, optional=True)
    v.check_tensor("delta_bias", delta_bias, (d,), device=dev, optional=True)
    count = b if cu_seqlens is None else v.check_cu_seqlens(cu_seqlens, b, l, dev)
    v.check_tensor("initial_state", initial_state, (count, d, n), device=dev, optional=True)

    features = {"dtype": u.dtype, "d_state": n, "bc_layout": ("fixed", "shared", "grouped")[B.dim() - 2],
                "z": z is not None, "cu_seqlens": cu_seqlens is not None,
                "initial_state": initial_state is not None,
                "needs_grad": needs_grad(u, delta, A, B, C, D, z, delta_bias, initial_state)}
    chosen = dispatch.traced_select_backend(PRIMITIVE, backend, dev, features)
    if chosen == "reference":
        return reference.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                        return_last_state, initial_state, cu_seqlens)
    state_dtype = accumulation_dtype(u.dtype)
    out, last_state, _, _ = _scan_fwd_autograd(
        u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
        None if D is None else D.contiguous(), None if z is None else z.contiguous(),
        None if delta_bias is None else delta_bias.contiguous(),
        None if initial_state is None else initial_state.to(state_dtype).contiguous(),
        v.as_int32(cu_seqlens), bool(delta_softplus), features["needs_grad"], chosen)
    return (out, last_state) if return_last_state else out
