"""The notebooks run top to bottom on small settings (jupytext + nbclient)."""

from __future__ import annotations

import os
import pathlib

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "notebooks").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.setenv("SIGMOID_MOE_NB_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # One CPU device in the kernel, whatever the test process simulates; LLVM at -O0, as
    # in the test process (conftest.py): the same values, compiled faster.
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    notebook = jupytext.read(path)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()
    errors = [
        out
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors
    assert len(NOTEBOOKS) >= 2 and os.path.exists(path)
