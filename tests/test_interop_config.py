"""RouterConfig.from_hf and the layer fields of config.json: families, strict types, defaults."""

from __future__ import annotations

import pytest

from sigmoid_moe import RouterConfig
from sigmoid_moe.interop import moe_layer_indices

# Routing fields as the published config.json files give them.
DEEPSEEK_V3 = {
    "model_type": "deepseek_v3",
    "n_routed_experts": 256,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "num_nextn_predict_layers": 1,
}
MOONLIGHT = dict(
    DEEPSEEK_V3,
    n_routed_experts=64,
    num_experts_per_tok=6,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=2.446,
    num_hidden_layers=27,
    first_k_dense_replace=1,
)
KIMI_K2 = dict(
    DEEPSEEK_V3,
    model_type="kimi_k2",
    n_routed_experts=384,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=2.827,
    first_k_dense_replace=1,
)
GLM_45 = {  # glm4_moe configs carry no scoring_func / topk_method
    "model_type": "glm4_moe",
    "n_routed_experts": 160,
    "num_experts_per_tok": 8,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "num_hidden_layers": 92,
    "first_k_dense_replace": 3,
}
DEEPSEEK_V2 = {
    "model_type": "deepseek_v2",
    "n_routed_experts": 160,
    "num_experts_per_tok": 6,
    "n_group": 8,
    "topk_group": 3,
    "topk_method": "group_limited_greedy",
    "scoring_func": "softmax",
    "norm_topk_prob": False,
    "routed_scaling_factor": 16.0,
}
DEEPSEEK_V2_LITE = dict(
    DEEPSEEK_V2,
    n_routed_experts=64,
    n_group=1,
    topk_group=1,
    topk_method="greedy",
    routed_scaling_factor=1.0,
)


@pytest.mark.parametrize(
    "hf, want",
    [
        (DEEPSEEK_V3, RouterConfig(256, 8, num_groups=8, topk_groups=4, route_scale=2.5)),
        (MOONLIGHT, RouterConfig(64, 6, route_scale=2.446)),
        (KIMI_K2, RouterConfig(384, 8, route_scale=2.827)),
        (GLM_45, RouterConfig(160, 8, route_scale=2.5)),
        (
            DEEPSEEK_V2,
            RouterConfig(
                160,
                6,
                score_fn="softmax",
                normalize=False,
                route_scale=16.0,
                num_groups=8,
                topk_groups=3,
                group_score="max",
            ),
        ),
        (DEEPSEEK_V2_LITE, RouterConfig(64, 6, score_fn="softmax", normalize=False)),
        # V2 greedy never reads n_group: a config that leaves it at 8 still routes plainly.
        (
            dict(DEEPSEEK_V2_LITE, n_group=8, topk_group=3),
            RouterConfig(64, 6, score_fn="softmax", normalize=False),
        ),
    ],
    ids=["v3", "moonlight", "kimi_k2", "glm45", "v2", "v2_lite", "v2_greedy_ignores_groups"],
)
def test_families_map_to_their_router(hf, want):
    assert RouterConfig.from_hf(hf) == want


def test_absent_optional_keys_take_documented_defaults():
    base = {"n_routed_experts": 8, "num_experts_per_tok": 2}
    # No model_type: DeepSeek-V3 (sigmoid, noaux_tc, norm_topk_prob true, scale 1, 1 group).
    assert RouterConfig.from_hf(base) == RouterConfig(8, 2)
    nulls = dict(base, n_group=None, topk_group=None, routed_scaling_factor=None)
    assert RouterConfig.from_hf(nulls) == RouterConfig(8, 2)  # null reads as absent
    v2 = dict(base, model_type="deepseek_v2")  # softmax, greedy, norm_topk_prob false
    assert RouterConfig.from_hf(v2) == RouterConfig(8, 2, score_fn="softmax", normalize=False)
    assert RouterConfig.from_hf(dict(base, n_group=4, topk_group=2)).group_limited
    assert RouterConfig.from_hf(DEEPSEEK_V3, route_scale=1.0).route_scale == 1.0  # override


@pytest.mark.parametrize(
    "key, value, error",
    [
        ("n_routed_experts", 8.7, TypeError),
        ("n_routed_experts", True, TypeError),
        ("n_routed_experts", "256", TypeError),
        ("n_routed_experts", [256], TypeError),
        ("n_routed_experts", 0, ValueError),
        ("num_experts_per_tok", 8.0, TypeError),
        ("num_experts_per_tok", -1, ValueError),
        ("norm_topk_prob", "false", TypeError),
        ("norm_topk_prob", 0, TypeError),
        ("routed_scaling_factor", 0, ValueError),
        ("routed_scaling_factor", -2.5, ValueError),
        ("routed_scaling_factor", float("inf"), ValueError),
        ("routed_scaling_factor", "2.5", TypeError),
        ("routed_scaling_factor", True, TypeError),
        ("n_group", 0, ValueError),
        ("n_group", 8.0, TypeError),
        ("topk_group", 0, ValueError),
        ("topk_group", 9, ValueError),
        ("scoring_func", 1, TypeError),
        ("scoring_func", "softmax", ValueError),  # V3 code runs sigmoid only
        ("scoring_func", "relu", ValueError),
        ("topk_method", "greedy", ValueError),  # V2's method on a V3 config
        ("topk_method", "gready", ValueError),
        ("model_type", "mixtral", ValueError),
        ("model_type", 3, TypeError),
    ],
)
def test_bad_values_name_the_hf_key(key, value, error):
    with pytest.raises(error, match=f"'?{key}'?"):
        RouterConfig.from_hf(dict(DEEPSEEK_V3, **{key: value}))


def test_family_variants_are_refused_not_guessed():
    with pytest.raises(ValueError, match="topk_method='noaux_tc'.*deepseek_v2"):
        RouterConfig.from_hf(dict(DEEPSEEK_V2, topk_method="noaux_tc"))
    with pytest.raises(ValueError, match="scoring_func='sigmoid'.*deepseek_v2"):
        RouterConfig.from_hf(dict(DEEPSEEK_V2, scoring_func="sigmoid"))
    with pytest.raises(ValueError, match="n_group=8 but no 'topk_group'"):
        RouterConfig.from_hf({k: v for k, v in DEEPSEEK_V3.items() if k != "topk_group"})
    with pytest.raises(ValueError, match="missing 'n_routed_experts'"):
        RouterConfig.from_hf({"hidden_size": 8})
    with pytest.raises(TypeError, match="dict-like|Hugging Face config"):
        RouterConfig.from_hf(None)


def test_disagreements_between_reference_and_transformers_need_an_explicit_choice():
    v2_norm = dict(DEEPSEEK_V2, norm_topk_prob=True)
    with pytest.raises(ValueError, match="ambiguous.*normalize=True, route_scale=1.0"):
        RouterConfig.from_hf(v2_norm)
    assert RouterConfig.from_hf(v2_norm, normalize=True, route_scale=1.0).normalize
    top1 = dict(DEEPSEEK_V3, num_experts_per_tok=1, n_group=1, topk_group=1)
    with pytest.raises(ValueError, match="num_experts_per_tok=1 is ambiguous"):
        RouterConfig.from_hf(top1)
    assert not RouterConfig.from_hf(top1, normalize=False).normalize
    assert not RouterConfig.from_hf(dict(top1, norm_topk_prob=False)).normalize


def test_moe_layer_indices_follow_first_k_dense_replace_and_moe_layer_freq():
    assert moe_layer_indices(DEEPSEEK_V3) == tuple(range(3, 61))
    assert moe_layer_indices(DEEPSEEK_V3, include_mtp=True) == tuple(range(3, 62))
    assert moe_layer_indices(MOONLIGHT) == tuple(range(1, 27))
    # i >= first_k_dense_replace and i % moe_layer_freq == 0 (DeepSeek's decoder layer rule).
    assert moe_layer_indices(dict(MOONLIGHT, num_hidden_layers=8, moe_layer_freq=2)) == (2, 4, 6)
    assert moe_layer_indices({"num_hidden_layers": 4}) == ()  # dense model
    with pytest.raises(ValueError, match="'moe_layer_freq'"):
        moe_layer_indices(dict(MOONLIGHT, moe_layer_freq=0))
    with pytest.raises(TypeError, match="'first_k_dense_replace'"):
        moe_layer_indices(dict(MOONLIGHT, first_k_dense_replace="1"))
    with pytest.raises(ValueError, match="'num_hidden_layers'"):
        moe_layer_indices({"n_routed_experts": 8})
