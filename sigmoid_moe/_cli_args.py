"""What the ``sigmoid-moe`` subcommands share: flag types, the ``--out`` check, and how an
error becomes an exit status.

Bad input is refused where it enters: a flag's value by its ``argparse`` type (exit 2,
"argument --flag: ..."), a config built from the flags inside :func:`usage_errors`, the
``--out`` folder by :func:`output_dir`. All of these raise or become
:class:`~sigmoid_moe.errors.UsageError`, which :func:`run` prints as one line and exits 2.
A ``ValueError`` raised anywhere else is a bug and keeps its traceback. Signals end a
command with one line and the shell's status, 128 + signal (:func:`run`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import pathlib
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from sigmoid_moe.errors import NonFiniteError, ProcessFailedError, Terminated, UsageError

T = TypeVar("T")


def integer(minimum: int) -> Callable[[str], int]:
    """An ``argparse`` type: an int ``>= minimum``."""

    def parse(text: str) -> int:
        value = int(text)  # a ValueError reads "invalid int value: '4x'"
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def real(*, positive: bool = False, signed: bool = False) -> Callable[[str], float]:
    """An ``argparse`` type: a finite float, ``>= 0`` (``> 0`` when ``positive``; any sign
    when ``signed``)."""

    def parse(text: str) -> float:
        value = float(text)  # a ValueError reads "invalid float value: 'x'"
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if not signed and (value <= 0 if positive else value < 0):
            raise argparse.ArgumentTypeError(f"must be {'> 0' if positive else '>= 0'}, got {text}")
        return value

    parse.__name__ = "float"
    return parse


def listed(item: Callable[[str], T], what: str, example: str) -> Callable[[str], list[T]]:
    """An ``argparse`` type: a non-empty comma list of ``item`` values (``what``, e.g.
    ``"numbers"``, such as ``example``)."""

    def parse(text: str) -> list[T]:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what} such as {example}, got {text!r}"
            )
        try:
            return [item(part) for part in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what} such as {example}, got {text!r}"
            ) from None
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(
                f"{err} (in {text!r}: comma-separated {what} such as {example})"
            ) from None

    parse.__name__ = "list"
    return parse


def choice(choices: Sequence[str], noun: str) -> Callable[[str], str]:
    """An ``argparse`` type for list items: one of ``choices`` (a ``noun``, e.g. rule)."""

    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(
                f"unknown {noun} {text!r}; choose from {', '.join(choices)}"
            )
        return text

    return parse


def checked(check: Callable[[str], T]) -> Callable[[str], T]:
    """An ``argparse`` type from a check that returns the value or raises ValueError (its
    message becomes the flag's error)."""

    def parse(text: str) -> T:
        try:
            return check(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = getattr(check, "__name__", "value")
    return parse


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Inside: input validation. A ``ValueError``, ``TypeError`` or ``OSError`` raised
    here is bad input and becomes a :class:`UsageError` with the same message."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from err
    except OSError as err:
        text = str(err) if err.strerror is None else f"{err.filename}: {err.strerror}"
        raise UsageError(text) from err


def output_dir(path: str | pathlib.Path, flag: str = "--out") -> pathlib.Path:
    """Creates folder ``path`` if needed and checks a file can be written in it, so a bad
    ``--out`` fails before any work, with a :class:`UsageError` naming the flag and path
    (an existing file, a parent that is a file, no permission, a name too long, ...)."""
    path = pathlib.Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise UsageError(f"{flag} {str(path)!r} is an existing file; pass a folder.")
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except FileExistsError:
        raise UsageError(f"{flag} {str(path)!r} exists but is not a folder.") from None
    except OSError as err:
        reason = "a parent of it is a file" if isinstance(err, NotADirectoryError) else err.strerror
        raise UsageError(f"{flag} {_shown(path)!r} cannot be written ({reason}).") from None
    return path


def _shown(path: pathlib.Path, limit: int = 200) -> str:
    """``path`` for a one-line message: the middle of a very long one elided."""
    text = str(path)
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-limit // 2 :]}"


def run(command: str, func: Callable[[], int]) -> int:
    """Runs a subcommand's ``func``: prints a :class:`UsageError` as one line and exits 2,
    a :class:`NonFiniteError` likewise with exit 1, a :class:`ProcessFailedError` with its
    process's status, Ctrl-C as one line with exit 130 and SIGTERM/SIGHUP as one line with
    exit 128 + signal, and every warning as one line; anything else propagates with its
    traceback. While ``func`` runs, the signals are exceptions in the main thread
    (:func:`signals_as_exceptions`), so the processes the command started are ended."""
    prefix = f"sigmoid-moe {command}"

    def one_line(message, category, filename, lineno, file=None, line=None):
        print(f"{prefix}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = one_line
        try:
            with signals_as_exceptions():
                return func()
        except UsageError as err:
            print(f"{prefix}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except NonFiniteError as err:
            print(f"{prefix}: error: {err}", file=sys.stderr)
            raise SystemExit(1) from None
        except ProcessFailedError as err:
            print(f"{prefix}: error: {err}", file=sys.stderr)
            raise SystemExit(err.exit_status) from None
        except KeyboardInterrupt:
            print(f"\n{prefix}: interrupted.", file=sys.stderr)
            raise SystemExit(128 + signal.SIGINT) from None
        except Terminated as stop:
            name = signal.Signals(stop.signum).name
            print(f"{prefix}: terminated by {name}.", file=sys.stderr)
            raise SystemExit(128 + stop.signum) from None


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Inside (main thread): SIGINT raises ``KeyboardInterrupt`` and SIGTERM/SIGHUP raise
    :class:`~sigmoid_moe.errors.Terminated`, never where Python would print the exception as
    "Exception ignored" and drop it: during a garbage collection (its callbacks, JAX runs
    one, and the weakref callbacks and finalizers it calls) or in a ``__del__``. There the
    signal is delivered again a moment later. A signal the process ignores (``nohup``, a
    background job) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum, default, raised in (
        (signal.SIGINT, signal.default_int_handler, KeyboardInterrupt),
        (signal.SIGTERM, signal.SIG_DFL, Terminated),
        (signal.SIGHUP, signal.SIG_DFL, Terminated),
    ):
        handler = signal.getsignal(signum)
        if handler in (default, None):
            previous[signum] = handler
            signal.signal(signum, _raiser(raised))
    gc.callbacks.append(_track_collection)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        gc.callbacks.remove(_track_collection)
        _track_collection("stop", None)  # left during a collection: it sends no "stop" now


# True from a collection's "start" to its "stop": the weakref callbacks and finalizers the
# collector runs in between cannot raise either.
_collecting = False


def _track_collection(phase: str, info) -> None:
    global _collecting
    _collecting = phase == "start"


def _raiser(exception: type[BaseException]) -> Callable:
    def handler(signum: int, frame) -> None:
        if _collecting or _cannot_raise(frame):
            threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
            return
        raise KeyboardInterrupt if exception is KeyboardInterrupt else exception(signum)

    return handler


def _cannot_raise(frame) -> bool:
    """Whether ``frame`` runs inside a gc callback or a ``__del__``, where Python prints an
    exception as "Exception ignored" and drops it."""
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks} - {None}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False
