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
