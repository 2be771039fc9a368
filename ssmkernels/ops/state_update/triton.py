"""Triton kernel of selective_state_update (SPEC.md section 4).

The kernel indexes every call as the multi-token Mamba-2 form (``layout.py``): state
``(B_cache, h, p, n)``, x/dt/z/out ``(b, t, h, p)``, A ``(h, p, n)``, B/C ``(b, t, g, n)``,
D/dt_bias ``(h, p)``. Any of them may be a broadcast view (stride 0), so the kernel reads every
stride and assumes no contiguity.

One program owns a ``(BLOCK_P, n)`` tile of one (batch row, head): it loads the tile of the state
once, applies the ``t`` tokens in order with the state kept in registers, writes each token's
output, and stores the state back once (in the state's own dtype; math in float32).
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl

from ..._core import autotune, config
from .layout import mamba2_layout

# Triton reads TRITON_INTERPRET when kernels are defined, so it is fixed for this module too.
_INTERPRETED = config.triton_interpret()


def unsupported(features: dict) -> str | None:
    if features.get("dtype") not in _FLOATS or features.get("state_dtype") not in _FLOATS:
        return (f"the triton kernel takes float32/float16/bfloat16 inputs and state, got inputs "
                f"{features.get('dtype')} and state {features.get('state_dtype')}")
    return None


def _floats():
    import torch

    return (torch.float32, torch.float16, torch.bfloat16)


_FLOATS = _floats()


@triton.jit
def _softplus(v):
    # Same threshold as torch.nn.functional.softplus: linear above 20.
    return tl.where(v <= 20.0, tl.log(1.0 + tl.exp(v)), v)


@triton.jit
def _store_cast(value, ptr_dtype: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    """float32 -> the element type behind a pointer, rounding to nearest even.

    Compiled Triton rounds float32 -> bfloat16 to nearest even; Triton's CPU interpreter
    truncates. Under the interpreter (``BF16_BY_BITS``) bfloat16 is rounded here with integer
    arithmetic, so CPU tests check the rounding that the GPU does.
    """
    if BF16_BY_BITS and ptr_dtype == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(value != value, bits | 0x400000, rounded)  # NaN stays a (quiet) NaN
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return value.to(ptr_dtype)


@triton.jit
def _one_token(state, x_ptrs, dt_ptrs, B_ptrs, C_ptrs, z_ptrs, out_ptrs, out_ptr, A, D, dt_bias, mask_p, mask_n,
               DT_SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
               DT_PER_HEAD: tl.constexpr, BF16_BY_BITS: tl.constexpr, EVEN_N: tl.constexpr):
    """One token on a tile's float32 ``state``: writes its output, returns the new state."""
    x = tl.load(x_ptrs, mask=mask_p, other=0.0).to(tl.float32)
    if DT_PER_HEAD:
        dt = tl.load(dt_ptrs).to(tl.float32)  # scalar
    else:
        dt = tl.load(dt_ptrs, mask=mask_p, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        dt = dt + dt_bias
    if DT_SOFTPLUS:
        dt = _softplus(dt)
    if EVEN_N:
        B = tl.load(B_ptrs).to(tl.float32)
        C = tl.load(C_ptrs).to(tl.float32)
    else:
        B = tl.load(B_ptrs, mask=mask_n, other=0.0).to(tl.float32)
        C = tl.load(C_ptrs, mask=mask_n, other=0.0).to(tl.float32)
    if DT_PER_HEAD:
        decay = tl.exp(A * dt)  # a scalar when A_PER_HEAD too: one exp per head and token
    else:
        decay = tl.exp(A * dt[:, None])
    # Explicit fma: left to the compiler, the contraction of this sum and of ``D * x`` differed
    # between the straight-line (ONE_TOKEN) and loop code, so t tokens in one call and t single
    # steps differed in the last bit; pinned, both give the same bits (and so would a new path).
    state = tl.fma(state, decay, (dt * x)[:, None] * B[None, :])
    y = tl.sum(state * C[None, :], axis=1)
    if HAS_D:
        y = tl.fma(D, x, y)
    if HAS_Z:
        z = tl.load(z_ptrs, mask=mask_p, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(out_ptrs, _store_cast(y, out_ptr.dtype.element_ty, BF16_BY_BITS), mask=mask_p)
    return state


@triton.jit
def _apply_tokens(
    state, pid_b, pid_h, pid_g, offs_p64, offs_n64, mask_p, mask_n, mask_pn, out_ptrs, tokens,
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, out_ptr,
    stride_x_b, stride_x_t, stride_x_h, stride_x_p,
    stride_dt_b, stride_dt_t, stride_dt_h, stride_dt_p,
    stride_A_h, stride_A_p, stride_A_n,
    stride_B_b, stride_B_t, stride_B_g, stride_B_n,
    stride_C_b, stride_C_t, stride_C_g, stride_C_n,
    stride_D_h, stride_D_p,
    stride_z_b, stride_z_t, stride_z_h, stride_z_p,
    stride_dt_bias_h, stride_dt_bias_p,
    stride_out_t,
    DT_SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    DT_PER_HEAD: tl.constexpr, A_PER_HEAD: tl.constexpr, BF16_BY_BITS: tl.constexpr, EVEN_N: tl.constexpr,
    ONE_TOKEN: tl.constexpr = False,  # tokens == 1
):
    """The ``tokens`` steps on one tile's ``state`` (float32, in registers): writes each token's
    output and returns the final state (the caller stores it)."""
    # Per-(head, p) constants, loaded once for all tokens.
    if A_PER_HEAD:
        A = tl.load(A_ptr + pid_h * stride_A_h).to(tl.float32)
    else:
        A = tl.load(A_ptr + pid_h * stride_A_h + offs_p64[:, None] * stride_A_p + offs_n64[None, :] * stride_A_n,
                    mask=mask_pn, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        if DT_PER_HEAD:
            dt_bias = tl.load(dt_bias_ptr + pid_h * stride_dt_bias_h).to(tl.float32)
        else:
            dt_bias = tl.load(dt_bias_ptr + pid_h * stride_dt_bias_h + offs_p64 * stride_dt_bias_p,
                              mask=mask_p, other=0.0).to(tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + pid_h * stride_D_h + offs_p64 * stride_D_p, mask=mask_p, other=0.0).to(tl.float32)

    x_ptrs = x_ptr + pid_b * stride_x_b + pid_h * stride_x_h + offs_p64 * stride_x_p
    dt_ptrs = dt_ptr + pid_b * stride_dt_b + pid_h * stride_dt_h
    if not DT_PER_HEAD:
        dt_ptrs += offs_p64 * stride_dt_p
    B_ptrs = B_ptr + pid_b * stride_B_b + pid_g * stride_B_g + offs_n64 * stride_B_n
    C_ptrs = C_ptr + pid_b * stride_C_b + pid_g * stride_C_g + offs_n64 * stride_C_n
    if HAS_Z:
        z_ptrs = z_ptr + pid_b * stride_z_b + pid_h * stride_z_h + offs_p64 * stride_z_p

    # The decode step (ONE_TOKEN) as straight-line code: inside the token loop the compiler loaded x
    # in a layout of its own and converted it through shared memory, and held 80 registers instead of
    # 72 (H200, batch 256, bf16 state: 80.6 -> 88.3% of copy bandwidth; float32 89.5 -> 90.3%).
    if ONE_TOKEN:
        state = _one_token(state, x_ptrs, dt_ptrs, B_ptrs, C_ptrs, z_ptrs if HAS_Z else x_ptrs, out_ptrs, out_ptr,
                           A, D if HAS_D else A, dt_bias if HAS_DT_BIAS else A, mask_p, mask_n,
                           DT_SOFTPLUS, HAS_D, HAS_Z, HAS_DT_BIAS, DT_PER_HEAD, BF16_BY_BITS, EVEN_N)
    else:
        # Pointers advance by one token per step (64-bit pointer arithmetic, whatever the strides).
        # A while loop, not range(tokens): Triton's interpreter cannot take range() of a runtime
        # scalar under numpy >= 2.4; compiled, both give the same loop.
        j = 0
        while j < tokens:
            state = _one_token(state, x_ptrs, dt_ptrs, B_ptrs, C_ptrs, z_ptrs if HAS_Z else x_ptrs, out_ptrs, out_ptr,
                               A, D if HAS_D else A, dt_bias if HAS_DT_BIAS else A, mask_p, mask_n,
                               DT_SOFTPLUS, HAS_D, HAS_Z, HAS_DT_BIAS, DT_PER_HEAD, BF16_BY_BITS, EVEN_N)
            x_ptrs += stride_x_t
            dt_ptrs += stride_dt_t
            B_ptrs += stride_B_t
            C_ptrs += stride_C_t
            out_ptrs += stride_out_t
            if HAS_Z:
                z_ptrs += stride_z_t
            j += 1

    return state


@triton.jit
def _zero_outputs(out_ptrs, mask_p, tokens, stride_out_t, BLOCK_P: tl.constexpr):
    """Zeros as every token's output of a padding row's tile."""
    zeros = tl.zeros([BLOCK_P], dtype=tl.float32).to(out_ptrs.dtype.element_ty)
    j = 0
    while j < tokens:
        tl.store(out_ptrs, zeros, mask=mask_p)
        out_ptrs += stride_out_t
        j += 1


@triton.jit(do_not_specialize=["tokens", "batch_cache", "pad_slot_id"])
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, indices_ptr, out_ptr,
    tokens, p, n, heads_per_group, batch_cache, pad_slot_id, stride_indices,
    stride_state_slot, stride_state_h, stride_state_p, stride_state_n,
    stride_x_b, stride_x_t, stride_x_h, stride_x_p,
    stride_dt_b, stride_dt_t, stride_dt_h, stride_dt_p,
    stride_A_h, stride_A_p, stride_A_n,
    stride_B_b, stride_B_t, stride_B_g, stride_B_n,
    stride_C_b, stride_C_t, stride_C_g, stride_C_n,
    stride_D_h, stride_D_p,
    stride_z_b, stride_z_t, stride_z_h, stride_z_p,
    stride_dt_bias_h, stride_dt_bias_p,
    stride_out_b, stride_out_t, stride_out_h, stride_out_p,
    DT_SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr,
    HAS_INDICES: tl.constexpr,
    DT_PER_HEAD: tl.constexpr,  # dt (and dt_bias) have stride 0 along p: one dt per head
    A_PER_HEAD: tl.constexpr,  # A has stride 0 along p and n: one decay per head
    BF16_BY_BITS: tl.constexpr,  # under the interpreter: see _store_cast
    EVEN_N: tl.constexpr,  # n == BLOCK_N
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_TOKEN: tl.constexpr,  # tokens == 1 (the decode step): straight-line code, no token loop
):
    pid_p = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_h = tl.program_id(2).to(tl.int64)
    pid_g = pid_h // heads_per_group

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < p
    mask_n = offs_n < n
    if EVEN_N:  # no mask along n: lets the compiler use 16-byte accesses of the state rows
        mask_pn = mask_p[:, None]
    else:
        mask_pn = mask_p[:, None] & mask_n[None, :]
    offs_p64 = offs_p.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)

    out_ptrs = out_ptr + pid_b * stride_out_b + pid_h * stride_out_h + offs_p64 * stride_out_p

    if HAS_INDICES:
        slot = tl.load(indices_ptr + pid_b * stride_indices).to(tl.int64)
        # Pad rows (and, defensively, any index outside the cache) touch no state: zeros out.
        if (slot == pad_slot_id) | (slot < 0) | (slot >= batch_cache):
            _zero_outputs(out_ptrs, mask_p, tokens, stride_out_t, BLOCK_P)
            return
    else:
        slot = pid_b

    state_ptrs = (state_ptr + slot * stride_state_slot + pid_h * stride_state_h
                  + offs_p64[:, None] * stride_state_p + offs_n64[None, :] * stride_state_n)
    # Cache hints, measured on the H200 at batch 256 (H128 P64 N128, % of copy bandwidth, bf16 / float32
    # state): none 88.3 / 90.3, evict_last load + streaming (.cs) store 90.9 / 91.1, evict_first load
    # + .cs store 85.5 / 88.1 (benchmarks/results/tune_state_update_hints_h200.txt). Keeping the lines
    # that were read in L2 until the same lines are written back seems to be what helps.
    state = tl.load(state_ptrs, mask=mask_pn, other=0.0, eviction_policy="evict_last").to(tl.float32)

    state = _apply_tokens(
        state, pid_b, pid_h, pid_g, offs_p64, offs_n64, mask_p, mask_n, mask_pn, out_ptrs, tokens,
        x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, out_ptr,
        stride_x_b, stride_x_t, stride_x_h, stride_x_p,
        stride_dt_b, stride_dt_t, stride_dt_h, stride_dt_p,
        stride_A_h, stride_A_p, stride_A_n,
        stride_B_b, stride_B_t, stride_B_g, stride_B_n,
        stride_C_b, stride_C_t, stride_C_g, stride_C_n,
        stride_D_h, stride_D_p,
        stride_z_b, stride_z_t, stride_z_h, stride_z_p,
        stride_dt_bias_h, stride_dt_bias_p,
        stride_out_t,
        DT_SOFTPLUS, HAS_D, HAS_Z, HAS_DT_BIAS, DT_PER_HEAD, A_PER_HEAD, BF16_BY_BITS, EVEN_N, ONE_TOKEN)
    tl.store(state_ptrs, _store_cast(state, state_ptr.dtype.element_ty, BF16_BY_BITS), mask=mask_pn,
             cache_modifier=".cs")


@triton.jit
def _tile_of(tile, num_tiles, p_blocks, heads, indices_ptr, stride_indices, batch_cache, pad_slot_id,
             HAS_INDICES: tl.constexpr):
    """(p block, batch row, head, state slot, whether the tile exists and its slot is real) of a
    tile number of the pipelined kernel: p block fastest, then head, then batch row, so the tiles
    that the grid's programs take at one time are consecutive state memory."""
    exists = tile < num_tiles
    tile = tile % num_tiles  # past the end: any real tile's coordinates, for in-bounds index reads
    pid_p = tile % p_blocks
    rest = tile // p_blocks
    pid_h = (rest % heads).to(tl.int64)
    pid_b = (rest // heads).to(tl.int64)
    if HAS_INDICES:
        slot = tl.load(indices_ptr + pid_b * stride_indices).to(tl.int64)
        # Pad rows (and, defensively, any index outside the cache) touch no state: zeros out.
        real = exists & (slot != pad_slot_id) & (slot >= 0) & (slot < batch_cache)
    else:
        slot = pid_b
        real = exists
    return pid_p, pid_b, pid_h, slot, real


@triton.jit
def _load_tile_state(state_ptr, pid_p, pid_h, slot, real, offs_in_tile, offs_n64, mask_n, p,
                     stride_state_slot, stride_state_h, stride_state_p, stride_state_n,
                     EVEN_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """A tile's state in its own dtype (zeros where the tile or its slot is not real), addressed from
    scalars: pointers built here keep Triton's contiguity facts (16-byte accesses)."""
    offs_p64 = (pid_p * BLOCK_P + offs_in_tile).to(tl.int64)
    if EVEN_N:
        mask = (offs_p64 < p)[:, None] & real
    else:
        mask = (offs_p64 < p)[:, None] & mask_n[None, :] & real
    return tl.load(state_ptr + slot * stride_state_slot + pid_h * stride_state_h
                   + offs_p64[:, None] * stride_state_p + offs_n64[None, :] * stride_state_n,
                   mask=mask, other=0.0)


@triton.jit(do_not_specialize=["tokens", "batch_cache", "pad_slot_id", "num_tiles"])
def _state_update_pipelined_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, indices_ptr, out_ptr,
    tokens, p, n, heads_per_group, batch_cache, pad_slot_id, stride_indices, heads, num_tiles, p_blocks,
    stride_state_slot, stride_state_h, stride_state_p, stride_state_n,
    stride_x_b, stride_x_t, stride_x_h, stride_x_p,
    stride_dt_b, stride_dt_t, stride_dt_h, stride_dt_p,
    stride_A_h, stride_A_p, stride_A_n,
    stride_B_b, stride_B_t, stride_B_g, stride_B_n,
    stride_C_b, stride_C_t, stride_C_g, stride_C_n,
    stride_D_h, stride_D_p,
    stride_z_b, stride_z_t, stride_z_h, stride_z_p,
    stride_dt_bias_h, stride_dt_bias_p,
    stride_out_b, stride_out_t, stride_out_h, stride_out_p,
    DT_SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr,
    HAS_INDICES: tl.constexpr,
    DT_PER_HEAD: tl.constexpr,
    A_PER_HEAD: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
    EVEN_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The kernel above with fewer programs than tiles: program k takes tiles k, k + G, k + 2G, ...
    (G programs) and loads the state of its next tile before working on the current one, so that
    a program's arithmetic overlaps its next loads (the bf16-state step has twice the arithmetic per
    byte of the float32 one and stopped at ~81% of copy with one tile per program). Only the tile
    number, its scalar coordinates and the prefetched state cross iterations: pointers are rebuilt
    from scalars each time, because Triton loses the contiguity of loop-carried pointer tensors (a
    first version that carried them ran at 39-54% of copy)."""
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    offs_n64 = offs_n.to(tl.int64)
    offs_in_tile = tl.arange(0, BLOCK_P)
    grid = tl.num_programs(0)
    tile = tl.program_id(0)

    pid_p, pid_b, pid_h, slot, real = _tile_of(tile, num_tiles, p_blocks, heads, indices_ptr, stride_indices,
                                               batch_cache, pad_slot_id, HAS_INDICES)
    state_raw = _load_tile_state(state_ptr, pid_p, pid_h, slot, real, offs_in_tile, offs_n64, mask_n, p,
                                 stride_state_slot, stride_state_h, stride_state_p, stride_state_n, EVEN_N, BLOCK_P)

    while tile < num_tiles:
        # The next tile's state first (masked off past the last tile); only its scalar coordinates
        # and the loaded state are carried into the next iteration.
        next_p, next_b, next_h, next_slot, next_real = _tile_of(tile + grid, num_tiles, p_blocks, heads, indices_ptr,
                                                                stride_indices, batch_cache, pad_slot_id, HAS_INDICES)
        next_raw = _load_tile_state(state_ptr, next_p, next_h, next_slot, next_real, offs_in_tile, offs_n64, mask_n,
                                    p, stride_state_slot, stride_state_h, stride_state_p, stride_state_n, EVEN_N,
                                    BLOCK_P)

        # This tile.
        offs_p = pid_p * BLOCK_P + offs_in_tile
        offs_p64 = offs_p.to(tl.int64)
        mask_p = offs_p < p
        if EVEN_N:
            mask_pn = mask_p[:, None]
        else:
            mask_pn = mask_p[:, None] & mask_n[None, :]
        out_ptrs = out_ptr + pid_b * stride_out_b + pid_h * stride_out_h + offs_p64 * stride_out_p
        if real:
            pid_g = pid_h // heads_per_group
            state = _apply_tokens(
                state_raw.to(tl.float32), pid_b, pid_h, pid_g, offs_p64, offs_n64, mask_p, mask_n, mask_pn, out_ptrs,
                tokens, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, out_ptr,
                stride_x_b, stride_x_t, stride_x_h, stride_x_p,
                stride_dt_b, stride_dt_t, stride_dt_h, stride_dt_p,
                stride_A_h, stride_A_p, stride_A_n,
                stride_B_b, stride_B_t, stride_B_g, stride_B_n,
                stride_C_b, stride_C_t, stride_C_g, stride_C_n,
                stride_D_h, stride_D_p,
                stride_z_b, stride_z_t, stride_z_h, stride_z_p,
                stride_dt_bias_h, stride_dt_bias_p,
                stride_out_t,
                DT_SOFTPLUS, HAS_D, HAS_Z, HAS_DT_BIAS, DT_PER_HEAD, A_PER_HEAD, BF16_BY_BITS, EVEN_N)
            tl.store(state_ptr + slot * stride_state_slot + pid_h * stride_state_h
                     + offs_p64[:, None] * stride_state_p + offs_n64[None, :] * stride_state_n,
                     _store_cast(state, state_ptr.dtype.element_ty, BF16_BY_BITS), mask=mask_pn)
        else:  # a padding row: zeros out, no state touched
            _zero_outputs(out_ptrs, mask_p, tokens, stride_out_t, BLOCK_P)
        state_raw = next_raw
        pid_p, pid_b, pid_h, slot, real = next_p, next_b, next_h, next_slot, next_real
        tile += grid


def _launch_config(batch: int, heads: int, p: int, n: int, state_bytes: int) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_N, num_warps, programs per SM), picked by hand: autotuning would run the
    in-place kernel several times on the caller's state (and cost host time on a latency-bound path).

    At large batch, 64 bytes of state per thread keep enough loads in flight for bandwidth: 16-bit
    state in tiles of 4096 elements at 4 warps, float32 in tiles of 1024 at 2 warps (the H200 sweep,
    benchmarks/results/tune_state_update_h200.txt: float32 90.4% of copy against 89.0% for 2048 at 4
    warps, the two-warp tiles of 4096 and 8192 at 89.8-90.3%; bf16 4096 at 4 warps 80.1%, within
    1% of every other choice). When the grid would not fill the GPU (small batch), tiles of 2 KB at
    4 warps, so that more programs share the work.

    Programs per SM: 0 launches one program per tile (``_state_update_kernel``); k > 0 launches at
    most k programs per SM of ``_state_update_pipelined_kernel``. ``_PROGRAMS_PER_SM`` (0 until the
    pipelined kernel is measured faster) applies at large batch.
    """
    block_n = triton.next_power_of_2(n)
    block_p_max = triton.next_power_of_2(p)
    large = batch * heads >= 1024
    if large and state_bytes == 4:
        tile, num_warps = 1024, 2
    else:
        tile = (8192 if large else 2048) // state_bytes
        num_warps = 4
    block_p = max(1, min(block_p_max, tile // block_n))
    if block_p * block_n * state_bytes > 8192:  # n alone makes a bigger tile: more threads for it
        num_warps = 8
    return block_p, block_n, num_warps, (_PROGRAMS_PER_SM if large else 0)


_PROGRAMS_PER_SM = 0


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    """Multiprocessors of the CUDA device; 1 for the CPU (Triton's interpreter)."""
    import torch

    if device_index < 0:
        return 1
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def prepare(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, pad_slot_id, out):
    """What a launch needs besides the tensors: ``(kernel, grid, scalar arguments, constexpr
    arguments)``, or None when there is nothing to compute. It depends only on the tensors' shapes,
    strides and dtypes and on the flags, so ``op.py`` computes it once per kind of call."""
    lay = mamba2_layout(state, x, dt, A, B, C, D, z, dt_bias, out)
    b, t, h, p, n = lay.batch, lay.tokens, lay.heads, lay.headdim, lay.dstate
    if b == 0 or t == 0 or h == 0 or p == 0:
        return None
    block_p, block_n, num_warps, programs_per_sm = _launch_config(b, h, p, n, state.element_size())
    idx = state_batch_indices
    sizes = (t, p, n, h // lay.groups, lay.slots, pad_slot_id, 1 if idx is None else idx.stride(0))
    strides = (*lay.state, *lay.x, *lay.dt, *lay.A, *lay.B, *lay.C, *lay.D, *lay.z, *lay.dt_bias, *lay.out)
    p_blocks = triton.cdiv(p, block_p)
    if b > autotune.MAX_GRID_YZ or h > autotune.MAX_GRID_YZ:  # beyond the one-tile-per-program grid: its 1D grid
        programs_per_sm = max(programs_per_sm, 4)
    if programs_per_sm > 0:
        num_tiles = b * h * p_blocks
        programs = min(num_tiles, programs_per_sm * _sm_count(state.get_device()))
        if num_tiles + programs >= 2**31:  # the pipelined kernel numbers tiles in int32
            raise ValueError(f"selective_state_update: {num_tiles} tiles of the state are more than the Triton "
                             f"kernel numbers (int32); split the batch")
        kernel, grid, scalars = _state_update_pipelined_kernel, (programs,), (*sizes, h, num_tiles, p_blocks, *strides)
    else:
        kernel, grid, scalars = _state_update_kernel, (p_blocks, b, h), (*sizes, *strides)
    constants = dict(
        DT_SOFTPLUS=bool(dt_softplus),
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_DT_BIAS=dt_bias is not None,
        HAS_INDICES=idx is not None,
        DT_PER_HEAD=lay.dt[3] == 0 and lay.dt_bias[1] == 0,  # dt and dt_bias have stride 0 along p
        A_PER_HEAD=lay.A[1] == 0 and lay.A[2] == 0,
        BF16_BY_BITS=_INTERPRETED,
        EVEN_N=block_n == n,
        BLOCK_P=block_p,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    if programs_per_sm == 0:
        constants["ONE_TOKEN"] = t == 1
    return kernel, grid, scalars, constants


def launch(prepared, state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, out) -> None:
    """Launch with ``prepared`` from :func:`prepare` (None: nothing to do)."""
    if prepared is None:
        return
    kernel, grid, scalars, constants = prepared
    kernel[grid](state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, out, *scalars, **constants)


def update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, pad_slot_id, out):
    """Apply the call's tokens to ``state`` in place and write ``out`` (shaped like ``x``).

    Tensors come as the caller passed them (any of SPEC's forms, any strides); ``layout`` reads
    them as the multi-token Mamba-2 form. ``state_batch_indices`` may be int32 or int64, any stride.
    """
    prepared = prepare(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, pad_slot_id, out)
    launch(prepared, state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, out)
