"""Public selective_state_update: validation -> dispatch -> custom op (SPEC.md section 4).

Kernels always see the multi-token Mamba-2 form (``reference.as_mamba2_form``): Mamba-1 inputs get
a head axis of size 1 and single steps get ``t = 1``, as views, so broadcast (stride-0) inputs stay
broadcast and nothing is copied on the decode path.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._core import dispatch
from ..._core import validation as v
from ..._core.custom_op import empty_like, kernels, qualified
from . import reference

PRIMITIVE = "state_update"


@torch.library.custom_op(qualified("selective_state_update"), mutates_args=("state",))
def _state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                  D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool,
                  state_batch_indices: Optional[Tensor], pad_slot_id: int, backend: str) -> Tensor:
    out = empty_like(x)
    kernels(PRIMITIVE, backend).update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                                       state_batch_indices, pad_slot_id, out)
    return out


@_state_update.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, pad_slot_id, backend):
    return torch.empty_like(x)


def _check_shapes(state, x, dt, A, B, C, D, z, dt_bias):
    """Check every argument against the form implied by ``state``'s rank; returns (batch, tokens)."""
    v.check_tensor("state", state)
    v.check_ndim("state", state, (3, 4))
    dev = x.device
    mamba1 = state.dim() == 3
    if mamba1:
        d, n = state.shape[1:]
        v.check_ndim("x", x, (2, 3))
        b = x.shape[0]
        tokens = () if x.dim() == 2 else (x.shape[1],)
        channel, groups = (d,), (n,)
        v.check_tensor("A", A, (d, n), device=dev)
        per_channel = (d,)
    else:
        h, p, n = state.shape[1:]
        v.check_ndim("x", x, (3, 4))
        b = x.shape[0]
        tokens = () if x.dim() == 3 else (x.shape[1],)
        channel = (h, p)
        v.check_ndim("B", B, (3 + len(tokens),))
        g = B.shape[-2]
        if g == 0 or h % g:
            raise ValueError(f"B has {g} groups, which must divide the {h} heads")
        groups = (g, n)
        v.check_tensor("A", A, (h, p, n), device=dev)
        per_channel = (h, p)
    v.check_tensor("x", x, (b, *tokens, *channel), device=dev)
    v.check_tensor("dt", dt, (b, *tokens, *channel), device=dev)
    v.check_tensor("B", B, (b, *tokens, *groups), device=dev)
    v.check_tensor("C", C, (b, *tokens, *groups), device=dev)
    v.check_tensor("z", z, (b, *tokens, *channel), device=dev, optional=True)
    v.check_tensor("D", D, per_channel, device=dev, optional=True)
    v.check_tensor("dt_bias", dt_bias, per_channel, device=dev, optional=True)
    v.check_tensor("state", state, None, device=dev)
    return b, tokens[0] if tokens else 1


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    dt_softplus: bool = False,
    state_batch_indices: Optional[Tensor] = None,
    pad_slot_id: int = -1,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """One decode step (or t steps) of the SSM recurrence, in place on ``state`` (drop-in for
    ``mamba_ssm``'s ``selective_state_update``).

    Mamba-2 form: state ``(B_cache, h, p, n)``, x/dt/z ``(b, h, p)``, A ``(h, p, n)``,
    B/C ``(b, g, n)``, D/dt_bias ``(h, p)``; broadcast (stride-0) views such as
    ``A[:, None, None].expand(h, p, n)`` are the expected way to pass per-head values.
    Mamba-1 form: the same without the head axis: state ``(B_cache, d, n)``, x ``(b, d)``,
    B/C ``(b, n)``, A ``(d, n)``, D/dt_bias ``(d,)``.
    Multi-token form: a token axis after the batch axis (x ``(b, t, h, p)``, B ``(b, t, g, n)``;
    Mamba-1 x ``(b, t, d)``) applies t steps in order.

    Args:
        state: float32, bfloat16 or float16 (math is float32 either way); updated in place.
        dt_softplus: apply softplus to ``dt + dt_bias``.
        state_batch_indices: ``(b,)`` int32: row i reads and writes ``state[state_batch_indices[i]]``;
            rows equal to ``pad_slot_id`` are skipped (output zeros, state untouched).
        backend: None, ``"reference"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``out`` shaped like x, in x's dtype.
    """
    v.check_tensor("x", x)
    b, tokens = _check_shapes(state, x, dt, A, B, C, D, z, dt_bias)
    if state_batch_indices is None:
        if state.shape[0] < b:
            raise ValueError(f"state has {state.shape[0]} slots for batch {b}; pass state_batch_indices "
                             f"or a state with at least {b} rows")
    else:
        v.check_tensor("state_batch_indices", state_batch_indices, (b,), v.INDEX_DTYPES, x.device)
        v.check_indices("state_batch_indices", state_batch_indices, b, state.shape[0], x.device,
                        pad_value=pad_slot_id)
    features = {"dtype": x.dtype, "state_dtype": state.dtype, "form": "mamba1" if state.dim() == 3 else "mamba2",
                "tokens": tokens, "d_state": state.shape[-1], "indices": state_batch_indices is not None}
    chosen = dispatch.select_backend(PRIMITIVE, backend, x.device, features)
    if chosen == "reference":
        return reference.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                                                state_batch_indices, pad_slot_id)
    views = reference.as_mamba2_form(state, x, dt, A, B, C, D, z, dt_bias)[:-1]
    out = _state_update(*views[:8], views[8], bool(dt_softplus), v.as_int32(state_batch_indices),
                        int(pad_slot_id), chosen)
    return out.reshape(x.shape)
