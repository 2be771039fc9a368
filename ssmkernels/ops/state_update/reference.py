"""One decode step (or t steps) of the Mamba-1 / Mamba-2 recurrence: SPEC.md section 4.

Updates ``state`` in place. Arithmetic in float32 (float64 for float64); the state is stored back
in its own dtype; the output uses the unrounded new state and takes ``x``'s dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._core.dtypes import accumulation_dtype


def as_mamba2_form(state, x, dt, A, B, C, D, z, dt_bias):
    """Views of all inputs in the multi-token Mamba-2 form.

    state ``(B_cache, h, p, n)``, x/dt/z ``(b, t, h, p)``, A ``(h, p, n)``, B/C ``(b, t, g, n)``,
    D/dt_bias ``(h, p)``. Mamba-1 inputs gain a head axis of size 1 (``p = d``); single-step inputs
    gain ``t = 1``. Returns the views and whether the input was multi-token.
    """
    mamba1 = state.dim() == 3
    if mamba1:
        state, A = state.unsqueeze(1), A.unsqueeze(0)
        D = None if D is None else D.unsqueeze(0)
        dt_bias = None if dt_bias is None else dt_bias.unsqueeze(0)
    multi = x.dim() == (3 if mamba1 else 4)

    def normalise(v):
        if v is None:
            return None
        if mamba1:
            v = v.unsqueeze(-2)  # (.., d) -> (.., 1, d) and (.., n) -> (.., 1, n)
        return v if multi else v.unsqueeze(1)

    x, dt, z, B, C = (normalise(v) for v in (x, dt, z, B, C))
    return state, x, dt, A, B, C, D, z, dt_bias, multi


@torch.no_grad()
def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None, pad_slot_id=-1):
    """Reference of :func:`ssmkernels.selective_state_update`."""
    out_shape = x.shape
    state4, x, dt, A, B, C, D, z, dt_bias, _ = as_mamba2_form(state, x, dt, A, B, C, D, z, dt_bias)
    b, t, h, p = x.shape
    acc = accumulation_dtype(x.dtype)
    heads_per_group = h // B.shape[2]
    out = torch.zeros(b, t, h, p, dtype=x.dtype, device=x.device)
    for i in range(b):
        slot = i if state_batch_indices is None else int(state_batch_indices[i])
        if state_batch_indices is not None and slot == pad_slot_id:
            continue  # padding row: output zeros, state untouched
        s = state4[slot].to(acc)  # (h, p, n)
        for j in range(t):
            step = dt[i, j].to(acc)
            if dt_bias is not None:
                step = step + dt_bias.to(acc)
            if dt_softplus:
                step = F.softplus(step)
            Bj = B[i, j].to(acc).repeat_interleave(heads_per_group, dim=0)  # (h, n)
            Cj = C[i, j].to(acc).repeat_interleave(heads_per_group, dim=0)
            xj = x[i, j].to(acc)
            s = torch.exp(A.to(acc) * step[..., None]) * s + (step * xj)[..., None] * Bj[:, None, :]
            y = (s * Cj[:, None, :]).sum(dim=-1)
            if D is not None:
                y = y + D.to(acc) * xj
            if z is not None:
                y = y * F.silu(z[i, j].to(acc))
            out[i, j] = y.to(x.dtype)
        state4[slot] = s.to(state.dtype)
    return out.reshape(out_shape)
