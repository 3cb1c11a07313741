"""Balance metrics: hand-worked values, batching, and the uniform-routing noise floor."""

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest

from sigmoid_moe import (
    RouterConfig,
    coefficient_of_variation,
    expert_load,
    idle_experts,
    load_fraction,
    load_stats,
    max_violation,
    route,
    uniform_maxvio_approx,
    uniform_maxvio_floor,
)


def test_hand_worked_values():
    load = jnp.array([4, 2, 2, 0], jnp.int32)  # mean 2, max 4
    assert float(max_violation(load)) == 1.0
    np.testing.assert_allclose(coefficient_of_variation(load), np.std([4, 2, 2, 0]) / 2)
    assert int(idle_experts(load)) == 1
    np.testing.assert_array_equal(load_fraction(load), [0.5, 0.25, 0.25, 0.0])
    balanced = jnp.full((8,), 5, jnp.int32)
    assert float(max_violation(balanced)) == 0.0
    assert float(coefficient_of_variation(balanced)) == 0.0


@pytest.mark.parametrize("fn", [max_violation, coefficient_of_variation, load_fraction])
def test_empty_load_gives_zeros_not_nan(fn):
    out = np.asarray(fn(jnp.zeros((4,), jnp.int32)))
    assert np.all(out == 0)


def test_matches_oracle_over_a_batch_of_loads():
    rng = np.random.default_rng(0)
    loads = rng.integers(0, 100, (5, 3, 16))
    got = load_stats(jnp.asarray(loads, jnp.int32))
    for idx in np.ndindex(5, 3):
        np.testing.assert_allclose(
            got.max_violation[idx], oracle.max_violation(loads[idx]), rtol=1e-6
        )
    np.testing.assert_array_equal(got.idle_experts, (loads == 0).sum(-1))
    np.testing.assert_allclose(got.fraction.sum(-1), 1.0, rtol=1e-6)
    assert got.idle_experts.dtype == jnp.int32


def test_metrics_jit_and_vmap():
    loads = jnp.asarray(np.random.default_rng(1).integers(0, 50, (6, 8)), jnp.int32)
    np.testing.assert_allclose(jax.jit(jax.vmap(max_violation))(loads), max_violation(loads))


@pytest.mark.parametrize("tokens, experts, k", [(4096, 16, 2), (4096, 64, 6), (1024, 8, 1)])
def test_floor_agrees_with_closed_form(tokens, experts, k):
    floor = uniform_maxvio_floor(tokens, experts, k)
    approx = uniform_maxvio_approx(tokens, experts, k)
    assert 0.7 * approx < floor < 1.4 * approx, (floor, approx)


def test_floor_shrinks_with_tokens_and_is_deterministic():
    small, large = uniform_maxvio_floor(512, 16, 2), uniform_maxvio_floor(65536, 16, 2)
    assert large < small / 5  # ~ 1 / sqrt(tokens): a factor sqrt(128) ~ 11
    assert uniform_maxvio_floor(512, 16, 2, seed=3) == uniform_maxvio_floor(512, 16, 2, seed=3)
    assert uniform_maxvio_floor(100, 4, 4) == 0.0 and uniform_maxvio_approx(100, 4, 4) == 0.0


def test_floor_matches_routing_of_iid_logits():
    # A router with iid logits and no bias is uniform random routing: its MaxVio, averaged
    # over draws, is the floor.
    cfg = RouterConfig(num_experts=16, top_k=2)
    logits = jax.random.normal(jax.random.key(0), (32, 2048, 16))
    ids = jax.vmap(lambda x: route(x, None, cfg).expert_ids)(logits)
    vios = jax.vmap(lambda i: max_violation(expert_load(i, 16)))(ids)
    floor = uniform_maxvio_floor(2048, 16, 2)
    assert 0.8 * floor < float(jnp.mean(vios)) < 1.25 * floor


@pytest.mark.parametrize(
    "args, match",
    [((0, 4, 1), "num_tokens must be a positive int"), ((10, 4, 5), "top_k=5 exceeds")],
)
def test_floor_errors(args, match):
    with pytest.raises(ValueError, match=match):
        uniform_maxvio_floor(*args)
    with pytest.raises(ValueError, match=match):
        uniform_maxvio_approx(*args)


def test_scalar_load_is_an_error():
    with pytest.raises(ValueError, match="load must have shape"):
        max_violation(jnp.int32(3))


# --- steps to balance and the trend: the lab's and the harness's one definition ------------


def test_steps_to_balance_hand_worked():
    from sigmoid_moe.metrics import steps_to_balance

    floor = 0.1  # threshold 3x: 0.3
    #          steps 1  2    3    4    5    6    7    8
    series = [1.0, 0.2, 0.2, 0.5, 0.2, 0.1, 0.2, 0.1]
    # window 1: the last step at or above 0.3 is step 4, so balanced for good from step 5
    assert steps_to_balance(series, floor, factor=3.0, window=1) == 5
    # window 2, running means ending at steps 2..8: 0.6 0.2 0.35 0.35 0.15 0.15 0.15; the
    # last one >= 0.3 ends at step 5, so from the window ending at step 6 on
    assert steps_to_balance(series, floor, factor=3.0, window=2) == 6
    # a run whose last window is not below: never; one that always is: its first window
    assert steps_to_balance([*series, 0.9], floor, factor=3.0, window=1) is None
    assert steps_to_balance([0.1] * 5, floor, factor=3.0, window=3) == 3
    # collapsed routing sits far above the floor all along: never (not "its own plateau")
    assert steps_to_balance([2.99] * 50, 0.15) is None
    assert steps_to_balance([], floor) is None
    # a window longer than the series: the whole series' mean
    assert steps_to_balance([0.2, 0.2], floor, factor=3.0, window=20) == 2


def test_trend_hand_worked():
    from sigmoid_moe.metrics import trend

    # window means 10, 8, 6, 4, 2 at centres 1, 3, 5, 7, 9 (window 2): slope exactly -1
    falling = np.repeat([10.0, 8.0, 6.0, 4.0, 2.0], 2)
    t = trend(falling, window=2)
    assert (t.windows, t.window) == (5, 2) and t.slope == pytest.approx(-1.0)
    assert t.low == t.high == pytest.approx(-1.0) and t.verdict == "still falling"
    # window means 1, 3, 2, 3, 1: slope 0 (symmetric), residuals > 0 -> interval around 0
    flat = trend(np.repeat([1.0, 3.0, 2.0, 3.0, 1.0], 4), window=4)
    assert flat.slope == pytest.approx(0.0, abs=1e-12)
    # residuals -1, 1, 0, 1, -1 -> s^2 = 4 / 3; sum of squared centres 4 * 40 = 160
    se = np.sqrt(4 / 3 / 160)
    assert flat.high == pytest.approx(3.182446305284263 * se)  # t(0.975, 3 dof)
    assert flat.verdict == "flat"
    rising = trend(np.arange(100.0) + np.sin(np.arange(100.0)), window=10)
    assert rising.verdict == "still rising"
    # only the last windows count: an early fall does not make a flat end "falling"
    bent = np.concatenate([np.linspace(10, 1, 50), np.ones(50) + 0.1 * np.cos(np.arange(50))])
    assert trend(bent, window=10).verdict == "flat"
    short = trend([1.0, 2.0, 3.0], window=2)  # one window: no slope
    assert short.windows == 1 and np.isnan(short.slope) and short.verdict == "flat"
