// Python bindings of the selective_scan kernels: the params struct as a plain attribute bag (the
// Python side fills every field from tensors: addresses, sizes, 64-bit strides, stream handle) and
// one function per launcher. No logic here beyond exposing them.
#include <pybind11/pybind11.h>

#include "selective_scan/selective_scan.h"

namespace py = pybind11;
using ssmk::scan::Params;

#define SSMK_SCAN_FIELD(NAME) .def_readwrite(#NAME, &Params::NAME)

void bind_selective_scan(py::module_& m) {
  py::class_<Params>(m, "SelectiveScanParams")
      .def(py::init<>())
      SSMK_SCAN_FIELD(batch) SSMK_SCAN_FIELD(dim) SSMK_SCAN_FIELD(seqlen) SSMK_SCAN_FIELD(dstate)
      SSMK_SCAN_FIELD(num_seqs) SSMK_SCAN_FIELD(chunks_per_row) SSMK_SCAN_FIELD(dtype) SSMK_SCAN_FIELD(bc_dtype)
      SSMK_SCAN_FIELD(b_fixed) SSMK_SCAN_FIELD(c_fixed) SSMK_SCAN_FIELD(softplus)
      SSMK_SCAN_FIELD(channels_per_b_group) SSMK_SCAN_FIELD(channels_per_c_group)
      SSMK_SCAN_FIELD(u) SSMK_SCAN_FIELD(delta) SSMK_SCAN_FIELD(z) SSMK_SCAN_FIELD(out) SSMK_SCAN_FIELD(out_pre)
      SSMK_SCAN_FIELD(A) SSMK_SCAN_FIELD(B) SSMK_SCAN_FIELD(C) SSMK_SCAN_FIELD(D) SSMK_SCAN_FIELD(delta_bias)
      SSMK_SCAN_FIELD(initial_state) SSMK_SCAN_FIELD(last_state) SSMK_SCAN_FIELD(checkpoints)
      SSMK_SCAN_FIELD(cu_seqlens) SSMK_SCAN_FIELD(x_batch_stride) SSMK_SCAN_FIELD(x_d_stride)
      SSMK_SCAN_FIELD(B_batch_stride) SSMK_SCAN_FIELD(B_group_stride) SSMK_SCAN_FIELD(B_n_stride)
      SSMK_SCAN_FIELD(C_batch_stride) SSMK_SCAN_FIELD(C_group_stride) SSMK_SCAN_FIELD(C_n_stride)
      SSMK_SCAN_FIELD(dout) SSMK_SCAN_FIELD(dlast_state) SSMK_SCAN_FIELD(du) SSMK_SCAN_FIELD(ddelta)
      SSMK_SCAN_FIELD(dz) SSMK_SCAN_FIELD(dinitial_state) SSMK_SCAN_FIELD(dA_part) SSMK_SCAN_FIELD(dD_part)
      SSMK_SCAN_FIELD(dbias_part) SSMK_SCAN_FIELD(dB) SSMK_SCAN_FIELD(dC)
      SSMK_SCAN_FIELD(dB_batch_stride) SSMK_SCAN_FIELD(dB_group_stride) SSMK_SCAN_FIELD(dB_n_stride)
      SSMK_SCAN_FIELD(dC_batch_stride) SSMK_SCAN_FIELD(dC_group_stride) SSMK_SCAN_FIELD(dC_n_stride)
      SSMK_SCAN_FIELD(channel_begin) SSMK_SCAN_FIELD(channel_count) SSMK_SCAN_FIELD(bc_grad_per_channel)
      SSMK_SCAN_FIELD(tile_states)
      SSMK_SCAN_FIELD(stream);

  m.attr("selective_scan_chunk") = ssmk::scan::kChunk;
  m.def("selective_scan_fwd", &ssmk::scan::forward, py::arg("params"),
        "selective_scan forward: out, last_state and the chunk checkpoints");
  m.def("selective_scan_bwd", &ssmk::scan::backward, py::arg("params"),
        "selective_scan backward from the forward's checkpoints");
  m.def("selective_scan_bwd_workspace", &ssmk::scan::backward_workspace_floats, py::arg("params"),
        "float32 values of workspace (params.tile_states) the backward of these params takes (0: none)");
}
