"""A multi-process (multi-host) job of ``sigmoid-moe``: one process per host, each with its
local devices, joined by ``jax.distributed`` into one mesh.

On one machine (what ``sigmoid-moe compare --num-processes N`` does, with gloo CPU
collectives on 127.0.0.1)::

    sigmoid-moe compare --preset tiny --mesh data=2,expert=4 --num-processes 2

spawns, for ``i`` in ``0 .. N-1``::

    python -m sigmoid_moe.harness.multiprocess --process-id i --num-processes N \\
        --coordinator 127.0.0.1:PORT --local-devices 4 -- compare --preset tiny ...

On real hosts run that second command on each host, with its own ``--process-id`` and the
first host's address as ``--coordinator`` (and no ``--local-devices`` on GPU/TPU). Every
process runs the same training, on its own rows of each batch; process 0 writes the
files and prints the results.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import IO

__all__ = ["initialize", "main", "spawn"]


def initialize(
    process_id: int, num_processes: int, coordinator: str, local_devices: int | None
) -> None:
    """Joins this process to the job (before anything else uses JAX)."""
    import jax

    if local_devices is not None:  # CPU: simulated devices, one XLA thread each
        os.environ["XLA_FLAGS"] = " ".join(
            [flag for flag in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in flag]
            + ["--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1"]
        )
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", local_devices)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(argv: Sequence[str], num_processes: int, local_devices: int) -> int:
    """Runs ``sigmoid-moe <argv>`` as ``num_processes`` local processes; their exit code.

    Process 0's output is passed through; the others' goes to temporary files (a pipe
    nobody reads while process 0 runs would fill and block its writer, and with it every
    collective) and is shown only if one fails. The first process to fail ends the job:
    the others, which would wait for it in a collective, are killed, and its code returned.
    """
    coordinator = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ)
    # Each process sets its own devices and threads (initialize); other XLA flags carry over.
    flags = [flag for flag in env.pop("XLA_FLAGS", "").split() if "device_count" not in flag]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    procs: list[subprocess.Popen] = []
    logs: list[IO[bytes] | None] = []
    try:
        for pid in range(num_processes):
            cmd = [
                sys.executable,
                "-m",
                "sigmoid_moe.harness.multiprocess",
                f"--process-id={pid}",
                f"--num-processes={num_processes}",
                f"--coordinator={coordinator}",
                f"--local-devices={local_devices}",
                "--",
                *argv,
            ]
            logs.append(tempfile.TemporaryFile() if pid else None)
            procs.append(subprocess.Popen(cmd, env=env, stdout=logs[-1], stderr=logs[-1]))
        failed = _wait_for_all(procs)
        if failed is not None and failed[0]:
            log = logs[failed[0]]
            log.seek(0)
            sys.stderr.write(f"process {failed[0]} exited {failed[1]}:\n")
            sys.stderr.write(log.read()[-3000:].decode(errors="replace"))
        return 0 if failed is None else failed[1]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            if log is not None:
                log.close()


def _wait_for_all(procs: Sequence[subprocess.Popen]) -> tuple[int, int] | None:
    """Waits until every process has exited or one fails; ``(pid, code)`` of the first
    failure (the others then killed), or None when all exit 0."""
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sigmoid_moe.harness.multiprocess", description=__doc__
    )
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--coordinator", required=True, help="host:port of process 0")
    parser.add_argument("--local-devices", type=int, default=None, help="CPU devices here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then sigmoid-moe's args")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not 0 <= args.process_id < args.num_processes:
        parser.error("--process-id must be in [0, --num-processes)")
    initialize(args.process_id, args.num_processes, args.coordinator, args.local_devices)
    from sigmoid_moe.cli import entry

    sys.argv = ["sigmoid-moe", *command]
    entry()


if __name__ == "__main__":
    main()
