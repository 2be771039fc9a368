"""Selective scan (Mamba-1) in plain PyTorch: the definition of SPEC.md section 2.

A step-by-step recurrence, written for clarity. Arithmetic in float32 (float64 for float64 inputs);
``out`` is rounded to the input dtype once; the last state is float32 (float64 for float64).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._core.dtypes import accumulation_dtype


def _expand_bc(M: torch.Tensor, b: int, d: int, l: int, acc) -> torch.Tensor:
    """B or C as ``(b, d, n, l)`` from ``(d, n)``, ``(b, n, l)`` or ``(b, g, n, l)``."""
    M = M.to(acc)
    if M.dim() == 2:
        return M[None, :, :, None].expand(b, d, M.shape[1], l)
    if M.dim() == 3:
        return M[:, None].expand(b, d, M.shape[1], l)
    g = M.shape[1]
    return M.repeat_interleave(d // g, dim=1)


def _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    b, d, l = u.shape
    acc = accumulation_dtype(u.dtype)
    dt = delta.to(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)[None, :, None]
    if delta_softplus:
        dt = F.softplus(dt)
    A = A.to(acc)
    Bx = _expand_bc(B, b, d, l, acc)
    Cx = _expand_bc(C, b, d, l, acc)
    uf = u.to(acc)
    n = A.shape[1]
    h = u.new_zeros(b, d, n, dtype=acc) if initial_state is None else initial_state.to(acc)
    ys = []
    for t in range(l):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * uf[:, :, t])[..., None] * Bx[..., t]
        ys.append((h * Cx[..., t]).sum(dim=-1))
    y = torch.stack(ys, dim=-1) if ys else uf.new_zeros(b, d, 0)
    if D is not None:
        y = y + D.to(acc)[None, :, None] * uf
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(u.dtype), h


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None, cu_seqlens=None):
    """Reference of :func:`ssmkernels.selective_scan` (same arguments, no ``backend``)."""
    if cu_seqlens is None:
        out, last = _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    else:
        bounds = cu_seqlens.tolist()
        outs, lasts = [], []

        def part(M, start, end):
            return M if M is None or M.dim() == 2 else M[..., start:end]

        for j, (start, end) in enumerate(zip(bounds, bounds[1:])):
            init = None if initial_state is None else initial_state[j:j + 1]
            o, h = _scan(u[..., start:end], delta[..., start:end], A, part(B, start, end),
                         part(C, start, end), D, part(z, start, end), delta_bias, delta_softplus, init)
            outs.append(o)
            lasts.append(h)
        out = torch.cat(outs, dim=-1)
        last = torch.cat(lasts, dim=0)
    return (out, last) if return_last_state else out
