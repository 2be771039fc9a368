"""Triton kernels of causal_conv1d (SPEC.md section 1): forward, backward and the decode update.

Notation as in SPEC.md: ``x (b, d, l)``, ``weight (d, w)``; ``xx`` is x with the ``w-1`` initial
states in front, so ``out[t] = act(bias + sum_k weight[k] * xx[t - (w-1) + k])``.

Every kernel reads all strides, so both layouts of x (channel-first ``stride(2) == 1``,
channel-last ``stride(1) == 1``) run through the same code; Triton specialises unit strides, which
gives coalesced access along whichever axis is contiguous.

Packed sequences come in two forms, handled by ``SEQ_MODE``:

* ``0``: none; the row is one sequence starting at 0 whose initial state is ``initial_states[b]``.
* ``1``: ``seq_idx (b, l)``; position ``v`` feeds output ``t`` only when ``seq_idx[v] == seq_idx[t]``
  and initial states feed the row's first sequence only.
* ``2``: ``cu_seqlens (s+1,)`` with ``b == 1``; each position finds its sequence by a vectorised
  binary search over cu_seqlens (``SEARCH_STEPS`` halvings), so no host-side preprocessing and no
  sync; sequence ``j`` has its own ``initial_states[j]`` and final state.

Backward recomputes the pre-activation (it is cheaper than saving it), and reduces the weight and
bias gradients in two deterministic stages: each program writes its partial sum over its chunk of
positions to a scratch buffer, then one fixed-order sum adds them into the float32 buffers the op
layer provides. No float atomics, so gradients are bitwise reproducible.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._core import autotune

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
MAX_WIDTH = 8

# Tile shapes. Channel-first x is contiguous along l, so the tile is long in l; channel-last x is
# contiguous along d, so the tile is wide in d. Both move 16 bytes per thread per row on the GPU.
# The forward is purely bandwidth bound and bitwise independent of the tile, so no autotuning.
_FWD_TILE = {"channel_first": (16, 128), "channel_last": (64, 32)}
# Backward: each program walks a chunk of positions block by block and writes one partial sum of
# the weight/bias gradients; larger chunks mean a smaller scratch buffer to reduce.
_BWD_BLOCKS_PER_CHUNK = 8
# Update: channels per program (one batch row per program; decode is latency bound).
_UPDATE_BLOCK_D = 64


def unsupported(features: dict) -> str | None:
    dtype, weight_dtype = features.get("dtype"), features.get("weight_dtype")
    if dtype not in _FLOATS or (weight_dtype is not None and weight_dtype not in _FLOATS):
        return (f"the triton kernels take float32/float16/bfloat16 x and weight, got x {dtype} and "
                f"weight {weight_dtype}")
    state_dtype = features.get("state_dtype")
    if state_dtype is not None and state_dtype not in _FLOATS:
        return f"the triton update kernel takes a float32/float16/bfloat16 conv_state, got {state_dtype}"
    width = features.get("width")
    if width is not None and not 2 <= width <= MAX_WIDTH:
        return f"the triton kernels support widths 2..{MAX_WIDTH}, got {width}"
    return None


# ----------------------------------------------------------------------------- shared helpers
@triton.jit
def _find_sequence(cu_ptr, pos, num_seqs, SEARCH_STEPS: tl.constexpr):
    """Largest j in [0, num_seqs) with cu[j] <= pos (the sequence holding pos; skips empty ones)."""
    lo = tl.zeros_like(pos)
    hi = tl.zeros_like(pos) + (num_seqs - 1)
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        active = lo < hi
        go_up = tl.load(cu_ptr + mid) <= pos
        lo = tl.where(active & go_up, mid, lo)
        hi = tl.where(active & ~go_up, mid - 1, hi)
    return lo


@triton.jit
def _tap(x_row_ptr, init_ptr, seq_row_ptr, offs_d, mask_d, v, t_ok, start, init_row, seq_t, seq_first,
         stride_xd, stride_xl, stride_ib, stride_id, stride_iw, stride_sl,
         HAS_INIT: tl.constexpr, SEQ_MODE: tl.constexpr, W: tl.constexpr):
    """``xx`` at positions ``v (L,)`` as seen by outputs whose sequence starts at ``start``.

    Returns a float32 ``(BLOCK_D, L)`` tile: x where v lies in the output's sequence, the initial
    state where it lies before the start of a sequence that has one, zero elsewhere.
    """
    if SEQ_MODE == 1:
        seq_v = tl.load(seq_row_ptr + v * stride_sl, mask=t_ok & (v >= 0), other=-1)
        inside = (v >= 0) & (seq_v == seq_t)
        from_init = (v < 0) & (seq_t == seq_first)
    else:
        inside = v >= start
        from_init = v < start
    mask2 = mask_d[:, None] & (t_ok & inside)[None, :]
    value = tl.load(x_row_ptr + offs_d[:, None] * stride_xd + v[None, :] * stride_xl, mask=mask2,
                    other=0.0).to(tl.float32)
    if HAS_INIT:
        slot = v - start + (W - 1)
        imask = mask_d[:, None] & (t_ok & from_init & (slot >= 0))[None, :]
        value += tl.load(init_ptr + init_row[None, :] * stride_ib + offs_d[:, None] * stride_id
                         + slot[None, :] * stride_iw, mask=imask, other=0.0).to(tl.float32)
    return value


@triton.jit
def _preactivation(x_row, w_ptr, bias_ptr, init_ptr, seq_row, offs_d, mask_d, t, t_ok, start, init_row, seq_t,
                   seq_first, stride_xd, stride_xl, stride_wd, stride_ww, stride_ib, stride_id, stride_iw, stride_sl,
                   HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SEQ_MODE: tl.constexpr, W: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """``bias + sum_k weight[:, k] * xx[t - (W-1) + k]`` at positions t, float32 ``(BLOCK_D, BLOCK_L)``:
    the forward's output before the activation, recomputed by the backward for silu's derivative."""
    acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(W):
        w_k = tl.load(w_ptr + offs_d * stride_wd + k * stride_ww, mask=mask_d, other=0.0).to(tl.float32)
        acc += w_k[:, None] * _tap(x_row, init_ptr, seq_row, offs_d, mask_d, t - (W - 1) + k, t_ok, start,
                                   init_row, seq_t, seq_first, stride_xd, stride_xl, stride_ib, stride_id,
                                   stride_iw, stride_sl, HAS_INIT, SEQ_MODE, W)
    return acc


@triton.jit
def _context(seq_row_ptr, cu_ptr, t, t_ok, row, l, num_seqs, stride_sl,
             SEQ_MODE: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """Per position t: (start of its sequence, row of its initial state, its seq_idx, its end)."""
    zero = tl.zeros_like(t)
    if SEQ_MODE == 2:
        sid = _find_sequence(cu_ptr, t, num_seqs, SEARCH_STEPS)
        start = tl.load(cu_ptr + sid).to(tl.int64)
        end = tl.load(cu_ptr + sid + 1).to(tl.int64)
        return start, sid, zero, end
    seq_t = zero
    if SEQ_MODE == 1:
        seq_t = tl.load(seq_row_ptr + t * stride_sl, mask=t_ok, other=0)
    return zero, zero + row, seq_t, zero + l


@triton.jit
def _silu(z):
    return z * tl.sigmoid(z)


# ----------------------------------------------------------------------------- forward
@triton.jit(do_not_specialize=["l", "num_seqs"])
def _forward_kernel(
    x_ptr, w_ptr, bias_ptr, seq_ptr, init_ptr, cu_ptr, out_ptr,
    d, l, num_seqs,
    stride_xb, stride_xd, stride_xl,
    stride_wd, stride_ww,
    stride_sb, stride_sl,
    stride_ib, stride_id, stride_iw,
    stride_ob, stride_od, stride_ol,
    HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SEQ_MODE: tl.constexpr, SILU: tl.constexpr,
    SEARCH_STEPS: tl.constexpr, W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # Position blocks on grid axis 0 (the only axis allowed past 65535 programs).
    t = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    row = tl.program_id(2).to(tl.int64)
    mask_d = offs_d < d
    t_ok = t < l
    x_row = x_ptr + row * stride_xb
    seq_row = seq_ptr + row * stride_sb
    start, init_row, seq_t, _ = _context(seq_row, cu_ptr, t, t_ok, row, l, num_seqs, stride_sl,
                                         SEQ_MODE, SEARCH_STEPS)
    seq_first = tl.load(seq_row) if SEQ_MODE == 1 else 0

    acc = _preactivation(x_row, w_ptr, bias_ptr, init_ptr, seq_row, offs_d, mask_d, t, t_ok, start, init_row,
                         seq_t, seq_first, stride_xd, stride_xl, stride_wd, stride_ww, stride_ib, stride_id,
                         stride_iw, stride_sl, HAS_BIAS, HAS_INIT, SEQ_MODE, W, BLOCK_D, BLOCK_L)
    if SILU:
        acc = _silu(acc)
    out_ptrs = out_ptr + row * stride_ob + offs_d[:, None] * stride_od + t[None, :] * stride_ol
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_d[:, None] & t_ok[None, :])


@triton.jit(do_not_specialize=["l", "num_seqs"])
def _final_states_kernel(
    x_ptr, seq_ptr, init_ptr, cu_ptr, final_ptr,
    d, l, num_seqs,
    stride_xb, stride_xd, stride_xl,
    stride_sb, stride_sl,
    stride_ib, stride_id, stride_iw,
    stride_fb, stride_fd, stride_fw,
    HAS_INIT: tl.constexpr, SEQ_MODE: tl.constexpr, W: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """final[r, :, m] = xx at position end - (w-1) + m of row r's last sequence (sequence r with cu_seqlens)."""
    r = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = tl.arange(0, BLOCK_W)
    mask_d = offs_d < d
    m_ok = m < W - 1
    zero = tl.zeros((BLOCK_W,), dtype=tl.int64)
    if SEQ_MODE == 2:
        start = zero + tl.load(cu_ptr + r).to(tl.int64)
        end = tl.load(cu_ptr + r + 1).to(tl.int64)
        x_row = x_ptr
        seq_row = seq_ptr
        init_row = zero + r
        seq_last = zero
        seq_first = 0
    else:
        start = zero
        end = zero + l  # int64: end * stride may pass 2^31
        x_row = x_ptr + r * stride_xb
        seq_row = seq_ptr + r * stride_sb
        init_row = zero + r
        seq_last = zero
        seq_first = 0
        if SEQ_MODE == 1:
            # With l == 0 both loads give 0: the (empty) last sequence is the first.
            seq_last = zero + tl.load(seq_row + (l - 1) * stride_sl, mask=l > 0, other=0)
            seq_first = tl.load(seq_row, mask=l > 0, other=0)
    v = end - (W - 1) + m
    value = _tap(x_row, init_ptr, seq_row, offs_d, mask_d, v, m_ok, start, init_row, seq_last, seq_first,
                 stride_xd, stride_xl, stride_ib, stride_id, stride_iw, stride_sl, HAS_INIT, SEQ_MODE, W)
    ptrs = final_ptr + r * stride_fb + offs_d[:, None] * stride_fd + m[None, :] * stride_fw
    tl.store(ptrs, value.to(final_ptr.dtype.element_ty), mask=mask_d[:, None] & m_ok[None, :])


def _search_steps(cu_seqlens) -> int:
    num_seqs = 0 if cu_seqlens is None else cu_seqlens.numel() - 1
    return max(num_seqs - 1, 1).bit_length() if num_seqs > 1 else 0


def _seq_args(x, seq_idx, cu_seqlens):
    """(SEQ_MODE, seq pointer, its strides, cu pointer, number of sequences, search steps)."""
    if cu_seqlens is not None:
        return 2, x, (0, 0), cu_seqlens, cu_seqlens.numel() - 1, _search_steps(cu_seqlens)
    if seq_idx is not None:
        return 1, seq_idx, tuple(seq_idx.stride()), x, x.shape[0], 0
    return 0, x, (0, 0), x, x.shape[0], 0


def _strides3(t):
    return (0, 0, 0) if t is None else tuple(t.stride())


def _tile(x, d, l, table):
    layout = "channel_last" if x.stride(1) == 1 and x.stride(2) != 1 else "channel_first"
    block_d, block_l = table[layout]
    return min(block_d, triton.next_power_of_2(max(d, 1))), min(block_l, triton.next_power_of_2(max(l, 1)))


def forward(x, weight, bias, seq_idx, initial_states, cu_seqlens, silu, out, final_states):
    """Writes ``out (b, d, l)`` (x's layout) and, when given, ``final_states (count, d, w-1)``."""
    b, d, l = x.shape
    w = weight.shape[1]
    mode, seq, seq_strides, cu, num_seqs, steps = _seq_args(x, seq_idx, cu_seqlens)
    init = initial_states if initial_states is not None else x
    init_strides = _strides3(initial_states)
    block_d, block_l = _tile(x, d, l, _FWD_TILE)
    if l > 0 and d > 0:
        # Batch rows sit on grid axis 2 (at most MAX_GRID_YZ): larger batches launch in slices.
        for r0 in range(0, b, autotune.MAX_GRID_YZ):
            rows = slice(r0, min(b, r0 + autotune.MAX_GRID_YZ))
            grid = (triton.cdiv(l, block_l), triton.cdiv(d, block_d), rows.stop - r0)
            _forward_kernel[grid](
                x[rows], weight, bias if bias is not None else weight, seq if seq_idx is None else seq[rows],
                init if initial_states is None else init[rows], cu, out[rows],
                d, l, num_seqs, *x.stride(), *weight.stride(), *seq_strides, *init_strides, *out.stride(),
                HAS_BIAS=bias is not None, HAS_INIT=initial_states is not None, SEQ_MODE=mode, SILU=bool(silu),
                SEARCH_STEPS=steps, W=w, BLOCK_D=block_d, BLOCK_L=block_l)
    if final_states is not None and final_states.numel() > 0:
        block_d = min(64, triton.next_power_of_2(d))
        grid = (final_states.shape[0], triton.cdiv(d, block_d))
        _final_states_kernel[grid](
            x, seq, init, cu, final_states, d, l, num_seqs, *x.stride(), *seq_strides, *init_strides,
            *final_states.stride(), HAS_INIT=initial_states is not None, SEQ_MODE=mode, W=w,
            BLOCK_D=block_d, BLOCK_W=triton.next_power_of_2(w - 1))


# ----------------------------------------------------------------------------- backward
@triton.jit
def _dpreact(x_row, w_ptr, bias_ptr, init_ptr, seq_row, dout_row, offs_d, mask_d, t, t_ok, start, init_row,
             seq_t, seq_first, stride_xd, stride_xl, stride_wd, stride_ww, stride_ib, stride_id, stride_iw,
             stride_sl, stride_gd, stride_gl,
             HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SEQ_MODE: tl.constexpr, SILU: tl.constexpr,
             W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """Gradient wrt the pre-activation at positions t (zero where not t_ok), float32."""
    g = tl.load(dout_row + offs_d[:, None] * stride_gd + t[None, :] * stride_gl,
                mask=mask_d[:, None] & t_ok[None, :], other=0.0).to(tl.float32)
    if SILU:
        z = _preactivation(x_row, w_ptr, bias_ptr, init_ptr, seq_row, offs_d, mask_d, t, t_ok, start, init_row,
                           seq_t, seq_first, stride_xd, stride_xl, stride_wd, stride_ww, stride_ib, stride_id,
                           stride_iw, stride_sl, HAS_BIAS, HAS_INIT, SEQ_MODE, W, BLOCK_D, BLOCK_L)
        sig = tl.sigmoid(z)
        g = g * sig * (1.0 + z * (1.0 - sig))
    return g


@triton.jit(do_not_specialize=["l", "num_seqs", "num_chunks"])
def _backward_kernel(
    x_ptr, w_ptr, bias_ptr, seq_ptr, init_ptr, cu_ptr, dout_ptr, dfinal_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
    d, l, num_seqs, num_chunks,
    stride_xb, stride_xd, stride_xl,
    stride_wd, stride_ww,
    stride_sb, stride_sl,
    stride_ib, stride_id, stride_iw,
    stride_gb, stride_gd, stride_gl,
    stride_fb, stride_fd, stride_fw,
    stride_dxb, stride_dxd, stride_dxl,
    HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr, SEQ_MODE: tl.constexpr,
    SILU: tl.constexpr, SEARCH_STEPS: tl.constexpr, W: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCKS_PER_CHUNK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // num_chunks
    chunk = pid % num_chunks
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d
    offs_w = tl.arange(0, BLOCK_W)
    x_row = x_ptr + row * stride_xb
    seq_row = seq_ptr + row * stride_sb
    dout_row = dout_ptr + row * stride_gb
    seq_first = tl.load(seq_row) if SEQ_MODE == 1 else 0
    seq_last = tl.load(seq_row + (l - 1) * stride_sl) if SEQ_MODE == 1 else 0
    dw_acc = tl.zeros((BLOCK_D, BLOCK_W), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)

    for blk in range(BLOCKS_PER_CHUNK):
        u = (chunk * BLOCKS_PER_CHUNK + blk) * BLOCK_L + tl.arange(0, BLOCK_L)
        u_ok = u < l
        start, init_row, seq_u, end = _context(seq_row, cu_ptr, u, u_ok, row, l, num_seqs, stride_sl,
                                               SEQ_MODE, SEARCH_STEPS)
        dx = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        for j in tl.static_range(W):
            # Output t = u + j uses x[u] through tap k = w-1-j; it must lie in u's sequence.
            t = u + j
            t_ok = u_ok & (t < end)
            if SEQ_MODE == 1:
                t_ok = t_ok & (tl.load(seq_row + t * stride_sl, mask=t_ok, other=-1) == seq_u)
            g = _dpreact(x_row, w_ptr, bias_ptr, init_ptr, seq_row, dout_row, offs_d, mask_d, t, t_ok, start,
                         init_row, seq_u, seq_first, stride_xd, stride_xl, stride_wd, stride_ww, stride_ib,
                         stride_id, stride_iw, stride_sl, stride_gd, stride_gl,
                         HAS_BIAS, HAS_INIT, SEQ_MODE, SILU, W, BLOCK_D, BLOCK_L)
            w_j = tl.load(w_ptr + offs_d * stride_wd + (W - 1 - j) * stride_ww, mask=mask_d,
                          other=0.0).to(tl.float32)
            dx += w_j[:, None] * g
            if j == 0:
                # Weight and bias gradients of the outputs at u (taps include initial states).
                db_acc += tl.sum(g, axis=1)
                for k in tl.static_range(W):
                    xk = _tap(x_row, init_ptr, seq_row, offs_d, mask_d, u - (W - 1) + k, u_ok, start, init_row,
                              seq_u, seq_first, stride_xd, stride_xl, stride_ib, stride_id, stride_iw,
                              stride_sl, HAS_INIT, SEQ_MODE, W)
                    dw_acc += tl.where(offs_w[None, :] == k, tl.sum(g * xk, axis=1)[:, None], 0.0)
        if HAS_DFINAL:
            # x[u] is final-state slot m of its sequence when it is among the last w-1 inputs of
            # the row's last sequence (of its own sequence with cu_seqlens).
            m = u - (end - (W - 1))
            f_ok = u_ok & (m >= 0)
            if SEQ_MODE == 1:
                f_ok = f_ok & (seq_u == seq_last)
            f_row = init_row if SEQ_MODE == 2 else tl.zeros_like(u) + row
            dx += tl.load(dfinal_ptr + f_row[None, :] * stride_fb + offs_d[:, None] * stride_fd
                          + m[None, :] * stride_fw, mask=mask_d[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
        dx_ptrs = dx_ptr + row * stride_dxb + offs_d[:, None] * stride_dxd + u[None, :] * stride_dxl
        tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask_d[:, None] & u_ok[None, :])

    tl.store(dw_part_ptr + pid * d * BLOCK_W + offs_d[:, None] * BLOCK_W + offs_w[None, :], dw_acc,
             mask=mask_d[:, None])
    tl.store(db_part_ptr + pid * d + offs_d, db_acc, mask=mask_d)


@triton.jit(do_not_specialize=["l", "num_seqs"])
def _dinitial_kernel(
    x_ptr, w_ptr, bias_ptr, seq_ptr, init_ptr, cu_ptr, dout_ptr, dfinal_ptr, dinit_ptr,
    d, l, num_seqs,
    stride_xb, stride_xd, stride_xl,
    stride_wd, stride_ww,
    stride_sb, stride_sl,
    stride_ib, stride_id, stride_iw,
    stride_gb, stride_gd, stride_gl,
    stride_fb, stride_fd, stride_fw,
    stride_nb, stride_nd, stride_nw,
    HAS_BIAS: tl.constexpr, HAS_DFINAL: tl.constexpr, SEQ_MODE: tl.constexpr, SILU: tl.constexpr,
    W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """dinit[r, :, i] for the initial-state slot i (virtual position start + i - (w-1))."""
    r = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d
    i = tl.arange(0, BLOCK_W)
    i_ok = i < W - 1
    zero = tl.zeros((BLOCK_W,), dtype=tl.int64)
    init_row = zero + r
    seq_first = 0
    last_is_first = True
    if SEQ_MODE == 2:
        start = tl.load(cu_ptr + r).to(tl.int64)
        end = tl.load(cu_ptr + r + 1).to(tl.int64)
        x_row = x_ptr
        seq_row = seq_ptr
        dout_row = dout_ptr
    else:
        start = 0
        end = l
        x_row = x_ptr + r * stride_xb
        seq_row = seq_ptr + r * stride_sb
        dout_row = dout_ptr + r * stride_gb
        if SEQ_MODE == 1:
            seq_first = tl.load(seq_row, mask=l > 0, other=0)
            last_is_first = tl.load(seq_row + (l - 1) * stride_sl, mask=l > 0, other=0) == seq_first
    u = start + i - (W - 1)
    seq_t = zero + seq_first
    acc = tl.zeros((BLOCK_D, BLOCK_W), dtype=tl.float32)
    for j in tl.static_range(1, W):
        t = u + j
        t_ok = i_ok & (t >= start) & (t < end)
        if SEQ_MODE == 1:
            t_ok = t_ok & (tl.load(seq_row + t * stride_sl, mask=t_ok, other=-1) == seq_first)
        g = _dpreact(x_row, w_ptr, bias_ptr, init_ptr, seq_row, dout_row, offs_d, mask_d, t, t_ok, zero + start,
                     init_row, seq_t, seq_first, stride_xd, stride_xl, stride_wd, stride_ww, stride_ib,
                     stride_id, stride_iw, stride_sl, stride_gd, stride_gl,
                     HAS_BIAS, True, SEQ_MODE, SILU, W, BLOCK_D, BLOCK_W)
        w_j = tl.load(w_ptr + offs_d * stride_wd + (W - 1 - j) * stride_ww, mask=mask_d, other=0.0).to(tl.float32)
        acc += w_j[:, None] * g
    if HAS_DFINAL:
        m = u - (end - (W - 1))
        f_ok = i_ok & (m >= 0) & last_is_first
        acc += tl.load(dfinal_ptr + r * stride_fb + offs_d[:, None] * stride_fd + m[None, :] * stride_fw,
                       mask=mask_d[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
    ptrs = dinit_ptr + r * stride_nb + offs_d[:, None] * stride_nd + i[None, :] * stride_nw
    tl.store(ptrs, acc.to(dinit_ptr.dtype.element_ty), mask=mask_d[:, None] & i_ok[None, :])


def backward(x, weight, bias, seq_idx, initial_states, cu_seqlens, dout, dfinal_states, silu,
             dx, dweight, dbias, dinitial):
    """Writes dx (x's layout) and dinitial; adds the weight/bias gradients into the float32 buffers."""
    b, d, l = x.shape
    w = weight.shape[1]
    mode, seq, seq_strides, cu, num_seqs, steps = _seq_args(x, seq_idx, cu_seqlens)
    init = initial_states if initial_states is not None else x
    init_strides = _strides3(initial_states)
    has_dfinal = dfinal_states is not None and dfinal_states.numel() > 0
    dfinal = dfinal_states if has_dfinal else x
    dfinal_strides = _strides3(dfinal_states if has_dfinal else None)
    block_w = triton.next_power_of_2(w)
    common = dict(HAS_BIAS=bias is not None, SEQ_MODE=mode, SILU=bool(silu), W=w)
    bias_arg = bias if bias is not None else weight
    if l > 0 and d > 0:
        block_d, block_l = _tile(x, d, l, _FWD_TILE)
        blocks_per_chunk = min(_BWD_BLOCKS_PER_CHUNK, triton.cdiv(l, block_l))
        num_chunks = triton.cdiv(l, block_l * blocks_per_chunk)
        dw_part = torch.empty(b * num_chunks, d, block_w, device=x.device, dtype=torch.float32)
        db_part = torch.empty(b * num_chunks, d, device=x.device, dtype=torch.float32)
        grid = (b * num_chunks, triton.cdiv(d, block_d))
        _backward_kernel[grid](
            x, weight, bias_arg, seq, init, cu, dout, dfinal, dx, dw_part, db_part,
            d, l, num_seqs, num_chunks, *x.stride(), *weight.stride(), *seq_strides, *init_strides,
            *dout.stride(), *dfinal_strides, *dx.stride(),
            HAS_INIT=initial_states is not None, HAS_DFINAL=has_dfinal, SEARCH_STEPS=steps, BLOCK_W=block_w,
            BLOCK_D=block_d, BLOCK_L=block_l, BLOCKS_PER_CHUNK=blocks_per_chunk, **common)
        # Second stage of the deterministic reduction: a fixed-order sum over the partials.
        dweight += dw_part.sum(dim=0)[:, :w]
        if dbias is not None:
            dbias += db_part.sum(dim=0)
    if dinitial is not None and dinitial.numel() > 0:
        block_d = min(64, triton.next_power_of_2(d))
        grid = (dinitial.shape[0], triton.cdiv(d, block_d))
        _dinitial_kernel[grid](
            x, weight, bias_arg, seq, init, cu, dout, dfinal, dinitial, d, l, num_seqs,
            *x.stride(), *weight.stride(), *seq_strides, *init_strides, *dout.stride(), *dfinal_strides,
            *dinitial.stride(), HAS_DFINAL=has_dfinal, BLOCK_D=block_d,
            BLOCK_W=triton.next_power_of_2(w - 1), **common)


# ----------------------------------------------------------------------------- update
@triton.jit
def _update_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, seqlens_ptr, index_ptr, out_ptr,
    d, slots,
    stride_xb, stride_xd, stride_xt,
    stride_cb, stride_cd, stride_cs,
    stride_wd, stride_ww, stride_bias,
    stride_ob, stride_od, stride_ot,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, CIRCULAR: tl.constexpr, HAS_INDEX: tl.constexpr,
    W: tl.constexpr, TOKENS: tl.constexpr, S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Token count and state length are compile-time: both are fixed by the model and the decode
    scheme, and unrolled loops keep the whole update in registers."""
    i = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d
    slot = tl.load(index_ptr + i).to(tl.int64) if HAS_INDEX else i
    # A negative index is a padding slot: zeros out, state untouched. So is an index past the cache
    # (CUDA index values are not checked on the host: that would synchronise every decode step).
    live = (slot >= 0) & (slot < slots)
    mask = mask_d & live
    x_row = x_ptr + i * stride_xb + offs_d * stride_xd
    state_row = state_ptr + tl.maximum(slot, 0) * stride_cb + offs_d * stride_cd
    c = 0
    if CIRCULAR:
        c = tl.load(seqlens_ptr + i).to(tl.int64) % S
        c = tl.where(c < 0, c + S, c)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d * stride_bias, mask=mask_d, other=0.0).to(tl.float32)

    # Outputs first: they read the old state, which is only overwritten after the barrier below.
    for j in tl.static_range(TOKENS):
        acc = bias
        for k in tl.static_range(W):
            # j - (W - 1) + k: position relative to the first new token (compile-time; spelled out
            # because compiled Triton refuses to re-bind a constexpr name inside static_range).
            if j - (W - 1) + k >= 0:
                value = tl.load(x_row + (j - (W - 1) + k) * stride_xt, mask=mask, other=0.0)
            elif CIRCULAR:
                value = tl.load(state_row + ((c + (j - (W - 1) + k) + S) % S) * stride_cs, mask=mask, other=0.0)
            else:
                value = tl.load(state_row + (S + (j - (W - 1) + k)) * stride_cs, mask=mask, other=0.0)
            w_k = tl.load(w_ptr + offs_d * stride_wd + k * stride_ww, mask=mask_d, other=0.0).to(tl.float32)
            acc += w_k * value.to(tl.float32)
        if SILU:
            acc = _silu(acc)
        acc = tl.where(live, acc, 0.0)
        tl.store(out_ptr + i * stride_ob + offs_d * stride_od + j * stride_ot, acc.to(out_ptr.dtype.element_ty),
                 mask=mask_d)

    state_ty = state_ptr.dtype.element_ty
    if CIRCULAR:
        # New token j goes to (c + j) mod s; only the last s tokens survive.
        tl.debug_barrier()
        for j in tl.static_range(TOKENS):
            if j >= TOKENS - S:
                value = tl.load(x_row + j * stride_xt, mask=mask, other=0.0)
                tl.store(state_row + ((c + j) % S) * stride_cs, value.to(state_ty), mask=mask)
    else:
        # Shift left by the token count: new[q] = old[q + tokens], or x[q + tokens - s] past the end.
        q = tl.arange(0, BLOCK_S)
        src = q + TOKENS
        m2 = mask[:, None] & (q < S)[None, :]
        old = tl.load(state_row[:, None] + src[None, :] * stride_cs, mask=m2 & (src < S)[None, :], other=0.0)
        new = tl.load(x_row[:, None] + (src - S)[None, :] * stride_xt, mask=m2 & (src >= S)[None, :], other=0.0)
        value = tl.where((src < S)[None, :], old.to(tl.float32), new.to(tl.float32))
        tl.debug_barrier()
        tl.store(state_row[:, None] + q[None, :] * stride_cs, value.to(state_ty), mask=m2)


def update(x, conv_state, weight, bias, silu, cache_seqlens, conv_state_indices, out):
    """Writes ``out`` (x's shape) and shifts the new tokens into ``conv_state`` in place. No host sync."""
    xs = x.unsqueeze(-1) if x.dim() == 2 else x
    outs = out.unsqueeze(-1) if out.dim() == 2 else out
    b, d, tokens = xs.shape
    s = conv_state.shape[2]
    w = weight.shape[1]
    if b == 0 or d == 0:
        return
    block_s = triton.next_power_of_2(s)
    # Keep the (channels x state) tile of the shift near 4K elements for long states.
    block_d = min(_UPDATE_BLOCK_D, max(1, 4096 // block_s), triton.next_power_of_2(d))
    grid = (b, triton.cdiv(d, block_d))
    _update_kernel[grid](
        xs, conv_state, weight, bias if bias is not None else weight,
        cache_seqlens if cache_seqlens is not None else xs,
        conv_state_indices if conv_state_indices is not None else xs, outs,
        d, conv_state.shape[0], *xs.stride(), *conv_state.stride(), *weight.stride(),
        bias.stride(0) if bias is not None else 0, *outs.stride(),
        HAS_BIAS=bias is not None, SILU=bool(silu), CIRCULAR=cache_seqlens is not None,
        HAS_INDEX=conv_state_indices is not None, W=w, TOKENS=tokens, S=s, BLOCK_D=block_d, BLOCK_S=block_s)
