// causal_conv1d on whole rows (SPEC.md section 1): the common training case, as a copy kernel.
//
// "Plain" calls have no seq_idx and no cu_seqlens (the forward may have initial states; the
// backward has neither initial states nor final-state gradients), and their tensors allow aligned
// vector accesses along the contiguous axis. For them each thread loads everything it needs in one
// go: its own vectors plus the w-1 neighbours on each side, which it re-reads (they are its
// neighbour threads' vectors, served from L1/L2) instead of exchanging them through shared memory.
// No barrier stands between a thread's loads and its stores and every load is issued before the
// first result is computed, so the kernels keep as many bytes in flight as a copy does. The
// general kernels (causal_conv1d_fwd_channel_*.cu, causal_conv1d_bwd.cu) handle everything else.
//
// The backward leaves one float32 weight/bias partial sum per (block segment, channel), reduced in
// a fixed order inside the block and summed in a fixed order afterwards: bitwise reproducible.
#include <climits>
#include <stdexcept>
#include <string>

#include "causal_conv1d/causal_conv1d.h"
#include "causal_conv1d/kernel_utils.cuh"
#include "common.h"

namespace ssmk {
namespace conv {
namespace {

// Channel-first: a block walks a segment of one (batch, channel) row; each thread takes kVecs 16-byte
// vectors of it. The forward holds 4 (64 bytes in flight per thread plus the halo); the backward,
// which also loads dout and keeps gradients, 2.
constexpr int kFirstThreadsMax = 128;
constexpr int kFirstForwardVecs = 4;
constexpr int kFirstBackwardVecs = 2;
constexpr bool kFirstShuffle = true;  // halos by warp shuffle (see halo_before)
// Channel-last forward: a thread owns one 16-byte vector of channels at kLastForwardRows positions
// and loads those rows plus the w-1 before them at once.
constexpr int kLastThreads = 128;
constexpr int kLastForwardChannels = 8;  // 16 bytes of a 16-bit type
constexpr int kLastForwardRows = 8;
template <typename T>
constexpr int last_forward_channels() {  // at most one 16-byte vector
  return kLastForwardChannels < Vec16<T>::kElts ? kLastForwardChannels : Vec16<T>::kElts;
}
// Channel-last backward: 4 channels per thread (its float gradients and weight sums must fit in
// registers), kLastBackwardRows positions per step; the block's 4 warps take interleaved steps, so
// a step's halo rows are the neighbouring warp's own rows (L1 hits), and each thread runs
// kLastBackwardSteps steps to keep the partial sums few.
constexpr int kLastBackwardChannels = 4;
constexpr int kLastBackwardRows = 4;
constexpr int kLastBackwardLanes = 4;  // warps per block along the positions
constexpr int kLastBackwardSteps = 16;
constexpr int kLastBackwardSegment = kLastBackwardRows * kLastBackwardLanes * kLastBackwardSteps;

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

// n consecutive values at positions pos.. of a row with unit stride: one vector when it lies inside
// the row (pos + n <= len), else element by element with zeros past the end.
template <typename T, int kN>
__device__ __forceinline__ void load_row(const T* row, int64_t pos, int64_t len, float* out) {
  if (pos + kN <= len) {
    load_floats<T, kN>(row + pos, out);
  } else {
#pragma unroll
    for (int i = 0; i < kN; ++i) out[i] = pos + i < len ? to_float(row[pos + i]) : 0.0f;
  }
}

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

// In-block sum of kValues floats per thread over the `lanes` threads (a power of two, at most
// kMaxLanes) that share `slot` (a channel) and differ in `lane` (their positions): a tree in a fixed
// order, so the result is bitwise reproducible; lane 0 holds the sums afterwards. Shared memory and
// barriers only (no shuffles), so the host emulation of the tests runs it as it is.
template <int kValues, int kMaxLanes, int kSlots>
__device__ __forceinline__ void sum_over_lanes(float (&values)[kValues], int slot, int lane, int lanes) {
  __shared__ float partial[kMaxLanes][kValues][kSlots];
#pragma unroll
  for (int v = 0; v < kValues; ++v) partial[lane][v][slot] = values[v];
  __syncthreads();
  for (int stride = lanes / 2; stride > 0; stride /= 2) {
    if (lane < stride) {
#pragma unroll
      for (int v = 0; v < kValues; ++v) partial[lane][v][slot] += partial[lane + stride][v][slot];
    }
    __syncthreads();
  }
  if (lane == 0) {
#pragma unroll
    for (int v = 0; v < kValues; ++v) values[v] = partial[0][v][slot];
  }
}

// ------------------------------------------------------------------------------ channel-first
// A block of T threads covers a segment of T * kVecs vectors of a row; thread t takes vectors
// t, T + t, 2T + t, ... so that each load instruction of a warp reads 512 contiguous bytes (a thread
// owning consecutive vectors made every instruction touch twice the sectors, and ran at half the
// copy bandwidth). The w-1 positions before a vector end the previous vector, which the lane before
// holds: with kShuffle they come from it by a warp shuffle (lane 0 loads them), else every lane
// reloads them (L1/L2 traffic). Every lane runs every shuffle (positions past the row are masked,
// not skipped).
template <bool kShuffle, int kHist, int kElts, typename T>
__device__ __forceinline__ void halo_before(const T* row, int64_t pos, int64_t len, const float* own, float* halo) {
  if constexpr (kShuffle) {
#pragma unroll
    for (int k = 0; k < kHist; ++k) halo[k] = __shfl_up_sync(0xffffffffu, own[kElts - kHist + k], 1);
    if (threadIdx.x % 32 != 0) return;
  }
  float before[kElts];  // (past the row's end the halo is not used)
  if (pos > 0 && pos <= len) load_floats<T, kElts>(row + pos - kElts, before);
#pragma unroll
  for (int k = 0; k < kHist; ++k) halo[k] = pos > 0 ? before[kElts - kHist + k] : 0.0f;
}

// The w-1 positions after a vector (zero past the row's end): the next lane's first ones.
template <bool kShuffle, int kHist, int kElts, typename T>
__device__ __forceinline__ void halo_after(const T* row, int64_t pos, int64_t len, const float* own, float* halo) {
  if constexpr (kShuffle) {
#pragma unroll
    for (int k = 0; k < kHist; ++k) halo[k] = __shfl_down_sync(0xffffffffu, own[k], 1);
    if (threadIdx.x % 32 != 31) return;
  }
  float after[kElts];
  load_row<T, kElts>(row, pos + kElts, len, after);
#pragma unroll
  for (int k = 0; k < kHist; ++k) halo[k] = after[k];
}

template <typename T, int kWidth, int kVecs, bool kShuffle>
__global__ void __launch_bounds__(kFirstThreadsMax) forward_first_plain_kernel(ForwardParams p, int64_t segment) {
  constexpr int kElts = Vec16<T>::kElts;
  constexpr int kHist = kWidth - 1;
  static_assert(kElts >= kHist, "the halo fits in one vector");
  const int64_t b = static_cast<int64_t>(blockIdx.x) / p.dim, c = static_cast<int64_t>(blockIdx.x) % p.dim;
  const int64_t base = blockIdx.y * segment;
  const T* x = reinterpret_cast<const T*>(p.x) + b * p.x_batch_stride + c * p.x_c_stride;
  T* out = reinterpret_cast<T*>(p.out) + b * p.out_batch_stride + c * p.out_c_stride;
  const T* init = reinterpret_cast<const T*>(p.initial_states);

  float xf[kVecs][kHist + kElts];  // per vector: the w-1 positions before it, then its own
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const int64_t pos = base + (static_cast<int64_t>(v) * blockDim.x + threadIdx.x) * kElts;
    load_row<T, kElts>(x, pos, p.seqlen, xf[v] + kHist);  // zeros past the row's end
  }
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const int64_t pos = base + (static_cast<int64_t>(v) * blockDim.x + threadIdx.x) * kElts;
    halo_before<kShuffle, kHist, kElts>(x, pos, p.seqlen, xf[v] + kHist, xf[v]);
    if (pos == 0 && init) {
#pragma unroll
      for (int k = 0; k < kHist; ++k)
        xf[v][k] = to_float(init[b * p.init_batch_stride + c * p.init_c_stride + k * p.init_l_stride]);
    }
  }
  const Taps<kWidth, 1> taps(p, c);
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const int64_t pos = base + (static_cast<int64_t>(v) * blockDim.x + threadIdx.x) * kElts;
    if (pos >= p.seqlen) break;
    // Last output first: output i reads xf[i .. i + w-1] and lands in xf[i + w-1], above them all.
#pragma unroll
    for (int i = kElts - 1; i >= 0; --i) {
      float acc = taps.bias[0];
#pragma unroll
      for (int k = 0; k < kWidth; ++k) acc += taps.w[0][k] * xf[v][i + k];
      xf[v][kHist + i] = p.silu ? silu(acc) : acc;
    }
    store_row<T, kElts>(out, pos, p.seqlen, xf[v] + kHist);
  }
}

template <typename T, int kWidth, int kVecs, bool kShuffle>
__global__ void __launch_bounds__(kFirstThreadsMax) backward_first_plain_kernel(BackwardParams p, int64_t segment,
                                                                                int64_t num_segments) {
  constexpr int kElts = Vec16<T>::kElts;
  constexpr int kHist = kWidth - 1;
  static_assert(kElts >= kHist, "the halo fits in one vector");
  const int64_t b = static_cast<int64_t>(blockIdx.x) / p.dim, c = static_cast<int64_t>(blockIdx.x) % p.dim;
  const int64_t base = blockIdx.y * segment;
  const int64_t l = p.seqlen;
  const T* x = reinterpret_cast<const T*>(p.x) + b * p.x_batch_stride + c * p.x_c_stride;
  const T* dout = reinterpret_cast<const T*>(p.dout) + b * p.dout_batch_stride + c * p.dout_c_stride;
  T* dx = reinterpret_cast<T*>(p.dx) + b * p.dx_batch_stride + c * p.dx_c_stride;
  float sums[kWidth + 1] = {};  // dweight[0..w-1], dbias

  // Per vector: x at pos - (w-1) .. pos + kElts + w - 2 and dout at pos .. pos + kElts + w - 2
  // (zero outside the row); the neighbours' parts come from the vectors before and after.
  float xf[kVecs][kHist + kElts + kHist];
  float g[kVecs][kElts + kHist];
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const int64_t pos = base + (static_cast<int64_t>(v) * blockDim.x + threadIdx.x) * kElts;
    load_row<T, kElts>(x, pos, l, xf[v] + kHist);
    load_row<T, kElts>(dout, pos, l, g[v]);
  }
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const int64_t pos = base + (static_cast<int64_t>(v) * blockDim.x + threadIdx.x) * kElts;
    halo_before<kShuffle, kHist, kElts>(x, pos, l, xf[v] + kHist, xf[v]);
    halo_after<kShuffle, kHist, kElts>(x, pos, l, xf[v] + kHist, xf[v] + kHist + kElts);
    halo_after<kShuffle, kHist, kElts>(dout, pos, l, g[v], g[v] + kElts);
  }
  const Taps<kWidth, 1> taps(p, c);
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const int64_t pos = base + (static_cast<int64_t>(v) * blockDim.x + threadIdx.x) * kElts;
    if (pos >= l) break;
    if (p.silu) {  // past the row's end dout is zero, and so is g
#pragma unroll
      for (int i = 0; i < kElts + kHist; ++i) {
        float z = taps.bias[0];
#pragma unroll
        for (int k = 0; k < kWidth; ++k) z += taps.w[0][k] * xf[v][i + k];
        g[v][i] = dsilu(z, g[v][i]);
      }
    }
    float dxf[kElts];
#pragma unroll
    for (int u = 0; u < kElts; ++u) {
      float acc = 0.0f;
#pragma unroll
      for (int j = 0; j < kWidth; ++j) acc += taps.w[0][kHist - j] * g[v][u + j];
      dxf[u] = acc;
      sums[kWidth] += g[v][u];
#pragma unroll
      for (int k = 0; k < kWidth; ++k) sums[k] += g[v][u] * xf[v][u + k];
    }
    store_row<T, kElts>(dx, pos, l, dxf);
  }
  sum_over_lanes<kWidth + 1, kFirstThreadsMax, 1>(sums, 0, threadIdx.x, blockDim.x);  // every thread: barriers
  if (threadIdx.x == 0) {
    const int64_t partial_row = b * num_segments + blockIdx.y;
    float* dw = reinterpret_cast<float*>(p.dweight_partial) + (partial_row * p.dim + c) * kWidth;
#pragma unroll
    for (int k = 0; k < kWidth; ++k) dw[k] = sums[k];
    reinterpret_cast<float*>(p.dbias_partial)[partial_row * p.dim + c] = sums[kWidth];
  }
}

// ------------------------------------------------------------------------------ channel-last
template <typename T, int kWidth, int kCh, int kRows>
__global__ void __launch_bounds__(kLastThreads) forward_last_plain_kernel(ForwardParams p, int64_t row_groups) {
  constexpr int kHist = kWidth - 1;
  using Raw = typename RawBits<kCh * sizeof(T)>::type;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * kLastThreads + threadIdx.x) * kCh;
  if (c0 >= p.dim) return;
  const int64_t b = static_cast<int64_t>(blockIdx.x) / row_groups;
  const int64_t t0 = (static_cast<int64_t>(blockIdx.x) % row_groups) * kRows;
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

template <typename T, int kWidth, int kCh, int kRows, int kSteps>
__global__ void __launch_bounds__(kLastThreads) backward_last_plain_kernel(BackwardParams p, int64_t segments) {
  constexpr int kHist = kWidth - 1;
  constexpr int kSegment = kRows * kLastBackwardLanes * kSteps;
  constexpr int kSlots = kLastThreads / kLastBackwardLanes;  // channel vectors per block
  const int slot = threadIdx.x % kSlots, lane = threadIdx.x / kSlots;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * kSlots + slot) * kCh;
  const int64_t b = static_cast<int64_t>(blockIdx.x) / segments;
  const int64_t segment = static_cast<int64_t>(blockIdx.x) % segments;
  const int64_t l = p.seqlen;
  float sums[kCh * (kWidth + 1)] = {};  // per channel: dweight[0..w-1], dbias

  if (c0 < p.dim) {
    const T* x = reinterpret_cast<const T*>(p.x) + b * p.x_batch_stride + c0;
    const T* dout = reinterpret_cast<const T*>(p.dout) + b * p.dout_batch_stride + c0;
    T* dx = reinterpret_cast<T*>(p.dx) + b * p.dx_batch_stride + c0;
    const Taps<kWidth, kCh> taps(p, c0);
    for (int step = 0; step < kSteps; ++step) {
      const int64_t t0 = segment * kSegment + (static_cast<int64_t>(step) * kLastBackwardLanes + lane) * kRows;
      if (t0 >= l) break;
      float xr[kHist + kRows + kHist][kCh];  // x rows t0 - (w-1) .. t0 + kRows + w - 2 (zero outside)
      float g[kRows + kHist][kCh];           // dout rows t0 .. t0 + kRows + w - 2, then d(pre-activation)
#pragma unroll
      for (int r = 0; r < kHist + kRows + kHist; ++r) {
        const int64_t t = t0 - kHist + r;
        if (t >= 0 && t < l) {
          load_floats<T, kCh>(x + t * p.x_l_stride, xr[r]);
        } else {
#pragma unroll
          for (int e = 0; e < kCh; ++e) xr[r][e] = 0.0f;
        }
      }
#pragma unroll
      for (int r = 0; r < kRows + kHist; ++r) {
        const int64_t t = t0 + r;
        if (t < l) {
          load_floats<T, kCh>(dout + t * p.dout_l_stride, g[r]);
        } else {
#pragma unroll
          for (int e = 0; e < kCh; ++e) g[r][e] = 0.0f;
        }
      }
#pragma unroll
      for (int e = 0; e < kCh; ++e) {
        if (p.silu) {
#pragma unroll
          for (int r = 0; r < kRows + kHist; ++r) {
            float z = taps.bias[e];
#pragma unroll
            for (int k = 0; k < kWidth; ++k) z += taps.w[e][k] * xr[r + k][e];
            g[r][e] = dsilu(z, g[r][e]);
          }
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          sums[e * (kWidth + 1) + kWidth] += g[r][e];
#pragma unroll
          for (int k = 0; k < kWidth; ++k) sums[e * (kWidth + 1) + k] += g[r][e] * xr[r + k][e];
        }
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int64_t t = t0 + r;
        if (t >= l) break;
        float d[kCh];
#pragma unroll
        for (int e = 0; e < kCh; ++e) {
          float acc = 0.0f;
#pragma unroll
          for (int j = 0; j < kWidth; ++j) acc += taps.w[e][kHist - j] * g[r + j][e];
          d[e] = acc;
        }
        store_floats<T, kCh>(dx + t * p.dx_l_stride, d);
      }
    }
  }
  sum_over_lanes<kCh * (kWidth + 1), kLastBackwardLanes, kSlots>(sums, slot, lane, kLastBackwardLanes);  // every thread: barriers
  if (lane == 0 && c0 < p.dim) {
    const int64_t partial_row = b * segments + segment;
    float* dw = reinterpret_cast<float*>(p.dweight_partial) + (partial_row * p.dim + c0) * kWidth;
    float* db = reinterpret_cast<float*>(p.dbias_partial) + partial_row * p.dim + c0;
#pragma unroll
    for (int e = 0; e < kCh; ++e) {
#pragma unroll
      for (int k = 0; k < kWidth; ++k) dw[e * kWidth + k] = sums[e * (kWidth + 1) + k];
      db[e] = sums[e * (kWidth + 1) + kWidth];
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

bool plain_forward(const ForwardParams& p) { return !p.seq_idx && !p.cu_seqlens; }
bool plain_backward(const BackwardParams& p) {
  return plain_forward(p) && !p.initial_states && !p.dfinal_states && !p.dinitial_states;
}

enum class Path { kGeneral, kFirst, kLast };

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
  if (last_ok({x, dout, dx}, p.dim, kLastBackwardChannels, sizeof(T))) return Path::kLast;
  return Path::kGeneral;
}

// Threads per channel-first block: enough for the row, a power of two from 32 to kFirstThreadsMax
// (the backward's in-block sum is a tree over them).
int first_threads(int64_t seqlen, int per_thread) {
  const int64_t needed = ceil_div(seqlen, per_thread);
  int threads = 32;
  while (threads < kFirstThreadsMax && threads < needed) threads *= 2;
  return threads;
}

dim3 first_grid(int64_t rows, int64_t segments, const char* name) {
  if (rows > INT_MAX || segments > 65535) throw std::invalid_argument(std::string(name) + ": input too large for the grid");
  return dim3(static_cast<unsigned>(rows), static_cast<unsigned>(segments));
}

// Channel-first backward blocks span one segment of a row: the weight/bias partial rows are
// batch * segments.
template <typename T>
int64_t first_backward_segment(int64_t seqlen) {
  return int64_t{first_threads(seqlen, kFirstBackwardVecs * Vec16<T>::kElts)} * kFirstBackwardVecs * Vec16<T>::kElts;
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
        const int threads = first_threads(p.seqlen, kFirstForwardVecs * kElts);
        const int64_t segment = int64_t{threads} * kFirstForwardVecs * kElts;
        const dim3 grid = first_grid(p.batch * p.dim, ceil_div(p.seqlen, segment), "causal_conv1d_fwd");
        forward_first_plain_kernel<scalar_t, kWidth, kFirstForwardVecs, kFirstShuffle><<<grid, threads, 0, as_stream(p.stream)>>>(p, segment);
      } else {
        const int64_t row_groups = ceil_div(p.seqlen, kLastForwardRows);
        constexpr int kCh = last_forward_channels<scalar_t>();
        const int64_t channel_blocks = ceil_div(p.dim / kCh, kLastThreads);
        if (p.batch * row_groups > INT_MAX || channel_blocks > 65535)
          throw std::invalid_argument("causal_conv1d_fwd: input too large for the channel-last grid");
        const dim3 grid(static_cast<unsigned>(p.batch * row_groups), static_cast<unsigned>(channel_blocks));
        forward_last_plain_kernel<scalar_t, kWidth, kCh, kLastForwardRows><<<grid, kLastThreads, 0, as_stream(p.stream)>>>(p, row_groups);
      }
      check_launch("causal_conv1d_fwd (whole rows)");
    });
    return true;
  });
}

int64_t backward_partial_rows(const BackwardParams& p) {
  return SSMK_DISPATCH_FLOAT(p.dtype, "causal_conv1d_bwd", [&]() -> int64_t {
    switch (backward_path<scalar_t>(p)) {
      case Path::kFirst: return p.batch * ceil_div(p.seqlen, first_backward_segment<scalar_t>(p.seqlen));
      case Path::kLast: return p.batch * ceil_div(p.seqlen, kLastBackwardSegment);
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
        const int64_t segment = first_backward_segment<scalar_t>(p.seqlen);
        const int threads = static_cast<int>(segment / (kFirstBackwardVecs * Vec16<scalar_t>::kElts));
        const int64_t segments = ceil_div(p.seqlen, segment);
        const dim3 grid = first_grid(p.batch * p.dim, segments, "causal_conv1d_bwd");
        backward_first_plain_kernel<scalar_t, kWidth, kFirstBackwardVecs, kFirstShuffle><<<grid, threads, 0, as_stream(p.stream)>>>(p, segment, segments);
      } else {
        const int64_t segments = ceil_div(p.seqlen, kLastBackwardSegment);
        const int64_t channel_blocks = ceil_div(p.dim / kLastBackwardChannels, kLastThreads / kLastBackwardLanes);
        if (p.batch * segments > INT_MAX || channel_blocks > 65535)
          throw std::invalid_argument("causal_conv1d_bwd: input too large for the channel-last grid");
        const dim3 grid(static_cast<unsigned>(p.batch * segments), static_cast<unsigned>(channel_blocks));
        backward_last_plain_kernel<scalar_t, kWidth, kLastBackwardChannels, kLastBackwardRows, kLastBackwardSteps><<<grid, kLastThreads, 0, as_stream(p.stream)>>>(p, segments);
      }
      check_launch("causal_conv1d_bwd (whole rows)");
    });
    return true;
  });
}

}  // namespace conv
}  // namespace ssmk
