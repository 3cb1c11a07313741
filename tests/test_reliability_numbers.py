"""Non-finite and out-of-range values: one documented behaviour each, never a silent one.

- Routing: a token with a NaN/inf logit (or every token, if the bias is not finite) is not
  routed: ids -1, weights 0, not counted, no expert output, counted in the layer's aux.
- update_bias: a concrete bad rate or load raises; a traced one is clamped (rate -> 0,
  negative counts -> 0, unsigned counts saturate), so the bias stays finite and the sign exact.
- Expert ids outside [0, E): not counted by expert_load, counted as dropped by dispatch.
- Masks are bool only, everywhere.
- Zero tokens: empty output, zero loads, on every dispatch path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sigmoid_moe import (
    ExpertLoad,
    MoEConfig,
    MoELayer,
    RouterConfig,
    RoutingBias,
    capacity_moe,
    dropless_moe,
    expert_load,
    load_balancing_loss,
    logical_sharding,
    make_mesh,
    route,
    router_probs,
    router_z_loss,
    routing_bias_update,
    rules_for_mesh,
    sigmoid_moe_router,
    update_bias,
)

NAN, INF = float("nan"), float("inf")

# ---------------------------------------------------------------------------- routing


@pytest.mark.parametrize("score_fn", ["sigmoid", "softmax"])
@pytest.mark.parametrize(
    "bad_row",
    [[NAN] * 4, [-INF] * 4, [INF, 0.0, 0.0, 0.0], [0.0, NAN, 1.0, 2.0], [-INF, 1.0, 2.0, 3.0]],
)
def test_a_token_with_a_non_finite_logit_is_not_routed(score_fn, bad_row):
    cfg = RouterConfig(num_experts=4, top_k=2, score_fn=score_fn)
    logits = jnp.array([[0.5, -1.0, 2.0, 0.0], bad_row, [1.0, 0.0, 0.0, 3.0]], jnp.float32)
    got = route(logits, jnp.zeros(4), cfg)
    np.testing.assert_array_equal(got.routed, [True, False, True])
    np.testing.assert_array_equal(got.expert_ids[1], [-1, -1])
    np.testing.assert_array_equal(got.weights[1], [0.0, 0.0])
    assert np.all(np.isfinite(np.asarray(got.weights))) and np.all(np.isfinite(got.scores))
    # The good rows are exactly what they are without the bad one.
    alone = route(logits[jnp.array([0, 2])], jnp.zeros(4), cfg)
    np.testing.assert_array_equal(got.expert_ids[jnp.array([0, 2])], alone.expert_ids)
    np.testing.assert_array_equal(got.weights[jnp.array([0, 2])], alone.weights)
    # Not counted.
    assert int(jnp.sum(expert_load(got.expert_ids, 4))) == 2 * 2


def test_gradients_stay_finite_around_an_unroutable_token():
    cfg = RouterConfig(num_experts=4, top_k=2, score_fn="softmax")
    logits = jnp.array([[0.5, -1.0, 2.0, 0.0], [INF, 0.0, 0.0, 0.0]], jnp.float32)
    grad = jax.grad(lambda z: jnp.sum(route(z, None, cfg).weights ** 2))(logits)
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_array_equal(grad[1], np.zeros(4))


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_a_non_finite_bias_routes_nothing_rather_than_collapsing(bad):
    cfg = RouterConfig(num_experts=4, top_k=2)
    bias = jnp.zeros(4).at[2].set(bad)
    got = route(jnp.ones((5, 4)), bias, cfg)
    assert not bool(jnp.any(got.routed))
    assert int(jnp.sum(expert_load(got.expert_ids, 4))) == 0  # no made-up balance


def _layer(**kw):
    cfg = MoEConfig(d_model=4, d_ff=3, router=RouterConfig(num_experts=4, top_k=2), **kw)
    return MoELayer(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_layer_counts_and_isolates_non_finite_tokens(dispatch):
    layer = _layer(dispatch=dispatch, capacity_factor=2.0, balance_loss_coef=1e-2, z_loss_coef=1e-3)
    x = jax.random.normal(jax.random.key(0), (6, 4)).at[2, 1].set(NAN).at[4, 0].set(INF)
    y, aux = layer(x)
    assert int(aux.nonfinite_tokens) == 2
    assert int(jnp.sum(aux.expert_load)) == 4 * 2  # the 4 finite tokens only
    assert int(aux.dropped) == 0  # unrouted tokens are not "dropped": they are counted above
    np.testing.assert_array_equal(aux.expert_ids[2], [-1, -1])
    assert np.isfinite(float(aux.aux_loss))
    finite = jnp.array([0, 1, 3, 5])
    y_clean, _ = layer(x[finite])
    np.testing.assert_allclose(y[finite], y_clean, rtol=1e-6, atol=1e-6)
    # Padding is not a non-finite token.
    mask = jnp.array([True, True, False, True, False, True])
    _, aux_masked = layer(x, mask)
    assert int(aux_masked.nonfinite_tokens) == 0


@nnx.jit
def _grads_and_loads(layer, x, mask):
    """Gradients of every parameter of a loss over the layer's outputs and aux loss, the
    captured load and the bias it moves (one program per layer config and shape)."""

    def loss(layer):
        (y, aux), loads = nnx.capture(layer, ExpertLoad)(x, mask)
        weights = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        return jnp.sum(y * weights) + aux.aux_loss, (y, aux, loads)

    (_, (y, aux, loads)), grads = nnx.value_and_grad(loss, has_aux=True)(layer)
    bias = routing_bias_update(nnx.state(layer, RoutingBias), loads, rate=1e-2)
    (load,), (new_bias,) = jax.tree.leaves(loads), jax.tree.leaves(bias)
    return y, aux, grads, load, new_bias


def _bad_token_case(bad, mesh=None, **overrides):
    """The layer's gradients and bias update with one token holding ``bad``, and with that
    token masked out as padding (its row zeroed): they must be the same."""
    cfg = MoEConfig(
        d_model=8,
        d_ff=6,
        router=RouterConfig(num_experts=8, top_k=2),
        num_shared_experts=1,
        balance_loss_coef=1e-2,
        z_loss_coef=1e-3,
        **overrides,
    )
    x = jax.random.normal(jax.random.key(3), (8, 2, 8))  # [B, S, d]: B splits over 8 devices
    x_bad = x.at[3, 1, 3].set(bad)
    real = jnp.ones((8, 2), bool)
    padded = (x.at[3, 1].set(0.0), real.at[3, 1].set(False))
    if mesh is None:
        layer = MoELayer(cfg, rngs=nnx.Rngs(0))
        return _grads_and_loads(layer, x_bad, real), _grads_and_loads(layer, *padded)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules_for_mesh(mesh)):
        layer = nnx.jit(lambda: MoELayer(cfg, rngs=nnx.Rngs(0)))()
        act = logical_sharding(mesh, ("activation_batch", None, None))
        place = lambda a: jax.device_put(a, logical_sharding(mesh, ("activation_batch", None)))  # noqa: E731
        got = _grads_and_loads(layer, jax.device_put(x_bad, act), place(real))
        want = _grads_and_loads(layer, jax.device_put(padded[0], act), place(padded[1]))
        return got, want


@pytest.mark.parametrize(
    "where, overrides",
    [
        ("one device", dict(dispatch="dropless")),
        ("one device", dict(dispatch="capacity", capacity_factor=2.0)),
        ("mesh 2x4", dict(dispatch="dropless", expert_axis="expert")),
        ("mesh 2x4", dict(dispatch="capacity", capacity_factor=2.0, expert_axis="expert")),
    ],
    ids=["dropless", "capacity", "mesh-dropless", "mesh-capacity"],
)
def test_one_non_finite_token_changes_no_gradient_and_no_bias(where, overrides):
    # With one NaN in x the router's weight gradient used to get NaNs (NaN * 0 in the
    # backward pass of x @ W). Now the token is as if it were padding: every gradient, the
    # output of every other token, the loads and the bias update are those of the batch
    # with that token masked out.
    mesh = make_mesh(data=2, expert=4) if where.startswith("mesh") else None
    for bad in (NAN, INF, -INF):
        (y, aux, grads, load, bias), want = _bad_token_case(bad, mesh, **overrides)
        y_want, aux_want, grads_want, load_want, bias_want = want
        assert int(aux.nonfinite_tokens) == 1 and int(aux_want.nonfinite_tokens) == 0
        flat, flat_want = nnx.to_flat_state(grads), dict(nnx.to_flat_state(grads_want))
        assert {path[-1] for path, _ in flat} >= {"router_w_de", "w_in_edf", "w_out_efd"}
        for path, grad in flat:
            grad = np.asarray(grad[...])
            assert np.isfinite(grad).all(), (bad, path)
            want_grad = np.asarray(flat_want[path][...])
            np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-7, err_msg=str(path))
        np.testing.assert_array_equal(np.asarray(y)[3, 1], 0.0)  # its output row is zero
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_want), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(load), np.asarray(load_want))
        assert int(np.sum(load)) == (16 - 1) * 2
        np.testing.assert_array_equal(np.asarray(bias), np.asarray(bias_want))
        assert np.isfinite(np.asarray(bias)).all() and np.any(np.asarray(bias) != 0)


def test_losses_ignore_whatever_masked_tokens_hold():
    probs = jnp.array([[0.5, 0.5], [NAN, NAN], [0.9, 0.1]])
    ids = jnp.array([[0], [1], [0]])
    mask = jnp.array([True, False, True])
    assert np.isfinite(float(load_balancing_loss(probs, ids, mask)))
    assert np.isfinite(float(router_z_loss(jnp.array([[0.0, 1.0], [INF, 0.0]]), mask[:2])))
    np.testing.assert_allclose(
        load_balancing_loss(probs, ids, mask),
        load_balancing_loss(probs[jnp.array([0, 2])], ids[jnp.array([0, 2])]),
    )
    assert np.isfinite(float(jnp.sum(router_probs(jnp.zeros((1, 4))))))


# ------------------------------------------------------------------------- update_bias


@pytest.mark.parametrize("rate", [INF, -INF, NAN, -1e-3])
def test_concrete_bad_rates_raise(rate):
    with pytest.raises(ValueError, match="rate must be >= 0 and finite"):
        update_bias(jnp.zeros(4), jnp.ones(4, jnp.int32), rate=rate)
    with pytest.raises(ValueError, match="rate must be >= 0 and finite"):
        update_bias(jnp.zeros(4), jnp.ones(4, jnp.int32), rate=jnp.float32(rate))
    with pytest.raises(ValueError, match="rate must be >= 0 and finite"):
        update_bias(jnp.zeros(4), jnp.ones(4, jnp.int32), rate=lambda step: rate, step=0)


def test_concrete_array_rate_is_accepted():
    got = update_bias(jnp.zeros(2), jnp.array([3, 1]), rate=jnp.asarray(0.5))
    np.testing.assert_array_equal(got, [-0.5, 0.5])
    with pytest.raises(ValueError, match="scalar"):
        update_bias(jnp.zeros(2), jnp.array([3, 1]), rate=jnp.ones(2))


@pytest.mark.parametrize("rate", [INF, -INF, NAN, -0.5])
def test_traced_bad_rates_give_no_update(rate):
    bias = jnp.array([0.25, -0.5, 1.0], jnp.float32)
    load = jnp.array([9, 0, 3])
    traced = jax.jit(lambda u: update_bias(bias, load, rate=u))(jnp.float32(rate))
    np.testing.assert_array_equal(traced, bias)
    # A schedule whose output goes bad at a traced step: the same.
    schedule = lambda step: jnp.where(step < 1, 1.0, rate)  # noqa: E731
    at = jax.jit(lambda s: update_bias(bias, load, rate=schedule, step=s))
    np.testing.assert_array_equal(at(jnp.int32(5)), bias)
    np.testing.assert_array_equal(at(jnp.int32(0)), bias + jnp.array([-1.0, 1.0, 1.0]))


def test_concrete_bad_loads_raise():
    with pytest.raises(ValueError, match="negative counts"):
        update_bias(jnp.zeros(3), jnp.array([1, -2, 3]), rate=1e-3)
    with pytest.raises(ValueError, match="int32"):  # would wrap to a negative int32
        update_bias(jnp.zeros(2), np.array([2**31 + 5, 1], np.int64), rate=1e-3)
    with pytest.raises(ValueError, match="int32"):  # the total would overflow
        update_bias(jnp.zeros(2), np.array([2**30 + 1, 2**30], np.int64), rate=1e-3)
    with pytest.raises(TypeError, match="load must be integer"):
        update_bias(jnp.zeros(2), jnp.array([1.0, 2.0]), rate=1e-3)


def test_traced_loads_are_clamped_so_the_sign_keeps_its_direction():
    bias = jnp.zeros(3, jnp.float32)
    # Negative counts count as 0.
    got = jax.jit(lambda c: update_bias(bias, c, rate=1.0))(jnp.array([-5, 4, 2], jnp.int32))
    np.testing.assert_array_equal(got, update_bias(bias, jnp.array([0, 4, 2]), rate=1.0))
    # uint32 above 2**31 saturates instead of wrapping negative (which would flip the sign).
    big = jnp.array([3_000_000_000, 1, 0], jnp.uint32)
    got = jax.jit(lambda c: update_bias(bias, c, rate=1.0))(big)
    assert float(got[0]) == -1.0  # the over-loaded expert still goes down


def test_traced_loads_summing_past_int32_keep_the_exact_sign():
    # Each count fits in int32 but the total does not: the mean must not wrap negative.
    bias = jnp.zeros(3, jnp.float32)
    step = jax.jit(lambda c: update_bias(bias, c, rate=1.0))
    for load, dtype in (
        ([2_000_000_000, 1_000_000_000, 0], jnp.int32),
        ([2_000_000_000, 2_000_000_000, 2_000_000_000], jnp.int32),
        ([2**31 - 1, 2**31 - 2, 2**31 - 1], jnp.int32),
        ([3_000_000_000, 2_000_000_000, 0], jnp.uint32),  # saturates to 2**31 - 1 first
    ):
        counts = np.minimum(np.asarray(load, np.int64), 2**31 - 1)
        want = np.sign(counts.sum() - 3 * counts).astype(np.float32)  # sign(mean - c_i)
        np.testing.assert_array_equal(step(jnp.asarray(load, dtype)), want, err_msg=str(load))


def test_update_never_makes_a_finite_bias_non_finite():
    bias = jnp.array([1e30, -1e30, 0.0], jnp.float32)
    for rule in ("sign", "sign_zero_mean", "proportional"):
        for load in ([0, 0, 0], [10, 0, 0], [2**30, 0, 1]):
            out = update_bias(bias, jnp.array(load), rate=1e-3, rule=rule)
            assert np.all(np.isfinite(np.asarray(out))), (rule, load)


# ------------------------------------------------------------------ ids out of range


def test_expert_load_does_not_count_ids_outside_the_experts():
    ids = jnp.array([[0, -1], [3, 4], [7, 1]])
    np.testing.assert_array_equal(expert_load(ids, 4), [1, 1, 0, 1])  # -1 is not expert 3
    jitted = jax.jit(expert_load, static_argnums=1)
    np.testing.assert_array_equal(jitted(ids, 4), [1, 1, 0, 1])


def _weights(num_experts=4, d=3, f=2):
    keys = jax.random.split(jax.random.key(3), 2)
    w_in = jax.random.normal(keys[0], (num_experts, d, 2 * f))
    w_out = jax.random.normal(keys[1], (num_experts, f, d))
    return w_in, w_out


@pytest.mark.parametrize(
    "dispatch",
    [
        lambda *a: dropless_moe(*a, kernel="blocked"),
        lambda *a: dropless_moe(*a, kernel="ragged_dot"),
        lambda *a: capacity_moe(*a, capacity_factor=4.0, kernel="blocked"),
        lambda *a: capacity_moe(*a, capacity_factor=4.0, kernel="batched"),
    ],
)
def test_dispatch_counts_out_of_range_ids_as_dropped(dispatch):
    w_in, w_out = _weights()
    x = jax.random.normal(jax.random.key(0), (3, 3))
    weights = jnp.full((3, 2), 0.5)
    bad = jnp.array([[0, -1], [2, 9], [1, 3]], jnp.int32)
    y, dropped = dispatch(x, bad, weights, w_in, w_out, None)
    assert int(dropped) == 2
    # The surviving assignments give exactly what a routing without the bad ones gives.
    zeroed = weights.at[0, 1].set(0.0).at[1, 1].set(0.0)
    good = jnp.array([[0, 1], [2, 1], [1, 3]], jnp.int32)
    y_good, _ = dispatch(x, good, zeroed, w_in, w_out, None)
    np.testing.assert_allclose(y, y_good, rtol=1e-5, atol=1e-6)
    mask = jnp.array([True, False, True])  # a masked token's bad id is not a drop
    _, dropped_masked = dispatch(x, bad, weights, w_in, w_out, mask)
    assert int(dropped_masked) == 1


# ------------------------------------------------------------------------------ masks


def test_masks_must_be_bool_everywhere():
    ids = jnp.array([[0, 1], [1, 2], [3, 0]])
    with pytest.raises(TypeError, match="token_mask must be a bool array"):
        expert_load(ids, 4, token_mask=jnp.array([2, 1, 1]))
    with pytest.raises(TypeError, match="token_mask must be a bool array"):
        load_balancing_loss(jnp.ones((3, 4)) / 4, ids, jnp.array([1.0, 0.0, 1.0]))
    w_in, w_out = _weights()
    with pytest.raises(TypeError, match="token_mask_t must be a bool array"):
        dropless_moe(jnp.ones((3, 3)), ids, jnp.ones((3, 2)), w_in, w_out, jnp.array([1, 0, 1]))
    with pytest.raises(TypeError, match="token_mask must be a bool array"):
        _layer()(jnp.ones((3, 4)), jnp.array([1, 1, 0]))


# -------------------------------------------------------------------------- 0 tokens


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(dispatch="capacity"), dict(kernel="ragged_dot"), dict(num_shared_experts=1)],
)
def test_a_layer_call_with_zero_tokens(overrides):
    layer = _layer(**overrides)
    y, aux = layer(jnp.zeros((0, 4)))
    assert y.shape == (0, 4)
    np.testing.assert_array_equal(aux.expert_load, np.zeros(4))
    assert int(aux.dropped) == 0 and aux.expert_ids.shape == (0, 2)
    (y, aux), loads = nnx.capture(layer, ExpertLoad)(jnp.zeros((2, 0, 4)))
    assert y.shape == (2, 0, 4)
    np.testing.assert_array_equal(loads["expert_load"][...], np.zeros(4))


# --------------------------------------------------------------- the reference exactly


def test_reference_router_ties_in_float64_saturation():
    # Both dot products reach 200 and 400: float64 sigmoid gives exactly 1.0 for both,
    # and the reference's stable sort keeps the lower index first.
    ids, weights = sigmoid_moe_router([[100, 100]], [[1, 1], [2, 2], [-3, -3]], [0, 0, 0], 2)
    assert ids == [[0, 1]] and weights == [[0.5, 0.5]]
