"""Triton kernels of selective_scan (Mamba-1, SPEC.md section 2): forward and backward.

Notation as in SPEC.md: ``u, delta, z (b, d, l)``, ``A (d, n)``, ``B, C`` fixed ``(d, n)``, shared
``(b, n, l)`` or grouped ``(b, g, n, l)``; ``dt = softplus(delta + delta_bias)``,
``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t``, ``y_t = C_t . h_t + D u_t``, ``out = y silu(z)``.

Work split. One program owns one sequence (a batch row, or one ``cu_seqlens`` sequence) and a
block of ``BLOCK_D`` channels, and walks the sequence in chunks of ``CHUNK`` steps. Inside a chunk
the recurrence is a first-order linear one, ``h_t = a_t h_{t-1} + b_t`` per (channel, state), so
it runs as one ``tl.associative_scan`` over a ``(BLOCK_D, n, CHUNK)`` tile of affine maps; the
state carried between chunks stays in registers.

Checkpoints. The forward stores the state entering every chunk (float32, ``(slots, d, n)``), i.e.
``n / CHUNK`` floats per input element: memory linear in ``b * d * l``, never ``b * d * l * n``.
The backward walks the chunks in reverse, recomputes the chunk's states from its checkpoint, and
runs the adjoint recurrence ``g_t = C_t dy_t + a_{t+1} g_{t+1}`` as a reverse associative scan.
Gradient through the last state enters as ``g`` at the sequence end; the gradient of the initial
state is ``a_0 g_0``.

Reductions. Gradients that sum over channels (B, C input-dependent) or over batch and time (A, D,
delta_bias, fixed B and C) are reduced in two stages: each program writes its partial sums, then
one fixed-order ``torch.sum`` adds them into the float32 buffers of the op layer (deterministic).
For input-dependent B/C the partials are one ``(n, l)`` slice per channel block; outside
deterministic mode they are added with float atomics instead, which avoids a
``(d / BLOCK_D) x b x n x l`` scratch buffer.

Channel blocks never straddle a group of B or C: the channels are cut into segments of
``gcd(channels per B group, channels per C group)`` and blocks tile each segment.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..._core import autotune, config

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

# Steps per chunk: the scan tile length and the checkpoint interval (part of checkpoint_shape, so
# a module constant, not a tuning knob that could differ between forward and backward).
CHUNK = 32
# Largest BLOCK_D * BLOCK_N * CHUNK tile a program holds (forward; backward holds several of them).
# The pinned configuration (interpreter, deterministic mode) takes the largest BLOCK_D within the
# first budget with 4 warps; on a GPU the autotuner picks among the configs below, pruned to the
# second budget (larger tiles spill) and to BLOCK_D <= the channel segment.
_FWD_TILE, _FWD_TILE_MAX = 4096, 8192
_BWD_TILE, _BWD_TILE_MAX = 2048, 4096
_NUM_WARPS = 4
# (BLOCK_D, num_warps): few wide programs vs many narrow ones (the grid is b x d / BLOCK_D, and
# Mamba sizes give thousands of programs either way); 8 warps for the largest tiles.
_FWD_CONFIGS = [(8, 4), (4, 4), (16, 8), (8, 8), (2, 4), (1, 4)]
_BWD_CONFIGS = [(4, 4), (2, 4), (8, 8), (4, 8), (1, 4)]
_TUNING_KEY = ["dim", "nstate", "segment_len", "B_FIXED", "C_FIXED", "HAS_Z", "VARLEN"]


def _static_chunks(seqlen: int) -> int:
    """Loop bound as a constexpr under the interpreter, 0 (a run-time bound) when compiled.

    Triton's interpreter (with numpy >= 2) cannot loop to a bound that is a run-time value; there
    the chunk loops run to the static bound ceil(l / CHUNK) and skip chunks past the sequence end.
    Compiled kernels loop exactly over their sequence's chunks and are not specialised on l.
    """
    return max(1, triton.cdiv(seqlen, CHUNK)) if config.triton_interpret() else 0

LOG2E = tl.constexpr(1.4426950408889634)


def unsupported(features: dict) -> str | None:
    dtype = features.get("dtype")
    if dtype not in _FLOATS:
        return f"the triton kernels take float32/float16/bfloat16 inputs, got {dtype}"
    return None


def checkpoint_shape(u_shape, n: int, num_sequences: int) -> tuple:
    """Shape of the float32 checkpoint buffer: one ``(d, n)`` state per chunk of each sequence.

    Batch row ``r`` uses slots ``r * ceil(l / CHUNK) + k``; with cu_seqlens (``b == 1``) sequence
    ``j`` uses slots ``cu[j] // CHUNK + j + k``, which never overlap and stay below
    ``ceil(l / CHUNK) + num_sequences``. Depends on shapes only (the fake kernel calls it).
    """
    b, d, l = u_shape
    return (b * triton.cdiv(l, CHUNK) + num_sequences, d, n)


# ----------------------------------------------------------------------------- shared helpers
@triton.jit
def _affine_combine(a_first, b_first, a_second, b_second):
    """Composition of ``x -> a_first x + b_first`` followed by ``x -> a_second x + b_second``."""
    return a_first * a_second, a_second * b_first + b_second


@triton.jit
def _softplus(x):
    """``log(1 + exp(x))`` to a few ulps: ``max(x, 0) + log1p(exp(-|x|))``, with log1p written as
    Goldberg's ``log(w) * e / (w - 1)`` (``w = 1 + e``): the plain ``log(1 + exp(x))`` loses
    ~20 ulps of dt for negative x, which shows in the A gradient (a sum over every step)."""
    e = tl.exp(-tl.abs(x))
    w = 1.0 + e
    exact = w == 1.0  # e below half an ulp of 1: log1p(e) = e (and no 0/0 in the other branch)
    log1p = tl.where(exact, e, tl.log(w) * e / tl.where(exact, 1.0, w - 1.0))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def _load_dt(delta_ptr, offs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """``(dt, raw)``: the step size (0 where masked) and ``delta + delta_bias`` before softplus."""
    raw = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[:, None]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _load_bc(ptr, row, grp, ch, n_idx, t, mask_d, mask_n, mask_t,
             stride_b, stride_g, stride_n, stride_l, FIXED: tl.constexpr):
    """B or C as a tile that broadcasts to ``(BLOCK_D, BLOCK_N, CHUNK)`` (float32, 0 where masked).

    Fixed ``(d, n)``: ``(BLOCK_D, BLOCK_N, 1)`` (stride_g is the channel stride). Input-dependent:
    ``(1, BLOCK_N, CHUNK)`` for the program's one group ``grp`` (shared layout: stride_g = 0).
    """
    # Both branches end in a return and the second sits under ``else``: compiled Triton visits code
    # after a compile-time ``if`` that returned, and rejects the two tile shapes as inconsistent.
    if FIXED:
        offs = ch[:, None] * stride_g + n_idx[None, :] * stride_n
        tile = tl.load(ptr + offs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        return tile.to(tl.float32)[:, :, None]
    else:
        offs = row * stride_b + grp * stride_g + n_idx[:, None] * stride_n + t[None, :] * stride_l
        tile = tl.load(ptr + offs, mask=mask_n[:, None] & mask_t[None, :], other=0.0)
        return tile.to(tl.float32)[None, :, :]


@triton.jit
def _chunk_states(h, chunk_start, end, t_idx, row_base, mask_d, u_ptr, delta_ptr, bias, A2,
                  B_ptr, C_ptr, row, grp_b, grp_c, ch, n_idx, mask_n,
                  stride_Bb, stride_Bg, stride_Bn, stride_Bl, stride_Cb, stride_Cg, stride_Cn, stride_Cl,
                  HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, B_FIXED: tl.constexpr, C_FIXED: tl.constexpr):
    """The states of one chunk from the state ``h`` entering it (the forward's pass, recomputed by the
    backward from its checkpoint), with the inputs both need."""
    t = chunk_start + t_idx
    mask_t = t < end
    mask = mask_d[:, None] & mask_t[None, :]
    offs = row_base + t[None, :]
    uu = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dt, raw = _load_dt(delta_ptr, offs, mask, bias, HAS_BIAS, SOFTPLUS)
    decay = tl.exp2(dt[:, None, :] * A2[:, :, None])
    Bt = _load_bc(B_ptr, row, grp_b, ch, n_idx, t, mask_d, mask_n, mask_t,
                  stride_Bb, stride_Bg, stride_Bn, stride_Bl, B_FIXED)
    step = (dt * uu)[:, None, :] * Bt
    decay_run, states = tl.associative_scan((decay, step), 2, _affine_combine)
    states = states + decay_run * h[:, :, None]
    Ct = _load_bc(C_ptr, row, grp_c, ch, n_idx, t, mask_d, mask_n, mask_t,
                  stride_Cb, stride_Cg, stride_Cn, stride_Cl, C_FIXED)
    return t, mask_t, mask, offs, uu, dt, raw, decay, Bt, states, Ct


@triton.jit
def _program_layout(cu_ptr, seqlen, chunks_per_row, segment_len, dim,
                    channels_per_b_group, channels_per_c_group,
                    BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, VARLEN: tl.constexpr):
    """Where this program works: sequence bounds, batch row, first checkpoint slot, channels."""
    pid_s = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    if VARLEN:
        start = tl.load(cu_ptr + pid_s).to(tl.int64)
        end = tl.load(cu_ptr + pid_s + 1).to(tl.int64)
        row = pid_s * 0
        slot0 = start // CHUNK + pid_s
    else:
        start = pid_s * 0
        end = start + seqlen
        row = pid_s
        slot0 = pid_s * chunks_per_row
    blocks_per_segment = (segment_len + BLOCK_D - 1) // BLOCK_D
    segment = pid_d // blocks_per_segment
    block = pid_d % blocks_per_segment
    first = segment * segment_len
    local = block * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = (local < segment_len) & (first + local < dim)
    ch = first + local
    grp_b = first // channels_per_b_group
    grp_c = first // channels_per_c_group
    # Index of this block among the blocks of its B (C) group: its partial-sum slot.
    part_b = (first % channels_per_b_group) // segment_len * blocks_per_segment + block
    part_c = (first % channels_per_c_group) // segment_len * blocks_per_segment + block
    return pid_s, start, end, row, slot0, ch, mask_d, grp_b, grp_c, part_b, part_c


# ----------------------------------------------------------------------------- forward
@triton.jit(do_not_specialize=["seqlen", "chunks_per_row"])
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, init_ptr, cu_ptr,
    out_ptr, last_ptr, ckpt_ptr,
    seqlen, dim, nstate, chunks_per_row, segment_len,
    channels_per_b_group, channels_per_c_group,
    stride_Bb, stride_Bg, stride_Bn, stride_Bl,
    stride_Cb, stride_Cg, stride_Cn, stride_Cl,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    B_FIXED: tl.constexpr, C_FIXED: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_INIT: tl.constexpr, VARLEN: tl.constexpr,
    STATIC_CHUNKS: tl.constexpr,
):
    pid_s, start, end, row, slot0, ch, mask_d, grp_b, grp_c, _part_b, _part_c = _program_layout(
        cu_ptr, seqlen, chunks_per_row, segment_len, dim,
        channels_per_b_group, channels_per_c_group, BLOCK_D, CHUNK, VARLEN)
    n_idx = tl.arange(0, BLOCK_N)
    mask_n = n_idx < nstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    state_offs = ch[:, None] * nstate + n_idx[None, :]
    A2 = tl.load(A_ptr + state_offs, mask=mask_dn, other=0.0).to(tl.float32) * LOG2E
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=mask_d, other=0.0).to(tl.float32)
    Dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + ch, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_INIT:
        h = tl.load(init_ptr + pid_s * dim * nstate + state_offs, mask=mask_dn, other=0.0)
    else:
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)

    row_base = row * dim * seqlen + ch[:, None] * seqlen
    t_idx = tl.arange(0, CHUNK)
    num_chunks = (end - start + CHUNK - 1) // CHUNK
    for k in range(0, STATIC_CHUNKS if STATIC_CHUNKS > 0 else num_chunks):
        if k < num_chunks:
            chunk_start = start + k * CHUNK
            tl.store(ckpt_ptr + (slot0 + k) * dim * nstate + state_offs, h, mask=mask_dn)
            _t, _mask_t, mask, offs, uu, dt, _raw, _decay, _Bt, states, Ct = _chunk_states(
                h, chunk_start, end, t_idx, row_base, mask_d, u_ptr, delta_ptr, bias, A2,
                B_ptr, C_ptr, row, grp_b, grp_c, ch, n_idx, mask_n,
                stride_Bb, stride_Bg, stride_Bn, stride_Bl, stride_Cb, stride_Cg, stride_Cn, stride_Cl,
                HAS_BIAS, SOFTPLUS, B_FIXED, C_FIXED)
            y = tl.sum(states * Ct, axis=1)
            if HAS_D:
                y += Dv[:, None] * uu
            if HAS_Z:
                zz = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                y = y * zz * tl.sigmoid(zz)
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
            # Masked steps are identity maps, so the last column is the state at the chunk's end.
            h = tl.sum(tl.where(t_idx[None, None, :] == CHUNK - 1, states, 0.0), axis=2)
    tl.store(last_ptr + pid_s * dim * nstate + state_offs, h, mask=mask_dn)


# ----------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=["seqlen", "chunks_per_row"])
def _selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, cu_ptr, ckpt_ptr,
    dout_ptr, dlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dinit_ptr,
    dA_part_ptr, dD_part_ptr, dbias_part_ptr, dB_ptr, dC_ptr,
    seqlen, dim, nstate, chunks_per_row, segment_len,
    channels_per_b_group, channels_per_c_group,
    stride_Bb, stride_Bg, stride_Bn, stride_Bl,
    stride_Cb, stride_Cg, stride_Cn, stride_Cl,
    stride_dBp, stride_dBb, stride_dBg, stride_dBn,
    stride_dCp, stride_dCb, stride_dCg, stride_dCn,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    B_FIXED: tl.constexpr, C_FIXED: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_INIT: tl.constexpr,
    HAS_DLAST: tl.constexpr, VARLEN: tl.constexpr, ATOMIC: tl.constexpr, STATIC_CHUNKS: tl.constexpr,
):
    pid_s, start, end, row, slot0, ch, mask_d, grp_b, grp_c, part_b, part_c = _program_layout(
        cu_ptr, seqlen, chunks_per_row, segment_len, dim,
        channels_per_b_group, channels_per_c_group, BLOCK_D, CHUNK, VARLEN)
    n_idx = tl.arange(0, BLOCK_N)
    mask_n = n_idx < nstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    state_offs = ch[:, None] * nstate + n_idx[None, :]
    A = tl.load(A_ptr + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
    A2 = A * LOG2E
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=mask_d, other=0.0).to(tl.float32)
    Dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + ch, mask=mask_d, other=0.0).to(tl.float32)
    # carry: what flows into g at the chunk's last step from later steps (a_{t+1} g_{t+1}).
    if HAS_DLAST:
        carry = tl.load(dlast_ptr + pid_s * dim * nstate + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dB_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dC_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)

    row_base = row * dim * seqlen + ch[:, None] * seqlen
    t_idx = tl.arange(0, CHUNK)
    num_chunks = (end - start + CHUNK - 1) // CHUNK
    for i in range(0, STATIC_CHUNKS if STATIC_CHUNKS > 0 else num_chunks):
        if i < num_chunks:
            k = num_chunks - 1 - i
            chunk_start = start + k * CHUNK
            h0 = tl.load(ckpt_ptr + (slot0 + k) * dim * nstate + state_offs, mask=mask_dn, other=0.0)
            t, mask_t, mask, offs, uu, dt, raw, decay, Bt, states, Ct = _chunk_states(
                h0, chunk_start, end, t_idx, row_base, mask_d, u_ptr, delta_ptr, bias, A2,
                B_ptr, C_ptr, row, grp_b, grp_c, ch, n_idx, mask_n,
                stride_Bb, stride_Bg, stride_Bn, stride_Bl, stride_Cb, stride_Cg, stride_Cn, stride_Cl,
                HAS_BIAS, SOFTPLUS, B_FIXED, C_FIXED)
            dy = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_Z:
                y = tl.sum(states * Ct, axis=1) + Dv[:, None] * uu
                zz = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                sig = tl.sigmoid(zz)
                dz = dy * y * sig * (1.0 + zz * (1.0 - sig))
                tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
                dy = dy * zz * sig
            # Adjoint: g_t = C_t dy_t + a_{t+1} g_{t+1}; a_{t+1} of the chunk's last step comes in carry.
            next_mask = mask_d[:, None] & ((t + 1 < end) & (t_idx < CHUNK - 1))[None, :]
            dt_next, _raw_next = _load_dt(delta_ptr, offs + 1, next_mask, bias, HAS_BIAS, SOFTPLUS)
            decay_next = tl.exp2(dt_next[:, None, :] * A2[:, :, None])
            decay_back, g = tl.associative_scan((decay_next, Ct * dy[:, None, :]), 2, _affine_combine,
                                                reverse=True)
            g = g + decay_back * carry[:, :, None]
            carry = tl.sum(tl.where(t_idx[None, None, :] == 0, decay * g, 0.0), axis=2)

            decayed = states - (dt * uu)[:, None, :] * Bt  # a_t h_{t-1}
            g_dt = g * dt[:, None, :]
            du = tl.sum(g_dt * Bt, axis=1) + Dv[:, None] * dy
            tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)
            ddt = tl.sum(g * (A[:, :, None] * decayed + Bt * uu[:, None, :]), axis=1)
            if SOFTPLUS:
                ddt = ddt * tl.where(raw > 20.0, 1.0, tl.sigmoid(raw))
            ddt = tl.where(mask, ddt, 0.0)
            tl.store(ddelta_ptr + offs, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask)
            dbias_acc += tl.sum(ddt, axis=1)
            dA_acc += tl.sum(g_dt * decayed, axis=2)
            dD_acc += tl.sum(dy * uu, axis=1)
            grad_B = g_dt * uu[:, None, :]
            grad_C = states * dy[:, None, :]
            if B_FIXED:
                dB_acc += tl.sum(grad_B, axis=2)
            else:
                offs_b = (part_b * stride_dBp + row * stride_dBb + grp_b * stride_dBg
                          + n_idx[:, None] * stride_dBn + t[None, :])
                mask_b = mask_n[:, None] & mask_t[None, :]
                if ATOMIC:
                    tl.atomic_add(dB_ptr + offs_b, tl.sum(grad_B, axis=0), mask=mask_b, sem="relaxed")
                else:
                    tl.store(dB_ptr + offs_b, tl.sum(grad_B, axis=0), mask=mask_b)
            if C_FIXED:
                dC_acc += tl.sum(grad_C, axis=2)
            else:
                offs_c = (part_c * stride_dCp + row * stride_dCb + grp_c * stride_dCg
                          + n_idx[:, None] * stride_dCn + t[None, :])
                mask_c = mask_n[:, None] & mask_t[None, :]
                if ATOMIC:
                    tl.atomic_add(dC_ptr + offs_c, tl.sum(grad_C, axis=0), mask=mask_c, sem="relaxed")
                else:
                    tl.store(dC_ptr + offs_c, tl.sum(grad_C, axis=0), mask=mask_c)

    seq_offs = pid_s * dim * nstate + state_offs
    if HAS_INIT:
        tl.store(dinit_ptr + seq_offs, carry.to(dinit_ptr.dtype.element_ty), mask=mask_dn)
    tl.store(dA_part_ptr + seq_offs, dA_acc, mask=mask_dn)
    if B_FIXED:
        tl.store(dB_ptr + seq_offs, dB_acc, mask=mask_dn)
    if C_FIXED:
        tl.store(dC_ptr + seq_offs, dC_acc, mask=mask_dn)
    tl.store(dD_part_ptr + pid_s * dim + ch, dD_acc, mask=mask_d)
    tl.store(dbias_part_ptr + pid_s * dim + ch, dbias_acc, mask=mask_d)


# ----------------------------------------------------------------------------- tuning
def _prune(tile_max: int):
    def prune(configs, named_args, **kwargs):
        widest = triton.next_power_of_2(named_args["segment_len"])
        fitting = [c for c in configs
                   if c.kwargs["BLOCK_D"] * kwargs["BLOCK_N"] * kwargs["CHUNK"] <= tile_max
                   and c.kwargs["BLOCK_D"] <= widest]
        return fitting or [min(configs, key=lambda c: c.kwargs["BLOCK_D"])]
    return prune


def _tuned(kernel, configs, tile_max: int, **kwargs):
    return autotune.autotune([triton.Config({"BLOCK_D": bd}, num_warps=w) for bd, w in configs], _TUNING_KEY,
                             prune_configs_by={"early_config_prune": _prune(tile_max)}, **kwargs)(kernel)


_selective_scan_fwd_tuned = _tuned(_selective_scan_fwd_kernel, _FWD_CONFIGS, _FWD_TILE_MAX)
# Trials add into dB/dC with atomics: zeroed before each trial and before the real run.
_selective_scan_bwd_tuned = _tuned(_selective_scan_bwd_kernel, _BWD_CONFIGS, _BWD_TILE_MAX,
                                   reset_to_zero=["dB_ptr", "dC_ptr"])


def _launch(raw, tuned, lay: dict, count: int, d: int, *args, **kwargs) -> None:
    """Pinned heuristic config (interpreter, deterministic mode) or the autotuned one."""
    if autotune.pinned():
        raw[(count, lay["num_blocks"])](*args, BLOCK_D=lay["block_d"], num_warps=_NUM_WARPS, **kwargs)
    else:
        segments, segment_len = d // lay["segment_len"], lay["segment_len"]
        tuned[lambda meta: (count, segments * triton.cdiv(segment_len, meta["BLOCK_D"]))](*args, **kwargs)


# ----------------------------------------------------------------------------- launchers
def _bc_args(M: torch.Tensor, d: int):
    """(fixed, channels per group, (stride_b, stride_g, stride_n, stride_l)) of B or C."""
    if M.dim() == 2:  # (d, n): the "group" is the channel
        return True, 1, (0, M.stride(0), M.stride(1), 0)
    if M.dim() == 3:  # (b, n, l): one group
        return False, d, (M.stride(0), 0, M.stride(1), M.stride(2))
    g = M.shape[1]
    return False, d // g, (M.stride(0), M.stride(1), M.stride(2), M.stride(3))


def _layout(u: torch.Tensor, B: torch.Tensor, C: torch.Tensor, n: int, tile: int):
    b, d, l = u.shape
    b_fixed, b_cpg, b_strides = _bc_args(B, d)
    c_fixed, c_cpg, c_strides = _bc_args(C, d)
    # Fixed B/C never constrain the blocks (their reductions are per channel).
    segment_len = math.gcd(d if b_fixed else b_cpg, d if c_fixed else c_cpg)
    block_n = triton.next_power_of_2(max(n, 1))
    block_d = max(1, min(triton.next_power_of_2(segment_len), tile // (block_n * CHUNK)))
    blocks_per_segment = triton.cdiv(segment_len, block_d)
    num_blocks = (d // segment_len) * blocks_per_segment
    return dict(b_fixed=b_fixed, c_fixed=c_fixed, b_cpg=b_cpg if not b_fixed else d,
                c_cpg=c_cpg if not c_fixed else d, b_strides=b_strides, c_strides=c_strides,
                segment_len=segment_len, block_n=block_n, block_d=block_d,
                blocks_per_segment=blocks_per_segment, num_blocks=num_blocks)


def forward(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus,
            out, last_state, checkpoints) -> None:
    """Writes ``out (b, d, l)``, ``last_state (s, d, n)`` and the chunk ``checkpoints``."""
    b, d, l = u.shape
    n = A.shape[1]
    count = last_state.shape[0]
    if count == 0 or d == 0:
        return
    lay = _layout(u, B, C, n, _FWD_TILE)
    _launch(
        _selective_scan_fwd_kernel, _selective_scan_fwd_tuned, lay, count, d,
        u, delta, A, B, C, u if D is None else D, u if z is None else z,
        u if delta_bias is None else delta_bias,
        last_state if initial_state is None else initial_state,
        last_state if cu_seqlens is None else cu_seqlens,
        out, last_state, checkpoints,
        l, d, n, triton.cdiv(l, CHUNK), lay["segment_len"],
        lay["b_cpg"], lay["c_cpg"], *lay["b_strides"], *lay["c_strides"],
        BLOCK_N=lay["block_n"], CHUNK=CHUNK,
        B_FIXED=lay["b_fixed"], C_FIXED=lay["c_fixed"], HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        HAS_INIT=initial_state is not None, VARLEN=cu_seqlens is not None,
        STATIC_CHUNKS=_static_chunks(l),
    )


def _partials_for(M: torch.Tensor, dM: torch.Tensor, lay: dict, key: str, count: int, d: int,
                  atomic: bool):
    """Buffer the kernel writes M's gradient into, and its strides (partial, b, g, n)."""
    if M.dim() == 2:
        buf = torch.empty(count, *M.shape, device=M.device, dtype=torch.float32)
        return buf, (0, 0, 0, 0)
    b, n, l = M.shape[0], M.shape[-2], M.shape[-1]
    g = 1 if M.dim() == 3 else M.shape[1]
    if atomic:
        view = dM.view(b, g, n, l)
        return view, (0, view.stride(0), view.stride(1), view.stride(2))
    per_group = lay["num_blocks"] // g
    buf = torch.empty(per_group, b, g, n, l, device=M.device, dtype=torch.float32)
    return buf, (buf.stride(0), buf.stride(1), buf.stride(2), buf.stride(3))


def backward(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus,
             checkpoints, dout, dlast_state, du, ddelta, dA, dB, dC, dD, dz, ddelta_bias,
             dinitial_state) -> None:
    """Writes du, ddelta, dz, dinitial_state; adds into the zeroed float32 dA, dB, dC, dD, ddelta_bias."""
    b, d, l = u.shape
    n = A.shape[1]
    count = checkpoints.shape[0] - b * triton.cdiv(l, CHUNK)
    if count == 0 or d == 0:
        return
    lay = _layout(u, B, C, n, _BWD_TILE)
    atomic = not config.deterministic()
    dev = u.device
    dA_part = torch.empty(count, d, n, device=dev, dtype=torch.float32)
    dD_part = torch.empty(count, d, device=dev, dtype=torch.float32)
    dbias_part = torch.empty(count, d, device=dev, dtype=torch.float32)
    dB_buf, dB_strides = _partials_for(B, dB, lay, "b", count, d, atomic)
    dC_buf, dC_strides = _partials_for(C, dC, lay, "c", count, d, atomic)
    if dlast_state is not None:
        dlast_state = dlast_state.to(torch.float32).contiguous()
    _launch(
        _selective_scan_bwd_kernel, _selective_scan_bwd_tuned, lay, count, d,
        u, delta, A, B, C, u if D is None else D, u if z is None else z,
        u if delta_bias is None else delta_bias,
        checkpoints if cu_seqlens is None else cu_seqlens, checkpoints,
        dout, checkpoints if dlast_state is None else dlast_state,
        du, ddelta, du if dz is None else dz,
        checkpoints if dinitial_state is None else dinitial_state,
        dA_part, dD_part, dbias_part, dB_buf, dC_buf,
        l, d, n, triton.cdiv(l, CHUNK), lay["segment_len"],
        lay["b_cpg"], lay["c_cpg"], *lay["b_strides"], *lay["c_strides"],
        *dB_strides, *dC_strides,
        BLOCK_N=lay["block_n"], CHUNK=CHUNK,
        B_FIXED=lay["b_fixed"], C_FIXED=lay["c_fixed"], HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        HAS_INIT=initial_state is not None, HAS_DLAST=dlast_state is not None,
        VARLEN=cu_seqlens is not None, ATOMIC=atomic, STATIC_CHUNKS=_static_chunks(l),
    )
    # Second, fixed-order stage of every reduction.
    dA += dA_part.sum(0)
    if D is not None:
        dD += dD_part.sum(0)
    if delta_bias is not None:
        ddelta_bias += dbias_part.sum(0)
    for M, dM, buf in ((B, dB, dB_buf), (C, dC, dC_buf)):
        if M.dim() == 2:
            dM += buf.sum(0)
        elif not atomic:
            dM += buf.sum(0).view_as(dM)
