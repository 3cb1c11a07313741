"""The native boundary (sigmoid_moe/_native.py): one helper chooses between a kernel and
its portable path, and the kernels' limits come from the extension itself."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sigmoid_moe import RouterConfig, _native, route
from sigmoid_moe.blocked_ffn import block_layout, blocked_expert_ffn
from sigmoid_moe.topk import top_k

pytestmark = pytest.mark.skipif(not _native.available(), reason="native kernels not built")


def _native_fn(x):
    return x + 1.0


def _portable_fn(x):
    return x * 2.0


def _choose(x, when=lambda: True):
    return _native.native_or_portable(_native_fn, _portable_fn, x, when=when)


def test_native_or_portable_runs_the_kernel_side_on_cpu_and_lowers_the_other_elsewhere():
    x = jnp.arange(4.0)
    np.testing.assert_array_equal(np.asarray(jax.jit(_choose)(x)), np.asarray(x + 1))
    cuda = jax.export.export(jax.jit(_choose), platforms=("cuda",))(x).mlir_module()
    assert "stablehlo.multiply" in cuda and "stablehlo.add" not in cuda


def test_native_or_portable_traces_only_the_portable_side_where_no_kernel_serves(monkeypatch):
    x = jnp.arange(8.0)

    def never(x):
        raise AssertionError("the native side was traced")

    def refused():
        return False

    for operand, when in (
        (x, refused),
        # An Explicit-sharded operand: the kernels' partitioning rules do not serve it.
        (_explicit(x), lambda: True),
    ):
        call = functools.partial(_native.native_or_portable, never, _portable_fn, when=when)
        assert "platform_index" not in str(jax.make_jaxpr(call)(operand))
        np.testing.assert_array_equal(np.asarray(call(operand)), np.asarray(x * 2))
    # Kernels off: the caller's predicate is not even asked (it may read LIMITS, which an
    # unbuilt extension leaves None).
    monkeypatch.setenv("SIGMOID_MOE_NATIVE", "0")

    def must_not_ask():
        raise AssertionError("the predicate was called with the kernels off")

    out = _native.native_or_portable(never, _portable_fn, x, when=must_not_ask)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x * 2))


def _explicit(x):
    mesh = jax.make_mesh((8,), ("data",), (jax.sharding.AxisType.Explicit,))
    return jax.device_put(x, NamedSharding(mesh, P("data")))


def test_every_native_path_chooses_through_the_helper(monkeypatch):
    """top_k, the sigmoid route and the blocked FFN all pick their kernel through
    ``native_or_portable`` (and nowhere else)."""
    calls = []
    real = _native.native_or_portable

    def recording(native, portable, *operands, when=lambda: True):
        calls.append(getattr(native, "func", native).__qualname__)
        return real(native, portable, *operands, when=when)

    monkeypatch.setattr(_native, "native_or_portable", recording)
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)
    jax.jit(lambda x: top_k(x, 4)).lower(logits)
    jax.jit(lambda x: route(x, None, RouterConfig(num_experts=64, top_k=6))).lower(logits)
    x = jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)
    w_in = jnp.zeros((2, 4, 6), jnp.float32)
    w_out = jnp.zeros((2, 3, 4), jnp.float32)
    expert_a = jnp.asarray([0, 1] * 8, jnp.int32)
    layout = block_layout(
        expert_a,
        jnp.repeat(jnp.arange(8, dtype=jnp.int32), 2),
        jnp.ones(16, bool),
        jnp.repeat(jnp.arange(8, dtype=jnp.int32), 2),
        jnp.ones(16, jnp.float32),
        jnp.asarray([8, 8], jnp.int32),
        num_tokens=8,
        block_size=8,
    )
    grad = jax.grad(lambda x: jnp.sum(blocked_expert_ffn(x, layout, w_in, w_out)))
    jax.jit(grad).lower(x)
    assert "_top_k_native" in calls  # topk.top_k
    assert "_by_candidates" in calls  # _sigmoid_selection.select
    assert "forward" in calls and "backward" in calls  # the blocked FFN's custom_vjp rules


# ---------------------------------------------------------------------------------------
# Limits: read from the extension, and the kernels enforce exactly those.


def test_limits_are_the_extensions():
    from sigmoid_moe import _native_cpu

    assert _native.LIMITS._asdict() == _native_cpu.limits()
    statuses = (_native.LIMITS.not_routed, _native.LIMITS.routed, _native.LIMITS.too_many)
    assert len(set(statuses)) == 3


def test_top_k_kernel_takes_k_up_to_its_limit_and_refuses_past_it():
    max_k = _native.LIMITS.max_k
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, max_k + 8)), jnp.float32)
    ids = _native.top_k_indices(x, max_k)
    want = np.argsort(-np.asarray(x), axis=-1, kind="stable")[:, :max_k]
    np.testing.assert_array_equal(np.asarray(ids), want)
    with pytest.raises(Exception, match="k must be in"):
        jax.block_until_ready(_native.top_k_indices(x, max_k + 1))
    # top_k itself takes the portable path past the limit, and the kernel up to it.
    for k, native in ((max_k, True), (max_k + 1, False)):
        text = jax.jit(functools.partial(top_k, k=k)).lower(x).as_text()
        assert ("sigmoid_moe_top_k" in text) is native


def test_rank_kernel_takes_candidates_up_to_its_limit_and_refuses_past_it():
    c = _native.LIMITS.max_candidates
    rng = np.random.default_rng(2)
    keys = jnp.asarray(rng.standard_normal((5, c + 8)), jnp.float32)
    index = jnp.broadcast_to(jnp.arange(c + 8, dtype=jnp.int32), keys.shape)
    ids, _ = _native.rank_candidates(keys[:, :c], index[:, :c], keys[:, :c], 4)
    want = np.argsort(-np.asarray(keys[:, :c]), axis=-1, kind="stable")[:, :4]
    np.testing.assert_array_equal(np.asarray(ids), want)
    with pytest.raises(Exception, match="C <= "):
        jax.block_until_ready(_native.rank_candidates(keys, index, keys, 4))
