"""Sizes and strides of a selective_state_update call in the multi-token Mamba-2 form, read from the
caller's tensors without making views (the decode step is host-bound: every view costs ~1-2 us).

The kernels index every tensor as if it had the Mamba-2 multi-token shape: state
``(B_cache, h, p, n)``, x/dt/z/out ``(b, t, h, p)``, A ``(h, p, n)``, B/C ``(b, t, g, n)``,
D/dt_bias ``(h, p)``. A missing axis (the token axis of a single step, the head axis of Mamba-1)
gets size 1 and stride 0; a missing optional tensor gets all-zero strides.
"""
from __future__ import annotations

from typing import NamedTuple


class Layout(NamedTuple):
    batch: int
    tokens: int
    heads: int
    headdim: int
    dstate: int
    groups: int
    slots: int  # B_cache
    state: tuple  # (slot, h, p, n)
    x: tuple  # (b, t, h, p)
    dt: tuple
    z: tuple
    out: tuple
    A: tuple  # (h, p, n)
    B: tuple  # (b, t, g, n)
    C: tuple
    D: tuple  # (h, p)
    dt_bias: tuple


_NONE4 = (0, 0, 0, 0)
_NONE2 = (0, 0)


def mamba2_layout(state, x, dt, A, B, C, D, z, dt_bias, out) -> Layout:
    mamba1 = state.dim() == 3
    multi = x.dim() == (3 if mamba1 else 4)

    def per_token(t):  # (b, [t], [h|g], p|n) -> strides of (b, t, h|g, p|n)
        if t is None:
            return _NONE4
        s = t.stride()
        if not multi:
            s = (s[0], 0, *s[1:])
        if mamba1:
            s = (s[0], s[1], 0, s[2])
        return s

    if mamba1:
        slots, p, n = state.shape
        h = g = 1
        s0, s1, s2 = state.stride()
        state_strides = (s0, 0, s1, s2)
        A_strides = (0, *A.stride())
        D_strides = _NONE2 if D is None else (0, D.stride(0))
        dt_bias_strides = _NONE2 if dt_bias is None else (0, dt_bias.stride(0))
    else:
        slots, h, p, n = state.shape
        g = B.shape[-2]
        state_strides = state.stride()
        A_strides = A.stride()
        D_strides = _NONE2 if D is None else D.stride()
        dt_bias_strides = _NONE2 if dt_bias is None else dt_bias.stride()
    return Layout(x.shape[0], x.shape[1] if multi else 1, h, p, n, g, slots,
                  state_strides, per_token(x), per_token(dt), per_token(z), per_token(out),
                  A_strides, per_token(B), per_token(C), D_strides, dt_bias_strides)
