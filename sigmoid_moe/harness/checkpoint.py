"""Orbax checkpoints of the whole training state, verified by sha256 before every restore.

A checkpoint at step ``N`` holds the parameters, the optax state (AdamW moments and the
schedule's step count), the routing biases, and ``step`` / ``data_position`` scalars, each
array under its pytree path (``params.blocks.0.moe.bias_e.value``), so nothing but arrays
and their names is serialised. Restoring joins the saved arrays to a freshly initialised
state by those paths, never by position: a checkpoint whose paths or shapes differ from
the model's is refused, naming the first paths that differ.

Integrity: after orbax has written and renamed step ``N``'s folder, :meth:`Checkpointer.save`
records the size and sha256 of every file in it in ``N/sha256.json`` (written to a temporary
name, then renamed). :meth:`Checkpointer.restore` recomputes them first and refuses a
checkpoint with a missing manifest (its save never finished), a missing or shorter file
(truncated) or a changed byte (corrupt), naming the file, so garbage never reaches the
model. Beyond the manifest, a restore fails for any error orbax raises (mapped to
:class:`~sigmoid_moe.errors.CheckpointError`, never a traceback) and for a value that is not
finite, and :meth:`Checkpointer.restore_latest` takes a caller's check of the restored state
too (the trainer reproduces a loss saved with it). It falls back to the newest checkpoint
that passes everything, with one :class:`~sigmoid_moe.errors.RecoveryWarning` per skipped
step (whose folder it then deletes: training will write that step again); when none passes
it raises :class:`~sigmoid_moe.errors.CheckpointError` naming each step's problem and
``--no-resume``. A state is restored into the shardings of the state it is given, so a
checkpoint written on one mesh resumes on another.

A save never holds a NaN or an infinity (:class:`~sigmoid_moe.errors.NonFiniteError`, naming
the leaf), and Ctrl-C or SIGTERM during a save is held until the save is complete, so it
leaves a whole checkpoint and no half-closed orbax event loop behind. In a multi-process
job every process writes its shards and process 0 writes the manifest once all are done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import signal
import threading
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sigmoid_moe.errors import CheckpointError, NonFiniteError, RecoveryWarning
from sigmoid_moe.harness.distributed import fetch, is_writer, sync_processes
from sigmoid_moe.harness.run_files import unique_temp_name

__all__ = ["MANIFEST", "Checkpointer"]

MANIFEST = "sha256.json"
_FORMAT = "sigmoid-moe checkpoint sha256 v1"


class Checkpointer:
    """Saves and restores ``{name: pytree}`` training states under ``directory``."""

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 2):
        self.directory = pathlib.Path(directory).absolute()
        self._max_to_keep = max_to_keep
        self._orbax: ocp.CheckpointManager | None = None

    @property
    def _manager(self) -> ocp.CheckpointManager:
        # Created on first use, so a corrupt folder is verified before orbax reads it.
        if self._orbax is None:
            self._orbax = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=self._max_to_keep, enable_async_checkpointing=False, create=True
                ),
                item_handlers=ocp.StandardCheckpointHandler(),  # so item_metadata reads trees
            )
        return self._orbax

    def steps(self) -> list[int]:
        """Steps with a checkpoint folder, ascending (verified or not)."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if _is_step_dir(p))

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Writes ``state`` (a dict of pytrees of arrays) as checkpoint ``step`` with its
        sha256 manifest; refuses non-finite floating-point leaves."""
        _require_finite(step, state)
        keyed = {name: _by_path(tree) for name, tree in state.items()}
        with _signals_held():
            self._manager.save(step, args=ocp.args.StandardSave(keyed), force=True)
            self._manager.wait_until_finished()
            # Every process wrote its shards; one writes the manifest, once all are done.
            sync_processes(f"checkpoint {step} saved")
            if is_writer():
                _write_manifest(self.directory / str(step), step)
            sync_processes(f"checkpoint {step} manifest")

    def verify(self, step: int) -> None:
        """Raises :class:`CheckpointError` naming the first file of checkpoint ``step`` that
        is missing, truncated or changed since it was saved."""
        problem = _manifest_problem(self.directory / str(step), step)
        if problem:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is {problem}.")

    def restore(self, step: int, like: dict[str, Any]) -> dict[str, Any]:
        """Checkpoint ``step`` in the structure of ``like`` (same keys, same pytrees),
        verified first (:meth:`verify`)."""
        self.verify(step)
        return self._restore_verified(step, like)

    def _restore_verified(self, step: int, like: dict[str, Any]) -> dict[str, Any]:
        state, problem = self._restore_checked(step, like)
        if problem is not None:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} {problem}; start over with "
                "--no-resume (resume=False)."
            )
        return state

    def _restore_checked(self, step: int, like: dict[str, Any]) -> tuple[Any, str | None]:
        """``(state, None)``: checkpoint ``step`` (its manifest verified) in ``like``'s
        structure, dtypes and shardings; or ``(None, problem)`` for any failure, a value
        that is not finite included (no save writes one, so the data are corrupt)."""
        keyed = {name: _by_path(tree) for name, tree in like.items()}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, keyed)
        try:
            _check_fits(self._manager.item_metadata(step), abstract)
        except (ValueError, TypeError, KeyError) as err:
            return None, (
                f"passed its sha256 check but does not fit this model ({_first_line(err)}); "
                "it was written by another version"
            )
        try:
            # Into the shardings of ``like``: a checkpoint of another mesh is resharded.
            restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
            state = _rebuild(restored, like)
        except Exception as err:  # orbax and tensorstore raise bare Exceptions (ZSTD ...)
            return None, f"passed its sha256 check but cannot be read ({_first_line(err)})"
        bad = _non_finite_leaves(state)
        if bad:
            return None, f"is corrupt ({bad[0]}, which no save writes)"
        return state, None

    def restore_latest(
        self,
        like: dict[str, Any],
        check: Callable[[int, dict[str, Any]], str | None] | None = None,
    ) -> tuple[int, dict[str, Any]] | None:
        """``(step, state)`` of the newest checkpoint that can be trusted, or None when
        there is none at all.

        A checkpoint is trusted when it passes :meth:`verify`, restores (:meth:`restore`:
        it fits the model and every value is finite) and passes ``check(step, state)``,
        which returns None for a sound state, else what is wrong with it (e.g. ``"gives
        loss 5.5 on its next batch, not 3.6"``). Newer checkpoints that fail are reported
        (one :class:`RecoveryWarning` each) and deleted; if every one fails, raises
        :class:`CheckpointError` naming each step's problem.
        """
        sync_processes("checkpoints listed")  # every process sees the same steps
        steps = self.steps()
        if not steps:
            return None
        bad: list[tuple[int, str]] = []
        for step in reversed(steps):
            problem = _manifest_problem(self.directory / str(step), step)
            if problem is not None:
                problem = f"is {problem}"
            else:
                state, problem = self._restore_checked(step, like)
                if problem is None and check is not None:
                    problem = check(step, state)
            if problem is not None:
                bad.append((step, problem))
                continue
            for bad_step, problem in bad:
                warnings.warn(
                    f"checkpoint step {bad_step} in {self.directory} {problem}; resuming "
                    f"from step {step} and deleting step {bad_step}.",
                    RecoveryWarning,
                    stacklevel=2,
                )
                if is_writer():
                    shutil.rmtree(self.directory / str(bad_step))
            sync_processes(f"checkpoints before {step} checked")
            if bad and self._orbax is not None:
                self._manager.reload()
            return step, state
        reasons = "; ".join(f"step {s} {problem}" for s, problem in bad)
        raise CheckpointError(
            f"no checkpoint in {self.directory} can be trusted ({reasons}); start over with "
            "--no-resume (resume=False)."
        )

    def close(self) -> None:
        if self._orbax is not None:
            self._orbax.close()
            self._orbax = None


def _is_step_dir(path: pathlib.Path) -> bool:
    return path.is_dir() and path.name.isdigit()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


def _file_digests(folder: pathlib.Path) -> dict[str, dict]:
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name != MANIFEST:
            out[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return out


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: pathlib.Path, step: int) -> None:
    manifest = {"format": _FORMAT, "step": step, "files": _file_digests(folder)}
    tmp = unique_temp_name(folder / MANIFEST)
    with tmp.open("x") as file:
        file.write(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)


def _manifest_problem(folder: pathlib.Path, step: int) -> str | None:
    """What is wrong with ``folder`` against its manifest, or None when it verifies."""
    if not folder.is_dir():
        return "missing"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        ok = manifest["format"] == _FORMAT and manifest["step"] == step and files
        if not ok or not all({"bytes", "sha256"} <= set(v) for v in files.values()):
            raise ValueError
    except FileNotFoundError:
        return f"incomplete ({MANIFEST} is missing: its save never finished)"
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
        return f"corrupt ({MANIFEST} is unreadable)"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"truncated ({name} is missing)"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"truncated or corrupt ({name} has {size} bytes, {want['bytes']} were saved)"
        if _sha256(path) != want["sha256"]:
            return f"corrupt ({name} fails its sha256 check)"
    return None


@jax.jit
def _non_finite_counts(leaves: list) -> list:
    """Non-finite values in each leaf: one compiled program for the whole state (op by op,
    every leaf shape compiled three primitives of its own). A global reduction, so a leaf
    sharded over several processes is checked whole."""
    return [jnp.sum(~jnp.isfinite(leaf)) for leaf in leaves]


def _non_finite_leaves(state: dict[str, Any]) -> list[str]:
    """``"['params']['w'] holds 2 non-finite value(s)"`` for each floating leaf of
    ``state`` that holds a NaN or an infinity."""
    inexact = [
        (path, leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    counts = fetch(_non_finite_counts([leaf for _, leaf in inexact]))
    return [
        f"{jax.tree_util.keystr(path)} holds {int(bad)} non-finite value(s)"
        for (path, _), bad in zip(inexact, counts, strict=True)
        if int(bad)
    ]


def _require_finite(step: int, state: dict[str, Any]) -> None:
    bad = _non_finite_leaves(state)
    if bad:
        raise NonFiniteError(f"step {step}: {bad[0]}; refusing to save it as a checkpoint.")


_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _signals_held():
    """Holds a first Ctrl-C, SIGTERM or SIGHUP until the block is done, then delivers it
    again to the handler that was in place (``KeyboardInterrupt``, the command line's
    :class:`~sigmoid_moe.errors.Terminated`, or the default action); a second signal
    interrupts at once. Ignored signals stay ignored. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.getsignal(s) for s in _HELD_SIGNALS}
    held = [s for s, handler in previous.items() if handler is not signal.SIG_IGN]

    def restore() -> None:
        for signum in held:
            handler = previous[signum]
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    def hold(signum, frame):
        received.append(signum)
        if len(received) > 1:  # a second one: to the handler in place, now
            restore()
            signal.raise_signal(signum)

    for signum in held:
        signal.signal(signum, hold)
    try:
        yield
    finally:
        restore()
    if received:
        signal.raise_signal(received[0])


def _key_name(entry: Any) -> str:
    """One pytree path entry as a checkpoint key (dict key, attribute or list index)."""
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def _by_path(tree: Any) -> Any:
    """``tree``'s array leaves in nested dicts keyed by their path entries (a bare leaf
    stays a leaf), the form every checkpoint is written and read in."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if len(leaves) == 1 and not leaves[0][0]:
        return _array(leaves[0][1])
    out: dict = {}
    for path, leaf in leaves:
        node = out
        *parents, last = [_key_name(entry) for entry in path]
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = _array(leaf)
    return out


def _shapes(tree: Any) -> dict[str, tuple]:
    """``{dotted path: shape}`` of a keyed tree (arrays, abstract arrays or metadata)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(map(_key_name, path)): tuple(leaf.shape) for path, leaf in leaves}


def _check_fits(metadata: Any, abstract: dict) -> None:
    """Raises ValueError naming the first paths where the saved tree and the model differ."""
    saved, wanted = _shapes(getattr(metadata, "tree", metadata)), _shapes(abstract)

    def first(names):
        names = sorted(names)
        return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")

    if saved.keys() != wanted.keys():
        parts = []
        if saved.keys() - wanted.keys():
            parts.append(f"it holds {first(saved.keys() - wanted.keys())}, which the model lacks")
        if wanted.keys() - saved.keys():
            parts.append(f"the model wants {first(wanted.keys() - saved.keys())}, not saved")
        raise ValueError("; ".join(parts))
    for name in sorted(wanted):
        if saved[name] != wanted[name]:
            raise ValueError(f"{name} has shape {saved[name]}, the model wants {wanted[name]}")


def _rebuild(restored: dict, like: dict[str, Any]) -> dict[str, Any]:
    """``restored`` (keyed by path) in the pytree structure and dtypes of ``like``."""
    out = {}
    for name, tree in like.items():
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        values = []
        for path, leaf in leaves:
            value = restored[name]
            for entry in path:
                value = value[_key_name(entry)]
            values.append(_like(value, leaf))
        out[name] = jax.tree.unflatten(treedef, values)
    return out


def _like(value: Any, leaf: Any) -> Any:
    if isinstance(leaf, np.ndarray):
        return np.asarray(value, leaf.dtype)
    return jax.numpy.asarray(value, leaf.dtype)


def _array(leaf: Any) -> Any:
    return np.asarray(leaf) if np.isscalar(leaf) else leaf
