"""Hugging Face DeepSeek-V3 MoE interop: load both layouts, match HF's forward, export back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sigmoid_moe.interop import from_hf_deepseek_v3_moe, to_hf_deepseek_v3_moe

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
    rng = np.random.default_rng(seed)
    e, d, f = cfg["n_routed_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"]
    fs = f * (cfg["n_shared_experts"] or 0)
    state = {
        "gate.weight": rng.normal(size=(e, d)),
        # Non-negative: HF masks excluded groups with 0.0 and we with -inf; equal then.
        "gate.e_score_correction_bias": rng.random(e) * 0.2,
        "experts.gate_up_proj": rng.normal(size=(e, 2 * f, d)) / np.sqrt(d),
        "experts.down_proj": rng.normal(size=(e, d, f)) / np.sqrt(f),
    }
    if fs:
        state["shared_experts.gate_proj.weight"] = rng.normal(size=(fs, d)) / np.sqrt(d)
        state["shared_experts.up_proj.weight"] = rng.normal(size=(fs, d)) / np.sqrt(d)
        state["shared_experts.down_proj.weight"] = rng.normal(size=(d, fs)) / np.sqrt(fs)
    return {k: v.astype(np.float32) for k, v in state.items()}


def _per_expert(fused):
    f = fused["experts.down_proj"].shape[2]
    out = {k: v for k, v in fused.items() if not k.startswith("experts.")}
    for i, (gate_up, down) in enumerate(
        zip(fused["experts.gate_up_proj"], fused["experts.down_proj"], strict=True)
    ):
        out[f"experts.{i}.gate_proj.weight"] = gate_up[:f]
        out[f"experts.{i}.up_proj.weight"] = gate_up[f:]
        out[f"experts.{i}.down_proj.weight"] = down
    return out


def hf_forward_numpy(cfg, state, x):
    """A line-by-line NumPy transcription of transformers' DeepseekV3MoE.forward (float64)."""
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    linear = lambda v, w: v @ w.T  # noqa: E731  torch F.linear, weight [out, in]
    s = {k: np.asarray(v, np.float64) for k, v in state.items()}
    e, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    n_group, topk_group = cfg["n_group"], cfg["topk_group"]
    h = x.reshape(-1, cfg["hidden_size"]).astype(np.float64)
    scores = 1 / (1 + np.exp(-linear(h, s["gate.weight"])))  # DeepseekV3TopkRouter
    choice = scores + s["gate.e_score_correction_bias"][None]
    grouped = choice.reshape(-1, n_group, e // n_group)
    group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
    group_idx = np.argsort(-group_scores, axis=-1, kind="stable")[:, :topk_group]
    group_mask = np.zeros_like(group_scores)
    np.put_along_axis(group_mask, group_idx, 1, axis=1)
    score_mask = np.repeat(group_mask, e // n_group, axis=1)
    choice = np.where(score_mask > 0, choice, 0.0)
    topk_idx = np.argsort(-choice, axis=-1, kind="stable")[:, :k]
    topk_w = np.take_along_axis(scores, topk_idx, axis=1)
    if cfg["norm_topk_prob"]:
        topk_w = topk_w / (topk_w.sum(-1, keepdims=True) + 1e-20)
    topk_w = topk_w * cfg["routed_scaling_factor"]
    y = np.zeros_like(h)
    f = cfg["moe_intermediate_size"]
    for t in range(len(h)):  # DeepseekV3NaiveMoe: per expert, gather, SwiGLU, index_add
        for j in range(k):
            ex = topk_idx[t, j]
            gate, up = np.split(linear(h[t], s["experts.gate_up_proj"][ex]), [f])
            y[t] += topk_w[t, j] * linear(silu(gate) * up, s["experts.down_proj"][ex])
    if cfg.get("n_shared_experts"):
        shared = silu(linear(h, s["shared_experts.gate_proj.weight"])) * linear(
            h, s["shared_experts.up_proj.weight"]
        )
        y += linear(shared, s["shared_experts.down_proj.weight"])
    return y.reshape(x.shape)


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
