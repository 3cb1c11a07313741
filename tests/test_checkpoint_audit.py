"""experiments/checkpoint_audit.py on a generated folder: its numbers against a NumPy oracle."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from hf_checkpoints import V3_CONFIG, fused_from_truth, hf_route, moe_state, write_folder

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "checkpoint_audit.py"
spec = importlib.util.spec_from_file_location("checkpoint_audit", SCRIPT)
checkpoint_audit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(checkpoint_audit)

# A bias big enough to change some choices: [0, 0.2) from moe_state, plus a push on expert 0.
CFG = dict(V3_CONFIG, n_group=1, topk_group=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    layers = {i: moe_state(CFG, seed=i) for i in (1, 2)}
    layers[2]["gate.e_score_correction_bias"][0] = 0.3
    truth = write_folder(path, CFG, layers, stored="fp8")
    return path, truth


def _json(capsys, argv):
    assert checkpoint_audit.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _oracle(truth, layer, h):
    state = fused_from_truth(truth, f"model.layers.{layer}.mlp.", CFG)
    biased = np.sort(hf_route(CFG, state, h)[0], axis=-1)
    no_bias = dict(state, **{"gate.e_score_correction_bias": np.zeros(8)})
    raw = np.sort(hf_route(CFG, no_bias, h)[0], axis=-1)
    load = np.bincount(biased.ravel(), minlength=8)
    return state, np.mean(np.any(biased != raw, axis=-1)), load.max() / load.mean() - 1


def test_hidden_states_audit_matches_the_oracle(folder, tmp_path, capsys):
    path, truth = folder
    h = np.random.default_rng(0).normal(size=(64, CFG["hidden_size"])).astype(np.float32)
    np.savez(tmp_path / "h.npz", layer_1=h, layer_2=h)
    out = _json(capsys, [str(path), "--hidden", str(tmp_path / "h.npz")])
    assert out["inputs"] == "hidden states" and [r["layer"] for r in out["layers"]] == [1, 2]
    for row in out["layers"]:
        state, changed, maxvio = _oracle(truth, row["layer"], h)
        bias = state["gate.e_score_correction_bias"]
        assert (row["bias_min"], row["bias_max"]) == (float(bias.min()), float(bias.max()))
        assert row["topk_changed"] == pytest.approx(changed, abs=1e-12)
        assert row["maxvio"] == pytest.approx(maxvio)
    assert 0 < out["layers"][1]["topk_changed"] < 1  # the pushed bias changes some choices
    router_only = _json(capsys, [str(path), "--hidden", str(tmp_path / "h.npz"), "--router-only"])
    assert router_only["layers"] == out["layers"]


def test_token_ids_use_the_embedding_proxy(folder, capsys):
    path, _ = folder
    assert checkpoint_audit.main([str(path), "--token-ids", "1,5,9,5,63", "--layers", "2"]) == 0
    text = capsys.readouterr().out
    assert "5 tokens (embedding proxy)" in text and "| 2 | 8 |" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--token-ids", "1,x"], "--token-ids must be comma-separated ints"),
        (["--token-ids", "64"], "token ids must be"),
        (["--token-ids", "1", "--layers", "0"], "--layers 0 is not an MoE layer"),
        (["--hidden", "missing.npz"], "--hidden missing.npz does not exist"),
        (["--text", "hello"], "--text needs"),
    ],
)
def test_bad_input_exits_2_with_one_line(folder, capsys, argv, message):
    path, _ = folder
    assert checkpoint_audit.main([str(path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert checkpoint_audit.main(["/nonexistent", "--token-ids", "1"]) == 2
    assert "/nonexistent does not exist" in capsys.readouterr().err
