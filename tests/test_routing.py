"""route() against the float64 oracle, hand-worked cases, properties and transformations."""

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sigmoid_moe import RouterConfig, route, sigmoid_moe_router


def _fields(cfg: RouterConfig) -> dict:
    return dict(
        top_k=cfg.top_k,
        score_fn=cfg.score_fn,
        bias_mode=cfg.bias_mode,
        normalize=cfg.normalize,
        route_scale=cfg.route_scale,
        num_groups=cfg.num_groups,
        topk_groups=cfg.topk_groups,
        group_score=cfg.group_score,
    )


# Jitted: eager calls compile every primitive for each new shape (~1.4 s a case here,
# against 0.4 s); test_jit_equals_eager below holds the eager path to the jitted one.
_route = jax.jit(route, static_argnums=2)


def _check_against_oracle(logits, bias, cfg, rtol=2e-5):
    got = _route(jnp.asarray(logits), jnp.asarray(bias, jnp.float32), cfg)
    logits64 = np.asarray(jnp.asarray(logits, jnp.float32), np.float64)  # the values routed
    want_ids, want_w = oracle.route(logits64, np.asarray(bias, np.float64), **_fields(cfg))
    np.testing.assert_array_equal(np.asarray(got.expert_ids), want_ids)
    np.testing.assert_allclose(np.asarray(got.weights), want_w, rtol=rtol, atol=1e-7)
    assert got.expert_ids.dtype == jnp.int32
    assert got.weights.dtype == jnp.float32


CONFIGS = [
    RouterConfig(num_experts=1, top_k=1),
    RouterConfig(num_experts=4, top_k=4),
    RouterConfig(num_experts=8, top_k=2),
    RouterConfig(num_experts=8, top_k=2, normalize=False, route_scale=2.5),
    RouterConfig(num_experts=16, top_k=6, route_scale=2.5),
    RouterConfig(num_experts=16, top_k=4, num_groups=4, topk_groups=2),
    RouterConfig(num_experts=16, top_k=4, num_groups=4, topk_groups=2, group_score="max"),
    RouterConfig(num_experts=16, top_k=4, num_groups=4, topk_groups=2, group_score="topk_sum"),
    RouterConfig(num_experts=8, top_k=3, num_groups=8, topk_groups=3),  # one-expert groups
    RouterConfig(num_experts=32, top_k=8, num_groups=8, topk_groups=4, route_scale=2.5),
    RouterConfig(num_experts=8, top_k=2, bias_mode="logit"),
    RouterConfig(num_experts=16, top_k=4, bias_mode="logit", num_groups=4, topk_groups=2),
    RouterConfig(num_experts=8, top_k=2, score_fn="softmax"),
    RouterConfig(num_experts=8, top_k=2, score_fn="softmax", normalize=False),
    RouterConfig(num_experts=8, top_k=2, score_fn="softmax", bias_mode="logit"),
    RouterConfig(num_experts=40, top_k=20),  # k beyond the iterative top-k
]


@pytest.mark.parametrize(
    "cfg",
    CONFIGS,
    ids=lambda c: (
        f"E{c.num_experts}k{c.top_k}{c.score_fn[:3]}{c.bias_mode[:3]}g{c.num_groups}{c.group_score}"
    ),
)
@pytest.mark.parametrize("shape", [(1,), (37,), (3, 5)])
def test_matches_oracle(cfg, shape):
    rng = np.random.default_rng(cfg.num_experts * 100 + cfg.top_k + len(shape))
    logits = rng.normal(size=(*shape, cfg.num_experts)) * 2
    bias = rng.normal(size=cfg.num_experts) * 0.3
    _check_against_oracle(logits.astype(np.float32), bias, cfg)


@pytest.mark.parametrize("cfg", CONFIGS[:12], ids=str)
def test_exact_ties_go_to_lower_index(cfg):
    # Logits drawn from three values give many exact ties in scores and group scores.
    rng = np.random.default_rng(7)
    logits = rng.integers(-1, 2, size=(64, cfg.num_experts)).astype(np.float32)
    _check_against_oracle(logits, np.zeros(cfg.num_experts), cfg)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_portable_path_matches_oracle(cfg, monkeypatch):
    # The pure-JAX top-k that GPU and TPU programs run (on CPU the native kernel serves, and
    # the tests above check it): the same oracle, ties included. The flag is read at trace
    # time, so the shapes are ones no other test traces `_route` with.
    monkeypatch.setenv("SIGMOID_MOE_NATIVE", "0")
    rng = np.random.default_rng(11)
    ties = rng.integers(-1, 2, size=(66, cfg.num_experts)).astype(np.float32)
    _check_against_oracle(ties, np.zeros(cfg.num_experts), cfg)
    normal = (rng.normal(size=(39, cfg.num_experts)) * 2).astype(np.float32)
    _check_against_oracle(normal, rng.normal(size=cfg.num_experts) * 0.3, cfg)
    lowered = jax.jit(lambda x: route(x, None, cfg)).lower(jnp.asarray(ties)).as_text()
    assert "sigmoid_moe_top_k" not in lowered


def test_all_equal_scores_pick_the_first_experts():
    cfg = RouterConfig(num_experts=6, top_k=3)
    got = route(jnp.zeros((2, 6)), None, cfg)
    np.testing.assert_array_equal(got.expert_ids, [[0, 1, 2], [0, 1, 2]])
    np.testing.assert_allclose(got.weights, 1 / 3)


def test_saturated_sigmoid_weights_stay_normalised():
    # sigmoid(-200) underflows float32 to 0; 0/0 would be NaN and a +1e-20 guard gives 0.
    cfg = RouterConfig(num_experts=4, top_k=1)
    got = route(jnp.full((3, 4), -200.0), None, cfg)
    np.testing.assert_array_equal(got.weights, np.ones((3, 1), np.float32))
    cfg2 = RouterConfig(num_experts=4, top_k=2, route_scale=2.5)
    logits = np.array([[-200.0, -201.0, -300.0, -250.0]], np.float32)
    got2 = route(logits, None, cfg2)
    # log sigmoid(x) ~ x down there: weights ~ softmax(-200, -201) = (0.731, 0.269).
    e = np.exp(-1.0)
    np.testing.assert_allclose(got2.weights, [[2.5 / (1 + e), 2.5 * e / (1 + e)]], rtol=1e-6)
    assert np.all(np.isfinite(got2.weights))


def test_reference_function_saturated_matches_float64_reference():
    # The reference in float64 gives weight 1.0 at logit -200 for k=1.
    ids, weights = sigmoid_moe_router([[1.0]], [[1.0], [0.5]], [-201.0, -200.6], 1)
    # logits: -200.0 and -200.1, both sigmoid-underflow in float32.
    assert ids == [[0]] and weights == [[1.0]]


def test_selection_weights_are_unbiased_scores():
    # E=4, k=2, logits 0 -> every score 0.5. Bias favours experts 3 and 2 for selection,
    # but the weights are the unbiased scores: 0.5 / (0.5 + 0.5) = 0.5 each.
    cfg = RouterConfig(num_experts=4, top_k=2)
    bias = jnp.array([0.0, 0.1, 0.2, 0.3])
    logits = jnp.array([[0.0, 0.0, 0.0, 1.0]])
    got = route(logits, bias, cfg)
    np.testing.assert_array_equal(got.expert_ids, [[3, 2]])
    s3 = 1 / (1 + np.exp(-1.0))
    np.testing.assert_allclose(got.weights, [[s3 / (s3 + 0.5), 0.5 / (s3 + 0.5)]], rtol=1e-6)
    # In logit mode the bias enters the sigmoid and so the weights.
    cfg_logit = RouterConfig(num_experts=4, top_k=2, bias_mode="logit")
    got_logit = route(logits, bias, cfg_logit)
    s_b = 1 / (1 + np.exp(-np.array([1.3, 0.2])))
    np.testing.assert_allclose(got_logit.weights, [s_b / s_b.sum()], rtol=1e-6)


def test_negative_bias_with_group_limiting_never_picks_excluded_experts():
    # Groups {0,1} {2,3} {4,5} {6,7}; keep 1. Every bias is -1, so biased scores are < 0.
    # Filling excluded experts with 0.0 (a shipped bug) would make them win; -inf cannot.
    cfg = RouterConfig(num_experts=8, top_k=2, num_groups=4, topk_groups=1)
    logits = jnp.array([[3.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    got = route(logits, -jnp.ones(8), cfg)
    np.testing.assert_array_equal(got.expert_ids, [[0, 1]])
    _check_against_oracle(np.asarray(logits), -np.ones(8), cfg)


def test_one_expert_groups_use_their_single_score():
    # top2_sum over a one-expert group is that expert's score (HF's topk(2) crashes here).
    cfg = RouterConfig(num_experts=4, top_k=2, num_groups=4, topk_groups=2)
    got = route(jnp.array([[0.0, 3.0, -1.0, 2.0]]), None, cfg)
    np.testing.assert_array_equal(got.expert_ids, [[1, 3]])


def test_group_limit_can_override_the_global_top_k():
    # Group 0 = {0,1} has the single best expert but a weak partner: top2 sums are
    # g0: s(4) + s(-4) = 0.982 + 0.018 = 1.000; g1: s(2) + s(2) = 0.881 * 2 = 1.762.
    cfg = RouterConfig(num_experts=4, top_k=2, num_groups=2, topk_groups=1)
    got = route(jnp.array([[4.0, -4.0, 2.0, 2.0]]), None, cfg)
    np.testing.assert_array_equal(got.expert_ids, [[2, 3]])


def test_bf16_input_is_routed_in_float32():
    cfg = RouterConfig(num_experts=16, top_k=4, num_groups=4, topk_groups=2)
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(32, 16)), jnp.bfloat16)
    bias = np.asarray(rng.normal(size=16) * 0.1, np.float32)
    got = route(logits, bias, cfg)
    assert got.weights.dtype == jnp.float32 and got.scores.dtype == jnp.float32
    _check_against_oracle(logits, bias, cfg)


def test_reference_function_matches_the_reference():
    rng = np.random.default_rng(11)
    for tokens, experts, dim, k in [(5, 4, 3, 2), (8, 8, 6, 3), (3, 5, 2, 5), (4, 1, 2, 1)]:
        x = rng.normal(size=(tokens, dim)).tolist()
        w = rng.normal(size=(experts, dim)).tolist()
        b = (rng.normal(size=experts) * 0.5).tolist()
        ids, weights = sigmoid_moe_router(x, w, b, k)
        want_ids, want_w = oracle.reference_router(x, w, b, k)
        assert ids == want_ids
        np.testing.assert_allclose(weights, want_w, rtol=1e-5)
        assert isinstance(ids[0][0], int) and isinstance(weights[0][0], float)


def test_reference_function_bad_input():
    with pytest.raises(ValueError, match="expert_bias"):
        sigmoid_moe_router([[1.0, 2.0]], [[1.0, 0.0]], [0.0, 0.0], 1)
    with pytest.raises(ValueError, match="same d"):
        sigmoid_moe_router([[1.0, 2.0]], [[1.0]], [0.0], 1)
    with pytest.raises(ValueError, match="top_k"):
        sigmoid_moe_router([[1.0]], [[1.0]], [0.0], 2)


# ---------------------------------------------------------------------------- properties


# The property tests below draw the same cases (one seed, one strategy, nothing else
# drawn), so a case's compiled `_route` serves all of them on a worker (one xdist group).
# test_jit_equals_eager runs fewer examples, so hypothesis draws it other cases.
SAME_CASES = hypothesis.seed(20261201)
_properties = pytest.mark.xdist_group("routing_properties")


@st.composite
def router_cases(draw):
    num_groups = draw(st.sampled_from([1, 2, 4]))
    per_group = draw(st.integers(1, 4))
    num_experts = num_groups * per_group
    topk_groups = draw(st.integers(1, num_groups))
    top_k = draw(st.integers(1, topk_groups * per_group))
    cfg = RouterConfig(
        num_experts=num_experts,
        top_k=top_k,
        num_groups=num_groups,
        topk_groups=topk_groups,
        score_fn=draw(st.sampled_from(["sigmoid", "softmax"])),
        route_scale=draw(st.sampled_from([1.0, 2.5])),
    )
    tokens = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(tokens, num_experts)) * 3).astype(np.float32)
    bias = (rng.normal(size=num_experts) * 0.5).astype(np.float32)
    return cfg, logits, bias, seed


@_properties
@SAME_CASES
@given(router_cases())
def test_ids_unique_in_range_and_weights_sum_to_scale(case):
    cfg, logits, bias, _ = case
    got = _route(logits, bias, cfg)
    ids = np.asarray(got.expert_ids)
    assert ids.min() >= 0 and ids.max() < cfg.num_experts
    assert all(len(set(row)) == cfg.top_k for row in ids.tolist())
    np.testing.assert_allclose(np.asarray(got.weights).sum(-1), cfg.route_scale, rtol=1e-5)


@_properties
@SAME_CASES
@given(router_cases())
def test_selection_bias_changes_choice_never_the_weight_formula(case):
    cfg, logits, bias, _ = case
    got = _route(logits, bias, cfg)
    # Unbiased scores (a zero bias: the same compiled program as the biased call).
    scores = np.asarray(_route(logits, np.zeros_like(bias), cfg).scores)
    chosen = np.take_along_axis(scores, np.asarray(got.expert_ids), -1)
    want = cfg.route_scale * chosen / chosen.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(got.weights), want, rtol=2e-5, atol=1e-7)


@_properties
@SAME_CASES
@given(router_cases())
def test_constant_bias_shift_changes_nothing(case):
    cfg, logits, _, seed = case
    shift = np.random.default_rng(seed + 1).uniform(-4, 4)
    shift = np.float32(np.round(shift * 4) / 4)  # exact in float32: no rounding ties
    logits = np.round(logits * 8) / 8
    base = _route(logits, jnp.zeros(cfg.num_experts), cfg)
    shifted = _route(logits, jnp.full(cfg.num_experts, shift), cfg)
    np.testing.assert_array_equal(base.expert_ids, shifted.expert_ids)
    np.testing.assert_array_equal(base.weights, shifted.weights)


@_properties
@SAME_CASES
@given(router_cases())
def test_permuting_tokens_permutes_routing(case):
    cfg, logits, bias, seed = case
    perm = np.random.default_rng(seed + 2).permutation(len(logits))
    got = _route(logits, bias, cfg)
    permuted = _route(logits[perm], bias, cfg)
    np.testing.assert_array_equal(np.asarray(got.expert_ids)[perm], permuted.expert_ids)
    np.testing.assert_array_equal(np.asarray(got.weights)[perm], permuted.weights)


@_properties
@SAME_CASES
@settings(max_examples=15)  # eager: every new shape compiles each primitive (~1.4 s)
@given(router_cases())
def test_jit_equals_eager(case):
    cfg, logits, bias, _ = case
    eager = route(logits, bias, cfg)
    jitted = _route(logits, bias, cfg)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_array_equal(a, b)


def test_vmap_over_a_leading_axis_equals_batched_call():
    cfg = RouterConfig(num_experts=16, top_k=4, num_groups=4, topk_groups=2)
    logits = jax.random.normal(jax.random.key(0), (3, 10, 16))
    bias = jax.random.normal(jax.random.key(1), (16,)) * 0.1
    mapped = jax.jit(jax.vmap(lambda x: route(x, bias, cfg)))(logits)
    batched = _route(logits, bias, cfg)
    for a, b in zip(mapped, batched, strict=True):
        np.testing.assert_array_equal(a, b)
    # vmap over per-layer biases too
    biases = jax.random.normal(jax.random.key(2), (3, 16))
    per_layer = jax.jit(jax.vmap(lambda x, b: route(x, b, cfg)))(logits, biases)
    for i in range(3):
        np.testing.assert_array_equal(
            per_layer.expert_ids[i], _route(logits[i], biases[i], cfg).expert_ids
        )


@pytest.mark.parametrize("cfg", [CONFIGS[4], CONFIGS[9], CONFIGS[11], CONFIGS[12]], ids=str)
def test_gradients_reach_logits_not_bias(cfg):
    logits = jax.random.normal(jax.random.key(0), (6, cfg.num_experts))
    bias = jax.random.normal(jax.random.key(1), (cfg.num_experts,)) * 0.2
    target = jax.random.normal(jax.random.key(2), (6, cfg.top_k))

    @jax.jit
    def loss(logits, bias):
        return jnp.sum(route(logits, bias, cfg).weights * target)

    g_logits, g_bias = jax.jit(jax.grad(loss, argnums=(0, 1)))(logits, bias)
    assert np.all(np.isfinite(g_logits)) and np.any(g_logits != 0)
    np.testing.assert_array_equal(g_bias, np.zeros(cfg.num_experts))
    # Finite differences agree on a logit that does not change the selection.
    eps = 1e-3
    t, e = 0, int(_route(logits, bias, cfg).expert_ids[0, 0])
    bumped = logits.at[t, e].add(eps)
    fd = (loss(bumped, bias) - loss(logits.at[t, e].add(-eps), bias)) / (2 * eps)
    np.testing.assert_allclose(g_logits[t, e], fd, rtol=2e-2, atol=1e-4)


def test_saturated_gradient_is_finite():
    cfg = RouterConfig(num_experts=4, top_k=2)
    g = jax.grad(lambda x: route(x, None, cfg).weights[..., 0].sum())(jnp.full((2, 4), -200.0))
    assert np.all(np.isfinite(g))


def test_no_recompilation_with_new_values():
    cfg = RouterConfig(num_experts=16, top_k=4, num_groups=4, topk_groups=2)
    fn = jax.jit(lambda x, b: route(x, b, cfg))
    fn(jnp.zeros((8, 16)), jnp.zeros(16))
    fn(jnp.ones((8, 16)), jnp.ones(16))
    fn(jax.random.normal(jax.random.key(0), (8, 16)), jnp.full(16, 0.5, jnp.float32))
    assert fn._cache_size() == 1


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_experts=4, top_k=5), ValueError, "top_k=5 exceeds num_experts=4"),
        (dict(num_experts=4, top_k=0), ValueError, "top_k must be >= 1"),
        (dict(num_experts=0, top_k=1), ValueError, "num_experts must be >= 1"),
        (dict(num_experts=4.0, top_k=1), TypeError, "num_experts must be an int"),
        (dict(num_experts=6, top_k=1, num_groups=4), ValueError, "does not divide"),
        (dict(num_experts=8, top_k=1, num_groups=4, topk_groups=5), ValueError, "topk_groups=5"),
        (dict(num_experts=8, top_k=5, num_groups=4, topk_groups=2), ValueError, "fewer than top_k"),
        (dict(num_experts=8, top_k=2, score_fn="relu"), ValueError, "score_fn='relu'"),
        (dict(num_experts=8, top_k=2, bias_mode="gate"), ValueError, "bias_mode='gate'"),
        (dict(num_experts=8, top_k=2, group_score="mean"), ValueError, "group_score='mean'"),
        (dict(num_experts=8, top_k=2, route_scale=0.0), ValueError, "route_scale"),
        (dict(num_experts=8, top_k=2, route_scale=float("nan")), ValueError, "route_scale"),
        (dict(num_experts=8, top_k=2, normalize=1), TypeError, "normalize"),
        (
            dict(num_experts=8, top_k=3, num_groups=4, topk_groups=2, group_score="topk_sum"),
            ValueError,
            "divide top_k",
        ),
    ],
)
def test_config_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        RouterConfig(**kwargs)


def test_input_errors():
    cfg = RouterConfig(num_experts=4, top_k=2)
    with pytest.raises(ValueError, match=r"shape \[..., num_experts=4\]"):
        route(jnp.zeros((3, 5)), None, cfg)
    with pytest.raises(ValueError, match=r"bias must have shape"):
        route(jnp.zeros((3, 4)), jnp.zeros(5), cfg)
    with pytest.raises(TypeError, match="floating"):
        route(jnp.zeros((3, 4), jnp.int32), None, cfg)
    with pytest.raises(TypeError, match="bias must be floating"):
        route(jnp.zeros((3, 4)), jnp.zeros(4, jnp.int32), cfg)
    with pytest.raises(TypeError, match="RouterConfig"):
        route(jnp.zeros((3, 4)), None, {"num_experts": 4})
    with pytest.raises(ValueError, match="num_experts=4"):
        route(jnp.zeros(()), None, cfg)


def test_config_is_frozen_and_hashable():
    cfg = RouterConfig(num_experts=4, top_k=2)
    with pytest.raises(AttributeError):
        cfg.top_k = 3
    assert hash(cfg) == hash(RouterConfig(num_experts=4, top_k=2))


def test_from_hf_deepseek_v3_config():
    hf = {
        "n_routed_experts": 256,
        "num_experts_per_tok": 8,
        "n_group": 8,
        "topk_group": 4,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "hidden_size": 7168,
    }
    cfg = RouterConfig.from_hf(hf)
    assert cfg == RouterConfig(
        num_experts=256, top_k=8, num_groups=8, topk_groups=4, route_scale=2.5
    )
    moonlight = dict(hf, n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1)
    assert RouterConfig.from_hf(moonlight).num_experts == 64
    assert RouterConfig.from_hf(hf, route_scale=1.0).route_scale == 1.0
    with pytest.raises(ValueError, match="n_routed_experts"):
        RouterConfig.from_hf({"hidden_size": 8})
    with pytest.raises(ValueError, match="score_fn='relu'"):
        RouterConfig.from_hf(dict(hf, scoring_func="relu"))
