// Python binding of the selective_state_update kernel. One call per decode step, so the arguments
// travel as a few flat integer sequences (cheaper to convert than setting a params object field by
// field); this file only unpacks them into the params struct and checks their counts.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "state_update/state_update.h"

namespace py = pybind11;

namespace {

void check_count(const char* what, const std::vector<int64_t>& values, size_t expected) {
  if (values.size() != expected) {
    throw std::invalid_argument(std::string("state_update: ") + what + " needs " + std::to_string(expected) +
                                " entries, got " + std::to_string(values.size()));
  }
}

// addresses: state, x, dt, A, B, C, D, z, dt_bias, indices, out (0 = absent)
// dtypes:    state, x, dt, A, B, C, D, z, dt_bias, out (ssmk::DType codes; any code for absent ones)
// sizes:     batch, tokens, heads, headdim, dstate, heads_per_group, slots, pad_slot_id,
//            dt_softplus, index_is_int64
// strides:   state(4) x(4) dt(4) A(3) B(4) C(4) D(2) z(4) dt_bias(2) out(4), in elements
void state_update(const std::vector<std::uintptr_t>& addresses, const std::vector<int64_t>& dtypes,
                  const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides, std::uintptr_t stream) {
  if (addresses.size() != 11) throw std::invalid_argument("state_update: addresses needs 11 entries");
  check_count("dtypes", dtypes, 10);
  check_count("sizes", sizes, 10);
  check_count("strides", strides, 35);
  ssmk::state_update::Params p;
  p.state = ssmk::as_ptr<void>(addresses[0]);
  p.x = ssmk::as_ptr<const void>(addresses[1]);
  p.dt = ssmk::as_ptr<const void>(addresses[2]);
  p.A = ssmk::as_ptr<const void>(addresses[3]);
  p.B = ssmk::as_ptr<const void>(addresses[4]);
  p.C = ssmk::as_ptr<const void>(addresses[5]);
  p.D = ssmk::as_ptr<const void>(addresses[6]);
  p.z = ssmk::as_ptr<const void>(addresses[7]);
  p.dt_bias = ssmk::as_ptr<const void>(addresses[8]);
  p.indices = ssmk::as_ptr<const void>(addresses[9]);
  p.out = ssmk::as_ptr<void>(addresses[10]);
  int* codes[] = {&p.state_dtype, &p.x_dtype, &p.dt_dtype, &p.A_dtype, &p.B_dtype,
                  &p.C_dtype,     &p.D_dtype, &p.z_dtype,  &p.dt_bias_dtype, &p.out_dtype};
  for (int i = 0; i < 10; ++i) *codes[i] = static_cast<int>(dtypes[i]);
  p.batch = sizes[0];
  p.tokens = sizes[1];
  p.heads = sizes[2];
  p.headdim = sizes[3];
  p.dstate = sizes[4];
  p.heads_per_group = sizes[5];
  p.slots = sizes[6];
  p.pad_slot_id = sizes[7];
  p.dt_softplus = sizes[8] != 0;
  p.index_is_int64 = sizes[9] != 0;
  const int64_t* s = strides.data();
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
  m.def("state_update", &state_update, py::arg("addresses"), py::arg("dtypes"), py::arg("sizes"),
        py::arg("strides"), py::arg("stream"),
        "selective_state_update: apply t tokens to the state cache in place and write out");
}
