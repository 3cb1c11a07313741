"""Expert parallelism: tokens travel to the devices that own their experts, and back.

Pure array functions; no Flax. :func:`expert_parallel_moe` has the dispatch signature of
:mod:`sigmoid_moe.dispatch` (global-view arrays in, global-view arrays out) and runs a
``jax.shard_map`` over a device mesh:

* tokens ``[T, d]`` are split over *every* mesh axis (``T / n_devices`` per device: data
  parallel over ``data``, and each member of an expert group routes its own tokens);
* expert weights ``[E, ...]`` are split over the expert axis (``E / n_expert`` local
  experts per device) and replicated over the others.

Per device (``n`` = expert-axis size, ``E_l = E / n``, ``T_l`` local tokens)::

    buffer  [E, C, d]    = capacity-bounded slots of the local tokens, per global expert
    all_to_all           -> [n_src, E_l, C, d]: every sender's rows for my experts
    local experts        -> SwiGLU on [E_l, n_src * C, d]
    all_to_all back      -> [E, C, d] in the sender's slot order
    gather + combine     -> y [T_l, d]

The local experts run as a batched matmul over every slot (``kernel="batched"``, GPU/TPU)
or, on CPU, through :func:`sigmoid_moe.blocked_ffn.blocked_expert_ffn` over the filled
slots only (``kernel="blocked"``): the per-(sender, expert) fill counts travel with one
more small all-to-all, and empty slots, most of the buffer in the drop-free mode, cost no
FLOPs.

``C = capacity(T_l, k, E, capacity_factor)`` slots per (sender, expert) keep every shape
static, so the same program runs on every backend. Overflow is dropped with the priority
of :func:`sigmoid_moe.capacity_moe` (choice rank first, then token order), counted, and
summed over the mesh. ``capacity_factor=None`` (``dispatch="dropless"``) gives ``C = T_l``:
a token picks an expert at most once, so no slot can overflow and nothing is dropped, at
``E / k`` times the useful traffic. A truly ragged dropless exchange would use
``jax.lax.ragged_all_to_all``; XLA:CPU does not implement it, so it is not offered here
(see :func:`ragged_all_to_all_available`).

The expert load is counted per device and ``psum``-ed in int32 over every mesh axis, so
each replica sees the same global load, and so the bit-identical bias after an update.

References:
  GShard (arXiv 2006.16668): capacity buffers and all-to-all expert parallelism.
  DeepSeek-V3 (arXiv 2412.19437), section 3.2: EP with all-to-all dispatch and combine.
"""

from __future__ import annotations

from typing import NamedTuple, get_args

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sigmoid_moe._dispatch_common import (
    check_block_size,
    check_dispatch_args,
    gather_rows,
    resolve_kernel,
)
from sigmoid_moe.blocked_ffn import block_layout, blocked_expert_ffn
from sigmoid_moe.dispatch import CapacityKernel, capacity, capacity_slots, combine_slots
from sigmoid_moe.experts import swiglu

__all__ = [
    "ExpertParallelOut",
    "all_to_all_bytes_minimum",
    "expert_parallel_capacity",
    "expert_parallel_moe",
    "ragged_all_to_all_available",
]


class ExpertParallelOut(NamedTuple):
    """What :func:`expert_parallel_moe` returns (global-view arrays)."""

    y_td: jax.Array  # [T, d_model] combined expert outputs, x_td's dtype, token-sharded
    dropped: jax.Array  # [] int32 assignments dropped by capacity, summed over the mesh
    expert_load: jax.Array  # [E] int32 global assignments per expert (unmasked), replicated


def ragged_all_to_all_available() -> bool:
    """Whether the backend implements ``jax.lax.ragged_all_to_all`` (not XLA:CPU)."""
    return jax.default_backend() in ("gpu", "tpu")


def expert_parallel_capacity(
    local_tokens: int, top_k: int, num_experts: int, capacity_factor: float | None
) -> int:
    """Slots per (sending device, expert): ``ceil(factor * T_l * k / E)``, or ``T_l``.

    ``capacity_factor=None`` means dropless: ``T_l`` slots, which no expert can overflow.
    """
    if capacity_factor is None:
        return max(1, local_tokens)
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


def _filled_slots_ffn(recv_nlcd, filled_nl, w_in_ldf, w_out_lfd, block_size: int):
    """Each filled slot's row through its local expert; empty slots give 0 (as SwiGLU(0)).

    Args:
      recv_nlcd: ``[n_src, E_l, C, d]`` received slot rows.
      filled_nl: ``[n_src, E_l]`` int32 filled slots per (sender, local expert); a
        sender fills its slots from the front.

    Returns:
      ``[n_src, E_l, C, d]`` expert outputs in the same slot order.
    """
    num_src, local_experts, slots, d_model = recv_nlcd.shape
    num_rows = num_src * local_experts * slots
    rows_rd = recv_nlcd.reshape(num_rows, d_model)
    # Row r = (s * E_l + l) * C + c; expert l's rows rank sender by sender.
    slot_c = jnp.arange(slots, dtype=jnp.int32)
    expert_r = jnp.broadcast_to(
        jnp.arange(local_experts, dtype=jnp.int32)[None, :, None], (num_src, local_experts, slots)
    )
    before_nl = jnp.cumsum(filled_nl, axis=0) - filled_nl  # filled rows of earlier senders
    rank_r = before_nl[:, :, None] + slot_c
    placed_r = slot_c < filled_nl[:, :, None]
    layout = block_layout(
        expert_r.reshape(-1),
        rank_r.reshape(-1),
        placed_r.reshape(-1),
        jnp.arange(num_rows, dtype=jnp.int32),  # each row is its own "token"
        jnp.ones((num_rows,), jnp.float32),  # combine weights apply at the sender
        jnp.sum(filled_nl, axis=0),
        num_tokens=num_rows,
        block_size=block_size,
        max_rows_per_expert=num_src * slots,
    )
    out_rd = blocked_expert_ffn(rows_rd, layout, w_in_ldf, w_out_lfd)
    return out_rd.reshape(num_src, local_experts, slots, d_model)


def _local_moe(
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
    capacity_factor: float | None,
    kernel: str,
    block_size: int,
):
    """The per-device body inside ``shard_map`` (all shapes are local).

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

    # Dispatch: chunk i goes to expert-axis member i; received chunk j came from member j.
    recv_nlcd = jax.lax.all_to_all(send_nlcd, expert_axis, 0, 0, tiled=True)
    w_in = w_in_ldf.astype(x_td.dtype)
    w_out = w_out_lfd.astype(x_td.dtype)
    if kernel == "blocked":
        filled_nl = jnp.minimum(placement.count_e, slots).reshape(num_shards, local_experts)
        recv_filled_nl = jax.lax.all_to_all(filled_nl, expert_axis, 0, 0, tiled=True)
        back_nlcd = _filled_slots_ffn(recv_nlcd, recv_filled_nl, w_in, w_out, block_size)
    else:
        x_lmd = recv_nlcd.transpose(1, 0, 2, 3).reshape(local_experts, num_shards * slots, d_model)
        h_lmf2 = jnp.einsum("lmd,ldf->lmf", x_lmd, w_in)
        o_lmd = jnp.einsum("lmf,lfd->lmd", swiglu(h_lmf2), w_out)
        back_nlcd = o_lmd.reshape(local_experts, num_shards, slots, d_model).transpose(1, 0, 2, 3)
    # Combine: the inverse exchange returns every row to its sender, in its slot order.
    out_nlcd = jax.lax.all_to_all(back_nlcd, expert_axis, 0, 0, tiled=True)

    y_td = combine_slots(
        out_nlcd.reshape(num_experts * slots, d_model), placement, weights_tk, x_td.dtype
    )
    # Integer psums: exact, so every replica holds the same global counts.
    load_e = jax.lax.psum(placement.count_e, token_axes)
    dropped = jax.lax.psum(placement.dropped, token_axes)
    return y_td, dropped, load_e


def expert_parallel_moe(
    x_td: jax.Array,
    expert_ids_tk: jax.Array,
    weights_tk: jax.Array,
    w_in_edf: jax.Array,
    w_out_efd: jax.Array,
    token_mask_t: jax.Array | None = None,
    *,
    mesh=None,
    expert_axis: str = "expert",
    capacity_factor: float | None = 1.25,
    kernel: CapacityKernel = "auto",
    block_size: int = 128,
) -> ExpertParallelOut:
    """Expert-parallel dispatch over ``mesh`` (see the module docstring for the data flow).

    Args:
      x_td: ``[T, d_model]`` tokens; ``T`` must divide evenly over all mesh devices.
      expert_ids_tk: ``[T, k]`` int32 global expert ids (from :func:`sigmoid_moe.route`).
      weights_tk: ``[T, k]`` float32 combine weights.
      w_in_edf: ``[E, d_model, 2*d_ff]``; ``E`` must divide by the expert-axis size.
      w_out_efd: ``[E, d_ff, d_model]``.
      token_mask_t: optional ``[T]`` bool, False for padding.
      mesh: a ``jax.sharding.Mesh``; default the one set by ``jax.set_mesh``.
      expert_axis: the mesh axis the experts are split over.
      capacity_factor: slots per (sender, expert) ``= ceil(factor * T_l * k / E)``;
        ``None`` for the drop-free ``T_l`` slots.
      kernel: the local experts' kernel: ``"batched"`` over every slot, ``"blocked"``
        over the filled slots, or ``"auto"`` (blocked on CPU, batched elsewhere).
      block_size: rows per block of the blocked kernel.

    Returns:
      :class:`ExpertParallelOut`; equal to :func:`sigmoid_moe.capacity_moe` /
      :func:`sigmoid_moe.dropless_moe` on one device whenever nothing is dropped.
    """
    check_dispatch_args(x_td, expert_ids_tk, weights_tk, w_in_edf, w_out_efd, token_mask_t)
    check_block_size(block_size)
    kernel = resolve_kernel(kernel, get_args(CapacityKernel), gpu_choice="batched")
    mesh = _resolve_mesh(mesh)
    if expert_axis not in mesh.axis_names:
        raise ValueError(
            f"expert_axis={expert_axis!r} is not an axis of the mesh {tuple(mesh.axis_names)}; "
            "build the mesh with sigmoid_moe.make_mesh(data=..., expert=...)."
        )
    num_tokens = x_td.shape[0]
    num_experts = w_in_edf.shape[0]
    num_shards = mesh.shape[expert_axis]
    num_devices = mesh.size
    if num_experts % num_shards:
        raise ValueError(
            f"mesh axis {expert_axis!r} has {num_shards} devices, which does not divide "
            f"num_experts={num_experts}; choose an expert-axis size that divides it."
        )
    if num_tokens % num_devices:
        raise ValueError(
            f"x_td has {num_tokens} tokens, not divisible by the mesh's {num_devices} devices "
            f"{dict(mesh.shape)}; pad the batch (token_mask=False) to a multiple of {num_devices}."
        )
    if token_mask_t is None:
        token_mask_t = jnp.ones((num_tokens,), bool)
    token_axes = tuple(mesh.axis_names)
    tok = P(token_axes)
    body = jax.shard_map(
        lambda *args: _local_moe(
            *args,
            expert_axis=expert_axis,
            num_shards=num_shards,
            token_axes=token_axes,
            capacity_factor=capacity_factor,
            kernel=kernel,
            block_size=block_size,
        ),
        mesh=mesh,
        in_specs=(tok, tok, tok, P(expert_axis), P(expert_axis), tok),
        out_specs=(tok, P(), P()),
    )
    y_td, dropped, load_e = body(
        x_td,
        expert_ids_tk.astype(jnp.int32),
        weights_tk,
        w_in_edf,
        w_out_efd,
        jnp.asarray(token_mask_t).astype(bool),
    )
    return ExpertParallelOut(y_td=y_td, dropped=dropped, expert_load=load_e)
