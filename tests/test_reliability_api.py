"""Issue 29, API arguments: a bad argument is a ValueError or TypeError naming it (and the
value and the way out) where it is given, never a JAX error or a silent result."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_checkpoints import V3_CONFIG, moe_state, write_folder

from sigmoid_moe import (
    ExpertLoad,
    MoEConfig,
    MoELayer,
    RouterConfig,
    RoutingBias,
    apply_routing_bias_update,
    capacity_moe,
    dropless_moe,
    expert_load,
    route,
    routing_bias_update,
    top_k,
    update_bias,
)
from sigmoid_moe.interop import load_moe_layers

INDEX = "model.safetensors.index.json"
# expert_ids_tk, weights_tk, w_in_edf, w_out_efd of a one-token, two-expert dispatch.
_DISPATCH_REST = (
    jnp.zeros((1, 1), jnp.int32),
    jnp.ones((1, 1)),
    jnp.ones((2, 2, 4)),
    jnp.ones((2, 2, 2)),
)
P = "model.layers.1.mlp."


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: route([[0.0] * 8], None, RouterConfig(8, 2)), "logits"),
        (lambda: route(1.5, None, RouterConfig(8, 2)), "logits"),
        (lambda: route(jnp.zeros((2, 8)), [0.0] * 8, RouterConfig(8, 2)), "bias"),
        (lambda: expert_load([[0, 1]], 8), "expert_ids"),
        (lambda: update_bias([0.0] * 8, jnp.ones(8, jnp.int32), rate=1e-3), "bias"),
        (lambda: update_bias(jnp.zeros(8), [1] * 8, rate=1e-3), "load"),
        (lambda: top_k([[1.0, 2.0, 3.0]], 2), "x"),
        (lambda: dropless_moe([[1.0, 2.0]], *_DISPATCH_REST), "x_td"),
        (lambda: capacity_moe(jnp.ones((1, 2)), [[0]], *_DISPATCH_REST[1:]), "expert_ids_tk"),
    ],
)
def test_a_list_where_an_array_belongs_is_a_type_error_naming_it(call, name):
    with pytest.raises(TypeError, match=rf"^{name} must be an array of shape .*got (list|float)"):
        call()


def test_a_capacity_factor_that_would_overflow_the_slots_is_refused_in_the_config():
    router = RouterConfig(num_experts=8, top_k=2)
    with pytest.raises(ValueError, match=r"capacity_factor=1e\+30 exceeds num_experts=8.*\(0, 4\]"):
        MoEConfig(8, 4, router, dispatch="capacity", capacity_factor=1e30)
    MoEConfig(8, 4, router, dispatch="capacity", capacity_factor=8.0)  # the bound itself
    layer = MoELayer(
        MoEConfig(8, 4, router, dispatch="capacity", capacity_factor=4.0), rngs=nnx.Rngs(0)
    )
    y, aux = nnx.jit(lambda m, x: m(x))(layer, jnp.ones((16, 8)))  # E / k: nothing dropped
    assert int(aux.dropped) == 0 and y.shape == (16, 8)


@pytest.mark.parametrize(
    "hf, overrides, message",
    [
        (
            dict(n_group=3, topk_group=1),
            {},
            "Hugging Face config: n_group=3 does not divide n_routed_experts=4; choose a "
            "divisor of n_routed_experts.",
        ),
        (
            dict(num_experts_per_tok=5),
            {},
            "Hugging Face config: num_experts_per_tok=5 exceeds n_routed_experts=4",
        ),
        (  # an override keeps its own name
            {},
            dict(top_k=5),
            "Hugging Face config: top_k=5 exceeds n_routed_experts=4",
        ),
        (
            dict(n_group=2, topk_group=1, num_experts_per_tok=3),
            {},
            "keeps topk_group * experts_per_group = 1 * 2 = 2 experts, fewer than "
            "num_experts_per_tok=3; raise topk_group or lower num_experts_per_tok.",
        ),
    ],
)
def test_hf_config_errors_name_the_hf_key(hf, overrides, message):
    cfg = {"n_routed_experts": 4, "num_experts_per_tok": 2, **hf}
    with pytest.raises(ValueError) as err:
        RouterConfig.from_hf(cfg, **overrides)
    assert message in str(err.value)
    assert "num_groups" not in str(err.value) and "num_experts=" not in str(err.value)


def _model():
    class Two(nnx.Module):
        def __init__(self):
            cfg = MoEConfig(4, 3, RouterConfig(num_experts=4, top_k=2))
            self.blocks = nnx.List([MoELayer(cfg, rngs=nnx.Rngs(i)) for i in range(2)])

        def __call__(self, x):
            for block in self.blocks:
                x = x + block(x)[0]
            return x

    return Two()


def test_concrete_negative_loads_are_refused_before_the_per_layer_vmap():
    model = _model()
    _, loads = nnx.jit(lambda m, x: nnx.capture(m, ExpertLoad)(x))(model, jnp.ones((8, 4)))
    bad = nnx.map_state(
        lambda path, v: v.replace(v[...].at[1].set(-3)) if path[1] == 1 else v, loads
    )
    with pytest.raises(ValueError, match=r"the load of blocks\.1 holds negative counts \[-3\]"):
        apply_routing_bias_update(model, bad, rate=1e-3)
    huge = nnx.map_state(lambda path, v: v.replace(jnp.full((4,), 2**30, jnp.int32)), loads)
    with pytest.raises(ValueError, match=r"the load of blocks\.0 sums to 4294967296"):
        apply_routing_bias_update(model, huge, rate=1e-3)
    floats = nnx.map_state(lambda path, v: v.replace(v[...].astype(jnp.float32)), loads)
    with pytest.raises(TypeError, match="the load of blocks.0 must be integer token counts"):
        apply_routing_bias_update(model, floats, rate=1e-3)
    assert all(
        np.all(np.asarray(b[...]) == 0) for _, b in nnx.to_flat_state(nnx.state(model, RoutingBias))
    )

    # Inside jit the counts are unknown: clamped, as update_bias documents.
    @jax.jit
    def traced(bias, loads):
        return routing_bias_update(bias, loads, rate=1e-3)

    new = traced(nnx.state(model, RoutingBias), bad)
    assert all(np.isfinite(np.asarray(b[...])).all() for _, b in nnx.to_flat_state(new))


def _folder(tmp_path):
    write_folder(tmp_path, V3_CONFIG, {1: moe_state(V3_CONFIG, 1), 2: moe_state(V3_CONFIG, 2)})
    return tmp_path


def test_an_index_that_maps_a_tensor_twice_is_refused_naming_it(tmp_path):
    folder = _folder(tmp_path)
    index = json.loads((folder / INDEX).read_text())
    name = P + "experts.3.up_proj.weight"
    first = index["weight_map"][name]
    other = next(s for s in set(index["weight_map"].values()) if s != first)
    # The same key again, to another shard: a JSON reader would keep the last silently.
    text = json.dumps(index, indent=1).replace(
        f'"{name}": "{first}"', f'"{name}": "{first}",\n  "{name}": "{other}"'
    )
    assert text.count(f'"{name}"') == 2
    (folder / INDEX).write_text(text)
    with pytest.raises(ValueError, match=rf"maps '{name}' twice \(to '{first}' and '{other}'\)"):
        load_moe_layers(folder, [1])


@pytest.mark.parametrize(
    "edit, message",
    [
        (  # the NaN/inf check
            lambda t: t[P + "experts.7.down_proj.weight"].__setitem__((0, 0), np.nan),
            f"'{P}experts.7.down_proj.weight' (layer 1) holds NaN or inf",
        ),
        (  # the unused-tensor refusal
            lambda t: t.update({P + "experts.2.gate_proj.bias": np.zeros(40, np.float32)}),
            f"would be left unused (experts beyond n_routed_experts, or both fused and "
            f"per-expert keys): '{P}experts.2.gate_proj.bias'",
        ),
        (  # the missing-bias error
            lambda t: t.pop(P + "gate.e_score_correction_bias"),
            f"'{P}gate.e_score_correction_bias' (layer 1) is missing",
        ),
    ],
    ids=["nan", "unused", "missing_bias"],
)
def test_errors_about_a_stored_tensor_name_its_exact_key(tmp_path, edit, message):
    from safetensors.numpy import load_file, save_file

    folder = _folder(tmp_path)
    index = json.loads((folder / INDEX).read_text())
    shard = index["weight_map"][P + "gate.weight"]
    tensors = load_file(str(folder / shard))
    edit(tensors)
    save_file(tensors, str(folder / shard))
    if P + "experts.2.gate_proj.bias" in tensors:
        index["weight_map"][P + "experts.2.gate_proj.bias"] = shard
    index["weight_map"] = {
        k: v for k, v in index["weight_map"].items() if k in tensors or v != shard
    }
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError) as err:
        load_moe_layers(folder, [1])
    assert message in str(err.value)
