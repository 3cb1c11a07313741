"""The bias contract: each layer's load moves its own layer's bias, whatever the model's shape.

Every MoE layer here routes all tokens to one expert of its own (zero router weights, so
every score is 0.5, and a one-hot initial bias picks the expert), so its load is
``[0, .., T, .., 0]`` at that expert. One sign step then moves that expert's bias down by
``u`` and every other expert's up by ``u``: a load paired with the wrong layer shows.
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
    apply_routing_bias_update,
    routing_bias_update,
)

E, D, RATE = 16, 4, 0.25
# ragged_dot: eager calls of the blocked kernel re-trace its scans layer by layer (slow);
# the contract does not depend on the expert kernel.
CONFIG = MoEConfig(
    d_model=D, d_ff=4, router=RouterConfig(num_experts=E, top_k=1), kernel="ragged_dot"
)


def _moe(expert: int) -> MoELayer:
    """A layer that sends every token to ``expert``."""
    layer = MoELayer(CONFIG, rngs=nnx.Rngs(expert))
    layer.router_w_de[...] = jnp.zeros((D, E), jnp.float32)
    layer.bias_e[...] = jax.nn.one_hot(expert, E, dtype=jnp.float32)
    return layer


def _after_one_step(expert: int) -> np.ndarray:
    """The bias of ``_moe(expert)`` after one sign step on its own load."""
    want = np.full(E, RATE, np.float32)  # empty experts: +u
    want[expert] = 1.0 - RATE  # the one that took every token: -u
    return want


class Dense(nnx.Module):
    """A block with no MoE (and so no bias) between MoE blocks."""

    def __init__(self):
        self.w_dd = nnx.Param(jnp.eye(D, dtype=jnp.float32))

    def __call__(self, x):
        return x @ self.w_dd[...]


def _mix(x, y):
    """A bounded residual, so twelve SwiGLU layers cannot overflow."""
    return jnp.tanh(x + y)


def _step(model, x):
    """One captured forward and the bias update: the README's train step minus the loss."""
    _, loads = nnx.capture(model, ExpertLoad)(x)
    apply_routing_bias_update(model, loads, rate=RATE)
    return loads


def _x(tokens=6, seed=0):
    return jax.random.normal(jax.random.key(seed), (tokens, D))


class ListModel(nnx.Module):
    def __init__(self):
        self.blocks = nnx.List([_moe(i) for i in range(12)])  # 10, 11 sort after 1 as text

    def __call__(self, x):
        for block in self.blocks:
            x = _mix(x, block(x)[0])
        return x


class DictModel(nnx.Module):
    ORDER = ("zeta", "alpha", "mid")  # call order differs from key order

    def __init__(self):
        self.layers = nnx.Dict({name: _moe(i) for i, name in enumerate(self.ORDER)})

    def __call__(self, x):
        for name in self.ORDER:
            x = _mix(x, self.layers[name](x)[0])
        return x


class AttributeModel(nnx.Module):
    def __init__(self):
        for i in range(12):
            setattr(self, f"layer{i}", _moe(i))  # "layer10" sorts before "layer2"

    def __call__(self, x):
        for i in range(12):
            x = _mix(x, getattr(self, f"layer{i}")(x)[0])
        return x


class EncoderDecoder(nnx.Module):
    def __init__(self):
        self.encoder_moe = _moe(0)  # "decoder_moe" sorts first, the encoder runs first
        self.decoder_moe = _moe(1)

    def __call__(self, x):
        memory = self.encoder_moe(x)[0]
        return self.decoder_moe(_mix(x, memory))[0]


class WithDenseBlock(nnx.Module):
    def __init__(self):
        self.blocks = nnx.List([_moe(0), Dense(), _moe(2), Dense(), _moe(5)])

    def __call__(self, x):
        for block in self.blocks:
            out = block(x)
            x = _mix(x, out[0] if isinstance(out, tuple) else out)
        return x


def _layers(model):
    """``(layer, its expert)`` for every MoE layer of the test models."""
    if isinstance(model, ListModel):
        return [(b, i) for i, b in enumerate(model.blocks)]
    if isinstance(model, DictModel):
        return [(model.layers[n], i) for i, n in enumerate(DictModel.ORDER)]
    if isinstance(model, AttributeModel):
        return [(getattr(model, f"layer{i}"), i) for i in range(12)]
    if isinstance(model, EncoderDecoder):
        return [(model.encoder_moe, 0), (model.decoder_moe, 1)]
    return [(model.blocks[0], 0), (model.blocks[2], 2), (model.blocks[4], 5)]


@pytest.mark.parametrize(
    "make", [ListModel, DictModel, AttributeModel, EncoderDecoder, WithDenseBlock]
)
def test_each_load_moves_its_own_layers_bias(make):
    model = make()
    x = _x()
    loads = _step(model, x)
    for layer, expert in _layers(model):
        np.testing.assert_array_equal(np.asarray(layer.bias_e[...]), _after_one_step(expert))
    # The captured state mirrors the bias state path for path (module path + its leaf).
    bias_modules = {p[:-1] for p, _ in nnx.to_flat_state(nnx.state(model, RoutingBias))}
    load_modules = {p[:-1] for p, _ in nnx.to_flat_state(loads)}
    assert bias_modules == load_modules
    assert all(v[...].dtype == jnp.int32 for _, v in nnx.to_flat_state(loads))


def test_jitted_train_step_pairs_by_structure():
    model = AttributeModel()

    @nnx.jit
    def step(model, x):
        def loss(model):
            y, loads = nnx.capture(model, ExpertLoad)(x)
            return jnp.sum(y**2), loads

        (_, loads), _ = nnx.value_and_grad(loss, has_aux=True)(model)
        apply_routing_bias_update(model, loads, rate=RATE)

    step(model, _x())
    for layer, expert in _layers(model):
        np.testing.assert_array_equal(np.asarray(layer.bias_e[...]), _after_one_step(expert))


class Scanned(nnx.Module):
    """Three MoE layers stacked for ``nnx.scan``: ``[L, E]`` bias and load leaves."""

    def __init__(self, num_layers: int = 3):
        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return MoELayer(CONFIG, rngs=rngs)

        self.layers = make(nnx.Rngs(0))
        self.layers.router_w_de[...] = jnp.zeros((num_layers, D, E), jnp.float32)
        self.layers.bias_e[...] = jax.nn.one_hot(jnp.arange(num_layers), E, dtype=jnp.float32)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, layer):
            return _mix(x, layer(x)[0])

        return body(x, self.layers)


def test_scanned_stack_updates_each_row():
    model = Scanned()
    loads = _step(model, _x())
    assert loads["layers"]["expert_load"][...].shape == (3, E)
    bias = np.asarray(model.layers.bias_e[...])
    for layer in range(3):
        np.testing.assert_array_equal(bias[layer], _after_one_step(layer))


def test_micro_batches_sum_exactly_before_one_sign():
    model, whole = ListModel(), ListModel()
    x = _x(tokens=8)
    _, first = nnx.capture(model, ExpertLoad)(x[:4])
    _, second = nnx.capture(model, ExpertLoad)(x[4:])
    summed = jax.tree.map(jnp.add, first, second)
    _, at_once = nnx.capture(whole, ExpertLoad)(x)
    for (p, a), (q, b) in zip(nnx.to_flat_state(summed), nnx.to_flat_state(at_once), strict=True):
        assert p == q and a[...].dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))
    apply_routing_bias_update(model, summed, rate=RATE)
    apply_routing_bias_update(whole, at_once, rate=RATE)
    for (a, _), (b, _) in zip(_layers(model), _layers(whole), strict=True):
        np.testing.assert_array_equal(np.asarray(a.bias_e[...]), np.asarray(b.bias_e[...]))


def test_a_layer_called_twice_sums_its_load():
    class Shared(nnx.Module):
        def __init__(self):
            self.moe = _moe(3)

        def __call__(self, x):
            return self.moe(self.moe(x)[0])[0]

    _, loads = nnx.capture(Shared(), ExpertLoad)(_x(tokens=5))
    want = np.zeros(E, np.int32)
    want[3] = 2 * 5
    np.testing.assert_array_equal(np.asarray(loads["moe"]["expert_load"][...]), want)


def test_uncaptured_forwards_record_nothing():
    model = EncoderDecoder()
    before = nnx.graphdef(model)
    model(_x())  # an evaluation forward
    assert nnx.graphdef(model) == before
    assert not jax.tree.leaves(nnx.state(model, ExpertLoad))
    loads = _step(model, _x())  # and the next captured step counts only itself
    assert int(jnp.sum(loads["encoder_moe"]["expert_load"][...])) == 6


def test_mismatched_structures_name_both():
    model = EncoderDecoder()
    _, loads = nnx.capture(ListModel(), ExpertLoad)(_x())
    with pytest.raises(ValueError, match=r"(?s)biases: decoder_moe.*loads:  blocks\.0"):
        apply_routing_bias_update(model, loads, rate=RATE)

    class Skips(EncoderDecoder):
        def __call__(self, x):
            return self.encoder_moe(x)[0]  # the decoder's layer never runs

    skipping = Skips()
    _, partial = nnx.capture(skipping, ExpertLoad)(_x())
    with pytest.raises(ValueError, match="mismatch at decoder_moe"):
        apply_routing_bias_update(skipping, partial, rate=RATE)
    np.testing.assert_array_equal(  # nothing was half-applied
        np.asarray(skipping.encoder_moe.bias_e[...]), np.asarray(jax.nn.one_hot(0, E))
    )


def test_loads_must_be_the_captured_state():
    model = EncoderDecoder()
    with pytest.raises(TypeError, match=r"nnx.capture\(model, ExpertLoad\)"):
        apply_routing_bias_update(model, jnp.ones((2, E), jnp.int32), rate=RATE)
    with pytest.raises(TypeError, match="only ExpertLoad"):
        routing_bias_update(nnx.state(model, RoutingBias), nnx.state(model, RoutingBias), rate=RATE)


def test_grouped_loads_give_the_mean_of_the_groups_steps():
    # Micro-batch scope: the micro-batches' loads stacked [G, E] instead of summed.
    model = EncoderDecoder()
    x = _x(tokens=8)
    _, first = nnx.capture(model, ExpertLoad)(x[:4])
    _, second = nnx.capture(model, ExpertLoad)(x[4:])
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), first, second)
    assert stacked["encoder_moe"]["expert_load"][...].shape == (2, E)
    new = routing_bias_update(nnx.state(model, RoutingBias), stacked, rate=RATE)
    for name, expert in (("encoder_moe", 0), ("decoder_moe", 1)):
        # Each micro-batch sends all its tokens to the same expert: the mean step is one step.
        np.testing.assert_array_equal(np.asarray(new[name]["bias_e"][...]), _after_one_step(expert))
