"""Dispatch and combine: send each token to its chosen experts, run them, sum back.

Pure array functions; no Flax. Every path has the same positional signature::

    y_td, dropped = dispatch(x_td, expert_ids_tk, weights_tk, w_in_edf, w_out_efd, token_mask_t)

and returns :class:`Dispatched`. Paths differ only in which token copies reach the experts
(capacity drops the overflow; dropless keeps every copy); the routing (``expert_ids_tk``,
``weights_tk``) comes from :func:`sigmoid_moe.route` and is never recomputed here. The
output is, for token ``t``,

.. math::  y_t = \\sum_{j<k} w_{tj}\\, \\mathrm{FFN}_{e_{tj}}(x_t)

summed over the assignments that were not dropped (all of them in the dropless path).
Masked tokens (``token_mask_t`` False: padding) take no expert slot and get ``y_t = 0``.

Both paths rank token copies within their expert with one stable sort (O(T k) memory)
and hand the copies to :func:`sigmoid_moe.expert_kernels.grouped_swiglu`, which owns the
expert kernels (blocked, batched, ``ragged_dot``, Pallas Triton, Pallas Megablox) and, for
``kernel="auto"``, picks one per platform when the program is lowered. No dense
``[T, E, capacity]`` dispatch tensor.

References:
  GShard (arXiv 2006.16668), Switch Transformer (arXiv 2101.03961): capacity dispatch.
  MegaBlocks (arXiv 2211.15841): dropless MoE with block-sparse grouped matmuls.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp

from sigmoid_moe._dispatch_common import (
    check_block_size,
    check_dispatch_args,
    check_kernel,
    combine_rows,
    gather_rows,
    rank_within_expert,
)
from sigmoid_moe.expert_kernels import ExpertAssignments, grouped_swiglu

__all__ = [
    "DISPATCH_KINDS",
    "CapacitySlots",
    "Dispatched",
    "CapacityKernel",
    "DispatchKind",
    "DroplessKernel",
    "Kernel",
    "capacity",
    "capacity_moe",
    "capacity_slots",
    "combine_slots",
    "dropless_moe",
]

DispatchKind = Literal["dropless", "capacity"]
DroplessKernel = Literal["auto", "ragged_dot", "blocked", "triton", "megablox"]
CapacityKernel = Literal["auto", "batched", "blocked"]
Kernel = Literal["auto", "ragged_dot", "batched", "blocked", "triton", "megablox"]  # any above
DISPATCH_KINDS: tuple[str, ...] = get_args(DispatchKind)


class Dispatched(NamedTuple):
    """What a dispatch path returns."""

    y_td: jax.Array  # [T, d_model] combined expert outputs, x_td's dtype
    dropped: jax.Array  # [] int32 token-expert assignments dropped (always 0 when dropless)


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert, ``ceil(capacity_factor * T * k / E)`` (GShard/Switch).

    ``T`` is the static token count, padding included, so the buffer shape is static.
    A factor of ``E / k`` gives ``T`` slots: no expert can overflow, since a token picks
    an expert at most once.
    """
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
        raise TypeError(f"capacity_factor must be a float, got {capacity_factor!r}.")
    if not (capacity_factor > 0 and math.isfinite(capacity_factor)):
        raise ValueError(
            f"capacity_factor must be a finite float > 0, got {capacity_factor}; "
            "1.25 is the usual choice, num_experts / top_k drops nothing."
        )
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def _assignments(
    expert_ids_tk: jax.Array, token_mask_t: jax.Array | None, num_experts: int
) -> tuple[jax.Array, jax.Array]:
    """``(real_tk, valid_tk)`` bool ``[T, k]``: assignments of real (unmasked) tokens, and
    those of them whose expert id is in ``[0, E)``.

    An id outside ``[0, E)`` names no expert: its assignment gets no slot or row,
    contributes 0 and is counted as dropped (as :func:`sigmoid_moe.expert_load` does not
    count it), so nothing is lost silently.
    """
    real_tk = jnp.ones(expert_ids_tk.shape, bool)
    if token_mask_t is not None:
        real_tk = jnp.broadcast_to(jnp.asarray(token_mask_t)[:, None], expert_ids_tk.shape)
    in_range = (expert_ids_tk >= 0) & (expert_ids_tk < num_experts)
    return real_tk, real_tk & in_range


def _empty(x_td: jax.Array) -> Dispatched:
    """The result for zero tokens: an empty ``[0, d]`` output, nothing dropped."""
    return Dispatched(jnp.zeros(x_td.shape, x_td.dtype), jnp.zeros((), jnp.int32))


# --------------------------------------------------------------------------- capacity


class CapacitySlots(NamedTuple):
    """Where each assignment goes in an ``[E, C]`` slot buffer (rank-major priority)."""

    slot_a: jax.Array  # [k*T] int32 slot e * C + rank, E * C where dropped or masked
    src_s: jax.Array  # [E*C] int32 token per slot, T (a zero row) where empty
    kept_a: jax.Array  # [k*T] bool placed in a slot
    dropped: jax.Array  # [] int32 unmasked assignments that found no slot (or no expert)
    count_e: jax.Array  # [E] int32 unmasked assignments per expert, dropped included


def capacity_slots(
    expert_ids_tk: jax.Array, token_mask_t: jax.Array | None, num_experts: int, slots: int
) -> CapacitySlots:
    """Assigns ``T*k`` token copies to ``slots`` slots per expert, dropping the overflow.

    Priority is *choice rank first, then token order* (GShard): assignment ``a = j * T + t``
    (all first choices before any second choice, earlier tokens first within a rank).
    """
    num_tokens, k = expert_ids_tk.shape
    expert_a = expert_ids_tk.T.reshape(-1).astype(jnp.int32)  # [k*T]
    real_tk, valid_tk = _assignments(expert_ids_tk, token_mask_t, num_experts)
    valid_a = valid_tk.T.reshape(-1)  # [k*T]
    token_a = jnp.tile(jnp.arange(num_tokens, dtype=jnp.int32), k)  # [k*T]
    rank_a, count_e = rank_within_expert(expert_a, valid_a, num_experts)
    kept_a = valid_a & (rank_a < slots)
    out_of_range = num_experts * slots
    slot_a = jnp.where(kept_a, expert_a * slots + rank_a, out_of_range)
    # Inverse map slot -> token; empty slots read the zero row (index T).
    src_s = jnp.full((out_of_range,), num_tokens, jnp.int32).at[slot_a].set(token_a, mode="drop")
    return CapacitySlots(
        slot_a=slot_a,
        src_s=src_s,
        kept_a=kept_a,
        dropped=jnp.sum(real_tk, dtype=jnp.int32) - jnp.sum(kept_a, dtype=jnp.int32),
        count_e=count_e,
    )


def combine_slots(
    out_sd: jax.Array, placement: CapacitySlots, weights_tk: jax.Array, dtype
) -> jax.Array:
    """``[T, d]`` routed output from the slot buffer's rows ``out_sd [E*C, d]``."""
    num_tokens, k = weights_tk.shape
    y_ad = gather_rows(out_sd, placement.slot_a)  # [k*T, d] rank-major
    # Back to token-major [T, k] order for the combine.
    y_ad = y_ad.reshape(k, num_tokens, -1).transpose(1, 0, 2).reshape(num_tokens * k, -1)
    kept_tk = placement.kept_a.reshape(k, num_tokens).T
    return combine_rows(y_ad, weights_tk, kept_tk, dtype)


def capacity_moe(
    x_td: jax.Array,
    expert_ids_tk: jax.Array,
    weights_tk: jax.Array,
    w_in_edf: jax.Array,
    w_out_efd: jax.Array,
    token_mask_t: jax.Array | None = None,
    *,
    capacity_factor: float = 1.25,
    kernel: CapacityKernel = "auto",
    block_size: int | None = None,
) -> Dispatched:
    """Capacity dispatch (GShard/Switch): at most ``C`` token copies per expert.

    Every expert has ``C = capacity(T, k, E, capacity_factor)`` slots. Overflow is dropped
    by priority *choice rank first, then token order*: all first choices are placed
    before any second choice (GShard), and within one rank earlier tokens win. The number
    of dropped (unmasked) assignments is returned, assignments to an expert id outside
    ``[0, E)`` included; a dropped assignment contributes 0
    (its weight is not renormalised over the survivors).

    Kernels (:func:`sigmoid_moe.expert_kernels.grouped_swiglu`; equal up to float
    rounding; ``kernel="auto"`` is chosen per platform when lowered: ``"blocked"`` on CPU,
    ``"batched"`` elsewhere):

    - ``"batched"``: the dense ``[E, C, d_model]`` slot buffer through one batched
      matmul per projection, ``E * C`` rows (``capacity_factor`` times the useful work).
    - ``"blocked"``: the kept copies in expert-contiguous row blocks through
      :func:`sigmoid_moe.blocked_ffn.blocked_expert_ffn` in blocks of at most ``C`` rows;
      empty slots cost nothing. Reverse-mode autodiff only (no ``jax.jvp``).
      ``block_size=None`` lets the kernel choose
      (:func:`sigmoid_moe.blocked_ffn.auto_block_size` of the ``T*k/E`` average rows).
    """
    check_dispatch_args(x_td, expert_ids_tk, weights_tk, w_in_edf, w_out_efd, token_mask_t)
    if block_size is not None:
        check_block_size(block_size)
    check_kernel(kernel, get_args(CapacityKernel), "dispatch='capacity'")
    num_tokens, k = expert_ids_tk.shape
    num_experts = w_in_edf.shape[0]
    if num_tokens == 0:
        return _empty(x_td)
    slots = capacity(num_tokens, k, num_experts, capacity_factor)
    with jax.named_scope("layout"):
        placement = capacity_slots(expert_ids_tk, token_mask_t, num_experts, slots)
        expert_tk = expert_ids_tk.astype(jnp.int32)
        # Slots are ranked in priority order (rank-major); the kernels take token-major copies.
        rank_tk = (placement.slot_a.reshape(k, num_tokens).T - expert_tk * slots).reshape(-1)
        assignments = ExpertAssignments(
            expert_a=expert_tk.reshape(-1),
            rank_a=rank_tk,
            placed_a=placement.kept_a.reshape(k, num_tokens).T.reshape(-1),
            weight_a=weights_tk.reshape(-1),
            rows_e=jnp.minimum(placement.count_e, slots),
        )
    y_td = grouped_swiglu(
        x_td,
        assignments,
        w_in_edf.astype(x_td.dtype),
        w_out_efd.astype(x_td.dtype),
        kernel=kernel,
        capacity=slots,
        block_size=block_size,
    )
    return Dispatched(y_td, placement.dropped)


# --------------------------------------------------------------------------- dropless


def dropless_moe(
    x_td: jax.Array,
    expert_ids_tk: jax.Array,
    weights_tk: jax.Array,
    w_in_edf: jax.Array,
    w_out_efd: jax.Array,
    token_mask_t: jax.Array | None = None,
    *,
    kernel: DroplessKernel = "auto",
    block_size: int | None = None,
) -> Dispatched:
    """Dropless dispatch (MegaBlocks-style): sort copies by expert, grouped matmul, combine.

    1. Rank the ``T*k`` token copies within their expert (stable: token order).
    2. Run the SwiGLU experts as grouped matmuls through
       :func:`sigmoid_moe.expert_kernels.grouped_swiglu`. ``kernel="auto"`` is chosen
       per platform when the program is lowered: the fused block scan of
       :func:`sigmoid_moe.blocked_ffn.blocked_expert_ffn` on CPU (``"blocked"``), the
       Pallas Triton tile kernels on NVIDIA GPUs (``"triton"``), Pallas Megablox on TPU
       (``"megablox"``); ``"ragged_dot"`` is selectable everywhere. Equal up to float
       rounding; only ``"ragged_dot"`` also has forward-mode autodiff. Experts with zero
       tokens own zero rows / blocks.
    3. Combine each copy's output with its routing weight.

    No assignment is ever dropped for lack of room; ``dropped`` counts only assignments to
    an expert id outside ``[0, E)`` (0 for any routing from :func:`sigmoid_moe.route`).
    Masked tokens are sorted out of the computed rows entirely. Zero tokens give an empty
    output.

    To map over groups of tokens that share experts, flatten the groups into the token
    axis (as :class:`MoELayer` does) rather than ``jax.vmap``: under vmap,
    ``kernel="ragged_dot"`` needs the expert weights batched too (JAX's batching rule has no
    case for shared weights), and ``kernel="blocked"`` works but runs every block.

    ``block_size`` (blocked kernel): rows per block; ``None`` lets the kernel choose
    (:func:`sigmoid_moe.blocked_ffn.auto_block_size`, about 1.5x an expert's average
    rows). An explicit size is capped at the average rows per expert. The Triton and
    Megablox kernels size their own tiles (16 to 128 rows).
    """
    check_dispatch_args(x_td, expert_ids_tk, weights_tk, w_in_edf, w_out_efd, token_mask_t)
    if block_size is not None:
        check_block_size(block_size)
    check_kernel(kernel, get_args(DroplessKernel), "dispatch='dropless'")
    num_tokens = expert_ids_tk.shape[0]
    num_experts = w_in_edf.shape[0]
    if num_tokens == 0:
        return _empty(x_td)
    with jax.named_scope("layout"):
        expert_a = expert_ids_tk.reshape(-1).astype(jnp.int32)  # [T*k], a = t * k + j
        real_tk, valid_tk = _assignments(expert_ids_tk, token_mask_t, num_experts)
        valid_a = valid_tk.reshape(-1)
        rank_a, count_e = rank_within_expert(expert_a, valid_a, num_experts)
        assignments = ExpertAssignments(expert_a, rank_a, valid_a, weights_tk.reshape(-1), count_e)
    y_td = grouped_swiglu(
        x_td,
        assignments,
        w_in_edf.astype(x_td.dtype),
        w_out_efd.astype(x_td.dtype),
        kernel=kernel,
        block_size=block_size,
    )
    no_expert = jnp.sum(real_tk & ~valid_tk, dtype=jnp.int32)  # ids outside [0, E)
    return Dispatched(y_td, no_expert)
