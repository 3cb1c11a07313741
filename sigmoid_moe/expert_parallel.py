"""Expert parallelism: tokens travel to the devices that own their experts, and back.

Pure array functions; no Flax. :func:`expert_parallel_moe` has the dispatch signature of
:mod:`sigmoid_moe.dispatch` (global-view arrays in, global-view arrays out) and runs a
``jax.shard_map`` over a device mesh:

* tokens ``[T, d]`` are split over *every* mesh axis (``T / n_devices`` per device: data
  parallel over ``data``, and each member of an expert group routes its own tokens);
* expert weights ``[E, ...]`` are split over the expert axis (``E / n_expert`` local
  experts per device) and replicated over the others; with ``expert_axis=None`` every
  device holds every expert and dispatches its own tokens, with no exchange (data
  parallelism: the expert kernels see local tokens, not all-gathered ones).

Per device (``n`` = expert-axis size, ``E_l = E / n``, ``T_l`` local tokens, ``k``):

**Dropless** (``capacity_factor=None``), a ragged exchange of exactly the routed copies::

    sort the T_l * k copies by global expert (= by owner device, then local expert)
    all_to_all of per-expert counts  -> sizes and offsets (sigmoid_moe.ragged_exchange)
    ragged_all_to_all                -> received rows grouped by local expert
    local experts                    -> sigmoid_moe.expert_kernels.grouped_swiglu
    ragged_all_to_all back           -> every copy's output in the sender's sorted order
    unsort + combine                 -> y [T_l, d]

Each copy crosses the wire once per direction, so the bytes moved are the minimum
``T * k * d * itemsize * (n - 1) / n`` per direction for balanced routing, plus ``3 E``
int32 per device for the plan. The receive buffer is allocated for the worst case
(:func:`sigmoid_moe.ragged_exchange.dropless_receive_rows`, ``n * T_l * min(E_l, k)``
rows: every sender's tokens each sending this device one row per distinct local expert),
so nothing is ever dropped; it is allocated, not sent. A token that lists an expert twice
sends one row for both copies, which combine it with their own weights. On CPU the
exchange is emulated (XLA:CPU has no ragged-all-to-all) with padded collectives, ``n``
times the bytes; the offsets, the sort and the kernels are the same code as on GPU/TPU.

**Capacity** (``capacity_factor`` a float), static slot buffers::

    buffer  [E, C, d]    = capacity-bounded slots of the local tokens, per global expert
    all_to_all           -> [n_src, E_l, C, d]: every sender's rows for my experts
    local experts        -> SwiGLU on [E_l, n_src * C, d]
    all_to_all back      -> [E, C, d] in the sender's slot order
    gather + combine     -> y [T_l, d]

``C = capacity(T_l, k, E, capacity_factor)`` slots per (sender, expert); overflow is
dropped with the priority of :func:`sigmoid_moe.capacity_moe` (choice rank first, then
token order), counted, and summed over the mesh. The fill counts travel with one more
small all-to-all, and the local experts run through
:func:`sigmoid_moe.expert_kernels.grouped_swiglu`: a batched matmul over every slot
(``kernel="batched"``) or the filled slots only (``kernel="blocked"``).

``kernel="auto"`` is chosen per platform when the program is lowered, as in
:mod:`sigmoid_moe.expert_kernels`: a ``cuda`` or ``tpu`` export made on a CPU host holds
the accelerator kernel.

The expert load is counted per device and ``psum``-ed in int32 over every mesh axis, so
each replica sees the same global load, and so the bit-identical bias after an update.

References:
  GShard (arXiv 2006.16668): capacity buffers and all-to-all expert parallelism.
  DeepSeek-V3 (arXiv 2412.19437), section 3.2: EP with all-to-all dispatch and combine.
  MegaBlocks (arXiv 2211.15841): dropless grouped matmuls over variable-size groups.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, get_args

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from sigmoid_moe._dispatch_common import (
    check_block_size,
    check_dispatch_args,
    check_kernel,
    combine_rows,
    gather_rows,
    rank_within_expert,
)
from sigmoid_moe.dispatch import (
    CapacityKernel,
    DroplessKernel,
    Kernel,
    capacity,
    capacity_moe,
    capacity_slots,
    combine_slots,
    dropless_moe,
)
from sigmoid_moe.expert_kernels import ExpertAssignments, grouped_swiglu
from sigmoid_moe.ragged_exchange import dropless_receive_rows, expert_exchange, ragged_all_to_all
from sigmoid_moe.sharding import check_expert_axis

__all__ = [
    "ExpertParallelOut",
    "all_to_all_bytes_minimum",
    "expert_parallel_capacity",
    "expert_parallel_moe",
]


class ExpertParallelOut(NamedTuple):
    """What :func:`expert_parallel_moe` returns (global-view arrays)."""

    y_td: jax.Array  # [T, d_model] combined expert outputs, x_td's dtype, token-sharded
    dropped: jax.Array  # [] int32 assignments dropped by capacity, summed over the mesh
    expert_load: jax.Array  # [E] int32 global assignments per expert (unmasked), replicated


def expert_parallel_capacity(
    local_tokens: int, top_k: int, num_experts: int, capacity_factor: float
) -> int:
    """Slots per (sending device, expert) of capacity EP: ``ceil(factor * T_l * k / E)``."""
    return capacity(local_tokens, top_k, num_experts, capacity_factor)


def all_to_all_bytes_minimum(num_tokens: int, top_k: int, d_model: int, itemsize: int, n: int):
    """Least bytes one direction of EP must move: ``T * k * d * itemsize * (n - 1) / n``.

    With experts spread evenly, ``1/n`` of the token copies already sit on their owner.
    """
    return num_tokens * top_k * d_model * itemsize * (n - 1) / n


def _resolve_mesh(mesh):
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            raise ValueError(
                "expert_parallel_moe needs a device mesh: pass mesh=... or call it under "
                "jax.set_mesh(mesh), e.g. mesh = sigmoid_moe.make_mesh(data=2, expert=4)."
            )
    return mesh


def _slot_assignments(filled_nl, slots: int) -> ExpertAssignments:
    """The received slot rows as copies of themselves (``k = 1``), by local expert.

    Row ``r = (s * E_l + l) * C + c`` holds slot ``c`` of sender ``s`` for local expert
    ``l``; a sender fills its slots from the front (``c < filled_nl[s, l]``), and expert
    ``l``'s rows rank sender by sender.
    """
    num_src, local_experts = filled_nl.shape
    slot_c = jnp.arange(slots, dtype=jnp.int32)
    expert_r = jnp.broadcast_to(
        jnp.arange(local_experts, dtype=jnp.int32)[None, :, None], (num_src, local_experts, slots)
    )
    before_nl = jnp.cumsum(filled_nl, axis=0) - filled_nl  # filled rows of earlier senders
    return ExpertAssignments(
        expert_a=expert_r.reshape(-1),
        rank_a=(before_nl[:, :, None] + slot_c).reshape(-1),
        placed_a=(slot_c < filled_nl[:, :, None]).reshape(-1),
        weight_a=jnp.ones((num_src * local_experts * slots,), jnp.float32),  # at the sender
        rows_e=jnp.sum(filled_nl, axis=0),
    )


def _capacity_local_moe(
    x_td,
    expert_ids_tk,
    weights_tk,
    w_in_ldf,
    w_out_lfd,
    mask_t,
    *,
    expert_axis: str,
    num_shards: int,
    token_axes: tuple[str, ...],
    capacity_factor: float,
    kernel: str,
    block_size: int | None,
):
    """The per-device body of capacity EP inside ``shard_map`` (all shapes are local).

    Args:
      x_td: ``[T_l, d]`` this device's tokens.
      expert_ids_tk, weights_tk: ``[T_l, k]`` their routing (global expert ids).
      w_in_ldf, w_out_lfd: ``[E_l, d, 2 f]``, ``[E_l, f, d]`` this device's experts.
      mask_t: ``[T_l]`` bool real-token mask.
    """
    num_tokens, k = expert_ids_tk.shape
    local_experts, d_model, _ = w_in_ldf.shape
    num_experts = local_experts * num_shards
    slots = expert_parallel_capacity(num_tokens, k, num_experts, capacity_factor)

    # Slot assignment as in capacity_moe (choice rank first, then token order).
    placement = capacity_slots(expert_ids_tk, mask_t, num_experts, slots)
    # Global expert e = owner * E_l + local index, so the leading split is by owner device.
    send_nlcd = gather_rows(x_td, placement.src_s).reshape(
        num_shards, local_experts, slots, d_model
    )
    filled_nl = jnp.minimum(placement.count_e, slots).reshape(num_shards, local_experts)

    # Dispatch: chunk i goes to expert-axis member i; received chunk j came from member j.
    recv_nlcd = jax.lax.all_to_all(send_nlcd, expert_axis, 0, 0, tiled=True)
    recv_filled_nl = jax.lax.all_to_all(filled_nl, expert_axis, 0, 0, tiled=True)
    # Every received slot's row through its local expert; empty slots give 0.
    out_rd = grouped_swiglu(
        recv_nlcd.reshape(-1, d_model),
        _slot_assignments(recv_filled_nl, slots),
        w_in_ldf.astype(x_td.dtype),
        w_out_lfd.astype(x_td.dtype),
        kernel=kernel,
        capacity=num_shards * slots,
        block_size=block_size,
    )
    # Combine: the inverse exchange returns every row to its sender, in its slot order.
    back_nlcd = out_rd.reshape(num_shards, local_experts, slots, d_model)
    out_nlcd = jax.lax.all_to_all(back_nlcd, expert_axis, 0, 0, tiled=True)

    y_td = combine_slots(
        out_nlcd.reshape(num_experts * slots, d_model), placement, weights_tk, x_td.dtype
    )
    # Integer psums: exact, so every replica holds the same global counts.
    load_e = jax.lax.psum(placement.count_e, token_axes)
    dropped = jax.lax.psum(placement.dropped, token_axes)
    return y_td, dropped, load_e


def _received_assignments(num_rows: int, group_sizes_l) -> ExpertAssignments:
    """The received rows (grouped by local expert from the front) as copies of themselves."""
    local_experts = group_sizes_l.shape[0]
    row_m = jnp.arange(num_rows, dtype=jnp.int32)
    group_end_l = jnp.cumsum(group_sizes_l)
    expert_m = jnp.searchsorted(group_end_l, row_m, side="right").astype(jnp.int32)
    placed_m = expert_m < local_experts
    expert_m = jnp.minimum(expert_m, local_experts - 1)
    return ExpertAssignments(
        expert_a=expert_m,
        rank_a=row_m - (group_end_l - group_sizes_l)[expert_m],
        placed_a=placed_m,
        weight_a=jnp.ones((num_rows,), jnp.float32),  # combine weights apply at the sender
        rows_e=group_sizes_l,
    )


def _first_copies(expert_ids_tk, valid_tk):
    """``(first_tk, sent_tk)``: for each copy the first ``j`` of its token with the same
    expert, and whether it is that first one (a valid copy that travels).

    Route gives distinct experts per token; a token that lists an expert twice sends one
    row, and both copies combine its output with their own weights.
    """
    k = expert_ids_tk.shape[1]
    same_tkk = (expert_ids_tk[:, :, None] == expert_ids_tk[:, None, :]) & valid_tk[:, None, :]
    first_tk = jnp.argmax(same_tkk, axis=2).astype(jnp.int32)  # j itself at the latest
    sent_tk = valid_tk & (first_tk == jnp.arange(k, dtype=jnp.int32))
    return first_tk, sent_tk


def _dropless_local_moe(
    x_td,
    expert_ids_tk,
    weights_tk,
    w_in_ldf,
    w_out_lfd,
    mask_t,
    *,
    expert_axis: str,
    num_shards: int,
    token_axes: tuple[str, ...],
    kernel: str,
    block_size: int | None,
):
    """The per-device body of dropless EP inside ``shard_map`` (all shapes are local).

    Args as :func:`_capacity_local_moe`. Copy ``a = t * k + j`` sits at row
    ``send_offsets_e[e_a] + rank_a`` of the send buffer (sorted by global expert, token
    order within an expert); masked tokens' copies are not sent, and a token's second copy
    to one expert reads the first one's row.
    """
    num_tokens, k = expert_ids_tk.shape
    local_experts, d_model, _ = w_in_ldf.shape
    num_experts = local_experts * num_shards
    num_copies = num_tokens * k
    real_tk = jnp.broadcast_to(mask_t[:, None], expert_ids_tk.shape)
    # An id outside [0, E) names no expert: not sent, counted as dropped (as in dropless_moe).
    valid_tk = real_tk & (expert_ids_tk >= 0) & (expert_ids_tk < num_experts)
    first_tk, sent_tk = _first_copies(expert_ids_tk, valid_tk)
    expert_a = jnp.where(valid_tk, expert_ids_tk, 0).reshape(-1)
    sent_a = sent_tk.reshape(-1)
    rank_a, sent_e = rank_within_expert(expert_a, sent_a, num_experts)
    plan = expert_exchange(sent_e, expert_axis)
    row_tk = jnp.where(sent_tk, (plan.send_offsets_e[expert_a] + rank_a).reshape(-1, k), num_copies)
    row_tk = jnp.take_along_axis(row_tk, first_tk, axis=1)  # duplicates: the first copy's row
    token_a = jnp.repeat(jnp.arange(num_tokens, dtype=jnp.int32), k)
    row_a = jnp.where(sent_a, row_tk.reshape(-1), num_copies)
    token_p = jnp.full((num_copies,), num_tokens, jnp.int32).at[row_a].set(token_a, mode="drop")
    send_pd = gather_rows(x_td, token_p)  # [T_l * k, d], unsent rows (masked) zero

    recv_rows = dropless_receive_rows(num_tokens, k, num_shards, local_experts)
    recv_md = ragged_all_to_all(
        send_pd,
        jnp.zeros((recv_rows, d_model), x_td.dtype),
        plan.send_offsets_e,
        plan.send_sizes_e,
        plan.land_offsets_e,
        plan.recv_sizes_q,
        axis_name=expert_axis,
    )
    out_md = grouped_swiglu(
        recv_md,
        _received_assignments(recv_rows, plan.group_sizes_l),
        w_in_ldf.astype(x_td.dtype),
        w_out_lfd.astype(x_td.dtype),
        kernel=kernel,
        block_size=block_size,
        rows_per_expert=-(-num_copies // local_experts),  # T_l k / E_l, not the buffer's
    )
    # The inverse exchange: my received slices go back to where they came from.
    back_pd = ragged_all_to_all(
        out_md,
        jnp.zeros((num_copies, d_model), x_td.dtype),
        plan.recv_offsets_q,
        plan.recv_sizes_q,
        plan.origin_offsets_q,
        plan.send_sizes_e,
        axis_name=expert_axis,
    )
    y_td = combine_rows(gather_rows(back_pd, row_tk.reshape(-1)), weights_tk, valid_tk, x_td.dtype)
    no_expert = jax.lax.psum(jnp.sum(real_tk & ~valid_tk, dtype=jnp.int32), token_axes)
    return y_td, no_expert, _global_load(expert_a, valid_tk, num_experts, token_axes)


def _global_load(expert_a, valid_tk, num_experts: int, token_axes) -> jax.Array:
    """``[E]`` int32 valid copies per expert over the whole mesh (``expert_a``: each copy's
    expert, any value where not valid). Integer psums: exact, so every replica holds the
    same global counts."""
    count_e = jnp.zeros((num_experts,), jnp.int32).at[expert_a].add(valid_tk.reshape(-1))
    return jax.lax.psum(count_e, token_axes)


def expert_parallel_moe(
    x_td: jax.Array,
    expert_ids_tk: jax.Array,
    weights_tk: jax.Array,
    w_in_edf: jax.Array,
    w_out_efd: jax.Array,
    token_mask_t: jax.Array | None = None,
    *,
    mesh=None,
    expert_axis: str | None = "expert",
    capacity_factor: float | None = 1.25,
    kernel: Kernel = "auto",
    block_size: int | None = None,
) -> ExpertParallelOut:
    """Expert-parallel dispatch over ``mesh`` (see the module docstring for the data flow).

    Args:
      x_td: ``[T, d_model]`` tokens; ``T`` must divide evenly over all mesh devices.
      expert_ids_tk: ``[T, k]`` int32 global expert ids (from :func:`sigmoid_moe.route`).
      weights_tk: ``[T, k]`` float32 combine weights.
      w_in_edf: ``[E, d_model, 2*d_ff]``; ``E`` must divide by the expert-axis size.
      w_out_efd: ``[E, d_ff, d_model]``.
      token_mask_t: optional ``[T]`` bool, False for padding.
      mesh: a ``jax.sharding.Mesh`` (or ``AbstractMesh``, to lower without devices);
        default the one set by ``jax.set_mesh``.
      expert_axis: the mesh axis the experts are split over; ``None``: every device holds
        every expert (data parallelism) and computes its own tokens by
        :func:`sigmoid_moe.dropless_moe` / :func:`sigmoid_moe.capacity_moe`, with no
        exchange. Dropless, that equals the single-device result; with a capacity, each
        device has ``capacity(T_l, k, E, factor)`` slots per expert for its own tokens.
        Under plain GSPMD the dispatch's layout is global and the expert kernels (custom
        calls) get all-gathered inputs: every device would compute every token.
      capacity_factor: ``None`` for dropless EP through the ragged exchange; a float for
        capacity EP with ``ceil(factor * T_l * k / E)`` slots per (sender, expert).
      kernel: the local experts' kernel (:mod:`sigmoid_moe.expert_kernels`). Dropless:
        ``"blocked"``, ``"ragged_dot"``, ``"triton"`` or ``"megablox"``; capacity:
        ``"batched"`` over every slot or ``"blocked"`` over the filled slots. ``"auto"``
        is chosen when lowered, for the platform lowered for: ``"blocked"`` on CPU;
        dropless ``"triton"`` on GPUs and ``"megablox"`` on TPU; capacity ``"batched"``.
      block_size: rows per block of the blocked kernel; ``None`` lets the kernel choose
        (:func:`sigmoid_moe.blocked_ffn.auto_block_size` of the rows per local expert).

    Returns:
      :class:`ExpertParallelOut`; equal to :func:`sigmoid_moe.capacity_moe` /
      :func:`sigmoid_moe.dropless_moe` on one device whenever nothing is dropped.
    """
    check_dispatch_args(x_td, expert_ids_tk, weights_tk, w_in_edf, w_out_efd, token_mask_t)
    if block_size is not None:
        check_block_size(block_size)
    if capacity_factor is None:
        kernels, mode = get_args(DroplessKernel), "dropless"
    else:
        capacity(1, 1, 1, capacity_factor)  # checks the factor
        kernels, mode = get_args(CapacityKernel), "capacity"
    check_kernel(kernel, kernels, f"{mode} expert parallelism (capacity_factor={capacity_factor})")
    mesh = _resolve_mesh(mesh)
    num_tokens = x_td.shape[0]
    num_experts = w_in_edf.shape[0]
    if expert_axis is None:
        num_shards = 1
    else:
        num_shards = check_expert_axis(dict(mesh.shape), expert_axis, num_experts)
    num_devices = mesh.size
    if num_tokens % num_devices:
        raise ValueError(
            f"x_td has {num_tokens} tokens, not divisible by the mesh's {num_devices} devices "
            f"{dict(mesh.shape)}; pad the batch (token_mask=False) to a multiple of {num_devices}."
        )
    if num_tokens == 0:
        zeros = jnp.zeros((), jnp.int32)
        return ExpertParallelOut(
            jnp.zeros(x_td.shape, x_td.dtype), zeros, jnp.zeros((num_experts,), jnp.int32)
        )
    if token_mask_t is None:
        token_mask_t = jnp.ones((num_tokens,), bool)
    token_axes = tuple(mesh.axis_names)
    tok = P(token_axes)
    if expert_axis is None:
        local_moe = functools.partial(
            _replicated_local_moe,
            token_axes=token_axes,
            capacity_factor=capacity_factor,
            kernel=kernel,
            block_size=block_size,
        )
    else:
        local_moe = functools.partial(
            _dropless_local_moe if capacity_factor is None else _capacity_local_moe,
            expert_axis=expert_axis,
            num_shards=num_shards,
            token_axes=token_axes,
            kernel=kernel,
            block_size=block_size,
        )
        if capacity_factor is not None:
            local_moe = functools.partial(local_moe, capacity_factor=capacity_factor)
    experts = P(expert_axis) if expert_axis is not None else P()
    in_specs = (tok, tok, tok, experts, experts, tok)
    body = jax.shard_map(local_moe, mesh=mesh, in_specs=in_specs, out_specs=(tok, P(), P()))
    args = (
        x_td,
        expert_ids_tk.astype(jnp.int32),
        weights_tk,
        w_in_edf,
        w_out_efd,
        jnp.asarray(token_mask_t).astype(bool),
    )
    if _all_explicit(mesh):
        # The sharding is part of an array's type here, and shard_map takes an argument only
        # as its spec says: the data flow's own resharding is written out, differentiably,
        # and the output goes back to the input's sharding (global view in, global view out).
        args = tuple(
            jax.reshard(a, NamedSharding(mesh, s)) for a, s in zip(args, in_specs, strict=True)
        )
        y_td, dropped, load_e = body(*args)
        y_td = jax.reshard(y_td, NamedSharding(mesh, jax.typeof(x_td).sharding.spec))
    else:  # Auto axes (shard_map reshards itself), or a mix, which it takes as it is
        y_td, dropped, load_e = body(*args)
    return ExpertParallelOut(y_td=y_td, dropped=dropped, expert_load=load_e)


def _replicated_local_moe(
    x_td,
    expert_ids_tk,
    weights_tk,
    w_in_edf,
    w_out_efd,
    mask_t,
    *,
    token_axes: tuple[str, ...],
    capacity_factor: float | None,
    kernel: str,
    block_size: int | None,
):
    """The per-device body with every expert on every device (``expert_axis=None``): the
    single-device dispatch of the local tokens; drops and loads ``psum``-ed."""
    args = (x_td, expert_ids_tk, weights_tk, w_in_edf, w_out_efd, mask_t)
    if capacity_factor is None:
        out = dropless_moe(*args, kernel=kernel, block_size=block_size)
    else:
        out = capacity_moe(
            *args, capacity_factor=capacity_factor, kernel=kernel, block_size=block_size
        )
    num_experts = w_in_edf.shape[0]
    valid_tk = mask_t[:, None] & (expert_ids_tk >= 0) & (expert_ids_tk < num_experts)
    expert_a = jnp.where(valid_tk, expert_ids_tk, 0).reshape(-1)
    dropped = jax.lax.psum(out.dropped.astype(jnp.int32), token_axes)
    return out.y_td, dropped, _global_load(expert_a, valid_tk, num_experts, token_axes)


def _all_explicit(mesh) -> bool:
    """Whether every axis of ``mesh`` is Explicit (``jax.make_mesh``'s default)."""
    return all(t == AxisType.Explicit for t in mesh.axis_types)
