"""Sharding: the one logical-axis rules table, a mesh builder, and mesh/config checks.

Parameters carry *logical* axis names (:data:`sigmoid_moe.PARAM_AXES`) as flax 0.12
``out_sharding=`` metadata; :data:`DEFAULT_RULES` maps them onto the mesh axes
``("data", "expert")``. Typical use::

    mesh = make_mesh(data=2, expert=4)
    validate_mesh(mesh, config, num_tokens=batch * seq)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules_for_mesh(mesh)):
        model = nnx.jit(lambda: MyModel(config, rngs=nnx.Rngs(0)))()  # placed parameters
        ...                                      # train step under the same contexts

Pass your own ``rules`` (same format: ``(logical_name, mesh_axis | tuple | None)`` pairs)
to :func:`rules_for_mesh` to shard differently; names not in the rules are an error in
flax, so every logical name used by the layer must appear.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

if TYPE_CHECKING:
    from sigmoid_moe.layer import MoEConfig

__all__ = [
    "DATA_AXIS",
    "DEFAULT_RULES",
    "EXPERT_AXIS",
    "logical_sharding",
    "make_mesh",
    "rules_for_mesh",
    "validate_mesh",
]

DATA_AXIS = "data"
EXPERT_AXIS = "expert"

Rules = tuple[tuple[str, Any], ...]

# The one table. Tokens are split over every device (data parallel over "data"; inside an
# expert group each device routes its own tokens). Only the stacked expert weights are
# split over "expert". The router and the bias stay replicated: top-k needs all E scores
# of a token on one device, and every replica must hold the same bias.
DEFAULT_RULES: Rules = (
    ("activation_batch", (DATA_AXIS, EXPERT_AXIS)),
    ("activation_embed", None),
    ("embed", None),
    ("mlp", None),
    ("exp", EXPERT_AXIS),
    ("router_exp", None),
)


def make_mesh(
    data: int = 1, expert: int = 1, *, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A ``("data", "expert")`` mesh of ``data * expert`` devices (Auto axis types).

    Args:
      data: data-parallel replicas (each holds all experts, split over its expert group).
      expert: devices the experts are split over.
      devices: default ``jax.devices()`` (all processes' devices in a multi-host job).
    """
    for name, value in (("data", data), ("expert", expert)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"make_mesh({name}=...) must be an int, got {value!r}.")
        if value < 1:
            raise ValueError(f"make_mesh({name}={value}) must be >= 1.")
    devices = list(jax.devices() if devices is None else devices)
    if data * expert != len(devices):
        raise ValueError(
            f"make_mesh(data={data}, expert={expert}) needs data * expert = {data * expert} "
            f"devices, but {len(devices)} are available; choose sizes whose product is "
            f"{len(devices)} (e.g. data={max(1, len(devices) // expert)}, expert={expert}) or "
            "pass devices=[...]."
        )
    # Auto axes: flax places parameters with with_sharding_constraint and XLA propagates
    # the rest, so the single-device code needs no sharding annotations of its own.
    return jax.make_mesh(
        (data, expert), (DATA_AXIS, EXPERT_AXIS), (AxisType.Auto, AxisType.Auto), devices=devices
    )


def rules_for_mesh(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Rules:
    """``rules`` restricted to ``mesh``'s axes (a 1-D ``("expert",)`` mesh has no "data").

    Mesh axes named in a rule but absent from the mesh are dropped from that rule, so one
    table serves a ``(8,)`` expert-only mesh and a ``(2, 4)`` data x expert mesh alike.
    """
    names = set(mesh.axis_names)
    out = []
    for logical, target in rules:
        if not isinstance(logical, str):
            raise TypeError(f"rule names must be str, got {logical!r} in {rules!r}.")
        if target is None or isinstance(target, str):
            target = None if target not in names else target
        else:
            kept = tuple(axis for axis in target if axis in names)
            target = kept if len(kept) > 1 else (kept[0] if kept else None)
        out.append((logical, target))
    return tuple(out)


def logical_sharding(
    mesh: Mesh, logical_axes: Sequence[str | None], rules: Rules = DEFAULT_RULES
) -> NamedSharding:
    """The ``NamedSharding`` that ``rules`` give to an array with ``logical_axes``."""
    table = dict(rules_for_mesh(mesh, rules))
    missing = [a for a in logical_axes if a is not None and a not in table]
    if missing:
        raise ValueError(
            f"logical axes {missing} have no rule; add (name, mesh_axis_or_None) pairs to "
            f"the rules (known: {sorted(table)})."
        )
    return NamedSharding(mesh, P(*(None if a is None else table[a] for a in logical_axes)))


def validate_mesh(
    mesh: Mesh,
    config: MoEConfig,
    *,
    num_tokens: int | None = None,
    batch_size: int | None = None,
) -> None:
    """Raises ``ValueError`` if ``mesh`` cannot run ``config`` (or the given batch).

    Checks: the mesh has ``config.expert_axis``; its size divides ``num_experts``; the batch
    divides over the data axis; the tokens divide over all devices (each gets ``T / n``).
    """
    from sigmoid_moe.layer import MoEConfig  # circular at import time

    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}.")
    axis = config.expert_axis or EXPERT_AXIS
    if axis not in mesh.axis_names:
        raise ValueError(
            f"config.expert_axis={axis!r} is not an axis of the mesh {tuple(mesh.axis_names)}; "
            f"use make_mesh(data=..., expert=...) or set expert_axis to one of them."
        )
    shards = mesh.shape[axis]
    if config.num_experts % shards:
        divisors = [n for n in range(1, mesh.size + 1) if config.num_experts % n == 0]
        raise ValueError(
            f"mesh axis {axis!r} has size {shards}, which does not divide num_experts="
            f"{config.num_experts}; use an expert axis of size in {divisors}."
        )
    data = mesh.shape.get(DATA_AXIS, 1)
    if batch_size is not None and batch_size % data:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the mesh's data axis ({data}); "
            f"use a batch that is a multiple of {data} or a smaller data axis."
        )
    if num_tokens is not None and num_tokens % mesh.size:
        raise ValueError(
            f"num_tokens={num_tokens} is not divisible by the mesh's {mesh.size} devices "
            f"{dict(mesh.shape)}; every device routes num_tokens / {mesh.size} tokens, so pad "
            f"the batch (token_mask=False) to a multiple of {mesh.size}."
        )
