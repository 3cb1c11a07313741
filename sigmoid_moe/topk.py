"""Exact top-k along the last axis with ties broken to the lower index.

On CPU, when the native kernel is built (``pip install`` compiles csrc/top_k_cpu.cc, an
XLA FFI handler), :func:`top_k` calls it (figures in the README). Everywhere else (GPU,
TPU, an exported accelerator program, float64, k past the kernel's ``max_k``, or no
compiler at install) the portable pure-JAX path below serves; both give the same
indices, bit for bit, and the tests hold them to one oracle. ``SIGMOID_MOE_NATIVE=0`` in
the environment turns the kernel off.

The portable path: XLA:CPU's ``TopK`` costs more than the router matmul it follows, and
for the small k of MoE routing a pure-JAX formulation is faster and exact on every
backend: k rounds, each taking the next element in the total order
``(value descending, index ascending)``. Round ``i`` looks only at the elements that come
strictly after the previous pick in that order, so nothing is written back and ``-inf``
entries (masked groups) behave like any other value. Rows longer than 128 entries (a
384-expert router) keep the best entry of each chunk of 16 and rescan only the chunk the
pick came from, so a round costs ``O(n / 16 + 16)`` instead of ``O(n)``. Rows are
processed in blocks that keep each round's temporaries in cache. What bounds it on
XLA:CPU, and the formulations tried and dropped, are in ``benchmarks/routing.py``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from sigmoid_moe import _native
from sigmoid_moe._checks import require_array

# Beyond this k the k reductions cost more than one stable sort.
_MAX_ITERATIVE_K = 16
# Rows up to this long use the narrow formulation (float32 index, one mask per round);
# longer ones the wide one (chunks of _CHUNK, each round rescans one chunk).
_MAX_NARROW_N = 128
# Elements per block when the narrow formulation is blocked over rows: blocks of ~128 KiB
# keep the per-round temporaries in cache.
_BLOCK_ELEMENTS = 32768
# The wide formulation's chunk length and rows per block.
_CHUNK = 16
_WIDE_BLOCK_ROWS = 128


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Largest ``k`` entries of ``x`` along its last axis, ties to the lower index.

    Args:
      x: ``[..., n]`` floating array. NaN is treated as ``-inf`` (never preferred).
      k: static int, ``1 <= k <= n``.

    Returns:
      ``(values [..., k], indices [..., k] int32)``, in descending order of value and,
      among equal values, ascending order of index. ``-0.0`` and ``0.0`` are equal.
    """
    require_array("x", x, "[..., n]")
    if x.ndim == 0:
        raise ValueError("top_k: x must have a last axis to rank along, got a scalar.")
    n = x.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"top_k: k must be an int in [1, {n}] for a last axis of {n}, got {k!r}.")
    return _native.native_or_portable(
        functools.partial(_top_k_native, k=k),
        functools.partial(_top_k_portable, k=k),
        x,
        when=lambda: k <= _native.LIMITS.max_k and x.dtype in _NATIVE_DTYPES and n < 2**31,
    )


# Converted to float32 exactly, so the order is the same.
_NATIVE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _top_k_native(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    # The kernel reads NaN as -inf itself, so no pass over x here. Values are gathered:
    # they are differentiable, and the indices need no gradient.
    indices = _native.top_k_indices(x.astype(jnp.float32), k)
    values = jnp.take_along_axis(x, indices, axis=-1)
    return jnp.where(jnp.isnan(values), -jnp.inf, values), indices


def _top_k_portable(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    x = jnp.where(jnp.isnan(x), -jnp.inf, x)
    if k > _MAX_ITERATIVE_K:
        return _top_k_sorted(x, k)
    return _top_k_iterative(x, k)


def _top_k_iterative(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    n = x.shape[-1]
    if n > _MAX_NARROW_N:
        fn, block = _top_k_wide, _WIDE_BLOCK_ROWS
    else:
        fn, block = _top_k_narrow, max(1, _BLOCK_ELEMENTS // n)
    rows = math.prod(x.shape[:-1])
    if rows < 4 * block:
        return fn(x, k)
    num_blocks = -(-rows // block)
    flat = x.reshape(rows, n)
    if num_blocks * block != rows:  # pad with -inf rows, dropped below
        flat = jnp.pad(flat, ((0, num_blocks * block - rows), (0, 0)), constant_values=-jnp.inf)
    values, indices = jax.lax.map(
        lambda rows_bn: fn(rows_bn, k), flat.reshape(num_blocks, block, n)
    )
    values = values.reshape(num_blocks * block, k)[:rows]
    indices = indices.reshape(num_blocks * block, k)[:rows]
    return values.reshape(*x.shape[:-1], k), indices.reshape(*x.shape[:-1], k)


def _top_k_narrow(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    n = x.shape[-1]
    # Index arithmetic in float32 when exact (n < 2**24): XLA:CPU runs float reductions
    # through its fast (YNNPACK) path and integer ones through a slow reduce-window.
    index_dtype = jnp.float32 if n < 2**24 else jnp.int32
    index = jnp.arange(n, dtype=index_dtype)
    none = jnp.asarray(n, index_dtype)
    values, indices = [], []
    prev_value = prev_index = None
    for _ in range(k):
        if prev_value is None:
            best = jnp.max(x, axis=-1)  # [...]
            is_best = x == best[..., None]
        else:
            pv, pi = prev_value[..., None], prev_index[..., None]
            # Strictly after the previous pick in (value desc, index asc) order.
            after_prev = (x < pv) | ((x == pv) & (index > pi))
            best = jnp.max(jnp.where(after_prev, x, -jnp.inf), axis=-1)  # [...]
            # An element equal to `best` is after the previous pick iff best < prev value
            # or its index is past the previous index: one compare, no second mask pass.
            floor = jnp.where(best == prev_value, prev_index, -1)
            is_best = (x == best[..., None]) & (index > floor[..., None])
        best_index = jnp.min(jnp.where(is_best, index, none), axis=-1)  # [...]
        values.append(best)
        indices.append(best_index)
        prev_value, prev_index = best, best_index
    return jnp.stack(values, axis=-1), jnp.stack(indices, axis=-1).astype(jnp.int32)


def _top_k_wide(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    # Same order, for rows longer than _MAX_NARROW_N, without k passes over the whole row.
    # The row is cut into C chunks of _CHUNK; each chunk keeps its best element not yet
    # taken. A round takes the best of the C chunk bests, then rescans only that chunk:
    # O(n + k * (C + _CHUNK)) per row instead of O(k * n). Only the taken element's chunk
    # changes, because every other chunk's best comes after the taken one in the order.
    *lead, n = x.shape
    length = min(_CHUNK, n)
    chunks = -(-n // length)
    if chunks * length != n:  # -inf padding sorts after every real entry (higher index)
        x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, chunks * length - n)], constant_values=-jnp.inf)
    x_cl = x.reshape(*lead, chunks, length)
    # float32 indices: exact below 2**24, and float reductions take XLA:CPU's fast path.
    index_cl = jnp.arange(chunks * length, dtype=jnp.float32).reshape(chunks, length)
    none = jnp.float32(chunks * length)

    def best_after(values_l, index_l, prev_value, prev_index):
        """Best entry of each chunk strictly after (prev_value, prev_index) in the order."""
        if prev_value is None:
            best = jnp.max(values_l, axis=-1)
            floor = jnp.full(best.shape, -1.0, jnp.float32)
        else:
            pv, pi = prev_value[..., None], prev_index[..., None]
            after = (values_l < pv) | ((values_l == pv) & (index_l > pi))
            best = jnp.max(jnp.where(after, values_l, -jnp.inf), axis=-1)
            # As in the narrow form: an entry equal to `best` is after the previous pick iff
            # best < prev value or its index is past the previous index.
            floor = jnp.where(best == prev_value, prev_index, -1.0)
        is_best = (values_l == best[..., None]) & (index_l > floor[..., None])
        return best, jnp.min(jnp.where(is_best, index_l, none), axis=-1)

    chunk_value, chunk_index = best_after(x_cl, index_cl, None, None)  # [..., C]
    chunk_ids = jnp.arange(chunks, dtype=jnp.int32)
    lane = jnp.arange(length, dtype=jnp.float32)
    values, indices = [], []
    for round_ in range(k):
        best = jnp.max(chunk_value, axis=-1)  # [...]
        best_index = jnp.min(jnp.where(chunk_value == best[..., None], chunk_index, none), axis=-1)
        values.append(best)
        indices.append(best_index)
        if round_ == k - 1:
            break
        chunk = (best_index // length).astype(jnp.int32)  # [...] the taken entry's chunk
        values_l = jnp.take_along_axis(x_cl, chunk[..., None, None], axis=-2)[..., 0, :]
        index_l = chunk[..., None].astype(jnp.float32) * length + lane
        new_value, new_index = best_after(values_l, index_l, best, best_index)
        hit = chunk_ids == chunk[..., None]
        chunk_value = jnp.where(hit, new_value[..., None], chunk_value)
        chunk_index = jnp.where(hit, new_index[..., None], chunk_index)
    return jnp.stack(values, axis=-1), jnp.stack(indices, axis=-1).astype(jnp.int32)


def _top_k_sorted(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    # A stable sort keeps equal keys in index order; canonicalise -0.0 so it ties 0.0.
    key = jnp.where(x == 0, jnp.zeros_like(x), -x)
    order = jnp.argsort(key, axis=-1, stable=True)[..., :k].astype(jnp.int32)
    return jnp.take_along_axis(x, order, axis=-1), order
