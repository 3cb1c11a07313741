"""Builds the optional native CPU kernels (XLA FFI handlers in csrc/): the exact top-k
(top_k_cpu.cc) and the sigmoid router's candidate experts (route_cpu.cc).

Everything else is in pyproject.toml. The kernels compile against the XLA FFI headers that
jaxlib ships (``jaxlib/include``, the same directory as ``jax.ffi.include_dir()``), which
the build requirements install. Without a C++ compiler the build skips it (``optional``)
and ``sigmoid_moe.topk.top_k`` and ``sigmoid_moe.route`` use their portable pure-JAX paths
everywhere.
"""

import importlib.util
import os

from setuptools import Extension, setup


def _ffi_include_dir() -> str:
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("building the native kernel needs jaxlib (a build requirement)")
    return os.path.join(list(spec.submodule_search_locations)[0], "include")


setup(
    ext_modules=[
        Extension(
            "sigmoid_moe._native_cpu",
            sources=[
                "csrc/module.cc",
                "csrc/top_k_cpu.cc",
                "csrc/route_cpu.cc",
                "csrc/expert_ffn_cpu.cc",
            ],
            depends=["csrc/top_k_row.h", "csrc/row_tasks.h", "csrc/gemm_f32.h"],
            include_dirs=[_ffi_include_dir()],
            language="c++",
            extra_compile_args=["-std=c++17", "-O3", "-fno-trapping-math", "-fvisibility=hidden"],
            optional=True,
        )
    ]
)
