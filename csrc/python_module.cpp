// An empty Python module so that `import memllm_kernels._C` loads the shared library, whose
// static initializers register the ops with the dispatcher. Built only by setup.py (the CMake
// variant is a plain library loaded with torch.ops.load_library).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "memllm_kernels compiled ops (registered in torch.ops.memllm)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}
