/*
 * Makes the C engine importable as the extension module tinygpt._engine so that `pip install`
 * builds it with the platform's compiler and flags. Python talks to the engine through ctypes
 * (engine.py): the engine's C API is the binding, nothing is wrapped twice.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef engine_module = {
    PyModuleDef_HEAD_INIT, "_engine",
    "tinygpt C engine (usercmodule/tinygpt/tinygpt.c); used through ctypes by tinygpt.engine.",
    -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__engine(void) {
    return PyModule_Create(&engine_module);
}
