"""State-dict interop: both layouts, HF's forward, export back, every tensor used or refused.

Hugging Face parity runs twice: against ``tests/fixtures/hf/`` (what transformers
computed, recorded by ``tests/make_hf_fixtures.py``) on every run, without torch; and
live against transformers when torch is installed.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_checkpoints import hf_forward_numpy, moe_state, per_expert

from sigmoid_moe import RouterConfig, route
from sigmoid_moe.interop import from_hf_deepseek_v3_moe, load_moe_layers, to_hf_deepseek_v3_moe

HF_CONFIG = {
    "hidden_size": 8,
    "moe_intermediate_size": 4,
    "n_routed_experts": 8,
    "num_experts_per_tok": 3,
    "n_shared_experts": 2,
    "n_group": 4,
    "topk_group": 2,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
}


def _fused_state(seed, cfg=HF_CONFIG):
    return moe_state(cfg, seed)


_per_expert = per_expert


@nnx.jit
def _call(layer, x):
    return layer(x)[0]


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_matches_hf_forward(layout, dispatch):
    fused = _fused_state(0)
    state = fused if layout == "fused" else _per_expert(fused)
    layer = from_hf_deepseek_v3_moe(HF_CONFIG, state, dispatch=dispatch, capacity_factor=8 / 3)
    x = np.random.default_rng(1).normal(size=(2, 5, 8)).astype(np.float32)
    want = hf_forward_numpy(HF_CONFIG, fused, x)
    np.testing.assert_allclose(np.asarray(_call(layer, jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


def test_no_shared_experts_and_prefix():
    cfg = dict(HF_CONFIG, n_shared_experts=None, n_group=1, topk_group=1)
    fused = _fused_state(2, cfg)
    prefixed = {f"model.layers.3.mlp.{k}": v for k, v in fused.items()}
    prefixed["model.layers.4.mlp.gate.weight"] = np.zeros((1,))  # another layer: ignored
    layer = from_hf_deepseek_v3_moe(cfg, prefixed, prefix="model.layers.3.mlp.")
    assert layer.shared_w_in_df is None
    x = np.random.default_rng(3).normal(size=(7, 8)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(_call(layer, jnp.asarray(x))),
        hf_forward_numpy(cfg, fused, x),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
def test_export_round_trip(layout):
    fused = _fused_state(4)
    want = fused if layout == "fused" else _per_expert(fused)
    layer = from_hf_deepseek_v3_moe(HF_CONFIG, want)
    got = to_hf_deepseek_v3_moe(layer, layout=layout)
    assert set(got) == set(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)  # a pure relayout: bit-exact
    assert got["gate.e_score_correction_bias"].dtype == np.float32


def test_bf16_params_keep_float32_bias():
    fused = _fused_state(5)
    fused["gate.e_score_correction_bias"] = np.float32(
        [1e-3 + 0.5] * 8
    )  # not representable in bf16
    layer = from_hf_deepseek_v3_moe(HF_CONFIG, fused, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    assert layer.w_in_edf[...].dtype == jnp.bfloat16
    out = to_hf_deepseek_v3_moe(layer)
    assert out["gate.e_score_correction_bias"].dtype == np.float32
    np.testing.assert_array_equal(
        out["gate.e_score_correction_bias"], fused["gate.e_score_correction_bias"]
    )


def test_bad_state_dicts():
    fused = _fused_state(6)
    with pytest.raises(KeyError, match="gate.weight"):
        from_hf_deepseek_v3_moe(HF_CONFIG, {k: v for k, v in fused.items() if k != "gate.weight"})
    # down_proj given as [E, F, d] instead of torch's [E, d, F].
    bad = dict(fused, **{"experts.down_proj": fused["experts.down_proj"].transpose(0, 2, 1)})
    with pytest.raises(ValueError, match=r"experts.down_proj.*\(8, 8, 4\)"):
        from_hf_deepseek_v3_moe(HF_CONFIG, bad)
    with pytest.raises(ValueError, match="hidden_act"):
        from_hf_deepseek_v3_moe(dict(HF_CONFIG, hidden_act="gelu"), fused)
    with pytest.raises(ValueError, match="layout"):
        to_hf_deepseek_v3_moe(from_hf_deepseek_v3_moe(HF_CONFIG, fused), layout="gguf")


def test_parity_with_transformers():
    torch = pytest.importorskip("torch")
    modeling = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    hf_config = DeepseekV3Config(**HF_CONFIG, num_hidden_layers=1, intermediate_size=16)
    torch.manual_seed(0)
    module = modeling.DeepseekV3MoE(hf_config).eval()
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0, 0.3)
        module.gate.e_score_correction_bias.uniform_(0, 0.2)
    state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    layer = from_hf_deepseek_v3_moe(hf_config, state)
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(_call(layer, jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
    jax.tree.map(np.asarray, to_hf_deepseek_v3_moe(layer))  # exports without torch


# --- Issue 12: interop never drops weights -------------------------------------------


def test_shared_experts_without_n_shared_experts_are_refused():
    fused = _fused_state(7)  # has shared-expert tensors
    for cfg in (dict(HF_CONFIG, n_shared_experts=0), dict(HF_CONFIG, n_shared_experts=None)):
        with pytest.raises(ValueError, match=r"n_shared_experts is 0 or absent.*shared_experts"):
            from_hf_deepseek_v3_moe(cfg, fused)


def test_missing_bias_is_refused_unless_opted_in():
    fused = _fused_state(8)
    del fused["gate.e_score_correction_bias"]
    with pytest.raises(ValueError, match="e_score_correction_bias.*allow_missing_bias"):
        from_hf_deepseek_v3_moe(HF_CONFIG, fused)
    layer = from_hf_deepseek_v3_moe(HF_CONFIG, fused, allow_missing_bias=True)
    np.testing.assert_array_equal(np.asarray(layer.bias_e[...]), np.zeros(8, np.float32))
    x = np.random.default_rng(9).normal(size=(6, 8)).astype(np.float32)
    want = hf_forward_numpy(
        HF_CONFIG, dict(fused, **{"gate.e_score_correction_bias": np.zeros(8)}), x
    )
    np.testing.assert_allclose(np.asarray(_call(layer, jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "extra",
    [
        {"experts.0.gate_proj.bias": np.zeros(4)},  # unknown
        {"gate.bias": np.zeros(8)},  # unknown
        {"experts.0.gate_proj.weight": np.zeros((4, 8))},  # per-expert beside fused: unused
        {"experts.gate_up_proj_scale_inv": np.ones((8, 1, 1), np.float32)},  # scale, not FP8
    ],
)
def test_unknown_or_unused_keys_are_listed(extra):
    fused = dict(_fused_state(10), **extra)
    with pytest.raises(ValueError, match=re.escape(repr(next(iter(extra))))):
        from_hf_deepseek_v3_moe(HF_CONFIG, fused)


def test_state_dict_types_are_checked():
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        from_hf_deepseek_v3_moe(HF_CONFIG, None)
    with pytest.raises(TypeError, match="config must be a Hugging Face config"):
        from_hf_deepseek_v3_moe(None, _fused_state(11))
    cfg = {k: v for k, v in HF_CONFIG.items() if k != "hidden_size"}
    with pytest.raises(ValueError, match="'hidden_size'"):
        from_hf_deepseek_v3_moe(cfg, _fused_state(11))
    bad = dict(_fused_state(11), **{"gate.weight": np.zeros((8, 8), np.int32)})
    with pytest.raises(ValueError, match="int32"):
        from_hf_deepseek_v3_moe(HF_CONFIG, bad)


def test_bias_for_a_family_without_one_is_refused():
    cfg = dict(HF_CONFIG, model_type="deepseek_v2", scoring_func="softmax", norm_topk_prob=False)
    with pytest.raises(ValueError, match="e_score_correction_bias, which DeepSeek-V2"):
        from_hf_deepseek_v3_moe(cfg, _fused_state(12))


# --- Hugging Face's own code, recorded: tests/fixtures/hf (no torch needed) ------------

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf"
BLOCK_CASES = [
    "deepseek_v3",
    "kimi_k2",
    "glm4_moe",
    "deepseek_v2_greedy",
    "deepseek_v2_group_limited",
]


def _fixture(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``(meta, arrays)`` of ``fixtures/hf/<name>.npz`` (see tests/make_hf_fixtures.py)."""
    with np.load(FIXTURES / f"{name}.npz") as npz:  # no pickles
        arrays = {key: npz[key] for key in npz.files}
    return json.loads(str(arrays.pop("meta"))), arrays


def _state(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k.removeprefix("state/"): v for k, v in arrays.items() if k.startswith("state/")}


@nnx.jit
def _forward(layer, x):
    return layer(x)


def test_fixtures_are_the_files_the_script_wrote():
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(path.name for path in FIXTURES.glob("*.npz"))
    assert set(manifest["files"]) == {f"{case}.npz" for case in BLOCK_CASES} | {"folder.npz"}
    for name, entry in manifest["files"].items():
        data = (FIXTURES / name).read_bytes()
        assert len(data) == entry["bytes"] < 100_000, name
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{name} changed"
        meta, _ = _fixture(name.removesuffix(".npz"))
        assert meta["versions"] == manifest["versions"], name
    assert set(manifest["versions"]) == {"torch", "transformers", "numpy", "python"}


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_matches_transformers_recorded(case):
    meta, arrays = _fixture(case)
    state, x = _state(arrays), arrays["x"]
    layer = from_hf_deepseek_v3_moe(meta["config"], state)
    y, aux = _forward(layer, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), arrays["y"], rtol=1e-5, atol=1e-5)
    # The router's choice too, so that no two errors can cancel in the output.
    # transformers' top-k is unsorted: compare per token in expert order.
    order = np.argsort(arrays["topk_indices"], axis=-1)
    want_ids = np.take_along_axis(arrays["topk_indices"], order, axis=-1)
    want_weights = np.take_along_axis(arrays["topk_weights"], order, axis=-1)
    got_ids = np.asarray(aux.expert_ids).reshape(want_ids.shape)
    np.testing.assert_array_equal(np.sort(got_ids, axis=-1), want_ids)
    routing = route(
        jnp.asarray(x.reshape(-1, x.shape[-1]) @ state["gate.weight"].T),
        state.get("gate.e_score_correction_bias"),
        RouterConfig.from_hf(meta["config"]),
    )
    got_order = np.argsort(np.asarray(routing.expert_ids), axis=-1)
    np.testing.assert_array_equal(np.sort(np.asarray(routing.expert_ids), axis=-1), want_ids)
    np.testing.assert_allclose(
        np.take_along_axis(np.asarray(routing.weights), got_order, axis=-1),
        want_weights,
        rtol=1e-5,
        atol=1e-6,
    )


def test_loads_a_save_pretrained_folder_recorded(tmp_path):
    meta, arrays = _fixture("folder")
    for key, data in arrays.items():
        if key.startswith("file/"):  # the folder as transformers' save_pretrained wrote it
            (tmp_path / key.removeprefix("file/")).write_bytes(data.tobytes())
    layers = load_moe_layers(tmp_path, param_dtype=jnp.float32)
    assert sorted(layers) == meta["moe_layers"] == [1, 2]
    for i, layer in layers.items():
        y = _call(layer, jnp.asarray(arrays["x"]))
        np.testing.assert_allclose(np.asarray(y), arrays[f"y/{i}"], rtol=1e-5, atol=1e-5)


def test_recorded_fixtures_are_what_transformers_computes_now():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from make_hf_fixtures import hf_block, run_block

    for case in BLOCK_CASES:
        meta, arrays = _fixture(case)
        got = run_block(hf_block(case, meta["config"], _state(arrays)), arrays["x"])
        np.testing.assert_allclose(got["y"], arrays["y"], rtol=1e-6, atol=1e-6, err_msg=case)
        np.testing.assert_array_equal(got["topk_indices"], arrays["topk_indices"], case)
        np.testing.assert_allclose(
            got["topk_weights"], arrays["topk_weights"], rtol=1e-6, err_msg=case
        )
