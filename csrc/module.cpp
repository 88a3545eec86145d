// The Python module gradstab._C. Importing it loads this library, which runs the operator
// registrations; its one Python function reports how the library was built.
#include <Python.h>

#include <string>

#include "cpu/kernels.h"

namespace gradstab {
std::string cuda_build_info();
}

namespace {

PyObject* build_info(PyObject*, PyObject*) {
  std::string info = "compiler: ";
#if defined(__clang__)
  info += "clang " __clang_version__;
#elif defined(__GNUC__)
  info += "gcc " __VERSION__;
#else
  info += "unknown";
#endif
#if defined(_OPENMP)
  info += "; openmp: yes";
#else
  info += "; openmp: no";
#endif
  info += std::string("; cpu kernels: ") + gradstab::cpu::kernel_isa();
  info += "; " + gradstab::cuda_build_info();
  return PyUnicode_FromString(info.c_str());
}

// The CPU kernel's instruction set and work-plan sizes, for tests and benchmarks.
PyObject* cpu_kernel_info(PyObject*, PyObject*) {
  return Py_BuildValue("{s:s,s:L,s:L,s:i}", "isa", gradstab::cpu::kernel_isa(), "chunk_elems",
                       static_cast<long long>(gradstab::cpu::kChunkElems), "fused_max_bytes",
                       static_cast<long long>(gradstab::cpu::kFusedMaxBytes), "sum_lanes",
                       gradstab::cpu::kSumLanes);
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "How gradstab._C was compiled."},
    {"cpu_kernel_info", cpu_kernel_info, METH_NOARGS,
     "The CPU kernel's instruction set and work-plan sizes."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
