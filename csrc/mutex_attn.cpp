// The mutex_attn operator library: op schemas (one place) and the tiny _C Python module whose
// only job is to load this library into the process. Kernels register themselves per device
// in cpu/ and cuda/ with TORCH_LIBRARY_IMPL; autograd and fake kernels are registered from
// Python (mutex_attn/backends/native.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing mutex_attn._C runs the static TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(mutex_attn, m) {
}
