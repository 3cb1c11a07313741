"""The notebooks run top to bottom on small settings (jupytext + nbclient) and compute
what their text says.

Each notebook runs with one more cell at its end that prints, as JSON, the values the
test asserts on, read from the notebook's own variables. A cell that raises fails the
test (nbclient raises ``CellExecutionError``).

With ``SIGMOID_MOE_EXECUTED_NOTEBOOKS`` set to a folder, each executed notebook (without
the extra cell) is written there as ``<name>.ipynb``, with the sha256 of its source in
its metadata; the docs build (docs/conf.py) renders those outputs instead of executing
the notebooks again when the source has not changed. ``.ci/run`` sets it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import textwrap

import jupytext
import nbclient
import nbformat
import numpy as np
import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"

# Run after the notebook, in its kernel: the values each test below asserts on.
PROBES = {
    "routing_walkthrough": """
        same = jnp.all(unbiased.expert_ids == biased.expert_ids, axis=-1)
        plain = route(x_td[:4] @ w_de, None, RouterConfig(E, K))
        print(json.dumps({
            "same_choice_sigmoid_softmax": bool(jnp.all(sig.expert_ids == soft.expert_ids)),
            "weight_sums": np.asarray(sig.weights.sum(-1)).tolist(),
            "load_before": np.asarray(before).tolist(),
            "load_after": np.asarray(after).tolist(),
            "unchanged_tokens": int(same.sum()),
            "unchanged_weights_equal": bool(
                jnp.all(jnp.where(same[:, None], unbiased.weights == biased.weights, True))
            ),
            "groups_per_token": [len(set(row)) for row in per_token.tolist()],
            "reference_indices": indices,
            "route_indices": np.asarray(plain.expert_ids).tolist(),
            "reference_gate_sums": [sum(row) for row in gate],
        }))
    """,
    "load_balancing": """
        steps = {
            str(r): np.unique(np.round(np.abs(np.diff(runs[r][0], axis=0)) / r, 4)).tolist()
            for r in rates
        }
        print(json.dumps({
            "tokens": TOKENS,
            "steps_in_units_of_u": steps,
            "first_maxvio": {str(r): float(runs[r][1][0]) for r in rates},
            "final_maxvio": {str(r): float(runs[r][1][-10:].mean()) for r in rates},
            "floor": float(floor),
            "lab_shape": list(np.shape(trajectory.max_violation)),
            "lab_first": np.asarray(trajectory.max_violation[:, 0]).tolist(),
            "lab_last": np.asarray(trajectory.max_violation[:, -5:].mean(-1)).tolist(),
            "layer_biases": [
                np.asarray(model.encoder_moe.bias_e[...]).tolist(),
                np.asarray(model.decoder_moe.bias_e[...]).tolist(),
            ],
            "model_steps": len(history),
            "train_losses": [m["loss"] for m in metrics],
        }))
    """,
}


def _executed(name: str, tmp_path: pathlib.Path) -> dict:
    """Runs notebook ``name`` and its probe; returns the probe's values."""
    path = NOTEBOOK_DIR / f"{name}.py"
    notebook = jupytext.read(path)
    probe = "import json\n" + textwrap.dedent(PROBES[name])
    notebook.cells.append(nbformat.v4.new_code_cell(probe))
    nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    ).execute()
    outputs = notebook.cells.pop().outputs
    text = "".join(out.get("text", "") for out in outputs if out.get("name") == "stdout")
    if folder := os.environ.get("SIGMOID_MOE_EXECUTED_NOTEBOOKS"):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        notebook.metadata["sigmoid_moe"] = {"source_sha256": digest}
        pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, pathlib.Path(folder) / f"{name}.ipynb")
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture
def notebook_env(monkeypatch):
    monkeypatch.setenv("SIGMOID_MOE_NB_SMALL", "1")
    # No MPLBACKEND: the kernel's inline backend renders each figure as a PNG output,
    # which the docs show (it needs no display).
    monkeypatch.delenv("MPLBACKEND", raising=False)
    # One CPU device in the kernel, whatever the test process simulates; LLVM at -O0, as
    # in the test process (conftest.py): the same values, compiled faster.
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")


def test_every_notebook_is_checked():
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.py")) == sorted(PROBES)


@pytest.mark.slow
def test_routing_walkthrough(notebook_env, tmp_path):
    got = _executed("routing_walkthrough", tmp_path)
    # 1. Sigmoid and softmax are both monotone in the logit: the same experts; the chosen
    # weights are renormalised to 1 either way.
    assert got["same_choice_sigmoid_softmax"]
    np.testing.assert_allclose(got["weight_sums"], 1.0, rtol=1e-6)
    # 2. A bias of -0.3 on the favourite (expert 15) moves tokens off it, none lost; the
    # tokens whose choice did not change keep bit-identical weights (and there are some).
    before, after = got["load_before"], got["load_after"]
    assert after[15] < before[15] / 2 and sum(after) == sum(before) == 256 * 2
    assert 0 < got["unchanged_tokens"] < 256 and got["unchanged_weights_equal"]
    # 3. One group of four kept per token: both experts of every token in it.
    assert got["groups_per_token"] == [1] * 256
    # 4. The reference problem's function: the experts route() picks without a bias,
    # gates summing to 1.
    assert got["reference_indices"] == got["route_indices"]
    np.testing.assert_allclose(got["reference_gate_sums"], 1.0, rtol=1e-6)


@pytest.mark.slow
def test_load_balancing(notebook_env, tmp_path):
    got = _executed("load_balancing", tmp_path)
    # The sign rule: each step moves each bias by exactly 0 or u.
    assert all(set(units) <= {0.0, 1.0} for units in got["steps_in_units_of_u"].values())
    # Faster rates balance faster in 60 steps; u = 1e-2 gets within 1.5x of the floor of
    # uniform routing, from more than 4x above it.
    first, final, floor = got["first_maxvio"], got["final_maxvio"], got["floor"]
    assert final["0.01"] < final["0.001"] < final["0.0001"]
    assert first["0.01"] > 4 * floor and final["0.01"] < 1.5 * floor
    # The lab: 8 (rule, rate) configurations x 40 steps, each ending better balanced.
    assert got["lab_shape"] == [8, 40]
    assert all(last < first for first, last in zip(got["lab_first"], got["lab_last"], strict=True))
    # Each layer's bias moved by its own loads: whole steps of 1e-2, and not the same.
    encoder, decoder = np.asarray(got["layer_biases"])
    assert got["model_steps"] == 20 and not np.array_equal(encoder, decoder)
    for bias in (encoder, decoder):
        assert np.any(bias != 0)
        np.testing.assert_allclose(bias / 1e-2, np.round(bias / 1e-2), atol=1e-3)
    # The real training run: 20 finite steps that lower the loss.
    losses = got["train_losses"]
    assert len(losses) == 20 and np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 1
