"""MoELayer: per-token NumPy oracle, bias handling, optimizer, checkpoint, recompiles."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sigmoid_moe import RouterConfig
from sigmoid_moe.layer import MoEAux, MoEConfig, MoELayer
from sigmoid_moe.routing_bias import (
    ExpertLoad,
    RoutingBias,
    apply_routing_bias_update,
    routing_bias_update,
)


def _silu(v):
    return v / (1.0 + np.exp(-v))


def _ffn(x, w_in, w_out):
    d_ff = w_out.shape[0]
    h = x @ w_in
    return (_silu(h[:d_ff]) * h[d_ff:]) @ w_out


def oracle_layer(layer: MoELayer, x, token_mask=None):
    """Token by token, float64: route (ungrouped), then sum w * FFN_e(x) + shared FFN(x)."""
    cfg, rc = layer.config, layer.config.router
    p = {
        k: np.asarray(v, np.float64)
        for k, v in nnx.to_pure_dict(nnx.state(layer)).items()
        if v is not None
    }
    x = np.asarray(x, np.float64)
    flat = x.reshape(-1, cfg.d_model)
    mask = np.ones(len(flat), bool) if token_mask is None else np.asarray(token_mask).reshape(-1)
    y = np.zeros_like(flat)
    load = np.zeros(rc.num_experts, np.int64)
    for t, x_t in enumerate(flat):
        logits = x_t @ p["router_w_de"]
        if rc.score_fn == "sigmoid":
            scores = 1 / (1 + np.exp(-logits))
        else:
            scores = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        chosen = sorted(range(rc.num_experts), key=lambda e: -(scores[e] + p["bias_e"][e]))[
            : rc.top_k
        ]
        w = scores[chosen] / (scores[chosen].sum() if rc.normalize else 1.0) * rc.route_scale
        if mask[t]:
            for e, w_e in zip(chosen, w, strict=True):
                y[t] += w_e * _ffn(x_t, p["w_in_edf"][e], p["w_out_efd"][e])
                load[e] += 1
        if cfg.shared_width:
            y[t] += _ffn(x_t, p["shared_w_in_df"], p["shared_w_out_fd"])
    return y.reshape(x.shape), load


CASES = [
    # (d_model, d_ff, E, k, shared, x shape lead, router overrides)
    (6, 4, 1, 1, 0, (5,), {}),
    (8, 5, 4, 2, 1, (2, 3), {"route_scale": 2.5}),
    (4, 3, 8, 3, 2, (3, 4), {"normalize": False}),
    (5, 4, 6, 2, 0, (9,), {"score_fn": "softmax"}),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_layer_matches_oracle(case, dispatch):
    d, f, e, k, shared, lead, overrides = case
    config = MoEConfig(
        d,
        f,
        RouterConfig(e, k, **overrides),
        num_shared_experts=shared,
        dispatch=dispatch,
        capacity_factor=e / k,  # enough slots to drop nothing
        block_size=2,
    )
    layer = MoELayer(config, rngs=nnx.Rngs(e + k))
    rng = np.random.default_rng(d)
    layer.bias_e[...] = jnp.asarray(rng.normal(size=e) * 0.1, jnp.float32)  # a bias that matters
    x = rng.normal(size=(*lead, d)).astype(np.float32)
    mask = rng.random(lead) > 0.25
    y, aux = nnx.jit(lambda m, x, mask: m(x, mask))(layer, jnp.asarray(x), jnp.asarray(mask))
    want_y, want_load = oracle_layer(layer, x, mask)
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux.expert_load), want_load)
    assert aux.expert_load.dtype == jnp.int32 and int(aux.dropped) == 0


def _layer(dispatch="dropless", **kwargs):
    config = MoEConfig(8, 6, RouterConfig(4, 2), dispatch=dispatch, **kwargs)
    return MoELayer(config, rngs=nnx.Rngs(0))


@nnx.jit
def _call(model, x, token_mask=None):
    return model(x, token_mask)


def _x(shape=(2, 6, 8), seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def test_capacity_and_dropless_layers_agree_with_gradients():
    drop = _layer("dropless", block_size=3)
    # E / k = 2: no drops. The batched kernel: an independent formulation of the experts.
    cap = _layer("capacity", capacity_factor=2.0, kernel="batched")
    x = _x()

    def loss(m, x):
        y, aux = m(x)
        return jnp.sum(jnp.tanh(y)), aux

    grads = {}
    for name, layer in (("drop", drop), ("cap", cap)):
        (value, aux), g = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(layer, x)
        grads[name] = (value, nnx.to_pure_dict(g))
        assert int(aux.dropped) == 0
    np.testing.assert_allclose(grads["drop"][0], grads["cap"][0], rtol=1e-6)
    flat_d = jax.tree.leaves(grads["drop"][1])
    flat_c = jax.tree.leaves(grads["cap"][1])
    assert len(flat_d) == 3  # router, w_in, w_out: the bias is no Param, so no gradient
    for a, b in zip(flat_d, flat_c, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_capacity_layer_reports_drops():
    layer = _layer("capacity", capacity_factor=0.25)
    x = _x((16, 8))
    _, aux = _call(layer, x)
    # C = ceil(0.25 * 16 * 2 / 4) = 2 slots per expert, 8 kept of 32 assignments.
    assert int(aux.dropped) == 32 - 8
    assert int(jnp.sum(aux.expert_load)) == 32  # the load counts routing, not survivors


def test_bias_ignored_by_adamw_moved_only_by_update():
    layer = _layer()
    layer.bias_e[...] = jnp.full((4,), 0.5, jnp.float32)
    opt = nnx.Optimizer(layer, optax.adamw(1e-2, weight_decay=0.5), wrt=nnx.Param)
    x = _x()

    @nnx.jit
    def step(model, opt, x):
        def loss(m):
            (y, aux), loads = nnx.capture(m, ExpertLoad)(x)
            return jnp.sum(y**2), (aux.expert_load, loads)

        (_, (load, loads)), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        w_before = model.w_in_edf[...]
        opt.update(model, grads)
        return load, loads, w_before

    load, loads, w_before = step(layer, opt, x)
    assert not np.allclose(np.asarray(layer.w_in_edf[...]), np.asarray(w_before))  # params moved
    np.testing.assert_array_equal(np.asarray(layer.bias_e[...]), np.full(4, 0.5, np.float32))
    # The captured load is the one the layer returned.
    np.testing.assert_array_equal(np.asarray(loads["expert_load"][...]), np.asarray(load))
    apply_routing_bias_update(layer, loads, rate=1e-3)
    # sign rule: b_i += 1e-3 * sign(mean(load) - load_i), exact in float32 arithmetic.
    sign = np.sign(np.asarray(load).mean() - np.asarray(load))
    np.testing.assert_array_equal(
        np.asarray(layer.bias_e[...]),
        (np.float32(0.5) + np.float32(1e-3) * sign).astype(np.float32),
    )
    assert layer.bias_e[...].dtype == jnp.float32


def test_eval_and_remat_do_not_count():
    layer = _layer()
    x = _x()
    before = nnx.graphdef(layer)
    for _ in range(3):
        _call(layer, x)  # uncaptured (eval) forwards record nothing and change nothing
    assert nnx.graphdef(layer) == before
    assert not jax.tree.leaves(nnx.state(layer, ExpertLoad))

    def loss(m, x):
        (y, aux), loads = nnx.capture(m, ExpertLoad)(x)
        return jnp.sum(y**2), loads

    _, plain = nnx.jit(nnx.grad(loss, has_aux=True))(layer, x)
    _, remat = nnx.jit(nnx.grad(nnx.remat(loss), has_aux=True))(layer, x)
    np.testing.assert_array_equal(
        np.asarray(remat["expert_load"][...]), np.asarray(plain["expert_load"][...])
    )
    assert int(jnp.sum(remat["expert_load"][...])) == 2 * 6 * 2  # tokens * k, once


def test_padding_not_counted():
    layer = _layer()
    mask = jnp.arange(12).reshape(2, 6) < 4  # 4 real tokens, all in the first row
    y, aux = _call(layer, _x(), mask)
    assert int(jnp.sum(aux.expert_load)) == 4 * 2
    # Per expert: the real tokens' choices, none of the padding's.
    real_ids = np.asarray(aux.expert_ids)[np.asarray(mask)]
    np.testing.assert_array_equal(aux.expert_load, np.bincount(real_ids.ravel(), minlength=4))


def test_checkpoint_round_trip_bit_exact(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    layer = _layer()
    layer.bias_e[...] = jnp.asarray([0.1234567, -3e-8, 1e-3, 7.0], jnp.float32)
    state = nnx.state(layer)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", state)
    fresh = MoELayer(layer.config, rngs=nnx.Rngs(99))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: MoELayer(layer.config, rngs=nnx.Rngs(1))))
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / "ckpt", abstract)
    nnx.update(fresh, restored)
    assert fresh.bias_e[...].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(fresh.bias_e[...]), np.asarray(layer.bias_e[...]))
    np.testing.assert_array_equal(np.asarray(fresh.w_in_edf[...]), np.asarray(layer.w_in_edf[...]))


def test_no_recompile_on_second_step():
    layer = _layer()
    opt = nnx.Optimizer(layer, optax.adamw(1e-3), wrt=nnx.Param)
    traces = []

    @nnx.jit
    def step(model, opt, x):
        traces.append(1)  # runs only while tracing

        def loss(m):
            (y, aux), loads = nnx.capture(m, ExpertLoad)(x)
            return jnp.sum(y**2) + aux.aux_loss, loads

        (_, loads), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        opt.update(model, grads)
        apply_routing_bias_update(model, loads, rate=1e-3)

    for seed in range(3):
        step(layer, opt, _x(seed=seed))
    assert len(traces) == 1
    assert float(jnp.max(jnp.abs(layer.bias_e[...]))) > 0  # the update ran inside jit


def test_identically_configured_layers_have_equal_graphdefs():
    # No per-instance callables on the layer: jit caches keyed on the graphdef hit.
    a, b = _layer(), MoELayer(_layer().config, rngs=nnx.Rngs(7))
    assert nnx.graphdef(a) == nnx.graphdef(b)
    assert hash(nnx.graphdef(a)) == hash(nnx.graphdef(b))


def test_pure_update_is_a_function_of_its_inputs():
    layer = _layer()
    state = nnx.state(layer, RoutingBias)
    loads = nnx.State({"expert_load": ExpertLoad(jnp.asarray([1, 2, 3, 10], jnp.int32))})
    new = routing_bias_update(state, loads, rate=0.25)
    # mean = 4: experts 0, 1, 2 under-loaded (+0.25), expert 3 over (-0.25).
    np.testing.assert_array_equal(np.asarray(new["bias_e"][...]), [0.25, 0.25, 0.25, -0.25])
    np.testing.assert_array_equal(np.asarray(layer.bias_e[...]), np.zeros(4))  # untouched
    assert isinstance(new["bias_e"], RoutingBias)


def test_bf16_params_and_activations():
    config = MoEConfig(
        8, 6, RouterConfig(4, 2), num_shared_experts=1, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16
    )
    layer = MoELayer(config, rngs=nnx.Rngs(0))
    assert layer.w_in_edf[...].dtype == jnp.bfloat16
    assert layer.bias_e[...].dtype == jnp.float32
    x = _x()
    y, aux = nnx.jit(lambda m, x: m(x))(layer, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and aux.expert_load.dtype == jnp.int32
    f32 = MoELayer(
        dataclasses.replace(config, dtype=jnp.float32, param_dtype=jnp.float32), rngs=nnx.Rngs(0)
    )
    nnx.update(f32, jax.tree.map(lambda v: v.astype(jnp.float32), nnx.state(layer, nnx.Param)))
    y32, aux32 = _call(f32, x.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(aux.expert_load), np.asarray(aux32.expert_load))
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y32), atol=0.05, rtol=0.05)


def test_aux_losses():
    layer = _layer(balance_loss_coef=1e-2, seq_balance_loss_coef=1e-4, z_loss_coef=1e-3)
    _, aux = _call(layer, _x())
    assert isinstance(aux, MoEAux)
    for value in (aux.balance_loss, aux.seq_balance_loss, aux.z_loss):
        assert float(value) > 0
    want = 1e-2 * aux.balance_loss + 1e-4 * aux.seq_balance_loss + 1e-3 * aux.z_loss
    np.testing.assert_allclose(float(aux.aux_loss), float(want), rtol=1e-6)
    _, off = _call(_layer(), _x())
    assert float(off.aux_loss) == 0.0
    with pytest.raises(ValueError, match="batch, seq"):
        layer(_x((12, 8)))


def test_bad_inputs_and_configs():
    layer = _layer()
    with pytest.raises(ValueError, match="d_model=8"):
        layer(_x((3, 5)))
    with pytest.raises(TypeError, match="floating"):
        layer(jnp.ones((3, 8), jnp.int32))
    with pytest.raises(ValueError, match="token_mask"):
        layer(_x((2, 6, 8)), jnp.ones((12,), bool))
    router = RouterConfig(4, 2)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEConfig(8, 6, router, dispatch="capacity", capacity_factor=0.0)
    with pytest.raises(ValueError, match="dispatch"):
        MoEConfig(8, 6, router, dispatch="sorted")
    with pytest.raises(TypeError, match="router"):
        MoEConfig(8, 6, {"num_experts": 4})
    with pytest.raises(ValueError, match="d_ff"):
        MoEConfig(8, 0, router)
    with pytest.raises(TypeError, match="dtype"):
        MoEConfig(8, 6, router, dtype=jnp.int32)
    with pytest.raises(ValueError, match="shared_d_ff"):
        MoEConfig(8, 6, router, shared_d_ff=4)
    with pytest.raises(ValueError, match="z_loss_coef"):
        MoEConfig(8, 6, router, z_loss_coef=-1.0)
    with pytest.raises(ValueError, match="kernel='batched' is not supported with dispatch="):
        MoEConfig(8, 6, router, kernel="batched")
    with pytest.raises(ValueError, match="kernel='ragged_dot' is not supported with dispatch="):
        MoEConfig(8, 6, router, dispatch="capacity", kernel="ragged_dot")
    with pytest.raises(ValueError, match="block_size"):
        MoEConfig(8, 6, router, block_size=0)
    # Under expert parallelism the kernels follow the dispatch kind.
    MoEConfig(8, 6, router, kernel="ragged_dot", expert_axis="expert")
    with pytest.raises(ValueError, match="kernel='ragged_dot' is not supported with dispatch="):
        MoEConfig(8, 6, router, dispatch="capacity", kernel="ragged_dot", expert_axis="expert")
    with pytest.raises(ValueError, match="kernel='batched' is not supported with dispatch="):
        MoEConfig(8, 6, router, kernel="batched", expert_axis="expert")
