"""Builds the optional native CPU kernels (XLA FFI handlers in csrc/): the exact top-k
(top_k_cpu.cc), the sigmoid router's candidate experts and their ranking (route_cpu.cc),
and the blocked FFN's routed experts, forward and backward (expert_ffn_cpu.cc).

Everything else is in pyproject.toml. The kernels compile against the XLA FFI headers that
jaxlib ships (``jaxlib/include``, the same directory as ``jax.ffi.include_dir()``), and the
expert kernel's GEMMs link against OpenBLAS from the ``scipy-openblas32`` wheel (its
``get_include_dir()`` and ``get_lib_dir()``); both are build requirements. The extension
finds that library at run time because ``sigmoid_moe._native`` imports
``scipy_openblas32`` (a dependency, which loads it) before the extension, the wheel's
documented "preloading" use. Without a C++ compiler the build skips the extension
(``optional``) and ``top_k``, ``route`` and the experts use their portable pure-JAX paths
everywhere.
"""

import importlib.util
import os

from setuptools import Extension, setup


def _ffi_include_dir() -> str:
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("building the native kernels needs jaxlib (a build requirement)")
    return os.path.join(list(spec.submodule_search_locations)[0], "include")


def _openblas():
    try:
        import scipy_openblas32
    except ImportError as err:
        raise RuntimeError(
            "building the native kernels needs scipy-openblas32 (a build requirement)"
        ) from err
    return scipy_openblas32


_blas = _openblas()

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
            depends=[
                "csrc/blas_gemm.h",
                "csrc/kernel_limits.h",
                "csrc/row_tasks.h",
                "csrc/simd_math.h",
                "csrc/top_k_row.h",
            ],
            include_dirs=[_ffi_include_dir(), _blas.get_include_dir()],
            library_dirs=[_blas.get_lib_dir()],
            libraries=[_blas.get_library()],
            language="c++",
            extra_compile_args=["-std=c++17", "-O3", "-fno-trapping-math", "-fvisibility=hidden"],
            optional=True,
        )
    ]
)
