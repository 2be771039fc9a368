// Python bindings of the causal_conv1d kernels: the params structs as plain attribute bags (the
// Python side fills every field from tensors: addresses, sizes, 64-bit strides, stream handle)
// and one function per launcher. No logic here beyond exposing them.
#include <pybind11/pybind11.h>

#include "causal_conv1d/causal_conv1d.h"

namespace py = pybind11;
using ssmk::conv::BackwardParams;
using ssmk::conv::ForwardParams;
using ssmk::conv::UpdateParams;

#define SSMK_FIELD(STRUCT, NAME) .def_readwrite(#NAME, &STRUCT::NAME)

void bind_causal_conv1d(py::module_& m) {
  py::class_<ForwardParams>(m, "CausalConv1dForwardParams")
      .def(py::init<>())
      SSMK_FIELD(ForwardParams, batch) SSMK_FIELD(ForwardParams, dim) SSMK_FIELD(ForwardParams, seqlen)
      SSMK_FIELD(ForwardParams, width) SSMK_FIELD(ForwardParams, dtype) SSMK_FIELD(ForwardParams, weight_dtype)
      SSMK_FIELD(ForwardParams, bias_dtype) SSMK_FIELD(ForwardParams, silu)
      SSMK_FIELD(ForwardParams, x) SSMK_FIELD(ForwardParams, weight) SSMK_FIELD(ForwardParams, bias)
      SSMK_FIELD(ForwardParams, out) SSMK_FIELD(ForwardParams, initial_states)
      SSMK_FIELD(ForwardParams, final_states) SSMK_FIELD(ForwardParams, seq_idx)
      SSMK_FIELD(ForwardParams, cu_seqlens) SSMK_FIELD(ForwardParams, num_seqs)
      SSMK_FIELD(ForwardParams, x_batch_stride) SSMK_FIELD(ForwardParams, x_c_stride)
      SSMK_FIELD(ForwardParams, x_l_stride) SSMK_FIELD(ForwardParams, out_batch_stride)
      SSMK_FIELD(ForwardParams, out_c_stride) SSMK_FIELD(ForwardParams, out_l_stride)
      SSMK_FIELD(ForwardParams, weight_c_stride) SSMK_FIELD(ForwardParams, weight_width_stride)
      SSMK_FIELD(ForwardParams, bias_stride) SSMK_FIELD(ForwardParams, init_batch_stride)
      SSMK_FIELD(ForwardParams, init_c_stride) SSMK_FIELD(ForwardParams, init_l_stride)
      SSMK_FIELD(ForwardParams, final_batch_stride) SSMK_FIELD(ForwardParams, final_c_stride)
      SSMK_FIELD(ForwardParams, final_l_stride) SSMK_FIELD(ForwardParams, seq_batch_stride)
      SSMK_FIELD(ForwardParams, seq_l_stride) SSMK_FIELD(ForwardParams, stream);

  py::class_<BackwardParams, ForwardParams>(m, "CausalConv1dBackwardParams")
      .def(py::init<>())
      SSMK_FIELD(BackwardParams, dout) SSMK_FIELD(BackwardParams, dx) SSMK_FIELD(BackwardParams, dfinal_states)
      SSMK_FIELD(BackwardParams, dinitial_states) SSMK_FIELD(BackwardParams, dweight_partial)
      SSMK_FIELD(BackwardParams, dbias_partial) SSMK_FIELD(BackwardParams, dweight)
      SSMK_FIELD(BackwardParams, dbias) SSMK_FIELD(BackwardParams, dweight_c_stride)
      SSMK_FIELD(BackwardParams, dweight_width_stride) SSMK_FIELD(BackwardParams, dbias_stride)
      SSMK_FIELD(BackwardParams, dout_batch_stride)
      SSMK_FIELD(BackwardParams, dout_c_stride) SSMK_FIELD(BackwardParams, dout_l_stride)
      SSMK_FIELD(BackwardParams, dx_batch_stride) SSMK_FIELD(BackwardParams, dx_c_stride)
      SSMK_FIELD(BackwardParams, dx_l_stride) SSMK_FIELD(BackwardParams, dfinal_batch_stride)
      SSMK_FIELD(BackwardParams, dfinal_c_stride) SSMK_FIELD(BackwardParams, dfinal_l_stride)
      SSMK_FIELD(BackwardParams, dinit_batch_stride) SSMK_FIELD(BackwardParams, dinit_c_stride)
      SSMK_FIELD(BackwardParams, dinit_l_stride);

  py::class_<UpdateParams>(m, "CausalConv1dUpdateParams")
      .def(py::init<>())
      SSMK_FIELD(UpdateParams, batch) SSMK_FIELD(UpdateParams, dim) SSMK_FIELD(UpdateParams, tokens)
      SSMK_FIELD(UpdateParams, slots)
      SSMK_FIELD(UpdateParams, state_len) SSMK_FIELD(UpdateParams, width) SSMK_FIELD(UpdateParams, dtype)
      SSMK_FIELD(UpdateParams, state_dtype) SSMK_FIELD(UpdateParams, weight_dtype)
      SSMK_FIELD(UpdateParams, bias_dtype) SSMK_FIELD(UpdateParams, silu)
      SSMK_FIELD(UpdateParams, x) SSMK_FIELD(UpdateParams, conv_state) SSMK_FIELD(UpdateParams, weight)
      SSMK_FIELD(UpdateParams, bias) SSMK_FIELD(UpdateParams, out) SSMK_FIELD(UpdateParams, cache_seqlens)
      SSMK_FIELD(UpdateParams, conv_state_indices)
      SSMK_FIELD(UpdateParams, x_batch_stride) SSMK_FIELD(UpdateParams, x_c_stride)
      SSMK_FIELD(UpdateParams, x_l_stride) SSMK_FIELD(UpdateParams, state_batch_stride)
      SSMK_FIELD(UpdateParams, state_c_stride) SSMK_FIELD(UpdateParams, state_l_stride)
      SSMK_FIELD(UpdateParams, out_batch_stride) SSMK_FIELD(UpdateParams, out_c_stride)
      SSMK_FIELD(UpdateParams, out_l_stride) SSMK_FIELD(UpdateParams, weight_c_stride)
      SSMK_FIELD(UpdateParams, weight_width_stride) SSMK_FIELD(UpdateParams, bias_stride)
      SSMK_FIELD(UpdateParams, stream);

  m.attr("causal_conv1d_max_width") = ssmk::conv::kMaxWidth;
  m.def("causal_conv1d_fwd_channel_first", &ssmk::conv::forward_channel_first, py::arg("params"),
        "causal_conv1d forward for x with unit stride along l");
  m.def("causal_conv1d_fwd_channel_last", &ssmk::conv::forward_channel_last, py::arg("params"),
        "causal_conv1d forward for x with unit stride along d");
  m.def("causal_conv1d_final_states", &ssmk::conv::final_states, py::arg("params"),
        "final states (last w-1 inputs of each sequence) of causal_conv1d");
  m.def("causal_conv1d_bwd_partial_rows", &ssmk::conv::backward_partial_rows, py::arg("params"),
        "rows of the float32 dweight/dbias partial sums causal_conv1d_bwd writes for these params");
  m.def("causal_conv1d_bwd", &ssmk::conv::backward, py::arg("params"),
        "causal_conv1d backward: dx, d(initial states), float32 partial sums of dweight and dbias (and, when "
        "dweight is set, their sums into dweight and dbias)");
  m.def("causal_conv1d_update", &ssmk::conv::update, py::arg("params"),
        "causal_conv1d decode step(s) on conv_state, in place");
  m.def("causal_conv1d_update_vector", &ssmk::conv::update_uses_vector_kernel, py::arg("params"),
        "whether causal_conv1d_update takes its vector kernel for these params (addresses included)");
  // The decode loop's launch: params prepared once per kind of call, addresses and stream per call
  // (one call with nine integers instead of setting nine attributes, each a pybind11 call).
  m.def(
      "causal_conv1d_update_at",
      [](UpdateParams p, std::uintptr_t x, std::uintptr_t conv_state, std::uintptr_t weight, std::uintptr_t bias,
         std::uintptr_t out, std::uintptr_t cache_seqlens, std::uintptr_t conv_state_indices, std::uintptr_t stream) {
        p.x = x, p.conv_state = conv_state, p.weight = weight, p.bias = bias, p.out = out;
        p.cache_seqlens = cache_seqlens, p.conv_state_indices = conv_state_indices, p.stream = stream;
        ssmk::conv::update(p);
      },
      py::arg("params"), py::arg("x"), py::arg("conv_state"), py::arg("weight"), py::arg("bias"), py::arg("out"),
      py::arg("cache_seqlens"), py::arg("conv_state_indices"), py::arg("stream"),
      "causal_conv1d_update with prepared params (sizes, strides, dtypes) and these addresses");
}
