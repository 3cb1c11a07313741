"""Dropless expert parallelism through the ragged exchange: function-level parity on 8
simulated CPU devices, and the GPU/TPU program as lowered on this CPU host."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from sigmoid_moe import RouterConfig, dropless_moe, expert_parallel_moe, make_mesh, route
from sigmoid_moe.ragged_exchange import dropless_receive_rows

TOL = 1e-5
E, K, T, D, F = 16, 3, 64, 12, 4


def _problem():
    keys = jax.random.split(jax.random.key(0), 4)
    x_td = jax.random.normal(keys[0], (T, D))
    routing = route(jax.random.normal(keys[1], (T, E)) * 2, None, RouterConfig(E, K))
    ids_tk = routing.expert_ids
    ids_tk = ids_tk.at[:3].set(5)  # duplicate ids: three copies of a token to one expert
    ids_tk = ids_tk.at[8:16].set(jnp.array([0, 1, 2]))  # a device's tokens all to device 0
    ids_tk = jnp.where(ids_tk // 4 == 2, 3, ids_tk)  # experts 8..11 (one device) idle
    w_in = jax.random.normal(keys[2], (E, D, 2 * F)) * 0.3
    w_out = jax.random.normal(keys[3], (E, F, D)) * 0.3
    mask_t = jnp.ones((T,), bool).at[40:44].set(False)
    return x_td, ids_tk, routing.weights, w_in, w_out, mask_t


def _loss(dispatch, x_td, weights_tk, w_in, w_out, ids_tk, mask_t):
    y_td = dispatch(x_td, ids_tk, weights_tk, w_in, w_out, mask_t)[0]
    return jnp.sum(y_td * jnp.cos(y_td + 1.0)), y_td


def _value_and_grads(dispatch, problem):
    x_td, ids_tk, weights_tk, w_in, w_out, mask_t = problem
    fn = jax.value_and_grad(functools.partial(_loss, dispatch), argnums=(0, 1, 2, 3), has_aux=True)
    return jax.jit(fn)(x_td, weights_tk, w_in, w_out, ids_tk, mask_t)


@pytest.mark.parametrize("kernel", ["ragged_dot", "blocked"])
def test_dropless_ep_matches_dropless_moe(kernel):
    """(2, 4) mesh: outputs and gradients (x, weights, both expert weights) equal the
    single-device dropless path, with duplicate ids, padding, an idle device and one
    sender whose every copy goes to one device."""
    problem = _problem()
    mesh = make_mesh(data=2, expert=4)
    ep = functools.partial(
        expert_parallel_moe, mesh=mesh, capacity_factor=None, kernel=kernel, block_size=2
    )
    (_, y_td), grads = _value_and_grads(ep, problem)
    (_, y_ref), grads_ref = _value_and_grads(
        functools.partial(dropless_moe, kernel="ragged_dot"), problem
    )
    np.testing.assert_allclose(np.asarray(y_td), np.asarray(y_ref), atol=TOL, rtol=TOL)
    for got, want in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL, rtol=TOL)
    out = jax.jit(ep)(*problem)
    ids_tk, mask_t = np.asarray(problem[1]), np.asarray(problem[5])
    want_load = np.bincount(ids_tk[mask_t].reshape(-1), minlength=E)
    np.testing.assert_array_equal(np.asarray(out.expert_load), want_load)
    assert int(out.dropped) == 0 and not want_load[8:12].any()


def test_every_copy_on_one_device_fills_the_worst_case_buffer():
    """All T * k copies routed to device 0's experts 0, 1 (with duplicates, as k = 3 >
    E_l = 2): every token sends it min(E_l, k) = 2 rows, which fill its n * T_l * 2 = 128
    receive rows exactly (n * T_l * k would be 192); nothing is lost, and a duplicate copy
    combines the row its first copy sent."""
    x_td, _, weights_tk, w_in, w_out, _ = _problem()
    ids_tk = (jnp.arange(T)[:, None] + jnp.arange(K)) % 2
    mesh = jax.make_mesh((8,), ("expert",), (AxisType.Auto,))
    out = jax.jit(
        functools.partial(expert_parallel_moe, mesh=mesh, capacity_factor=None, kernel="blocked")
    )(x_td, ids_tk, weights_tk, w_in, w_out)
    ref = dropless_moe(x_td, ids_tk, weights_tk, w_in, w_out, kernel="ragged_dot")
    np.testing.assert_allclose(np.asarray(out.y_td), np.asarray(ref.y_td), atol=TOL, rtol=TOL)
    assert int(out.expert_load.sum()) == T * K


def test_receive_buffer_holds_min_local_experts_or_k_rows_per_token():
    # n * T_l * min(E_l, k): fewer local experts than k bound a token's rows to a device.
    assert dropless_receive_rows(8, 3, 8, 2) == 8 * 8 * 2
    assert dropless_receive_rows(8, 3, 8, 16) == dropless_receive_rows(8, 3, 8) == 8 * 8 * 3
    assert dropless_receive_rows(0, 3, 8, 2) == 1  # never an empty buffer


def test_kernel_choices_follow_the_mode():
    problem = _problem()
    mesh = make_mesh(data=2, expert=4)
    with pytest.raises(ValueError, match="kernel='batched' is not supported with dropless"):
        expert_parallel_moe(*problem, mesh=mesh, capacity_factor=None, kernel="batched")
    with pytest.raises(ValueError, match="kernel='ragged_dot' is not supported with capacity"):
        expert_parallel_moe(*problem, mesh=mesh, capacity_factor=1.0, kernel="ragged_dot")
    with pytest.raises(ValueError, match="capacity_factor must be a finite float > 0"):
        expert_parallel_moe(*problem, mesh=mesh, capacity_factor=-1.0)


# --------------------------------------------------------------------------- lowering

_FLOAT_EXCHANGE = re.compile(
    r'"stablehlo\.(?:all_to_all|all_gather|reduce_scatter|collective_permute)"'
    r"[^\n]*:\s*\(tensor<[0-9x]*(?:f32|bf16|f16)>"
)


_CUSTOM_CALLS = ("ragged_all_to_all", "__gpu$xla.gpu.triton", "tpu_custom_call")


def _export(platform: str, capacity_factor):
    """fwd+bwd of routing + EP with ``kernel="auto"`` for ``platform`` on an abstract
    (1, 8) mesh: no device."""
    mesh = AbstractMesh((1, 8), ("data", "expert"), (AxisType.Auto,) * 2)
    router = RouterConfig(E, K)

    def loss(w_in, w_out, router_w, x_td):
        routing = route(jnp.dot(x_td, router_w).astype(jnp.float32), None, router)
        y_td = expert_parallel_moe(
            x_td,
            routing.expert_ids,
            routing.weights,
            w_in,
            w_out,
            mesh=mesh,
            capacity_factor=capacity_factor,
        ).y_td
        return jnp.sum(y_td.astype(jnp.float32) ** 2)

    def spec(shape, partition):
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, partition))

    args = (
        spec((E, D, 2 * F), P("expert")),
        spec((E, F, D), P("expert")),
        spec((D, E), P()),
        spec((T, D), P(("data", "expert"))),
    )
    return jax.export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1, 3))),
        platforms=(platform,),
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(c) for c in _CUSTOM_CALLS],
    )(*args)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowering_exchanges_through_ragged_all_to_all_only(platform):
    """The GPU/TPU program: 4 ragged_all_to_all (dispatch and return, forward and
    backward) of [T_l * k, d] rows into an [n * T_l * min(E_l, k), d] buffer and back;
    every other collective moves int32 sizes, none a padded [E, T_l, d] slot buffer. The
    local experts run the platform's tile kernel (kernel="auto"), no ragged_dot and no
    CPU kernel."""
    text = _export(platform, None).mlir_module()
    ragged = re.findall(r"@ragged_all_to_all\([^\n]*:\s*\((tensor<\w+>), (tensor<\w+>)", text)
    local_copies = T // 8 * K
    buffer = 8 * (T // 8) * min(E // 8, K)  # 2 local experts < k = 3: 128 rows, not 192
    assert buffer == dropless_receive_rows(T // 8, K, 8, E // 8) < 8 * local_copies
    assert sorted(ragged) == sorted(
        2 * [(f"tensor<{local_copies}x{D}xbf16>", f"tensor<{buffer}x{D}xbf16>")]
        + 2 * [(f"tensor<{buffer}x{D}xbf16>", f"tensor<{local_copies}x{D}xbf16>")]
    )
    kernel_call = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}[platform]
    targets = re.findall(r"stablehlo\.custom_call @([\w$.]+)", text)
    assert targets.count(kernel_call) >= 5, targets  # forward 2, backward 3 or 4
    assert not [t for t in targets if t.startswith("sigmoid_moe")]  # no CPU kernel
    assert "chlo.ragged_dot" not in text
    assert not _FLOAT_EXCHANGE.search(text)
    assert f"x{T // 8}x{D}xbf16" not in text  # no [.., T_l, d] slots anywhere
    assert "all_gather" not in text


def test_lowering_check_detects_the_padded_exchange():
    """The same check on capacity EP, whose all_to_all moves an [E, C, d] buffer."""
    text = _export("cuda", 4.0).mlir_module()
    assert _FLOAT_EXCHANGE.search(text) and "ragged_all_to_all" not in text


@pytest.mark.parametrize("capacity_factor", [None, 8.0])
def test_explicit_mesh_axes_match_one_device(capacity_factor):
    """``jax.make_mesh``'s default axes are Explicit: the sharding is in each array's type
    and shard_map refuses an argument whose sharding is not its spec (was a ValueError from
    inside shard_map). Replicated inputs, passed as mesh= or under jax.set_mesh: outputs
    and gradients equal the single-device path."""
    problem = _problem()
    mesh = jax.make_mesh((2, 4), ("data", "expert"), (AxisType.Explicit,) * 2)
    ep = functools.partial(
        expert_parallel_moe, capacity_factor=capacity_factor, kernel="blocked", block_size=2
    )
    (_, y_ref), grads_ref = _value_and_grads(
        functools.partial(dropless_moe, kernel="ragged_dot"), problem
    )
    for how in ("mesh=", "set_mesh"):
        if how == "mesh=":
            (_, y_td), grads = _value_and_grads(functools.partial(ep, mesh=mesh), problem)
        else:
            with jax.set_mesh(mesh):
                (_, y_td), grads = _value_and_grads(ep, problem)
        np.testing.assert_allclose(np.asarray(y_td), np.asarray(y_ref), atol=TOL, rtol=TOL)
        for got, want in zip(grads, grads_ref, strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL, rtol=TOL)


def test_explicit_abstract_mesh_lowers_for_an_accelerator():
    """An AbstractMesh with Explicit axes (no devices) lowers for cuda as the Auto one does."""
    mesh = AbstractMesh((2, 4), ("data", "expert"), (AxisType.Explicit,) * 2)
    x_td, ids_tk, weights_tk, w_in, w_out, mask_t = _problem()

    def forward(x_td, weights_tk, w_in, w_out):
        return expert_parallel_moe(
            x_td, ids_tk, weights_tk, w_in, w_out, mask_t, mesh=mesh, capacity_factor=None
        ).y_td

    exported = jax.export.export(
        jax.jit(forward),
        platforms=("cuda",),
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(c) for c in _CUSTOM_CALLS],
    )(
        *(
            jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P()))
            for a in (x_td, weights_tk, w_in, w_out)
        )
    )
    assert "ragged_all_to_all" in exported.mlir_module()
