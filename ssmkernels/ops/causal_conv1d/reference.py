"""causal_conv1d in plain PyTorch: the definition the kernels are tested against (SPEC.md section 1).

Written for clarity, not speed. Works on any device and float dtype; arithmetic runs in float32
(float64 for float64 inputs) and the output is rounded to the input dtype once, as the kernels do.
Autograd comes from PyTorch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._core.dtypes import accumulation_dtype


def _apply_activation(v: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(v) if activation in ("silu", "swish") else v


def _conv_one_row_group(x, weight, bias, seq_idx, initial_states, activation):
    """Causal conv of ``x (b, d, l)``; returns ``(out, final_states (b, d, w-1))``."""
    b, d, l = x.shape
    w = weight.shape[1]
    acc = accumulation_dtype(x.dtype)
    xf = x.to(acc)
    if initial_states is None:
        init = xf.new_zeros(b, d, w - 1)
    else:
        init = initial_states.to(acc)
    padded = torch.cat([init, xf], dim=2)  # position t of x sits at t + w - 1
    out = xf.new_zeros(b, d, l)
    if seq_idx is not None:
        sid = seq_idx.long()
        # The initial-state slots belong to the row's first sequence.
        padded_sid = torch.cat([sid[:, :1].expand(b, w - 1), sid], dim=1)
    for k in range(w):
        window = padded[:, :, k:k + l]  # input at t - (w-1) + k
        if seq_idx is not None:
            window = window * (padded_sid[:, k:k + l] == sid).unsqueeze(1).to(acc)
        out = out + weight[:, k].to(acc)[None, :, None] * window
    if bias is not None:
        out = out + bias.to(acc)[None, :, None]
    out = _apply_activation(out, activation).to(x.dtype)

    # Final states: the last w-1 inputs of the row's last sequence, zero-padded where that
    # sequence is shorter (unless it is also the first, which continues the initial states).
    positions = torch.arange(l - (w - 1), l, device=x.device)
    tail = padded[:, :, l:l + w - 1]
    if seq_idx is not None and l > 0:
        last_start = (sid != sid[:, -1:]).sum(dim=1)  # sid is non-decreasing
        keep = (positions[None, :] >= last_start[:, None]) | (last_start[:, None] == 0)
        tail = tail * keep.unsqueeze(1).to(acc)
    return out, tail.to(x.dtype)


def causal_conv1d(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                  final_states_out=None, activation=None, cu_seqlens=None):
    """Reference of :func:`ssmkernels.causal_conv1d` (same arguments, no ``backend``)."""
    if cu_seqlens is None:
        out, final = _conv_one_row_group(x, weight, bias, seq_idx, initial_states, activation)
    else:
        bounds = cu_seqlens.tolist()
        outs, finals = [], []
        for j, (start, end) in enumerate(zip(bounds, bounds[1:])):
            init = None if initial_states is None else initial_states[j:j + 1]
            o, f = _conv_one_row_group(x[:, :, start:end], weight, bias, None, init, activation)
            outs.append(o)
            finals.append(f)
        out = torch.cat(outs, dim=2)
        final = torch.cat(finals, dim=0)
    if final_states_out is not None:
        with torch.no_grad():
            final_states_out.copy_(final)
    return (out, final) if return_final_states else out


@torch.no_grad()
def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    """Reference of :func:`ssmkernels.causal_conv1d_update`: updates ``conv_state`` in place."""
    single = x.dim() == 2
    xs = x.unsqueeze(-1) if single else x  # (b, d, t)
    b, d, t = xs.shape
    s = conv_state.shape[2]
    w = weight.shape[1]
    acc = accumulation_dtype(x.dtype)
    out = torch.zeros(b, d, t, dtype=x.dtype, device=x.device)
    for i in range(b):
        slot = i if conv_state_indices is None else int(conv_state_indices[i])
        if slot < 0:
            continue  # padding slot: zeros out, state untouched
        state = conv_state[slot]  # (d, s)
        if cache_seqlens is None:
            history = state
        else:
            c = int(cache_seqlens[i])
            history = state[:, [(c - s + m) % s for m in range(s)]]  # oldest first
        full = torch.cat([history.to(acc), xs[i].to(acc)], dim=1)  # (d, s + t)
        for j in range(t):
            window = full[:, s + j - (w - 1): s + j + 1]  # (d, w)
            v = (window * weight.to(acc)).sum(dim=1)
            if bias is not None:
                v = v + bias.to(acc)
            out[i, :, j] = _apply_activation(v, activation).to(x.dtype)
        if cache_seqlens is None:
            state.copy_(full[:, -s:].to(conv_state.dtype))
        else:
            c = int(cache_seqlens[i])
            for j in range(t):
                state[:, (c + j) % s] = xs[i, :, j].to(conv_state.dtype)
    return out.squeeze(-1) if single else out
