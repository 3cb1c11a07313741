"""The routed experts' SwiGLU on tiles of rows, one expert per tile: the accelerator path.

Internal; :func:`sigmoid_moe.expert_kernels.grouped_swiglu` calls :func:`tiled_swiglu`.
Token copies sit in tiles of ``B`` rows (16 to 128, a power of two), each tile holding
rows of one expert (a :class:`sigmoid_moe.blocked_ffn.BlockLayout` with ``block_size=B``:
every expert's rows start on a tile boundary, its last tile is zero-padded). On such
tiles a grouped matmul is one dense tile product per tile, so no kernel here can turn
into a dense ``[E, M, K]`` product.

One ``custom_vjp`` serves every implementation, so its residuals have one layout whatever
the platform: the tokens ``x_td``, both expert weights, the layout's integers and the
pre-activations ``h [R, 2F]`` (the gathered rows are not kept; the backward gathers them
again). Its forward and backward choose the grouped matmuls when the program is lowered
(``jax.lax.platform_dependent``):

===============  ====================================  ===================================
kernel           compiled for                          elsewhere
===============  ====================================  ===================================
``triton``       cuda: Pallas kernels lowered with      the same kernels in the Pallas
                 Triton (:mod:`sigmoid_moe.            interpreter
                 _pallas_triton`)
``megablox``     tpu: Pallas Megablox ``gmm`` /         the same kernels in the Pallas
                 ``tgmm`` (Mosaic)                      interpreter
``accelerator``  tpu: ``megablox``; any other           (never lowered for the CPU: the
                 (cuda, rocm): ``triton``               caller picks the CPU kernel there)
===============  ====================================  ===================================

The gradient of the tokens gathers each token's ``k`` row gradients and sums them in a
fixed order (no scatter-add, whose float atomics would make it vary from run to run on a
GPU); the expert weights' gradients sum each expert's tiles in one float32 accumulator.
"""

from __future__ import annotations

import functools
import importlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax._src import config as jax_config

from sigmoid_moe import _pallas_triton
from sigmoid_moe._dispatch_common import gather_rows, vary, varying
from sigmoid_moe.experts import swiglu

# The package's __init__ binds the name ``gmm`` to the differentiable op, hiding the
# module that holds the forward kernels ``gmm`` and ``tgmm``.
_megablox_ops = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")

__all__ = ["KERNELS", "TileLayout", "tile_rows", "tiled_swiglu"]

KERNELS = ("triton", "megablox", "accelerator")
_MAX_TILE_ROWS = 128


def tile_rows(rows_per_expert: int) -> int:
    """Rows per tile: the smallest power of two covering an expert's average rows, within
    ``[16, 128]`` (16: the least a Triton ``dot`` takes; 128: MegaBlocks' tile)."""
    rows = _pallas_triton.MIN_TILE
    while rows < min(rows_per_expert, _MAX_TILE_ROWS):
        rows *= 2
    return rows


class TileLayout(NamedTuple):
    """Token copies in tiles of rows, one expert per tile (from a ``BlockLayout``)."""

    src_r: jax.Array  # [R] int32 token of each row; T (a zero row) where empty
    row_tk: jax.Array  # [T, k] int32 row of each token's copy j; R where not placed
    tile_expert_b: jax.Array  # [R / B] int32 expert of each tile; -1 past the used ones
    tile_start_e: jax.Array  # [E + 1] int32 first tile of each expert; [E]: tiles used


# --------------------------------------------------------------------------- backends


class _Backend(NamedTuple):
    """``gmm(lhs [R, K], rhs [E, K, N] (or [E, N, K]), tiles, transpose_rhs) -> [R, N]`` and
    ``tgmm(lhs [R, K], rhs [R, N], tiles) -> [E, K, N]`` on a :class:`TileLayout`."""

    gmm: object
    tgmm: object


def _num_tile_rows(lhs: jax.Array, tiles: TileLayout) -> int:
    return lhs.shape[0] // tiles.tile_expert_b.shape[0]


def _outside_vma_checks(kernel):
    """``kernel`` traced without ``shard_map``'s varying-axes checks, its result marked as
    varying over its operands' axes.

    Megablox declares its outputs without the mesh axes they vary over, which
    ``shard_map(check_vma=True)`` refuses; the kernels hold no collective, so the
    outputs vary exactly as the operands do.
    """

    def run(*args, **kwargs):
        arrays = [a for a in jax.tree.leaves(args) if isinstance(a, jax.Array)]
        axes = frozenset().union(*(varying(a) for a in arrays))
        with jax_config._check_vma(False):
            out = kernel(*args, **kwargs)
        return vary(out, axes)

    return run


def _triton(interpret: bool) -> _Backend:
    def gmm(lhs, rhs, tiles, transpose_rhs):
        return _pallas_triton.tile_matmul(
            lhs, rhs, tiles.tile_expert_b, transpose_rhs=transpose_rhs, interpret=interpret
        )

    def tgmm(lhs, rhs, tiles):
        return _pallas_triton.expert_matmul(
            lhs,
            rhs,
            tiles.tile_start_e,
            tile_rows=_num_tile_rows(lhs, tiles),
            num_experts=tiles.tile_start_e.shape[0] - 1,
            interpret=interpret,
        )

    return _Backend(gmm, tgmm)


def _group_rows(lhs: jax.Array, tiles: TileLayout) -> jax.Array:
    """``[E]`` int32 rows of each expert's tiles (padding rows included)."""
    return jnp.diff(tiles.tile_start_e).astype(jnp.int32) * _num_tile_rows(lhs, tiles)


def _megablox_tile(width: int) -> int:
    """A Megablox ``k`` / ``n`` tile that divides ``width``: 512, 256 or 128 lanes, or the
    whole width (a TPU block may always span a whole dimension)."""
    return next((t for t in (512, 256, 128) if width % t == 0), width)


def _megablox(interpret: bool) -> _Backend:
    megablox_gmm = _outside_vma_checks(_megablox_ops.gmm)
    megablox_tgmm = _outside_vma_checks(_megablox_ops.tgmm)

    # Megablox computes in bfloat16 or float32; other dtypes go through float32.
    def operand(x):
        return x if x.dtype in (jnp.bfloat16, jnp.float32) else x.astype(jnp.float32)

    def gmm(lhs, rhs, tiles, transpose_rhs):
        width_n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
        tiling = (_num_tile_rows(lhs, tiles), _megablox_tile(lhs.shape[1]), _megablox_tile(width_n))
        out = megablox_gmm(
            operand(lhs),
            operand(rhs),
            _group_rows(lhs, tiles),
            operand(lhs).dtype,
            tiling,
            transpose_rhs=transpose_rhs,
            interpret=interpret,
        )
        # Rows past the used tiles belong to no group: Megablox leaves them unwritten.
        used = tiles.tile_start_e[-1] * tiling[0]
        row_r = jnp.arange(lhs.shape[0], dtype=jnp.int32)[:, None]
        return jnp.where(row_r < used, out, 0).astype(lhs.dtype)

    def tgmm(lhs, rhs, tiles):
        tiling = (
            _num_tile_rows(lhs, tiles),
            _megablox_tile(lhs.shape[1]),
            _megablox_tile(rhs.shape[1]),
        )
        out = megablox_tgmm(
            operand(lhs).T,
            operand(rhs),
            _group_rows(lhs, tiles),
            operand(lhs).dtype,
            tiling,
            num_actual_groups=tiles.tile_start_e.shape[0] - 1,
            interpret=interpret,
        )
        return out.astype(lhs.dtype)

    return _Backend(gmm, tgmm)


# Per kernel: the implementation for each platform the program may be lowered for.
_PLATFORMS = {
    "triton": {"cuda": _triton(interpret=False), "default": _triton(interpret=True)},
    "megablox": {"tpu": _megablox(interpret=False), "default": _megablox(interpret=True)},
    "accelerator": {"tpu": _megablox(interpret=False), "default": _triton(interpret=False)},
}


# The grouped matmuls are bilinear, so each one's VJP is the other two: with these rules a
# gradient of tiled_swiglu can itself be differentiated (Hessian-vector products), and
# no rule ever asks Pallas to differentiate a kernel (it cannot: its JVP of a kernel that
# reads its program ids fails).


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def _gmm(kernel: str, lhs, rhs, tiles, transpose_rhs: bool):
    """``[R, N]``: tile ``b`` of ``lhs`` times ``rhs[e_b]`` (``rhs[e_b]^T`` with
    ``transpose_rhs``); zeros past the used tiles."""
    branches = {
        platform: functools.partial(backend.gmm, transpose_rhs=transpose_rhs)
        for platform, backend in _PLATFORMS[kernel].items()
    }
    return jax.lax.platform_dependent(lhs, rhs, tiles, **branches)


def _gmm_fwd(kernel, lhs, rhs, tiles, transpose_rhs):
    return _gmm(kernel, lhs, rhs, tiles, transpose_rhs), (lhs, rhs, tiles)


def _gmm_bwd(kernel, transpose_rhs, residuals, dout):
    lhs, rhs, tiles = residuals
    dlhs = _gmm(kernel, dout, rhs, tiles, transpose_rhs=not transpose_rhs)
    drhs = _tgmm(kernel, dout, lhs, tiles) if transpose_rhs else _tgmm(kernel, lhs, dout, tiles)
    return dlhs, drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tgmm(kernel: str, lhs, rhs, tiles):
    """``[E, K, N]``: for each expert, its tiles of ``lhs [R, K]`` transposed times theirs
    of ``rhs [R, N]``, summed."""
    branches = {platform: backend.tgmm for platform, backend in _PLATFORMS[kernel].items()}
    return jax.lax.platform_dependent(lhs, rhs, tiles, **branches)


def _tgmm_fwd(kernel, lhs, rhs, tiles):
    return _tgmm(kernel, lhs, rhs, tiles), (lhs, rhs, tiles)


def _tgmm_bwd(kernel, residuals, dout):
    lhs, rhs, tiles = residuals
    dlhs = _gmm(kernel, rhs, dout, tiles, transpose_rhs=True)
    return dlhs, _gmm(kernel, lhs, dout, tiles, transpose_rhs=False), None


_tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)


# --------------------------------------------------------------------------- the SwiGLU


def _forward(kernel, x_td, w_in_edf, w_out_efd, tiles):
    rows_rd = gather_rows(x_td, tiles.src_r)
    h_rf2 = _gmm(kernel, rows_rd, w_in_edf, tiles, transpose_rhs=False)
    return _gmm(kernel, swiglu(h_rf2), w_out_efd, tiles, transpose_rhs=False), h_rf2


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def tiled_swiglu(kernel: str, x_td, w_in_edf, w_out_efd, tiles: TileLayout) -> jax.Array:
    """``o_rd [R, d]``: row ``r`` through its tile's expert, ``SwiGLU_e(x[src_r])``.

    Empty rows (token ``T``) give zeros. Differentiable in ``x_td`` and both weights, in
    reverse mode (a ``custom_vjp``), also nested (its backward is made of differentiable
    grouped matmuls). ``kernel`` is one of :data:`KERNELS`; all operands
    share one dtype.
    """
    return _forward(kernel, x_td, w_in_edf, w_out_efd, tiles)[0]


def _tiled_swiglu_fwd(kernel, x_td, w_in_edf, w_out_efd, tiles):
    o_rd, h_rf2 = _forward(kernel, x_td, w_in_edf, w_out_efd, tiles)
    return o_rd, (x_td, w_in_edf, w_out_efd, tiles, h_rf2)


def _tiled_swiglu_bwd(kernel, residuals, do_rd):
    x_td, w_in_edf, w_out_efd, tiles, h_rf2 = residuals
    a_rf, swiglu_pullback = jax.vjp(swiglu, h_rf2)
    dw_out_efd = _tgmm(kernel, a_rf, do_rd, tiles)
    da_rf = _gmm(kernel, do_rd, w_out_efd, tiles, transpose_rhs=True)
    (dh_rf2,) = swiglu_pullback(da_rf)
    dw_in_edf = _tgmm(kernel, gather_rows(x_td, tiles.src_r), dh_rf2, tiles)
    drows_rd = _gmm(kernel, dh_rf2, w_in_edf, tiles, transpose_rhs=True)
    # Each token's copies summed in the order j = 0 .. k-1, in float32.
    num_tokens, k = tiles.row_tk.shape
    drows_tkd = gather_rows(drows_rd, tiles.row_tk.reshape(-1)).reshape(num_tokens, k, -1)
    dx_td = jnp.sum(drows_tkd.astype(jnp.float32), axis=1).astype(x_td.dtype)
    return dx_td, dw_in_edf.astype(w_in_edf.dtype), dw_out_efd.astype(w_out_efd.dtype), None


tiled_swiglu.defvjp(_tiled_swiglu_fwd, _tiled_swiglu_bwd)
