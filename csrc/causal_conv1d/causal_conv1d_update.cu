// causal_conv1d_update (SPEC.md section 1): decode steps on a conv state, in place.
//
// One thread per (batch row, channel): it reads the w-1 newest state entries, runs the t new tokens
// through the filter (window in registers), writes the outputs, then shifts the tokens into the
// state. Threads own disjoint channels, so reading before writing within a thread is all the
// ordering needed. Pointers come from device memory only (indices, cache_seqlens): no host sync,
// so the launch can be captured in a CUDA graph.
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
  if (slot < 0) {  // padding slot: zeros out, state untouched
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

}  // namespace

void update(const UpdateParams& p) {
  if (p.batch == 0 || p.dim == 0) return;
  const int64_t channel_blocks = ceil_div(p.dim, kUpdateThreads);
  if (channel_blocks > INT_MAX) throw std::invalid_argument("causal_conv1d_update: dim too large");
  const dim3 grid(static_cast<unsigned>(channel_blocks), static_cast<unsigned>(p.batch < 65535 ? p.batch : 65535));
  SSMK_DISPATCH_FLOAT(p.dtype, "causal_conv1d_update", [&] {
    SSMK_DISPATCH_WIDTH(static_cast<int>(p.width), "causal_conv1d_update", [&] {
      update_kernel<scalar_t, kWidth><<<grid, kUpdateThreads, 0, as_stream(p.stream)>>>(p);
      check_launch("causal_conv1d_update");
    });
  });
}

}  // namespace conv
}  // namespace ssmk
