// selective_state_update (SPEC.md section 4): params struct and launcher.
//
// Every call arrives in the multi-token Mamba-2 indexing (ssmkernels/ops/state_update/layout.py):
// state (slots, h, p, n), x/dt/z/out (b, t, h, p), A (h, p, n), B/C (b, t, g, n), D/dt_bias (h, p).
// Any stride may be 0 (broadcast views) or anything else; all strides and offsets are 64-bit.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ssmk {
namespace state_update {

// Most state elements one thread of the per-row kernel keeps in registers across tokens: on the
// vector path 16 (kMaxPacks = 4 float32 packs of 16 bytes, or 2 of 16-bit types), on the scalar
// path kMaxStateElemsPerLane single elements. With 32 lanes per state row this bounds d_state to
// kMaxStateElemsPerLane * 32.
constexpr int kMaxPacks = 4;
constexpr int kMaxStateElemsPerLane = 16;
constexpr int64_t kMaxDState = kMaxStateElemsPerLane * 32;

struct Params {
  // Sizes.
  int64_t batch = 0, tokens = 0, heads = 0, headdim = 0, dstate = 0, heads_per_group = 1, slots = 0;
  int64_t pad_slot_id = -1;
  bool dt_softplus = false;
  bool index_is_int64 = false;
  int64_t index_stride = 1;  // of indices, in elements (a strided view works as well as a packed one)

  // Element types (ssmk::DType codes). The state's type is a template parameter of the kernel;
  // the inputs' types are read at run time (they are loaded once per row and token, or are small).
  int state_dtype = 0, x_dtype = 0, dt_dtype = 0, A_dtype = 0, B_dtype = 0, C_dtype = 0, D_dtype = 0,
      z_dtype = 0, dt_bias_dtype = 0, out_dtype = 0;

  // Addresses; optional ones (D, z, dt_bias, indices) are null when absent.
  void* state = nullptr;
  const void* x = nullptr;
  const void* dt = nullptr;
  const void* A = nullptr;
  const void* B = nullptr;
  const void* C = nullptr;
  const void* D = nullptr;
  const void* z = nullptr;
  const void* dt_bias = nullptr;
  const void* indices = nullptr;
  void* out = nullptr;

  // Strides in elements.
  int64_t state_stride[4] = {};  // slot, h, p, n
  int64_t x_stride[4] = {};      // b, t, h, p
  int64_t dt_stride[4] = {};
  int64_t z_stride[4] = {};
  int64_t out_stride[4] = {};
  int64_t A_stride[3] = {};  // h, p, n
  int64_t B_stride[4] = {};  // b, t, g, n
  int64_t C_stride[4] = {};
  int64_t D_stride[2] = {};  // h, p
  int64_t dt_bias_stride[2] = {};

  cudaStream_t stream = nullptr;
};

// Checks what the kernel relies on (throws std::invalid_argument) and launches on params.stream.
void launch(const Params& params);

}  // namespace state_update
}  // namespace ssmk
