"""``spawn`` and the worker pool: processes started without deadlock, single-threaded, and
ended by how they end.

The job's processes here are stand-ins (a small script), not JAX: what is tested is how
``spawn`` waits for them, reads their output, names a failure and ends the others. The
worker pool test runs a real XLA program in a real worker.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time

import pytest

from sigmoid_moe import MeshConfig
from sigmoid_moe.errors import ProcessFailedError
from sigmoid_moe.harness import _process, multiprocess
from sigmoid_moe.harness.workers import map_in_workers

# Process 0 waits for process 1's "collective" (a file) for at most 30 s.
STAND_IN = textwrap.dedent(
    """\
    import os, pathlib, signal, sys, time
    pid, mode, flag = int(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
    if mode == "kill-self" and pid == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    if pid == 0:
        for _ in range(300):
            if flag.exists():
                sys.exit(0)
            time.sleep(0.1)
        sys.exit(3)
    if mode == "chatty":  # more than a pipe holds, before joining the collective
        sys.stderr.write("warning: something\\n" * 20000)
        sys.stderr.flush()
        flag.touch()
        sys.exit(0)
    if mode == "fail":
        sys.stderr.write("process 1 broke\\n")
        sys.exit(5)
    time.sleep(30)
    """
)


@pytest.fixture
def job(tmp_path):
    """``run(mode)``: spawn two stand-in processes; returns (result, seconds)."""
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)

    def run(mode):
        def command(pid, coordinator):
            assert coordinator.startswith("127.0.0.1:")
            return [sys.executable, str(script), str(pid), mode, str(tmp_path / "joined")]

        started = time.perf_counter()
        try:
            result = multiprocess.spawn(command, 2)
        except ProcessFailedError as err:
            result = err
        return result, time.perf_counter() - started

    return run


def test_a_chatty_process_does_not_block_the_job(job):
    result, seconds = job("chatty")
    assert result == 0 and seconds < 20


def test_a_failing_process_ends_the_job_with_its_status_and_output(job, capfd):
    err, seconds = job("fail")
    assert seconds < 20  # process 0 is not left waiting for it
    assert isinstance(err, ProcessFailedError) and err.exit_status == 5
    assert str(err) == "process 1 of 2 exited 5; the other processes were stopped."
    assert "process 1 broke" in capfd.readouterr().err


def test_a_process_killed_by_a_signal_is_named_with_status_128_plus_signal(job):
    err, seconds = job("kill-self")  # process 0 dies by SIGKILL, process 1 would sleep 30 s
    assert seconds < 20
    assert isinstance(err, ProcessFailedError) and err.exit_status == 128 + signal.SIGKILL
    assert str(err) == "process 0 of 2 was killed by SIGKILL; the other processes were stopped."


def test_a_spawned_process_joins_the_job_instead_of_spawning_again(monkeypatch, tmp_path):
    # Each process gets this command line plus its --process-id and --coordinator, and
    # joins the job as that process (with a coordinator it never spawns).
    from sigmoid_moe.cli import _build_parser, main

    commands = []
    monkeypatch.setattr(
        multiprocess, "spawn", lambda command, n: commands.append((command, n)) or 0
    )
    argv = ["compare", "--preset", "tiny", "--out", str(tmp_path), "--mesh", "data=2"]
    assert main([*argv, "--num-p", "2"]) == 0
    ((command, n),) = commands
    assert n == 2
    child = command(1, "127.0.0.1:1234")
    assert child[:3] == [sys.executable, "-m", "sigmoid_moe.cli"]
    args = _build_parser().parse_args(child[3:])
    assert (args.num_processes, args.process_id, args.coordinator) == (2, 1, "127.0.0.1:1234")
    assert args.mesh == MeshConfig(data=2)


def test_the_processes_keep_xla_flags_but_the_device_count(monkeypatch):
    # Each process sets its own device count (set_up_cpu); the caller's other XLA flags
    # (dumps, codegen options) reach every process.
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert _process.child_environment()["XLA_FLAGS"] == "--xla_backend_optimization_level=0"
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert "XLA_FLAGS" not in _process.child_environment()
    edited = _process.edit_xla_flags(
        "--a=1 --xla_cpu_multi_thread_eigen=true --b",
        drop=("--xla_cpu_multi_thread_eigen",),
        add=("--xla_cpu_multi_thread_eigen=false",),
    )
    assert edited == "--a=1 --b --xla_cpu_multi_thread_eigen=false"


def _thread_cpu_ticks() -> dict[str, int]:
    """CPU time (clock ticks) of each thread of this process."""
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks[tid] = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks


def busy_threads() -> tuple[list[int], str, str]:
    """In a worker: the CPU ticks each thread spent running a matmul and an elementwise
    reduction (largest first), and the XLA settings the worker runs with."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((768, 768), jnp.float32)
    v = jnp.ones((1 << 22,), jnp.float32)
    matmul = jax.jit(lambda a: (a @ a) @ a)
    reduce = jax.jit(lambda v: jnp.sum(jnp.exp(jnp.sin(v) * 0.5)))
    matmul(a).block_until_ready(), reduce(v).block_until_ready()  # compiled outside
    before, cpu = _thread_cpu_ticks(), time.process_time()
    deadline = time.perf_counter() + 20  # CPU time, not wall time: the same on a busy machine
    while time.process_time() - cpu < 0.4 and time.perf_counter() < deadline:
        matmul(a).block_until_ready()
        reduce(v).block_until_ready()
    after = _thread_cpu_ticks()
    spent = sorted((after[t] - before.get(t, 0) for t in after), reverse=True)
    return spent, os.environ.get("XLA_FLAGS", ""), os.environ.get("PJRT_NPROC", "")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_a_worker_runs_its_programs_on_one_thread():
    # With only --xla_cpu_multi_thread_eigen=false (the old set-up) the same work spread
    # over 3-4 threads of the CPU client's pool; one XLA thread means one busy thread.
    # (With several simulated devices XLA keeps a thread per device, to run each device's
    # program at once: the threads then follow the mesh, never the machine's cores.)
    ((spent, flags, threads),) = map_in_workers(busy_threads, [()], 1)
    assert "--xla_cpu_multi_thread_eigen=false" in flags.split() and threads == "1"
    assert "intra_op_parallelism_threads" not in flags  # not an XLA flag: it did nothing
    assert sum(spent) >= 20, spent  # enough work to tell (clock ticks, usually 10 ms)
    assert spent[0] >= 0.9 * sum(spent), spent
