"""The routed experts by one function, with every kernel: :func:`grouped_swiglu`.

Pure array functions; no Flax. For token ``t`` with copies ``j < k``,

.. math::  y_t = \\sum_{j \\text{ placed}} w_{tj}\\, \\mathrm{SwiGLU}_{e_{tj}}(x_t)

Dispatch (:mod:`sigmoid_moe.dispatch`) and expert parallelism
(:mod:`sigmoid_moe.expert_parallel`) decide where each token copy goes, as
:class:`ExpertAssignments`, and move rows between devices; :func:`grouped_swiglu` lays the
copies out the way its kernel computes them, runs it, and combines:

================  ==========================================  ===============================
kernel            layout of the copies                        experts computed by
================  ==========================================  ===============================
``"blocked"``     blocks of ``block_size`` rows, one expert    :func:`sigmoid_moe.blocked_ffn.
                  per block                                   blocked_expert_ffn`: gather,
                                                              SwiGLU and combine per block
                                                              (float32 on CPU: native C++)
``"batched"``     ``[E, C]`` slots (needs ``capacity=C``)     two batched matmuls, every slot
``"ragged_dot"``  rows sorted by expert                       two ``jax.lax.ragged_dot``
``"triton"``      tiles of 16-128 rows, one expert per tile   Pallas Triton tile kernels
                                                              (:mod:`sigmoid_moe.
                                                              _pallas_triton`)
``"megablox"``    the same tiles                              Pallas Megablox ``gmm``/``tgmm``
================  ==========================================  ===============================

``"triton"`` and ``"megablox"`` compile for their own platform (cuda, tpu) and run the
Pallas interpreter anywhere else (slow; that is how they are tested on CPU). The
interpreter does not run inside ``shard_map`` (jax 0.10.2: its loop indices do not carry
the operands' varying mesh axes), so expert parallelism on CPU takes ``"auto"`` or
``"blocked"``.

``kernel="auto"`` is resolved when the program is lowered, for the platform it is lowered
for (``jax.lax.platform_dependent``), never from the host's backend while tracing: a
program exported on a CPU host for ``cuda`` or ``tpu`` holds the accelerator kernel only.

===========  ===========================  ================================================
platform     dropless (no ``capacity``)   with a ``capacity``
===========  ===========================  ================================================
cpu          ``"blocked"``                ``"blocked"``
tpu          ``"megablox"``               ``"batched"``
cuda, rocm   ``"triton"``                 ``"batched"``
===========  ===========================  ================================================

Why: XLA:CPU computes ``ragged_dot`` as a dense masked product over all ``E`` experts; and
XLA:GPU rewrites it into a zero-padded dense dot unless a cuDNN fusion takes it (bf16,
recent cuDNN, sm80+), which only a GPU compile shows. A tile kernel cannot become dense.
``ragged_dot`` stays selectable (for the cuDNN fusion); so do the batched slot buffers.

Differentiation: every kernel in reverse mode, and reverse over reverse (a gradient
differentiated again) but ``"ragged_dot"`` (JAX has no rule for its gradient's
gradient); ``"batched"`` and ``"ragged_dot"`` also in forward mode (the others are
``custom_vjp`` functions). Under ``"auto"`` the lowering keeps
one platform's kernel, and the CPU kernel's ``custom_vjp`` and the accelerator kernels' one
``custom_vjp`` (:mod:`sigmoid_moe._grouped_matmul`, one residual layout for Triton and
Megablox) are the only two sets of residuals the traced program holds.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from sigmoid_moe import _grouped_matmul
from sigmoid_moe._checks import require_array, require_int
from sigmoid_moe._dispatch_common import (
    check_expert_args,
    combine_rows,
    gather_rows,
    vary,
    varying,
)
from sigmoid_moe.blocked_ffn import (
    auto_block_size,
    block_layout,
    blocked_expert_ffn,
    capped_block_size,
)
from sigmoid_moe.experts import swiglu

__all__ = ["KERNELS", "ExpertAssignments", "KernelName", "grouped_swiglu"]

KernelName = Literal["auto", "blocked", "batched", "ragged_dot", "triton", "megablox"]
KERNELS: tuple[str, ...] = ("auto", "blocked", "batched", "ragged_dot", "triton", "megablox")


class ExpertAssignments(NamedTuple):
    """Where each token copy goes, token-major: copy ``a = t * k + j`` of token ``t``.

    The placed copies of expert ``e`` hold the ranks ``0 .. rows_e[e] - 1``, once each.
    :func:`grouped_swiglu` does not compute a placed copy whose expert is outside
    ``[0, E)`` or whose rank is outside ``[0, rows_e[e])`` (or ``[0, capacity)``): it adds
    0, instead of landing among another expert's rows.
    """

    expert_a: jax.Array  # [T*k] int32 expert of each copy (any value where not placed)
    rank_a: jax.Array  # [T*k] int32 rank among its expert's placed copies, 0 .. rows_e - 1
    placed_a: jax.Array  # [T*k] bool computed (not masked, dropped or without an expert)
    weight_a: jax.Array  # [T*k] combine weight
    rows_e: jax.Array  # [E] int32 placed copies per expert


def grouped_swiglu(
    x_td: jax.Array,
    assignments: ExpertAssignments,
    w_in_edf: jax.Array,
    w_out_efd: jax.Array,
    *,
    kernel: KernelName = "auto",
    capacity: int | None = None,
    block_size: int | None = None,
    rows_per_expert: int | None = None,
) -> jax.Array:
    """``y_t = sum over t's placed copies j of w_tj * SwiGLU_{e_tj}(x_t)`` (module docstring).

    Args:
      x_td: ``[T, d_model]``.
      assignments: the ``T * k`` copies (:class:`ExpertAssignments`).
      w_in_edf: ``[E, d_model, 2*d_ff]`` fused gate/up weights, ``x_td``'s dtype.
      w_out_efd: ``[E, d_ff, d_model]``, ``x_td``'s dtype.
      kernel: see the module docstring.
      capacity: static bound on ``rows_e`` (capacity dispatch); ``"batched"`` needs it.
      block_size: rows per block of ``"blocked"``; ``None``: chosen from
        ``rows_per_expert`` (:func:`sigmoid_moe.blocked_ffn.auto_block_size`). Without a
        capacity an explicit size is capped at ``rows_per_expert``.
      rows_per_expert: the rows an expert gets on average, which sizes blocks and tiles;
        default ``ceil(T * k / E)``.

    Returns:
      ``[T, d_model]`` in ``x_td``'s dtype, accumulated in float32; a token with no placed
      copy gets exactly 0.

    Raises:
      TypeError, ValueError: naming the argument, for a kernel it does not know, weights
        of another shape or dtype than ``x_td``'s, assignments of other lengths than
        ``T * k`` (``E`` for ``rows_e``), or sizes that are not ints ``>= 1``.
    """
    _check_args(x_td, assignments, w_in_edf, w_out_efd, kernel, capacity, block_size)
    num_tokens = x_td.shape[0]
    num_copies, num_experts = assignments.expert_a.shape[0], w_in_edf.shape[0]
    if rows_per_expert is None:
        rows_per_expert = -(-num_copies // num_experts)
    else:
        require_int("rows_per_expert", rows_per_expert, 1)
    assignments = _in_range(assignments, capacity)
    run = _Run(num_tokens, capacity, block_size, rows_per_expert)
    if kernel != "auto":
        return run(kernel, x_td, assignments, w_in_edf, w_out_efd)
    accelerator = "batched" if capacity is not None else "accelerator"

    def on(name):
        return lambda *args: run(name, *args)

    return jax.lax.platform_dependent(
        x_td, assignments, w_in_edf, w_out_efd, cpu=on("blocked"), default=on(accelerator)
    )


def _check_args(x_td, assignments, w_in_edf, w_out_efd, kernel, capacity, block_size):
    """:func:`grouped_swiglu`'s arguments; raises naming the argument."""
    if kernel not in KERNELS:
        options = ", ".join(repr(k) for k in KERNELS)
        raise ValueError(f"kernel={kernel!r} is not a routed-expert kernel; choose {options}.")
    if kernel == "batched" and capacity is None:
        raise ValueError(
            "kernel='batched' computes [E, C] slot buffers and needs capacity=C (capacity "
            "dispatch); use 'ragged_dot', 'triton', 'megablox' or 'blocked' without one."
        )
    if capacity is not None:
        require_int("capacity", capacity, 1)
    if block_size is not None:
        require_int("block_size", block_size, 1)
    check_expert_args(x_td, w_in_edf, w_out_efd)
    for name, w in (("w_in_edf", w_in_edf), ("w_out_efd", w_out_efd)):
        if jnp.result_type(w) != jnp.result_type(x_td):
            raise TypeError(
                f"{name} must have x_td's dtype {jnp.result_type(x_td)}, got "
                f"{jnp.result_type(w)}; cast it with {name}.astype(x_td.dtype)."
            )
    if not isinstance(assignments, ExpertAssignments):
        raise TypeError(
            f"assignments must be an ExpertAssignments, got {type(assignments).__name__}."
        )
    for name in ExpertAssignments._fields:
        hint = "[E]" if name == "rows_e" else "[T * k]"
        require_array(f"assignments.{name}", getattr(assignments, name), hint)
    num_tokens, num_experts = jnp.shape(x_td)[0], jnp.shape(w_in_edf)[0]
    num_copies = jnp.size(assignments.expert_a)
    if num_tokens == 0 or num_copies == 0 or num_copies % num_tokens:
        raise ValueError(
            f"assignments hold {num_copies} copies for {num_tokens} tokens; they must be "
            "T * k copies of T >= 1 tokens, token-major."
        )
    # Field: (its length, its dtype kind; None: any numeric dtype).
    fields = {
        "expert_a": (num_copies, jnp.integer),
        "rank_a": (num_copies, jnp.integer),
        "placed_a": (num_copies, jnp.bool_),
        "weight_a": (num_copies, None),
        "rows_e": (num_experts, jnp.integer),
    }
    for name, (size, kind) in fields.items():
        value = getattr(assignments, name)
        if jnp.shape(value) != (size,):
            shape = jnp.shape(value)
            raise ValueError(f"assignments.{name} must have shape {(size,)}, got {shape}.")
        if kind is not None and not jnp.issubdtype(jnp.result_type(value), kind):
            expected = "bool" if kind is jnp.bool_ else "integer"
            raise TypeError(f"assignments.{name} must be {expected}, got {jnp.result_type(value)}.")


def _in_range(assignments: ExpertAssignments, capacity: int | None) -> ExpertAssignments:
    """Only copies that have a row of their own stay placed (see :class:`ExpertAssignments`):
    an expert in ``[0, E)`` and a rank below its ``rows_e`` and the capacity."""
    rows_e = assignments.rows_e.astype(jnp.int32)
    if capacity is not None:
        rows_e = jnp.minimum(rows_e, capacity)
    num_experts = rows_e.shape[0]
    expert_a, rank_a = assignments.expert_a, assignments.rank_a
    has_expert = (expert_a >= 0) & (expert_a < num_experts)
    has_row = (rank_a >= 0) & (rank_a < rows_e[jnp.where(has_expert, expert_a, 0)])
    placed_a = assignments.placed_a & has_expert & has_row
    return assignments._replace(placed_a=placed_a, rows_e=rows_e)


class _Run(NamedTuple):
    """One kernel on a set of assignments: the layout it needs, the kernel, the combine."""

    num_tokens: int
    capacity: int | None
    block_size: int | None
    rows_per_expert: int

    def __call__(self, kernel, x_td, assignments, w_in_edf, w_out_efd):
        if kernel == "blocked":
            return self._blocked(x_td, assignments, w_in_edf, w_out_efd)
        if kernel == "batched":
            return self._batched(x_td, assignments, w_in_edf, w_out_efd)
        if kernel == "ragged_dot":
            return self._ragged_dot(x_td, assignments, w_in_edf, w_out_efd)
        return self._tiled(kernel, x_td, assignments, w_in_edf, w_out_efd)

    def _layout(self, assignments, block_size: int, capacity: int | None = None):
        num_copies = assignments.expert_a.shape[0]
        k = num_copies // self.num_tokens
        with jax.named_scope("layout"):
            return block_layout(
                assignments.expert_a,
                assignments.rank_a,
                assignments.placed_a,
                jnp.repeat(jnp.arange(self.num_tokens, dtype=jnp.int32), k),
                assignments.weight_a,
                assignments.rows_e,
                num_tokens=self.num_tokens,
                block_size=block_size,
                max_rows_per_expert=capacity,
            )

    def _combine(self, o_rd, row_a, assignments, dtype):
        """Each token's copies gathered from the kernel's rows and summed with weights."""
        num_copies = row_a.shape[0]
        k = num_copies // self.num_tokens
        y_ad = gather_rows(o_rd, row_a)
        shape = (self.num_tokens, k)
        return combine_rows(
            y_ad,
            assignments.weight_a.reshape(shape),
            assignments.placed_a.reshape(shape),
            dtype,
        )

    def _blocked(self, x_td, assignments, w_in_edf, w_out_efd):
        if self.capacity is None:
            block_size = capped_block_size(self.block_size, self.rows_per_expert)
        elif self.block_size is None:
            block_size = auto_block_size(self.rows_per_expert)
        else:
            block_size = self.block_size
        layout = self._layout(assignments, block_size, self.capacity)
        return blocked_expert_ffn(x_td, layout, w_in_edf, w_out_efd)

    def _batched(self, x_td, assignments, w_in_edf, w_out_efd):
        num_experts, d_model, _ = w_in_edf.shape
        slots = self.capacity
        num_copies = assignments.expert_a.shape[0]
        with jax.named_scope("layout"):
            out_of_range = num_experts * slots
            row_a = jnp.where(
                assignments.placed_a,
                assignments.expert_a * slots + assignments.rank_a,
                out_of_range,
            ).astype(jnp.int32)
            token_a = jnp.arange(num_copies, dtype=jnp.int32) // (num_copies // self.num_tokens)
            src_s = (
                jnp.full((out_of_range,), self.num_tokens, jnp.int32)
                .at[row_a]
                .set(token_a, mode="drop")
            )
        x_ecd = gather_rows(x_td, src_s).reshape(num_experts, slots, d_model)
        h_ecf2 = jnp.einsum("ecd,edf->ecf", x_ecd, w_in_edf)
        o_ecd = jnp.einsum("ecf,efd->ecd", swiglu(h_ecf2), w_out_efd)
        o_sd = o_ecd.reshape(out_of_range, d_model)
        return self._combine(o_sd, row_a, assignments, x_td.dtype)

    def _ragged_dot(self, x_td, assignments, w_in_edf, w_out_efd):
        layout = self._layout(assignments, block_size=1)  # exactly the placed rows, sorted
        rows_pd = gather_rows(x_td, layout.src_bm.reshape(-1))
        # Rows past sum(rows_e) belong to no group: ragged_dot gives them zeros.
        h_pf2 = jax.lax.ragged_dot(rows_pd, w_in_edf, assignments.rows_e)
        o_pd = jax.lax.ragged_dot(swiglu(h_pf2), w_out_efd, assignments.rows_e)
        return self._combine(o_pd, layout.row_a, assignments, x_td.dtype)

    def _tiled(self, kernel, x_td, assignments, w_in_edf, w_out_efd):
        rows = _grouped_matmul.tile_rows(self.rows_per_expert)
        layout = self._layout(assignments, block_size=rows)
        with jax.named_scope("layout"):
            tiles_e = (assignments.rows_e + rows - 1) // rows
            tile_start_e = jnp.concatenate(
                [jnp.zeros((1,), jnp.int32), jnp.cumsum(tiles_e).astype(jnp.int32)]
            )
            tiles = _grouped_matmul.TileLayout(
                src_r=layout.src_bm.reshape(-1),
                row_tk=layout.row_a.reshape(self.num_tokens, -1),
                tile_expert_b=layout.block_expert_b,
                tile_start_e=tile_start_e,
            )
        # Inside shard_map: one set of varying mesh axes for every operand (the transpose
        # of that cast sums the gradients of replicated weights over those axes).
        axes = frozenset().union(*(varying(a) for a in (x_td, w_in_edf, w_out_efd, *tiles)))
        x_td, w_in_edf, w_out_efd = (vary(a, axes) for a in (x_td, w_in_edf, w_out_efd))
        tiles = _grouped_matmul.TileLayout(*(vary(a, axes) for a in tiles))
        o_rd = _grouped_matmul.tiled_swiglu(kernel, x_td, w_in_edf, w_out_efd, tiles)
        return self._combine(o_rd, layout.row_a, assignments, x_td.dtype)
