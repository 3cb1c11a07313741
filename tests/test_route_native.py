"""The native CPU route (csrc/route_cpu.cc): candidates, their ranking, and route() on top.

route() takes it for sigmoid selection without groups when E > its candidate slots; every
result must be the portable path's, bit for bit (ids, weights, scores, gradients), on both
of the kernel's paths (AVX2 and generic), under jit, vmap and a mesh.
"""

import functools
import os
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sigmoid_moe import RouterConfig, _native, route
from sigmoid_moe._sigmoid_selection import num_candidates

pytestmark = pytest.mark.skipif(not _native.available(), reason="native kernels not built")

# The suite compiles at LLVM -O0 (tests/conftest.py); these bit-for-bit claims are about
# the programs users run, so they compile at XLA's default optimisation level.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 3})


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _router_logits(rng, rows, e, scale=2.0):
    """Router-like logits: normal, a few hot experts, a few saturated rows."""
    logits = rng.standard_normal((rows, e)).astype(np.float32) * scale
    logits[::17, rng.integers(0, e)] += 6.0
    return logits


# ---------------------------------------------------------------------------------------
# The candidates kernel against a float64 oracle.


def _keys64(logits, bias):
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64))) + bias.astype(np.float64)


@pytest.mark.parametrize("allow_avx2", [True, False], ids=["avx2", "generic"])
@pytest.mark.parametrize(
    "e, k, bias_scale",
    [(64, 6, 1e-3), (128, 8, 0.3), (384, 8, 0.0), (128, 16, 1e-2), (100, 4, 0.3), (256, 24, 3.0)],
)
def test_candidates_hold_every_expert_near_the_top_k(allow_avx2, e, k, bias_scale):
    rng = _rng("cand", e, k, bias_scale)
    logits = _router_logits(rng, 700, e)
    bias = (rng.standard_normal(e) * bias_scale).astype(np.float32)
    c = num_candidates(k)
    index, chosen, chosen_bias, status = map(
        np.asarray,
        jit(
            functools.partial(
                _native.route_candidates, k=k, num_candidates=c, allow_avx2=allow_avx2
            )
        )(logits, bias),
    )
    keys = _keys64(logits, bias)
    kth = -np.sort(-keys, axis=-1)[:, k - 1 : k]
    routed = status == 1
    assert routed.mean() > 0.99  # near ties beyond C slots are rare on such logits
    for row in np.flatnonzero(routed):
        real = index[row] >= 0
        got = index[row][real]
        assert np.all(real[: real.sum()]) and np.all(np.diff(got) > 0)  # ascending, pads last
        # Every expert within float32 noise of the k-th key (the exact top k included).
        need = np.flatnonzero(keys[row] >= kth[row] - 1e-6)
        assert set(need) <= set(got), row
        np.testing.assert_array_equal(chosen[row][real], logits[row, got])
        np.testing.assert_array_equal(chosen_bias[row][real], bias[got])
        assert np.all(chosen[row][~real] == 0) and np.all(chosen_bias[row][~real] == -np.inf)
    counts = (index[routed] >= 0).sum(axis=1)
    assert counts.min() >= k and counts.max() <= c
    assert counts.mean() < k + 4  # the kernel narrows: not every expert in every row


@pytest.mark.parametrize("allow_avx2", [True, False], ids=["avx2", "generic"])
def test_candidates_status_not_routed_and_too_many(allow_avx2):
    e, k, c = 64, 4, 16
    logits = _router_logits(_rng("status"), 6, e)
    logits[1, 3] = np.nan
    logits[2, 7] = -np.inf
    # Every sigmoid rounds to 1.0 but no two logits are equal: 64 near ties, more than C.
    logits[3] = 30.0 + np.arange(e, dtype=np.float32) / 8
    fn = jit(
        functools.partial(_native.route_candidates, k=k, num_candidates=c, allow_avx2=allow_avx2)
    )
    index, chosen, chosen_bias, status = map(np.asarray, fn(logits, np.zeros(e, np.float32)))
    np.testing.assert_array_equal(status, [1, 0, 0, 2, 1, 1])
    for row in (1, 2):
        np.testing.assert_array_equal(index[row], np.arange(c))
        assert np.all(chosen[row] == 0) and np.all(chosen_bias[row] == 0)
    bias = np.zeros(e, np.float32)
    bias[5] = np.inf
    assert np.all(np.asarray(fn(logits, bias)[3]) == 0)  # a non-finite bias routes nothing


@pytest.mark.parametrize("allow_avx2", [True, False], ids=["avx2", "generic"])
def test_exact_tie_groups_keep_k_and_do_not_overflow(allow_avx2):
    """All-zero tokens (padding) with a zero or sign-quantised bias: whole groups of
    experts tie exactly; only the k lowest ids of a group can be chosen, so the row fits
    its slots (no fallback), identical rows included (the kernel reuses the first)."""
    e, k = 128, 8
    c = num_candidates(k)
    quantised = (_rng("quantised").integers(-3, 4, e) * 1e-3).astype(np.float32)
    fn = jit(
        functools.partial(_native.route_candidates, k=k, num_candidates=c, allow_avx2=allow_avx2)
    )
    for bias in (np.zeros(e, np.float32), quantised):
        logits = np.zeros((600, e), np.float32)
        logits[::7] = 0.5  # other repeated rows, interleaved
        index, _, _, status = map(np.asarray, fn(logits, bias))
        assert np.all(status == 1)
        keys = _keys64(logits, bias)
        for row in (0, 1, 7, 599):
            got = index[row][index[row] >= 0]
            assert len(got) <= 2 * k - 1
            top = np.argsort(-keys[row], kind="stable")[:k]  # ties to the lower id
            assert set(top) <= set(got)
    # No bias at all, as route(x, None, cfg) at step 0: the zeros route to experts 0..k-1.
    cfg = RouterConfig(num_experts=e, top_k=k)
    routed = jit(lambda x: route(x, None, cfg))(np.zeros((4, e), np.float32))
    np.testing.assert_array_equal(routed.expert_ids, np.tile(np.arange(k), (4, 1)))


# ---------------------------------------------------------------------------------------
# The ranking kernel against a stable sort.


@pytest.mark.parametrize("c, k", [(16, 8), (24, 16), (72, 64), (20, 3), (13, 13)])
def test_rank_candidates_is_a_stable_descending_sort(c, k):
    rng = _rng("rank", c, k)
    keys = rng.integers(-3, 4, size=(300, c)).astype(np.float32) / 2  # many ties
    keys[::5] = rng.standard_normal((60, c))
    keys[1, :4] = [np.nan, -np.inf, -0.0, 0.0]
    keys[2] = -np.inf
    index = np.sort(rng.integers(0, 10_000, size=(300, c)), axis=1).astype(np.int32)
    logits = rng.standard_normal((300, c)).astype(np.float32)
    ids, chosen = map(
        np.asarray, jit(_native.rank_candidates, static_argnums=3)(keys, index, logits, k)
    )
    canon = np.where(np.isnan(keys), -np.inf, keys) + 0.0  # -0.0 ties 0.0
    order = np.argsort(-canon, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(ids, np.take_along_axis(index, order, axis=1))
    np.testing.assert_array_equal(chosen, np.take_along_axis(logits, order, axis=1))


# ---------------------------------------------------------------------------------------
# route(): native against portable, bit for bit.


def _portable(monkeypatch, fn):
    """``fn`` traced with the native kernels off (the flag is read at trace time)."""
    with monkeypatch.context() as m:
        m.setenv("SIGMOID_MOE_NATIVE", "0")
        return jit(fn)


def _assert_same(got, want):
    for name, g, w in zip(got._fields, got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)


def _inputs(kind, rows, e):
    rng = _rng("inputs", kind, rows, e)
    if kind == "router":
        logits = _router_logits(rng, rows, e)
        bias = rng.standard_normal(e).astype(np.float32) * 1e-2
    elif kind == "wide bias":
        logits = rng.standard_normal((rows, e)).astype(np.float32)
        bias = rng.standard_normal(e).astype(np.float32) * 50
    elif kind == "near ties":
        # Logits a few float32 steps apart, biases that cancel their sigmoid differences
        # to the last bit or nearly: keys within ulps of each other around the k-th.
        base = rng.standard_normal((rows, 1)).astype(np.float32)
        steps = rng.integers(0, 4, size=(rows, e)).astype(np.float32)
        logits = base + steps * np.float32(2**-20)
        bias = (rng.integers(-2, 3, size=e) * 2.0**-24).astype(np.float32)
    elif kind == "padding":  # zero tokens among real ones, a sign-quantised bias
        logits = _router_logits(rng, rows, e)
        logits[rows // 3 :: 2] = 0.0
        bias = (rng.integers(-3, 4, size=e) * 1e-3).astype(np.float32)
    else:  # "special": exact ties, saturation, non-finite logits
        logits = rng.integers(-2, 3, size=(rows, e)).astype(np.float32)
        logits[3] = 40.0
        logits[4, 1] = np.nan
        logits[5, 2] = np.inf
        logits[6, :] = -np.inf
        bias = np.zeros(e, np.float32)
    return logits, bias


CONFIGS = [
    RouterConfig(num_experts=64, top_k=6),
    RouterConfig(num_experts=128, top_k=8, route_scale=2.5),
    RouterConfig(num_experts=384, top_k=8),
    RouterConfig(num_experts=48, top_k=2, normalize=False),
    RouterConfig(num_experts=100, top_k=16),  # E not a multiple of 16: the generic path
    RouterConfig(num_experts=96, top_k=20),  # k > 16: the generic path
]


@pytest.mark.parametrize("allow_avx2", [True, False], ids=["avx2", "generic"])
@pytest.mark.parametrize("kind", ["router", "wide bias", "near ties", "padding", "special"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"E{c.num_experts}k{c.top_k}")
def test_native_route_equals_portable(cfg, kind, allow_avx2, monkeypatch):
    logits, bias = _inputs(kind, 300, cfg.num_experts)
    if not allow_avx2:
        monkeypatch.setattr(
            _native,
            "route_candidates",
            functools.partial(_native.route_candidates, allow_avx2=False),
        )
    fn = lambda x, b: route(x, b, cfg)  # noqa: E731
    native = jit(fn)
    assert "sigmoid_moe_route_candidates" in native.lower(logits, bias).as_text()
    _assert_same(native(logits, bias), _portable(monkeypatch, fn)(logits, bias))


def test_leading_dims_and_bfloat16(monkeypatch):
    cfg = RouterConfig(num_experts=128, top_k=8)
    logits, bias = _inputs("router", 60, 128)
    x = jnp.asarray(logits.reshape(3, 4, 5, 128), jnp.bfloat16)
    fn = lambda x, b: route(x, b, cfg)  # noqa: E731
    got = jit(fn)(x, bias)
    assert got.expert_ids.shape == (3, 4, 5, 8) and got.routed.shape == (3, 4, 5)
    _assert_same(got, _portable(monkeypatch, fn)(x, bias))


def test_gradients_and_forward_mode_equal_portable(monkeypatch):
    cfg = RouterConfig(num_experts=128, top_k=8, route_scale=2.5)
    logits, bias = _inputs("router", 64, 128)
    logits[3, 5] = np.nan  # an unrouted token: zero gradient, nothing non-finite leaks
    scale = jnp.arange(1.0, 9.0)

    def loss(x, b):
        r = route(x, b, cfg)
        return jnp.sum(r.weights * scale) + jnp.sum(r.scores**2)

    grad = jax.grad(loss)
    got = jit(grad)(logits, bias)
    np.testing.assert_array_equal(
        np.asarray(got), np.asarray(_portable(monkeypatch, grad)(logits, bias))
    )
    assert np.all(np.isfinite(np.asarray(got))) and np.all(np.asarray(got)[3] == 0)
    tangent = jnp.asarray(_rng("tangent").standard_normal(logits.shape), jnp.float32)

    def forward(x, b, t):
        return jax.jvp(lambda x: route(x, b, cfg).weights, (x,), (t,))

    want = _portable(monkeypatch, forward)(logits, bias, tangent)
    for g, w in zip(jit(forward)(logits, bias, tangent), want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_second_derivatives_equal_portable(monkeypatch):
    cfg = RouterConfig(num_experts=64, top_k=6)
    logits, bias = _inputs("router", 5, 64)
    logits[2, 9] = np.nan

    def loss(x):
        return jnp.sum(route(x, bias, cfg).weights * jnp.arange(1.0, 7.0))

    def hvp(x):
        return jax.jvp(jax.grad(loss), (x,), (jnp.ones_like(x),))[1]

    got = np.asarray(jit(hvp)(logits))
    np.testing.assert_array_equal(got, np.asarray(_portable(monkeypatch, hvp)(logits)))
    assert np.abs(got).sum() > 0
    hessian = jax.hessian(loss)
    np.testing.assert_array_equal(
        np.asarray(jit(hessian)(logits[:2])),
        np.asarray(_portable(monkeypatch, hessian)(logits[:2])),
    )


def test_vmap_over_logits_and_over_bias(monkeypatch):
    cfg = RouterConfig(num_experts=64, top_k=6)
    logits = _router_logits(_rng("vmap"), 4 * 30, 64).reshape(4, 30, 64)
    biases = (_rng("vmap bias").standard_normal((4, 64)) * 0.1).astype(np.float32)
    fn = lambda x, b: route(x, b, cfg)  # noqa: E731
    portable = _portable(monkeypatch, fn)
    both = jit(jax.vmap(fn))(logits, biases)  # per-example bias: one call each
    shared = jit(jax.vmap(fn, in_axes=(0, None)))(logits, biases[0])  # more rows
    # The all-experts fallback stays a branch under vmap (a batched predicate would make
    # it a select that always runs).
    assert "conditional" in jit(jax.vmap(fn)).lower(logits, biases).compile().as_text()
    for i in range(4):
        row = functools.partial(lambda a, i: a[i], i=i)
        _assert_same(jax.tree.map(row, both), portable(logits[i], biases[i]))
        _assert_same(jax.tree.map(row, shared), portable(logits[i], biases[0]))


def _auto_mesh(shape, names):
    return jax.make_mesh(shape, names, (jax.sharding.AxisType.Auto,) * len(shape))


def test_row_sharded_logits_stay_sharded(monkeypatch):
    cfg = RouterConfig(num_experts=128, top_k=8)
    logits, bias = _inputs("router", 64, 128)
    mesh = _auto_mesh((8,), ("data",))
    x = jax.device_put(jnp.asarray(logits), NamedSharding(mesh, P("data", None)))
    fn = jit(lambda x, b: route(x, b, cfg))
    hlo = fn.lower(x, bias).compile().as_text()
    assert "sigmoid_moe_route_candidates" in hlo and "sigmoid_moe_rank_candidates" in hlo
    assert "all-gather" not in hlo  # each device narrows and ranks its own 8 tokens
    got = fn(x, bias)
    assert got.expert_ids.sharding.spec[0] == "data"
    _assert_same(got, _portable(monkeypatch, lambda x, b: route(x, b, cfg))(logits, bias))


def test_which_configs_and_platforms_take_the_native_route(monkeypatch):
    def lowered(cfg, platforms=None):
        x = jnp.zeros((4, cfg.num_experts))
        fn = jit(lambda x: route(x, None, cfg))
        if platforms:
            return jax.export.export(fn, platforms=platforms)(x).mlir_module()
        return fn.lower(x).as_text()

    assert "sigmoid_moe_route_candidates" in lowered(RouterConfig(num_experts=64, top_k=6))
    for cfg in (
        RouterConfig(num_experts=64, top_k=6, num_groups=8, topk_groups=4),
        RouterConfig(num_experts=64, top_k=6, bias_mode="logit"),
        RouterConfig(num_experts=64, top_k=6, score_fn="softmax"),
        RouterConfig(num_experts=16, top_k=6),  # no more experts than candidate slots
    ):
        assert "sigmoid_moe_route_candidates" not in lowered(cfg), cfg
    assert "custom_call" not in lowered(RouterConfig(num_experts=64, top_k=6), ("cuda",))
    with monkeypatch.context() as m:
        m.setenv("SIGMOID_MOE_NATIVE", "0")
        assert "sigmoid_moe" not in lowered(RouterConfig(num_experts=64, top_k=6))


def test_native_kernels_in_a_fresh_process_with_one_thread():
    # The single-threaded paths (no intra-op pool to split rows over) give the same top-k
    # indices and the same routing as the portable paths.
    code = (
        "import os, numpy as np, jax, jax.numpy as jnp\n"
        "from sigmoid_moe import RouterConfig, route, topk\n"
        "x = np.random.default_rng(8).integers(-3, 4, (3000, 128)).astype(np.float32)\n"
        "a = jax.jit(topk._top_k_native, static_argnums=1)(jnp.asarray(x), 8)[1]\n"
        "b = jax.jit(topk._top_k_portable, static_argnums=1)(jnp.asarray(x), 8)[1]\n"
        "assert (np.asarray(a) == np.asarray(b)).all()\n"
        "cfg = RouterConfig(num_experts=128, top_k=8)\n"
        "rng = np.random.default_rng(9)\n"
        "x = rng.standard_normal((3000, 128)).astype(np.float32) * 2\n"
        "b = (rng.standard_normal(128) * 0.01).astype(np.float32)\n"
        "a = jax.jit(lambda x, b: route(x, b, cfg))(x, b)\n"
        "os.environ['SIGMOID_MOE_NATIVE'] = '0'\n"
        "p = jax.jit(lambda x, b: route(x, b, cfg))(x, b)\n"
        "assert all((np.asarray(u) == np.asarray(v)).all() for u, v in zip(a, p))\n"
        "print('same')\n"
    )
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_multi_thread_eigen=false", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "same" in out.stdout, out.stderr[-2000:]
