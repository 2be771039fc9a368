// Selective scan forward (SPEC.md section 2): one WARP per channel, kFwdWarps channels per block.
// It serves the calls that the state-parallel kernel (selective_scan_fwd_tiled.cu, about twice as
// fast) does not: fixed B/C, float32 B/C with 16-bit u, groups of channels not a multiple of 32, N
// other than 16, 32, 64, 128.
//
// Why this shape. The old kernel (4 channels x 256 threads per block, a __syncthreads per state
// index n and a serial cross-warp combine) needed 244 registers, so one block of 8 warps per SM:
// latency-bound at 3.4x mamba_ssm's time. Here every warp scans its channel alone, so the n loop
// has no block barrier at all:
//   - Lane i owns kFwdItems = 16 consecutive steps; a warp walks its sequence in warp chunks of
//     kWarpChunk = 512 steps. kChunk (2048, the backward's checkpoint interval) is a multiple of
//     the warp chunk, so every checkpoint lands on the start of a warp chunk.
//   - Per warp chunk: load u, delta (16-byte vector loads when aligned), dt = softplus(delta +
//     bias), dtu = dt u, y = D u, and sum_dt = the lane's total step (once for all n).
//   - Per n: a_i = exp2(dt_i A log2e), b_i = dtu_i B_i; the lane folds its 16 affine maps
//     h -> a_i h + b_i into (fa, fb), with fa = exp2(sum_dt A log2e) (one MUFU op instead of 16
//     multiplies; both give prod a_i to a few ulps). Lane 0 folds the state entering the warp chunk
//     (the carry) into its fb, so after the warp's inclusive shuffle scan of the (fa, fb) pairs
//     every lane's fb is the true state after its last step; one rotating shuffle hands each lane
//     the state entering its steps and lane 0 the state leaving the warp chunk (the next carry).
//     The lane then replays h = a_i h + b_i, y_i += C_i h. 10 shuffles per n, ~7 FP32 ops + 1 exp2
//     per (step, n): the exps (MUFU, 16/clk/SM) and the issue rate set the floor, not memory.
//   - B and C tiles (16 steps of one n: two 16-byte loads for 16-bit types) are kept packed and
//     prefetched one n ahead, so their latency hides behind the current n's work; whether a lane's
//     tiles take the vector path is decided once per warp chunk; bf16 converts by bit moves.
//   - Carries and A * log2e live in shared memory [warp][n] (N is a runtime size, 1..256 and
//     more). Only lane 0 touches a carry inside the n loop; the warp copies them in from the
//     initial state and out to the checkpoints (when a warp chunk starts a kChunk chunk) and to
//     last_state, coalesced, between __syncwarp()s. An empty sequence copies its initial state.
//   - Then y *= silu(z) and the store.
// Registers: dt, dtu, y (48) across n, a, b (32) per n and the packed tiles: ~150 (ptxas, sm_90a),
// so the launch bounds ask for 3 blocks (12 warps) per SM, without spills. The SASS of the bf16
// n loop: ~223 instructions per n for 16 steps (54 FFMA, 37 FMUL, 17 MUFU, 10 SHFL; the rest
// conversions, moves, address and loop bookkeeping).
//
// B and C of input-dependent layouts: the kFwdWarps warps of a block take consecutive channels of
// one sequence, which read the same B/C addresses (same group, or neighbouring groups) at about the
// same time: L1 serves the duplicates (shared-memory staging would need a block barrier per n).
// Any channel count works: a block's warps past `dim` compute a copy of the last channel (so every
// warp runs the same shuffles: the host emulation's barriers are block-wide) and store nothing.
// A fixed (d, n) B or C is the same code with a broadcast tile (one code path for all layouts),
// and so are float32 B/C with 16-bit u.
#include <cstring>
#include <type_traits>

#include "selective_scan/scan_common.cuh"

namespace ssmk {
namespace scan {
namespace {

constexpr int kFwdWarps = 4;                   // channels (warps) per block
constexpr int kFwdThreads = kFwdWarps * 32;
constexpr int kFwdItems = 16;                  // consecutive steps per lane
constexpr int kWarpChunk = 32 * kFwdItems;     // steps per warp chunk
constexpr int kWarpChunksPerChunk = kChunk / kWarpChunk;
static_assert(kChunk % kWarpChunk == 0, "checkpoints must land on warp-chunk starts");
// Blocks per SM the register budget is set for: 3 x 4 warps -> at most 168 registers per thread
// (the bf16 instance needs ~150: dt, dtu, y, a, b of 16 steps and the prefetched B/C tiles).
constexpr int kFwdMinBlocks = 3;

// Pins a value computed outside the n loop: without it, NVVM sinks the 16 adds of sum_dt into the
// loop (recomputing them for every n, +12% instructions) to shorten a live range.
__device__ __forceinline__ void fwd_keep(float& v) {
#ifndef SSMK_SCAN_EMULATION
  asm volatile("" : "+f"(v));
#endif
}

// kFwdItems elements of B or C in their own dtype (packed: 8 registers for 16-bit types), so the
// next n's tile can be prefetched cheaply; converted to float where used.
template <typename T>
struct alignas(16) FwdTile {
  T v[kFwdItems];
};

// The lane's tile at `ptr` (its first step). `vector`: complete and 16-byte aligned, decided once
// per warp chunk for all n (see the caller), so the common path costs two loads and one branch;
// otherwise a fixed (d, n) layout broadcasts the one value at `ptr`, and an input-dependent one
// loads element by element with zeros past `valid`.
template <typename T>
__device__ __forceinline__ void fwd_load_tile(const T* ptr, bool vector, bool fixed, int valid, FwdTile<T>& tile) {
  constexpr int kVec = 16 / sizeof(T);
  if (vector) {
#pragma unroll
    for (int k = 0; k < kFwdItems / kVec; ++k) {
      reinterpret_cast<uint4*>(tile.v)[k] = reinterpret_cast<const uint4*>(ptr)[k];
    }
  } else if (fixed) {
    const T v = *ptr;
#pragma unroll
    for (int i = 0; i < kFwdItems; ++i) tile.v[i] = v;
  } else {
#pragma unroll
    for (int i = 0; i < kFwdItems; ++i) tile.v[i] = i < valid ? ptr[i] : from_float<T>(0.f);
  }
}

// Whether the lane's tiles of every n are complete and 16-byte aligned: its first one is, and the
// n stride keeps the alignment.
template <typename T>
__device__ __forceinline__ bool fwd_vector_tiles(const T* ptr, bool fixed, int valid, int64_t n_stride) {
  return !fixed && valid >= kFwdItems && reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0 &&
         (n_stride * static_cast<int64_t>(sizeof(T))) % 16 == 0;
}

__device__ __forceinline__ float fwd_bits_to_float(uint32_t bits) {
#ifdef SSMK_SCAN_EMULATION
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#else
  return __uint_as_float(bits);
#endif
}

// Element i of a tile as float. bf16 by bit moves on the packed pairs (one op per element; the
// generic conversion of the upper half takes two).
template <typename T>
__device__ __forceinline__ float fwd_at(const FwdTile<T>& tile, int i) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const uint32_t pair = reinterpret_cast<const uint32_t*>(tile.v)[i / 2];
    return fwd_bits_to_float(i % 2 == 0 ? pair << 16 : pair & 0xffff0000u);
  } else {
    return to_float(tile.v[i]);
  }
}

// The lane's folded map (fa, fb) over its steps -> the state entering its first step. Lane 0 folds
// the warp chunk's entering state h_in (its carry) into fb, so that after the inclusive scan every
// lane's fb is the true state after its last step; one rotating shuffle hands lane i lane i-1's (the
// state entering its steps) and lane 0 lane 31's (the state leaving the warp chunk), which lane 0
// stores as the new carry. 10 shuffles (the scan's last a-shuffle is dead code).
__device__ __forceinline__ float fwd_warp_exclusive_state(float fa, float fb, float h_in, int lane, float& carry) {
  if (lane == 0) fb = fmaf(fa, h_in, fb);
  warp_scan_affine(fa, fb);
  const float rotated = __shfl_sync(0xffffffffu, fb, (lane + 31) % 32);
  if (lane == 0) carry = rotated;
  return lane == 0 ? h_in : rotated;
}

template <typename input_t, typename bc_t>
__global__ __launch_bounds__(kFwdThreads, kFwdMinBlocks) void forward_kernel(const Params p) {
  extern __shared__ float smem[];
  const int n_state = static_cast<int>(p.dstate);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float* carry = smem + 2 * warp * n_state;  // [kFwdWarps][n]: the warp's carries
  float* A2s = carry + n_state;              // [kFwdWarps][n]: the channel's A * log2(e)

  const int64_t wanted = static_cast<int64_t>(blockIdx.x) * kFwdWarps + warp;
  const bool active = wanted < p.dim;                   // warps past dim compute, store nothing
  const int64_t channel = active ? wanted : p.dim - 1;
  const int64_t seq = blockIdx.y;
  const Span span = sequence_span(p, seq);
  const int64_t length = span.end - span.start;
  const int64_t state_offset = (seq * p.dim + channel) * n_state;

  const float bias = p.delta_bias ? as_ptr<const float>(p.delta_bias)[channel] : 0.f;
  const float D = p.D ? as_ptr<const float>(p.D)[channel] : 0.f;
  const float* A = as_ptr<const float>(p.A) + channel * n_state;
  float* checkpoints = as_ptr<float>(p.checkpoints);
  float* last_state = as_ptr<float>(p.last_state);
  const float* initial_state = as_ptr<const float>(p.initial_state);

  const int64_t num_warp_chunks = ceil_div(length, kWarpChunk);
  // The warp's carries start as the initial state; lane 0 alone updates them in the n loop, the
  // whole warp copies them out (coalesced) to the checkpoints and the last state.
  for (int n = lane; n < n_state; n += 32) {
    carry[n] = initial_state ? initial_state[state_offset + n] : 0.f;
    A2s[n] = A[n] * kLog2e;
  }
  __syncwarp();

  const int64_t x_offset = span.row * p.x_batch_stride + channel * p.x_d_stride;
  // B and C at (row, channel, n = 0, t = 0); n and t are added per use. Fixed: (d, n) strides.
  const bc_t* B_base = as_ptr<const bc_t>(p.B) +
                       (p.b_fixed ? channel * p.B_group_stride
                                  : span.row * p.B_batch_stride + (channel / p.channels_per_b_group) * p.B_group_stride);
  const bc_t* C_base = as_ptr<const bc_t>(p.C) +
                       (p.c_fixed ? channel * p.C_group_stride
                                  : span.row * p.C_batch_stride + (channel / p.channels_per_c_group) * p.C_group_stride);
  const bool b_fixed = p.b_fixed, c_fixed = p.c_fixed;

  for (int64_t j = 0; j < num_warp_chunks; ++j) {
    const int64_t t0 = span.start + j * kWarpChunk + static_cast<int64_t>(lane) * kFwdItems;
    const int valid = items_in_range<kFwdItems>(t0, span.end);

    float dt[kFwdItems], dtu[kFwdItems], y[kFwdItems];
    {
      float raw[kFwdItems];
      load_items(as_ptr<const input_t>(p.u) + x_offset + t0, valid, dtu);
      load_items(as_ptr<const input_t>(p.delta) + x_offset + t0, valid, dt);
      step_sizes(dt, raw, bias, p.softplus, valid);
    }
    float sum_dt = 0.f;  // the lane's total step: its folded decay is exp2(sum_dt A log2 e)
#pragma unroll
    for (int i = 0; i < kFwdItems; ++i) {
      y[i] = D * dtu[i];
      dtu[i] *= dt[i];
      sum_dt += dt[i];
    }
    fwd_keep(sum_dt);
    if (j % kWarpChunksPerChunk == 0) {  // the warp chunk starts a kChunk chunk: its checkpoint
      const int64_t slot = span.slot0 + j / kWarpChunksPerChunk;
      if (active) {
        for (int n = lane; n < n_state; n += 32) checkpoints[(slot * p.dim + channel) * n_state + n] = carry[n];
      }
      __syncwarp();  // read before lane 0 overwrites
    }

    // The lane's B / C at n = 0 (its first step; the channel's value when fixed), stepped along n.
    const bc_t* B_ptr = B_base + (b_fixed ? 0 : t0);
    const bc_t* C_ptr = C_base + (c_fixed ? 0 : t0);

    // n = 0's tiles; each n prefetches the next n's (their latency hides behind this n's work).
    // 32-bit tiles take twice the registers: then only B is prefetched, C loaded at the top of its n
    // (it is first used after the fold and the scan). Whether the tiles take the vector path is
    // decided here once for all n. The step as a lambda over explicit tile buffers, copied at the
    // end of each n: an inline loop body copying the tiles at its top compiled to ~25% more
    // instructions per n (b_i recomputed in the replay); unrolling n by two over ping-pong buffers (to save the tile copies) took ~165
    // registers for no fewer instructions.
    constexpr bool kPrefetchC = sizeof(bc_t) < 4;
    const int64_t B_step = p.B_n_stride, C_step = p.C_n_stride;
    const bool B_vector = fwd_vector_tiles(B_ptr, b_fixed, valid, B_step);
    const bool C_vector = fwd_vector_tiles(C_ptr, c_fixed, valid, C_step);
    auto step = [&](int n, const FwdTile<bc_t>& B_tile, const FwdTile<bc_t>& C_pre, FwdTile<bc_t>& B_next,
                    FwdTile<bc_t>& C_next) {
      FwdTile<bc_t> C_tile;
      if constexpr (kPrefetchC) {
        C_tile = C_pre;
      } else {
        fwd_load_tile(C_ptr, C_vector, c_fixed, valid, C_tile);
      }
      const float A2 = A2s[n];
      if (n + 1 < n_state) {
        B_ptr += B_step;
        C_ptr += C_step;
        fwd_load_tile(B_ptr, B_vector, b_fixed, valid, B_next);
        if constexpr (kPrefetchC) fwd_load_tile(C_ptr, C_vector, c_fixed, valid, C_next);
      }
      const float h_in = lane == 0 ? carry[n] : 0.f;

      // Fold the lane's steps into one map (fa, fb); scan; replay them from the entering state.
      float a[kFwdItems], b[kFwdItems], fb = 0.f;
#pragma unroll
      for (int i = 0; i < kFwdItems; ++i) {
        a[i] = exp2_approx(dt[i] * A2);
        b[i] = dtu[i] * fwd_at(B_tile, i);
        fb = fmaf(a[i], fb, b[i]);
      }
      const float fa = exp2_approx(sum_dt * A2);  // prod a_i to a few ulps, one MUFU op instead of 16 FMULs
      float h = fwd_warp_exclusive_state(fa, fb, h_in, lane, carry[n]);
#pragma unroll
      for (int i = 0; i < kFwdItems; ++i) {
        h = fmaf(a[i], h, b[i]);
        y[i] = fmaf(fwd_at(C_tile, i), h, y[i]);
      }
    };
    FwdTile<bc_t> B0, C0, B1, C1;
    fwd_load_tile(B_ptr, B_vector, b_fixed, valid, B0);
    if constexpr (kPrefetchC) fwd_load_tile(C_ptr, C_vector, c_fixed, valid, C0);
    for (int n = 0; n < n_state; ++n) {
      step(n, B0, C0, B1, C1);
      B0 = B1;
      if constexpr (kPrefetchC) C0 = C1;
    }

    if (active && valid > 0) {
      if (p.out_pre) store_items(as_ptr<input_t>(p.out_pre) + x_offset + t0, valid, y);  // before the gate
      if (p.z) {
        float z[kFwdItems];
        load_items(as_ptr<const input_t>(p.z) + x_offset + t0, valid, z);
#pragma unroll
        for (int i = 0; i < kFwdItems; ++i) y[i] *= z[i] / (1.f + expf(-z[i]));
      }
      store_items(as_ptr<input_t>(p.out) + x_offset + t0, valid, y);
    }
    __syncwarp();  // lane 0's carries, visible to the warp (next checkpoint, last state)
  }

  if (active && last_state) {
    for (int n = lane; n < n_state; n += 32) last_state[state_offset + n] = carry[n];
  }
}

inline size_t forward_smem_bytes(const Params& p) { return 2 * kFwdWarps * p.dstate * sizeof(float); }

// Launchers: compiled by nvcc only (emulation.cc builds the kernels above as host code).
#ifndef SSMK_SCAN_EMULATION
template <typename input_t, typename bc_t>
void launch_forward(const Params& p) {
  dim3 grid(static_cast<unsigned>(ceil_div(p.dim, kFwdWarps)), static_cast<unsigned>(p.num_seqs));
  const size_t smem = forward_smem_bytes(p);
  auto kernel = forward_kernel<input_t, bc_t>;
  if (smem > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
               "selective_scan forward: shared memory");
  }
  kernel<<<grid, kFwdThreads, smem, as_stream(p.stream)>>>(p);
  check_launch("selective_scan forward_kernel");
}
#endif  // SSMK_SCAN_EMULATION

}  // namespace

#ifndef SSMK_SCAN_EMULATION
void forward(const Params& p) {
  if (p.num_seqs == 0 || p.dim == 0) return;
  if (p.num_seqs > 65535) throw std::invalid_argument("selective_scan cuda: at most 65535 sequences per call");
  if (forward_tiled(p)) return;
  SSMK_DISPATCH_FLOAT(p.dtype, "selective_scan u", [&] {
    using input_t = scalar_t;
    if (p.bc_dtype == p.dtype) {
      launch_forward<input_t, input_t>(p);
    } else if (static_cast<DType>(p.bc_dtype) == DType::kFloat32) {
      launch_forward<input_t, float>(p);
    } else {
      throw std::invalid_argument("selective_scan cuda: B and C must have u's dtype or float32");
    }
  });
}

#endif  // SSMK_SCAN_EMULATION

}  // namespace scan
}  // namespace ssmk
