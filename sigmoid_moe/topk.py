"""Exact top-k along the last axis with ties broken to the lower index.

XLA:CPU's ``TopK`` spends ~9 ns per element, more than the router matmul it follows.
For the small k of MoE routing a pure-JAX formulation is faster and exact on every
backend: k rounds, each taking the next element in the total order
``(value descending, index ascending)``. Round ``i`` looks only at the elements that come
strictly after the previous pick in that order, so nothing is written back and ``-inf``
entries (masked groups) behave like any other value.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Beyond this k the k reductions cost more than one stable sort.
_MAX_ITERATIVE_K = 16
# Rows up to this long use the narrow formulation (float32 index, one mask per round).
_MAX_NARROW_N = 256
# Elements per block when the narrow formulation is blocked over rows: blocks of ~128 KiB
# keep the per-round temporaries in cache (measured 2-4x at [4096, 256] and [16384, 128]).
_BLOCK_ELEMENTS = 32768


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Largest ``k`` entries of ``x`` along its last axis, ties to the lower index.

    Args:
      x: ``[..., n]`` floating array. NaN is treated as ``-inf`` (never preferred).
      k: static int, ``1 <= k <= n``.

    Returns:
      ``(values [..., k], indices [..., k] int32)``, in descending order of value and,
      among equal values, ascending order of index. ``-0.0`` and ``0.0`` are equal.
    """
    n = x.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"top_k: k must be an int in [1, {n}] for a last axis of {n}, got {k!r}.")
    x = jnp.where(jnp.isnan(x), -jnp.inf, x)
    if k > _MAX_ITERATIVE_K:
        return _top_k_sorted(x, k)
    return _top_k_iterative(x, k)


def _top_k_iterative(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    n = x.shape[-1]
    if n > _MAX_NARROW_N:
        return _top_k_wide(x, k)
    rows = math.prod(x.shape[:-1])
    block = max(1, _BLOCK_ELEMENTS // n)
    if rows < 4 * block:
        return _top_k_narrow(x, k)
    num_blocks = -(-rows // block)
    flat = x.reshape(rows, n)
    if num_blocks * block != rows:  # pad with -inf rows, dropped below
        flat = jnp.pad(flat, ((0, num_blocks * block - rows), (0, 0)), constant_values=-jnp.inf)
    values, indices = jax.lax.map(
        lambda rows_bn: _top_k_narrow(rows_bn, k), flat.reshape(num_blocks, block, n)
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
    # Same order, int32 indices and a full "after" mask, for rows longer than
    # _MAX_NARROW_N (the narrow form's per-round temporaries outgrow the cache there).
    n = x.shape[-1]
    index = jnp.arange(n, dtype=jnp.int32)
    values, indices = [], []
    prev_value = prev_index = None
    for _ in range(k):
        if prev_value is None:
            after_prev = None
            candidates = x
        else:
            after_prev = (x < prev_value[..., None]) | (
                (x == prev_value[..., None]) & (index > prev_index[..., None])
            )
            candidates = jnp.where(after_prev, x, -jnp.inf)
        best = jnp.max(candidates, axis=-1)  # [...]
        is_best = x == best[..., None]
        if after_prev is not None:
            is_best &= after_prev
        best_index = jnp.min(jnp.where(is_best, index, n), axis=-1)  # [...]
        values.append(best)
        indices.append(best_index)
        prev_value, prev_index = best, best_index
    return jnp.stack(values, axis=-1), jnp.stack(indices, axis=-1)


def _top_k_sorted(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    # A stable sort keeps equal keys in index order; canonicalise -0.0 so it ties 0.0.
    key = jnp.where(x == 0, jnp.zeros_like(x), -x)
    order = jnp.argsort(key, axis=-1, stable=True)[..., :k].astype(jnp.int32)
    return jnp.take_along_axis(x, order, axis=-1), order
