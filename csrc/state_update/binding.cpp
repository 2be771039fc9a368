// Python binding of the selective_state_update kernel.
//
// The decode step is host-bound, so a call crosses into C++ with as little conversion as possible:
// the arguments that are the same for every call of one kind (dtype codes, sizes, strides) travel
// as one tuple that the Python side builds once and caches; the per-call ones (addresses) as a
// second, short tuple; both are read with the CPython API (~0.3 us, against ~1.5 us for four
// std::vector conversions). This file only reads them into integer arrays and checks counts;
// launch_args.h lays them out and fills the params struct.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.h"
#include "state_update/launch_args.h"

namespace py = pybind11;
using ssmk::state_update::kAddresses;
using ssmk::state_update::kBindingVersion;
using ssmk::state_update::kParams;

namespace {

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

  ssmk::state_update::launch(ssmk::state_update::params_from(v, a, stream));
}

}  // namespace

void bind_state_update(py::module_& m) {
  m.attr("state_update_max_dstate") = ssmk::state_update::kMaxDState;
  m.attr("state_update_binding_version") = kBindingVersion;
  m.def("state_update", &state_update, py::arg("params"), py::arg("addresses"), py::arg("stream"),
        "selective_state_update: apply t tokens to the state cache in place and write out; params and "
        "addresses are tuples of ints (see csrc/state_update/launch_args.h)");
}
