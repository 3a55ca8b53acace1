// The Python module `idkm_plugin._C`: importing it runs the static initialisers of every file in csrc/,
// which register their ops with torch.library (namespace `idkm_plugin`, one TORCH_LIBRARY_FRAGMENT each).
#include <Python.h>

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                        "Native ops of idkm_plugin, registered in torch.ops.idkm_plugin", -1,
                                        nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
