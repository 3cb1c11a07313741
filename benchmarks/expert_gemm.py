"""One expert's GEMMs: the native kernel's library (OpenBLAS) against ``jnp.dot``, one core.

The native expert kernel (csrc/expert_ffn_cpu.cc) runs each expert's six matrix products
on one thread, through OpenBLAS (``scipy_cblas_sgemm`` of the ``scipy-openblas32`` wheel,
csrc/blas_gemm.h). This script times those six products at each ``benchmarks/layer.py``
preset's shapes (a chunk of ``min(rows per expert, 256)`` rows, the kernel's chunk), with
the same operand layouts and transposes, against XLA's ``jnp.dot`` of the same operands, in
one process pinned to one CPU (so XLA's pool has one thread too). The goal of issue 28:
the library within 10% of ``jnp.dot``, which carries the kernel to the speed of XLA's
GEMMs on any CPU the library knows (it picks its kernels for the CPU at run time).

    python benchmarks/expert_gemm.py                 # every preset, 40 calls each
    python benchmarks/expert_gemm.py --preset k2 --repeats 100

Calls alternate (library, XLA, library, ...), so that load from other jobs hits both;
the table gives each side's GFLOP/s from its fastest call and from its median, and
``lib/xla``, the ratio of the fastest calls' times (below 1: the library is faster).
A ``jnp.dot`` call also pays XLA's dispatch (a few microseconds, printed), which the
kernel's calls do not.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time

# One CPU before jax starts: XLA:CPU sizes its thread pool from this process's affinity.
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy_openblas32  # noqa: E402
from _machine import describe  # noqa: E402
from _presets import PRESETS  # noqa: E402

from sigmoid_moe import _native  # noqa: E402

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


def _library():
    lib = ctypes.CDLL(
        os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(True))
    )
    lib.scipy_openblas_set_num_threads(1)
    pointer, integer, real = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.scipy_cblas_sgemm.argtypes = [integer] * 6 + [real, pointer, integer, pointer, integer]
    lib.scipy_cblas_sgemm.argtypes += [real, pointer, integer]
    lib.scipy_cblas_sgemm.restype = None
    return lib


def _products(n: int, d: int, f: int):
    """The kernel's six products of one chunk of ``n`` rows: ``(name, m, n, depth,
    transpose a, transpose b)`` with ``C [m, n] = op(A) op(B)`` (csrc/expert_ffn_cpu.cc)."""
    return [
        ("h = x @ w_in", n, 2 * f, d, False, False),
        ("o = a @ w_out", n, d, f, False, False),
        ("da = dy @ w_out^T", n, f, d, False, True),
        ("dw_out = aw^T @ dy", f, d, n, True, False),
        ("dw_in = x^T @ dh", d, 2 * f, n, True, False),
        ("dx = dh @ w_in^T", n, d, 2 * f, False, True),
    ]


def _operands(rng, m, n, depth, trans_a, trans_b):
    a = rng.standard_normal((depth, m) if trans_a else (m, depth), dtype=np.float32)
    b = rng.standard_normal((n, depth) if trans_b else (depth, n), dtype=np.float32)
    return a, b


def _median(times: list[float]) -> float:
    return statistics.median(times)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="all", choices=[*PRESETS, "all"])
    parser.add_argument("--repeats", type=int, default=40, help="timed calls of each side")
    args = parser.parse_args()
    lib = _library()
    print(describe())
    print(f"pinned to CPU {sorted(os.sched_getaffinity(0))}; {args.repeats} calls each")
    tiny = jax.jit(jnp.dot).lower(jnp.ones((1, 1)), jnp.ones((1, 1))).compile()
    one = (jnp.ones((1, 1)), jnp.ones((1, 1)))
    overhead = min(_timed(lambda: tiny(*one).block_until_ready()) for _ in range(200))
    print(f"XLA dispatch of a 1x1 dot: {overhead * 1e6:.1f} us")
    rng = np.random.default_rng(0)
    chunk = _native.LIMITS.chunk_rows if _native.LIMITS else 256
    header = f"{'preset':7s} {'product':20s} {'m x n x depth':>16s} {'library GF/s':>14s}"
    print(header + f" {'jnp.dot GF/s':>14s} {'lib/xla':>8s}")
    print(f"{'':46s}{'best  median':>14s} {'best  median':>14s}")
    worst = 0.0
    names = list(PRESETS) if args.preset == "all" else [args.preset]
    for name in names:
        tokens, d, f, experts, k, _, _ = PRESETS[name]
        n = min(chunk, -(-tokens * k // experts))
        for label, m, cols, depth, trans_a, trans_b in _products(n, d, f):
            a, b = _operands(rng, m, cols, depth, trans_a, trans_b)
            c = np.empty((m, cols), np.float32)

            def library(a=a, b=b, c=c, m=m, cols=cols, depth=depth, ta=trans_a, tb=trans_b):
                lib.scipy_cblas_sgemm(
                    _ROW_MAJOR,
                    _TRANS if ta else _NO_TRANS,
                    _TRANS if tb else _NO_TRANS,
                    m,
                    cols,
                    depth,
                    1.0,
                    a.ctypes.data,
                    a.shape[1],
                    b.ctypes.data,
                    b.shape[1],
                    0.0,
                    c.ctypes.data,
                    cols,
                )

            def product(a, b, ta=trans_a, tb=trans_b):
                return jnp.dot(a.T if ta else a, b.T if tb else b)

            xla_fn = jax.jit(product).lower(a, b).compile()
            a_dev, b_dev = jnp.asarray(a), jnp.asarray(b)

            def xla(xla_fn=xla_fn, a_dev=a_dev, b_dev=b_dev):
                xla_fn(a_dev, b_dev).block_until_ready()

            library()  # the same product, up to rounding
            np.testing.assert_allclose(c, xla_fn(a_dev, b_dev), rtol=1e-3, atol=1e-3 * depth**0.5)
            xla()
            lib_times, xla_times = [], []
            for _ in range(args.repeats):
                lib_times.append(_timed(library))
                xla_times.append(_timed(xla))
            gflops = 2 * m * cols * depth / 1e9
            ratio = min(lib_times) / min(xla_times)
            worst = max(worst, ratio)
            rates = [gflops / t for ts in (lib_times, xla_times) for t in (min(ts), _median(ts))]
            print(
                f"{name:7s} {label:20s} {f'{m}x{cols}x{depth}':>16s} "
                f"{rates[0]:6.1f} {rates[1]:6.1f}  {rates[2]:6.1f} {rates[3]:6.1f}  {ratio:7.3f}"
            )
    print(f"slowest library product against jnp.dot: {worst:.3f}x (goal: at most 1.10x)")


if __name__ == "__main__":
    main()
