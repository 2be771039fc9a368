"""SSD (Mamba-2) in plain PyTorch: the definition of SPEC.md section 3.

``ssd_chunk_scan`` here is the plain per-step recurrence (the result must not depend on the chunk
size, so the reference has none). ``ssd_quadratic`` is a second, independent formulation (the
masked "attention" form of the SSD paper) that tests compare against. Arithmetic in float32
(float64 for float64 inputs); ``out`` rounded to the input dtype once; states float32/float64.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..._core.dtypes import accumulation_dtype


def process_dt(dt, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf)):
    """``dt' = clamp(softplus(dt + dt_bias) or dt + dt_bias, *dt_limit)`` in the accumulation dtype."""
    dt = dt.to(accumulation_dtype(dt.dtype))
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    low, high = dt_limit
    if low > 0.0 or high < math.inf:
        dt = dt.clamp(min=low, max=high)
    return dt


def _heads(M: torch.Tensor, h: int) -> torch.Tensor:
    """``(b, l, g, n) -> (b, l, h, n)``: head i reads group i // (h // g)."""
    return M.repeat_interleave(h // M.shape[2], dim=2)


def _recurrence(x, dt, A, B, C, D, z, initial_states, seq_idx):
    """Scan ``x (b, l, h, p)`` with processed ``dt (b, l, h)``; returns ``(out, final (b, h, p, n))``."""
    b, l, h, p = x.shape
    acc = dt.dtype
    xf, A = x.to(acc), A.to(acc)
    Bh, Ch = _heads(B.to(acc), h), _heads(C.to(acc), h)
    n = B.shape[-1]
    state = xf.new_zeros(b, h, p, n) if initial_states is None else initial_states.to(acc).clone()
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:
            same = (seq_idx[:, t] == seq_idx[:, t - 1]).to(acc)
            state = state * same[:, None, None, None]  # a new sequence starts from zeros
        decay = torch.exp(dt[:, t] * A)  # (b, h)
        update = (dt[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]
        state = decay[..., None, None] * state + update
        ys.append((state * Ch[:, t, :, None, :]).sum(dim=-1))
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(b, 0, h, p)
    if D is not None:
        y = y + (D.to(acc)[:, None] if D.dim() == 1 else D.to(acc)) * xf
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(x.dtype), state


def ssd_chunk_scan(x, dt, A, B, C, chunk_size=None, D=None, z=None, dt_bias=None, initial_states=None,
                   seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, math.inf),
                   return_final_states=False, return_varlen_states=False):
    """Reference of :func:`ssmkernels.ssd_chunk_scan` (same arguments; ``chunk_size`` is unused)."""
    dtp = process_dt(dt, dt_bias, dt_softplus, dt_limit)
    varlen_states = None
    if cu_seqlens is None:
        out, final = _recurrence(x, dtp, A, B, C, D, z, initial_states, seq_idx)
    else:
        bounds = cu_seqlens.tolist()
        outs, states = [], []
        for j, (s, e) in enumerate(zip(bounds, bounds[1:])):
            init = None if initial_states is None else initial_states[j:j + 1]
            o, st = _recurrence(x[:, s:e], dtp[:, s:e], A, B[:, s:e], C[:, s:e], D,
                                None if z is None else z[:, s:e], init, None)
            outs.append(o)
            states.append(st)
        out = torch.cat(outs, dim=1)
        varlen_states = torch.cat(states, dim=0)
        final = varlen_states[-1:]
    result = [out]
    if return_final_states:
        result.append(final)
    if return_varlen_states:
        if varlen_states is None:
            raise ValueError("return_varlen_states=True needs cu_seqlens")
        result.append(varlen_states)
    return result[0] if len(result) == 1 else tuple(result)


def ssd_quadratic(x, dt, A, B, C):
    """The masked quadratic form: ``y_t = sum_{s<=t} (C_t . B_s) exp(cum_t - cum_s) dt_s x_s``.

    ``dt`` is already processed (bias, softplus, limits); no D, z, states or sequence boundaries.
    Independent of the recurrence, so agreement between the two checks both.
    """
    b, l, h, p = x.shape
    acc = dt.dtype
    cum = torch.cumsum(dt * A.to(acc), dim=1)  # (b, l, h)
    seg = cum[:, :, None, :] - cum[:, None, :, :]  # (b, t, s, h)
    causal = torch.ones(l, l, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(seg.masked_fill(~causal[None, :, :, None], -math.inf))
    scores = torch.einsum("bthn,bshn->btsh", _heads(C.to(acc), h), _heads(B.to(acc), h))
    weights = scores * decay * dt[:, None, :, :]
    return torch.einsum("btsh,bshp->bthp", weights, x.to(acc))
