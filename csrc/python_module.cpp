// An empty Python module so that `import memllm_kernels._C` loads the shared library, whose
// static initializers register the ops with the dispatcher. Built only by setup.py (the CMake
// variant is a plain library loaded with torch.ops.load_library).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                         // m_name
      "memllm_kernels compiled ops (registered in torch.ops.memllm)",  // m_doc
      -1,                                                           // m_size
      nullptr,                                                      // m_methods
      nullptr,                                                      // m_slots
      nullptr,                                                      // m_traverse
      nullptr,                                                      // m_clear
      nullptr,                                                      // m_free
  };
  return PyModule_Create(&module_def);
}
}
