"""Load counting and the bias update: oracle parity, exactness, scope, dynamics, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import oracle
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

from sigmoid_moe import (
    BIAS_RULES,
    RouterConfig,
    expert_load,
    max_violation,
    route,
    uniform_maxvio_floor,
    update_bias,
)

# ------------------------------------------------------------------------- expert_load


@pytest.mark.parametrize("shape, num_experts, k", [((10,), 4, 2), ((3, 7), 16, 4), ((1,), 1, 1)])
def test_expert_load_matches_oracle(shape, num_experts, k):
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(num_experts)[:k] for _ in range(int(np.prod(shape)))])
    ids = ids.reshape(*shape, k)
    mask = rng.random(shape) < 0.7
    for token_mask in (None, mask):
        got = expert_load(jnp.asarray(ids), num_experts, token_mask=token_mask)
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(got, oracle.expert_load(ids, num_experts, token_mask))


def test_expert_load_counts_all_assignments_and_ignores_masked_tokens():
    ids = jnp.array([[0, 1], [1, 2], [3, 0]])
    np.testing.assert_array_equal(expert_load(ids, 4), [2, 2, 1, 1])
    np.testing.assert_array_equal(
        expert_load(ids, 4, token_mask=jnp.array([True, False, True])), [2, 1, 0, 1]
    )


def test_expert_load_is_exact_beyond_float32_integers():
    # 2**24 + 1 tokens on expert 0 would round to 2**24 in a float32 accumulator.
    n = 2**24 + 1
    ids = jnp.zeros((n, 1), jnp.int32)
    assert int(jax.jit(expert_load, static_argnums=1)(ids, 2)[0]) == n


def test_expert_load_errors():
    with pytest.raises(TypeError, match="expert_ids must be integer"):
        expert_load(jnp.zeros((3, 2)), 4)
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        expert_load(jnp.zeros((3, 2), jnp.int32), 0)
    with pytest.raises(ValueError, match="token_mask must have the token shape"):
        expert_load(jnp.zeros((3, 2), jnp.int32), 4, token_mask=jnp.ones((2,), bool))


# ------------------------------------------------------------------------- update_bias


def test_hand_worked_sign_update():
    # loads 3, 1, 2, 2: mean 2, so expert 0 is over-loaded, expert 1 under, 2 and 3 exact.
    bias = jnp.array([0.1, 0.0, -0.2, 0.5], jnp.float32)
    new = update_bias(bias, jnp.array([3, 1, 2, 2]), rate=0.01)
    np.testing.assert_array_equal(
        new, np.float32([0.1, 0.0, -0.2, 0.5]) + np.float32([-0.01, 0.01, 0, 0])
    )
    assert new.dtype == jnp.float32


def test_hand_worked_other_rules():
    load = jnp.array([3, 1, 2, 2])
    zero = jnp.zeros(4, jnp.float32)
    # sign_zero_mean: [-1, 1, 0, 0] has mean 0 already; [6, 0, 0, 0] gives [-1, 1, 1, 1] - 0.5.
    np.testing.assert_allclose(
        update_bias(zero, load, rate=1.0, rule="sign_zero_mean"), [-1, 1, 0, 0]
    )
    np.testing.assert_allclose(
        update_bias(zero, jnp.array([6, 0, 0, 0]), rate=1.0, rule="sign_zero_mean"),
        [-1.5, 0.5, 0.5, 0.5],
    )
    # proportional: (mean - load) / mean = [-0.5, 0.5, 0, 0].
    np.testing.assert_allclose(
        update_bias(zero, load, rate=0.1, rule="proportional"), [-0.05, 0.05, 0, 0], rtol=1e-6
    )
    # No tokens at all: nothing moves (no 0/0).
    for rule in BIAS_RULES:
        np.testing.assert_array_equal(
            update_bias(zero, jnp.zeros(4, jnp.int32), rate=1.0, rule=rule), zero
        )


def test_sign_is_exact_where_a_float32_mean_is_not():
    # mean = 2**24 + 1/3; in float32 it rounds to 2**24 and the two experts at 2**24
    # would look balanced (sign 0). The integer comparison sees them under-loaded.
    load = jnp.array([2**24 + 1, 2**24, 2**24], jnp.int32)
    assert float(jnp.mean(load.astype(jnp.float32))) == 2**24  # the trap
    new = update_bias(jnp.zeros(3, jnp.float32), load, rate=1.0)
    np.testing.assert_array_equal(new, [-1.0, 1.0, 1.0])
    # And a load exactly at a non-integer-free mean: [5, 4, 3] -> mean 4, middle is 0.
    np.testing.assert_array_equal(
        update_bias(jnp.zeros(3, jnp.float32), jnp.array([5, 4, 3]), rate=1.0), [-1, 0, 1]
    )


@given(
    load=st.lists(st.integers(0, 10_000), min_size=1, max_size=40),
    rate=st.sampled_from([0.0, 1e-4, 1e-3, 0.05]),
    rule=st.sampled_from(BIAS_RULES),
    bias_scale=st.sampled_from([0.0, 0.3]),
)
def test_update_matches_float64_oracle(load, rate, rule, bias_scale):
    load = np.array(load, np.int64)
    bias = (bias_scale * np.linspace(-1, 1, len(load))).astype(np.float32)
    got = update_bias(jnp.asarray(bias), jnp.asarray(load, jnp.int32), rate=rate, rule=rule)
    want = oracle.update_bias(bias, load, rate, rule)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=1e-7)
    if rule == "sign_zero_mean":
        np.testing.assert_allclose(np.mean(np.asarray(got) - bias), 0.0, atol=1e-6)


@given(load=st.lists(st.integers(0, 1000), min_size=2, max_size=32), shift=st.integers(1, 50))
def test_adding_tokens_to_one_expert_never_raises_its_bias_more(load, shift):
    # Monotone feedback: an expert that receives more tokens gets a lower (or equal) update.
    load = np.array(load)
    more = load.copy()
    more[0] += shift
    zero = jnp.zeros(len(load), jnp.float32)
    for rule in BIAS_RULES:
        a = update_bias(zero, jnp.asarray(load), rate=0.1, rule=rule)[0]
        b = update_bias(zero, jnp.asarray(more), rate=0.1, rule=rule)[0]
        assert float(b) <= float(a) + 1e-6  # float rounding of (mean - load) / mean


def test_rate_schedule_freezes_the_bias_like_deepseek_v3():
    schedule = optax.piecewise_constant_schedule(1e-3, {5: 0.0})
    bias, load = jnp.zeros(2, jnp.float32), jnp.array([3, 1])
    moved = update_bias(bias, load, rate=schedule, step=4)
    frozen = update_bias(bias, load, rate=schedule, step=5)
    np.testing.assert_allclose(moved, [-1e-3, 1e-3])
    np.testing.assert_array_equal(frozen, bias)
    # A traced step works under jit.
    jitted = jax.jit(lambda s: update_bias(bias, load, rate=schedule, step=s))
    np.testing.assert_array_equal(jitted(jnp.int32(5)), bias)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(bias=jnp.zeros(4, jnp.bfloat16)), TypeError, "bias must be float32"),
        (dict(load=jnp.ones(4, jnp.float32)), TypeError, "load must be integer"),
        (dict(load=jnp.ones(3, jnp.int32)), ValueError, "shape \\[E\\]"),
        (dict(rate=-1e-3), ValueError, "rate must be >= 0"),
        (dict(rate=float("nan")), ValueError, "rate must be >= 0"),
        (dict(rate="1e-3"), TypeError, "rate must be a float"),
        (dict(rule="sigmoid"), ValueError, "rule='sigmoid' is not supported"),
        (dict(rate=optax.constant_schedule(1e-3)), ValueError, "pass step="),
    ],
)
def test_update_errors(kwargs, error, match):
    args = dict(bias=jnp.zeros(4, jnp.float32), load=jnp.ones(4, jnp.int32), rate=1e-3)
    args.update(kwargs)
    bias, load = args.pop("bias"), args.pop("load")
    with pytest.raises(error, match=match):
        update_bias(bias, load, **args)


# ------------------------------------------------------------- counting scope (global)


def _sharded_update(mesh, axis_names, ids_tk, num_experts, rate):
    """Each device counts its own tokens; update_bias psums them over ``axis_names``."""
    bias = jnp.zeros((num_experts,), jnp.float32)

    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(P(axis_names), P()),
        out_specs=P(axis_names),
    )
    def step(ids_local, bias):
        load_local = expert_load(ids_local, num_experts)
        new = update_bias(bias, load_local, rate=rate, axis_name=axis_names)
        return new[None]  # one row per device, to compare the replicas

    ids_tk = jax.device_put(ids_tk, jax.NamedSharding(mesh, P(axis_names)))
    bias = jax.device_put(bias, jax.NamedSharding(mesh, P()))
    return jax.jit(step)(ids_tk, bias)


@pytest.mark.parametrize("mesh_shape", [(8,), (2, 4)])
def test_global_load_update_is_identical_on_every_replica(mesh_shape):
    names = ("data", "expert")[: len(mesh_shape)] if len(mesh_shape) > 1 else ("data",)
    mesh = jax.make_mesh(mesh_shape, names)
    num_experts = 8
    rng = np.random.default_rng(1)
    # Skewed per-device loads: no device alone is representative of the global batch.
    ids = np.stack([rng.choice(num_experts, 2, replace=False, p=_skew(i)) for i in range(64)])
    ids = jnp.asarray(ids, jnp.int32)
    rows = np.asarray(_sharded_update(mesh, names, ids, num_experts, rate=1e-3))
    want = update_bias(
        jnp.zeros(num_experts, jnp.float32), expert_load(ids, num_experts), rate=1e-3
    )
    assert rows.shape == (8, num_experts)
    for row in rows:
        np.testing.assert_array_equal(row, want)  # bit-identical on every replica


def _skew(i: int) -> np.ndarray:
    p = np.ones(8)
    p[(i // 8) % 8] = 10.0  # each device (8 tokens) favours a different expert
    return p / p.sum()


def test_micro_batches_sum_loads_before_the_sign():
    # Four micro-batches: the sign of the summed load differs from the sum of the signs.
    micro = np.array([[4, 0, 2], [4, 0, 2], [4, 0, 2], [0, 12, 0]], np.int32)
    bias = jnp.zeros(3, jnp.float32)
    whole = update_bias(bias, jnp.asarray(micro.sum(0)), rate=1.0)  # loads 12, 12, 6
    np.testing.assert_array_equal(whole, [-1, -1, 1])
    sum_of_signs = sum(np.asarray(update_bias(bias, jnp.asarray(m), rate=1.0)) for m in micro)
    assert not np.array_equal(sum_of_signs, whole)  # the bug this guards against
    # Counting the four micro-batches of one global batch = counting the batch at once.
    rng = np.random.default_rng(2)
    ids = jnp.asarray(rng.integers(0, 16, (64, 2)), jnp.int32)
    summed = sum(expert_load(chunk, 16) for chunk in jnp.split(ids, 4))
    np.testing.assert_array_equal(summed, expert_load(ids, 16))


# ----------------------------------------------------------------------------- dynamics


def _balance_run(logits_te, cfg, rate, steps):
    def body(bias, _):
        routing = route(logits_te, bias, cfg)
        load = expert_load(routing.expert_ids, cfg.num_experts)
        return update_bias(bias, load, rate=rate), max_violation(load)

    bias0 = jnp.zeros((cfg.num_experts,), jnp.float32)
    return jax.jit(lambda b: jax.lax.scan(body, b, None, length=steps))(bias0)


@pytest.mark.parametrize(
    "cfg",
    [
        RouterConfig(num_experts=16, top_k=2),
        RouterConfig(num_experts=16, top_k=4, num_groups=4, topk_groups=2),
    ],
)
def test_sign_rule_balances_a_skewed_router(cfg):
    key_x, key_p = jax.random.split(jax.random.key(0))
    tokens = 2048
    preference = 1.5 * jax.random.normal(key_p, (cfg.num_experts,))
    logits = jax.random.normal(key_x, (tokens, cfg.num_experts)) + preference
    bias, maxvio = _balance_run(logits, cfg, rate=1e-2, steps=300)
    maxvio = np.asarray(maxvio)
    floor = uniform_maxvio_floor(tokens, cfg.num_experts, cfg.top_k)
    assert maxvio[0] > 1.0  # badly skewed to start with
    # Converged: the last 50 steps sit within a few noise floors (the sign rule jitters
    # by about one rate step around balance).
    assert maxvio[-50:].mean() < 3 * floor + 0.1, (maxvio[-50:].mean(), floor)
    # Favoured experts end with the lowest bias.
    assert np.corrcoef(np.asarray(bias), np.asarray(preference))[0, 1] < -0.8


def test_negated_rule_collapses_routing():
    # A flipped sign is positive feedback: the over-loaded experts win ever more tokens.
    cfg = RouterConfig(num_experts=8, top_k=2)
    logits = jax.random.normal(jax.random.key(3), (1024, 8))

    def body(bias, _):
        load = expert_load(route(logits, bias, cfg).expert_ids, 8)
        return bias - (update_bias(bias, load, rate=1e-2) - bias), load

    _, loads = jax.lax.scan(body, jnp.zeros(8, jnp.float32), None, length=200)
    first, last = max_violation(loads[0]), max_violation(loads[-1])
    assert float(first) < 0.3  # iid logits start near balance
    # Every over-loaded expert keeps rising: the rest end with no token at all.
    assert float(last) > 1.0 and int(jnp.sum(loads[-1] == 0)) >= 3


def test_grouped_loads_average_the_groups_steps():
    # Two groups: the global sign (loads summed) and the mean of the groups' signs differ.
    groups = jnp.array([[6, 0, 0], [0, 1, 5]], jnp.int32)
    bias = jnp.zeros(3, jnp.float32)
    per_group = np.stack([np.asarray(update_bias(bias, g, rate=1.0)) for g in groups])
    np.testing.assert_array_equal(update_bias(bias, groups, rate=1.0), per_group.mean(axis=0))
    np.testing.assert_array_equal(per_group.mean(axis=0), [0.0, 1.0, 0.0])
    np.testing.assert_array_equal(update_bias(bias, groups.sum(0), rate=1.0), [-1.0, 1.0, -1.0])
    for rule in BIAS_RULES:
        got = update_bias(bias, groups, rate=0.5, rule=rule)
        want = np.mean([np.asarray(update_bias(bias, g, rate=0.5, rule=rule)) for g in groups], 0)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match=r"\[G, E\]"):
        update_bias(bias, jnp.ones((2, 2, 3), jnp.int32), rate=1.0)
