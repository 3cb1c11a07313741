"""benchmarks/accelerator.py, the GPU/TPU check, as far as a CPU-only machine can run it."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
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
    argv = ["--cpu-smoke", "--skip-timing", "--checks", "capacity", "--tolerance", "-1"]
    assert accelerator.main(argv) == 1
    out = capsys.readouterr().out
    assert "FAIL capacity 1.25 batched, float32" in out and "accelerator check: FAILED" in out
    assert "PASS capacity 1.25 batched, bfloat16" in out  # its own bound


def test_dense_fallback_detector_on_cpu_ragged_dot(accelerator):
    """XLA:CPU computes ragged_dot as a masked dot over all experts: the detector sees the
    experts folded into the contraction; the batched capacity buffer [E, C, d] is not one."""
    e, m, k, n = 8, 64, 16, 24
    x, w = jnp.ones((m, k)), jnp.ones((e, k, n))
    ragged = jax.jit(lambda x, w: jax.lax.ragged_dot(x, w, jnp.full((e,), m // e, jnp.int32)))
    info = accelerator.inspect(ragged.lower(x, w).compile(), e, m, (k, n))
    assert info.dense_dots and "dot" in info.largest_dot and info.memory_bytes > 0
    batched = jax.jit(lambda x, w: jnp.einsum("ecd,edf->ecf", x.reshape(e, m // e, k), w))
    assert not accelerator.inspect(batched.lower(x, w).compile(), e, m, (k, n)).dense_dots
    # [E, rows, width], as XLA:GPU's RaggedToDense rewrite builds it, and a router's [T, E].
    assert accelerator.dense_fallback([(e, m, k)], e, m, (k, n))
    assert not accelerator.dense_fallback([(m, e), (k, e)], e, m, (k, n))


def test_memory_check_skips_with_the_reason(accelerator, capsys):
    """A device too small for the programs: every variant is skipped, nothing crashes."""
    shape = accelerator.SMOKE_TIMING_SHAPES[0]
    limit = (accelerator.input_bytes(shape) + 1) / accelerator.GiB
    argv = ["--cpu-smoke", "--checks", "none", "--repeats", "1", "--memory-limit-gib", str(limit)]
    assert accelerator.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("    SKIP ") == 1 + len(accelerator.variants("cpu")), out
    assert "its program needs" in out and " ms " not in out  # nothing ran
    tiny = ["--cpu-smoke", "--checks", "none", "--memory-limit-gib", "1e-9"]
    assert accelerator.main(tiny) == 0
    assert "inputs, parameters and gradients alone need" in capsys.readouterr().out


@pytest.mark.slow
def test_cpu_smoke_runs_every_check_and_timing(accelerator, capsys):
    assert accelerator.main(["--cpu-smoke", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    # triton (interpreted), ragged_dot: bf16 and f32; ragged_dot with the cuDNN fusion
    # flag: bf16; capacity batched: bf16 and f32; EP on 1 and 8 devices.
    assert out.count("  PASS ") == 9, out
    assert "dropped 0 vs 0" not in out.split("capacity 1.25 batched, bfloat16")[1].splitlines()[0]
    printed = _variant_blocks(out.split("[2]")[1])
    assert set(printed) == {"dense SwiGLU d_ff=16"} | {v.name for v in accelerator.variants("cpu")}
    # XLA:CPU makes ragged_dot dense, with or without the (GPU) flag; the others are not.
    assert all("DENSE FALLBACK" in printed[n] for n in printed if "ragged_dot" in n)
    assert not any("DENSE FALLBACK" in printed[n] for n in printed if "ragged_dot" not in n)
    assert all("custom calls:" in block and "temporaries" in block for block in printed.values())
    assert "accelerator check: all passed" in out


def _variant_blocks(section: str) -> dict[str, str]:
    """Timing section -> {variant name: its lines (time, compiled program)}."""
    blocks, name = {}, None
    for line in section.splitlines():
        if line.startswith("    ") and not line.startswith("      "):
            name = line.strip().split("  ")[0]
            blocks[name] = line
        elif name and line.startswith("      "):
            blocks[name] += "\n" + line
    return blocks
