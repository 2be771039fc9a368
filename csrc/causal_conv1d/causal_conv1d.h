// causal_conv1d (SPEC.md section 1): the params structs the binding fills and the launchers read.
// Sizes, strides and offsets are 64-bit everywhere; addresses travel as integers (0 = absent).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace ssmk {
namespace conv {

// Widest filter the CUDA kernels are instantiated for (widths 2..kMaxWidth).
constexpr int kMaxWidth = 4;

// Forward: out[b, c, t] = act(bias[c] + sum_k weight[c, k] * xx[b, c, t - (w-1) + k]).
struct ForwardParams {
  int64_t batch = 0, dim = 0, seqlen = 0, width = 0;
  int dtype = 0;          // x / out / initial_states / final_states element type (DType code)
  int weight_dtype = 0;   // weight and bias may be float32 while x is half precision
  int bias_dtype = 0;
  bool silu = false;

  std::uintptr_t x = 0, weight = 0, bias = 0, out = 0;
  std::uintptr_t initial_states = 0, final_states = 0;  // (count, d, w-1) or 0
  std::uintptr_t seq_idx = 0;     // int32 (b, l) or 0
  std::uintptr_t cu_seqlens = 0;  // int32 (count+1,) or 0; then batch == 1
  int64_t num_seqs = 0;           // count of cu_seqlens sequences

  int64_t x_batch_stride = 0, x_c_stride = 0, x_l_stride = 0;
  int64_t out_batch_stride = 0, out_c_stride = 0, out_l_stride = 0;
  int64_t weight_c_stride = 0, weight_width_stride = 0;
  int64_t bias_stride = 0;
  int64_t init_batch_stride = 0, init_c_stride = 0, init_l_stride = 0;
  int64_t final_batch_stride = 0, final_c_stride = 0, final_l_stride = 0;
  int64_t seq_batch_stride = 0, seq_l_stride = 0;

  std::uintptr_t stream = 0;
};

// Decode update: x (b, d, t) new tokens, conv_state (B_cache, d, s), out (b, d, t).
struct UpdateParams {
  int64_t batch = 0, dim = 0, tokens = 0, state_len = 0, width = 0;
  int64_t slots = 0;      // conv_state rows; an index outside [0, slots) is a padding slot
  int dtype = 0;          // x / out
  int state_dtype = 0;    // conv_state
  int weight_dtype = 0, bias_dtype = 0;
  bool silu = false;

  std::uintptr_t x = 0, conv_state = 0, weight = 0, bias = 0, out = 0;
  std::uintptr_t cache_seqlens = 0;       // int32 (b,) or 0: circular buffer
  std::uintptr_t conv_state_indices = 0;  // int32 (b,) or 0; negative = padding slot

  int64_t x_batch_stride = 0, x_c_stride = 0, x_l_stride = 0;
  int64_t state_batch_stride = 0, state_c_stride = 0, state_l_stride = 0;
  int64_t out_batch_stride = 0, out_c_stride = 0, out_l_stride = 0;
  int64_t weight_c_stride = 0, weight_width_stride = 0;
  int64_t bias_stride = 0;

  std::uintptr_t stream = 0;
};

// Backward: the forward's fields plus gradients. dx/dout/dfinal/dinitial share x's element type;
// the weight and bias gradients leave the kernels as float32 partial sums, one per (backward block,
// channel): dweight_partial (backward_partial_rows(params), d, w), dbias_partial (same, d). When
// dweight (and dbias) are given, a last kernel sums the partials in row order into them, written
// whole in weight_dtype (bias_dtype); else the caller sums them.
// The general kernel's blocks span kBackwardTileL positions.
constexpr int kBackwardTileL = 64;

struct BackwardParams : ForwardParams {
  std::uintptr_t dout = 0, dx = 0, dfinal_states = 0, dinitial_states = 0;
  std::uintptr_t dweight_partial = 0, dbias_partial = 0;
  std::uintptr_t dweight = 0, dbias = 0;  // (d, w) and (d,) or 0
  int64_t dweight_c_stride = 0, dweight_width_stride = 0, dbias_stride = 0;
  int64_t dout_batch_stride = 0, dout_c_stride = 0, dout_l_stride = 0;
  int64_t dx_batch_stride = 0, dx_c_stride = 0, dx_l_stride = 0;
  int64_t dfinal_batch_stride = 0, dfinal_c_stride = 0, dfinal_l_stride = 0;
  int64_t dinit_batch_stride = 0, dinit_c_stride = 0, dinit_l_stride = 0;
};

// Whole-row fast paths (causal_conv1d_plain.cu): run and return true when the call qualifies (no
// sequences; vector-aligned tensors), else return false for the general kernels to take it.
bool forward_plain(const ForwardParams& params);
bool backward_plain(const BackwardParams& params);
// Rows of the weight/bias partial sums the backward writes for these params (its blocks' segments).
int64_t backward_partial_rows(const BackwardParams& params);

void forward_channel_first(const ForwardParams& params);
void forward_channel_last(const ForwardParams& params);
void final_states(const ForwardParams& params);
void backward(const BackwardParams& params);
void update(const UpdateParams& params);
// Whether update(params) takes the vector kernel (causal_conv1d_update.cu) rather than the general one.
bool update_uses_vector_kernel(const UpdateParams& params);

}  // namespace conv
}  // namespace ssmk

// Instantiates BODY with `constexpr int kWidth` bound to the filter width (2..kMaxWidth).
#define SSMK_DISPATCH_WIDTH(width, NAME, ...)                                                  \
  [&] {                                                                                       \
    switch (width) {                                                                          \
      case 2: { constexpr int kWidth = 2; return __VA_ARGS__(); }                             \
      case 3: { constexpr int kWidth = 3; return __VA_ARGS__(); }                             \
      case 4: { constexpr int kWidth = 4; return __VA_ARGS__(); }                             \
      default: throw std::invalid_argument(std::string(NAME) + ": unsupported width " +         \
                                           std::to_string(width));                            \
    }                                                                                         \
  }()
