"""Grouped matmuls over tiles of rows for NVIDIA GPUs: Pallas kernels lowered with Triton.

Internal; :mod:`sigmoid_moe._grouped_matmul` differentiates them. Rows come in tiles of
``tile_rows`` rows (a :class:`sigmoid_moe.blocked_ffn.BlockLayout`'s blocks), and every
tile belongs to one expert, so each program looks up one expert id and runs one dense
tile product. No dense ``[E, M, K]`` operand exists at any point: the work is the rows of
the tiles, never ``E`` times it, whatever XLA's GPU compiler does with ``ragged_dot``.

Two kernels:

- :func:`tile_matmul`: ``out[tile b] = lhs[tile b] @ rhs[e_b]`` (or ``@ rhs[e_b]^T``),
  the forward and the gradient of the rows; a tile of expert ``-1`` (past the used ones)
  is written as zeros without reading anything;
- :func:`expert_matmul`: ``out[e] = sum over e's tiles b of lhs[tile b]^T @ rhs[tile b]``,
  the gradient of the expert weights, each expert's tiles summed in tile order in one
  float32 accumulator (deterministic).

The kernels take no ``BlockSpec``: each program reads its tiles with dynamic slices
(``ref[pl.ds(...)]``), which the Triton lowering of Pallas supports, and so does the Pallas
interpreter (``interpret=True``), which runs them on any backend: that is how they are
tested on CPU. Operand widths are padded here to whole ``k``/``n`` tiles (zero columns,
sliced off again), so every load is in bounds and needs no mask. Products accumulate in
float32; with float32 operands Triton's ``dot`` uses TF32 on GPUs that have it, as XLA's
default matmul precision does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

__all__ = ["MIN_TILE", "expert_matmul", "tile_matmul"]

# tl.dot needs every dimension of a product to be at least 16 (and tiles are powers of 2).
MIN_TILE = 16
_MAX_K_TILE = 64
_MAX_N_TILE = 128


def _tile(width: int, cap: int) -> int:
    """The largest power of two ``<= cap`` that divides ``width`` (a multiple of 16)."""
    tile = cap
    while width % tile:
        tile //= 2
    return tile


def _padded(width: int) -> int:
    return -(-max(width, 1) // MIN_TILE) * MIN_TILE


def _pad_to(array: jax.Array, axis: int, width: int) -> jax.Array:
    extra = width - array.shape[axis]
    if extra == 0:
        return array
    pads = [(0, 0)] * array.ndim
    pads[axis] = (0, extra)
    return jnp.pad(array, pads)


def _out_shape(shape, like: jax.Array) -> jax.ShapeDtypeStruct:
    """An output of ``like``'s dtype that varies over the mesh axes ``like`` varies over
    (inside ``shard_map``; the caller gives every operand the same axes)."""
    return jax.ShapeDtypeStruct(
        shape, like.dtype, manual_axis_type=jax.typeof(like).manual_axis_type
    )


def _compiler_params(tile_rows: int):
    return pl_triton.CompilerParams(num_warps=8 if tile_rows >= 128 else 4, num_stages=3)


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "interpret"))
def tile_matmul(
    lhs_rk: jax.Array,
    rhs_ekn: jax.Array,
    tile_expert_b: jax.Array,
    *,
    transpose_rhs: bool = False,
    interpret: bool = False,
) -> jax.Array:
    """``[R, N]``: tile ``b`` of ``lhs_rk [R, K]`` times its expert's ``rhs``.

    Args:
      lhs_rk: ``[R, K]`` rows, ``R = num_tiles * tile_rows``.
      rhs_ekn: ``[E, K, N]``, or ``[E, N, K]`` with ``transpose_rhs`` (then the product is
        with ``rhs[e]^T``).
      tile_expert_b: ``[num_tiles]`` int32 expert of each tile, ``-1``: a zero tile.
      transpose_rhs: see ``rhs_ekn``.
      interpret: run the Pallas interpreter (any backend) instead of Triton (GPU).

    Returns:
      ``[R, N]`` in ``lhs_rk``'s dtype, accumulated in float32.
    """
    num_tiles = tile_expert_b.shape[0]
    num_rows, width_k = lhs_rk.shape
    tile_rows = num_rows // num_tiles
    width_n = rhs_ekn.shape[1] if transpose_rhs else rhs_ekn.shape[2]
    pad_k, pad_n = _padded(width_k), _padded(width_n)
    lhs_rk = _pad_to(lhs_rk, 1, pad_k)
    rhs_ekn = _pad_to(
        _pad_to(rhs_ekn, 1, pad_n if transpose_rhs else pad_k), 2, pad_k if transpose_rhs else pad_n
    )
    tile_k, tile_n = _tile(pad_k, _MAX_K_TILE), _tile(pad_n, _MAX_N_TILE)

    def kernel(expert_ref, lhs_ref, rhs_ref, out_ref):
        tile, col = pl.program_id(0), pl.program_id(1)
        expert = expert_ref[tile]
        rows = pl.ds(pl.multiple_of(tile * tile_rows, tile_rows), tile_rows)
        cols = pl.ds(pl.multiple_of(col * tile_n, tile_n), tile_n)

        @pl.when(expert >= 0)
        def _():
            def step(i, acc):
                ks = pl.ds(pl.multiple_of(i * tile_k, tile_k), tile_k)
                if transpose_rhs:
                    rhs = rhs_ref[expert, cols, ks].T
                else:
                    rhs = rhs_ref[expert, ks, cols]
                return acc + jnp.dot(lhs_ref[rows, ks], rhs, preferred_element_type=jnp.float32)

            zeros = jnp.zeros((tile_rows, tile_n), jnp.float32)
            acc = jax.lax.fori_loop(0, pad_k // tile_k, step, zeros)
            out_ref[rows, cols] = acc.astype(out_ref.dtype)

        @pl.when(expert < 0)
        def _():
            out_ref[rows, cols] = jnp.zeros((tile_rows, tile_n), out_ref.dtype)

    out = pl.pallas_call(
        kernel,
        out_shape=_out_shape((num_rows, pad_n), lhs_rk),
        grid=(num_tiles, pad_n // tile_n),
        interpret=interpret,
        compiler_params=_compiler_params(tile_rows),
        name="sigmoid_moe_tile_matmul",
    )(tile_expert_b, lhs_rk, rhs_ekn)
    return out[:, :width_n]


@functools.partial(jax.jit, static_argnames=("tile_rows", "num_experts", "interpret"))
def expert_matmul(
    lhs_rk: jax.Array,
    rhs_rn: jax.Array,
    tile_start_e: jax.Array,
    *,
    tile_rows: int,
    num_experts: int,
    interpret: bool = False,
) -> jax.Array:
    """``[E, K, N]``: expert ``e``'s tiles of ``lhs_rk [R, K]``, transposed, times theirs
    of ``rhs_rn [R, N]``, summed.

    Args:
      tile_start_e: ``[E + 1]`` int32; expert ``e`` owns tiles ``tile_start_e[e]`` to
        ``tile_start_e[e + 1] - 1`` (an expert without tiles gets zeros).
      tile_rows: rows per tile (``R`` is a multiple of it).
      num_experts: ``E``.

    Returns:
      ``[E, K, N]`` in ``lhs_rk``'s dtype, each expert summed in float32 in tile order.
    """
    width_k, width_n = lhs_rk.shape[1], rhs_rn.shape[1]
    pad_k, pad_n = _padded(width_k), _padded(width_n)
    lhs_rk, rhs_rn = _pad_to(lhs_rk, 1, pad_k), _pad_to(rhs_rn, 1, pad_n)
    tile_k, tile_n = _tile(pad_k, _MAX_K_TILE), _tile(pad_n, _MAX_N_TILE)

    def kernel(start_ref, lhs_ref, rhs_ref, out_ref):
        expert, row_k, col = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        ks = pl.ds(pl.multiple_of(row_k * tile_k, tile_k), tile_k)
        cols = pl.ds(pl.multiple_of(col * tile_n, tile_n), tile_n)

        def step(tile, acc):
            rows = pl.ds(pl.multiple_of(tile * tile_rows, tile_rows), tile_rows)
            lhs = lhs_ref[rows, ks].T
            return acc + jnp.dot(lhs, rhs_ref[rows, cols], preferred_element_type=jnp.float32)

        zeros = jnp.zeros((tile_k, tile_n), jnp.float32)
        acc = jax.lax.fori_loop(start_ref[expert], start_ref[expert + 1], step, zeros)
        out_ref[expert, ks, cols] = acc.astype(out_ref.dtype)

    out = pl.pallas_call(
        kernel,
        out_shape=_out_shape((num_experts, pad_k, pad_n), lhs_rk),
        grid=(num_experts, pad_k // tile_k, pad_n // tile_n),
        interpret=interpret,
        compiler_params=_compiler_params(tile_rows),
        name="sigmoid_moe_expert_matmul",
    )(tile_start_e, lhs_rk, rhs_rn)
    return out[:, :width_k, :width_n]
