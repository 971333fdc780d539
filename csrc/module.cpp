// fastmaml._C, the Python module: `import fastmaml._C` loads the shared library built from
// csrc/cpu/*.cpp (and csrc/cuda/* in a CUDA build), whose TORCH_LIBRARY / TORCH_LIBRARY_FRAGMENT
// static initializers register torch.ops.fastmaml (flat ops, layer ops) and torch.ops.fastmaml_cg.
// The module itself is empty. Left out of the standalone CMake library (FASTMAML_NO_PYTHON_MODULE).

#ifndef FASTMAML_NO_PYTHON_MODULE
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef fastmaml_c_module = {
      PyModuleDef_HEAD_INIT,
      "_C",  // m_name
      "fastmaml compiled kernels: importing this module registers torch.ops.fastmaml",  // m_doc
      -1,       // m_size
      nullptr,  // m_methods
      nullptr,  // m_slots
      nullptr,  // m_traverse
      nullptr,  // m_clear
      nullptr,  // m_free
  };
  return PyModule_Create(&fastmaml_c_module);
}
#endif  // FASTMAML_NO_PYTHON_MODULE
