"""A multi-process (multi-host) job of the trainer: one process per host, each with its
local devices, joined by ``jax.distributed`` into one mesh.

On one machine ``sigmoid-moe compare --num-processes N --mesh data=D,expert=E`` starts N
local processes (:func:`spawn`): the same command, each with ``--process-id I
--coordinator 127.0.0.1:PORT``, on CPU with gloo collectives, each simulating its share of
the mesh's devices. On real hosts run that command on each host, with its own
``--process-id`` and the first host's address as ``--coordinator`` (on CPU-only hosts set
``JAX_PLATFORMS=cpu``: each process then simulates its share of the devices too). Every
process runs the same training on its own rows of each batch; process 0 writes the files
and prints the results.

How a job ends, whatever happens to one of its processes:

- :func:`spawn` watches its processes: when one fails, it ends the others and raises
  :class:`~sigmoid_moe.errors.ProcessFailedError` naming it and how it ended (exit status
  128 + signal when a signal killed it). Ctrl-C and SIGTERM are passed on to the
  processes, which stop as a one-process run does (a checkpoint being saved is finished);
  any still running after :data:`STOP_GRACE_S` are killed. If the launcher itself is
  killed, its processes see their parent gone and exit.
- Every process of a job (:func:`initialize`) beats a counter in ``jax.distributed``'s
  key-value store every second and watches the others'. A process whose peer stops
  beating for :data:`PEER_TIMEOUT_S` (killed, or hung) exits with one line (status 1)
  instead of waiting in a collective that will never complete; a process that finished
  its work says so (:func:`finished`) and is no longer watched. When process 0 dies, the
  coordination service it hosts goes with it, and JAX itself ends the other processes
  at once (with its own fatal log). JAX's start, heartbeat and shutdown timeouts
  (:data:`START_TIMEOUT_S`: every process must join by then; :data:`HEARTBEAT_TIMEOUT_S`,
  the backstop; :data:`SHUTDOWN_TIMEOUT_S`) and, on CPU, a collective timeout
  (:data:`COLLECTIVE_TIMEOUT_S`: a peer that lives but never joins a collective) bound the
  rest.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO

from sigmoid_moe.errors import ProcessFailedError, Terminated
from sigmoid_moe.harness._process import (
    child_environment,
    describe_exit,
    exit_status,
    set_up_cpu,
    watch_parent,
)
from sigmoid_moe.sharding import MeshConfig

__all__ = ["finished", "initialize", "settle_failure", "spawn"]

START_TIMEOUT_S = 120
HEARTBEAT_TIMEOUT_S = 60
SHUTDOWN_TIMEOUT_S = 120
COLLECTIVE_TIMEOUT_S = 600
PEER_TIMEOUT_S = 10.0
BEAT_S = 1.0
STOP_GRACE_S = 15.0

# Set by spawn() in its processes' environment: the launcher's pid, which they watch.
_LAUNCHER_ENV = "SIGMOID_MOE_LAUNCHER_PID"
_BEAT_KEY = "sigmoid-moe/beat/{}"
_DONE_KEY = "sigmoid-moe/done/{}"
_watch: _PeerWatch | None = None


def initialize(process_id: int, num_processes: int, coordinator: str, mesh: MeshConfig) -> None:
    """Joins this process to the job as ``process_id`` of ``num_processes`` (before anything
    else uses JAX), with ``mesh.local_devices(num_processes)`` devices of its own, and
    starts watching its peers (see the module docstring).

    On CPU (``JAX_PLATFORMS=cpu``, as :func:`spawn` sets it) the devices are simulated, one
    XLA thread per process, and collectives run over gloo.
    """
    import jax

    local_devices = mesh.local_devices(num_processes)
    if str(jax.config.jax_platforms or "").split(",")[0] == "cpu":
        set_up_cpu(local_devices, single_thread=True, collective_timeout_s=COLLECTIVE_TIMEOUT_S)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    me = f"process {process_id} of {num_processes}"
    launcher = os.environ.get(_LAUNCHER_ENV)
    if launcher is not None:
        watch_parent(int(launcher), f"sigmoid-moe: error: {me}: its launcher is gone; ending.")
    # JAX's preemption service would catch SIGTERM for its own sync points, which this
    # trainer does not use: SIGTERM stays the command line's (a clean stop, exit 143).
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=START_TIMEOUT_S,
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
        shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
    )
    global _watch
    _watch = _PeerWatch(process_id, num_processes)


def finished() -> None:
    """Tells the peers that this process finished its work: they stop watching it, so it
    may exit while they are still writing files."""
    if _watch is not None:
        _watch.finish()


def settle_failure() -> None:
    """After an error in a job's process: waits until the peer watch would have noticed a
    lost peer (and ended this process with its one line, the likely cause of the error);
    returns when every peer is alive, so the error is this process's own."""
    if _watch is not None:
        deadline = time.monotonic() + PEER_TIMEOUT_S + 3 * BEAT_S
        while time.monotonic() < deadline:
            time.sleep(BEAT_S / 4)


class _PeerWatch:
    """Beats this process's counter and ends the process when a peer's stops (a daemon
    thread; see the module docstring)."""

    def __init__(self, process_id: int, num_processes: int):
        from orbax.checkpoint import multihost

        self._client = multihost.get_jax_distributed_client()
        self._me, self._count = process_id, num_processes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sigmoid-moe-peer-watch")
        self._thread.daemon = True
        self._thread.start()
        # Registered after JAX's own exit handler, so it runs first: the watch stops
        # before the distributed client it uses is shut down.
        atexit.register(self.stop)

    def finish(self) -> None:
        """Marks this process finished: its peers stop watching it."""
        with contextlib.suppress(Exception):  # the job is ending anyway
            self._client.key_value_set(_DONE_KEY.format(self._me), "1", allow_overwrite=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * BEAT_S)

    def _run(self) -> None:
        peers = [p for p in range(self._count) if p != self._me]
        start = time.monotonic()
        heard = dict.fromkeys(peers, start)  # when each peer's counter last moved
        seen: dict[int, str | None] = dict.fromkeys(peers)
        contact = start  # when the key-value store last answered
        beat = 0
        while not self._stop.wait(BEAT_S):
            now = time.monotonic()
            try:
                beat += 1
                self._client.key_value_set(
                    _BEAT_KEY.format(self._me), str(beat), allow_overwrite=True
                )
                for peer in list(peers):
                    if self._try_get(_DONE_KEY.format(peer)) is not None:
                        peers.remove(peer)  # finished: no longer watched
                        continue
                    value = self._try_get(_BEAT_KEY.format(peer))
                    if value != seen[peer]:
                        seen[peer], heard[peer] = value, now
                contact = now
            except Exception:
                if now - contact > PEER_TIMEOUT_S:
                    self._lost("process 0 (the coordinator) does not answer")
                continue
            for peer in peers:
                if now - heard[peer] > PEER_TIMEOUT_S:
                    self._lost(f"process {peer} stopped answering")

    def _try_get(self, key: str) -> str | None:
        try:
            return self._client.key_value_try_get(key)
        except Exception as err:
            if "NOT_FOUND" in str(err):
                return None
            raise

    def _lost(self, what: str) -> None:
        if self._stop.is_set():
            return
        sys.stderr.write(
            f"sigmoid-moe: error: process {self._me} of {self._count}: {what} for "
            f"{PEER_TIMEOUT_S:g} s (it died or hangs); ending this process.\n"
        )
        sys.stderr.flush()
        os._exit(1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(command: Callable[[int, str], Sequence[str]], num_processes: int) -> int:
    """Runs the job as ``num_processes`` local processes, ``command(process_id,
    coordinator)`` each, on CPU (gloo on 127.0.0.1); returns their exit status: 0 when
    all succeed.

    Process 0's output is passed through; the others' goes to temporary files (a pipe
    nobody reads while process 0 runs would fill and block its writer, and with it every
    collective), shown only for the process that failed. Each process runs in its own
    session, so Ctrl-C reaches only this launcher, which passes it on.

    Ctrl-C or SIGTERM here is passed on to the processes, which get :data:`STOP_GRACE_S`
    to stop as a one-process run does (process 0 then says so, and its status, 128 +
    signal, is returned); any still running then are killed.

    Raises:
      ProcessFailedError: the first process that failed, named with how it ended; the
        others were ended first.
      KeyboardInterrupt, Terminated: this process was interrupted or terminated and
        process 0 did not stop by itself in time.
    """
    coordinator = f"127.0.0.1:{_free_port()}"
    env = child_environment()
    env["JAX_PLATFORMS"] = "cpu"
    env[_LAUNCHER_ENV] = str(os.getpid())
    procs: list[subprocess.Popen] = []
    logs: list[IO[bytes] | None] = []
    try:
        for pid in range(num_processes):
            logs.append(tempfile.TemporaryFile() if pid else None)
            procs.append(
                subprocess.Popen(
                    list(command(pid, coordinator)),
                    env=env,
                    stdout=logs[-1],
                    stderr=logs[-1],
                    start_new_session=True,
                )
            )
        try:
            failed = _wait_for_all(procs)
        except (KeyboardInterrupt, Terminated) as stop:
            signum = signal.SIGINT if isinstance(stop, KeyboardInterrupt) else stop.signum
            _stop_all(procs, signum)
            if procs[0].returncode == 128 + signum:  # it stopped and said so itself
                return 128 + signum
            raise
        if failed is None:
            return 0
        pid, code = failed
        log = logs[pid]
        if log is not None:
            log.seek(0)
            tail = log.read()[-3000:].decode(errors="replace").rstrip()
            if tail:
                sys.stderr.write(f"process {pid}'s last output:\n{tail}\n")
        raise ProcessFailedError(
            f"process {pid} of {num_processes} {describe_exit(code)}; the other processes "
            "were stopped.",
            exit_status(code),
        )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            if log is not None:
                log.close()


def _wait_for_all(procs: Sequence[subprocess.Popen]) -> tuple[int, int] | None:
    """Waits until every process has exited or one fails; ``(pid, returncode)`` of the
    first failure (the others then killed), or None when all exit 0."""
    while True:
        codes = [proc.poll() for proc in procs]
        for pid, code in enumerate(codes):
            if code:
                for other in procs:
                    if other.poll() is None:
                        other.kill()
                        other.wait()
                return pid, code
        if all(code == 0 for code in codes):
            return None
        time.sleep(0.05)


def _stop_all(procs: Sequence[subprocess.Popen], signum: int) -> None:
    """Sends ``signum`` to the running processes and waits :data:`STOP_GRACE_S` for them
    to stop (the caller kills any that do not)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signum)
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
