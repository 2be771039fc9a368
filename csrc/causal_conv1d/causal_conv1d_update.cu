// causal_conv1d_update (SPEC.md section 1): decode steps on a conv state, in place.
//
// Two kernels. The vector kernel serves the common decode step (one token, a state of exactly w-1
// entries laid out (slot, channel, w-1) contiguously, unit channel stride, 16-byte aligned rows):
// each thread takes 16 bytes of channels (8 bf16) of kRows batch rows, so every access is a
// 16-byte vector and the filter taps load once for kRows rows. The general kernel takes one
// thread per (batch row, channel) and serves everything else (several tokens, circular buffers,
// longer states, any strides and dtypes). Threads own disjoint channels, so reading before
// writing within a thread is all the ordering needed. Pointers come from device memory only
// (indices, cache_seqlens): no host sync, so launches can be captured in a CUDA graph.
#include <climits>
#include <stdexcept>
#include <string>

#include "causal_conv1d/causal_conv1d.h"
#include "causal_conv1d/kernel_utils.cuh"
#include "common.h"

namespace ssmk {
namespace conv {
namespace {

constexpr int kUpdateThreads = 128;

// Batch row i, channel c.
template <typename T, int kWidth>
__device__ __forceinline__ void update_channel(const UpdateParams& p, int64_t i, int64_t c) {
  constexpr int kHist = kWidth - 1;
  const T* x = reinterpret_cast<const T*>(p.x) + i * p.x_batch_stride + c * p.x_c_stride;
  T* out = reinterpret_cast<T*>(p.out) + i * p.out_batch_stride + c * p.out_c_stride;
  const int64_t slot = p.conv_state_indices ? reinterpret_cast<const int32_t*>(p.conv_state_indices)[i] : i;
  // A padding slot (negative), or an index past the cache (CUDA index values are not checked on the
  // host: that would synchronise every step): zeros out, state untouched.
  if (slot < 0 || slot >= p.slots) {
    for (int64_t j = 0; j < p.tokens; ++j) out[j * p.out_l_stride] = from_float<T>(0.0f);
    return;
  }
  const int64_t s = p.state_len;
  const int64_t state_base = slot * p.state_batch_stride + c * p.state_c_stride;
  auto state_at = [&](int64_t q) { return state_base + q * p.state_l_stride; };

  float w[kWidth];
#pragma unroll
  for (int k = 0; k < kWidth; ++k)
    w[k] = load_as_float(p.weight, p.weight_dtype, c * p.weight_c_stride + k * p.weight_width_stride);
  const float bias = p.bias ? load_as_float(p.bias, p.bias_dtype, c * p.bias_stride) : 0.0f;

  int64_t head = 0;  // circular buffer: the next write position
  if (p.cache_seqlens) {
    head = reinterpret_cast<const int32_t*>(p.cache_seqlens)[i] % s;
    if (head < 0) head += s;
  }
  float win[kHist];  // oldest first
#pragma unroll
  for (int k = 0; k < kHist; ++k) {
    const int64_t q = p.cache_seqlens ? (head - kHist + k + s) % s : s - kHist + k;
    win[k] = load_as_float(p.conv_state, p.state_dtype, state_at(q));
  }

  for (int64_t j = 0; j < p.tokens; ++j) {
    const float xj = to_float(x[j * p.x_l_stride]);
    float acc = bias + w[kHist] * xj;
#pragma unroll
    for (int k = 0; k < kHist; ++k) acc += w[k] * win[k];
    out[j * p.out_l_stride] = from_float<T>(p.silu ? silu(acc) : acc);
#pragma unroll
    for (int k = 0; k + 1 < kHist; ++k) win[k] = win[k + 1];
    win[kHist - 1] = xj;
  }

  if (p.cache_seqlens) {
    // New token j goes to (head + j) mod s; only the last s tokens survive.
    for (int64_t j = p.tokens > s ? p.tokens - s : 0; j < p.tokens; ++j)
      store_from_float(p.conv_state, p.state_dtype, state_at((head + j) % s), to_float(x[j * p.x_l_stride]));
  } else if (s == kHist) {
    // The common state of exactly w-1 entries: the window now holds the newest w-1 inputs (state,
    // then tokens), oldest first, which is the shifted state. Storing it from registers avoids the
    // general loop's reloads, each of which waits on memory behind the store before it (the
    // compiler cannot reorder them past possibly aliasing stores): 48 us at batch 256 D10240 on
    // the H200, about 3 memory latencies per thread.
#pragma unroll
    for (int k = 0; k < kHist; ++k) store_from_float(p.conv_state, p.state_dtype, state_at(k), win[k]);
  } else {
    // Shift left by the token count; ascending q only reads at or after what it writes.
    for (int64_t q = 0; q < s; ++q) {
      const int64_t src = q + p.tokens;
      const float value = src < s ? load_as_float(p.conv_state, p.state_dtype, state_at(src))
                                  : to_float(x[(src - s) * p.x_l_stride]);
      store_from_float(p.conv_state, p.state_dtype, state_at(q), value);
    }
  }
}

// Grid (channel blocks, batch rows): coordinates straight from blockIdx (dividing a flat 64-bit
// block index cost more than a thread's whole update); batches past grid.y's 65535 loop.
template <typename T, int kWidth>
__global__ void __launch_bounds__(kUpdateThreads) update_kernel(UpdateParams p) {
  const int64_t c = int64_t{blockIdx.x} * kUpdateThreads + threadIdx.x;
  if (c >= p.dim) return;
  for (int64_t i = blockIdx.y; i < p.batch; i += gridDim.y) update_channel<T, kWidth>(p, i, c);
}

// The vector kernel: thread (channel group, row group) owns channels [c0, c0 + kVec) of batch rows
// [r0, r0 + kRows). All of its rows' loads issue before any store: the compiler cannot move a
// load past a store that might alias it, and one memory latency per thread instead of kRows of
// them is what a decode step of a few microseconds is made of.
template <typename T, int kWidth, int kRows>
__global__ void __launch_bounds__(kUpdateThreads) update_vector_kernel(UpdateParams p) {
  constexpr int kVec = Vec16<T>::kElts, kHist = kWidth - 1;
  using Raw = RawBits<16>::type;
  const int64_t c0 = (int64_t{blockIdx.x} * kUpdateThreads + threadIdx.x) * kVec;
  if (c0 >= p.dim) return;
  float w[kVec * kWidth];  // channel j's taps at w[j * kWidth ..]
  load_span_as_float<kVec * kWidth>(p.weight, p.weight_dtype, c0 * kWidth, w);
  float bias[kVec] = {};
  if (p.bias) load_span_as_float<kVec>(p.bias, p.bias_dtype, c0, bias);
  const int32_t* indices = reinterpret_cast<const int32_t*>(p.conv_state_indices);
  const T* x = reinterpret_cast<const T*>(p.x) + c0;
  T* out = reinterpret_cast<T*>(p.out) + c0;
  T* state = reinterpret_cast<T*>(p.conv_state) + c0 * kHist;

  for (int64_t r0 = int64_t{blockIdx.y} * kRows; r0 < p.batch; r0 += int64_t{gridDim.y} * kRows) {
    int64_t slot[kRows];
    Raw x_raw[kRows], state_raw[kRows][kHist];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t i = r0 + r;
      slot[r] = i >= p.batch ? -1 : indices ? indices[i] : i;
      if (slot[r] >= p.slots) slot[r] = -1;  // outside the cache: a padding slot, as in update_channel
      if (i < p.batch) x_raw[r] = *reinterpret_cast<const Raw*>(x + i * p.x_batch_stride);
      if (slot[r] >= 0) {
#pragma unroll
        for (int q = 0; q < kHist; ++q)
          state_raw[r][q] = reinterpret_cast<const Raw*>(state + slot[r] * p.state_batch_stride)[q];
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t i = r0 + r;
      if (i >= p.batch) break;
      float y[kVec] = {};  // a padding slot's output stays zero
      if (slot[r] >= 0) {
        const T* xs = reinterpret_cast<const T*>(&x_raw[r]);
        const T* hist = reinterpret_cast<const T*>(state_raw[r]);  // channel j's entries at [j * kHist ..]
        // The new state: each channel's entries moved one step, x last (state dtype == T, so the
        // round trip through float is exact; packed as words for whole-vector stores).
        float shifted[kVec * kHist];
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          float acc = bias[j] + w[j * kWidth + kHist] * to_float(xs[j]);
#pragma unroll
          for (int k = 0; k < kHist; ++k) {
            acc += w[j * kWidth + k] * to_float(hist[j * kHist + k]);
            shifted[j * kHist + k] = to_float(k + 1 < kHist ? hist[j * kHist + k + 1] : xs[j]);
          }
          y[j] = p.silu ? silu(acc) : acc;
        }
#pragma unroll
        for (int q = 0; q < kHist; ++q) {
          store_raw(reinterpret_cast<Raw*>(state + slot[r] * p.state_batch_stride) + q,
                    pack_floats<T, kVec>(shifted + q * kVec));
        }
      }
      store_vec(out + i * p.out_batch_stride, y);
    }
  }
}

// Rows per thread of the vector kernel. H200, batch 256 D10240 W4 bf16 (scripts/conv_variants.cu,
// inputs rotated through 4 copies): 1 row 16.3 us (61.5% of copy), 2 rows 17.4 us, 4 rows 16.1 us
// (61.9%), 8 rows 19.1 us; the general kernel 37.2 us (26.9%).
constexpr int kUpdateVectorRows = 4;

// Whether the vector kernel serves p: see the file comment. Element strides are in T's elements.
bool vector_update_serves(const UpdateParams& p, int64_t elt_bytes) {
  const int64_t vec = 16 / elt_bytes, hist = p.width - 1;
  auto half_or_float = [](int code) {
    return code == static_cast<int>(DType::kFloat32) || code == static_cast<int>(DType::kFloat16) ||
           code == static_cast<int>(DType::kBFloat16);
  };
  return p.tokens == 1 && !p.cache_seqlens && p.state_len == hist && p.state_dtype == p.dtype &&
         p.x_c_stride == 1 && p.out_c_stride == 1 && p.state_l_stride == 1 && p.state_c_stride == hist &&
         p.weight_width_stride == 1 && p.weight_c_stride == p.width && half_or_float(p.weight_dtype) &&
         (!p.bias || (p.bias_stride == 1 && half_or_float(p.bias_dtype))) && p.dim % vec == 0 &&
         aligned16(p.x) && aligned16(p.out) && aligned16(p.conv_state) && aligned16(p.weight) &&
         (!p.bias || aligned16(p.bias)) && (p.x_batch_stride * elt_bytes) % 16 == 0 &&
         (p.out_batch_stride * elt_bytes) % 16 == 0 && (p.state_batch_stride * elt_bytes) % 16 == 0;
}

}  // namespace

bool update_uses_vector_kernel(const UpdateParams& p) {
  bool serves = false;
  SSMK_DISPATCH_FLOAT(p.dtype, "causal_conv1d_update", [&] { serves = vector_update_serves(p, sizeof(scalar_t)); });
  return serves && p.width >= 2 && p.width <= kMaxWidth;
}

void update(const UpdateParams& p) {
  if (p.batch == 0 || p.dim == 0) return;
  const int64_t channel_blocks = ceil_div(p.dim, kUpdateThreads);
  if (channel_blocks > INT_MAX) throw std::invalid_argument("causal_conv1d_update: dim too large");
  const dim3 grid(static_cast<unsigned>(channel_blocks), static_cast<unsigned>(p.batch < 65535 ? p.batch : 65535));
  SSMK_DISPATCH_FLOAT(p.dtype, "causal_conv1d_update", [&] {
    SSMK_DISPATCH_WIDTH(static_cast<int>(p.width), "causal_conv1d_update", [&] {
      if (vector_update_serves(p, sizeof(scalar_t))) {
        constexpr int kVec = Vec16<scalar_t>::kElts;
        const int64_t row_groups = ceil_div(p.batch, int64_t{kUpdateVectorRows});
        const dim3 vector_grid(static_cast<unsigned>(ceil_div(p.dim / kVec, int64_t{kUpdateThreads})),
                               static_cast<unsigned>(row_groups < 65535 ? row_groups : 65535));
        update_vector_kernel<scalar_t, kWidth, kUpdateVectorRows>
            <<<vector_grid, kUpdateThreads, 0, as_stream(p.stream)>>>(p);
      } else {
        update_kernel<scalar_t, kWidth><<<grid, kUpdateThreads, 0, as_stream(p.stream)>>>(p);
      }
      check_launch("causal_conv1d_update");
    });
  });
}

}  // namespace conv
}  // namespace ssmk
