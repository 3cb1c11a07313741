"""Peak host memory of loading one layer stays within 2x its dequantised size (issue 14).

Runs ``benchmarks/checkpoint_memory.py`` at a small size: a generated checkpoint about 10x
bigger than one layer (FP8 and bf16), one layer loaded per fresh process, into bf16 and
float32. Both tracemalloc's peak and the resident-set growth are checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_loading_one_layer_peaks_below_twice_its_size():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "checkpoint_memory.py"), "--experts", "32"]
    cmd += ["--d-model", "384", "--d-ff", "192", "--layers", "3", "--other-mb", "48"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.splitlines()[-1])
    assert {(r["stored"], r["param_dtype"]) for r in rows} == {
        (s, d) for s in ("fp8", "bf16") for d in ("bfloat16", "float32")
    }
    for row in rows:
        assert row["layer_bytes"] > 10 * 2**20  # big enough that the ratios mean something
        assert row["traced"] <= 2.0 * row["layer_bytes"], row
        assert row["rss"] <= 2.0 * row["layer_bytes"], row
