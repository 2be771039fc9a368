"""Triton kernels of ssd_chunk_scan (Mamba-2 SSD, SPEC.md section 3): forward and backward.

Notation as in SPEC.md: ``x (b, l, h, p)``, ``dt (b, l, h)``, ``B, C (b, l, g, n)``, chunk size ``Q``,
``nc = ceil(l / Q)`` chunks. Within a chunk, ``dtp`` is the processed dt and ``cs_t`` the inclusive
cumulative sum of ``dtp * A`` from the chunk start (``cs = 0`` "before" the chunk).

Forward (4 kernels, + 1 for cu_seqlens):

1. ``_dt_kernel``: dtp (bias, softplus, dt_limit) and cs per chunk, saved in the checkpoint.
2. ``_segment_state_kernel``: chunk states ``L_c = sum_t exp(cs_end - cs_t) dtp_t x_t B_t^T`` over the
   positions of the chunk's last sequence.
3. ``_state_pass_kernel``: sequential over chunks, ``S_c = L_c + exp(cs_end) S_{c-1}`` (when the
   sequence goes on through the whole chunk) ``+`` decayed initial states of cu_seqlens sequences
   that start inside the chunk. The checkpoint keeps ``S_{-1} .. S_{nc-1}`` (``nc + 1`` slots).
4. ``_scan_kernel`` (causal): ``y_t = sum_{s<=t} (C_t.B_s) exp(cs_t - cs_s) dtp_s x_s`` (same
   sequence only) ``+ exp(cs_t) C_t S_{c-1}`` (when t continues the previous chunk's sequence)
   ``+`` initial states of cu_seqlens sequences starting in the chunk, then ``D x`` and ``silu(z)``.
5. cu_seqlens only: ``_segment_state_kernel`` once per sequence for its final state (the sequence
   may end anywhere inside a chunk) plus the decayed state it started the chunk from.

Sequences: ``seq_idx`` masks every intra-chunk term by seq_idx equality (as mamba_ssm does);
``cu_seqlens`` is turned into ``seq_idx`` (position -> sequence index), with per-sequence initial
states injected where a sequence starts and per-sequence final states extracted where it ends.

Backward is the same machinery run in reverse time: the gradient of the state ``dH_t`` obeys the
transposed recurrence, so ``dx``/``dB`` are anti-causal chunk scans of ``dy``/``C``, ``dC`` a causal
scan, the chunk-boundary gradients ``dS_c`` a reverse state pass, and ``d(cs)`` collapses to
``dy_t . y_t - x_t . dx_t`` (+ terms at chunk ends, sequence ends and sequence starts); ``dA`` and
``ddt`` follow by a reverse cumulative sum. The small per-position / per-head reductions at the end
run in PyTorch.

Every ``exp`` of a decay difference is clamped to ``exp(min(diff, 0))``. No float atomics: reductions
go through scratch buffers summed in a fixed order, so the backward is deterministic.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..._core import config
from ..._core.profiling import step_range

# Loops whose bound is a tensor run as while-loops under the interpreter (its range() cannot take
# one with this numpy); compiled kernels keep range() so that Triton can pipeline them.
_INTERPRET = config.triton_interpret()
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEADDIM = 256
MAX_DSTATE = 256

# ----------------------------------------------------------------------------- tuning configs
# One place per kernel, chosen for the H100 at the target shape (P64 N128 chunk 256, bf16). Tiles
# are tensor-core friendly: >= 16 in every dot dimension, wgmma in the sm_90a build. The value
# dimension of the forward/dx scans is one tile (p <= 128). The segment kernel takes 8 warps
# because with 4 ptxas (sm_90a, bf16) reported 255 registers and spills. The scan kernel runs at 4
# warps (measured faster; ptxas, bf16 inputs: the forward scan 167 registers, no spills, 79 KB of
# shared memory; the backward scans 224 and 168 registers, and 255 with 84 B and 24 B of spill
# stores for dB and dC). Registers per thread of the scans with 8 warps and 64 x 64 tiles (no
# spills unless noted):
# - forward scan: 152; dy scan: 128; dx scan: 128; dB scan: 226; dC scan (float64 intra-chunk dA
#   sums): 244;
# - chunk-state kernels: 126 forward, 159 backward; C B^T kernel: 82 (4 warps).
# bench --profile on an H100 put 81% of the forward in the scan kernel, then with a per-head dot.
# dt kernel: one program per (b, h, chunk), the whole chunk in one tile.
# segment-state kernel: (BLOCK_T positions) x (BLOCK_P x BLOCK_N) state tile.
_SEGMENT_CFG = {"BLOCK_T": 64, "BLOCK_P": 64, "BLOCK_N": 128, "num_warps": 8}
# C B^T kernel: BLOCK_M x BLOCK_M tiles of a chunk's (Q x Q) matrix, the whole d_state in one dot.
_CB_CFG = {"BLOCK_M": 64, "num_warps": 4}
# state-pass kernels: flat blocks of the p*n state, sequential over chunks.
_PASS_CFG = {"BLOCK": 1024, "num_warps": 4}
# scan kernel: BLOCK_M rows x BLOCK_K columns per step; value tile up to BLOCK_V_MAX wide when the
# epilogue does not need full rows (dB/dC, which loop over the heads of a group); otherwise the
# whole value dimension. H200, bench shape (scripts/tune_ssd_scan.py, whole forward; bf16 operands,
# 3 stages unless noted): 64 x 32 at 4 warps 1.660 ms; 64 x 32 at 8 warps 1.952; 64 x 64 at 4
# warps 2.128-2.305 (2-3 stages), at 8 warps 2.185-2.863; 128 x 32 at 8 warps 2.059; 128 x 64
# 2.470-2.617; 64 x 128 3.069. Without the precomputed C B^T (SSMKERNELS_SSD_PRECOMPUTE_CB=0): 3.010.
# Tried on 2026-12-04 (fifteenth session) and reverted: column blocks wholly on the kept side of
# the diagonal without the causal/bounds masks, and in the plain forward the decays of those blocks
# factored at the row block's first row (per-element work down to one multiply): the forward 1.712-
# 1.724 ms against 1.649 without (scan kernel 1175 us in the profile, ptxas 156-165 registers against
# 134, the same 66 KB of shared memory), fwd+bwd unchanged at 15.0 ms. The scan is not bound by its
# per-element arithmetic.
_SCAN_CFG = {"BLOCK_M": 64, "BLOCK_K": 32, "BLOCK_V_MAX": 64, "num_warps": 4}
# float32 operands take twice the shared memory: narrower key blocks and two pipeline stages keep
# the full-value scans (p = 64, n = 128) under the 227 KB of an H100 (seen: 232,960 B requested).
# 32-row blocks: with tf32x3 dots, 64-row blocks gave wrong dt gradients on an H100 at chunk 64
# (error 5.1 against a tolerance of 1.5e-4) where 32-row blocks (chunk 32) passed; the backward of
# every input dtype runs on float32 operands, so it uses this configuration too. H200, bench shape,
# whole fwd+bwd: 32 x 32 at 4 warps 19.47 ms (1 stage 20.01), at 8 warps 29.84; 32 x 64 at 8 warps
# 26.28; 64 x 32 at 8 warps, 1 stage 28.34. tf32x3 dots (float16 and float32 inputs) keep 8 warps:
# at 4, ptxas put 2952 B of spill stores per thread into a float32-input scan.
# The dB/dC scans (value tile BLOCK_V_MAX) at tf32: d_state 128 in one 128-wide tile, 14.68 ms
# whole fwd+bwd against 18.36 with two 64-wide tiles (32: 31.64); tf32x3 keeps 64 (register room).
_SCAN_CFG_F32 = {"BLOCK_M": 32, "BLOCK_K": 32, "num_stages": 2, "num_warps_tf32x3": 8,
                 "BLOCK_V_MAX": 128, "BLOCK_V_MAX_tf32x3": 64}


def _scan_cfg(dtype: torch.dtype) -> dict:
    """Scan-kernel configuration for dot operands of ``dtype``."""
    return _SCAN_CFG if dtype != torch.float32 else {**_SCAN_CFG, **_SCAN_CFG_F32}


def _scan_block_m(chunk_size: int, dtype: torch.dtype) -> int:
    """Rows per scan program (the backward sizes its per-row-block buffers with it)."""
    return min(_p2(chunk_size), _scan_cfg(dtype)["BLOCK_M"])

# Precision of the tensor-core dots (Triton's ``input_precision``) where the operands are float32.
# The backward's operands are float32 whatever the input dtype: dA and ddt_bias are sums over the
# whole sequence, and rounding dy, decay-scaled scores and x*dt to bfloat16/float16 operands
# measured 2.7x (bf16 dA) and 4.5x (fp16 ddt_bias) past the SPEC tolerance on an H100. "ieee" (FMA
# dots) is exact but its register tiles go to local memory (ptxas: 32 registers, 9-14 KB of spills per
# thread at P64 N128), which made the backward 100x slower than the forward. So the dots run on
# tensor cores: tf32 (10-bit mantissa, 8x finer than bf16's) for bfloat16 inputs; tf32x3 (three tf32
# products, about float32 accuracy) for float16, whose tolerance is 10x tighter, and for float32.
# SSMKERNELS_SSD_DOT_PRECISION=ieee restores exact float32 dots (slow) for numerical studies.
GRAD_DOT_DTYPE = torch.float32
_F32_PRECISION = {torch.bfloat16: "tf32", torch.float16: "tf32x3", torch.float32: "tf32x3"}


def _f32_precision(input_dtype: torch.dtype) -> str:
    """input_precision of the float32-operand dots of a call whose inputs are ``input_dtype``."""
    forced = config.ssd_dot_precision()
    return forced if forced else _F32_PRECISION[input_dtype]

# Epilogues of the scan kernel.
_EPI_OUT, _EPI_DZ, _EPI_DX, _EPI_PLAIN = 0, 1, 2, 3


def unsupported(features: dict) -> str | None:
    dtype = features.get("dtype")
    if dtype not in _FLOATS:
        return f"the triton kernels of ssd take float32/float16/bfloat16 inputs, got {dtype}"
    if features.get("headdim", 0) > MAX_HEADDIM:
        return f"the triton kernels of ssd take headdim <= {MAX_HEADDIM}, got {features['headdim']}"
    if features.get("d_state", 0) > MAX_DSTATE:
        return f"the triton kernels of ssd take d_state <= {MAX_DSTATE}, got {features['d_state']}"
    return None


def _nchunks(seqlen: int, chunk_size: int) -> int:
    return (seqlen + chunk_size - 1) // chunk_size


def checkpoint_shape(x_shape, n: int, chunk_size: int) -> tuple:
    """One flat float32 buffer: chunk-boundary states ``(b, nc + 1, h, p, n)``, then dtp, cs and
    cs_lo ``(b, h, nc, Q)`` each (cs = cs + cs_lo to about float64 accuracy)."""
    b, l, h, p = x_shape
    nc = _nchunks(l, chunk_size)
    return (b * (nc + 1) * h * p * n + 3 * b * h * nc * chunk_size,)


def _split_checkpoints(checkpoints, b, l, h, p, n, chunk_size):
    nc = _nchunks(l, chunk_size)
    size_states = b * (nc + 1) * h * p * n
    size_dt = b * h * nc * chunk_size
    states = checkpoints[:size_states].view(b, nc + 1, h, p, n)
    dtp = checkpoints[size_states:size_states + size_dt].view(b, h, nc, chunk_size)
    cs = checkpoints[size_states + size_dt:size_states + 3 * size_dt].view(2, b, h, nc, chunk_size)[0]
    return states, dtp, cs


def _lo_off(cs: torch.Tensor) -> int:
    """Elements from cs to cs_lo in the checkpoint buffer."""
    return cs.numel()


def _cs64(cs: torch.Tensor) -> torch.Tensor:
    """cs + cs_lo in float64, for the decays computed in PyTorch."""
    return cs.double() + torch.as_strided(cs, cs.shape, cs.stride(), cs.storage_offset() + cs.numel()).double()


def _p2(v: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(int(v)))


def _dot_types(dtype: torch.dtype, input_dtype: torch.dtype):
    """(operand dtype, input_precision) of the dots: operands in ``dtype`` (the inputs' dtype, or
    float32 in the backward), float32 operands at the precision chosen for ``input_dtype``."""
    if dtype == torch.float32:
        return tl.float32, _f32_precision(input_dtype)
    return (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), "tf32"


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _dt_kernel(dt_ptr, dt_sb, dt_sl, dt_sh, bias_ptr, A_ptr, dtp_ptr, cs_ptr, lo_off,
               seqlen, nheads, nchunks, chunk, dt_min, dt_max,
               HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr,
               BLOCK_Q: tl.constexpr):
    """One program per (b, h, chunk): dtp and cs of the chunk; zeros past the sequence end."""
    pid = tl.program_id(0).to(tl.int64)
    c = pid % nchunks
    bh = pid // nchunks
    hh = bh % nheads
    bb = bh // nheads
    t = tl.arange(0, BLOCK_Q)
    pos = c * chunk + t
    ok = (t < chunk) & (pos < seqlen)
    v = tl.load(dt_ptr + bb * dt_sb + pos * dt_sl + hh * dt_sh, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + hh).to(tl.float32)
    if SOFTPLUS:
        v = tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))))
    if CLAMP:
        v = tl.minimum(tl.maximum(v, dt_min), dt_max)
    v = tl.where(ok, v, 0.0)
    a = v.to(tl.float64) * tl.load(A_ptr + hh).to(tl.float64)
    cs64 = tl.cumsum(a, axis=0)
    cs = cs64.to(tl.float32)
    lo = (cs64 - cs.to(tl.float64)).to(tl.float32)
    base = pid * chunk
    tl.store(dtp_ptr + base + t, v, mask=t < chunk)
    tl.store(cs_ptr + base + t, cs, mask=t < chunk)
    tl.store(cs_ptr + lo_off + base + t, lo, mask=t < chunk)


@triton.jit
def _chunk_program(pid, slots, nchunks, chunk, seqlen):
    """Program id over (b, chunk, slot), slot fastest -> (slot, chunk, row, chunk start, chunk length)."""
    slot = pid % slots
    bc = pid // slots
    c = bc % nchunks
    bb = bc // nchunks
    chunk_start = c * chunk
    return slot, c, bb, chunk_start, tl.minimum(chunk, seqlen - chunk_start)


@triton.jit
def _cb_kernel(c_ptr, c_sb, c_sl, c_sg, b_ptr, b_sb, b_sl, b_sg, cb_ptr, seqlen, ngroups, nchunks, chunk, N,
               DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``cb[b, c, g, t, s] = C_t . B_s`` (positions t, s of chunk c, group g) for the blocks on or
    below the diagonal (t >= s); the scans of the group's heads read it instead of each
    recomputing the dot (the heads of a group share C and B: 16x fewer such dots at h/g = 16)."""
    pid = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    if pid_s <= pid_m:
        gg, c, bb, chunk_start, chunk_len = _chunk_program(pid, ngroups, nchunks, chunk, seqlen)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_s * BLOCK_M + tl.arange(0, BLOCK_M)
        nn = tl.arange(0, BLOCK_N)
        n_ok = nn < N
        cq = tl.load(c_ptr + bb * c_sb + gg * c_sg + (chunk_start + rows)[:, None] * c_sl + nn[None, :],
                     mask=(rows < chunk_len)[:, None] & n_ok[None, :], other=0.0).to(DOT_DTYPE)
        bk = tl.load(b_ptr + bb * b_sb + gg * b_sg + (chunk_start + cols)[None, :] * b_sl + nn[:, None],
                     mask=n_ok[:, None] & (cols < chunk_len)[None, :], other=0.0).to(DOT_DTYPE)
        cb = tl.dot(cq, bk, input_precision=PREC)
        tl.store(cb_ptr + pid * chunk * chunk + rows[:, None] * chunk + cols[None, :], cb,
                 mask=(rows < chunk)[:, None] & (cols < chunk)[None, :])


@triton.jit
def _exp_diff(a, a_lo, b, b_lo):
    """``exp(min(a - b, 0))`` for cs values held as float32 pairs (hi, lo): the difference of two
    nearby cumulative sums keeps its accuracy however large the sums grow within a chunk."""
    return tl.exp(tl.minimum((a - b) + (a_lo - b_lo), 0.0))


@triton.jit
def _segment_step(acc, t0, u_base, u_sl, w_base, w_sl, dtp_ptr, cs_ptr, cs_base, seq_ptr, seq_sb, seq_sl,
                  bb, chunk_start, chunk_len, ref, cs_ref, lo_ref, lo_off, target, offs_p, offs_n, p_ok, n_ok,
                  FORWARD: tl.constexpr, HAS_SEQ: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_T: tl.constexpr):
    t = t0 + tl.arange(0, BLOCK_T)
    pos = chunk_start + t
    ok = t < chunk_len
    cs_t = tl.load(cs_ptr + cs_base + t, mask=ok, other=0.0)
    lo_t = tl.load(cs_ptr + lo_off + cs_base + t, mask=ok, other=0.0)
    if FORWARD:
        ok = ok & (pos <= ref)
        dtp_t = tl.load(dtp_ptr + cs_base + t, mask=ok, other=0.0)
        wt = _exp_diff(cs_ref, lo_ref, cs_t, lo_t) * dtp_t
    else:
        ok = ok & (pos > ref)
        wt = _exp_diff(cs_t, lo_t, cs_ref, lo_ref)
    if HAS_SEQ:
        sq = tl.load(seq_ptr + bb * seq_sb + pos * seq_sl, mask=ok, other=0)
        ok = ok & (sq == target)
    wt = tl.where(ok, wt, 0.0)
    u = tl.load(u_base + pos[None, :] * u_sl + offs_p[:, None], mask=p_ok[:, None] & ok[None, :],
                other=0.0).to(tl.float32)
    w = tl.load(w_base + pos[:, None] * w_sl + offs_n[None, :], mask=ok[:, None] & n_ok[None, :],
                other=0.0).to(DOT_DTYPE)
    u = (u * wt[None, :]).to(DOT_DTYPE)
    acc += tl.dot(u, w, input_precision=PREC)
    return acc


@triton.jit
def _segment_state_kernel(
        u_ptr, u_sb, u_sl, u_sh, u_ratio,
        w_ptr, w_sb, w_sl, w_sh, w_ratio,
        dtp_ptr, cs_ptr, lo_off, seq_ptr, seq_sb, seq_sl,
        seg_b_ptr, seg_c_ptr, seg_ref_ptr, seg_seq_ptr, seg_dst_ptr,
        dst_ptr, dst_sh, dst_sp, dst_sn,
        seqlen, nheads, nchunks, chunk, P, N,
        FORWARD: tl.constexpr, HAS_SEQ: tl.constexpr,
        DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """``dst[p, n] = sum_t wt_t u_t[p] w_t[n]`` over positions t of one chunk of one segment.

    Segment i: row ``seg_b``, chunk ``seg_c``, reference position ``seg_ref`` (absolute; its cs, or 0
    when it lies before the chunk), sequence id ``seg_seq`` (positions of other sequences are
    skipped when HAS_SEQ). FORWARD: positions ``t <= ref``, ``wt = exp(cs_ref - cs_t) dtp_t`` (a state
    at ref). Otherwise positions ``t > ref``, ``wt = exp(cs_t - cs_ref)`` (a state gradient at ref).
    """
    seg = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1).to(tl.int64)
    pid_pn = tl.program_id(2)
    num_nb = tl.cdiv(N, BLOCK_N)
    pb = pid_pn // num_nb
    nb = pid_pn % num_nb
    bb = tl.load(seg_b_ptr + seg).to(tl.int64)
    c = tl.load(seg_c_ptr + seg).to(tl.int64)
    ref = tl.load(seg_ref_ptr + seg).to(tl.int64)
    dst = tl.load(seg_dst_ptr + seg).to(tl.int64)
    chunk_start = c * chunk
    chunk_len = tl.minimum(chunk, seqlen - chunk_start)
    cs_base = ((bb * nheads + hh) * nchunks + c) * chunk
    ref_in = (ref >= chunk_start) & (ref < chunk_start + chunk_len)
    cs_ref = tl.where(ref_in, tl.load(cs_ptr + cs_base + tl.where(ref_in, ref - chunk_start, 0)), 0.0)
    lo_ref = tl.where(ref_in, tl.load(cs_ptr + lo_off + cs_base + tl.where(ref_in, ref - chunk_start, 0)), 0.0)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    p_ok = offs_p < P
    n_ok = offs_n < N
    u_base = u_ptr + bb * u_sb + (hh // u_ratio) * u_sh
    w_base = w_ptr + bb * w_sb + (hh // w_ratio) * w_sh
    target = 0
    if HAS_SEQ:
        target = tl.load(seg_seq_ptr + seg)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    if INTERPRET:  # the interpreter cannot take a tensor as a range() bound
        t0 = chunk_len * 0
        while t0 < chunk_len:
            acc = _segment_step(acc, t0, u_base, u_sl, w_base, w_sl, dtp_ptr, cs_ptr, cs_base, seq_ptr, seq_sb,
                                seq_sl, bb, chunk_start, chunk_len, ref, cs_ref, lo_ref, lo_off, target, offs_p, offs_n,
                                p_ok, n_ok, FORWARD, HAS_SEQ, DOT_DTYPE, PREC, BLOCK_T)
            t0 += BLOCK_T
    else:
        for t0 in range(0, chunk_len, BLOCK_T):
            acc = _segment_step(acc, t0, u_base, u_sl, w_base, w_sl, dtp_ptr, cs_ptr, cs_base, seq_ptr, seq_sb,
                                seq_sl, bb, chunk_start, chunk_len, ref, cs_ref, lo_ref, lo_off, target, offs_p, offs_n,
                                p_ok, n_ok, FORWARD, HAS_SEQ, DOT_DTYPE, PREC, BLOCK_T)
    tl.store(dst_ptr + dst + hh * dst_sh + offs_p[:, None] * dst_sp + offs_n[None, :] * dst_sn, acc,
             mask=p_ok[:, None] & n_ok[None, :])


@triton.jit
def _chunk_carry(cs_ptr, lo_off, seq_ptr, seq_sb, seq_sl, bb, hh, c, seqlen, nheads, nchunks, chunk,
                 HAS_SEQ: tl.constexpr):
    """Decay ``exp(cs_end)`` of chunk c, or 0 when its last sequence began inside it (no carry);
    and cs at the chunk's last position."""
    chunk_start = c * chunk
    chunk_len = tl.minimum(chunk, seqlen - chunk_start)
    at_end = ((bb * nheads + hh) * nchunks + c) * chunk + chunk_len - 1
    cs_end = tl.load(cs_ptr + at_end)
    lo_end = tl.load(cs_ptr + lo_off + at_end)
    carry = _exp_diff(cs_end, lo_end, 0.0, 0.0)
    if HAS_SEQ:
        s_end = tl.load(seq_ptr + bb * seq_sb + (chunk_start + chunk_len - 1) * seq_sl)
        s_prev = tl.load(seq_ptr + bb * seq_sb + tl.maximum(chunk_start - 1, 0) * seq_sl)
        carry = tl.where(s_end == s_prev, carry, 0.0)
    return carry, cs_end, lo_end


@triton.jit
def _state_pass_kernel(states_ptr, init_ptr, final_ptr, cs_ptr, lo_off, seq_ptr, seq_sb, seq_sl,
                       cu_ptr, vinit_ptr,
                       seqlen, nheads, nchunks, chunk, PN,
                       HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_VARLEN_INIT: tl.constexpr,
                       BLOCK: tl.constexpr, STATIC_CHUNKS: tl.constexpr):
    """Forward state passing for one (b, h) and a block of the p*n state.

    On entry slot c+1 of ``states (b, nc+1, h, p, n)`` holds the chunk state L_c; on exit slot c
    holds S_{c-1}, the state entering chunk c (slot 0: the initial state), and slot nc the last.
    """
    bb = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < PN
    slot = nheads * PN
    base = states_ptr + bb * (nchunks + 1) * slot + hh * PN + offs
    if HAS_INIT:
        s = tl.load(init_ptr + (bb * nheads + hh) * PN + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        s = tl.zeros((BLOCK,), dtype=tl.float32)
    # a range() loop, so that Triton can pipeline the loads (bounded by a constexpr under the
    # interpreter, which cannot loop to a run-time value)
    for i in range(0, STATIC_CHUNKS if STATIC_CHUNKS > 0 else nchunks):
        c = bb * 0 + i  # int64 offsets
        local = tl.load(base + (c + 1) * slot, mask=ok, other=0.0)
        tl.store(base + c * slot, s, mask=ok)
        carry, cs_end, lo_end = _chunk_carry(cs_ptr, lo_off, seq_ptr, seq_sb, seq_sl, bb, hh, c, seqlen, nheads,
                                     nchunks, chunk, HAS_SEQ)
        s = local + carry * s
        if HAS_VARLEN_INIT:
            # the chunk's last sequence j started inside it: add its initial state, decayed
            chunk_start = c * chunk
            chunk_len = tl.minimum(chunk, seqlen - chunk_start)
            j = tl.load(seq_ptr + (chunk_start + chunk_len - 1) * seq_sl).to(tl.int64)
            start = tl.load(cu_ptr + j).to(tl.int64)
            inner = start > chunk_start
            at_ref = (hh * nchunks + c) * chunk + tl.where(inner, start - 1 - chunk_start, 0)
            cs_ref = tl.where(inner, tl.load(cs_ptr + at_ref), 0.0)
            lo_ref = tl.where(inner, tl.load(cs_ptr + lo_off + at_ref), 0.0)
            fac = tl.where(start >= chunk_start, _exp_diff(cs_end, lo_end, cs_ref, lo_ref), 0.0)
            s += fac * tl.load(vinit_ptr + (j * nheads + hh) * PN + offs, mask=ok, other=0.0)
    tl.store(base + nchunks * slot, s, mask=ok)
    tl.store(final_ptr + (bb * nheads + hh) * PN + offs, s, mask=ok)


@triton.jit
def _state_pass_bwd_kernel(dstates_ptr, states_ptr, dfinal_ptr, dinit_ptr, endterm_ptr, cs_ptr, lo_off,
                           seq_ptr, seq_sb, seq_sl, seqlen, nheads, nchunks, chunk, PN,
                           HAS_DFINAL: tl.constexpr, HAS_DINIT: tl.constexpr, HAS_SEQ: tl.constexpr,
                           BLOCK: tl.constexpr, STATIC_CHUNKS: tl.constexpr):
    """Reverse state passing for one (b, h) and a block of the p*n state.

    On entry slot c of ``dstates (b, nc, h, p, n)`` holds the gradient reaching S_{c-1} directly
    from chunk c (its outputs, and sequence-final states extracted there); on exit it holds dS_c,
    the whole gradient of S_c. ``endterm (b, h, nc, blocks)`` gets the partial sums of
    ``<dS_c, exp(cs_end) S_{c-1}>`` (cs gradient at the chunk end from the carried state; the chunk
    state's own pairs are handled at their positions); ``dinit`` gets dS_{-1}.
    """
    bb = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1).to(tl.int64)
    pid_blk = tl.program_id(2)
    nblk = tl.num_programs(2)
    offs = pid_blk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < PN
    slot = nheads * PN
    dbase = dstates_ptr + bb * nchunks * slot + hh * PN + offs
    sbase = states_ptr + bb * (nchunks + 1) * slot + hh * PN + offs
    if HAS_DFINAL:
        ds = tl.load(dfinal_ptr + (bb * nheads + hh) * PN + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        ds = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, STATIC_CHUNKS if STATIC_CHUNKS > 0 else nchunks):  # (see _state_pass_kernel)
        c = nchunks - 1 - i + bb * 0
        local = tl.load(dbase + c * slot, mask=ok, other=0.0)
        tl.store(dbase + c * slot, ds, mask=ok)
        s_prev = tl.load(sbase + c * slot, mask=ok, other=0.0)
        carry, cs_end, lo_end = _chunk_carry(cs_ptr, lo_off, seq_ptr, seq_sb, seq_sl, bb, hh, c, seqlen, nheads,
                                     nchunks, chunk, HAS_SEQ)
        tl.store(endterm_ptr + ((bb * nheads + hh) * nchunks + c) * nblk + pid_blk,
                 carry * tl.sum(ds * s_prev, axis=0))
        ds = local + carry * ds
    if HAS_DINIT:
        tl.store(dinit_ptr + (bb * nheads + hh) * PN + offs, ds, mask=ok)


@triton.jit
def _scan_step(acc, carry, k0, q, q2, rows, row_ok, cs_r, lo_r, lo_off, seq_r, k_base, k_sl, v_base, v_sl, offs_d, d_ok,
               offs_v, v_ok, k2_base, k2_sl, offs_d2, d2_ok, dai_ptr, dai_ok, cb_base, chunk,
               dtp_ptr, cs_ptr, cs_base, seq_base, seq_sl, chunk_start, chunk_len,
               REVERSE: tl.constexpr, COL_SCALE: tl.constexpr, HAS_SEQ: tl.constexpr, INTRA_DA: tl.constexpr,
               HAS_CB: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, BLOCK_K: tl.constexpr):
    """One BLOCK_K block of columns of the intra-chunk term of ``_scan_kernel``.

    INTRA_DA (causal only): also the intra-chunk part of d(A dt) in its cancellation-free form,
    ``da_k = sum_{t >= k} sum_{s < k} G_ts`` with ``G_ts = scores_ts (q2_t . k2_s)``; ``carry`` holds
    each row's sum over the earlier column blocks, ``dai`` gets this row block's share for the
    columns k of this block.

    HAS_CB: the group's precomputed ``C B^T`` of the chunk (``_cb_kernel``; entry (t, s) for t >= s)
    replaces a dot per head: as ``q_t . k_s`` (its transpose in reverse scans), or with INTRA_DA as
    ``q2_t . k2_s``."""
    cols = k0 + tl.arange(0, BLOCK_K)
    col_ok = cols < chunk_len
    pos_c = chunk_start + cols
    if HAS_CB and not INTRA_DA:
        if REVERSE:  # rows s, columns t >= s: C_t . B_s = CB[t, s]
            scores = tl.load(cb_base + cols[None, :] * chunk + rows[:, None],
                             mask=(cols[None, :] >= rows[:, None]) & col_ok[None, :] & row_ok[:, None], other=0.0)
        else:  # rows t, columns s <= t: CB[t, s]
            scores = tl.load(cb_base + rows[:, None] * chunk + cols[None, :],
                             mask=(cols[None, :] <= rows[:, None]) & col_ok[None, :] & row_ok[:, None], other=0.0)
    else:
        kt = tl.load(k_base + pos_c[None, :] * k_sl + offs_d[:, None], mask=d_ok[:, None] & col_ok[None, :],
                     other=0.0).to(DOT_DTYPE)
        scores = tl.dot(q, kt, input_precision=PREC)
    cs_c = tl.load(cs_ptr + cs_base + cols, mask=col_ok, other=0.0)
    lo_c = tl.load(cs_ptr + lo_off + cs_base + cols, mask=col_ok, other=0.0)
    if REVERSE:
        w = _exp_diff(cs_c[None, :], lo_c[None, :], cs_r[:, None], lo_r[:, None])
        keep = cols[None, :] >= rows[:, None]
    else:
        w = _exp_diff(cs_r[:, None], lo_r[:, None], cs_c[None, :], lo_c[None, :])
        keep = cols[None, :] <= rows[:, None]
    if COL_SCALE:
        w = w * tl.load(dtp_ptr + cs_base + cols, mask=col_ok, other=0.0)[None, :]
    keep = keep & col_ok[None, :] & row_ok[:, None]
    if HAS_SEQ:
        seq_c = tl.load(seq_base + pos_c * seq_sl, mask=col_ok, other=-2)
        keep = keep & (seq_c[None, :] == seq_r[:, None])
    scores = tl.where(keep, scores * w, 0.0)
    if INTRA_DA:
        if HAS_CB:  # q2 . k2 = C_t . B_s = CB[t, s] (causal rows t, columns s <= t)
            qk2 = tl.load(cb_base + rows[:, None] * chunk + cols[None, :],
                          mask=(cols[None, :] <= rows[:, None]) & col_ok[None, :] & row_ok[:, None], other=0.0)
        else:
            k2t = tl.load(k2_base + pos_c[None, :] * k2_sl + offs_d2[:, None],
                          mask=d2_ok[:, None] & col_ok[None, :], other=0.0).to(DOT_DTYPE)
            qk2 = tl.dot(q2, k2t, input_precision=PREC)
        # float64 sums: da_k adds up to Q^2/4 pair terms of both signs
        G = (scores * qk2).to(tl.float64)
        before = tl.cumsum(G, axis=1) - G + carry[:, None]
        share = tl.sum(tl.where((rows[:, None] >= cols[None, :]) & row_ok[:, None], before, 0.0), axis=0)
        tl.store(dai_ptr + cols, share.to(tl.float32), mask=col_ok & dai_ok)
        carry += tl.sum(G, axis=1)
    vv = tl.load(v_base + pos_c[:, None] * v_sl + offs_v[None, :], mask=col_ok[:, None] & v_ok[None, :],
                 other=0.0).to(DOT_DTYPE)
    acc += tl.dot(scores.to(DOT_DTYPE), vv, input_precision=PREC)
    return acc, carry


@triton.jit
def _scan_head(
        hh, bb, c, pid_m, pid_v, num_m, chunk_start, chunk_len, rows, row_ok, pos_r, offs_v, v_ok,
        q_ptr, q_sb, q_sl, q_sh, q_ratio,
        k_ptr, k_sb, k_sl, k_sh, k_ratio,
        v_ptr, v_sb, v_sl, v_sh, v_ratio,
        q2_ptr, q2_sb, q2_sl, q2_sh, q2_ratio,
        k2_ptr, k2_sb, k2_sl, k2_sh, k2_ratio, dai_ptr, cb_ptr, cb_ratio,
        st_ptr, st_sb, st_sc, st_sh, st_sq, st_sv,
        ext_ptr, ext_ss, ext_sh, ext_sq, ext_sv,
        dtp_ptr, cs_ptr, lo_off, seq_ptr, seq_sb, seq_sl, cu_ptr,
        nheads, nchunks, chunk, DQK, DV, D2,
        REVERSE: tl.constexpr, SPLIT: tl.constexpr, INTRA_DA: tl.constexpr, COL_SCALE: tl.constexpr,
        HAS_SEQ: tl.constexpr, HAS_EXT: tl.constexpr, HAS_CB: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
        INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DQK: tl.constexpr,
        BLOCK_V: tl.constexpr, BLOCK_D2: tl.constexpr):
    """The three accumulators (intra-chunk, state, per-sequence matrices) of one head's rows."""
    cs_base = ((bb * nheads + hh) * nchunks + c) * chunk
    cb_base = cb_ptr + ((bb * nchunks + c) * (nheads // cb_ratio) + hh // cb_ratio) * chunk * chunk
    cs_r = tl.load(cs_ptr + cs_base + rows, mask=row_ok, other=0.0)
    lo_r = tl.load(cs_ptr + lo_off + cs_base + rows, mask=row_ok, other=0.0)
    seq_base = seq_ptr + bb * seq_sb
    seq_r = rows * 0
    if HAS_SEQ:
        seq_r = tl.load(seq_base + pos_r * seq_sl, mask=row_ok, other=-1)
    offs_d = tl.arange(0, BLOCK_DQK)
    d_ok = offs_d < DQK
    offs_d2 = tl.arange(0, BLOCK_D2)
    d2_ok = offs_d2 < D2
    q = tl.load(q_ptr + bb * q_sb + (hh // q_ratio) * q_sh + pos_r[:, None] * q_sl + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
    end_pos = chunk_start + chunk_len - 1

    # state term: the state entering (causal) / the gradient leaving (reverse) the chunk
    st = tl.load(st_ptr + bb * st_sb + c * st_sc + hh * st_sh + offs_d[:, None] * st_sq + offs_v[None, :] * st_sv,
                 mask=d_ok[:, None] & v_ok[None, :], other=0.0).to(DOT_DTYPE)
    if REVERSE:
        cs_end = tl.load(cs_ptr + cs_base + chunk_len - 1)
        lo_end = tl.load(cs_ptr + lo_off + cs_base + chunk_len - 1)
        fac = _exp_diff(cs_end, lo_end, cs_r, lo_r)
        if HAS_SEQ:
            fac = tl.where(seq_r == tl.load(seq_base + end_pos * seq_sl), fac, 0.0)
    else:
        fac = _exp_diff(cs_r, lo_r, 0.0, 0.0)
        if HAS_SEQ:
            fac = tl.where(seq_r == tl.load(seq_base + tl.maximum(chunk_start - 1, 0) * seq_sl), fac, 0.0)
    acc_st = tl.dot(q, st, input_precision=PREC) * fac[:, None]
    acc_ex = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)

    if HAS_EXT:
        # per-sequence matrices of the cu_seqlens sequences met by these rows (seq_idx = index j)
        first = tl.minimum(pid_m * BLOCK_M, chunk_len - 1)
        last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, chunk_len) - 1
        j0 = tl.load(seq_base + (chunk_start + first) * seq_sl).to(tl.int64)
        j1 = tl.load(seq_base + (chunk_start + last) * seq_sl).to(tl.int64)
        j = j0
        while j <= j1:
            if REVERSE:
                edge = tl.load(cu_ptr + j + 1).to(tl.int64) - 1
                use = edge <= end_pos
            else:
                edge = tl.load(cu_ptr + j).to(tl.int64) - 1
                use = edge >= chunk_start - 1
            inner = (edge >= chunk_start) & (edge <= end_pos)
            at_edge = cs_base + tl.where(inner, edge - chunk_start, 0)
            cs_edge = tl.where(inner, tl.load(cs_ptr + at_edge), 0.0)
            lo_edge = tl.where(inner, tl.load(cs_ptr + lo_off + at_edge), 0.0)
            if REVERSE:
                fac = _exp_diff(cs_edge, lo_edge, cs_r, lo_r)
            else:
                fac = _exp_diff(cs_r, lo_r, cs_edge, lo_edge)
            fac = tl.where((seq_r == j) & use, fac, 0.0)
            e = tl.load(ext_ptr + j * ext_ss + hh * ext_sh + offs_d[:, None] * ext_sq + offs_v[None, :] * ext_sv,
                        mask=d_ok[:, None] & v_ok[None, :], other=0.0).to(DOT_DTYPE)
            acc_ex += tl.dot(q, e, input_precision=PREC) * fac[:, None]
            j += 1

    # intra-chunk term; SPLIT epilogues need the three terms apart (for the cs gradient)
    if SPLIT:
        acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    else:
        acc = acc_st + acc_ex
    carry = tl.zeros((BLOCK_M,), dtype=tl.float64)
    q2 = q
    if INTRA_DA:
        if not HAS_CB:
            q2 = tl.load(q2_ptr + bb * q2_sb + (hh // q2_ratio) * q2_sh + pos_r[:, None] * q2_sl + offs_d2[None, :],
                         mask=row_ok[:, None] & d2_ok[None, :], other=0.0).to(DOT_DTYPE)
    k_base = k_ptr + bb * k_sb + (hh // k_ratio) * k_sh
    v_base = v_ptr + bb * v_sb + (hh // v_ratio) * v_sh
    if REVERSE:
        k_lo = pid_m * BLOCK_M
        k_hi = chunk_len
    else:
        k_lo = 0
        k_hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M, chunk_len)
    if INTERPRET:
        k0 = k_lo
        while k0 < k_hi:
            acc, carry = _scan_step(
                acc, carry, k0, q, q2, rows, row_ok, cs_r, lo_r, lo_off, seq_r, k_base, k_sl, v_base, v_sl, offs_d, d_ok,
                offs_v, v_ok, k2_ptr + bb * k2_sb + (hh // k2_ratio) * k2_sh, k2_sl, offs_d2, d2_ok,
                dai_ptr + cs_base * num_m + pid_m * chunk, pid_v == 0, cb_base, chunk,
                dtp_ptr, cs_ptr, cs_base, seq_base, seq_sl, chunk_start, chunk_len,
                REVERSE, COL_SCALE, HAS_SEQ, INTRA_DA, HAS_CB, DOT_DTYPE, PREC, BLOCK_K)
            k0 += BLOCK_K
    else:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            acc, carry = _scan_step(
                acc, carry, k0, q, q2, rows, row_ok, cs_r, lo_r, lo_off, seq_r, k_base, k_sl, v_base, v_sl, offs_d, d_ok,
                offs_v, v_ok, k2_ptr + bb * k2_sb + (hh // k2_ratio) * k2_sh, k2_sl, offs_d2, d2_ok,
                dai_ptr + cs_base * num_m + pid_m * chunk, pid_v == 0, cb_base, chunk,
                dtp_ptr, cs_ptr, cs_base, seq_base, seq_sl, chunk_start, chunk_len,
                REVERSE, COL_SCALE, HAS_SEQ, INTRA_DA, HAS_CB, DOT_DTYPE, PREC, BLOCK_K)

    return acc, acc_st, acc_ex


@triton.jit
def _scan_epilogue(
        acc, acc_st, acc_ex, hh, bb, bc, pid_m, num_m, rows, row_ok, pos_r, offs_v, v_ok, cs_base, v_base, v_sl,
        x_ptr, z_ptr, dout_ptr, hp_sb, hp_sl, hp_sh, D_ptr, D_sh, D_sp, o1_ptr, o1_sb, o1_sl, o1_sh, o2_ptr,
        vec1_ptr, vec2_ptr, dpart_ptr, dtp_ptr, nheads, DV,
        SPLIT: tl.constexpr, ROW_SCALE: tl.constexpr, HAS_EXT: tl.constexpr, HAS_D: tl.constexpr,
        HAS_Z: tl.constexpr, EPILOGUE: tl.constexpr):
    """Accumulators -> outputs: 0 out; 1 dy, dz, d(cs) at rows, dD partials; 2 dx, ddtp, d(cs); 3 plain."""
    mask2 = row_ok[:, None] & v_ok[None, :]
    hp = bb * hp_sb + pos_r[:, None] * hp_sl + hh * hp_sh + offs_v[None, :]
    if EPILOGUE == 0 or EPILOGUE == 1:
        # out = (acc + D x) * silu(z)            | backward: dy, dz, d(cs) at rows, dD partials
        xv = tl.load(x_ptr + hp, mask=mask2, other=0.0).to(tl.float32)
        if SPLIT:
            y = acc + acc_st + acc_ex
        else:
            y = acc
        if HAS_D:
            Dv = tl.load(D_ptr + hh * D_sh + offs_v * D_sp, mask=v_ok, other=0.0).to(tl.float32)
            y = y + Dv[None, :] * xv
        if EPILOGUE == 0:
            if HAS_Z:
                zv = tl.load(z_ptr + hp, mask=mask2, other=0.0).to(tl.float32)
                y = y * zv * tl.sigmoid(zv)
            tl.store(o1_ptr + hp, y.to(o1_ptr.dtype.element_ty), mask=mask2)
        else:
            do = tl.load(dout_ptr + hp, mask=mask2, other=0.0).to(tl.float32)
            if HAS_Z:
                zv = tl.load(z_ptr + hp, mask=mask2, other=0.0).to(tl.float32)
                sig = tl.sigmoid(zv)
                dz = do * y * sig * (1.0 + zv * (1.0 - sig))
                tl.store(o2_ptr + hp, dz.to(o2_ptr.dtype.element_ty), mask=mask2)
                dy = do * zv * sig
            else:
                dy = do
            dy = tl.where(mask2, dy, 0.0)
            tl.store(o1_ptr + bb * o1_sb + pos_r[:, None] * o1_sl + hh * o1_sh + offs_v[None, :],
                     dy.to(o1_ptr.dtype.element_ty), mask=mask2)
            tl.store(vec1_ptr + cs_base + rows, tl.sum(dy * acc_st, axis=1), mask=row_ok)
            if HAS_EXT:  # pairs with a sequence's start, summed per sequence (see backward)
                tl.store(vec2_ptr + cs_base + rows, tl.sum(dy * acc_ex, axis=1), mask=row_ok)
            if HAS_D:
                tl.store(dpart_ptr + ((bc * num_m + pid_m) * nheads + hh) * DV + offs_v,
                         tl.sum(dy * xv, axis=0), mask=v_ok)
    elif EPILOGUE == 2:
        # dx = dtp R + D dy; ddtp (direct) = x . R; d(cs) at rows -= dtp x . R
        xv = tl.load(x_ptr + hp, mask=mask2, other=0.0).to(tl.float32)
        dtp_r = tl.load(dtp_ptr + cs_base + rows, mask=row_ok, other=0.0)
        R = acc + acc_st + acc_ex
        dx = R * dtp_r[:, None]
        if HAS_D:
            Dv = tl.load(D_ptr + hh * D_sh + offs_v * D_sp, mask=v_ok, other=0.0).to(tl.float32)
            dyv = tl.load(v_base + pos_r[:, None] * v_sl + offs_v[None, :], mask=mask2, other=0.0).to(tl.float32)
            dx += Dv[None, :] * dyv
        tl.store(o1_ptr + bb * o1_sb + pos_r[:, None] * o1_sl + hh * o1_sh + offs_v[None, :],
                 dx.to(o1_ptr.dtype.element_ty), mask=mask2)
        tl.store(vec2_ptr + cs_base + rows, tl.sum(xv * R, axis=1), mask=row_ok)
        # key side of d(cs) for the pairs (chunk end or sequence end, row): booked in forward form
        tl.store(dpart_ptr + cs_base + rows, dtp_r * tl.sum(xv * acc_st, axis=1), mask=row_ok)
        if HAS_EXT:  # pairs with a sequence's end, summed per sequence (see backward)
            tl.store(vec1_ptr + cs_base + rows, dtp_r * tl.sum(xv * acc_ex, axis=1), mask=row_ok)
    else:
        if ROW_SCALE:
            acc = acc * tl.load(dtp_ptr + cs_base + rows, mask=row_ok, other=0.0)[:, None]
        tl.store(o1_ptr + bb * o1_sb + pos_r[:, None] * o1_sl + hh * o1_sh + offs_v[None, :],
                 acc.to(o1_ptr.dtype.element_ty), mask=mask2)


@triton.jit
def _group_head_step(total, ROW_SCALE: tl.constexpr,
        hh, bb, c, pid_m, pid_v, num_m, chunk_start, chunk_len, rows, row_ok, pos_r, offs_v, v_ok,
        q_ptr, q_sb, q_sl, q_sh, q_ratio,
        k_ptr, k_sb, k_sl, k_sh, k_ratio,
        v_ptr, v_sb, v_sl, v_sh, v_ratio,
        q2_ptr, q2_sb, q2_sl, q2_sh, q2_ratio,
        k2_ptr, k2_sb, k2_sl, k2_sh, k2_ratio, dai_ptr, cb_ptr, cb_ratio,
        st_ptr, st_sb, st_sc, st_sh, st_sq, st_sv,
        ext_ptr, ext_ss, ext_sh, ext_sq, ext_sv,
        dtp_ptr, cs_ptr, lo_off, seq_ptr, seq_sb, seq_sl, cu_ptr,
        nheads, nchunks, chunk, DQK, DV, D2,
        REVERSE: tl.constexpr, SPLIT: tl.constexpr, INTRA_DA: tl.constexpr, COL_SCALE: tl.constexpr,
        HAS_SEQ: tl.constexpr, HAS_EXT: tl.constexpr, HAS_CB: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
        INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DQK: tl.constexpr,
        BLOCK_V: tl.constexpr, BLOCK_D2: tl.constexpr):
    """One head's share of a group-summed plain scan (dB, dC)."""
    acc, acc_st, acc_ex = _scan_head(
        hh, bb, c, pid_m, pid_v, num_m, chunk_start, chunk_len, rows, row_ok, pos_r, offs_v, v_ok,
        q_ptr, q_sb, q_sl, q_sh, q_ratio, k_ptr, k_sb, k_sl, k_sh, k_ratio, v_ptr, v_sb, v_sl, v_sh, v_ratio,
        q2_ptr, q2_sb, q2_sl, q2_sh, q2_ratio, k2_ptr, k2_sb, k2_sl, k2_sh, k2_ratio, dai_ptr, cb_ptr, cb_ratio,
        st_ptr, st_sb, st_sc, st_sh, st_sq, st_sv, ext_ptr, ext_ss, ext_sh, ext_sq, ext_sv,
        dtp_ptr, cs_ptr, lo_off, seq_ptr, seq_sb, seq_sl, cu_ptr, nheads, nchunks, chunk, DQK, DV, D2,
        REVERSE, SPLIT, INTRA_DA, COL_SCALE, HAS_SEQ, HAS_EXT, HAS_CB, DOT_DTYPE, PREC, INTERPRET,
        BLOCK_M, BLOCK_K, BLOCK_DQK, BLOCK_V, BLOCK_D2)
    if SPLIT:
        acc = acc + acc_st + acc_ex
    if ROW_SCALE:
        cs_base = ((bb * nheads + hh) * nchunks + c) * chunk
        acc = acc * tl.load(dtp_ptr + cs_base + rows, mask=row_ok, other=0.0)[:, None]
    return total + acc


@triton.jit
def _scan_kernel(
        q_ptr, q_sb, q_sl, q_sh, q_ratio,
        k_ptr, k_sb, k_sl, k_sh, k_ratio,
        v_ptr, v_sb, v_sl, v_sh, v_ratio,
        q2_ptr, q2_sb, q2_sl, q2_sh, q2_ratio,
        k2_ptr, k2_sb, k2_sl, k2_sh, k2_ratio, dai_ptr, cb_ptr, cb_ratio,
        st_ptr, st_sb, st_sc, st_sh, st_sq, st_sv,
        ext_ptr, ext_ss, ext_sh, ext_sq, ext_sv,
        dtp_ptr, cs_ptr, lo_off, seq_ptr, seq_sb, seq_sl, cu_ptr,
        x_ptr, z_ptr, dout_ptr, hp_sb, hp_sl, hp_sh,
        D_ptr, D_sh, D_sp,
        o1_ptr, o1_sb, o1_sl, o1_sh, o2_ptr,
        vec1_ptr, vec2_ptr, dpart_ptr,
        seqlen, nheads, nchunks, chunk, DQK, DV, D2,
        REVERSE: tl.constexpr, SPLIT: tl.constexpr, INTRA_DA: tl.constexpr, COL_SCALE: tl.constexpr, ROW_SCALE: tl.constexpr,
        HAS_SEQ: tl.constexpr, HAS_EXT: tl.constexpr, HAS_CB: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
        EPILOGUE: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_D2: tl.constexpr, GROUP_HEADS: tl.constexpr, heads_per_group, STATIC_HEADS: tl.constexpr):
    """One (b, chunk, h), BLOCK_M rows, BLOCK_V value columns of a masked chunk scan.

    Causal (REVERSE=False), row t: ``acc_t = sum_{s<=t} (q_t.k_s) exp(cs_t - cs_s) [dtp_s] v_s
    + exp(cs_t) q_t st_c`` (rows continuing the previous chunk's sequence) ``+ sum_j exp(cs_t -
    cs_{start_j - 1}) q_t ext_j`` (rows of cu_seqlens sequences j starting in the chunk).
    Reverse, row s: ``acc_s = sum_{t>=s} (q_s.k_t) exp(cs_t - cs_s) v_t + exp(cs_end - cs_s) q_s st_c``
    (rows of the chunk's last sequence) ``+ sum_j exp(cs_{end_j} - cs_s) q_s ext_j`` (rows of
    sequences j ending in the chunk). ``st``/``ext`` are read as (DQK x DV) matrices by strides.
    Pairs of different sequences never interact. The epilogue turns acc into outputs.
    """
    # Row blocks vary fastest: the blocks of one (b, chunk, head) run together and share its state,
    # x, cs and C B^T tiles through L2 (with row blocks slowest, each was fetched once per block).
    num_m = tl.cdiv(chunk, BLOCK_M)
    pid = tl.program_id(0).to(tl.int64)
    pid_m = (pid % num_m).to(tl.int32)
    pid = pid // num_m
    pid_v = tl.program_id(1)
    if GROUP_HEADS:
        slots = nheads // heads_per_group
    else:
        slots = nheads
    slot, c, bb, chunk_start, chunk_len = _chunk_program(pid, slots, nchunks, chunk, seqlen)
    bc = bb * nchunks + c
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < chunk_len
    pos_r = chunk_start + rows
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = offs_v < DV
    if GROUP_HEADS:
        # dB / dC: sum the heads of group ``slot`` here instead of writing per-head partials
        total = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
        h0 = slot * heads_per_group
        # (a constexpr bound under the interpreter, which cannot loop to a run-time value)
        for i in range(0, STATIC_HEADS if STATIC_HEADS > 0 else heads_per_group):
            total = _group_head_step(total, ROW_SCALE,
        h0 + i, bb, c, pid_m, pid_v, num_m, chunk_start, chunk_len, rows, row_ok, pos_r, offs_v, v_ok,
        q_ptr, q_sb, q_sl, q_sh, q_ratio, k_ptr, k_sb, k_sl, k_sh, k_ratio, v_ptr, v_sb, v_sl, v_sh, v_ratio,
        q2_ptr, q2_sb, q2_sl, q2_sh, q2_ratio, k2_ptr, k2_sb, k2_sl, k2_sh, k2_ratio, dai_ptr, cb_ptr, cb_ratio,
        st_ptr, st_sb, st_sc, st_sh, st_sq, st_sv, ext_ptr, ext_ss, ext_sh, ext_sq, ext_sv,
        dtp_ptr, cs_ptr, lo_off, seq_ptr, seq_sb, seq_sl, cu_ptr, nheads, nchunks, chunk, DQK, DV, D2,
        REVERSE, SPLIT, INTRA_DA, COL_SCALE, HAS_SEQ, HAS_EXT, HAS_CB, DOT_DTYPE, PREC, INTERPRET,
        BLOCK_M, BLOCK_K, BLOCK_DQK, BLOCK_V, BLOCK_D2)
        tl.store(o1_ptr + bb * o1_sb + pos_r[:, None] * o1_sl + slot * o1_sh + offs_v[None, :],
                 total.to(o1_ptr.dtype.element_ty), mask=row_ok[:, None] & v_ok[None, :])
    else:
        hh = slot
        acc, acc_st, acc_ex = _scan_head(
            hh, bb, c, pid_m, pid_v, num_m, chunk_start, chunk_len, rows, row_ok, pos_r, offs_v, v_ok,
            q_ptr, q_sb, q_sl, q_sh, q_ratio, k_ptr, k_sb, k_sl, k_sh, k_ratio, v_ptr, v_sb, v_sl, v_sh, v_ratio,
            q2_ptr, q2_sb, q2_sl, q2_sh, q2_ratio, k2_ptr, k2_sb, k2_sl, k2_sh, k2_ratio, dai_ptr, cb_ptr, cb_ratio,
            st_ptr, st_sb, st_sc, st_sh, st_sq, st_sv, ext_ptr, ext_ss, ext_sh, ext_sq, ext_sv,
            dtp_ptr, cs_ptr, lo_off, seq_ptr, seq_sb, seq_sl, cu_ptr, nheads, nchunks, chunk, DQK, DV, D2,
            REVERSE, SPLIT, INTRA_DA, COL_SCALE, HAS_SEQ, HAS_EXT, HAS_CB, DOT_DTYPE, PREC, INTERPRET,
            BLOCK_M, BLOCK_K, BLOCK_DQK, BLOCK_V, BLOCK_D2)
        cs_base = ((bb * nheads + hh) * nchunks + c) * chunk
        v_base = v_ptr + bb * v_sb + (hh // v_ratio) * v_sh
        _scan_epilogue(
            acc, acc_st, acc_ex, hh, bb, bc, pid_m, num_m, rows, row_ok, pos_r, offs_v, v_ok, cs_base, v_base, v_sl,
            x_ptr, z_ptr, dout_ptr, hp_sb, hp_sl, hp_sh, D_ptr, D_sh, D_sp, o1_ptr, o1_sb, o1_sl, o1_sh, o2_ptr,
            vec1_ptr, vec2_ptr, dpart_ptr, dtp_ptr, nheads, DV,
            SPLIT, ROW_SCALE, HAS_EXT, HAS_D, HAS_Z, EPILOGUE)


# ----------------------------------------------------------------------------- launchers
def _operand(t: torch.Tensor, nheads: int):
    """(ptr, batch stride, seq stride, head stride, heads per slice) of a (b, l, heads, dim) tensor."""
    return (t, t.stride(0), t.stride(1), t.stride(2), nheads // t.shape[2])


def _launch_dt(dt, dt_bias, A, dtp, cs, chunk_size, dt_softplus, dt_min, dt_max):
    b, l, h = dt.shape
    nc = _nchunks(l, chunk_size)
    clamp = dt_min > 0.0 or dt_max < math.inf
    _dt_kernel[(b * h * nc,)](
        dt, dt.stride(0), dt.stride(1), dt.stride(2), dt if dt_bias is None else dt_bias, A, dtp, cs, _lo_off(cs),
        l, h, nc, chunk_size, float(dt_min), float(min(dt_max, 3.0e38)),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), CLAMP=clamp,
        BLOCK_Q=triton.next_power_of_2(chunk_size))


def _launch_segments(u, w, dtp, cs, seq_idx, segs, dst, dst_strides, forward: bool, seqlen: int,
                     chunk_size: int, dtype: torch.dtype, input_dtype: torch.dtype | None = None,
                     stage: str = "ssd.segments"):
    """Run ``_segment_state_kernel`` over ``segs = (seg_b, seg_c, seg_ref, seg_seq, seg_dst)``."""
    nseg = segs[0].numel()
    if nseg == 0:
        return
    b, h, nc, _ = cs.shape
    P, N = u.shape[3], w.shape[3]
    dot_dtype, prec = _dot_types(dtype, input_dtype or dtype)
    cfg = _SEGMENT_CFG
    bp = min(_p2(P), cfg["BLOCK_P"])
    bn = min(_p2(N), cfg["BLOCK_N"])
    bt = min(_p2(chunk_size), cfg["BLOCK_T"])
    seq = dtp if seq_idx is None else seq_idx
    grid = (nseg, h, triton.cdiv(P, bp) * triton.cdiv(N, bn))
    with step_range(stage):
        _segment_state_kernel[grid](
            *_operand(u, h), *_operand(w, h), dtp, cs, _lo_off(cs), seq, seq.stride(0), seq.stride(-1),
            *segs, dst, *dst_strides, seqlen, h, nc, chunk_size, P, N,
            FORWARD=forward, HAS_SEQ=seq_idx is not None, DOT_DTYPE=dot_dtype, PREC=prec, INTERPRET=_INTERPRET,
            BLOCK_T=bt, BLOCK_P=bp, BLOCK_N=bn, num_warps=cfg["num_warps"],
            **({"num_stages": cfg["num_stages"]} if "num_stages" in cfg else {}))


def _launch_cb(C, B, chunk_size: int, input_dtype: torch.dtype):
    """``(b, nc, g, Q, Q)`` float32: each chunk's ``C B^T`` per group (see ``_cb_kernel``), or None
    when SSMKERNELS_SSD_PRECOMPUTE_CB=0 (every head then computes its own dot)."""
    if not config.ssd_precompute_cb():
        return None
    b, l, g, n = C.shape
    nc = _nchunks(l, chunk_size)
    cb = torch.empty(b, nc, g, chunk_size, chunk_size, device=C.device, dtype=torch.float32)
    bm = min(_p2(chunk_size), _CB_CFG["BLOCK_M"])
    dot_dtype, prec = _dot_types(C.dtype, input_dtype)
    nb = triton.cdiv(chunk_size, bm)
    _cb_kernel[(b * nc * g, nb, nb)](
        C, C.stride(0), C.stride(1), C.stride(2), B, B.stride(0), B.stride(1), B.stride(2), cb,
        l, g, nc, chunk_size, n, DOT_DTYPE=dot_dtype, PREC=prec, BLOCK_M=bm, BLOCK_N=_p2(n),
        num_warps=_CB_CFG["num_warps"])
    return cb


def _launch_scan(q, k, v, st, st_strides, ext, ext_strides, dtp, cs, seq_idx, cu_seqlens, *,
                 reverse, col_scale=False, row_scale=False, epilogue, x=None, z=None, dout=None,
                 D=None, o1=None, o2=None, vec1=None, vec2=None, dpart=None, dtype, full_value,
                 q2=None, k2=None, dai=None, group_heads=False, input_dtype=None, cb=None, stage="ssd.scan"):
    b, l, h, _ = v.shape[0], v.shape[1], cs.shape[1], None
    nc = cs.shape[2]
    chunk_size = cs.shape[3]
    DQK, DV = q.shape[3], v.shape[3]
    D2 = DQK if q2 is None else q2.shape[3]
    cfg = _scan_cfg(dtype)
    bm = _scan_block_m(chunk_size, dtype)
    bk = min(_p2(chunk_size), cfg["BLOCK_K"])
    dot_dtype, prec = _dot_types(dtype, input_dtype or dtype)
    bv_max = cfg["BLOCK_V_MAX_tf32x3"] if prec == "tf32x3" else cfg["BLOCK_V_MAX"]
    bv = _p2(DV) if full_value else min(_p2(DV), bv_max)
    seq = cs if seq_idx is None else seq_idx
    dummy = cs
    hp = x if x is not None else (dout if dout is not None else o1)
    heads_per_group = h // o1.shape[2] if group_heads else 1
    grid = (b * nc * (h // heads_per_group) * triton.cdiv(chunk_size, bm), triton.cdiv(DV, bv))
    with step_range(stage):
        _scan_kernel[grid](
            *_operand(q, h), *_operand(k, h), *_operand(v, h),
            *_operand(q if q2 is None else q2, h), *_operand(k if k2 is None else k2, h),
            dummy if dai is None else dai, dummy if cb is None else cb, 1 if cb is None else h // cb.shape[2],
            st, *st_strides, dummy if ext is None else ext, *(ext_strides or (0, 0, 0, 0)),
            dtp, cs, _lo_off(cs), seq, seq.stride(0), seq.stride(-1), dummy if cu_seqlens is None else cu_seqlens,
            dummy if x is None else x, dummy if z is None else z, dummy if dout is None else dout,
            hp.stride(0), hp.stride(1), hp.stride(2),
            dummy if D is None else D, *_D_strides(D),
            o1, o1.stride(0), o1.stride(1), o1.stride(2), dummy if o2 is None else o2,
            dummy if vec1 is None else vec1, dummy if vec2 is None else vec2, dummy if dpart is None else dpart,
            l, h, nc, chunk_size, DQK, DV, D2,
            REVERSE=reverse, SPLIT=epilogue in (_EPI_DZ, _EPI_DX), INTRA_DA=dai is not None, COL_SCALE=col_scale, ROW_SCALE=row_scale, HAS_SEQ=seq_idx is not None,
            HAS_EXT=ext is not None, HAS_CB=cb is not None, HAS_D=D is not None, HAS_Z=z is not None, EPILOGUE=epilogue,
            DOT_DTYPE=dot_dtype, PREC=prec, INTERPRET=_INTERPRET, BLOCK_M=bm, BLOCK_K=bk, BLOCK_DQK=_p2(DQK), BLOCK_V=bv, BLOCK_D2=_p2(D2),
            GROUP_HEADS=group_heads, heads_per_group=heads_per_group,
            STATIC_HEADS=heads_per_group if _INTERPRET else 0,
            num_warps=cfg["num_warps_tf32x3"] if prec == "tf32x3" else cfg["num_warps"],
            **({"num_stages": cfg["num_stages"]} if "num_stages" in cfg else {}))
    return grid


def _D_strides(D):
    if D is None:
        return 0, 0
    return (D.stride(0), 0) if D.dim() == 1 else (D.stride(0), D.stride(1))


def _pass_grid(b, h, PN):
    block = min(_PASS_CFG["BLOCK"], _p2(PN))
    return (b, h, triton.cdiv(PN, block)), block


# ----------------------------------------------------------------------------- sequence helpers
def _seq_idx_from_cu(cu_seqlens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """(1, l) int32: position -> index of its sequence (empty sequences own no position)."""
    pos = torch.arange(seqlen, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return (torch.searchsorted(cu_seqlens, pos, right=True) - 1).to(torch.int32)[None]


def _chunk_segments(seq_idx, b, l, h, p, n, nc, chunk_size, device, shift_slots: bool, at_end: bool):
    """Segments (one per (b, chunk)) for the chunk states (at_end) or the state gradients (start)."""
    idx = torch.arange(b * nc, device=device, dtype=torch.int64)
    seg_b, seg_c = idx // nc, idx % nc
    if at_end:
        ref = torch.clamp((seg_c + 1) * chunk_size, max=l) - 1
        member = ref
    else:
        ref = seg_c * chunk_size - 1
        member = torch.clamp(ref, min=0)
    seg_seq = seq_idx[seg_b, member].to(torch.int64) if seq_idx is not None else torch.zeros_like(idx)
    slots = nc + 1 if shift_slots else nc
    dst = (seg_b * slots + seg_c + (1 if shift_slots else 0)) * (h * p * n)
    return seg_b, seg_c, ref, seg_seq, dst


class _Varlen:
    """Per-sequence bookkeeping of a cu_seqlens call (b == 1), all on the device, no host sync."""

    def __init__(self, cu_seqlens, l, nc, chunk_size, cs):
        cu = cu_seqlens.to(torch.int64)
        self.start, self.end = cu[:-1], cu[1:]
        self.count = self.start.numel()
        self.nonempty = self.end > self.start
        last = torch.clamp(self.end - 1, min=0)
        self.end_chunk = torch.clamp(last // chunk_size, max=max(nc - 1, 0))
        self.start_chunk = torch.clamp(self.start // chunk_size, max=max(nc - 1, 0))
        cs_flat = _cs64(cs)[0].reshape(cs.shape[1], -1)  # (h, nc * Q) float64: position t at column t
        self.cs_end = cs_flat[:, last].t()  # (s, h)
        self.started_before = self.start < self.end_chunk * chunk_size
        inner = self.start > self.start_chunk * chunk_size
        self.start_inner = inner & self.nonempty
        ref = torch.where(inner[:, None], cs_flat[:, torch.clamp(self.start - 1, min=0)].t(), torch.zeros_like(self.cs_end))
        self.cs_before_start = ref  # (s, h): cs just before the sequence start (0 at a chunk start)
        # decay from the sequence's starting matrix to its end, within the end chunk
        ref_end = torch.where(self.started_before[:, None], torch.zeros_like(self.cs_end), ref)
        self.end_decay = torch.exp(torch.clamp(self.cs_end - ref_end, max=0.0)).float()  # (s, h)

    def segments(self, h, p, n, at_end: bool):
        idx = torch.arange(self.count, device=self.start.device, dtype=torch.int64)
        if at_end:
            return (torch.zeros_like(idx), self.end_chunk, self.end - 1, idx, idx * (h * p * n))
        return (torch.zeros_like(idx), self.start_chunk, self.start - 1, idx, idx * (h * p * n))


def _varlen_final_states(x, B, dtp, cs, seq_idx, vl, states, initial_states, chunk_size, dst):
    """Each sequence's final state into ``dst (s, h, p, n)`` (float32): the positions of its end
    chunk (``_segment_state_kernel``) plus the decayed matrix it entered that chunk with. Returns
    that second part (zero for empty sequences, whose final state is their initial state)."""
    b, l, h, p = x.shape
    n = B.shape[3]
    _launch_segments(x, B, dtp, cs, seq_idx, vl.segments(h, p, n, True), dst,
                     (p * n, n, 1), True, l, chunk_size, x.dtype)
    carried = states[0, vl.end_chunk]  # (s, h, p, n): S_{c-1} of each sequence's end chunk
    if initial_states is not None:
        carried = torch.where(vl.started_before[:, None, None, None], carried, initial_states.to(dst.dtype))
    else:
        carried = carried * vl.started_before[:, None, None, None]
    carried = vl.end_decay[:, :, None, None] * carried * vl.nonempty[:, None, None, None]
    dst.add_(carried)
    empty_value = torch.zeros_like(dst) if initial_states is None else initial_states.to(dst.dtype)
    dst.copy_(torch.where(vl.nonempty[:, None, None, None], dst, empty_value))
    return carried


# ----------------------------------------------------------------------------- forward
def forward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, chunk_size, dt_softplus,
            dt_min, dt_max, out, final_states, varlen_states, checkpoints):
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    nc = _nchunks(l, chunk_size)
    varlen = cu_seqlens is not None
    if l == 0:
        fill = torch.zeros_like(final_states) if initial_states is None else initial_states.to(final_states.dtype)
        if varlen:
            varlen_states.copy_(fill)
            final_states.copy_(fill[-1:])
        else:
            final_states.copy_(fill)
        checkpoints.zero_()
        return
    states, dtp, cs = _split_checkpoints(checkpoints, b, l, h, p, n, chunk_size)
    if varlen:
        seq_idx = _seq_idx_from_cu(cu_seqlens, l)
    _launch_dt(dt, dt_bias, A, dtp, cs, chunk_size, dt_softplus, dt_min, dt_max)
    # chunk states L_c into slots 1..nc
    _launch_segments(x, B, dtp, cs, seq_idx,
                     _chunk_segments(seq_idx, b, l, h, p, n, nc, chunk_size, x.device, True, True),
                     states, (p * n, n, 1), True, l, chunk_size, x.dtype, stage="ssd.fwd.chunk_states")
    row_init = initial_states if not varlen else None
    varlen_init = initial_states if varlen else None
    grid, block = _pass_grid(b, h, p * n)
    _state_pass_kernel[grid](
        states, cs if row_init is None else row_init, final_states, cs, _lo_off(cs),
        cs if seq_idx is None else seq_idx, 0 if seq_idx is None else seq_idx.stride(0),
        0 if seq_idx is None else seq_idx.stride(1),
        cs if cu_seqlens is None else cu_seqlens, cs if varlen_init is None else varlen_init,
        l, h, nc, chunk_size, p * n,
        HAS_INIT=row_init is not None, HAS_SEQ=seq_idx is not None, HAS_VARLEN_INIT=varlen_init is not None,
        BLOCK=block, STATIC_CHUNKS=nc if _INTERPRET else 0, num_warps=_PASS_CFG["num_warps"])
    # outputs: q = C, k = B, v = x; state S_{c-1} read as (n, p); ext = initial states^T
    cb = _launch_cb(C, B, chunk_size, x.dtype)
    _launch_scan(C, B, x, states, (states.stride(0), states.stride(1), states.stride(2), 1, n),
                 varlen_init, None if varlen_init is None else (h * p * n, p * n, 1, n),
                 dtp, cs, seq_idx, cu_seqlens, reverse=False, col_scale=True, epilogue=_EPI_OUT,
                 x=x, z=z, D=D, o1=out, dtype=x.dtype, full_value=True, cb=cb, stage="ssd.fwd.scan")
    if varlen:
        vl = _Varlen(cu_seqlens, l, nc, chunk_size, cs)
        _varlen_final_states(x, B, dtp, cs, seq_idx, vl, states, varlen_init, chunk_size, varlen_states)
        final_states.copy_(varlen_states[-1:])


# ----------------------------------------------------------------------------- backward
def _within_sequence_reverse_sum(values, seq, cu_seqlens, l):
    """``out[k] = sum of values[k : end of k's sequence within k's chunk]`` for ``values (h, nc, Q)``,
    in float64 (so that subtracting the later sequences' sums loses nothing); returns ``(h, l)``."""
    h, nc, Q = values.shape
    total = torch.zeros(h, nc, Q + 1, device=values.device, dtype=torch.float64)
    total[:, :, :Q] = torch.flip(torch.cumsum(torch.flip(values.double(), (2,)), 2), (2,))
    pos = torch.arange(l, device=values.device)
    chunk = pos // Q
    seg_end = torch.minimum(cu_seqlens.to(torch.int64)[seq.to(torch.int64) + 1], (chunk + 1) * Q)
    flat = total.view(h, -1)
    return flat[:, chunk * (Q + 1) + pos % Q] - flat[:, chunk * (Q + 1) + seg_end - chunk * Q]


def _within_sequence_forward_sum(values, seq, cu_seqlens, l):
    """``out[k] = sum of values[start of k's sequence within k's chunk : k]`` (k excluded), float64."""
    h, nc, Q = values.shape
    total = torch.zeros(h, nc, Q + 1, device=values.device, dtype=torch.float64)
    total[:, :, 1:] = torch.cumsum(values.double(), 2)
    pos = torch.arange(l, device=values.device)
    chunk = pos // Q
    seg_start = torch.maximum(cu_seqlens.to(torch.int64)[seq.to(torch.int64)], chunk * Q)
    flat = total.view(h, -1)
    return flat[:, chunk * (Q + 1) + pos % Q] - flat[:, chunk * (Q + 1) + seg_start - chunk * Q]


def backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, chunk_size, dt_softplus,
             dt_min, dt_max, out, checkpoints, dout, dfinal_states, dvarlen_states,
             dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states):
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    nc = _nchunks(l, chunk_size)
    varlen = cu_seqlens is not None
    f32 = torch.float32
    dev = x.device
    # upstream gradients may arrive as broadcast views (e.g. the gradient of a sum)
    dfinal_states = None if dfinal_states is None else dfinal_states.to(f32).contiguous()
    dvarlen_states = None if dvarlen_states is None else dvarlen_states.to(f32).contiguous()
    if varlen:
        count = cu_seqlens.numel() - 1
        dvl = torch.zeros(count, h, p, n, device=dev, dtype=f32)
        if dvarlen_states is not None:
            dvl += dvarlen_states.to(f32)
        if dfinal_states is not None:
            dvl[-1] += dfinal_states[0].to(f32)
    if l == 0:
        if dinitial_states is not None:
            if varlen:
                dinitial_states.copy_(dvl)
            elif dfinal_states is not None:
                dinitial_states.copy_(dfinal_states)
            else:
                dinitial_states.zero_()
        ddt.zero_()
        return
    states, dtp, cs = _split_checkpoints(checkpoints, b, l, h, p, n, chunk_size)
    if varlen:
        seq_idx = _seq_idx_from_cu(cu_seqlens, l)
        vl = _Varlen(cu_seqlens, l, nc, chunk_size, cs)
    row_init = initial_states if not varlen else None
    varlen_init = initial_states if varlen else None
    st_strides_np = (states.stride(0), states.stride(1), states.stride(2), 1, n)  # S read as (n, p)
    st_strides_pn = (states.stride(0), states.stride(1), states.stride(2), n, 1)  # S read as (p, n)
    init_np = None if varlen_init is None else (h * p * n, p * n, 1, n)
    init_pn = None if varlen_init is None else (h * p * n, p * n, n, 1)

    # 1. recompute y: dy (fp32), dz, d(cs) from the query side (dy . y), dD partials
    # d(A dt) = reverse cumsum of dcs + exclusive cumsum of dcs_fwd + dai (see the scan kernel):
    # each (query, key) pair of positions is booked where no large terms cancel.
    # dy is read by four passes as a float32 matmul operand (see GRAD_DOT_DTYPE)
    dy = torch.empty(b, l, h, p, device=dev, dtype=f32)
    dcs = torch.zeros(b, h, nc, chunk_size, device=dev, dtype=f32)
    dcs_fwd = torch.zeros(b, h, nc, chunk_size, device=dev, dtype=f32)
    # cu_seqlens initial states: pairs (t, start_j - 1) add to da_k for k in [start_j, t] only; their
    # query terms go to dcs_seg and are summed within each sequence's stretch of the chunk
    dcs_seg = torch.zeros(b, h, nc, chunk_size, device=dev, dtype=f32) if varlen_init is not None else None
    # cu_seqlens final states: pairs (end_j - 1, s) add to da_k for k in (s, end_j - 1] only
    dcs_end = torch.zeros(b, h, nc, chunk_size, device=dev, dtype=f32) if varlen else None
    ddtp = torch.zeros(b, h, nc, chunk_size, device=dev, dtype=f32)
    nmb = triton.cdiv(chunk_size, _scan_block_m(chunk_size, GRAD_DOT_DTYPE))
    dpart = None if D is None else torch.empty(b * nc, nmb, h, p, device=dev, dtype=f32)
    cb = _launch_cb(C, B, chunk_size, x.dtype)  # C B^T per group: read by this pass, the dx and the dC pass
    _launch_scan(C, B, x, states, st_strides_np, varlen_init, init_np, dtp, cs, seq_idx, cu_seqlens,
                 reverse=False, col_scale=True, epilogue=_EPI_DZ, x=x, z=z, dout=dout, D=D,
                 o1=dy, o2=dz, vec1=dcs, vec2=dcs_seg, dpart=dpart, dtype=GRAD_DOT_DTYPE, input_dtype=x.dtype,
                 full_value=True, cb=cb, stage="ssd.bwd.dy_scan")

    # 2. gradient reaching S_{c-1} from chunk c's outputs -> slot c of dstates
    dstates = torch.empty(b, nc, h, p, n, device=dev, dtype=f32)
    _launch_segments(dy, C, dtp, cs, seq_idx,
                     _chunk_segments(seq_idx, b, l, h, p, n, nc, chunk_size, dev, False, False),
                     dstates, (p * n, n, 1), False, l, chunk_size, GRAD_DOT_DTYPE, x.dtype, stage="ssd.bwd.dstates")

    # 3. cu_seqlens: final states' gradients -> the matrices they started their end chunk from
    if varlen:
        final = torch.empty(vl.count, h, p, n, device=dev, dtype=f32)
        carried = _varlen_final_states(x, B, dtp, cs, seq_idx, vl, states, varlen_init, chunk_size, final)
        # d(cs) at each sequence end from the carried matrix's pairs; the pairs (end, own position)
        # are summed within the sequence after the dx pass
        at_end = torch.clamp(vl.end - 1, min=0)
        carried_term = (dvl * carried).sum(dim=(2, 3))
        from_state = vl.started_before[:, None]
        dcs[0].view(h, -1).index_add_(1, at_end, (carried_term * from_state).t())
        if dcs_seg is not None:
            dcs_seg[0].view(h, -1).index_add_(1, at_end, (carried_term * ~from_state).t())
        scaled = vl.end_decay[:, :, None, None] * dvl
        into_state = scaled * (vl.started_before & vl.nonempty)[:, None, None, None]
        dstates[0].index_add_(0, vl.end_chunk, into_state)
        if varlen_init is not None:
            dinit = torch.where(vl.nonempty[:, None, None, None],
                                scaled * (~vl.started_before)[:, None, None, None], dvl)

    # 4. reverse state passing: dS_c into slot c; <dS_c, S_c> partials; dS_{-1} -> dinitial_states
    grid, block = _pass_grid(b, h, p * n)
    endterm = torch.empty(b, h, nc, grid[2], device=dev, dtype=f32)
    has_dfinal = dfinal_states is not None and not varlen
    has_dinit = row_init is not None
    _state_pass_bwd_kernel[grid](
        dstates, states, dfinal_states if has_dfinal else cs, dinitial_states if has_dinit else cs, endterm, cs, _lo_off(cs),
        cs if seq_idx is None else seq_idx, 0 if seq_idx is None else seq_idx.stride(0),
        0 if seq_idx is None else seq_idx.stride(1), l, h, nc, chunk_size, p * n,
        HAS_DFINAL=has_dfinal, HAS_DINIT=has_dinit, HAS_SEQ=seq_idx is not None,
        BLOCK=block, STATIC_CHUNKS=nc if _INTERPRET else 0, num_warps=_PASS_CFG["num_warps"])
    last_in_chunk = (torch.clamp((torch.arange(nc, device=dev) + 1) * chunk_size, max=l) - 1) % chunk_size
    dcs.scatter_add_(3, last_in_chunk.view(1, 1, nc, 1).expand(b, h, nc, 1), endterm.sum(3, keepdim=True))

    # 5. dx (and ddtp direct, d(cs) from the key side), dB, dC
    dvl_np = None if not varlen else (h * p * n, p * n, 1, n)
    dvl_pn = None if not varlen else (h * p * n, p * n, n, 1)
    ds_np = (dstates.stride(0), dstates.stride(1), dstates.stride(2), 1, n)
    ds_pn = (dstates.stride(0), dstates.stride(1), dstates.stride(2), n, 1)
    _launch_scan(B, C, dy, dstates, ds_np, dvl if varlen else None, dvl_np, dtp, cs, seq_idx, cu_seqlens,
                 reverse=True, epilogue=_EPI_DX, x=x, D=D, o1=dx, vec1=dcs_end, vec2=ddtp, dpart=dcs_fwd,
                 dtype=GRAD_DOT_DTYPE, input_dtype=x.dtype, full_value=True, cb=cb, stage="ssd.bwd.dx_scan")
    # dB, dC: each program sums the heads of one group (no per-head buffers)
    _launch_scan(x, dy, C, dstates, ds_pn, dvl if varlen else None, dvl_pn, dtp, cs, seq_idx, cu_seqlens,
                 reverse=True, row_scale=True, epilogue=_EPI_PLAIN, o1=dB, dtype=GRAD_DOT_DTYPE, input_dtype=x.dtype,
                 full_value=False, group_heads=True, stage="ssd.bwd.dB_scan")
    dai = torch.zeros(b, h, nc, nmb, chunk_size, device=dev, dtype=f32)
    _launch_scan(dy, x, B, states, st_strides_pn, varlen_init, init_pn, dtp, cs, seq_idx, cu_seqlens,
                 reverse=False, col_scale=True, epilogue=_EPI_PLAIN, o1=dC, dtype=GRAD_DOT_DTYPE, input_dtype=x.dtype,
                 full_value=False, q2=C, k2=B, dai=dai, group_heads=True, cb=cb, stage="ssd.bwd.dC_scan")
    del cb

    # 6. cu_seqlens initial states: outputs of the start chunk, the chunk-end state, the final state
    if varlen and varlen_init is not None:
        from_out = torch.empty(vl.count, h, p, n, device=dev, dtype=f32)
        _launch_segments(dy, C, dtp, cs, seq_idx, vl.segments(h, p, n, False), from_out, (p * n, n, 1),
                         False, l, chunk_size, GRAD_DOT_DTYPE, x.dtype)
        dinit += from_out * vl.nonempty[:, None, None, None]
        # the sequence is its start chunk's last one: its initial state reached S_c
        chunk_last = torch.clamp((vl.start_chunk + 1) * chunk_size, max=l) - 1
        is_last = (seq_idx[0, chunk_last].to(torch.int64) == torch.arange(vl.count, device=dev)) & vl.nonempty
        cs_flat = _cs64(cs)[0].reshape(h, -1)
        decay = torch.exp(torch.clamp(cs_flat[:, chunk_last].t() - vl.cs_before_start, max=0.0)).float()
        via_state = (decay * is_last[:, None])[:, :, None, None] * dstates[0, vl.start_chunk]
        dinit += via_state
        dinitial_states.copy_(dinit)
        state_term = (via_state * varlen_init.to(f32)).sum(dim=(2, 3))  # (s, h) at the chunk end
        dcs_seg[0].view(h, -1).index_add_(1, chunk_last, state_term.t())
    elif varlen and dinitial_states is not None:
        dinitial_states.copy_(dvl)

    # 7. d(cs) -> d(A dt) by cumulative sums in each chunk; then dt, A, dt_bias, D. These are small
    # (b, h, l) tensors summed in float64: dA, ddt_bias and dD add up every position's share and are
    # rounded to float32 once.
    f64 = torch.float64
    dcs, dcs_fwd = dcs.to(f64), dcs_fwd.to(f64)
    da = torch.flip(torch.cumsum(torch.flip(dcs, (3,)), 3), (3,))
    da += torch.cumsum(dcs_fwd, 3) - dcs_fwd + dai.to(f64).sum(3)
    if dcs_seg is not None:
        da[0].view(h, -1)[:, :l] += _within_sequence_reverse_sum(dcs_seg[0], seq_idx[0], cu_seqlens, l)
    if dcs_end is not None:
        da[0].view(h, -1)[:, :l] += _within_sequence_forward_sum(dcs_end[0], seq_idx[0], cu_seqlens, l)
    ddtp = ddtp.to(f64) + da * A.to(f64)[None, :, None, None]
    dA.copy_((da * dtp.to(f64)).sum(dim=(0, 2, 3)))
    grad = ddtp.view(b, h, nc * chunk_size)[:, :, :l].transpose(1, 2)  # (b, l, h)
    pre = dt.to(f64)
    if dt_bias is not None:
        pre = pre + dt_bias.to(f64)
    if dt_min > 0.0 or dt_max < math.inf:
        v = torch.nn.functional.softplus(pre) if dt_softplus else pre
        grad = grad * ((v >= dt_min) & (v <= dt_max))
    if dt_softplus:
        grad = grad * torch.where(pre > 20.0, torch.ones_like(pre), torch.sigmoid(pre))
    ddt.copy_(grad)
    if ddt_bias is not None:
        ddt_bias.copy_(grad.sum(dim=(0, 1)))
    if dD is not None:
        total = dpart.to(f64).sum(dim=(0, 1))  # (h, p)
        dD.copy_(total.sum(1) if D.dim() == 1 else total)
