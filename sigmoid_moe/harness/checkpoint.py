"""Orbax checkpoints of the whole training state.

A checkpoint at step ``N`` holds, as flat lists of arrays: the parameters, the optax
state (AdamW moments and the schedule's step count), the routing biases, and
``step`` / ``data_position`` scalars. Lists are restored into the structure of a freshly
initialised state, so nothing but arrays is serialised. Orbax writes each step to a
temporary folder and renames it when complete, so a run killed mid-save still leaves
the previous checkpoint usable.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer"]


class Checkpointer:
    """Saves and restores ``{name: pytree}`` training states under ``directory``."""

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 2):
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Writes ``state`` (a dict of pytrees of arrays) as checkpoint ``step``."""
        flat = {name: _to_arrays(tree) for name, tree in state.items()}
        self._manager.save(step, args=ocp.args.StandardSave(flat), force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, like: dict[str, Any]) -> dict[str, Any]:
        """Checkpoint ``step`` in the structure of ``like`` (same keys, same pytrees)."""
        flat = {name: _to_arrays(tree) for name, tree in like.items()}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, flat)
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        out = {}
        for name, tree in like.items():
            leaves, treedef = jax.tree.flatten(tree)
            new = restored[name]
            if not isinstance(new, list):
                new = [new[k] for k in sorted(new, key=int)] if isinstance(new, dict) else [new]
            out[name] = jax.tree.unflatten(
                treedef, [_like(n, leaf) for n, leaf in zip(new, leaves, strict=True)]
            )
        return out

    def close(self) -> None:
        self._manager.close()


def _like(value: Any, leaf: Any) -> Any:
    if isinstance(leaf, np.ndarray):
        return np.asarray(value, leaf.dtype)
    return jax.numpy.asarray(value, leaf.dtype)


def _to_arrays(tree: Any) -> list:
    return [np.asarray(leaf) if np.isscalar(leaf) else leaf for leaf in jax.tree.leaves(tree)]
