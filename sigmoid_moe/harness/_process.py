"""The processes the harness starts: their XLA:CPU set-up and how they end.

One place edits ``XLA_FLAGS`` and the CPU client's threads (:func:`set_up_cpu`,
:func:`child_environment`); one place says how a process ended (:func:`exit_status`,
:func:`describe_exit`); one watcher ends a child whose parent is gone (:func:`watch_parent`).

A single-threaded XLA:CPU process (jax 0.10.2) needs two settings, made before its backend
starts:

- ``PJRT_NPROC=1``: the CPU client's intra-op thread pool, which runs the thunk runtime's
  parallel loops and independent thunks (and Eigen's matmuls when those are threaded), is
  sized from it (XLA reads ``PJRT_NPROC``, then ``NPROC``, else uses the core count). XLA
  still keeps a thread per simulated device, to run every device's program at once, so a
  process's threads then follow its mesh, never the machine's cores;
- ``--xla_cpu_multi_thread_eigen=false``: matmuls and convolutions use Eigen's
  single-threaded kernels.

``intra_op_parallelism_threads`` is a field of XLA's compile options, not a flag:
written into ``XLA_FLAGS`` it does nothing. ``tests/test_multiprocess_spawn.py`` checks
that a worker set up here runs its programs on one thread.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence

__all__ = [
    "child_environment",
    "describe_exit",
    "edit_xla_flags",
    "exit_status",
    "set_up_cpu",
    "watch_parent",
]

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
EIGEN_THREADS_FLAG = "--xla_cpu_multi_thread_eigen"
COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_timeout_seconds"
CPU_THREADS_ENV = "PJRT_NPROC"


def edit_xla_flags(flags: str, *, drop: Sequence[str] = (), add: Sequence[str] = ()) -> str:
    """``flags`` (an ``XLA_FLAGS`` value) without the flags named in ``drop`` (any value),
    then ``add``; every other flag kept, in order."""
    kept = [flag for flag in flags.split() if flag.split("=", 1)[0] not in drop]
    return " ".join([*kept, *add])


def child_environment() -> dict[str, str]:
    """This process's environment for a child that sets its own CPU devices
    (:func:`set_up_cpu`): the device-count flag removed, every other XLA flag kept."""
    env = dict(os.environ)
    flags = edit_xla_flags(env.pop("XLA_FLAGS", ""), drop=(DEVICE_COUNT_FLAG,))
    if flags:
        env["XLA_FLAGS"] = flags
    return env


def set_up_cpu(
    devices: int, *, single_thread: bool = True, collective_timeout_s: int | None = None
) -> None:
    """Makes this process's JAX run on ``devices`` simulated CPU devices, with one XLA
    thread when ``single_thread`` (see the module docstring), and CPU collectives (gloo
    across processes) that fail after ``collective_timeout_s`` seconds of waiting instead
    of waiting forever (``--xla_cpu_collective_timeout_seconds``; an XLA that does not know
    the flag refuses to start, so it is set only from jaxlib 0.10, where it was checked).
    Call it before anything starts JAX's backend (XLA reads its flags and threads then)."""
    import jax

    add = [f"{EIGEN_THREADS_FLAG}=false"] if single_thread else []
    if collective_timeout_s is not None and jax.__version_info__ >= (0, 10):
        add.append(f"{COLLECTIVE_TIMEOUT_FLAG}={collective_timeout_s}")
    flags = edit_xla_flags(
        os.environ.get("XLA_FLAGS", ""),
        drop=(DEVICE_COUNT_FLAG, EIGEN_THREADS_FLAG, COLLECTIVE_TIMEOUT_FLAG),
        add=add,
    )
    os.environ["XLA_FLAGS"] = flags
    if single_thread:
        os.environ[CPU_THREADS_ENV] = "1"
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", devices)


def exit_status(returncode: int) -> int:
    """A child's ``returncode`` as the shell reports it: 128 + signal for a signal."""
    return 128 - returncode if returncode < 0 else returncode


def describe_exit(returncode: int) -> str:
    """How a process ended, for a message: ``"was killed by SIGKILL"``, ``"exited 3"``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited {returncode}"


def watch_parent(parent_pid: int, message: str | None = None, interval_s: float = 0.5) -> None:
    """Ends this process (exit 1, after ``message`` on stderr) as soon as its parent
    ``parent_pid`` is gone (killed by SIGKILL, say; already gone counts too), so that no
    child outlives the command that started it. A daemon thread polls ``os.getppid()``."""

    def gone() -> None:
        if message:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
        os._exit(1)

    if os.getppid() != parent_pid:
        gone()

    def watch() -> None:
        while os.getppid() == parent_pid:
            threading.Event().wait(interval_s)
        gone()

    threading.Thread(target=watch, name="sigmoid-moe-parent-watch", daemon=True).start()
