// The state update's launch arguments as flat integer arrays (what the Python side sends, see
// binding.cpp) unpacked into Params: one definition for the pybind11 binding and for the host
// emulation of the tests (csrc/state_update/emulation.cc). No Python or torch here.
#pragma once

#include <cstdint>

#include "common.h"
#include "state_update/state_update.h"

namespace ssmk {
namespace state_update {

// Version of the argument lists below; the Python side refuses a module built with another one.
inline constexpr int kBindingVersion = 2;

// params:    dtype codes (10): state, x, dt, A, B, C, D, z, dt_bias, out (ssmk::DType; any code for
//            absent ones), then sizes (11): batch, tokens, heads, headdim, dstate, heads_per_group,
//            slots, pad_slot_id, dt_softplus, index_is_int64, index_stride, then strides in elements
//            (35): state(4) x(4) dt(4) A(3) B(4) C(4) D(2) z(4) dt_bias(2) out(4)
// addresses: state, x, dt, A, B, C, D, z, dt_bias, indices, out (0 = absent)
inline constexpr int kDTypes = 10, kSizes = 11, kStrides = 35;
inline constexpr int kParams = kDTypes + kSizes + kStrides;
inline constexpr int kAddresses = 11;

// v: kParams integers, a: kAddresses addresses, as laid out above.
inline Params params_from(const int64_t* v, const std::uintptr_t* a, std::uintptr_t stream) {
  Params p;
  p.state = as_ptr<void>(a[0]);
  p.x = as_ptr<const void>(a[1]);
  p.dt = as_ptr<const void>(a[2]);
  p.A = as_ptr<const void>(a[3]);
  p.B = as_ptr<const void>(a[4]);
  p.C = as_ptr<const void>(a[5]);
  p.D = as_ptr<const void>(a[6]);
  p.z = as_ptr<const void>(a[7]);
  p.dt_bias = as_ptr<const void>(a[8]);
  p.indices = as_ptr<const void>(a[9]);
  p.out = as_ptr<void>(a[10]);
  const int64_t* s = v;
  int* codes[] = {&p.state_dtype, &p.x_dtype, &p.dt_dtype, &p.A_dtype, &p.B_dtype,
                  &p.C_dtype,     &p.D_dtype, &p.z_dtype,  &p.dt_bias_dtype, &p.out_dtype};
  for (int* code : codes) *code = static_cast<int>(*s++);
  p.batch = *s++;
  p.tokens = *s++;
  p.heads = *s++;
  p.headdim = *s++;
  p.dstate = *s++;
  p.heads_per_group = *s++;
  p.slots = *s++;
  p.pad_slot_id = *s++;
  p.dt_softplus = *s++ != 0;
  p.index_is_int64 = *s++ != 0;
  p.index_stride = *s++;
  auto take = [&s](int64_t* dst, int count) {
    for (int i = 0; i < count; ++i) dst[i] = *s++;
  };
  take(p.state_stride, 4);
  take(p.x_stride, 4);
  take(p.dt_stride, 4);
  take(p.A_stride, 3);
  take(p.B_stride, 4);
  take(p.C_stride, 4);
  take(p.D_stride, 2);
  take(p.z_stride, 4);
  take(p.dt_bias_stride, 2);
  take(p.out_stride, 4);
  p.stream = as_stream(stream);
  return p;
}

}  // namespace state_update
}  // namespace ssmk
