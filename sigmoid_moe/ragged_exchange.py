"""Ragged all-to-all: uneven numbers of rows between the devices of a mesh axis.

Pure array functions; no Flax. Called inside ``jax.shard_map``.

:func:`ragged_all_to_all` has the signature and semantics of ``jax.lax.ragged_all_to_all``
and picks its implementation when the program is lowered, by platform
(``jax.lax.platform_dependent``): the XLA collective on GPU and TPU, and on CPU, where
XLA:CPU has no ``ragged-all-to-all``, :func:`emulated_ragged_all_to_all`, built from the
all-gather / all-to-all of padded buffers that XLA:CPU has. A program lowered for
``platforms=("cuda",)`` on a CPU-only host (``jax.export``) so contains the real
collective, and everything around it (the sizes and offsets) is the code tested on CPU.
Both branches are traced (also under autodiff); the lowering keeps the platform's only.

Semantics (``jax.lax.ragged_all_to_all``; ``n`` devices on ``axis_name``, ``K`` slices
per device, ``K = n * per_device``): slice ``i`` of each device goes to device
``i // per_device``::

    for every sender s and slice i of s, with j = i // per_device and m = i % per_device:
        size = send_sizes_s[i]            # == recv_sizes_j[s * per_device + m]
        result_j[output_offsets_s[i] : + size] = operand_s[input_offsets_s[i] : + size]

and every row of ``result_j`` that no slice writes keeps the value of ``output_j``.
``output_offsets`` are offsets *on the receiver*; the receiver finds them as
``all_to_all(output_offsets)``. Only the rows of the slices travel; ``output`` is a
receive buffer, allocated on the receiver and never sent.

:func:`expert_exchange` computes the sizes and offsets of dropless expert parallelism
from each device's per-expert copy counts with two small all-to-alls (``3 E`` int32s
per device).

References:
  jax.lax.ragged_all_to_all (JAX docs); XLA ``RaggedAllToAll`` (openxla.org operation
  semantics). DeepSeek-V3 (arXiv 2412.19437), section 3.2: EP dispatch and combine.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sigmoid_moe._dispatch_common import gather_rows, vary, varying

__all__ = [
    "ExpertExchange",
    "dropless_receive_rows",
    "emulated_ragged_all_to_all",
    "expert_exchange",
    "ragged_all_to_all",
]


def _axis_names(axis_name) -> tuple:
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def _check_args(operand, output, offsets_and_sizes, axis_index_groups) -> None:
    if axis_index_groups is not None:
        raise ValueError(
            f"axis_index_groups={axis_index_groups!r} is not supported; split the mesh axis "
            "instead (a shard_map over a sub-axis exchanges within each group)."
        )
    if jnp.ndim(operand) < 1 or jnp.shape(operand)[1:] != jnp.shape(output)[1:]:
        raise ValueError(
            f"operand {jnp.shape(operand)} and output {jnp.shape(output)} must be [rows, ...] "
            "with the same trailing dimensions."
        )
    if jnp.result_type(operand) != jnp.result_type(output):
        raise TypeError(
            f"operand ({jnp.result_type(operand)}) and output ({jnp.result_type(output)}) "
            "must have the same dtype."
        )
    shapes = {name: jnp.shape(a) for name, a in offsets_and_sizes.items()}
    for name, array in offsets_and_sizes.items():
        if not jnp.issubdtype(jnp.result_type(array), jnp.integer):
            raise TypeError(f"{name} must be integer, got {jnp.result_type(array)}.")
    if len(set(shapes.values())) != 1 or len(shapes["input_offsets"]) != 1:
        raise ValueError(f"offsets and sizes must be 1-D of one length [K], got {shapes}.")


def emulated_ragged_all_to_all(
    operand: jax.Array,
    output: jax.Array,
    input_offsets: jax.Array,
    send_sizes: jax.Array,
    output_offsets: jax.Array,
    recv_sizes: jax.Array,
    *,
    axis_name,
    axis_index_groups=None,
) -> jax.Array:
    """``jax.lax.ragged_all_to_all`` from collectives XLA:CPU has (see the module docstring).

    The receiver gets every sender's rows for it in one padded buffer, then writes each
    received slice at its offset with one gather over its ``M`` output rows:

    * if the operand is no longer than the per-sender bound ``P = min(M, per_device * N)``
      (``N`` operand rows, ``M`` output rows), ``all_gather`` of the operands
      (``n * N`` rows per device);
    * otherwise each sender packs its slices for each receiver into ``P`` rows and one
      ``all_to_all`` exchanges them (``n * P`` rows per device).

    Either way a device receives ``n`` times the rows it would with the real collective
    on balanced traffic: this is a test and CPU implementation, not a fast one.

    Where the primitive's behaviour is undefined (slices overlapping in ``output``, sizes
    that disagree between sender and receiver, offsets out of range) this one writes no
    row outside ``output`` and reads none outside ``operand``; an output row belongs to
    the non-empty slice that starts last at or before it. Differentiable (reverse and
    forward mode) in ``operand`` and ``output`` through the collectives it is made of;
    operand rows sent twice get the sum of both cotangents.
    """
    offsets_and_sizes = {
        "input_offsets": input_offsets,
        "send_sizes": send_sizes,
        "output_offsets": output_offsets,
        "recv_sizes": recv_sizes,
    }
    _check_args(operand, output, offsets_and_sizes, axis_index_groups)
    names = _axis_names(axis_name)
    num_devices = math.prod(jax.lax.axis_size(name) for name in names)
    num_slices = jnp.shape(input_offsets)[0]
    if num_slices % num_devices:
        raise ValueError(
            f"offsets and sizes have {num_slices} slices, not a multiple of the "
            f"{num_devices} devices of axis {axis_name!r}."
        )
    per_device = num_slices // num_devices
    rows_in, rows_out = operand.shape[0], output.shape[0]
    input_offsets, send_sizes, output_offsets, recv_sizes = (
        jnp.asarray(a).astype(jnp.int32) for a in offsets_and_sizes.values()
    )

    def exchange(array):  # chunk j of every device to device j, tiled
        return jax.lax.all_to_all(array, names, 0, 0, tiled=True)

    # Received slice q = s * per_device + m: the m-th slice of sender s for me.
    land_q = exchange(output_offsets)
    sender_q = jnp.arange(num_slices, dtype=jnp.int32) // per_device
    bound = min(rows_out, per_device * rows_in)  # rows one sender can write here
    if rows_in <= bound:
        received = jax.lax.all_gather(operand, names, axis=0, tiled=True)  # [n * N, ...]
        read_q, stride = exchange(input_offsets), rows_in
    else:
        received = exchange(_pack(operand, input_offsets, send_sizes, num_devices, bound))
        sizes_sm = recv_sizes.reshape(num_devices, per_device)
        read_q = (jnp.cumsum(sizes_sm, axis=1) - sizes_sm).reshape(-1)  # packed in slice order
        stride = bound

    # For each output row, the last slice starting at or before it, then whether it covers it.
    row_r = jnp.arange(rows_out, dtype=jnp.int32)
    starts_q = jnp.where((recv_sizes > 0) & (land_q >= 0), land_q, rows_out)
    first_r = (
        jnp.full((rows_out,), -1, jnp.int32)
        .at[starts_q]
        .max(jnp.arange(num_slices, dtype=jnp.int32), mode="drop")
    )
    last_start_r = jax.lax.cummax(jnp.where(first_r >= 0, row_r, -1))
    q_r = first_r[jnp.maximum(last_start_r, 0)]
    offset_r = row_r - land_q[q_r]
    read_r = read_q[q_r] + offset_r
    hit_r = (last_start_r >= 0) & (offset_r < recv_sizes[q_r]) & (read_r >= 0) & (read_r < stride)
    src_r = jnp.where(hit_r, sender_q[q_r] * stride + read_r, num_devices * stride)
    hit = hit_r.reshape(rows_out, *([1] * (output.ndim - 1)))
    return jnp.where(hit, gather_rows(received, src_r), output)


def _pack(operand, input_offsets, send_sizes, num_devices: int, bound: int):
    """``[n * bound, ...]``: per receiver ``j``, its slices' rows back to back, zero-padded."""
    rows_in = operand.shape[0]
    sizes_jm = send_sizes.reshape(num_devices, -1)
    per_device = sizes_jm.shape[1]
    end_jm = jnp.cumsum(sizes_jm, axis=1)
    row_p = jnp.arange(bound, dtype=jnp.int32)
    slice_jp = jax.vmap(lambda end_m: jnp.searchsorted(end_m, row_p, side="right"))(end_jm)
    packed_jp = slice_jp < per_device  # past the last slice: padding
    slice_jp = jnp.minimum(slice_jp, per_device - 1).astype(jnp.int32)
    start_jp = jnp.take_along_axis(end_jm - sizes_jm, slice_jp, axis=1)
    first_jp = input_offsets.reshape(num_devices, per_device)
    src_jp = jnp.take_along_axis(first_jp, slice_jp, axis=1) + row_p - start_jp
    src_jp = jnp.where(packed_jp & (src_jp >= 0) & (src_jp < rows_in), src_jp, rows_in)
    return gather_rows(operand, src_jp.reshape(-1))


def ragged_all_to_all(
    operand: jax.Array,
    output: jax.Array,
    input_offsets: jax.Array,
    send_sizes: jax.Array,
    output_offsets: jax.Array,
    recv_sizes: jax.Array,
    *,
    axis_name,
    axis_index_groups=None,
) -> jax.Array:
    """``jax.lax.ragged_all_to_all`` on GPU/TPU, :func:`emulated_ragged_all_to_all` on CPU.

    The choice is made when lowering, for the platform lowered for, so
    ``jax.export(..., platforms=("cuda",))`` on a CPU host gets the XLA collective (export
    it with ``disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(
    "ragged_all_to_all")]``: that custom call has no compatibility guarantee).

    Args:
      operand: ``[N, ...]`` rows to send, sliced by ``input_offsets`` / ``send_sizes``.
      output: ``[M, ...]`` receive buffer; rows no slice writes keep its value.
      input_offsets, send_sizes: ``[K]`` int, slice ``i`` goes to device
        ``i // (K / n)`` of ``axis_name``.
      output_offsets: ``[K]`` int, where slice ``i`` lands *on its receiver*.
      recv_sizes: ``[K]`` int, rows received per slice, ``q = sender * (K / n) + m``;
        must equal ``all_to_all(send_sizes)``.
      axis_name: the mesh axis (or tuple of axes) to exchange over.
      axis_index_groups: must be None.

    Returns:
      ``[M, ...]``: ``output`` with the received slices written in.
    """
    offsets_and_sizes = {
        "input_offsets": input_offsets,
        "send_sizes": send_sizes,
        "output_offsets": output_offsets,
        "recv_sizes": recv_sizes,
    }
    _check_args(operand, output, offsets_and_sizes, axis_index_groups)
    # The result differs per device: say so (a fresh zeros buffer varies over no axis).
    axes = varying(operand) | frozenset(_axis_names(axis_name))
    ints = [jnp.asarray(a).astype(jnp.int32) for a in offsets_and_sizes.values()]
    args = [vary(a, axes) for a in (operand, output, *ints)]

    def native(*args):
        return jax.lax.ragged_all_to_all(*args, axis_name=axis_name)

    def emulated(*args):
        return emulated_ragged_all_to_all(*args, axis_name=axis_name)

    return jax.lax.platform_dependent(*args, cpu=emulated, default=native)


# --------------------------------------------------------------------------- expert exchange


def dropless_receive_rows(
    local_tokens: int, top_k: int, num_shards: int, local_experts: int | None = None
) -> int:
    """Rows of a device's receive buffer in dropless EP: ``n * T_l * min(E_l, k)``.

    The static worst case: every sender's ``T_l`` tokens each send this device as many
    rows as they can, one per distinct local expert they chose, so at most
    ``min(E_l, k)`` (a token that lists an expert twice sends one row for both copies).
    ``local_experts=None`` means at least ``k``. The buffer is allocated, not sent: the
    exchange moves only the rows routed here (``T_l * k`` per device on average).
    """
    per_token = top_k if local_experts is None else min(local_experts, top_k)
    return max(1, num_shards * local_tokens * per_token)


class ExpertExchange(NamedTuple):
    """Sizes and offsets of the dropless EP exchange on one device.

    The sender's copies are sorted by global expert ``e = owner * E_l + l``; the
    receive buffer holds the received rows grouped by local expert, senders in order
    within an expert. Slices are indexed like ``ragged_all_to_all``'s: by global expert
    ``e`` on the sending side, by ``q = sender * E_l + l`` on the receiving side.
    """

    send_offsets_e: jax.Array  # [E] int32 first row of expert e's copies in my send buffer
    send_sizes_e: jax.Array  # [E] int32 my copies routed to expert e
    land_offsets_e: jax.Array  # [E] int32 where they land in expert e's owner's buffer
    recv_sizes_q: jax.Array  # [E] int32 rows from sender s for my local expert l
    recv_offsets_q: jax.Array  # [E] int32 where those rows sit in my receive buffer
    origin_offsets_q: jax.Array  # [E] int32 where they sat in sender s's send buffer
    group_sizes_l: jax.Array  # [E_l] int32 received rows per local expert


def expert_exchange(count_e: jax.Array, axis_name) -> ExpertExchange:
    """The exchange plan from this device's per-expert copy counts ``count_e [E]``.

    One all-to-all gives each device, per sender, the counts and send-buffer offsets for
    its local experts; it lays the rows out expert-major (sender-minor) and a second
    all-to-all tells each sender where its rows land: ``3 E`` int32s per device.
    """
    names = _axis_names(axis_name)
    num_shards = math.prod(jax.lax.axis_size(name) for name in names)
    count_e = count_e.astype(jnp.int32)
    local_experts = count_e.shape[0] // num_shards
    send_offsets_e = jnp.cumsum(count_e) - count_e
    # Tiled over the expert axis: chunk j (experts of device j) goes to device j.
    recv_sizes_q, origin_offsets_q = jax.lax.all_to_all(
        jnp.stack([count_e, send_offsets_e]), names, 1, 1, tiled=True
    )
    recv_sl = recv_sizes_q.reshape(num_shards, local_experts)
    group_sizes_l = jnp.sum(recv_sl, axis=0)
    group_start_l = jnp.cumsum(group_sizes_l) - group_sizes_l
    recv_offsets_q = (group_start_l + jnp.cumsum(recv_sl, axis=0) - recv_sl).reshape(-1)
    land_offsets_e = jax.lax.all_to_all(recv_offsets_q, names, 0, 0, tiled=True)
    return ExpertExchange(
        send_offsets_e=send_offsets_e,
        send_sizes_e=count_e,
        land_offsets_e=land_offsets_e,
        recv_sizes_q=recv_sizes_q,
        recv_offsets_q=recv_offsets_q,
        origin_offsets_q=origin_offsets_q,
        group_sizes_l=group_sizes_l,
    )
