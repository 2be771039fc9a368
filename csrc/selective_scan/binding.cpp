// Python bindings of the selective_scan kernels (none yet).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_selective_scan(py::module_& m) { (void)m; }
