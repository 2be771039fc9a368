// Python bindings of the state_update kernels (none yet).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_state_update(py::module_& m) { (void)m; }
