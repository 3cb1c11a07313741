// The Python module sigmoid_moe._native_cpu: hands the XLA FFI handlers to Python, which
// registers them with jax.ffi (sigmoid_moe/_native.py), with the kernels' limits and what
// they run on (the CPU's vector units, the GEMM library's kernels).

#include <Python.h>

#include <cblas.h>

#include "kernel_limits.h"
#include "xla/ffi/api/api.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(SigmoidMoeTopK);             // top_k_cpu.cc
XLA_FFI_DECLARE_HANDLER_SYMBOL(SigmoidMoeRouteCandidates);  // route_cpu.cc
XLA_FFI_DECLARE_HANDLER_SYMBOL(SigmoidMoeRankCandidates);   // route_cpu.cc
XLA_FFI_DECLARE_HANDLER_SYMBOL(SigmoidMoeExpertFfnFwd);     // expert_ffn_cpu.cc
XLA_FFI_DECLARE_HANDLER_SYMBOL(SigmoidMoeExpertFfnBwd);     // expert_ffn_cpu.cc

namespace {

PyObject* Capsule(void* handler) { return PyCapsule_New(handler, nullptr, nullptr); }

PyObject* Handlers(PyObject*, PyObject*) {
  return Py_BuildValue(
      "{s:N,s:N,s:N,s:N,s:N}", "top_k", Capsule(reinterpret_cast<void*>(&SigmoidMoeTopK)),
      "route_candidates", Capsule(reinterpret_cast<void*>(&SigmoidMoeRouteCandidates)),
      "rank_candidates", Capsule(reinterpret_cast<void*>(&SigmoidMoeRankCandidates)),
      "expert_ffn_fwd", Capsule(reinterpret_cast<void*>(&SigmoidMoeExpertFfnFwd)),
      "expert_ffn_bwd", Capsule(reinterpret_cast<void*>(&SigmoidMoeExpertFfnBwd)));
}

PyObject* Limits(PyObject*, PyObject*) {
  using namespace sigmoid_moe;
  using L = long long;
  return Py_BuildValue("{s:L,s:L,s:L,s:i,s:i,s:i,s:L,s:L}", "max_k", L{kMaxK}, "max_fast_k",
                       L{kMaxFastK}, "max_candidates", L{kMaxCandidates}, "not_routed",
                       int{kNotRouted}, "routed", int{kRouted}, "too_many", int{kTooMany},
                       "chunk_rows", L{kChunkRows}, "wave_row_bytes", L{kWaveRowBytes});
}

PyObject* CpuFeatures(PyObject*, PyObject*) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return Py_BuildValue("{s:O,s:O,s:O}", "avx2", __builtin_cpu_supports("avx2") ? Py_True : Py_False,
                       "fma", __builtin_cpu_supports("fma") ? Py_True : Py_False, "avx512f",
                       __builtin_cpu_supports("avx512f") ? Py_True : Py_False);
#else
  return PyDict_New();
#endif
}

PyObject* GemmLibrary(PyObject*, PyObject*) {
  return Py_BuildValue("{s:s,s:s}", "config", scipy_openblas_get_config(), "core",
                       scipy_openblas_get_corename());
}

PyMethodDef kMethods[] = {
    {"handlers", Handlers, METH_NOARGS,
     "PyCapsules of the XLA FFI handlers, by kernel name."},
    {"limits", Limits, METH_NOARGS, "The kernels' limits and status codes (kernel_limits.h)."},
    {"cpu_features", CpuFeatures, METH_NOARGS,
     "The vector units of this CPU the kernels know (x86-64: avx2, fma, avx512f)."},
    {"gemm_library", GemmLibrary, METH_NOARGS,
     "The expert kernel's GEMM library: its build configuration and the kernels (core) it "
     "picked for this CPU."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_native_cpu", nullptr, -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__native_cpu() { return PyModule_Create(&kModule); }
