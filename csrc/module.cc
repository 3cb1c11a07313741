// The Python module sigmoid_moe._native_cpu: hands the XLA FFI handlers to Python, which
// registers them with jax.ffi (sigmoid_moe/_native.py). No other Python API.

#include <Python.h>

#include "xla/ffi/api/api.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(SigmoidMoeTopK);             // top_k_cpu.cc
XLA_FFI_DECLARE_HANDLER_SYMBOL(SigmoidMoeRouteCandidates);  // route_cpu.cc
XLA_FFI_DECLARE_HANDLER_SYMBOL(SigmoidMoeRankCandidates);   // route_cpu.cc
XLA_FFI_DECLARE_HANDLER_SYMBOL(SigmoidMoeExpertFfnFwd);     // expert_ffn_cpu.cc
XLA_FFI_DECLARE_HANDLER_SYMBOL(SigmoidMoeExpertFfnBwd);     // expert_ffn_cpu.cc

namespace {

PyObject* TopKHandler(PyObject*, PyObject*) {
  return PyCapsule_New(reinterpret_cast<void*>(&SigmoidMoeTopK), nullptr, nullptr);
}

PyObject* RouteCandidatesHandler(PyObject*, PyObject*) {
  return PyCapsule_New(reinterpret_cast<void*>(&SigmoidMoeRouteCandidates), nullptr, nullptr);
}

PyObject* RankCandidatesHandler(PyObject*, PyObject*) {
  return PyCapsule_New(reinterpret_cast<void*>(&SigmoidMoeRankCandidates), nullptr, nullptr);
}

PyObject* ExpertFfnFwdHandler(PyObject*, PyObject*) {
  return PyCapsule_New(reinterpret_cast<void*>(&SigmoidMoeExpertFfnFwd), nullptr, nullptr);
}

PyObject* ExpertFfnBwdHandler(PyObject*, PyObject*) {
  return PyCapsule_New(reinterpret_cast<void*>(&SigmoidMoeExpertFfnBwd), nullptr, nullptr);
}

PyMethodDef kMethods[] = {
    {"top_k_handler", TopKHandler, METH_NOARGS, "PyCapsule of the XLA FFI top-k handler."},
    {"route_candidates_handler", RouteCandidatesHandler, METH_NOARGS,
     "PyCapsule of the XLA FFI route-candidates handler."},
    {"rank_candidates_handler", RankCandidatesHandler, METH_NOARGS,
     "PyCapsule of the XLA FFI rank-candidates handler."},
    {"expert_ffn_fwd_handler", ExpertFfnFwdHandler, METH_NOARGS,
     "PyCapsule of the XLA FFI expert-FFN forward handler."},
    {"expert_ffn_bwd_handler", ExpertFfnBwdHandler, METH_NOARGS,
     "PyCapsule of the XLA FFI expert-FFN backward handler."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_native_cpu", nullptr, -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__native_cpu() { return PyModule_Create(&kModule); }
