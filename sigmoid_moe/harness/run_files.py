"""The files of a run folder, read strictly and repaired only where a crash explains it.

- A run folder has one writer: :func:`run_folder_lock` takes an exclusive lock on its
  ``.lock`` file and refuses a second writer with
  :class:`~sigmoid_moe.errors.RunFolderBusyError` naming the folder and the holder's pid.
  The lock is the kernel's (``flock``), so it ends with its process however that ends: a
  lock left by a dead process is stale and the next writer simply takes it.
- ``config.json`` / ``data.json`` are written to a unique temporary name and renamed, so a
  crash never leaves half a file; reading one that is missing or not JSON raises
  :class:`~sigmoid_moe.errors.RunFileError` naming it.
- ``metrics.jsonl`` / ``eval.jsonl`` hold one JSON object per line with an increasing
  ``step``. The only damage a crash can do is an unterminated last line: on resume it is
  dropped (one :class:`~sigmoid_moe.errors.RecoveryWarning`) and the log is cut back to the
  checkpoint's step. Any other bad line is an error naming the file and the line.
- Resuming compares the corpus manifest (every file's domain, size and sha256) with the
  saved ``data.json`` and refuses a different corpus unless explicitly allowed
  (:class:`~sigmoid_moe.errors.DataChangedError`).
- :func:`require_finite` stops a run at the first step whose metrics hold a NaN or an
  infinity (:class:`~sigmoid_moe.errors.NonFiniteError`), before that step is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from sigmoid_moe.errors import (
    DataChangedError,
    NonFiniteError,
    RecoveryWarning,
    RunFileError,
    RunFolderBusyError,
)

__all__ = [
    "LOCK_FILE",
    "check_same_data",
    "read_json",
    "read_jsonl",
    "require_finite",
    "run_folder_lock",
    "truncate_jsonl",
    "unique_temp_name",
    "write_json",
]

START_OVER = "start over with --no-resume (resume=False)"
LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_folder_lock(folder: str | os.PathLike, what: str = "run folder") -> Iterator[None]:
    """Holds ``folder``'s writer lock inside (creating the folder if needed); raises
    :class:`RunFolderBusyError` (naming ``what``, the folder and the holder's pid) when
    another process holds it.

    ``flock`` on ``folder/.lock``: released by the kernel when the holder exits or dies, so
    a stale lock needs no clean-up. The file stays (holding the pid of the current or last
    holder); another lock on it, even from this process, is refused.
    """
    pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
    fd = os.open(pathlib.Path(folder) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            raise RunFolderBusyError(
                f"{what} {str(folder)!r} is in use by another sigmoid-moe run ({holder}); wait "
                "for it to finish, or pass another folder."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _lock_holder(fd: int) -> str:
    """``"pid N"`` from a held lock file (the holder writes it just after locking)."""
    for _ in range(50):
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if text.isdigit():
            return f"pid {text}"
        time.sleep(0.01)
    return "pid unknown"


def write_json(path: pathlib.Path, value: Any) -> None:
    """Writes ``value`` as indented JSON, atomically (temporary file, then rename)."""
    _write_atomic(path, json.dumps(value, indent=2))


def read_json(path: pathlib.Path, *, hint: str = START_OVER) -> Any:
    """The JSON value in ``path``; :class:`RunFileError` naming it when it is missing or
    corrupt (``hint`` is the way out the message ends with)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunFileError(f"{path} is missing; {hint}.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunFileError(f"{path} is corrupt (not JSON: {_why(err)}); {hint}.") from None


def read_jsonl(path: pathlib.Path) -> list[dict]:
    """The records of a complete log (no repair: an unterminated last line is an error)."""
    records, partial = _parse_jsonl(path)
    if partial:
        raise RunFileError(
            f"{path} ends with a partial line (a crash while writing it); resume the run to "
            "repair it."
        )
    return records


def truncate_jsonl(path: pathlib.Path, last_step: int, *, every_step: bool) -> None:
    """Cuts the log back to the records with ``step <= last_step``, on resume.

    Drops an unterminated last line (a crash mid-write) with a warning. With
    ``every_step`` the kept records must be steps ``1..last_step`` exactly, else
    :class:`RunFileError` (a resumed log with a hole would misreport the run).
    """
    records, partial = _parse_jsonl(path)
    if partial:
        warnings.warn(
            f"{path}: dropped a partial last line (a crash while writing it).",
            RecoveryWarning,
            stacklevel=2,
        )
    keep = [r for r in records if r["step"] <= last_step]
    steps = [r["step"] for r in keep]
    if every_step and steps != list(range(1, last_step + 1)):
        held = f"steps {steps[0]}..{steps[-1]} ({len(steps)} lines)" if steps else "no step"
        raise RunFileError(
            f"{path} holds {held}, but the checkpoint at step {last_step} needs every step "
            f"1..{last_step}; {START_OVER}."
        )
    _write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))


def check_same_data(path: pathlib.Path, summary: dict, *, allow_change: bool) -> bool:
    """Compares the corpus ``summary`` (``Corpus.summary()``) with the one saved in
    ``path`` (``data.json``) by each file's domain, size and sha256, in order; whether
    they differ.

    Raises :class:`DataChangedError` when they differ unless ``allow_change``, which
    warns instead (and returns True). Paths only name the files: the same bytes moved
    elsewhere are the same data.
    """
    hint = "pass --allow-data-change (allow_data_change=True) to resume anyway, or " + START_OVER
    saved = read_json(path, hint=hint)
    try:
        saved_files = [_file_entry(f) for f in saved["files"]]
    except (TypeError, KeyError, AttributeError):
        raise RunFileError(f"{path} is corrupt (no valid 'files' list); {hint}.") from None
    files = [_file_entry(f) for f in summary["files"]]
    if [f[:3] for f in saved_files] == [f[:3] for f in files]:
        return False
    changes = _describe_changes(saved_files, files)
    message = f"the training data changed since {path} was written ({changes})"
    if not allow_change:
        raise DataChangedError(
            f"{message}; resuming would continue on another corpus: restore the data, {hint}."
        )
    warnings.warn(f"{message}; resuming anyway, as allowed.", RecoveryWarning, stacklevel=2)
    return True


def require_finite(step: int, record: dict) -> None:
    """Raises :class:`NonFiniteError` naming ``step`` and every metric of ``record`` (a
    host-side dict of numbers and lists) that holds a NaN or an infinity."""
    bad = []
    for name, value in record.items():
        array = np.asarray(value)
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            bad.append(name)
    if bad:
        first = np.asarray(record[bad[0]]).ravel()
        example = first[~np.isfinite(first)][0]
        raise NonFiniteError(
            f"step {step}: non-finite {', '.join(bad)} ({bad[0]} holds {example}); training "
            "stopped before writing this step, so the logs and checkpoints hold only earlier, "
            "finite steps. Lower learning_rate or bias_rate, or check the data."
        )


def _file_entry(f: dict) -> tuple[str, int, str, str]:
    return (str(f["domain"]), int(f["bytes"]), str(f["sha256"]), str(f["path"]))


def _describe_changes(saved: list[tuple], current: list[tuple]) -> str:
    old = {f[3]: f for f in saved}
    new = {f[3]: f for f in current}
    changes = [
        f"{p} changed (sha256 {old[p][2][:12]} -> {new[p][2][:12]})"
        for p in new
        if p in old and old[p][:3] != new[p][:3]
    ]
    changes += [f"{p} is new" for p in new if p not in old]
    changes += [f"{p} is gone" for p in old if p not in new]
    if not changes:
        return "the files are the same but their order changed"
    more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
    return ", ".join(changes[:3]) + more


def _parse_jsonl(path: pathlib.Path) -> tuple[list[dict], bool]:
    """``(records, partial)``: the records of ``path`` and whether an unterminated last
    line was left out because it does not parse."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RunFileError(f"{path} is missing; {START_OVER}.") from None
    except UnicodeDecodeError as err:
        raise RunFileError(f"{path} is corrupt (not text: {err.reason}); {START_OVER}.") from None
    lines = text.split("\n")
    unterminated = lines.pop()  # "" when the file ends with a newline
    records: list[dict] = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            records.append(_record(path, number, line, records))
    if not unterminated.strip():
        return records, False
    try:
        records.append(_record(path, len(lines) + 1, unterminated, records))
    except RunFileError:
        return records, True
    return records, False


def _record(path: pathlib.Path, number: int, line: str, before: list[dict]) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        reason = f"not JSON: {_why(err)}"
    else:
        step = record.get("step") if isinstance(record, dict) else None
        last = before[-1]["step"] if before else 0
        if isinstance(step, int) and not isinstance(step, bool) and step > last:
            return record
        reason = "no 'step'" if step is None else f"step {step!r} after step {last}"
    raise RunFileError(
        f"{path} line {number} is corrupt ({reason}); fix or delete the file, or {START_OVER}."
    )


def _why(err: json.JSONDecodeError | UnicodeDecodeError) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} at line {err.lineno} column {err.colno}"
    return err.reason


def _write_atomic(path: pathlib.Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file of a unique name, then a rename."""
    tmp = unique_temp_name(path)
    try:
        with tmp.open("x") as file:  # created new, with the umask's permissions
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def unique_temp_name(path: pathlib.Path) -> pathlib.Path:
    """A temporary name beside ``path`` that no other writer uses (pid and a random part),
    for writing a file whole before renaming it to ``path``."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
