"""Builds the optional native CPU top-k kernel (an XLA FFI handler, csrc/top_k_cpu.cc).

Everything else is in pyproject.toml. The kernel compiles against the XLA FFI headers that
jaxlib ships (``jaxlib/include``, the same directory as ``jax.ffi.include_dir()``), which
the build requirements install. Without a C++ compiler the build skips it (``optional``)
and ``sigmoid_moe.topk.top_k`` uses its portable pure-JAX path everywhere.
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
            "sigmoid_moe._top_k_cpu",
            sources=["csrc/top_k_cpu.cc"],
            include_dirs=[_ffi_include_dir()],
            language="c++",
            extra_compile_args=["-std=c++17", "-O3", "-fvisibility=hidden"],
            optional=True,
        )
    ]
)
