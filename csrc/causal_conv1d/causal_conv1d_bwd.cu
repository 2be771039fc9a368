// causal_conv1d backward (SPEC.md section 1): dx, weight/bias partial sums, d(initial states).
//
// One block per (batch row, tile of kTileL positions, tile of kTileC channels). It stages x (with a
// w-1 halo on both sides) in shared memory with coalesced loads along whichever axis is contiguous,
// computes g = dout * act'(z) for its positions and the w-1 after them (recomputing z), then
//   dx[u]       = sum_j weight[w-1-j] * g[u+j]   over u+j in u's sequence  (+ dfinal where u is a final-state input)
//   dweight[k] += sum_t g[t] * xx[t-(w-1)+k],   dbias += sum_t g[t]        (over its own positions t)
// Weight and bias sums leave the block as one partial per (block, channel), summed in a fixed order
// afterwards (sum_param_partials_kernel, when dweight is given): no atomics, bitwise reproducible.
// A second small kernel computes d(initial states).
//
// Sequences: each position carries a key (its seq_idx, its cu_seqlens sequence, or 0); an input
// reaches an output only with the same key. Inputs before a sequence's start come from the initial
// states when that sequence has them (the row's first with seq_idx, every one with cu_seqlens).
// Calls with none of seq_idx, cu_seqlens, initial states and final-state gradients (training on
// whole rows, the common case) run the kPlain instantiation: no keys, no per-tap sequence checks.
#include <climits>
#include <stdexcept>
#include <string>

#include "causal_conv1d/causal_conv1d.h"
#include "causal_conv1d/kernel_utils.cuh"
#include "common.h"

namespace ssmk {
namespace conv {
namespace {

constexpr int kTileC = 32;
constexpr int kBwdThreads = 256;
constexpr int kGroups = kBwdThreads / kTileC;  // position groups per channel
static_assert(kBackwardTileL % kGroups == 0, "positions split evenly over the groups");

__device__ __forceinline__ int64_t find_sequence(const int32_t* cu, int64_t num_seqs, int64_t pos) {
  int64_t lo = 0, hi = num_seqs - 1;  // largest j with cu[j] <= pos (skips empty sequences)
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (cu[mid] <= pos) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// xx at position v as seen by an output at t (v <= t, v >= t-(w-1)); key_t, key_v are the sequence
// keys of t and v. `x_at(v)` reads x (v inside the row); initial states come from global memory.
template <typename T, int kHist, typename XAt>
__device__ __forceinline__ float input_for(const BackwardParams& p, int64_t row, int64_t c, int64_t v, int key_t,
                                           int key_v, int seq_first, XAt x_at) {
  const T* init = reinterpret_cast<const T*>(p.initial_states);
  if (p.cu_seqlens) {
    const int64_t start = reinterpret_cast<const int32_t*>(p.cu_seqlens)[key_t];
    if (v >= start) return x_at(v);
    return init ? to_float(init[key_t * p.init_batch_stride + c * p.init_c_stride + (kHist + v - start) * p.init_l_stride])
                : 0.0f;
  }
  if (v >= 0) return key_v == key_t ? x_at(v) : 0.0f;
  if (!init || (p.seq_idx && key_t != seq_first)) return 0.0f;
  return to_float(init[row * p.init_batch_stride + c * p.init_c_stride + (kHist + v) * p.init_l_stride]);
}

template <typename T, int kWidth, bool kPlain>
__global__ void __launch_bounds__(kBwdThreads) backward_kernel(BackwardParams p, int64_t num_l_blocks) {
  constexpr int kHist = kWidth - 1;
  constexpr int kX = kBackwardTileL + 2 * kHist;  // x at u0 - (w-1) .. u0 + L + w - 2
  constexpr int kG = kBackwardTileL + kHist;      // g at u0 .. u0 + L + w - 2
  __shared__ float xs[kTileC][kX + 1];
  __shared__ float gs[kTileC][kG + 1];
  __shared__ int keys[kX];
  __shared__ float dxs[kTileC][kBackwardTileL + 1];  // dx, written out coalesced at the end
  __shared__ float ws[kTileC][kWidth + 1];
  __shared__ float red[kGroups][kTileC][kWidth + 1];

  const int tid = threadIdx.x;
  const int64_t row = static_cast<int64_t>(blockIdx.x) / num_l_blocks;
  const int64_t u0 = (static_cast<int64_t>(blockIdx.x) % num_l_blocks) * kBackwardTileL;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTileC;
  const int64_t l = p.seqlen;
  const int32_t* cu = reinterpret_cast<const int32_t*>(p.cu_seqlens);
  const int32_t* seq = p.seq_idx ? reinterpret_cast<const int32_t*>(p.seq_idx) + row * p.seq_batch_stride : nullptr;
  const T* x = reinterpret_cast<const T*>(p.x) + row * p.x_batch_stride;
  const T* dout = reinterpret_cast<const T*>(p.dout) + row * p.dout_batch_stride;
  const int seq_first = seq ? seq[0] : 0;
  const int seq_last = seq ? seq[(l - 1) * p.seq_l_stride] : 0;

  if constexpr (!kPlain) {
    for (int i = tid; i < kX; i += kBwdThreads) {
      const int64_t v = u0 - kHist + i;
      int key = INT_MIN;  // outside the row: never equal to a real key
      if (v >= 0 && v < l) key = cu ? static_cast<int>(find_sequence(cu, p.num_seqs, v)) : (seq ? seq[v * p.seq_l_stride] : 0);
      keys[i] = key;
    }
  }
  for (int i = tid; i < kTileC * (kWidth + 1); i += kBwdThreads) {
    const int c = i / (kWidth + 1), k = i % (kWidth + 1);
    const int64_t cc = c0 + c < p.dim ? c0 + c : p.dim - 1;
    ws[c][k] = k < kWidth ? load_as_float(p.weight, p.weight_dtype, cc * p.weight_c_stride + k * p.weight_width_stride)
                          : (p.bias ? load_as_float(p.bias, p.bias_dtype, cc * p.bias_stride) : 0.0f);
  }
  // Coalesced along the contiguous axis: positions fastest for channel-first x, channels otherwise.
  const bool positions_fastest = p.x_l_stride == 1;
  for (int i = tid; i < kTileC * kX; i += kBwdThreads) {
    const int c = positions_fastest ? i / kX : i % kTileC;
    const int j = positions_fastest ? i % kX : i / kTileC;
    const int64_t v = u0 - kHist + j, cc = c0 + c;
    xs[c][j] = (cc < p.dim && v >= 0 && v < l) ? to_float(x[cc * p.x_c_stride + v * p.x_l_stride]) : 0.0f;
  }
  __syncthreads();

  auto input = [&](int c, int64_t t, int64_t v) -> float {
    if constexpr (kPlain) {
      return xs[c][v - u0 + kHist];  // staged as zero outside the row
    } else {
      return input_for<T, kHist>(p, row, c0 + c, v, keys[t - u0 + kHist], keys[v - u0 + kHist], seq_first,
                                 [&](int64_t pos) { return xs[c][pos - u0 + kHist]; });
    }
  };
  const bool dout_positions_fastest = p.dout_l_stride == 1;
  for (int i = tid; i < kTileC * kG; i += kBwdThreads) {
    const int c = dout_positions_fastest ? i / kG : i % kTileC;
    const int j = dout_positions_fastest ? i % kG : i / kTileC;
    const int64_t t = u0 + j, cc = c0 + c;
    float g = 0.0f;
    if (cc < p.dim && t < l) {
      g = to_float(dout[cc * p.dout_c_stride + t * p.dout_l_stride]);
      if (p.silu) {
        float z = ws[c][kWidth];
#pragma unroll
        for (int k = 0; k < kWidth; ++k) z += ws[c][k] * input(c, t, t - kHist + k);
        g = dsilu(z, g);
      }
    }
    gs[c][j] = g;
  }
  __syncthreads();

  const int c = tid % kTileC, group = tid / kTileC;
  const int64_t cc = c0 + c;
  float dw[kWidth] = {}, db = 0.0f;
  constexpr int kPerGroup = kBackwardTileL / kGroups;
  const T* dfinal = reinterpret_cast<const T*>(p.dfinal_states);
  if constexpr (kPlain) {
    // Each thread walks kPerGroup consecutive positions of one channel: the taps slide through
    // registers (two shared-memory reads per position instead of 2 w + 1).
    const int j0 = group * kPerGroup;
    float wr[kWidth], xw[kWidth], gw[kWidth];  // xw[k] = x at u - (w-1) + k, gw[i] = g at u + i
#pragma unroll
    for (int k = 0; k < kWidth; ++k) wr[k] = ws[c][k];
#pragma unroll
    for (int k = 0; k < kHist; ++k) {
      xw[k + 1] = xs[c][j0 + k];
      gw[k + 1] = gs[c][j0 + k];
    }
    for (int jj = 0; jj < kPerGroup; ++jj) {
      const int j = j0 + jj;
      if (cc >= p.dim || u0 + j >= l) break;
#pragma unroll
      for (int k = 0; k < kHist; ++k) {
        xw[k] = xw[k + 1];
        gw[k] = gw[k + 1];
      }
      xw[kHist] = xs[c][j + kHist];
      gw[kHist] = gs[c][j + kHist];  // (g is zero past the row's end)
      float acc = 0.0f;
#pragma unroll
      for (int i = 0; i < kWidth; ++i) acc += wr[kHist - i] * gw[i];
      dxs[c][j] = acc;
      db += gw[0];
#pragma unroll
      for (int k = 0; k < kWidth; ++k) dw[k] += gw[0] * xw[k];
    }
  } else {
    for (int jj = 0; jj < kPerGroup; ++jj) {
      const int j = group * kPerGroup + jj;
      const int64_t u = u0 + j;
      if (cc >= p.dim || u >= l) break;
      const int key_u = keys[j + kHist];
      float acc = 0.0f;
#pragma unroll
      for (int jt = 0; jt < kWidth; ++jt)
        if (keys[j + kHist + jt] == key_u) acc += ws[c][kHist - jt] * gs[c][j + jt];
      if (dfinal) {
        const int64_t end = cu ? cu[key_u + 1] : l;
        const int64_t m = u - (end - kHist);
        if (m >= 0 && (!seq || key_u == seq_last))
          acc += to_float(dfinal[(cu ? key_u : row) * p.dfinal_batch_stride + cc * p.dfinal_c_stride + m * p.dfinal_l_stride]);
      }
      dxs[c][j] = acc;
      const float g = gs[c][j];
      db += g;
#pragma unroll
      for (int k = 0; k < kWidth; ++k) dw[k] += g * input(c, u, u - kHist + k);
    }
  }
#pragma unroll
  for (int k = 0; k < kWidth; ++k) red[group][c][k] = dw[k];
  red[group][c][kWidth] = db;
  __syncthreads();
  T* dx = reinterpret_cast<T*>(p.dx) + row * p.dx_batch_stride;
  const bool dx_positions_fastest = p.dx_l_stride == 1;
  for (int i = tid; i < kTileC * kBackwardTileL; i += kBwdThreads) {
    const int ci = dx_positions_fastest ? i / kBackwardTileL : i % kTileC;
    const int j = dx_positions_fastest ? i % kBackwardTileL : i / kTileC;
    const int64_t u = u0 + j;
    if (c0 + ci < p.dim && u < l) dx[(c0 + ci) * p.dx_c_stride + u * p.dx_l_stride] = from_float<T>(dxs[ci][j]);
  }
  if (tid < kTileC && c0 + tid < p.dim) {
    float* dw_out = reinterpret_cast<float*>(p.dweight_partial) + (blockIdx.x * p.dim + c0 + tid) * kWidth;
    float* db_out = reinterpret_cast<float*>(p.dbias_partial) + blockIdx.x * p.dim + c0 + tid;
    for (int k = 0; k <= kWidth; ++k) {
      float sum = 0.0f;
      for (int gi = 0; gi < kGroups; ++gi) sum += red[gi][tid][k];  // fixed order
      if (k < kWidth) dw_out[k] = sum; else *db_out = sum;
    }
  }
}

// dinit[r, c, i]: the initial-state slot i sits at position start + i - (w-1) of sequence r (row r).
template <typename T, int kWidth>
__global__ void dinitial_kernel(BackwardParams p) {
  constexpr int kHist = kWidth - 1;
  const int64_t r = blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= p.dim) return;
  const SequenceSpan span = sequence_span(p.cu_seqlens, r, p.seqlen);
  const int64_t row = span.row, start = span.start, end = span.end;
  const T* x = reinterpret_cast<const T*>(p.x) + row * p.x_batch_stride + c * p.x_c_stride;
  const T* dout = reinterpret_cast<const T*>(p.dout) + row * p.dout_batch_stride + c * p.dout_c_stride;
  const T* init = reinterpret_cast<const T*>(p.initial_states) + r * p.init_batch_stride + c * p.init_c_stride;
  const int32_t* seq = p.seq_idx ? reinterpret_cast<const int32_t*>(p.seq_idx) + row * p.seq_batch_stride : nullptr;
  const int seq_first = (seq && end > 0) ? seq[0] : 0;
  const bool last_is_first = !(seq && end > 0) || seq[(end - 1) * p.seq_l_stride] == seq_first;
  float w[kWidth];
#pragma unroll
  for (int k = 0; k < kWidth; ++k)
    w[k] = load_as_float(p.weight, p.weight_dtype, c * p.weight_c_stride + k * p.weight_width_stride);
  const float bias = p.bias ? load_as_float(p.bias, p.bias_dtype, c * p.bias_stride) : 0.0f;
  const T* dfinal = reinterpret_cast<const T*>(p.dfinal_states);
  T* dinit = reinterpret_cast<T*>(p.dinitial_states) + r * p.dinit_batch_stride + c * p.dinit_c_stride;

  for (int i = 0; i < kHist; ++i) {
    const int64_t u = start + i - kHist;
    float acc = 0.0f;
    for (int j = 1; j < kWidth; ++j) {
      const int64_t t = u + j;
      if (t < start || t >= end || (seq && seq[t * p.seq_l_stride] != seq_first)) continue;
      float g = to_float(dout[t * p.dout_l_stride]);
      if (p.silu) {
        float z = bias;
        for (int k = 0; k < kWidth; ++k) {
          const int64_t v = t - kHist + k;  // inside the first sequence, or an initial state
          z += w[k] * (v >= start ? to_float(x[v * p.x_l_stride]) : to_float(init[(kHist + v - start) * p.init_l_stride]));
        }
        g = dsilu(z, g);
      }
      acc += w[kHist - j] * g;
    }
    if (dfinal && last_is_first) {
      const int64_t m = u - (end - kHist);
      if (m >= 0) acc += to_float(dfinal[r * p.dfinal_batch_stride + c * p.dfinal_c_stride + m * p.dfinal_l_stride]);
    }
    dinit[i * p.dinit_l_stride] = from_float<T>(acc);
  }
}

// The second stage of the weight/bias sums: dweight[c][k] and dbias[c] from the partial rows, added
// in row order (bitwise reproducible), written whole in the parameters' own dtypes (no fill before,
// no cast after). Zero rows (an empty batch or length) write zeros.
__global__ void sum_param_partials_kernel(BackwardParams p, int64_t rows) {
  const int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;  // (channel, tap), dbias as tap w
  const int64_t w = p.width;
  if (i >= p.dim * (w + 1)) return;
  const int64_t c = i / (w + 1), k = i % (w + 1);
  if (k == w && !p.dbias) return;
  const float* partial = reinterpret_cast<const float*>(k < w ? p.dweight_partial : p.dbias_partial);
  const int64_t row_stride = k < w ? p.dim * w : p.dim, offset = k < w ? c * w + k : c;
  float total = 0.0f;
  for (int64_t r = 0; r < rows; ++r) total += partial[r * row_stride + offset];
  if (k < w)
    store_from_float(p.dweight, p.weight_dtype, c * p.dweight_c_stride + k * p.dweight_width_stride, total);
  else
    store_from_float(p.dbias, p.bias_dtype, c * p.dbias_stride, total);
}

void sum_param_partials(const BackwardParams& p) {
  constexpr int kThreads = 256;
  const int64_t blocks = ceil_div(p.dim * (p.width + 1), int64_t{kThreads});
  if (blocks > INT_MAX) throw std::invalid_argument("causal_conv1d_bwd: too many channels for the weight sums");
  sum_param_partials_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, as_stream(p.stream)>>>(
      p, backward_partial_rows(p));
  check_launch("causal_conv1d_bwd (weight sums)");
}

void backward_general(const BackwardParams& p) {
  SSMK_DISPATCH_FLOAT(p.dtype, "causal_conv1d_bwd", [&] {
    SSMK_DISPATCH_WIDTH(static_cast<int>(p.width), "causal_conv1d_bwd", [&] {
      if (p.batch > 0 && p.seqlen > 0) {
        const int64_t num_l_blocks = ceil_div(p.seqlen, kBackwardTileL);
        const int64_t channel_blocks = ceil_div(p.dim, kTileC);
        if (p.batch * num_l_blocks > INT_MAX || channel_blocks > 65535)
          throw std::invalid_argument("causal_conv1d_bwd: input too large for the grid");
        dim3 grid(static_cast<unsigned>(p.batch * num_l_blocks), static_cast<unsigned>(channel_blocks));
        const bool plain = !p.cu_seqlens && !p.seq_idx && !p.initial_states && !p.dfinal_states;
        if (plain)
          backward_kernel<scalar_t, kWidth, true><<<grid, kBwdThreads, 0, as_stream(p.stream)>>>(p, num_l_blocks);
        else
          backward_kernel<scalar_t, kWidth, false><<<grid, kBwdThreads, 0, as_stream(p.stream)>>>(p, num_l_blocks);
        check_launch("causal_conv1d_bwd");
      }
      if (p.dinitial_states) {
        const int64_t count = p.cu_seqlens ? p.num_seqs : p.batch;
        if (count > 65535) throw std::invalid_argument("causal_conv1d_bwd: at most 65535 initial states");
        constexpr int kThreads = 128;
        dim3 grid(static_cast<unsigned>(ceil_div(p.dim, kThreads)), static_cast<unsigned>(count));
        if (count > 0) {
          dinitial_kernel<scalar_t, kWidth><<<grid, kThreads, 0, as_stream(p.stream)>>>(p);
          check_launch("causal_conv1d_bwd (initial states)");
        }
      }
    });
  });
}

}  // namespace

void backward(const BackwardParams& p) {
  if (p.dim == 0) return;
  if (!backward_plain(p)) backward_general(p);
  if (p.dweight) sum_param_partials(p);
}

}  // namespace conv
}  // namespace ssmk
