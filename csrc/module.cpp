// scalerec._C — the extension module. Operators live in the `scalerec` torch library namespace;
// each op file adds its schema with TORCH_LIBRARY_FRAGMENT and its kernels with TORCH_LIBRARY_IMPL.
// Importing scalerec._C (a plain Python module) loads the shared library and so registers them all.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(scalerec, m) {
  // Schemas are declared next to their kernels (TORCH_LIBRARY_FRAGMENT in csrc/cpu/*.cpp).
}

static struct PyModuleDef scalerec_c_module = {PyModuleDef_HEAD_INIT, "_C", "scalerec C++/CUDA ops", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&scalerec_c_module); }
