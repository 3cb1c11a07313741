"""Issue 29: processes end cleanly and say why; a run folder has one owner.

Real signals to the real ``sigmoid-moe`` command, and real races of two commands. Every
wait is bounded, every process a test starts is killed at its end whatever happened, and
each command gets the SIGINT handler it needs (under ``nohup`` or in a background shell
SIGINT is ignored, and a child would inherit that).
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
COMPARE = ["compare", "--preset", "tiny", "--quiet", "--strategy", "sigmoid+none"]
TWO_PROCESSES = ["--mesh", "data=2", "--num-processes", "2"]

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")

# ``python -m sigmoid_moe.cli`` with Python's Ctrl-C handler, whatever this process
# inherited: an ignored SIGINT is inherited by a child, and Python then leaves it ignored.
CLI = [
    sys.executable,
    "-c",
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('sigmoid_moe.cli', run_name='__main__', alter_sys=True)",
]


def _process_table() -> dict[int, tuple[int, str]]:
    """``{pid: (parent pid, command line)}`` of every process."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        table[int(name)] = (parent, command)
    return table


def _descendants(root: int) -> dict[int, str]:
    """``{pid: command line}`` of every process below ``root``."""
    table, found, frontier = _process_table(), {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, command) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = command
                frontier.append(pid)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def _wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


@pytest.fixture
def run_command():
    """``start(*argv, env=None) -> Popen`` of ``sigmoid-moe``; every process started (and
    each one's descendants seen by :func:`watch`) is killed at the end of the test."""
    started: list[subprocess.Popen] = []
    seen: set[int] = set()

    def start(*argv, env=None) -> subprocess.Popen:
        proc = subprocess.Popen(
            [*CLI, *argv],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, as a terminal's job
        )
        started.append(proc)
        return proc

    def watch(proc: subprocess.Popen) -> dict[int, str]:
        found = _descendants(proc.pid)
        seen.update(found)
        return found

    start.watch = watch
    yield start
    for pid in seen:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"the command was still running {timeout:g} s after the signal:\n{err}")
    return proc.returncode, out, err


def _assert_all_gone(pids, timeout: float = 10.0) -> None:
    _wait_until(lambda: not [p for p in pids if _alive(p)], timeout, f"{sorted(pids)} to end")


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# --- One process with its worker ----------------------------------------------------


def _workers_running(run_command, proc, out: pathlib.Path):
    """Waits until the command's worker trains (and the resource tracker runs)."""

    def ready():
        found = run_command.watch(proc)
        worker = [p for p, c in found.items() if "spawn_main" in c]
        tracker = [p for p, c in found.items() if "resource_tracker" in c]
        started = (out / "runs" / "sigmoid_none" / "seed0" / "metrics.jsonl").exists()
        return found if worker and tracker and started else None

    return _wait_until(ready, 120, "the worker to start training")


@pytest.mark.slow
def test_sigterm_ends_the_command_its_worker_and_the_resource_tracker(run_command, tmp_path):
    proc = run_command(*COMPARE, "--steps", "500", "--out", str(tmp_path))
    found = _workers_running(run_command, proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    code, _, err = _finish(proc, 15)
    assert code == 128 + signal.SIGTERM
    assert _one_line(err) == "sigmoid-moe compare: terminated by SIGTERM."
    _assert_all_gone(found)


@pytest.mark.slow
def test_ctrl_c_ends_the_command_and_its_worker_with_one_line(run_command, tmp_path):
    proc = run_command(*COMPARE, "--steps", "500", "--out", str(tmp_path))
    found = _workers_running(run_command, proc, tmp_path)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: to the whole job
    code, out, err = _finish(proc, 15)
    assert code == 128 + signal.SIGINT
    assert err.strip() == ""  # no "Exception ignored in ... _xla_gc_callback" from workers
    assert _one_line(out).startswith(f"interrupted; the last checkpoints under {tmp_path}/runs")
    _assert_all_gone(found)


# --- Two local processes ------------------------------------------------------------


def _job_started(run_command, proc) -> dict[int, str]:
    """Waits until both processes of the job run; ``{pid: command line}`` of all below."""

    def ready():
        found = run_command.watch(proc)
        return found if sum("--process-id=" in c for c in found.values()) == 2 else None

    return _wait_until(ready, 60, "the two processes to start")


@pytest.mark.parametrize("victim", [0, 1])
def test_a_process_of_a_two_process_run_killed_by_sigkill_is_named(run_command, tmp_path, victim):
    proc = run_command(*COMPARE, *TWO_PROCESSES, "--steps", "500", "--out", str(tmp_path))
    found = _job_started(run_command, proc)
    time.sleep(1)  # into their start-up
    (pid,) = [p for p, c in found.items() if f"--process-id={victim}" in c]
    os.kill(pid, signal.SIGKILL)
    code, _, err = _finish(proc, 15)
    assert code == 128 + signal.SIGKILL
    assert err.strip().splitlines()[-1] == (
        f"sigmoid-moe compare: error: process {victim} of 2 was killed by SIGKILL; the other "
        "processes were stopped."
    )
    assert "Traceback" not in err
    _assert_all_gone(found)


def test_sigterm_to_a_two_process_run_stops_both_with_one_line(run_command, tmp_path):
    proc = run_command(*COMPARE, *TWO_PROCESSES, "--steps", "500", "--out", str(tmp_path))
    found = _job_started(run_command, proc)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    code, _, err = _finish(proc, 25)  # the processes get 15 s to stop before SIGKILL
    assert code == 128 + signal.SIGTERM
    assert _one_line(err) == "sigmoid-moe compare: terminated by SIGTERM."
    _assert_all_gone(found)


def test_the_processes_of_a_killed_launcher_end(run_command, tmp_path):
    proc = run_command(*COMPARE, *TWO_PROCESSES, "--steps", "500", "--out", str(tmp_path))
    found = _job_started(run_command, proc)
    proc.kill()  # SIGKILL: the launcher can do nothing, its processes see it gone
    _finish(proc, 10)
    _assert_all_gone(found)


@pytest.mark.slow
def test_a_survivor_of_a_multi_host_job_exits_with_one_line(run_command, tmp_path):
    # Two "hosts" started by hand (no launcher); process 1 is killed mid-run. Process 0
    # must not wait in a collective forever: its peer watch ends it with one line.
    from sigmoid_moe.harness.multiprocess import PEER_TIMEOUT_S

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{sock.getsockname()[1]}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f
    )
    argv = [*COMPARE, *TWO_PROCESSES, "--steps", "500", "--out", str(tmp_path)]
    hosts = [
        run_command(*argv, f"--process-id={i}", f"--coordinator={coordinator}", env=env)
        for i in range(2)
    ]
    run_dir = tmp_path / "runs" / "sigmoid_none" / "seed0"
    _wait_until(lambda: (run_dir / "config.json").exists(), 120, "the job to start")
    hosts[1].kill()
    started = time.monotonic()
    code, _, err = _finish(hosts[0], PEER_TIMEOUT_S + 30)
    assert time.monotonic() - started < PEER_TIMEOUT_S + 30
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        f"sigmoid-moe: error: process 0 of 2: process 1 stopped answering for "
        f"{PEER_TIMEOUT_S:g} s (it died or hangs); ending this process."
    )


# --- A run folder has one owner -----------------------------------------------------


def test_two_commands_racing_for_one_folder_one_runs_the_other_is_refused(run_command, tmp_path):
    argv = [*COMPARE, "--steps", "6", "--out", str(tmp_path)]
    procs = [run_command(*argv), run_command(*argv)]
    results = [_finish(proc, 300) for proc in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    winner, loser = (0, 1) if results[0][0] == 0 else (1, 0)
    assert _one_line(results[loser][2]) == (
        f"sigmoid-moe compare: error: --out '{tmp_path}' is in use by another sigmoid-moe run "
        f"(pid {procs[winner].pid}); wait for it to finish, or pass another folder."
    )
    # The winner's run is whole: one line per step, no temporary file left behind.
    metrics = (tmp_path / "runs" / "sigmoid_none" / "seed0" / "metrics.jsonl").read_text()
    assert [line.count('"step"') for line in metrics.splitlines()] == [1] * 6
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
