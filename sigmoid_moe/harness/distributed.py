"""The trainer on a device mesh, one process or several: placement, data slices, writers.

One training loop serves one device and a multi-host mesh. What changes on a mesh is only:

- the model is built under ``jax.set_mesh`` and the logical-axis rules
  (:data:`sigmoid_moe.DEFAULT_RULES`), so each parameter lands where its logical axes say
  (expert weights split over ``"expert"``, the rest replicated), and the MoE layers run
  expert parallel (``MoEConfig.expert_axis``) when the expert axis is larger than one;
- a batch is one global array split over every device along its batch axis, each process
  building only its own rows (:func:`global_batch`);
- values read back to the host are the replicated ones (:func:`fetch`), and files are
  written by process 0 only (:func:`is_writer`), while every process takes part in every
  computation and checkpoint.

The mesh is one value, :class:`~sigmoid_moe.MeshConfig`, checked once where it is given
(``TrainConfig``) and built here (:func:`run_mesh`). Multi-process runs start
``jax.distributed.initialize`` first (:mod:`sigmoid_moe.harness.multiprocess`); on CPU each
worker or process simulates its share of the devices
(:func:`sigmoid_moe.harness._process.set_up_cpu`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sigmoid_moe.sharding import DATA_AXIS, EXPERT_AXIS, MeshConfig, rules_for_mesh

__all__ = [
    "fetch",
    "global_batch",
    "is_writer",
    "mesh_context",
    "replicated",
    "run_mesh",
    "sync_processes",
]


def run_mesh(mesh: MeshConfig) -> jax.sharding.Mesh | None:
    """The ``jax.sharding.Mesh`` of ``mesh`` over every device of the job, or None for one
    device (no mesh)."""
    return None if mesh.size == 1 else mesh.make()


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh | None) -> Iterator[None]:
    """``jax.set_mesh(mesh)`` with the logical-axis rules; nothing for no mesh."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules_for_mesh(mesh)):
        yield


def _batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    axes = tuple(a for a in (DATA_AXIS, EXPERT_AXIS) if a in mesh.axis_names)
    return NamedSharding(mesh, P(axes))


def global_batch(
    rows: Callable[[int, int], np.ndarray],
    shape: tuple[int, ...],
    mesh: jax.sharding.Mesh | None,
) -> jax.Array | np.ndarray:
    """The global batch of ``shape``, split over every device of ``mesh`` along axis 0.

    ``rows(start, stop)`` builds rows ``start:stop`` of the global batch; each process
    calls it only for the rows its own devices hold (a contiguous block), so it reads only
    its own slice of the data. Without a mesh: ``rows(0, shape[0])``.
    """
    if mesh is None:
        return rows(0, shape[0])
    sharding = _batch_sharding(mesh)
    spans = sorted(
        {
            (idx[0].start or 0, idx[0].stop or shape[0])
            for idx in sharding.addressable_devices_indices_map(shape).values()
        }
    )
    start, stop = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != stop - start:  # the process's rows are one block
        raise ValueError(f"this process's batch rows {spans} are not contiguous.")
    return jax.make_array_from_process_local_data(sharding, rows(start, stop), shape)


def replicated(tree: Any) -> Any:
    """``tree`` constrained to be replicated on every device (inside jit, under a mesh)."""
    if jax.sharding.get_abstract_mesh().empty:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, P()), tree)


def fetch(tree: Any) -> Any:
    """Host NumPy copies of replicated arrays, on any process (its local copy)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def is_writer() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """Waits until every process of a multi-process job gets here (nothing for one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
