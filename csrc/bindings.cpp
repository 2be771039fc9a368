// pybind11 module ssmkernels._C: the only place where Python meets the native layer.
// Each primitive contributes its functions through bind_<primitive>() (csrc/<primitive>/binding.cpp);
// functions take raw addresses, sizes, strides and a stream handle as integers.
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

#include "common.h"

namespace py = pybind11;

void bind_causal_conv1d(py::module_& m);
void bind_selective_scan(py::module_& m);
void bind_ssd(py::module_& m);
void bind_state_update(py::module_& m);

namespace {

int runtime_version() {
  int version = 0;
  ssmk::check_cuda(cudaRuntimeGetVersion(&version), "cudaRuntimeGetVersion");
  return version;
}

int device_count() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ssmkernels CUDA kernels (torch-free: raw pointers, sizes, strides, stream handles)";
  m.def("cuda_runtime_version", &runtime_version, "CUDA runtime version linked into the module");
  m.def("device_count", &device_count, "number of CUDA devices the runtime sees (0 without a driver)");
  bind_causal_conv1d(m);
  bind_selective_scan(m);
  bind_ssd(m);
  bind_state_update(m);
}
