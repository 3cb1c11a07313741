"""The errors the project raises on purpose, each a complete one-line message.

- :class:`UsageError` (a ``ValueError``): bad input from the user: a flag, a path, or a
  run folder the user must act on. The command line prints it and exits 2.
- :class:`RunFileError`: a file of a run folder is corrupt, missing or does not match the
  run being resumed (``config.json``, ``data.json``, ``metrics.jsonl``, ``eval.jsonl``).
  :class:`CheckpointError` and :class:`DataChangedError` are its two special cases.
- :class:`MissingExtraError` (a ``UsageError`` and an ``ImportError``): a feature of an
  optional extra (``[research]``) was asked for without the extra installed.
- :class:`NonFiniteError` (a ``FloatingPointError``): a training run produced a NaN or an
  infinity; it stopped at that step without saving it. The command line exits 1.
- :class:`RunFolderBusyError` (a :class:`UsageError`): a run folder is being written by
  another process; the message names the folder and that process's pid.
- :class:`ProcessFailedError`: a process of a multi-process job failed; the message names
  it and how it ended, and the command exits with its status (128 + signal when a signal
  ended it).
- :class:`Terminated` (a ``BaseException``, like ``KeyboardInterrupt``): the command line
  was asked to stop by SIGTERM or SIGHUP; it ends what it started and exits 128 + signal.
- :class:`RecoveryWarning`: something was repaired on resume (one line each).

Anything else escaping the command line is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "DataChangedError",
    "MissingExtraError",
    "NonFiniteError",
    "ProcessFailedError",
    "RecoveryWarning",
    "RunFileError",
    "RunFolderBusyError",
    "Terminated",
    "UsageError",
]


class UsageError(ValueError):
    """Bad input: the message names the flag, argument or path and the way out."""


class RunFileError(UsageError):
    """A run folder's file is corrupt, missing or inconsistent; the message names it."""


class CheckpointError(RunFileError):
    """No checkpoint of a run can be trusted (all failed their sha256 check), or a
    verified one does not fit the model being resumed."""


class DataChangedError(RunFileError):
    """Resuming a run whose training data differ from the data it was trained on."""


class MissingExtraError(UsageError, ImportError):
    """A feature needs an optional extra that is not installed; the message names the
    missing packages and the ``pip install`` line that brings them."""


class RunFolderBusyError(UsageError):
    """Another process holds the run folder's lock; the message names the folder and pid."""


class NonFiniteError(FloatingPointError):
    """A training step produced a non-finite loss, bias or other metric."""


class RecoveryWarning(UserWarning):
    """A run was repaired on resume: a bad checkpoint skipped, a partial log line dropped,
    or changed training data accepted because it was allowed."""


class ProcessFailedError(RuntimeError):
    """A process of a multi-process job failed; ``exit_status`` is the shell's status for
    it (its exit code, or 128 + the signal that ended it)."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


class Terminated(BaseException):  # noqa: N818 (a signal, like KeyboardInterrupt)
    """Raised in the main thread by the command line's SIGTERM/SIGHUP handler, so that the
    command ends the processes it started; ``signum`` is the signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
