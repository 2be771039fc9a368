// causal_conv1d on whole rows (SPEC.md section 1): the common training case, as a copy kernel.
//
// "Plain" calls have no seq_idx, no cu_seqlens and at most 65535 batch rows (the forward may have
// initial states; the backward has neither initial states nor final-state gradients), and their
// tensors allow aligned vector accesses along the contiguous axis. The channel-first forward
// streams 16-byte vectors and re-reads each vector's w-1 neighbours (its neighbour threads'
// vectors, served from L1); the channel-first backward exchanges the neighbours through shared
// memory, walking its segment backwards. The channel-last forward gives each thread a few channels
// over a run of rows; the channel-last backward copies tiles of row spans into shared memory
// (cp.async, double-buffered) where dim and the strides are multiples of 16 bytes, and otherwise
// slides a few channels per thread along a run of rows. The general kernels
// (causal_conv1d_fwd_channel_*.cu, causal_conv1d_bwd.cu) handle everything else.
//
// The backward leaves one float32 weight/bias partial sum per (segment, channel), summed in a
// fixed order (inside the block for channel-first; afterwards for all): bitwise reproducible.
#include <climits>
#include <stdexcept>
#include <string>

#include "causal_conv1d/causal_conv1d.h"
#include "causal_conv1d/kernel_utils.cuh"
#include "common.h"

namespace ssmk {
namespace conv {
namespace {

// Tuning knobs. scripts/conv_variants.cu times alternatives next to a device copy, at B4 D10240
// L4096 W4 bf16 silu (benchmarks/results/conv_variants_h200*.txt: H200, copy 4.21-4.23 TB/s).
// Channel-first: a block walks a segment of one (batch, channel) row; every kernel reads its block
// coordinates from a 3D grid (first_grid).
// Now (2026-12-04, fourteenth session, after whole-vector stores): forward 128 threads x 4 rounds
// (4096 bf16 positions) per block, 16 blocks per SM: 168.6-169.4 us, 94% of copy (64 x 8 at 32
// blocks 168.0, 64 x 4 172, 32 x 16 185; 12 blocks per SM 182 us, 8 blocks 182-192 us, 2 rounds
// 189-211 us, 1 round 226-267 us). Backward 64 threads x 8 rounds, 32 blocks per SM: 265.3-266.7
// us, 90% (128 x 4 at 16 blocks 273.9-274.3; 64 x 4 300 us, 64 x 8 at 24 blocks 290-294, 32 x 8-16
// 333-360; 128 x 4 at 12 blocks 292-296, 8 blocks 357-364). causal-conv1d's backward: 265.2 us in Nsight Compute
// against our 270.4 us (its 208 M instructions against our 223 M).
// What the 2026-12-04 changes were worth (backward, 128 x 4): ex2.approx without __expf's range
// fix-ups and bfloat16 unpacked by shift/mask 323.7 -> 289.6 us (268 -> 247 M instructions);
// whole-vector dx stores (NVVM had split each 16-byte store into four 4-byte ones) and the carry
// through shared memory (no spill) 289.6 -> 277.9 us (in ncu), 274 in the variants tool.
// Earlier (2026-12-03, with the split stores): the halo's gradients exchanged between threads
// 323 us, recomputing them from the next vector's x and dout 352 us; walked forwards with the next
// round prefetched 359-953 us; each thread re-reading the neighbours' vectors 378-421 us; the
// forward exchanging its halo through shared memory 176-191 us against 175. Moving the chunks
// through shared memory by cp.async (2-4 stages ahead, no registers held) was slower in both
// directions: forward 213-236 us against 175, backward 390-519 against 352 (2026-12-03). So were
// warp walks (each warp its own contiguous span of the segment, neighbours by shuffles, no barrier
// or shared memory in the walk): forward 188-200 us against 174.5, backward 351-380 us against 322
// (2026-12-04): the block-wide rounds read 2 KB of a row per round where a warp reads 512 bytes.
// Positions inside a row as int instead of int64_t: no gain (backward 327 us against 326 at 12
// blocks per SM; the forward spilled at 16 blocks, 257 us).
constexpr int kFirstThreadsMax = 128;  // the largest block of either
constexpr int kFirstForwardThreads = 128;  // at most, for rows long enough
constexpr int kFirstForwardMinBlocks = 16;
constexpr int kFirstForwardRounds = 4;
constexpr int kFirstBackwardThreads = 64;
constexpr int kFirstBackwardMinBlocks = 32;
constexpr int kFirstBackwardRounds = 8;
// Channel-last forward: a thread owns kLastForwardChannels channels (4 bytes of a 16-bit type) at
// kLastForwardRows positions and loads those rows plus the w-1 before them at once (H200
// 2026-12-04, channel blocks fastest, whole-vector stores: 2 x 32 rows 177.3-180.8 us, 88-90%;
// 4 x 16 175.4-178.1, within the spread; 2 x 16 193-202, 4 x 8 200-208, 2 x 64 200-209; the tiled
// kernel's best shape 193-206. Before, 2026-12-03: 2 x 32 rows 207 us, 77%; 2 x 16 213 us, 4 x 8
// 232 us, 4 x 16 218 us; sliding along 32-128 rows with the window in registers 229-305 us; 4 x 32
// 244 us, 2 x 64 236 us, 8 x 4/8/16 338-533 us; H100: 4 x 8 97% of copy; 16-byte vectors of 8
// channels 43-64%: their weights took the registers that kept loads in flight).
constexpr int kLastThreads = 128;
constexpr int kLastForwardChannels = 2;
constexpr int kLastForwardRows = 32;
template <typename T>
constexpr int last_forward_channels() {  // at most one 16-byte vector
  return kLastForwardChannels < Vec16<T>::kElts ? kLastForwardChannels : Vec16<T>::kElts;
}
// Channel-last backward: a thread slides along kLastBackwardRows positions of kLastBackwardChannels
// channels, kLastBackwardUnroll rows per load batch (67% of copy; windows of 4-8 rows re-reading
// their halos 58-62%, unrolling 8 rows 31%: 184+ registers).
constexpr int kLastBackwardChannels = 4;
constexpr int kLastBackwardRows = 128;
constexpr int kLastBackwardUnroll = 4;

template <int kWidth, int kChannels>
struct Taps {  // weights and bias of kChannels consecutive channels, as float
  float w[kChannels][kWidth];
  float bias[kChannels];
  template <typename Params>
  __device__ __forceinline__ Taps(const Params& p, int64_t c0) {
#pragma unroll
    for (int e = 0; e < kChannels; ++e) {
#pragma unroll
      for (int k = 0; k < kWidth; ++k)
        w[e][k] = load_as_float(p.weight, p.weight_dtype, (c0 + e) * p.weight_c_stride + k * p.weight_width_stride);
      bias[e] = p.bias ? load_as_float(p.bias, p.bias_dtype, (c0 + e) * p.bias_stride) : 0.0f;
    }
  }
};

// n consecutive values into positions pos.. of a row with unit stride: one vector when it lies
// inside the row (pos + n <= len), else element by element up to the row's end.
template <typename T, int kN>
__device__ __forceinline__ void store_row(T* row, int64_t pos, int64_t len, const float* in) {
  if (pos + kN <= len) {
    store_floats<T, kN>(row + pos, in);
  } else {
#pragma unroll
    for (int i = 0; i < kN; ++i)
      if (pos + i < len) row[pos + i] = from_float<T>(in[i]);
  }
}

// Sum over the block's threads (a multiple of 32, at most kFirstThreadsMax) of kValues floats each,
// in a fixed order (shuffle tree inside each warp, then the warps in order): thread 0 holds it.
template <int kValues>
__device__ __forceinline__ void sum_over_block(float (&values)[kValues]) {
  __shared__ float per_warp[kFirstThreadsMax / 32][kValues];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
#pragma unroll
    for (int v = 0; v < kValues; ++v) values[v] += __shfl_down_sync(0xffffffffu, values[v], offset);
  }
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
#pragma unroll
    for (int v = 0; v < kValues; ++v) per_warp[warp][v] = values[v];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) {
#pragma unroll
      for (int v = 0; v < kValues; ++v) values[v] += per_warp[w][v];
    }
  }
}

// ------------------------------------------------------------------------------ channel-first
// Channel-first forward: a block walks its segment of a row one vector per thread and round (thread
// t: vector t of the round, so a warp's load instruction reads 512 contiguous bytes), and loads the
// next round's vector and halo (kept as raw 16-byte values) before it computes and stores the
// current one, so that its loads stay in flight while it computes.
template <typename T>
__device__ __forceinline__ uint4 load_raw_vector(const T* row, int64_t pos, int64_t len) {
  constexpr int kElts = Vec16<T>::kElts;
  if (pos + kElts <= len) return *reinterpret_cast<const uint4*>(row + pos);
  uint4 raw = make_uint4(0, 0, 0, 0);  // a vector reaching past the row's end (or lying past it): zeros there
  T* elts = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < kElts; ++i)
    if (pos + i < len) elts[i] = row[pos + i];
  return raw;
}

// kAhead: rounds whose loads are in flight while a round is computed; kMaxThreads: the block size
// it is compiled for (tuning knobs for scripts/conv_variants.cu). Taking the vector before a
// lane's own from the lane before by shuffles (lane 0 loading it) instead of every lane loading it
// again measured slower: 176.2 us against 168.7 (H200, 2026-12-04).
template <typename T, int kWidth, int kMinBlocks, int kAhead = 1, int kMaxThreads = kFirstThreadsMax>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks) forward_first_stream_kernel(ForwardParams p, int64_t segment) {
  constexpr int kElts = Vec16<T>::kElts;
  constexpr int kHist = kWidth - 1;
  static_assert(kElts >= kHist, "the halo fits in one vector");
  const int64_t c = blockIdx.x, b = blockIdx.y;  // first_grid
  const int64_t seg_begin = blockIdx.z * segment;
  const int64_t seg_end = seg_begin + segment < p.seqlen ? seg_begin + segment : p.seqlen;
  const T* x = reinterpret_cast<const T*>(p.x) + b * p.x_batch_stride + c * p.x_c_stride;
  T* out = reinterpret_cast<T*>(p.out) + b * p.out_batch_stride + c * p.out_c_stride;
  const T* init = reinterpret_cast<const T*>(p.initial_states);
  const Taps<kWidth, 1> taps(p, c);
  const int64_t step = int64_t{blockDim.x} * kElts;
  int64_t pos = seg_begin + static_cast<int64_t>(threadIdx.x) * kElts;
  // own[a] / before[a]: the vector of round `a` ahead of the current one and the vector before it.
  uint4 own[kAhead + 1], before[kAhead + 1];
  auto fetch = [&](int64_t at, uint4& vector, uint4& previous) {
    vector = previous = make_uint4(0, 0, 0, 0);
    if (at < seg_end) {
      vector = load_raw_vector(x, at, p.seqlen);
      if (at > 0) previous = load_raw_vector(x, at - kElts, p.seqlen);
    }
  };
#pragma unroll
  for (int a = 0; a < kAhead; ++a) fetch(pos + a * step, own[a], before[a]);
  for (; pos < seg_end; pos += step) {
    fetch(pos + kAhead * step, own[kAhead], before[kAhead]);
    float xf[kHist + kElts], before_f[kElts];
    unpack_vector<T>(before[0], before_f);
    unpack_vector<T>(own[0], xf + kHist);
#pragma unroll
    for (int k = 0; k < kHist; ++k) {
      xf[k] = pos > 0 ? before_f[kElts - kHist + k]
                      : (init ? to_float(init[b * p.init_batch_stride + c * p.init_c_stride + k * p.init_l_stride]) : 0.0f);
    }
#pragma unroll
    for (int i = kElts - 1; i >= 0; --i) {
      float acc = taps.bias[0];
#pragma unroll
      for (int k = 0; k < kWidth; ++k) acc += taps.w[0][k] * xf[i + k];
      xf[kHist + i] = p.silu ? silu(acc) : acc;
    }
    store_row<T, kElts>(out, pos, p.seqlen, xf + kHist);
#pragma unroll
    for (int a = 0; a < kAhead; ++a) {
      own[a] = own[a + 1];
      before[a] = before[a + 1];
    }
  }
}

// Channel-first backward: a block walks its segment in chunks of one vector of x and one of dout
// per thread, from the segment's end to its start. A thread takes the x vector before its own from
// shared memory ([0] the one before the chunk, an extra load by thread 0; [1 + t] thread t's) and
// the pre-activation gradients g of the w-1 positions after its vector from the next thread, which
// computes them for its own vector: 8 silu gradients per 8 positions (recomputing the w-1 after
// them from the next vector's x and dout, 11, measured 8% slower). The last thread of a chunk takes
// them from the chunk after (thread 0's slot of the other parity, written the iteration before;
// past the segment's end the last thread computes them into that slot before the walk). Slots are
// double-buffered by chunk parity; two barriers per chunk. The weight and bias sums stay in
// registers and are summed over the block once at the end (one partial per segment).
template <typename T, int kWidth, int kMinBlocks, int kMaxThreads = kFirstThreadsMax>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks) backward_first_kernel(BackwardParams p,
                                                                                               int64_t segment,
                                                                                               int64_t num_segments) {
  constexpr int kElts = Vec16<T>::kElts;
  constexpr int kHist = kWidth - 1;
  static_assert(kElts >= kHist, "the halo fits in one vector");
  static_assert(kMaxThreads <= kFirstThreadsMax, "sum_over_block's per-warp slots");
  __shared__ uint4 x_slots[2][kMaxThreads + 1];  // [0]: the x vector before the chunk; [1 + t]: thread t's
  __shared__ float g_slots[2][kMaxThreads][kHist];  // thread t's first w-1 gradients
  const int tid = threadIdx.x, threads = blockDim.x;
  const int64_t c = blockIdx.x, b = blockIdx.y;  // first_grid
  const int64_t l = p.seqlen;
  const int64_t seg_begin = blockIdx.z * segment;
  const int64_t seg_end = seg_begin + segment < l ? seg_begin + segment : l;
  const T* x = reinterpret_cast<const T*>(p.x) + b * p.x_batch_stride + c * p.x_c_stride;
  const T* dout = reinterpret_cast<const T*>(p.dout) + b * p.dout_batch_stride + c * p.dout_c_stride;
  T* dx = reinterpret_cast<T*>(p.dx) + b * p.dx_batch_stride + c * p.dx_c_stride;
  const Taps<kWidth, 1> taps(p, c);
  float sums[kWidth + 1] = {};  // dweight[0..w-1], dbias
  const int64_t step = int64_t{threads} * kElts;
  // 32-bit division (a 64-bit one is ~25 instructions per warp): segments fit (first_segment).
  const int64_t chunks = (static_cast<uint32_t>(seg_end - seg_begin) + static_cast<uint32_t>(step) - 1) /
                         static_cast<uint32_t>(step);
  // g after the segment's last chunk, for the last thread's first iteration: zero past the row's
  // end, else computed here from x and dout. It goes where a chunk's first gradients wait for the
  // chunk before it (slot [parity of the chunk after][0]), so no thread holds a carry in registers.
  if (tid + 1 == threads) {
    const int64_t after = seg_begin + chunks * step;
#pragma unroll
    for (int j = 0; j < kHist; ++j) {
      const int64_t t = after + j;
      float g = 0.0f;
      if (t < l) {
        g = to_float(dout[t]);
        if (p.silu) {
          float z = taps.bias[0];
#pragma unroll
          for (int k = 0; k < kWidth; ++k) z += taps.w[0][k] * to_float(x[t - kHist + k]);
          g = dsilu(z, g);
        }
      }
      g_slots[1][0][j] = g;  // the first iteration's parity is 0
    }
  }
  int parity = 0;
  for (int64_t k = chunks - 1; k >= 0; --k, parity ^= 1) {
    const int64_t base = seg_begin + k * step, pos = base + static_cast<int64_t>(tid) * kElts;
    const uint4 own_x = load_raw_vector(x, pos, l), own_dout = load_raw_vector(dout, pos, l);  // zeros past the row
    x_slots[parity][tid + 1] = own_x;
    if (tid == 0) x_slots[parity][0] = base > 0 ? *reinterpret_cast<const uint4*>(x + base - kElts) : make_uint4(0, 0, 0, 0);
    __syncthreads();
    const uint4 before = x_slots[parity][tid];
    float xf[kElts + kHist], g[kElts + kHist], before_f[kElts];
    unpack_vector<T>(before, before_f);
    unpack_vector<T>(own_x, xf + kHist);
    unpack_vector<T>(own_dout, g);  // zero past the row's end
#pragma unroll
    for (int j = 0; j < kHist; ++j) xf[j] = before_f[kElts - kHist + j];
    if (p.silu) {
#pragma unroll
      for (int i = 0; i < kElts; ++i) {
        float z = taps.bias[0];
#pragma unroll
        for (int j = 0; j < kWidth; ++j) z += taps.w[0][j] * xf[i + j];
        g[i] = dsilu(z, g[i]);
      }
    }
#pragma unroll
    for (int j = 0; j < kHist; ++j) g_slots[parity][tid][j] = g[j];
    __syncthreads();
    // the next thread's first gradients; the last thread's: those of the chunk after (the other
    // parity's slot 0, written the iteration before, or above for the first iteration)
    const float* next_g = tid + 1 < threads ? g_slots[parity][tid + 1] : g_slots[parity ^ 1][0];
#pragma unroll
    for (int j = 0; j < kHist; ++j) g[kElts + j] = next_g[j];
    if (pos < seg_end) {
      float dxf[kElts];
#pragma unroll
      for (int u = 0; u < kElts; ++u) {
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < kWidth; ++j) acc += taps.w[0][kHist - j] * g[u + j];
        dxf[u] = acc;
        sums[kWidth] += g[u];
#pragma unroll
        for (int j = 0; j < kWidth; ++j) sums[j] += g[u] * xf[u + j];
      }
      store_row<T, kElts>(dx, pos, l, dxf);
    }
  }
  sum_over_block(sums);  // every thread: shuffles and a barrier
  if (tid == 0) {
    const int64_t partial_row = b * num_segments + blockIdx.z;
    float* dw = reinterpret_cast<float*>(p.dweight_partial) + (partial_row * p.dim + c) * kWidth;
#pragma unroll
    for (int j = 0; j < kWidth; ++j) dw[j] = sums[j];
    reinterpret_cast<float*>(p.dbias_partial)[partial_row * p.dim + c] = sums[kWidth];
  }
}

// ------------------------------------------------------------------------------ channel-last
// kChannelsFastest: channel blocks on grid.x and row groups on grid.y, so that blocks running
// together cover whole rows (the launcher's choice while the row groups fit grid.y's 65535).
template <typename T, int kWidth, int kCh, int kRows, bool kChannelsFastest = false>
__global__ void __launch_bounds__(kLastThreads) forward_last_plain_kernel(ForwardParams p) {
  constexpr int kHist = kWidth - 1;
  using Raw = typename RawBits<kCh * sizeof(T)>::type;
  const unsigned channel_block = kChannelsFastest ? blockIdx.x : blockIdx.y;
  const unsigned row_group = kChannelsFastest ? blockIdx.y : blockIdx.x;
  const int64_t c0 = (static_cast<int64_t>(channel_block) * kLastThreads + threadIdx.x) * kCh;
  if (c0 >= p.dim) return;
  const int64_t b = blockIdx.z, t0 = int64_t{row_group} * kRows;  // last_grid
  const T* x = reinterpret_cast<const T*>(p.x) + b * p.x_batch_stride + c0;
  T* out = reinterpret_cast<T*>(p.out) + b * p.out_batch_stride + c0;
  const T* init = reinterpret_cast<const T*>(p.initial_states);

  // Rows t0 - (w-1) .. t0 + kRows - 1, kept in T until used (half the registers for 16-bit types).
  alignas(16) T raw[kHist + kRows][kCh];
#pragma unroll
  for (int r = 0; r < kHist + kRows; ++r) {
    const int64_t t = t0 - kHist + r;
    if (t >= 0 && t < p.seqlen) {
      *reinterpret_cast<Raw*>(raw[r]) = *reinterpret_cast<const Raw*>(x + t * p.x_l_stride);
    } else {
#pragma unroll
      for (int e = 0; e < kCh; ++e)  // before the row: initial-state slot w-1+t; past its end: unused
        raw[r][e] = (t < 0 && init) ? init[b * p.init_batch_stride + (c0 + e) * p.init_c_stride +
                                           (kHist + t) * p.init_l_stride]
                                    : from_float<T>(0.0f);
    }
  }
  const Taps<kWidth, kCh> taps(p, c0);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t t = t0 + r;
    if (t >= p.seqlen) break;
    float y[kCh];
#pragma unroll
    for (int e = 0; e < kCh; ++e) {
      float acc = taps.bias[e];
#pragma unroll
      for (int k = 0; k < kWidth; ++k) acc += taps.w[e][k] * to_float(raw[r + k][e]);
      y[e] = p.silu ? silu(acc) : acc;
    }
    store_floats<T, kCh>(out + t * p.out_l_stride, y);
  }
}

// Channel-last backward: a thread owns kCh channels of one segment of kSegmentRows positions and
// slides along it, kUnroll rows at a time (their x and dout loads issued together), keeping the
// last w-1 rows of x and of g in registers. Every row is loaded once by its thread (windows that
// re-read their halo rows ran slower), and the weight sums leave the thread as its own partial,
// with no in-block reduction. Rows past the segment (up to w-1) only feed the
// g window for the last outputs' dx.
template <typename T, int kWidth, int kCh, int kSegmentRows, int kUnroll>
__global__ void __launch_bounds__(kLastThreads) backward_last_sliding_kernel(BackwardParams p, int64_t segments) {
  constexpr int kHist = kWidth - 1;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * kLastThreads + threadIdx.x) * kCh;
  if (c0 >= p.dim) return;
  const int64_t b = blockIdx.z, segment = blockIdx.x;  // last_grid
  const int64_t l = p.seqlen;
  const int64_t t0 = segment * kSegmentRows;
  const int64_t t1 = t0 + kSegmentRows < l ? t0 + kSegmentRows : l;
  const T* x = reinterpret_cast<const T*>(p.x) + b * p.x_batch_stride + c0;
  const T* dout = reinterpret_cast<const T*>(p.dout) + b * p.dout_batch_stride + c0;
  T* dx = reinterpret_cast<T*>(p.dx) + b * p.dx_batch_stride + c0;
  const Taps<kWidth, kCh> taps(p, c0);
  float sums[kCh][kWidth + 1] = {};  // per channel: dweight[0..w-1], dbias

  float xwin[kHist][kCh];  // x rows t-(w-1) .. t-1 (zero before the row)
  float gwin[kHist][kCh];  // g rows t-(w-1) .. t-1 (only read once t - (w-1) >= t0)
#pragma unroll
  for (int r = 0; r < kHist; ++r) {
    const int64_t t = t0 - kHist + r;
    if (t >= 0) {
      load_floats<T, kCh>(x + t * p.x_l_stride, xwin[r]);
    } else {
#pragma unroll
      for (int e = 0; e < kCh; ++e) xwin[r][e] = 0.0f;
    }
#pragma unroll
    for (int e = 0; e < kCh; ++e) gwin[r][e] = 0.0f;
  }
  const int64_t last = t1 + kHist < l ? t1 + kHist : l;  // rows t0 .. last-1 are loaded
  for (int64_t tb = t0; tb < t1 + kHist; tb += kUnroll) {
    float xr[kUnroll][kCh], dr[kUnroll][kCh];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t t = tb + u;
      if (t < last) {
        load_floats<T, kCh>(x + t * p.x_l_stride, xr[u]);
        load_floats<T, kCh>(dout + t * p.dout_l_stride, dr[u]);
      } else {
#pragma unroll
        for (int e = 0; e < kCh; ++e) xr[u][e] = dr[u][e] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t t = tb + u;
      if (t >= t1 + kHist) break;
      float g[kCh], d[kCh];
#pragma unroll
      for (int e = 0; e < kCh; ++e) {
        float z = taps.bias[e] + taps.w[e][kHist] * xr[u][e];
#pragma unroll
        for (int k = 0; k < kHist; ++k) z += taps.w[e][k] * xwin[k][e];
        g[e] = p.silu ? dsilu(z, dr[u][e]) : dr[u][e];  // zero past the row's end (dout is)
        if (t < t1) {
          sums[e][kWidth] += g[e];
          sums[e][kHist] += g[e] * xr[u][e];
#pragma unroll
          for (int k = 0; k < kHist; ++k) sums[e][k] += g[e] * xwin[k][e];
        }
        // dx at t - (w-1): its taps' gradients are g rows t-(w-1) .. t
        float acc = taps.w[e][0] * g[e];
#pragma unroll
        for (int j = 0; j < kHist; ++j) acc += taps.w[e][kHist - j] * gwin[j][e];
        d[e] = acc;
      }
      if (t - kHist >= t0 && t - kHist < t1) store_floats<T, kCh>(dx + (t - kHist) * p.dx_l_stride, d);
#pragma unroll
      for (int k = 0; k + 1 < kHist; ++k) {
#pragma unroll
        for (int e = 0; e < kCh; ++e) {
          xwin[k][e] = xwin[k + 1][e];
          gwin[k][e] = gwin[k + 1][e];
        }
      }
#pragma unroll
      for (int e = 0; e < kCh; ++e) {
        xwin[kHist - 1][e] = xr[u][e];
        gwin[kHist - 1][e] = g[e];
      }
    }
  }
  const int64_t partial_row = b * segments + segment;
  float* dw = reinterpret_cast<float*>(p.dweight_partial) + (partial_row * p.dim + c0) * kWidth;
  float* db = reinterpret_cast<float*>(p.dbias_partial) + partial_row * p.dim + c0;
#pragma unroll
  for (int e = 0; e < kCh; ++e) {
#pragma unroll
    for (int k = 0; k < kWidth; ++k) dw[e * kWidth + k] = sums[e][k];
    db[e] = sums[e][kWidth];
  }
}

// Channel-last, tiled: a block owns Shape::kTileBytes of channels (e.g. 256 bytes: 128 bf16 or 64
// float32) and walks a segment of rows in tiles of Shape::kRows, each tile (with its halo rows)
// copied into shared memory by cp.async while the block computes the tile before (double-
// buffered). Global accesses are 16-byte vectors of whole row spans; the loads hold no registers in
// flight. In shared memory each thread takes one 4-byte word of channels (2 of a 16-bit type, 1
// float) of kRows / kRowGroups consecutive rows and slides along them with the window in
// registers, as the sliding kernels above do. Channel blocks are the grid's fastest axis, so blocks
// running together cover whole rows of x. Needs dim and the strides in multiples of 16 bytes.
template <int kTileBytes_, int kThreads_, int kRows_, int kMinBlocks_ = 1>
struct TileShape {
  static constexpr int kTileBytes = kTileBytes_, kThreads = kThreads_, kRows = kRows_, kMinBlocks = kMinBlocks_;
  static constexpr int kWords = kTileBytes / 4;           // threads across a tile's channels
  static constexpr int kRowGroups = kThreads / kWords;    // threads along its rows
  static constexpr int kPerThread = kRows / kRowGroups;   // consecutive rows per thread
  static_assert(kThreads % kWords == 0 && kRows % kRowGroups == 0, "threads and rows split evenly");
  template <typename T>
  __host__ __device__ static constexpr int channels() { return kTileBytes / sizeof(T); }
};
template <typename T> __host__ __device__ constexpr int word_channels() { return 4 / sizeof(T); }
// The tiled backward instead of the sliding one where both apply. (A tiled forward was removed on
// 2026-12-04: its best shape, 512-byte rows of 32-row tiles and 128 rows per block, took 193-206 us
// in three runs against the plain kernel's 177-181 with channel blocks fastest.) Tuning knobs
// (scripts/conv_variants.cu; H200): 256-byte rows of 32-row tiles, 256 rows per block, 365-395 us
// in 2026-12-04's runs (60-66% of copy; 128-byte rows of 64-row tiles 365-382, other shapes
// 369-469); 388 us on 2026-12-03, against 513 us for the sliding kernel. Tried on 2026-12-04
// (fifteenth session) and removed, against the tiled kernel's 374-376 us in the same runs: the
// forward's shape (a thread loads 2 channels at 16-32 rows plus both halos at once, sums added
// across the block's row threads) 510-883 us (16 rows best; at 32 rows 168-254 registers); a
// thread per (row, 4 channels) re-reading its w-1 neighbour rows from L1, gradients exchanged in
// shared memory (three buffers, one barrier per round), next round's loads in flight: 488-1000
// us (4 channels, 32 x 4 threads, 6 blocks per SM best; 2 or 8 channels 696-827).
constexpr bool kUseTiledLast = true;
using BackwardTile = TileShape<256, 128, 32, 5>;
constexpr int kTiledBackwardSegment = 256;

// Rows first_row .. first_row + kLoadRows - 1 of the block's channels [c_block, c_block +
// Shape::channels) into tile, as 16-byte cp.async copies; rows outside [0, l) and channels past dim
// become zeros, except rows before 0 when skip_before_start (the caller fills those: a copy's zeros
// could land after its stores). The caller commits.
template <typename T, typename Shape, int kLoadRows>
__device__ __forceinline__ void load_tile_async(T (*tile)[Shape::template channels<T>()], const T* rows,
                                                int64_t l_stride, int64_t first_row, int64_t l, int64_t c_block,
                                                int64_t dim, bool skip_before_start = false) {
  constexpr int kVecs = Shape::kTileBytes / 16, kElts = Vec16<T>::kElts;
  for (int i = threadIdx.x; i < kLoadRows * kVecs; i += Shape::kThreads) {
    const int r = i / kVecs, v = i % kVecs;
    const int64_t t = first_row + r, c = c_block + v * kElts;
    if (skip_before_start && t < 0) continue;
    const bool valid = t >= 0 && t < l && c < dim;
    async_copy16(&tile[r][v * kElts], valid ? rows + t * l_stride + c : rows, valid);
  }
}

// The double-buffered walk over a segment's tiles: body(tile, buffer) runs once tile's copies
// (load(tile, buffer), which commits them) have landed for the whole block, with tile + 1's in
// flight into the other buffer; a barrier after each body frees its buffer for the tile after next.
template <typename Load, typename Body>
__device__ __forceinline__ void for_each_tile(int64_t tiles, Load load, Body body) {
  load(int64_t{0}, 0);
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int buffer = static_cast<int>(tile & 1);
    if (tile + 1 < tiles) {
      load(tile + 1, buffer ^ 1);
      async_wait<1>();
    } else {
      async_wait<0>();
    }
    __syncthreads();
    body(tile, buffer);
    __syncthreads();
  }
}

// One 4-byte word of kCh channels at tile row r, as float.
template <typename T, int kRowElts, int kCh>
__device__ __forceinline__ void word_as_float(const T (*tile)[kRowElts], int r, int channel, float (&out)[kCh]) {
#pragma unroll
  for (int e = 0; e < kCh; ++e) out[e] = to_float(tile[r][channel + e]);
}

// A window of consecutive rows moved on by one: rows shift down a slot and tile row r enters last.
template <typename T, int kRowElts, int kRows, int kCh>
__device__ __forceinline__ void slide_window(float (&window)[kRows][kCh], const T (*tile)[kRowElts], int r, int channel) {
#pragma unroll
  for (int k = 0; k + 1 < kRows; ++k) {
#pragma unroll
    for (int e = 0; e < kCh; ++e) window[k][e] = window[k + 1][e];
  }
  word_as_float<T, kRowElts, kCh>(tile, r, channel, window[kRows - 1]);
}

// Backward: x rows t-(w-1) .. t+kRows+w-2 and dout rows t .. t+kRows+w-2 of each tile; a thread
// recomputes g for the w-1 rows past its own (the next thread's first rows) instead of exchanging
// them. Weight and bias sums: the row groups' sums are added in a fixed order through shared memory
// at the end, one partial per (segment, channel).
template <typename T, int kWidth, typename Shape>
__global__ void __launch_bounds__(Shape::kThreads, Shape::kMinBlocks) backward_last_tiled_kernel(BackwardParams p,
                                                                                                int64_t segment,
                                                                                                int64_t segments) {
  constexpr int kHist = kWidth - 1, kCh = word_channels<T>(), kRows = Shape::kRows;
  constexpr int kXRows = kRows + 2 * kHist, kDoutRows = kRows + kHist, kPerThread = Shape::kPerThread;
  constexpr int kTileWords = Shape::kWords, kRowGroups = Shape::kRowGroups, kRowElts = Shape::template channels<T>();
  __shared__ __align__(16) T x_tiles[2][kXRows][kRowElts];
  __shared__ __align__(16) T dout_tiles[2][kDoutRows][kRowElts];
  const int64_t c_block = int64_t{blockIdx.x} * kRowElts, b = blockIdx.z;  // last_tiled_grid
  const int64_t l = p.seqlen, seg_begin = int64_t{blockIdx.y} * segment;
  const int64_t seg_end = seg_begin + segment < l ? seg_begin + segment : l;
  const int word = threadIdx.x % kTileWords, group = threadIdx.x / kTileWords;
  const int channel = word * kCh, r0 = group * kPerThread;
  const int64_t c0 = c_block + channel;
  const bool active = c0 < p.dim;
  const T* x = reinterpret_cast<const T*>(p.x) + b * p.x_batch_stride;
  const T* dout = reinterpret_cast<const T*>(p.dout) + b * p.dout_batch_stride;
  T* dx = reinterpret_cast<T*>(p.dx) + b * p.dx_batch_stride + c0;
  const Taps<kWidth, kCh> taps(p, active ? c0 : 0);
  const int64_t tiles_in_segment = ceil_div(seg_end - seg_begin, kRows);
  float sums[kCh][kWidth + 1] = {};  // per channel: dweight[0..w-1], dbias

  auto load = [&](int64_t tile, int buffer) {
    const int64_t first = seg_begin + tile * kRows;
    load_tile_async<T, Shape, kXRows>(x_tiles[buffer], x, p.x_l_stride, first - kHist, l, c_block, p.dim);
    load_tile_async<T, Shape, kDoutRows>(dout_tiles[buffer], dout, p.dout_l_stride, first, l, c_block, p.dim);
    async_commit();
  };
  for_each_tile(tiles_in_segment, load, [&](int64_t tile, int buffer) {
    const T(*xs)[kRowElts] = x_tiles[buffer];
    const T(*ds)[kRowElts] = dout_tiles[buffer];
    const int64_t t_first = seg_begin + tile * kRows + r0;  // x tile row r0 + kHist, dout tile row r0
    // xwin[k]: x at t-(w-1)+k; gwin[j]: g at t-(w-1)+j (j < w-1), for the row t being computed.
    float xwin[kWidth][kCh], gwin[kHist][kCh];
#pragma unroll
    for (int k = 0; k < kHist; ++k) word_as_float<T, kRowElts, kCh>(xs, r0 + k, channel, xwin[k + 1]);
#pragma unroll
    for (int i = 0; i < kPerThread + kHist; ++i) {
      slide_window<T, kRowElts>(xwin, xs, r0 + i + kHist, channel);
      float g[kCh];
      word_as_float<T, kRowElts, kCh>(ds, r0 + i, channel, g);  // zero past the row's end
      const int64_t t = t_first + i;
      const bool own = i < kPerThread && t < seg_end;
#pragma unroll
      for (int e = 0; e < kCh; ++e) {
        if (p.silu) {
          float z = taps.bias[e];
#pragma unroll
          for (int k = 0; k < kWidth; ++k) z += taps.w[e][k] * xwin[k][e];
          g[e] = dsilu(z, g[e]);
        }
        if (own) {
          sums[e][kWidth] += g[e];
#pragma unroll
          for (int k = 0; k < kWidth; ++k) sums[e][k] += g[e] * xwin[k][e];
        }
      }
      if (i >= kHist) {  // dx at t - (w-1): the taps' gradients g at t-(w-1) .. t
        float d[kCh];
#pragma unroll
        for (int e = 0; e < kCh; ++e) {
          float acc = taps.w[e][0] * g[e];
#pragma unroll
          for (int j = 0; j < kHist; ++j) acc += taps.w[e][kHist - j] * gwin[j][e];
          d[e] = acc;
        }
        if (active && t - kHist < seg_end) store_floats<T, kCh>(dx + (t - kHist) * p.dx_l_stride, d);
      }
#pragma unroll
      for (int e = 0; e < kCh; ++e) {
#pragma unroll
        for (int j = 0; j + 1 < kHist; ++j) gwin[j][e] = gwin[j + 1][e];
        gwin[kHist - 1][e] = g[e];
      }
    }
  });
  // The row groups' sums, added in group order by group 0's threads.
  __shared__ float group_sums[kRowGroups][kTileWords][kCh * (kWidth + 1)];
#pragma unroll
  for (int e = 0; e < kCh; ++e) {
#pragma unroll
    for (int k = 0; k <= kWidth; ++k) group_sums[group][word][e * (kWidth + 1) + k] = sums[e][k];
  }
  __syncthreads();
  if (group == 0 && active) {
    const int64_t partial_row = b * segments + blockIdx.y;
    float* dw = reinterpret_cast<float*>(p.dweight_partial) + (partial_row * p.dim + c0) * kWidth;
    float* db = reinterpret_cast<float*>(p.dbias_partial) + partial_row * p.dim + c0;
#pragma unroll
    for (int e = 0; e < kCh; ++e) {
#pragma unroll
      for (int k = 0; k <= kWidth; ++k) {
        float total = group_sums[0][word][e * (kWidth + 1) + k];
        for (int gi = 1; gi < kRowGroups; ++gi) total += group_sums[gi][word][e * (kWidth + 1) + k];
        if (k < kWidth) dw[e * kWidth + k] = total; else db[e] = total;
      }
    }
  }
}

// ------------------------------------------------------------------------------ which path
// Unit stride along positions (channel-first) or channels (channel-last) for every tensor, base
// addresses and the other strides multiples of the vector.
struct Strided {
  std::uintptr_t base;
  int64_t batch_stride, c_stride, l_stride;
};

bool first_ok(std::initializer_list<Strided> tensors, int64_t elts, int64_t elt_bytes) {
  for (const Strided& t : tensors)
    if (t.l_stride != 1 || !aligned_to(t.base, elts * elt_bytes) || t.batch_stride % elts || t.c_stride % elts)
      return false;
  return true;
}

bool last_ok(std::initializer_list<Strided> tensors, int64_t dim, int64_t elts, int64_t elt_bytes) {
  if (dim % elts) return false;
  for (const Strided& t : tensors)
    if (t.c_stride != 1 || !aligned_to(t.base, elts * elt_bytes) || t.batch_stride % elts || t.l_stride % elts)
      return false;
  return true;
}

bool plain_forward(const ForwardParams& p) { return !p.seq_idx && !p.cu_seqlens && p.batch <= 65535; }
bool plain_backward(const BackwardParams& p) {
  return plain_forward(p) && !p.initial_states && !p.dfinal_states && !p.dinitial_states;
}

enum class Path { kGeneral, kFirst, kLast, kLastTiled };

template <typename T>
Path forward_path(const ForwardParams& p) {
  if (!plain_forward(p)) return Path::kGeneral;
  const Strided x{p.x, p.x_batch_stride, p.x_c_stride, p.x_l_stride};
  const Strided out{p.out, p.out_batch_stride, p.out_c_stride, p.out_l_stride};
  constexpr int64_t kElts = Vec16<T>::kElts;
  if (first_ok({x, out}, kElts, sizeof(T))) return Path::kFirst;
  if (last_ok({x, out}, p.dim, last_forward_channels<T>(), sizeof(T))) return Path::kLast;
  return Path::kGeneral;
}

template <typename T>
Path backward_path(const BackwardParams& p) {
  if (!plain_backward(p)) return Path::kGeneral;
  const Strided x{p.x, p.x_batch_stride, p.x_c_stride, p.x_l_stride};
  const Strided dout{p.dout, p.dout_batch_stride, p.dout_c_stride, p.dout_l_stride};
  const Strided dx{p.dx, p.dx_batch_stride, p.dx_c_stride, p.dx_l_stride};
  if (first_ok({x, dout, dx}, Vec16<T>::kElts, sizeof(T))) return Path::kFirst;
  if (kUseTiledLast && last_ok({x, dout, dx}, p.dim, Vec16<T>::kElts, sizeof(T))) return Path::kLastTiled;
  if (last_ok({x, dout, dx}, p.dim, kLastBackwardChannels, sizeof(T))) return Path::kLast;
  return Path::kGeneral;
}

// Threads per channel-first block: enough for the row, a power of two from 32 to max_threads
// (the backward's in-block sum is a tree over them).
int first_threads(int64_t seqlen, int per_thread, int max_threads) {
  const int64_t needed = ceil_div(seqlen, per_thread);
  int threads = 32;
  while (threads < max_threads && threads < needed) threads *= 2;
  return threads;
}

// Positions per channel-first block: `rounds` rounds of `per_round`, more when the row would need
// more than 65535 blocks (grid.y) otherwise.
int64_t first_segment(int64_t seqlen, int64_t per_round, int64_t rounds) {
  const int64_t needed = ceil_div(ceil_div(seqlen, per_round), 65535);
  const int64_t segment = per_round * (needed > rounds ? needed : rounds);
  if (segment > INT_MAX / 2) throw std::invalid_argument("causal_conv1d: rows too long for the channel-first grid");
  return segment;
}

// Blocks are (channel, batch row, segment) and (row group, channel block, batch row): the kernels
// read their coordinates from blockIdx instead of dividing a flat index (a 64-bit division costs
// more than a whole round of a block's work; per-block setup showed in the timings). Batches past
// grid.z's 65535 take the general kernels (plain_forward).
dim3 first_grid(const ForwardParams& p, int64_t segments, const char* name) {
  if (p.dim > INT_MAX || segments > 65535) throw std::invalid_argument(std::string(name) + ": input too large for the grid");
  return dim3(static_cast<unsigned>(p.dim), static_cast<unsigned>(p.batch), static_cast<unsigned>(segments));
}

dim3 last_grid(const ForwardParams& p, int64_t row_groups, int64_t channels_per_thread, const char* name) {
  const int64_t channel_blocks = ceil_div(p.dim / channels_per_thread, kLastThreads);
  if (row_groups > INT_MAX || channel_blocks > 65535)
    throw std::invalid_argument(std::string(name) + ": input too large for the channel-last grid");
  return dim3(static_cast<unsigned>(row_groups), static_cast<unsigned>(channel_blocks), static_cast<unsigned>(p.batch));
}

// Tiled channel-last blocks: (channel block, segment, batch row), channel blocks fastest. Segments
// grow past `rows` when grid.y's 65535 would not hold them.
int64_t last_tiled_segment(int64_t seqlen, int64_t rows) {
  const int64_t needed = ceil_div(ceil_div(seqlen, rows), 65535);
  return rows * needed;
}
template <typename T, typename Shape>
dim3 last_tiled_grid(const ForwardParams& p, int64_t segments, const char* name) {
  const int64_t channel_blocks = ceil_div(p.dim, int64_t{Shape::template channels<T>()});
  if (channel_blocks > INT_MAX || segments > 65535)
    throw std::invalid_argument(std::string(name) + ": input too large for the channel-last grid");
  return dim3(static_cast<unsigned>(channel_blocks), static_cast<unsigned>(segments), static_cast<unsigned>(p.batch));
}

// Channel-first backward blocks span one segment of a row: the weight/bias partial rows are
// batch * segments.
struct FirstBackwardShape {
  int threads;
  int64_t segment;
};
template <typename T>
FirstBackwardShape first_backward_shape(int64_t seqlen) {
  constexpr int kPer = Vec16<T>::kElts;
  const int threads = first_threads(seqlen, kPer, kFirstBackwardThreads);
  return {threads, first_segment(seqlen, int64_t{threads} * kPer, kFirstBackwardRounds)};
}

}  // namespace

bool forward_plain(const ForwardParams& p) {
  return SSMK_DISPATCH_FLOAT(p.dtype, "causal_conv1d_fwd", [&] {
    const Path path = forward_path<scalar_t>(p);
    if (path == Path::kGeneral) return false;
    if (p.batch == 0 || p.dim == 0 || p.seqlen == 0) return true;
    SSMK_DISPATCH_WIDTH(static_cast<int>(p.width), "causal_conv1d_fwd", [&] {
      constexpr int kElts = Vec16<scalar_t>::kElts;
      if (path == Path::kFirst) {
        const int threads = first_threads(p.seqlen, kElts, kFirstForwardThreads);
        const int64_t segment = first_segment(p.seqlen, int64_t{threads} * kElts, kFirstForwardRounds);
        const dim3 grid = first_grid(p, ceil_div(p.seqlen, segment), "causal_conv1d_fwd");
        forward_first_stream_kernel<scalar_t, kWidth, kFirstForwardMinBlocks, 1, kFirstForwardThreads>
            <<<grid, threads, 0, as_stream(p.stream)>>>(p, segment);
      } else {
        constexpr int kCh = last_forward_channels<scalar_t>();
        const int64_t row_groups = ceil_div(p.seqlen, kLastForwardRows);
        const dim3 grid = last_grid(p, row_groups, kCh, "causal_conv1d_fwd");
        if (row_groups <= 65535) {  // channel blocks fastest (grid.x), so blocks running together cover whole rows
          forward_last_plain_kernel<scalar_t, kWidth, kCh, kLastForwardRows, true>
              <<<dim3(grid.y, grid.x, grid.z), kLastThreads, 0, as_stream(p.stream)>>>(p);
        } else {
          forward_last_plain_kernel<scalar_t, kWidth, kCh, kLastForwardRows><<<grid, kLastThreads, 0, as_stream(p.stream)>>>(p);
        }
      }
      check_launch("causal_conv1d_fwd (whole rows)");
    });
    return true;
  });
}

int64_t backward_partial_rows(const BackwardParams& p) {
  return SSMK_DISPATCH_FLOAT(p.dtype, "causal_conv1d_bwd", [&]() -> int64_t {
    switch (backward_path<scalar_t>(p)) {
      case Path::kFirst: return p.batch * ceil_div(p.seqlen, first_backward_shape<scalar_t>(p.seqlen).segment);
      case Path::kLast: return p.batch * ceil_div(p.seqlen, kLastBackwardRows);
      case Path::kLastTiled: return p.batch * ceil_div(p.seqlen, last_tiled_segment(p.seqlen, kTiledBackwardSegment));
      default: return p.batch * ceil_div(p.seqlen, kBackwardTileL);
    }
  });
}

bool backward_plain(const BackwardParams& p) {
  return SSMK_DISPATCH_FLOAT(p.dtype, "causal_conv1d_bwd", [&] {
    const Path path = backward_path<scalar_t>(p);
    if (path == Path::kGeneral) return false;
    if (p.batch == 0 || p.dim == 0 || p.seqlen == 0) return true;
    SSMK_DISPATCH_WIDTH(static_cast<int>(p.width), "causal_conv1d_bwd", [&] {
      if (path == Path::kFirst) {
        const FirstBackwardShape shape = first_backward_shape<scalar_t>(p.seqlen);
        const int64_t segments = ceil_div(p.seqlen, shape.segment);
        const dim3 grid = first_grid(p, segments, "causal_conv1d_bwd");
        backward_first_kernel<scalar_t, kWidth, kFirstBackwardMinBlocks, kFirstBackwardThreads>
            <<<grid, shape.threads, 0, as_stream(p.stream)>>>(p, shape.segment, segments);
      } else if (path == Path::kLastTiled) {
        const int64_t segment = last_tiled_segment(p.seqlen, kTiledBackwardSegment);
        const int64_t segments = ceil_div(p.seqlen, segment);
        const dim3 grid = last_tiled_grid<scalar_t, BackwardTile>(p, segments, "causal_conv1d_bwd");
        backward_last_tiled_kernel<scalar_t, kWidth, BackwardTile>
            <<<grid, BackwardTile::kThreads, 0, as_stream(p.stream)>>>(p, segment, segments);
      } else {
        const int64_t segments = ceil_div(p.seqlen, kLastBackwardRows);
        const dim3 grid = last_grid(p, segments, kLastBackwardChannels, "causal_conv1d_bwd");
        backward_last_sliding_kernel<scalar_t, kWidth, kLastBackwardChannels, kLastBackwardRows, kLastBackwardUnroll>
            <<<grid, kLastThreads, 0, as_stream(p.stream)>>>(p, segments);
      }
      check_launch("causal_conv1d_bwd (whole rows)");
    });
    return true;
  });
}

}  // namespace conv
}  // namespace ssmk
