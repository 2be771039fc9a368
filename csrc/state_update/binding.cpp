// Python binding of the selective_state_update kernel.
//
// The decode step is host-bound, so a call crosses into C++ with as little conversion as possible:
// the arguments that are the same for every call of one kind (dtype codes, sizes, strides) travel
// as one tuple that the Python side builds once and caches; the per-call ones (addresses) as a
// second, short tuple; both are read with the CPython API (~0.3 us, against ~1.5 us for four
// std::vector conversions). This file only unpacks them into the params struct and checks counts.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.h"
#include "state_update/state_update.h"

namespace py = pybind11;

namespace {

// Version of the argument lists below; the Python side refuses a module built with another one.
constexpr int kBindingVersion = 2;

// params:    dtype codes (10): state, x, dt, A, B, C, D, z, dt_bias, out (ssmk::DType; any code for
//            absent ones), then sizes (11): batch, tokens, heads, headdim, dstate, heads_per_group,
//            slots, pad_slot_id, dt_softplus, index_is_int64, index_stride, then strides in elements
//            (35): state(4) x(4) dt(4) A(3) B(4) C(4) D(2) z(4) dt_bias(2) out(4)
// addresses: state, x, dt, A, B, C, D, z, dt_bias, indices, out (0 = absent)
constexpr Py_ssize_t kDTypes = 10, kSizes = 11, kStrides = 35;
constexpr Py_ssize_t kParams = kDTypes + kSizes + kStrides;
constexpr Py_ssize_t kAddresses = 11;

void check_count(const char* what, const py::tuple& values, Py_ssize_t expected) {
  const Py_ssize_t got = PyTuple_GET_SIZE(values.ptr());
  if (got != expected) {
    throw std::invalid_argument(std::string("state_update: ") + what + " needs " + std::to_string(expected) +
                                " entries, got " + std::to_string(got));
  }
}

void state_update(const py::tuple& params, const py::tuple& addresses, std::uintptr_t stream) {
  check_count("params", params, kParams);
  check_count("addresses", addresses, kAddresses);
  int64_t v[kParams];
  for (Py_ssize_t i = 0; i < kParams; ++i) v[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(params.ptr(), i));
  std::uintptr_t a[kAddresses];
  for (Py_ssize_t i = 0; i < kAddresses; ++i) {
    a[i] = static_cast<std::uintptr_t>(PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(addresses.ptr(), i)));
  }
  if (PyErr_Occurred()) throw py::error_already_set();  // a non-int, or an int out of range

  ssmk::state_update::Params p;
  p.state = ssmk::as_ptr<void>(a[0]);
  p.x = ssmk::as_ptr<const void>(a[1]);
  p.dt = ssmk::as_ptr<const void>(a[2]);
  p.A = ssmk::as_ptr<const void>(a[3]);
  p.B = ssmk::as_ptr<const void>(a[4]);
  p.C = ssmk::as_ptr<const void>(a[5]);
  p.D = ssmk::as_ptr<const void>(a[6]);
  p.z = ssmk::as_ptr<const void>(a[7]);
  p.dt_bias = ssmk::as_ptr<const void>(a[8]);
  p.indices = ssmk::as_ptr<const void>(a[9]);
  p.out = ssmk::as_ptr<void>(a[10]);
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
  p.stream = ssmk::as_stream(stream);
  ssmk::state_update::launch(p);
}

}  // namespace

void bind_state_update(py::module_& m) {
  m.attr("state_update_max_dstate") = ssmk::state_update::kMaxDState;
  m.attr("state_update_binding_version") = kBindingVersion;
  m.def("state_update", &state_update, py::arg("params"), py::arg("addresses"), py::arg("stream"),
        "selective_state_update: apply t tokens to the state cache in place and write out; params and "
        "addresses are tuples of ints (see csrc/state_update/binding.cpp)");
}
