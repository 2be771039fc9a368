// causal_conv1d forward for channel-last x (x.stride(1) == 1, a transposed (b, l, d) tensor).
//
// Each thread owns kElts consecutive channels (one 16-byte load per position when aligned) and
// slides a window of w-1 positions along a segment of kSegment positions, loading kLoadBatch
// positions ahead; a warp reads 32 * 16 contiguous bytes per position. Sequence starts inside a
// segment (seq_idx changes, cu_seqlens boundaries) are handled as the window slides: with
// seq_idx window entries of another sequence are masked, with cu_seqlens the window restarts from
// the new sequence's initial states. Math in float32; weight and bias may have their own dtype.
#include <climits>
#include <stdexcept>
#include <string>

#include "causal_conv1d/causal_conv1d.h"
#include "causal_conv1d/kernel_utils.cuh"
#include "common.h"

namespace ssmk {
namespace conv {
namespace {

constexpr int kLastThreads = 128;
constexpr int kSegment = 64;   // positions per thread: amortises the w-1 halo loads (3/64)
constexpr int kLoadBatch = 4;  // positions loaded ahead, so 4 loads are in flight per thread

// ------------------------------------------------------------------------------ channel-last
template <typename T, int kWidth>
__global__ void __launch_bounds__(kLastThreads, 4) forward_channel_last_kernel(ForwardParams p, bool vec_ok,
                                                                            int64_t num_segments) {
  constexpr int kElts = Vec16<T>::kElts;
  constexpr int kHist = kWidth - 1;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * kLastThreads + threadIdx.x) * kElts;
  if (c0 >= p.dim) return;
  const int nc = static_cast<int>(p.dim - c0 < kElts ? p.dim - c0 : kElts);
  const int64_t row = static_cast<int64_t>(blockIdx.x) / num_segments;
  const int64_t t0 = (static_cast<int64_t>(blockIdx.x) % num_segments) * kSegment;
  const int64_t t1 = t0 + kSegment < p.seqlen ? t0 + kSegment : p.seqlen;
  const bool vec = vec_ok && nc == kElts;

  const T* x = reinterpret_cast<const T*>(p.x) + row * p.x_batch_stride + c0 * p.x_c_stride;
  T* out = reinterpret_cast<T*>(p.out) + row * p.out_batch_stride + c0 * p.out_c_stride;
  const T* init = reinterpret_cast<const T*>(p.initial_states);
  const int32_t* seq = p.seq_idx ? reinterpret_cast<const int32_t*>(p.seq_idx) + row * p.seq_batch_stride : nullptr;
  const int32_t* cu = reinterpret_cast<const int32_t*>(p.cu_seqlens);

  float w[kElts][kWidth], bias[kElts];
#pragma unroll
  for (int e = 0; e < kElts; ++e) {
    const int64_t c = c0 + (e < nc ? e : 0);
#pragma unroll
    for (int k = 0; k < kWidth; ++k)
      w[e][k] = load_as_float(p.weight, p.weight_dtype, c * p.weight_c_stride + k * p.weight_width_stride);
    bias[e] = p.bias ? load_as_float(p.bias, p.bias_dtype, c * p.bias_stride) : 0.0f;
  }

  // Raw inputs (kept in T until used: half the registers of float for 16-bit types).
  auto load_raw = [&](int64_t t, T (&v)[kElts]) {
    if (vec) {
      *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(x + t * p.x_l_stride);
    } else {
#pragma unroll
      for (int e = 0; e < kElts; ++e) v[e] = x[t * p.x_l_stride + (e < nc ? e : 0) * p.x_c_stride];
    }
  };
  auto load_x = [&](int64_t t, float (&v)[kElts]) {
    alignas(16) T raw[kElts];
    load_raw(t, raw);
#pragma unroll
    for (int e = 0; e < kElts; ++e) v[e] = to_float(raw[e]);
  };
  // Initial state slot k (position start - (w-1) + k) of state row r, or zeros.
  auto load_init = [&](int64_t r, int k, float (&v)[kElts]) {
#pragma unroll
    for (int e = 0; e < kElts; ++e)
      v[e] = (init && e < nc) ? to_float(init[r * p.init_batch_stride + (c0 + e) * p.init_c_stride + k * p.init_l_stride])
                              : 0.0f;
  };

  // The sequence holding t0: its start, end and initial-state row.
  int64_t seq_id = row, seq_start = 0, seq_end = p.seqlen;
  if (cu) {
    int64_t lo = 0, hi = p.num_seqs - 1;  // largest j with cu[j] <= t0 (skips empty sequences)
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (cu[mid] <= t0) lo = mid; else hi = mid - 1;
    }
    seq_id = lo;
    seq_start = cu[lo];
    seq_end = cu[lo + 1];
  }
  const int first_seq = seq ? seq[0] : 0;

  float win[kHist][kElts];
  int win_seq[kHist];
#pragma unroll
  for (int k = 0; k < kHist; ++k) {
    const int64_t pos = t0 - kHist + k;
    if (pos >= seq_start) {
      load_x(pos, win[k]);
      win_seq[k] = seq ? seq[pos * p.seq_l_stride] : 0;
    } else {
      load_init(seq_id, static_cast<int>(kHist + pos - seq_start), win[k]);
      win_seq[k] = first_seq;
    }
  }

  for (int64_t tb = t0; tb < t1; tb += kLoadBatch) {
    alignas(16) T xs[kLoadBatch][kElts];
#pragma unroll
    for (int j = 0; j < kLoadBatch; ++j)
      if (tb + j < t1) load_raw(tb + j, xs[j]);
#pragma unroll
    for (int j = 0; j < kLoadBatch; ++j) {
      const int64_t t = tb + j;
      if (t >= t1) break;
      if (cu && t >= seq_end) {  // a new sequence starts at t: restart from its initial states
        while (t >= cu[seq_id + 1]) ++seq_id;
        seq_start = cu[seq_id];
        seq_end = cu[seq_id + 1];
#pragma unroll
        for (int k = 0; k < kHist; ++k) load_init(seq_id, k, win[k]);
      }
      const int st = seq ? seq[t * p.seq_l_stride] : 0;
      float xt[kElts], y[kElts];
#pragma unroll
      for (int e = 0; e < kElts; ++e) xt[e] = to_float(xs[j][e]);
#pragma unroll
      for (int e = 0; e < kElts; ++e) {
        float acc = bias[e] + w[e][kHist] * xt[e];
#pragma unroll
        for (int k = 0; k < kHist; ++k)
          if (!seq || win_seq[k] == st) acc += w[e][k] * win[k][e];
        y[e] = p.silu ? silu(acc) : acc;
      }
      if (vec) {
        store_vec(out + t * p.out_l_stride, y);
      } else {
#pragma unroll
        for (int e = 0; e < kElts; ++e)
          if (e < nc) out[t * p.out_l_stride + e * p.out_c_stride] = from_float<T>(y[e]);
      }
#pragma unroll
      for (int k = 0; k + 1 < kHist; ++k) {
#pragma unroll
        for (int e = 0; e < kElts; ++e) win[k][e] = win[k + 1][e];
        win_seq[k] = win_seq[k + 1];
      }
#pragma unroll
      for (int e = 0; e < kElts; ++e) win[kHist - 1][e] = xt[e];
      win_seq[kHist - 1] = st;
    }
  }
}

}  // namespace

void forward_channel_last(const ForwardParams& p) {
  if (forward_plain(p)) return;
  if (p.batch == 0 || p.dim == 0 || p.seqlen == 0) return;
  SSMK_DISPATCH_FLOAT(p.dtype, "causal_conv1d_fwd", [&] {
    SSMK_DISPATCH_WIDTH(static_cast<int>(p.width), "causal_conv1d_fwd", [&] {
      constexpr int kElts = Vec16<scalar_t>::kElts;
      const bool vec_ok = p.x_c_stride == 1 && p.out_c_stride == 1 && aligned16(p.x) && aligned16(p.out) &&
                          p.x_batch_stride % kElts == 0 && p.x_l_stride % kElts == 0 &&
                          p.out_batch_stride % kElts == 0 && p.out_l_stride % kElts == 0;
      const int64_t num_segments = ceil_div(p.seqlen, kSegment);
      const int64_t channel_blocks = ceil_div(ceil_div(p.dim, kElts), kLastThreads);
      if (p.batch * num_segments > INT_MAX || channel_blocks > 65535)
        throw std::invalid_argument("causal_conv1d_fwd: input too large for the channel-last grid");
      dim3 grid(static_cast<unsigned>(p.batch * num_segments), static_cast<unsigned>(channel_blocks));
      forward_channel_last_kernel<scalar_t, kWidth>
          <<<grid, kLastThreads, 0, as_stream(p.stream)>>>(p, vec_ok, num_segments);
      check_launch("causal_conv1d_fwd (channel-last)");
    });
  });
}

}  // namespace conv
}  // namespace ssmk
