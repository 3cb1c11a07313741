"""benchmarks/accelerator.py, the GPU/TPU check, as far as a CPU-only machine can run it."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accelerator.py"


def test_cpu_only_machine_says_so_and_exits_0():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "no GPU/TPU visible to JAX" in result.stdout


@pytest.fixture
def accelerator(monkeypatch):
    """The script as a module (its directory on sys.path for ``_timing``)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("accelerator_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parity_failure_exits_1(accelerator, capsys):
    # A negative tolerance fails every comparison: the exit status must say so.
    argv = ["--cpu-smoke", "--skip-timing", "--checks", "dropless ragged_dot", "--tolerance", "-1"]
    assert accelerator.main(argv) == 1
    out = capsys.readouterr().out
    assert "FAIL dropless ragged_dot" in out and "accelerator check: FAILED" in out


@pytest.mark.slow
def test_cpu_smoke_runs_every_check_and_timing(accelerator, capsys):
    assert accelerator.main(["--cpu-smoke", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("  PASS ") == 4, out  # dropless, capacity, EP on 1 and 8 devices
    assert "dropped 0 vs 0" not in out.split("capacity batched")[1].splitlines()[0]
    assert "dense SwiGLU" in out and "capacity 1.25 (auto kernel)" in out
    assert "accelerator check: all passed" in out
