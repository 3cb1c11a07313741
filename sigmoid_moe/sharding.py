"""Sharding: the one logical-axis rules table, the mesh value, and the mesh/config check.

Parameters carry *logical* axis names (:data:`sigmoid_moe.PARAM_AXES`) as flax 0.12
``out_sharding=`` metadata; :data:`DEFAULT_RULES` maps them onto the mesh axes
``("data", "expert")``. A mesh is one value, :class:`MeshConfig` (its sizes), from the
command line to the layer: it checks itself against a :class:`~sigmoid_moe.MoEConfig` and a
batch, builds the ``jax.sharding.Mesh``, and names the layer's ``expert_axis``. Typical use::

    mesh_config = MeshConfig(data=2, expert=4)
    config = dataclasses.replace(config, expert_axis=mesh_config.expert_axis)
    mesh_config.validate(config, batch_size=batch, num_tokens=batch * seq)
    mesh = mesh_config.make()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules_for_mesh(mesh)):
        model = nnx.jit(lambda: MyModel(config, rngs=nnx.Rngs(0)))()  # placed parameters
        ...                                      # train step under the same contexts

A mesh with other axes (a 1-D ``("expert",)`` mesh, custom names) is checked by
:func:`validate_mesh`, the same check. Pass your own ``rules`` (same format:
``(logical_name, mesh_axis | tuple | None)`` pairs) to :func:`rules_for_mesh` to shard
differently; names not in the rules are an error in flax, so every logical name used by
the layer must appear.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sigmoid_moe._checks import require_int
from sigmoid_moe.config import MoEConfig

__all__ = [
    "DATA_AXIS",
    "DEFAULT_RULES",
    "EXPERT_AXIS",
    "MeshConfig",
    "check_expert_axis",
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


def check_expert_axis(shape: Mapping[str, int], axis: str, num_experts: int) -> int:
    """The size of mesh axis ``axis`` (``shape``: axis name -> size), which must exist and
    divide ``num_experts`` (each device along it holds ``num_experts / size`` experts);
    raises ``ValueError`` naming the axis and the sizes that would do."""
    if axis not in shape:
        raise ValueError(
            f"expert_axis={axis!r} is not an axis of the mesh {tuple(shape)}; build the mesh "
            "with sigmoid_moe.make_mesh(data=..., expert=...) or set expert_axis to one of them."
        )
    shards = shape[axis]
    if num_experts % shards:
        divisors = [n for n in range(1, num_experts + 1) if num_experts % n == 0]
        raise ValueError(
            f"mesh axis {axis!r} has {shards} devices, which does not divide num_experts="
            f"{num_experts}; use an expert axis of size in {divisors}."
        )
    return shards


def _check_mesh(
    shape: Mapping[str, int],
    config: MoEConfig,
    batch_size: int | None,
    num_tokens: int | None,
    rules: Rules = DEFAULT_RULES,
) -> None:
    """The one mesh/config check (:func:`validate_mesh`, :meth:`MeshConfig.validate`)."""
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}.")
    for name, value in (("batch_size", batch_size), ("num_tokens", num_tokens)):
        if value is not None:
            require_int(name, value, 0)
    # The expert weights are split over the axis "exp" maps to, and expert parallelism
    # (config.expert_axis) splits the experts over its own axis: both must divide E.
    table = dict(rules)
    axes = {config.expert_axis} if config.expert_axis is not None else set()
    if isinstance(table.get("exp"), str) and table["exp"] in shape:
        axes.add(table["exp"])
    for axis in sorted(axes):
        check_expert_axis(shape, axis, config.num_experts)
    batch_axes = table.get("activation_batch")
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
    batch_devices = math.prod(shape[a] for a in batch_axes if a in shape)
    if batch_size is not None and batch_size % batch_devices:
        raise ValueError(
            f"batch_size={batch_size} does not split over the {batch_devices} devices of the "
            f"mesh axes {[a for a in batch_axes if a in shape]} that the rules split the batch "
            f"over; use a batch that is a multiple of {batch_devices}."
        )
    devices = math.prod(shape.values())
    if num_tokens is not None and num_tokens % devices:
        raise ValueError(
            f"num_tokens={num_tokens} is not divisible by the mesh's {devices} devices "
            f"{dict(shape)}; every device routes num_tokens / {devices} tokens, so pad "
            f"the batch (token_mask=False) to a multiple of {devices}."
        )


def validate_mesh(
    mesh: Mesh,
    config: MoEConfig,
    *,
    num_tokens: int | None = None,
    batch_size: int | None = None,
) -> None:
    """Raises ``ValueError`` if ``mesh`` cannot run ``config`` (or the given batch).

    Checks: the mesh has ``config.expert_axis``; the size of that axis, and of the axis
    :data:`DEFAULT_RULES` split the expert weights over, divides ``num_experts``; the batch
    (``batch_size`` rows) splits over the axes the rules split it over (``"data"`` and
    ``"expert"``); the tokens divide over all devices (each routes ``T / n``). Sizes are
    ints ``>= 0``. :meth:`MeshConfig.validate` is the same check for a mesh value.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    _check_mesh(dict(mesh.shape), config, batch_size, num_tokens)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """A ``("data", "expert")`` device mesh by its sizes: the one mesh value.

    It travels from the command line (``--mesh data=2,expert=4``, :meth:`parse`) through the
    trainer's config and the worker and process start-up (:attr:`size`, :meth:`local_devices`)
    to the layer (:attr:`expert_axis`, :meth:`make`); :meth:`validate` checks it against a
    layer config and a batch once, where it is given.

    Attributes:
      data: data-parallel replicas (each holds all experts, split over its expert group).
      expert: devices the experts are split over (expert parallelism when > 1).
    """

    data: int = 1
    expert: int = 1

    def __post_init__(self) -> None:
        require_int("mesh data size", self.data, 1)
        require_int("mesh expert size", self.expert, 1)

    @property
    def size(self) -> int:
        """Devices of the mesh, ``data * expert``."""
        return self.data * self.expert

    @property
    def expert_axis(self) -> str | None:
        """The layer's ``MoEConfig.expert_axis`` on this mesh: ``"expert"`` when the
        experts are split (``expert > 1``), else None (every device holds every expert)."""
        return EXPERT_AXIS if self.expert > 1 else None

    def __str__(self) -> str:
        return f"data={self.data},expert={self.expert}"

    @classmethod
    def parse(cls, text: str) -> MeshConfig:
        """``"data=D,expert=E"`` (either part may be left out: size 1) as a mesh value.

        Raises ``ValueError`` for an empty text, an unknown or repeated name, or a size that
        is not an int ``>= 1``.
        """
        form = "data=D,expert=E with sizes >= 1 (e.g. data=2,expert=4)"
        parts = [p.strip() for p in str(text).split(",")]
        if not any(parts):
            raise ValueError(f"expected {form}, got {text!r}")
        sizes: dict[str, int] = {}
        for part in parts:
            name, sep, value = part.partition("=")
            digits = value.isascii() and value.isdigit()
            if not sep or name not in ("data", "expert") or not digits or int(value) < 1:
                raise ValueError(f"expected {form}, got {text!r}")
            if name in sizes:
                raise ValueError(f"{name!r} is given twice in {text!r}; expected {form}")
            sizes[name] = int(value)
        return cls(**sizes)

    def validate(
        self, config: MoEConfig, *, batch_size: int | None = None, num_tokens: int | None = None
    ) -> None:
        """Raises ``ValueError`` if this mesh cannot run ``config`` on the given batch:
        the expert axis must divide ``num_experts``, ``batch_size`` rows must split over
        every device (the rules split the batch over ``"data"`` and ``"expert"``) and
        ``num_tokens`` too (see :func:`validate_mesh`, the same check)."""
        _check_mesh(
            {DATA_AXIS: self.data, EXPERT_AXIS: self.expert}, config, batch_size, num_tokens
        )

    def local_devices(self, num_processes: int) -> int:
        """Each process's share of the devices in a job of ``num_processes`` processes;
        ``ValueError`` unless they divide :attr:`size`."""
        require_int("num_processes", num_processes, 1)
        if self.size % num_processes:
            raise ValueError(
                f"{num_processes} processes need a mesh whose devices divide over them (each "
                f"gets its share), got {self.size} device(s) ({self}); e.g. "
                f"data={2 * num_processes},expert=2."
            )
        return self.size // num_processes

    def make(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
        """The ``jax.sharding.Mesh`` (:func:`make_mesh`) over ``devices`` (default every
        device of the job)."""
        return make_mesh(self.data, self.expert, devices=devices)
