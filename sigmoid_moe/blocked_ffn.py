"""Block-sparse routed experts for CPU: gather, SwiGLU expert, weighted combine, per block.

Pure array functions; no Flax. Token copies are laid out in row *blocks* of
``block_size`` rows; every row of a block goes to the same expert, each expert's rows
start on a block boundary, and the last block of an expert is padded with empty rows.
One ``lax.scan`` over the blocks then does, for block ``b`` with expert ``e_b``::

    x_md = x_td[src_m]                          # gather the block's token rows
    o_md = swiglu(x_md @ w_in[e_b]) @ w_out[e_b]
    y_td[src_m] += weight_m * o_md              # weighted combine, float32 accumulator

and a hand-written backward scan does the matching gather / GEMMs / scatter-add per
block, accumulating the expert weight gradients in float32.

A partly filled block (an expert's last) runs only its filled rows, rounded up to one of
16 *size classes* (multiples of ``ceil(B / 16)``; blocks below 128 rows run whole) by a
``lax.switch``, so the GEMMs do not pay for the empty rows; its saved pre-activations
are packed (:func:`sigmoid_moe._native_ffn.packed_rows`), so neither does ``h``.

Why one fused loop instead of whole-array gathers and grouped matmuls: on a CPU the cost
beyond the GEMMs is memory, and mostly *fresh* memory. Per block, the ``[B, 2*d_ff]``
hidden activations, the gathered rows and the expert outputs stay in cache; the only big
arrays are the saved pre-activations ``h`` (needed by the backward) and the outputs.

On the CPU, float32 work goes to a native kernel instead of this scan
(``sigmoid_moe/_native_ffn.py``, csrc/expert_ffn_cpu.cc) where its GEMM library runs
kernels as wide as the CPU's vectors (``_native_ffn.serves``): same layout, same math,
the same saved ``h``, one expert per task on XLA's thread pool, weights read in place.
Both are the two branches of one ``custom_vjp`` (one set of residuals, whichever runs).
Other dtypes and backends run the scan. Measurements behind these choices are in
``benchmarks/layer.py`` and the README.

References:
  MegaBlocks (arXiv 2211.15841): block-sparse dropless MoE; ScatterMoE (arXiv 2403.08245):
  fusing the gather/scatter into the grouped GEMMs instead of materialising copies.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sigmoid_moe import _native, _native_ffn
from sigmoid_moe._dispatch_common import gather_rows, vary, varying
from sigmoid_moe.experts import swiglu

__all__ = [
    "BlockLayout",
    "auto_block_size",
    "block_layout",
    "blocked_expert_ffn",
    "capped_block_size",
    "num_blocks_bound",
]


class BlockLayout(NamedTuple):
    """Token copies in expert-contiguous row blocks (see the module docstring)."""

    src_bm: jax.Array  # [num_blocks, B] int32 token per row; T (a zero row) where empty
    weight_bm: jax.Array  # [num_blocks, B] combine weight per row; 0 where empty
    block_expert_b: jax.Array  # [num_blocks] int32 expert of each block; -1 if unused
    row_a: jax.Array  # [A] int32 row (b * B + m) of each assignment; num_blocks * B if unplaced


def auto_block_size(rows_per_expert: int) -> int:
    """Rows per block when the caller leaves it to the kernel: ``1.5 x`` an expert's rows.

    ``rows_per_expert`` is the average ``ceil(A / E)``. The result is rounded up to a
    multiple of 16 and kept in ``[16, 512]``. Since a partly filled block runs only its
    filled rows (in steps of ``B / 16``), a block may exceed the average share: most
    experts then fit one block, so fewer, taller GEMMs (measurements in
    ``benchmarks/layer.py``).
    """
    target = -(-3 * max(1, rows_per_expert) // 2)
    return int(min(512, max(16, -(-target // 16) * 16)))


def capped_block_size(block_size: int | None, rows_per_expert: int) -> int:
    """The block size for experts of ``rows_per_expert`` average rows (dropless layouts).

    ``None``: :func:`auto_block_size`. An explicit size is capped at the average share, so
    that a few tokens per expert do not pay for a mostly empty block each.
    """
    rows_per_expert = max(1, rows_per_expert)
    if block_size is None:
        return auto_block_size(rows_per_expert)
    return min(block_size, rows_per_expert)


def num_blocks_bound(num_rows: int, num_experts: int, block_size: int) -> int:
    """Blocks that always suffice for ``num_rows`` placed rows over ``num_experts`` experts.

    Each expert wastes at most ``block_size - 1`` rows in its last block, so
    ``sum_e ceil(n_e / B) <= (num_rows + E * (B - 1)) // B``.
    """
    return max(1, (num_rows + num_experts * (block_size - 1)) // block_size)


def block_layout(
    expert_a: jax.Array,
    rank_a: jax.Array,
    placed_a: jax.Array,
    token_a: jax.Array,
    weight_a: jax.Array,
    rows_e: jax.Array,
    *,
    num_tokens: int,
    block_size: int,
    max_rows_per_expert: int | None = None,
) -> BlockLayout:
    """Places assignment ``a`` at row ``block_start[e_a] * B + rank_a`` of its expert's blocks.

    The number of blocks is static and always enough: :func:`num_blocks_bound` of the
    assignments, and at most ``E * ceil(max_rows_per_expert / B)``.

    Args:
      expert_a: ``[A]`` int32 expert of each assignment.
      rank_a: ``[A]`` int32 rank of the assignment among its expert's placed ones
        (``0 .. rows_e[e] - 1``).
      placed_a: ``[A]`` bool; unplaced (masked, dropped) assignments get no row.
      token_a: ``[A]`` int32 token of each assignment.
      weight_a: ``[A]`` combine weight of each assignment.
      rows_e: ``[E]`` int32 placed assignments per expert.
      num_tokens: ``T``; empty rows read token ``T``, a zero row.
      block_size: rows per block; capped at ``max_rows_per_expert``, so a block never
        holds more rows than an expert can have.
      max_rows_per_expert: static bound on ``rows_e`` (a capacity), if there is one.
    """
    num_assign, num_experts = expert_a.shape[0], rows_e.shape[0]
    max_rows = num_assign
    if max_rows_per_expert is not None:
        block_size = max(1, min(block_size, max_rows_per_expert))
        max_rows = min(num_assign, num_experts * max_rows_per_expert)
    num_blocks = num_blocks_bound(max_rows, num_experts, block_size)
    if max_rows_per_expert is not None:
        num_blocks = min(num_blocks, num_experts * -(-max_rows_per_expert // block_size))
    num_rows = num_blocks * block_size
    blocks_e = (rows_e + block_size - 1) // block_size
    block_end_e = jnp.cumsum(blocks_e)
    block_start_e = block_end_e - blocks_e
    row_a = jnp.where(placed_a, block_start_e[expert_a] * block_size + rank_a, num_rows)
    # Inverse map row -> assignment (A where the row is empty), then per-row gathers.
    assign_p = (
        jnp.full((num_rows,), num_assign, jnp.int32)
        .at[row_a]
        .set(jnp.arange(num_assign, dtype=jnp.int32), mode="drop")
    )
    src_p = jnp.take(token_a.astype(jnp.int32), assign_p, mode="fill", fill_value=num_tokens)
    weight_p = jnp.take(weight_a, assign_p, mode="fill", fill_value=0)
    block_expert_b = jnp.searchsorted(
        block_end_e, jnp.arange(num_blocks, dtype=jnp.int32), side="right"
    ).astype(jnp.int32)
    return BlockLayout(
        src_bm=src_p.reshape(num_blocks, block_size),
        weight_bm=weight_p.reshape(num_blocks, block_size),
        block_expert_b=jnp.where(block_expert_b < num_experts, block_expert_b, -1),
        row_a=row_a.astype(jnp.int32),
    )


# A block runs with the fewest rows, out of this many evenly spaced sizes up to the block
# size, that cover its filled rows: only an expert's last block is partly filled, and it
# then wastes less than B / _SIZE_CLASSES rows of GEMM work instead of up to B - 1. Every
# class is one more branch of the forward and the backward scan to compile, so blocks
# below _MIN_CLASSED_BLOCK rows run whole: their GEMMs cost little next to the per-block
# work (compile times and the class step's measurements: benchmarks/layer.py).
_SIZE_CLASSES = 16
_MIN_CLASSED_BLOCK = 128


def _size_classes(block_size: int) -> tuple[int, ...]:
    """Row counts a block may run with: multiples of ``ceil(B / _SIZE_CLASSES)``, then B;
    just ``(B,)`` below ``_MIN_CLASSED_BLOCK`` rows."""
    if block_size < _MIN_CLASSED_BLOCK:
        return (block_size,)
    granule = -(-block_size // _SIZE_CLASSES)
    return tuple(min(c * granule, block_size) for c in range(1, -(-block_size // granule) + 1))


class _BlockPlan(NamedTuple):
    """How the scan runs each block of a layout."""

    class_b: jax.Array  # [num_blocks] int32 0: skip; c: run the first sizes[c - 1] rows
    used_b: jax.Array  # [num_blocks] int32 the block's rows in h (_native_ffn.packed_rows)
    offset_b: jax.Array  # [num_blocks] int32 the first of them


def _block_plan(src_bm, block_expert_b, num_tokens: int, num_experts: int) -> _BlockPlan:
    """Each block's size class (from its last filled row) and its rows in the saved ``h``."""
    block_size = src_bm.shape[1]
    granule = _size_classes(block_size)[0]
    row_m = jnp.arange(1, block_size + 1, dtype=jnp.int32)
    fill_b = jnp.max(jnp.where(src_bm < num_tokens, row_m, 0), axis=1)
    class_b = jnp.where(block_expert_b >= 0, (fill_b + granule - 1) // granule, 0)
    used_b = _native_ffn.packed_rows(src_bm, block_expert_b, num_tokens, num_experts)
    offset_b = jnp.cumsum(used_b) - used_b
    return _BlockPlan(class_b.astype(jnp.int32), used_b, offset_b.astype(jnp.int32))


def _saved_rows(num_assignments: int, block_size: int) -> int:
    """Rows of the saved pre-activations ``h``: one per assignment (what the used rows of
    a ``block_layout`` take at most), and one block more, so that the scan can write a
    whole block at the last offset."""
    return max(1, num_assignments) + block_size


def _pad_rows(rows_sx: jax.Array, block_size: int) -> jax.Array:
    """``rows_sx`` with zero rows appended up to ``block_size`` rows."""
    return jnp.pad(rows_sx, ((0, block_size - rows_sx.shape[0]),) + ((0, 0),) * (rows_sx.ndim - 1))


def _scan_forward(h_rows, x_td, src_r, weight_r, block_expert_b, w_in_edf, w_out_efd):
    """``(y_td float32, h_pf2)`` by the block scan: the combined output and the blocks'
    pre-activations, laid out as the kernel lays them out."""
    f32 = jnp.float32
    dtype = x_td.dtype
    axes = varying(x_td)  # blocked_expert_ffn made every input vary over the same axes
    num_blocks = block_expert_b.shape[0]
    block_size = src_r.shape[0] // num_blocks
    src_bm = src_r.reshape(num_blocks, block_size)
    weight_bm = weight_r.reshape(num_blocks, block_size)
    with jax.named_scope("layout"):
        plan = _block_plan(src_bm, block_expert_b, x_td.shape[0], w_in_edf.shape[0])

    def rows(size):
        # The block's first `size` rows; the results padded back to whole blocks so that
        # every branch returns the same shapes.
        def run(src_m, weight_m, expert):
            with jax.named_scope("gather"):
                x_sd = gather_rows(x_td, src_m[:size])
            with jax.named_scope("expert_gemms"):
                h_sf2 = jnp.dot(x_sd, w_in_edf[expert], preferred_element_type=f32)
                h_sf2 = h_sf2.astype(dtype)
            with jax.named_scope("swiglu"):
                a_sf = swiglu(h_sf2)
            with jax.named_scope("expert_gemms"):
                o_sd = jnp.dot(a_sf, w_out_efd[expert], preferred_element_type=f32)
            with jax.named_scope("scatter_add"):
                o_md = _pad_rows(o_sd * weight_m[:size, None].astype(f32), block_size)
            with jax.named_scope("save_h"):
                return o_md, _pad_rows(h_sf2, block_size)

        return run

    branches = [rows(size) for size in _size_classes(block_size)]

    def body(carry, block):
        src_m, weight_m, expert, class_, offset = block

        # The buffers are updated outside the switch: XLA copies a buffer that more than
        # one branch updates in place.
        def run(carry):
            y_td, h_pf2 = carry
            o_md, h_mf2 = jax.lax.switch(class_ - 1, branches, src_m, weight_m, expert)
            with jax.named_scope("scatter_add"):
                # Empty rows have src T: mode="drop" skips them (their output is 0 anyway).
                y_td = y_td.at[src_m].add(o_md, mode="drop")
            with jax.named_scope("save_h"):
                # Rows past the block's used ones are overwritten by the next block's
                # (blocks run in layout order), or stay zeros.
                h_pf2 = jax.lax.dynamic_update_slice_in_dim(h_pf2, h_mf2, offset, axis=0)
            return y_td, h_pf2

        # Blocks past the last used one (expert -1) cost nothing.
        return jax.lax.cond(class_ > 0, run, lambda carry: carry, carry), None

    init = (
        vary(jnp.zeros(x_td.shape, f32), axes),
        vary(jnp.zeros((h_rows, w_in_edf.shape[2]), dtype), axes),
    )
    xs = (src_bm, weight_bm, block_expert_b, plan.class_b, plan.offset_b)
    with jax.named_scope("blocked_ffn"):
        return jax.lax.scan(body, init, xs)[0]


def _scan_backward(x_td, dy_td, src_r, weight_r, block_expert_b, w_in_edf, w_out_efd, h_pf2):
    """``(dx_td, dweight_r, dw_in_edf, dw_out_efd)`` by the block scan, in the dtypes of
    ``x_td``, ``weight_r``, ``w_in_edf`` and ``w_out_efd``."""
    f32 = jnp.float32
    dtype = x_td.dtype
    axes = varying(x_td) | varying(dy_td)
    num_blocks = block_expert_b.shape[0]
    block_size = src_r.shape[0] // num_blocks
    src_bm = src_r.reshape(num_blocks, block_size)
    weight_bm = weight_r.reshape(num_blocks, block_size)
    with jax.named_scope("layout"):
        plan = _block_plan(src_bm, block_expert_b, x_td.shape[0], w_in_edf.shape[0])

    def rows(size):
        def run(src_m, weight_m, expert, offset, used):
            src_s = src_m[:size]
            with jax.named_scope("gather"):
                x_sd = gather_rows(x_td, src_s)
                dy_sd = gather_rows(dy_td, src_s)
            with jax.named_scope("save_h"):
                h_sf2 = jax.lax.dynamic_slice_in_dim(h_pf2, offset, size, axis=0)
                # Rows past the block's own in h are the next block's: zeros here (the
                # block's rows there are empty, and must add nothing, NaN included).
                h_sf2 = jnp.where(jnp.arange(size)[:, None] < used, h_sf2, 0)
            with jax.named_scope("swiglu"):
                # Recomputed in cache from the saved h; the pullback reuses its sigmoid.
                a_sf, swiglu_pullback = jax.vjp(swiglu, h_sf2)
                weight_s1 = weight_m[:size, None].astype(f32)
                # y = sum_rows weight * a @ w_out, so with da_u = dy @ w_out^T (unweighted):
                # d weight = <a, da_u>, d a = weight * da_u, d w_out = (weight * a)^T dy.
                aw_sf = (a_sf.astype(f32) * weight_s1).astype(dtype)
            with jax.named_scope("expert_gemms"):
                dw_out_fd = jnp.dot(aw_sf.T, dy_sd, preferred_element_type=f32)
                da_sf = jnp.dot(dy_sd, w_out_efd[expert].T, preferred_element_type=f32)
            with jax.named_scope("swiglu"):
                dweight_s = jnp.sum(a_sf.astype(f32) * da_sf, axis=-1)
                (dh_sf2,) = swiglu_pullback((da_sf * weight_s1).astype(dtype))
            with jax.named_scope("expert_gemms"):
                dw_in_df2 = jnp.dot(x_sd.T, dh_sf2, preferred_element_type=f32)
                dx_sd = jnp.dot(dh_sf2, w_in_edf[expert].T, preferred_element_type=f32)
            with jax.named_scope("scatter_add"):
                pad = functools.partial(_pad_rows, block_size=block_size)
                return pad(dx_sd), dw_in_df2, dw_out_fd, pad(dweight_s)

        return run

    branches = [rows(size) for size in _size_classes(block_size)]

    def body(grads, block):
        src_m, weight_m, expert, class_, offset, used = block

        def run(grads):
            dx_td, dw_in_edf, dw_out_efd = grads
            dx_md, dw_in_df2, dw_out_fd, dweight_m = jax.lax.switch(
                class_ - 1, branches, src_m, weight_m, expert, offset, used
            )
            with jax.named_scope("scatter_add"):
                dx_td = dx_td.at[src_m].add(dx_md, mode="drop")
            with jax.named_scope("dw_accumulate"):
                dw_in_edf = dw_in_edf.at[expert].add(dw_in_df2)
                dw_out_efd = dw_out_efd.at[expert].add(dw_out_fd)
            return (dx_td, dw_in_edf, dw_out_efd), dweight_m

        def skip(grads):
            return grads, vary(jnp.zeros((block_size,), f32), axes)

        return jax.lax.cond(class_ > 0, run, skip, grads)

    init = tuple(vary(jnp.zeros(like.shape, f32), axes) for like in (x_td, w_in_edf, w_out_efd))
    xs = (src_bm, weight_bm, block_expert_b, plan.class_b, plan.offset_b, plan.used_b)
    with jax.named_scope("blocked_ffn_bwd"):
        (dx_td, dw_in_edf, dw_out_efd), dweight_bm = jax.lax.scan(body, init, xs)
    return (
        dx_td.astype(dtype),
        dweight_bm.reshape(-1).astype(weight_r.dtype),
        dw_in_edf.astype(w_in_edf.dtype),
        dw_out_efd.astype(w_out_efd.dtype),
    )


# ----------------------------------------------------------------- one custom_vjp
#
# The kernel and the scan are the two branches of one custom_vjp: its forward rule picks
# one (``_native.native_or_portable``) and both return the same residuals, so a
# ``jax.vjp`` held outside ``jit`` keeps one set of them, not the union of two.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _expert_ffn(native, h_rows, x_td, src_r, weight_r, block_expert_b, w_in_edf, w_out_efd):
    return _expert_ffn_fwd(
        native, h_rows, x_td, src_r, weight_r, block_expert_b, w_in_edf, w_out_efd
    )[0]


def _expert_ffn_fwd(native, h_rows, x_td, src_r, weight_r, block_expert_b, w_in_edf, w_out_efd):
    operands = (x_td, src_r, weight_r, block_expert_b, w_in_edf, w_out_efd)
    with jax.named_scope("blocked_ffn_native" if native else "blocked_ffn_scan"):
        y_td, h_pf2 = _native.native_or_portable(
            functools.partial(_native_ffn.forward, h_rows),
            functools.partial(_scan_forward, h_rows),
            *operands,
            when=lambda: native,
        )
    return y_td.astype(x_td.dtype), (*operands, h_pf2)


def _expert_ffn_bwd(native, h_rows, residuals, dy_td):
    del h_rows
    x_td, src_r, weight_r, block_expert_b, w_in_edf, w_out_efd, h_pf2 = residuals
    with jax.named_scope("blocked_ffn_native" if native else "blocked_ffn_scan"):
        dx_td, dweight_r, dw_in, dw_out = _native.native_or_portable(
            _native_ffn.backward,
            _scan_backward,
            x_td,
            dy_td,
            src_r,
            weight_r,
            block_expert_b,
            w_in_edf,
            w_out_efd,
            h_pf2,
            when=lambda: native,
        )
    return dx_td, None, dweight_r, None, dw_in, dw_out


_expert_ffn.defvjp(_expert_ffn_fwd, _expert_ffn_bwd)


def blocked_expert_ffn(
    x_td: jax.Array, layout: BlockLayout, w_in_edf: jax.Array, w_out_efd: jax.Array
) -> jax.Array:
    """``y_t = sum over rows p of token t: weight_p * SwiGLU_{e_p}(x_t)``, block by block.

    Differentiable in ``x_td``, ``layout.weight_bm`` (so in the routing weights it was
    gathered from), ``w_in_edf`` and ``w_out_efd``, in reverse mode only (``jax.grad``,
    ``jax.vjp``, also nested): it is a ``jax.custom_vjp``, so ``jax.jvp`` / ``jax.jacfwd``
    raise; use the batched or ragged_dot kernels for forward mode. Work is the placed
    rows plus fewer than ``ceil(B / 16)`` empty rows per expert (up to ``B - 1`` for
    blocks below 128 rows). Under ``jax.vmap`` the
    per-block ``lax.cond`` and size ``lax.switch`` become selects that run every block in
    every size class and copy the accumulators (many times slower): flatten mapped token
    groups into ``T`` instead.

    On the CPU, float32 calls run the native kernel where it serves
    (:func:`sigmoid_moe._native_ffn.serves`: its GEMM library as wide as the CPU's
    vectors), the block scan elsewhere; both save the same residuals.

    Args:
      x_td: ``[T, d_model]``.
      layout: from :func:`block_layout` (each expert's filled rows a prefix of its blocks).
      w_in_edf: ``[E, d_model, 2*d_ff]`` fused gate/up weights, ``x_td``'s dtype.
      w_out_efd: ``[E, d_ff, d_model]``, ``x_td``'s dtype.

    Returns:
      ``[T, d_model]`` in ``x_td``'s dtype, accumulated in float32; tokens with no
      placed row get exactly 0.
    """
    # Inside shard_map, give every input the same varying axes (differentiably: the
    # transpose of that cast sums the gradients of replicated inputs over those axes).
    axes = frozenset().union(*(varying(a) for a in (x_td, w_in_edf, w_out_efd, *layout)))
    x_td, w_in_edf, w_out_efd = (vary(a, axes) for a in (x_td, w_in_edf, w_out_efd))
    layout = BlockLayout(*(vary(a, axes) for a in layout))
    block_size = layout.src_bm.shape[1]
    return _expert_ffn(
        _native_ffn.serves(x_td, w_in_edf, w_out_efd),
        _saved_rows(layout.row_a.shape[0], block_size),
        x_td,
        layout.src_bm.reshape(-1),
        layout.weight_bm.reshape(-1),
        layout.block_expert_b,
        w_in_edf,
        w_out_efd,
    )
