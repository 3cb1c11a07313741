"""``spawn``: local processes of a multi-process job, run without deadlock or orphans.

The processes here are stand-ins (a small script as ``sys.executable``), not JAX: what is
tested is how ``spawn`` waits for them, reads their output and ends them.
"""

from __future__ import annotations

import sys
import textwrap
import time

import pytest

from sigmoid_moe.harness import multiprocess

# Process 0 waits for process 1's "collective" (a file) for at most 30 s.
STAND_IN = textwrap.dedent(
    """\
    #!{python}
    import pathlib, sys, time
    pid = int(next(a for a in sys.argv if a.startswith("--process-id=")).split("=")[1])
    mode = sys.argv[-1]
    flag = pathlib.Path({flag!r})
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
    sys.stderr.write("process 1 broke\\n")
    sys.exit(5)
    """
)


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    script = tmp_path / "python"
    script.write_text(STAND_IN.format(python=sys.executable, flag=str(tmp_path / "joined")))
    script.chmod(0o755)
    monkeypatch.setattr(multiprocess.sys, "executable", str(script))


def test_a_chatty_process_does_not_block_the_job(stand_in):
    started = time.perf_counter()
    assert multiprocess.spawn(["chatty"], 2, 1) == 0
    assert time.perf_counter() - started < 20


def test_a_failing_process_ends_the_job_with_its_code_and_output(stand_in, capfd):
    started = time.perf_counter()
    assert multiprocess.spawn(["fail"], 2, 1) == 5
    assert time.perf_counter() - started < 20  # process 0 is not left waiting for it
    assert "process 1 broke" in capfd.readouterr().err


@pytest.mark.parametrize(
    "flag", [["--num-processes", "2"], ["--num-processes=2"], ["--num-p", "2"]]
)
def test_the_spawned_processes_do_not_spawn_again(flag, monkeypatch, tmp_path):
    # Each process gets the command line minus the process count, however it was spelled
    # (argparse takes abbreviations): a process that kept it would spawn processes too.
    from sigmoid_moe.cli import _build_parser, main

    calls = []
    monkeypatch.setattr(multiprocess, "spawn", lambda argv, n, devices: calls.append(argv) or 0)
    argv = ["compare", "--preset", "tiny", "--out", str(tmp_path), "--mesh", "data=2"]
    assert main([*argv, *flag]) == 0
    (child,) = calls
    assert _build_parser().parse_args(child).num_processes == 1


def test_the_processes_keep_xla_flags_but_the_device_count(tmp_path, monkeypatch):
    # Each process sets its own device count (initialize); the caller's other XLA flags
    # (dumps, codegen options) reach every process.
    script = tmp_path / "python"
    script.write_text(
        f"#!{sys.executable}\n"
        "import os, pathlib, sys\n"
        "pid = next(a for a in sys.argv if a.startswith('--process-id=')).split('=')[1]\n"
        f"pathlib.Path({str(tmp_path)!r}, 'flags' + pid).write_text("
        "os.environ.get('XLA_FLAGS', '<unset>'))\n"
    )
    script.chmod(0o755)
    monkeypatch.setattr(multiprocess.sys, "executable", str(script))
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert multiprocess.spawn(["run"], 2, 4) == 0
    for pid in range(2):
        assert (tmp_path / f"flags{pid}").read_text() == "--xla_backend_optimization_level=0"
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert multiprocess.spawn(["run"], 2, 4) == 0
    assert (tmp_path / "flags0").read_text() == "<unset>"
