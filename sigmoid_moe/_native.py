"""The native CPU top-k kernel (csrc/top_k_cpu.cc), registered with ``jax.ffi`` on use.

Internal: :func:`sigmoid_moe.topk.top_k` calls it on CPU and keeps its portable path for
every other backend and case. The extension is built by ``pip install`` (setup.py); where
it could not be (no C++ compiler), or with ``SIGMOID_MOE_NATIVE=0`` in the environment,
:func:`available` is False and nothing uses it.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

try:
    from sigmoid_moe import _top_k_cpu
except ImportError:  # not built: the portable path serves
    _top_k_cpu = None

__all__ = ["MAX_K", "available", "top_k_indices"]

_TARGET = "sigmoid_moe_top_k"
# The kernel's largest k; csrc/top_k_cpu.cc checks the same bound.
MAX_K = 64


def available() -> bool:
    """Whether the extension was built and loads, and ``SIGMOID_MOE_NATIVE`` is not ``0``.

    Read at trace time: a program already compiled keeps the path it was traced with.
    """
    return _top_k_cpu is not None and os.environ.get("SIGMOID_MOE_NATIVE", "1") != "0"


@functools.cache
def _register() -> None:
    jax.ffi.register_ffi_target(_TARGET, _top_k_cpu.top_k_handler(), platform="cpu")


def top_k_indices(x: jax.Array, k: int) -> jax.Array:
    """``[..., k]`` int32 indices of the ``k`` largest of float32 ``x [..., n]`` (CPU only).

    The order of :func:`sigmoid_moe.topk.top_k`: value descending, ties to the lower index,
    NaN as -inf, ``-0.0 == 0.0``. ``1 <= k <= MAX_K``, ``n < 2**31``. No gradient flows
    through it (indices); callers gather the values.

    Rows are independent, so under a mesh every device ranks its own rows: the leading
    dimensions keep their sharding and only the last one is gathered, if it was sharded
    (``custom_partitioning``; without it XLA would gather all of ``x`` on every device).
    Under ``vmap`` the batch dimension is one more leading dimension.
    """
    if not available():
        raise RuntimeError(
            "the native top-k kernel is off: not built (reinstall with a C++ compiler) or "
            "SIGMOID_MOE_NATIVE=0; call sigmoid_moe.topk.top_k, which falls back by itself."
        )
    return _batched(k)(jax.lax.stop_gradient(x))


def _call(x: jax.Array, k: int) -> jax.Array:
    _register()
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (k,), jnp.int32)
    return jax.ffi.ffi_call(_TARGET, out)(x, k=np.int64(k))


def _rows_sharding(mesh, shape: jax.ShapeDtypeStruct) -> NamedSharding:
    """``shape``'s sharding with the last dimension replicated."""
    rank = len(shape.shape)
    spec = tuple(shape.sharding.spec) + (None,) * rank
    return NamedSharding(mesh, P(*spec[: rank - 1], None))


def _partition(k, mesh, arg_shapes, result_shape):
    del result_shape
    rows = _rows_sharding(mesh, arg_shapes[0])
    return mesh, functools.partial(_call, k=k), rows, (rows,)


def _infer_sharding(k, mesh, arg_shapes, result_shape):
    del k, result_shape
    return _rows_sharding(mesh, arg_shapes[0])


_partitioned = custom_partitioning(_call, static_argnums=(1,))
_partitioned.def_partition(
    partition=_partition,
    infer_sharding_from_operands=_infer_sharding,
    sharding_rule="... n -> ... k",
    need_replication_factors=("n", "k"),
)


@functools.cache
def _batched(k: int):
    """The partitioned call for this ``k``, with a vmap rule: the batch dimension, which
    ``custom_vmap`` moves to the front, is one more leading (row) dimension."""

    @jax.custom_batching.custom_vmap
    def call(x):
        return _partitioned(x, k)

    @call.def_vmap
    def _(axis_size, in_batched, x):
        del axis_size, in_batched  # one argument, so it is the batched one
        return call(x), True

    return call
