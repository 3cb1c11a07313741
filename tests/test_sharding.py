"""Expert-parallel sharding against the unsharded layer (8 simulated CPU devices)."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from sigmoid_moe import (
    DEFAULT_RULES,
    PARAM_AXES,
    ExpertLoad,
    MeshConfig,
    MoEConfig,
    MoELayer,
    RouterConfig,
    RoutingBias,
    apply_routing_bias_update,
    capacity_moe,
    dropless_moe,
    expert_parallel_moe,
    logical_sharding,
    make_mesh,
    route,
    rules_for_mesh,
    validate_mesh,
)

TOL = 1e-5
MESHES = {"8": None, "1x8": (1, 8), "2x4": (2, 4), "4x2": (4, 2)}


def _mesh(name: str):
    if MESHES[name] is None:  # a 1-D expert-only mesh: the rules drop "data"
        return jax.make_mesh((8,), ("expert",), (AxisType.Auto,))
    return make_mesh(*MESHES[name])


def _config(**overrides) -> MoEConfig:
    """16 experts in 4 groups (2 kept per token), top-3, a shared expert, aux losses."""
    fields = dict(
        d_model=16,
        d_ff=8,
        router=RouterConfig(num_experts=16, top_k=3, num_groups=4, topk_groups=2),
        num_shared_experts=1,
        kernel="blocked",
        block_size=3,
        balance_loss_coef=1e-2,
        z_loss_coef=1e-3,
    )
    return MoEConfig(**(fields | overrides))


def _inputs(batch: int = 8, seq: int = 8, d_model: int = 16):
    keys = jax.random.split(jax.random.key(1), 2)
    x_bsd = jax.random.normal(keys[0], (batch, seq, d_model), jnp.float32)
    ct_bsd = jax.random.normal(keys[1], (batch, seq, d_model), jnp.float32)
    mask_bs = jnp.ones((batch, seq), bool).at[-1, -3:].set(False)  # some padding
    return x_bsd, ct_bsd, mask_bs


def _starving_bias(mesh_name: str) -> np.ndarray:
    """A bias no token overcomes for the experts of expert-axis member 1 (they and their
    device receive nothing) and for expert 0 (an idle expert on a busy device)."""
    num_shards = 8 if MESHES[mesh_name] is None else MESHES[mesh_name][1]
    local = 16 // num_shards
    bias_e = np.zeros(16, np.float32)
    bias_e[local : 2 * local] = -10.0
    bias_e[0] = -10.0
    return bias_e


@nnx.jit
def _forward_grads(layer, x_bsd, ct_bsd, mask_bs):
    def loss_fn(layer):
        (y_bsd, aux), loads = nnx.capture(layer, ExpertLoad)(x_bsd, mask_bs)
        return jnp.sum(y_bsd * ct_bsd) + aux.aux_loss, (y_bsd, aux, loads)

    (_, (y_bsd, aux, loads)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(layer)
    apply_routing_bias_update(layer, loads, rate=1e-3)
    return y_bsd, aux, grads


def _grad_leaves(grads) -> dict:
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(grads)
    }


@functools.cache
def _oracle(mesh_name: str):
    """The unsharded layer's output, aux, gradients and updated bias, same starving bias."""
    layer = MoELayer(_config(), rngs=nnx.Rngs(0))
    layer.bias_e[...] = jnp.asarray(_starving_bias(mesh_name))
    y_bsd, aux, grads = _forward_grads(layer, *_inputs())
    return y_bsd, aux, _grad_leaves(grads), np.asarray(layer.bias_e[...])


def _place(inputs: str, mesh, arrays):
    """The layer's inputs as users pass them: plain arrays, replicated, or split by batch."""
    if inputs == "unsharded":
        return arrays
    if inputs == "replicated":
        return [jax.device_put(a, NamedSharding(mesh, P())) for a in arrays]
    batch = ("activation_batch",) + (None,) * (arrays[0].ndim - 1)
    return [jax.device_put(a, logical_sharding(mesh, batch[: a.ndim])) for a in arrays]


# Every mesh with every kind of input, both dispatch kinds on every mesh and for every kind
# of input (dropless: the ragged exchange; capacity_factor = E / k gives T_local slots, so
# nothing is dropped and capacity must match the unsharded dropless layer).
@pytest.mark.parametrize(
    "mesh_name, inputs, dispatch, kernel",
    [
        ("1x8", "unsharded", "dropless", "auto"),
        ("1x8", "replicated", "capacity", "auto"),
        ("1x8", "data", "dropless", "auto"),
        ("2x4", "unsharded", "capacity", "batched"),
        ("2x4", "replicated", "dropless", "auto"),
        ("2x4", "data", "capacity", "blocked"),
        ("4x2", "unsharded", "dropless", "auto"),
        ("4x2", "replicated", "capacity", "blocked"),
        ("4x2", "data", "capacity", "batched"),
        ("8", "data", "dropless", "auto"),
    ],
)
def test_sharded_layer_matches_unsharded(mesh_name, inputs, dispatch, kernel):
    """Outputs, loss, every gradient, the loads and the updated bias equal the unsharded
    layer's. Groups, a shared expert, padding, an idle expert and a device that receives
    nothing."""
    cfg = _config(expert_axis="expert", dispatch=dispatch, capacity_factor=16 / 3, kernel=kernel)
    mesh = _mesh(mesh_name)
    x_bsd, ct_bsd, mask_bs = _inputs()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules_for_mesh(mesh)):
        validate_mesh(mesh, cfg, num_tokens=x_bsd.shape[0] * x_bsd.shape[1], batch_size=8)
        layer = nnx.jit(lambda: MoELayer(cfg, rngs=nnx.Rngs(0)))()
        replicated = logical_sharding(mesh, ("router_exp",))
        layer.bias_e[...] = jax.device_put(jnp.asarray(_starving_bias(mesh_name)), replicated)
        args = _place(inputs, mesh, [x_bsd, ct_bsd, mask_bs])
        y_bsd, aux, grads = _forward_grads(layer, *args)
    y_ref, aux_ref, grads_ref, bias_ref = _oracle(mesh_name)
    load = np.asarray(aux.expert_load)
    starved = _starving_bias(mesh_name) < 0
    assert load.sum() == 3 * 61 and not load[starved].any()  # the cases are exercised
    np.testing.assert_allclose(np.asarray(y_bsd), np.asarray(y_ref), atol=TOL, rtol=TOL)
    np.testing.assert_array_equal(load, np.asarray(aux_ref.expert_load))
    assert aux.expert_load.dtype == jnp.int32 and int(aux.dropped) == 0
    np.testing.assert_allclose(float(aux.aux_loss), float(aux_ref.aux_loss), rtol=TOL)
    got = _grad_leaves(grads)
    assert got.keys() == grads_ref.keys()
    for path, grad in got.items():
        np.testing.assert_allclose(grad, grads_ref[path], atol=TOL, rtol=TOL, err_msg=path)
    bias = layer.bias_e[...]
    assert bias.dtype == jnp.float32 and bias.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(bias), bias_ref)


@pytest.mark.parametrize("inputs", ["unsharded", "data"])
def test_data_parallel_dropless_layer_computes_local_tokens_only(inputs):
    """A (data=8, expert=1) mesh, every expert on every device (expert_axis=None): each
    device computes its own 8 tokens. Under plain GSPMD the global dispatch layout sent
    all-gathered tokens into the expert kernel, so every device computed all 64. Outputs,
    every gradient, the loads and the updated bias equal the unsharded layer's."""
    cfg = _config(block_size=3)
    mesh = make_mesh(8, 1)
    x_bsd, ct_bsd, mask_bs = _inputs()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules_for_mesh(mesh)):
        layer = nnx.jit(lambda: MoELayer(cfg, rngs=nnx.Rngs(0)))()
        replicated = logical_sharding(mesh, ("router_exp",))
        layer.bias_e[...] = jax.device_put(jnp.asarray(_starving_bias("1x8")), replicated)
        args = _place(inputs, mesh, [x_bsd, ct_bsd, mask_bs])
        hlo = _forward_grads.lower(layer, *args).compile().as_text()
        y_bsd, aux, grads = _forward_grads(layer, *args)
    # The expert kernel (the native custom call, or the block scan's while loop) works on
    # a device's 8 tokens [8, 16], never on all 64 [64, 16] (gathered or replicated).
    kernel_ops = [
        line
        for line in hlo.splitlines()
        if "sigmoid_moe_expert_ffn" in line or re.search(r"= \(.*\) while\(", line)
    ]
    assert kernel_ops and not [line for line in kernel_ops if "f32[64,16]" in line]
    y_ref, aux_ref, grads_ref, bias_ref = _oracle("1x8")
    np.testing.assert_allclose(np.asarray(y_bsd), np.asarray(y_ref), atol=TOL, rtol=TOL)
    np.testing.assert_array_equal(np.asarray(aux.expert_load), np.asarray(aux_ref.expert_load))
    got = _grad_leaves(grads)
    for path, grad in got.items():
        np.testing.assert_allclose(grad, grads_ref[path], atol=TOL, rtol=TOL, err_msg=path)
    np.testing.assert_array_equal(np.asarray(layer.bias_e[...]), bias_ref)


@pytest.mark.parametrize("how", ["explicit axes", "inside the caller's shard_map"])
def test_data_parallel_layer_on_explicit_axes_and_inside_shard_map(how):
    """The data-parallel layer on a jax.make_mesh mesh (Explicit axes: the output keeps the
    input's sharding, so it reshapes back), and called per shard inside the caller's own
    shard_map (Manual axes: the tokens are local already, no second shard_map): the
    unsharded layer's output."""
    cfg = MoEConfig(d_model=16, d_ff=8, router=RouterConfig(num_experts=8, top_k=2))
    x_bsd = jax.random.normal(jax.random.key(1), (4, 8, 16))
    y_ref, _ = MoELayer(cfg, rngs=nnx.Rngs(0))(x_bsd)
    kind = AxisType.Explicit if how == "explicit axes" else AxisType.Auto
    mesh = jax.make_mesh((2, 4), ("data", "expert"), (kind, kind))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules_for_mesh(mesh)):
        layer = MoELayer(cfg, rngs=nnx.Rngs(0))
        if how == "explicit axes":
            y_bsd = nnx.jit(lambda layer, x: layer(x)[0])(layer, x_bsd)
        else:
            graph, state = nnx.split(layer)
            y_bsd = jax.shard_map(
                lambda state, x: nnx.merge(graph, state)(x)[0],
                in_specs=(P(), P("data")),
                out_specs=P("data"),
            )(state, x_bsd)
    np.testing.assert_allclose(np.asarray(y_bsd), np.asarray(y_ref), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("types", ["Auto,Explicit", "Explicit,Auto"])
def test_expert_parallelism_on_a_mesh_mixing_auto_and_explicit_axes(types):
    """A mesh with Auto and Explicit axes goes to shard_map as it is (no reshard naming an
    Auto axis): dropless EP equals the single-device dispatch."""
    e, k, tokens, d, f = 8, 2, 64, 16, 8
    keys = jax.random.split(jax.random.key(3), 4)
    x_td = jax.random.normal(keys[0], (tokens, d))
    routing = route(jax.random.normal(keys[1], (tokens, e)), None, RouterConfig(e, k))
    w_in_edf = jax.random.normal(keys[2], (e, d, 2 * f)) * 0.3
    w_out_efd = jax.random.normal(keys[3], (e, f, d)) * 0.3
    axis_types = tuple(getattr(AxisType, name) for name in types.split(","))
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types)
    args = (x_td, routing.expert_ids, routing.weights, w_in_edf, w_out_efd)
    out = jax.jit(functools.partial(expert_parallel_moe, mesh=mesh, capacity_factor=None))(*args)
    want = dropless_moe(*args, kernel="ragged_dot")
    np.testing.assert_allclose(np.asarray(out.y_td), np.asarray(want.y_td), atol=TOL, rtol=TOL)


@pytest.mark.parametrize(
    "kernel, expert_axis", [("batched", "expert"), ("blocked", "expert"), ("blocked", None)]
)
def test_capacity_drops_match_per_device_capacity_moe(kernel, expert_axis):
    """A tight capacity drops per sending device exactly as capacity_moe on its shard,
    experts split over the expert axis or (expert_axis=None) held by every device."""
    e, k, tokens, d, f = 8, 2, 64, 16, 8
    keys = jax.random.split(jax.random.key(2), 4)
    x_td = jax.random.normal(keys[0], (tokens, d))
    routing = route(jax.random.normal(keys[1], (tokens, e)) * 3, None, RouterConfig(e, k))
    w_in_edf = jax.random.normal(keys[2], (e, d, 2 * f)) * 0.3
    w_out_efd = jax.random.normal(keys[3], (e, f, d)) * 0.3
    mesh = make_mesh(data=2, expert=4)
    run = functools.partial(
        expert_parallel_moe,
        mesh=mesh,
        expert_axis=expert_axis,
        capacity_factor=1.0,
        kernel=kernel,
        block_size=2,
    )
    out = jax.jit(run)(x_td, routing.expert_ids, routing.weights, w_in_edf, w_out_efd)
    want_load = np.bincount(np.asarray(routing.expert_ids).reshape(-1), minlength=e)
    np.testing.assert_array_equal(np.asarray(out.expert_load), want_load)
    per_device = tokens // mesh.size
    ys, dropped = [], 0
    for i in range(mesh.size):  # device order of P(("data", "expert")) is row-major
        part = slice(i * per_device, (i + 1) * per_device)
        y_td, drop = capacity_moe(
            x_td[part],
            routing.expert_ids[part],
            routing.weights[part],
            w_in_edf,
            w_out_efd,
            capacity_factor=1.0,
            kernel="batched",  # the independent single-device formulation
        )
        ys.append(y_td)
        dropped += int(drop)
    assert dropped > 0 and int(out.dropped) == dropped
    np.testing.assert_allclose(np.asarray(out.y_td), np.concatenate(ys), atol=TOL, rtol=TOL)


def test_unsharded_layer_carries_logical_axes_without_placement():
    layer = MoELayer(_config(), rngs=nnx.Rngs(0))
    assert layer.w_in_edf.out_sharding == ("exp", "embed", "mlp")
    assert layer.bias_e.out_sharding == ("router_exp",)
    assert isinstance(layer.bias_e, RoutingBias)
    assert len(layer.w_in_edf[...].sharding.device_set) == 1


def test_rules_cover_every_param_axis():
    names = dict(DEFAULT_RULES)
    for axes in PARAM_AXES.values():
        assert all(a in names for a in axes)
    one_d = jax.make_mesh((8,), ("expert",), (AxisType.Auto,))
    assert dict(rules_for_mesh(one_d))["activation_batch"] == "expert"
    custom = rules_for_mesh(make_mesh(2, 4), (("exp", None),))
    assert custom == (("exp", None),)


def test_bad_meshes_and_configs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"make_mesh\(data=3, expert=4\).*12 devices"):
        make_mesh(data=3, expert=4)
    with pytest.raises(TypeError, match="make_mesh"):
        make_mesh(data=2.0, expert=4)
    with pytest.raises(ValueError, match=r"make_mesh\(expert=0\)"):
        make_mesh(expert=0)
    six = _config(router=RouterConfig(num_experts=6, top_k=2), expert_axis="expert")
    with pytest.raises(ValueError, match="does not divide num_experts=6"):
        validate_mesh(make_mesh(data=2, expert=4), six)
    cfg = _config(expert_axis="expert")
    with pytest.raises(ValueError, match=r"batch_size=4 does not split over the 8 devices"):
        validate_mesh(make_mesh(data=2, expert=4), cfg, batch_size=4)  # rows go to every device
    one_d = jax.make_mesh((8,), ("expert",), (AxisType.Auto,))
    validate_mesh(one_d, cfg, batch_size=8, num_tokens=64)
    with pytest.raises(ValueError, match=r"batch_size=4 .* axes \['expert'\]"):
        validate_mesh(one_d, cfg, batch_size=4)
    for bad, error in ((-8, ValueError), (16.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="num_tokens"):
            validate_mesh(make_mesh(data=2, expert=4), cfg, num_tokens=bad)
        with pytest.raises(error, match="batch_size"):
            validate_mesh(make_mesh(data=2, expert=4), cfg, batch_size=bad)
    with pytest.raises(ValueError, match="num_tokens=12 .*8 devices"):
        validate_mesh(make_mesh(data=2, expert=4), cfg, num_tokens=12)
    other = jax.make_mesh((2, 4), ("batch", "model"), (AxisType.Auto,) * 2)
    with pytest.raises(ValueError, match="expert_axis='expert' is not an axis"):
        validate_mesh(other, cfg)
    with pytest.raises(TypeError, match="expert_axis must be a mesh axis name"):
        _config(expert_axis=3)
    with pytest.raises(ValueError, match="have no rule"):
        logical_sharding(make_mesh(2, 4), ("vocab",))

    x_td = jnp.ones((12, 16))
    ids_tk = jnp.zeros((12, 2), jnp.int32)
    w_tk = jnp.ones((12, 2))
    w_in, w_out = jnp.ones((8, 16, 16)), jnp.ones((8, 8, 16))
    with pytest.raises(ValueError, match="needs a device mesh"):
        expert_parallel_moe(x_td, ids_tk, w_tk, w_in, w_out)
    with pytest.raises(ValueError, match="12 tokens, not divisible"):
        expert_parallel_moe(x_td, ids_tk, w_tk, w_in, w_out, mesh=make_mesh(2, 4))
    with pytest.raises(ValueError, match="does not divide"):
        expert_parallel_moe(
            x_td[:8], ids_tk[:8], w_tk[:8], w_in[:6], w_out[:6], mesh=make_mesh(2, 4)
        )
    layer_cfg = dataclasses.replace(cfg, expert_axis="model")
    mesh = make_mesh(2, 4)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules_for_mesh(mesh)):
        layer = MoELayer(layer_cfg, rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match="expert_axis='model' is not an axis"):
            layer(jnp.ones((8, 16)))


def test_the_mesh_value_is_parsed_checked_and_built_in_one_place():
    mesh = MeshConfig.parse("data=2,expert=4")
    assert mesh == MeshConfig(2, 4) and mesh.size == 8 and str(mesh) == "data=2,expert=4"
    assert MeshConfig.parse(" expert=8 ") == MeshConfig(1, 8)
    assert MeshConfig().expert_axis is None and mesh.expert_axis == "expert"
    assert MeshConfig(data=8).expert_axis is None  # data parallel only: every expert here
    for text in ("", ",", "data=2,,expert=2", "data=0", "data=x", "model=2", "data=²"):
        with pytest.raises(ValueError, match=r"expected data=D,expert=E .*got"):
            MeshConfig.parse(text)
    with pytest.raises(ValueError, match="'data' is given twice in 'data=2,data=4'"):
        MeshConfig.parse("data=2,data=4")
    with pytest.raises(TypeError, match="mesh data size must be an int"):
        MeshConfig(data=2.0)
    with pytest.raises(ValueError, match="mesh expert size must be >= 1"):
        MeshConfig(expert=0)
    # The same check as validate_mesh: expert axis, batch rows, tokens.
    cfg = _config(expert_axis="expert")
    mesh.validate(cfg, batch_size=8, num_tokens=64)
    with pytest.raises(ValueError, match="does not divide num_experts=6"):
        mesh.validate(_config(router=RouterConfig(num_experts=6, top_k=2)))
    with pytest.raises(ValueError, match="batch_size=12 does not split over the 8 devices"):
        mesh.validate(cfg, batch_size=12)
    with pytest.raises(ValueError, match="num_tokens=12 is not divisible by the mesh's 8"):
        mesh.validate(cfg, num_tokens=12)
    with pytest.raises(ValueError, match="num_tokens must be >= 0, got -8"):
        mesh.validate(cfg, num_tokens=-8)
    with pytest.raises(TypeError, match="config must be a MoEConfig"):
        mesh.validate(cfg.router)
    assert mesh.local_devices(2) == 4
    with pytest.raises(ValueError, match="3 processes need a mesh whose devices divide"):
        mesh.local_devices(3)
    built = mesh.make()
    assert dict(built.shape) == {"data": 2, "expert": 4}
    with pytest.raises(ValueError, match=r"make_mesh\(data=2, expert=4\) needs .* 4 are"):
        mesh.make(jax.devices()[:4])
