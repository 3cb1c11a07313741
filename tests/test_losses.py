"""Auxiliary losses against NumPy oracles; balance value, gradients, masks, global scope."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sigmoid_moe import (
    RouterConfig,
    global_batch_balance_loss,
    load_balancing_loss,
    route,
    router_probs,
    router_z_loss,
    sequence_balance_loss,
)


def _switch_oracle(probs, ids, mask=None):
    """Float64, token by token: N/(K T) * sum_i count_i * mean_t p_ti."""
    probs, ids = np.asarray(probs, np.float64), np.asarray(ids)
    num_experts, k = probs.shape[-1], ids.shape[-1]
    probs, ids = probs.reshape(-1, num_experts), ids.reshape(-1, k)
    mask = np.ones(len(probs), bool) if mask is None else np.asarray(mask).reshape(-1)
    tokens = mask.sum()
    count = np.zeros(num_experts)
    for row, keep in zip(ids, mask, strict=True):
        if keep:
            for e in row:
                count[e] += 1
    mean_prob = probs[mask].sum(0) / max(tokens, 1)
    return float(num_experts / (k * max(tokens, 1)) * np.sum(count * mean_prob))


def _routed(shape, num_experts=8, k=2, seed=0, score_fn="softmax"):
    cfg = RouterConfig(num_experts=num_experts, top_k=k, score_fn=score_fn)
    logits = jax.random.normal(jax.random.key(seed), (*shape, num_experts))
    routing = route(logits, None, cfg)
    return logits, router_probs(routing.scores), routing.expert_ids


def test_router_probs_sum_to_one_and_survive_zeros():
    _, probs, _ = _routed((16,), score_fn="sigmoid")
    np.testing.assert_allclose(jnp.sum(probs, -1), 1.0, rtol=1e-6)
    assert np.all(np.isfinite(router_probs(jnp.zeros((2, 4)))))


@pytest.mark.parametrize("masked", [False, True])
def test_switch_loss_matches_oracle(masked):
    _, probs, ids = _routed((4, 9))
    mask = np.random.default_rng(0).random((4, 9)) < 0.6 if masked else None
    got = load_balancing_loss(probs, ids, None if mask is None else jnp.asarray(mask))
    np.testing.assert_allclose(float(got), _switch_oracle(probs, ids, mask), rtol=1e-5)


def test_switch_loss_is_one_at_perfect_balance_and_larger_when_skewed():
    # 4 tokens, 4 experts, k=1, each expert once, uniform probabilities: f_i = P_i = ... = 1.
    probs = jnp.full((4, 4), 0.25)
    ids = jnp.array([[0], [1], [2], [3]])
    np.testing.assert_allclose(load_balancing_loss(probs, ids), 1.0, rtol=1e-6)
    collapsed_probs = jnp.tile(jnp.array([0.7, 0.1, 0.1, 0.1]), (4, 1))
    collapsed = load_balancing_loss(collapsed_probs, jnp.zeros((4, 1), jnp.int32))
    np.testing.assert_allclose(collapsed, 4 * 0.7, rtol=1e-6)


def test_gradients_flow_through_probs_only():
    logits, probs, ids = _routed((32,))
    grad = jax.grad(load_balancing_loss)(probs, ids)
    # dL/dp_ti = N/(K T) * count_i / T: the same for every token, counts are constants.
    count = np.bincount(np.asarray(ids).ravel(), minlength=8)
    want = 8 / (2 * 32) * count / 32
    np.testing.assert_allclose(grad, np.broadcast_to(want, grad.shape), rtol=1e-5)
    # And through the router logits the gradient is finite and non-zero.
    cfg = RouterConfig(num_experts=8, top_k=2, score_fn="softmax")

    def loss_of_logits(x):
        r = route(x, None, cfg)
        return load_balancing_loss(router_probs(r.scores), r.expert_ids)

    g = jax.grad(loss_of_logits)(logits)
    assert np.all(np.isfinite(g)) and float(jnp.abs(g).sum()) > 0


def test_sequence_loss_is_the_mean_of_per_sequence_losses():
    _, probs, ids = _routed((3, 10), score_fn="sigmoid")
    mask = np.ones((3, 10), bool)
    mask[1, 6:] = False
    mask[2, :] = False  # an all-padding sequence is left out of the mean
    got = sequence_balance_loss(probs, ids, jnp.asarray(mask))
    want = np.mean([_switch_oracle(probs[b], ids[b], mask[b]) for b in range(2)])
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_global_batch_loss_uses_global_counts_and_local_probs():
    mesh = jax.make_mesh((8,), ("data",))
    _, probs, ids = _routed((64,), seed=3)

    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data")
    )
    def per_device(p, i):
        return global_batch_balance_loss(p, i, axis_name="data")[None]

    sharded = lambda a: jax.device_put(a, jax.NamedSharding(mesh, P("data")))  # noqa: E731
    got = np.asarray(jax.jit(per_device)(sharded(probs), sharded(ids)))
    count = np.bincount(np.asarray(ids).ravel(), minlength=8)
    for d in range(8):
        local = np.asarray(probs[8 * d : 8 * d + 8], np.float64)
        want = 8 / (2 * 64) * np.sum(count * local.mean(0))
        np.testing.assert_allclose(got[d], want, rtol=1e-5)
    # Without an axis name it is the Switch loss.
    np.testing.assert_allclose(
        global_batch_balance_loss(probs, ids), load_balancing_loss(probs, ids), rtol=1e-6
    )


def test_z_loss_matches_oracle():
    logits = np.random.default_rng(4).normal(size=(6, 5)) * 3
    mask = np.array([1, 1, 0, 1, 0, 1], bool)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(router_z_loss(jnp.asarray(logits)), np.mean(lse**2), rtol=1e-5)
    np.testing.assert_allclose(
        router_z_loss(jnp.asarray(logits), jnp.asarray(mask)), np.mean(lse[mask] ** 2), rtol=1e-5
    )


def test_loss_errors():
    _, probs, ids = _routed((4,))
    with pytest.raises(ValueError, match="must share leading dims"):
        load_balancing_loss(probs, ids[:3])
    with pytest.raises(ValueError, match="\\[batch, seq, E\\]"):
        sequence_balance_loss(probs, ids)
    with pytest.raises(ValueError, match="token_mask must have the token shape"):
        load_balancing_loss(probs, ids, jnp.ones((5,), bool))
