// Python bindings of the ssd kernels (none yet).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_ssd(py::module_& m) { (void)m; }
