"""top_k (and each internal formulation) against a stable-argsort NumPy oracle."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sigmoid_moe import _native
from sigmoid_moe import topk as topk_module
from sigmoid_moe.topk import top_k


def oracle(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Stable argsort on -x with -0 canonicalised and NaN -> -inf: ties to the lower index."""
    x = np.asarray(x, np.float64)
    x = np.where(np.isnan(x), -np.inf, x)
    key = np.where(x == 0, 0.0, -x)
    ids = np.argsort(key, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(x, ids, axis=-1), ids


def _canon(x):  # NaN -> -inf, as top_k does, for the internal formulations
    return jnp.where(jnp.isnan(x), -jnp.inf, x)


# Every path top_k can take, each called on canonicalised input. On CPU top_k itself is
# the native kernel (test_native_kernel_is_built_and_used_on_cpu); "portable" is the
# whole pure-JAX path, dispatch included, on the raw input.
VARIANTS = {
    "top_k": top_k,
    "portable": lambda x, k: topk_module._top_k_portable(x, k),
    "narrow": lambda x, k: topk_module._top_k_narrow(_canon(x), k),
    "wide": lambda x, k: topk_module._top_k_wide(_canon(x), k),
    "sorted": lambda x, k: topk_module._top_k_sorted(_canon(x), k),
}


def _check(fn, x, k):
    values, ids = fn(jnp.asarray(x), k)
    want_values, want_ids = oracle(np.asarray(jnp.asarray(x, jnp.float32)), k)
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    assert ids.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(values, np.float64), want_values)


def _sample(rng, shape, kind):
    if kind == "normal":
        return rng.standard_normal(shape).astype(np.float32)
    if kind == "ties":  # small integer range: many exact ties
        return rng.integers(-2, 3, shape).astype(np.float32)
    if kind == "special":  # ties among -inf, -0.0/0.0, NaN and a few integers
        pool = np.array([-np.inf, -0.0, 0.0, np.nan, 1.0, -1.0, np.inf], np.float32)
        return rng.choice(pool, shape)
    raise ValueError(kind)


SHAPES_K = [
    ((1,), 1),
    ((7,), 7),
    ((5, 1), 1),
    ((4, 64), 6),
    ((2, 3, 33), 8),
    ((6, 256), 8),
    ((3, 40), 20),
]


@pytest.mark.parametrize(
    "name, shape, k",
    [
        (name, shape, k)
        for name in VARIANTS
        for shape, k in SHAPES_K
        # The iterative formulations serve only small k.
        if name not in ("narrow", "wide") or k <= topk_module._MAX_ITERATIVE_K
    ],
    ids=str,
)
@pytest.mark.parametrize("kind", ["normal", "ties", "special"])
def test_matches_oracle(name, kind, shape, k):
    x = _sample(np.random.default_rng(zlib.crc32(repr((kind, shape, k)).encode())), shape, kind)
    _check(VARIANTS[name], x, k)


@pytest.mark.parametrize("n, extra_rows", [(32, 0), (256, 37)])
def test_row_blocked_path_matches_oracle(n, extra_rows):
    # Enough rows to take the lax.map row-blocked path; extra rows exercise the -inf padding.
    rows = 4 * (topk_module._BLOCK_ELEMENTS // n) + extra_rows
    x = np.random.default_rng(0).integers(-3, 4, (rows, n)).astype(np.float32)
    x[::7, 5] = -np.inf
    x[::5, 9] = -0.0
    x[::3, 11] = np.nan
    x[-1] = -np.inf  # a padding-like row of the input itself
    _check(jax.jit(top_k, static_argnums=1), x, 6)
    _check(jax.jit(VARIANTS["portable"], static_argnums=1), x, 6)


def test_bfloat16_input():
    x = np.random.default_rng(1).integers(-4, 5, (9, 24)).astype(np.float32)
    values, ids = top_k(jnp.asarray(x, jnp.bfloat16), 5)
    assert values.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(ids), oracle(x, 5)[1])


def test_negative_zero_ties_zero():
    x = jnp.array([[-0.0, 0.0, -1.0], [0.0, -0.0, -1.0]])
    np.testing.assert_array_equal(np.asarray(top_k(x, 2)[1]), [[0, 1], [0, 1]])


def test_nan_is_minus_inf_and_inf_entries_are_ordinary():
    x = jnp.array([[np.nan, -np.inf, -np.inf, np.nan]])
    # NaN ranks as -inf: all four tie, so index order.
    np.testing.assert_array_equal(np.asarray(top_k(x, 4)[1]), [[0, 1, 2, 3]])
    x = jnp.array([[-np.inf, 2.0, -np.inf, 1.0]])
    np.testing.assert_array_equal(np.asarray(top_k(x, 3)[1]), [[1, 3, 0]])


@pytest.mark.parametrize("name", ["top_k", "narrow", "wide"])
def test_jit_and_vmap(name):
    fn = VARIANTS[name]
    x = _sample(np.random.default_rng(2), (3, 5, 16), "ties")
    want = oracle(x, 4)[1]
    got = jax.jit(lambda a: fn(a, 4))(jnp.asarray(x))[1]
    np.testing.assert_array_equal(np.asarray(got), want)
    got = jax.vmap(lambda a: fn(a, 4))(jnp.asarray(x))[1]
    np.testing.assert_array_equal(np.asarray(got), want)
    got = jax.vmap(jax.vmap(lambda a: fn(a, 4)), in_axes=1, out_axes=1)(jnp.asarray(x))[1]
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("k", [0, -1, 17, True, 2.0])
def test_bad_k(k):
    with pytest.raises(ValueError):
        top_k(jnp.zeros((2, 16)), k)


_POOL = [-np.inf, -2.0, -1.0, -0.0, 0.0, 0.5, 1.0, 3.0, np.inf, np.nan]


@given(
    rows=st.lists(
        st.lists(st.sampled_from(_POOL), min_size=1, max_size=40), min_size=1, max_size=4
    ).filter(lambda r: len({len(v) for v in r}) == 1),
    data=st.data(),
)
def test_property_matches_oracle(rows, data):
    x = np.array(rows, np.float32)
    k = data.draw(st.integers(1, x.shape[-1]))
    # Jitted: one program per example and variant (eagerly, each op compiles per shape;
    # the eager path is checked on the fixed shapes above).
    _check(jax.jit(top_k, static_argnums=1), x, k)
    if k <= topk_module._MAX_ITERATIVE_K:
        _check(jax.jit(VARIANTS["narrow"], static_argnums=1), x, k)
        _check(jax.jit(VARIANTS["wide"], static_argnums=1), x, k)


@pytest.mark.parametrize("kind", ["ties", "special"])
@pytest.mark.parametrize("n, k", [(17, 16), (129, 8), (200, 16), (384, 8)])
def test_wide_chunked_path_matches_oracle(kind, n, k):
    """Rows longer than a chunk, a last chunk cut short, picks that empty whole chunks."""
    rng = np.random.default_rng(zlib.crc32(repr(("wide", kind, n, k)).encode()))
    x = _sample(rng, (5, n), kind)
    x[0, : topk_module._CHUNK] = 7.0  # the whole first chunk ties at the top
    x[1] = -np.inf  # every entry ties at -inf: index order
    _check(VARIANTS["wide"], x, k)
    _check(top_k, x, k)


def test_wide_row_blocked_path_matches_oracle():
    # Enough rows of a wide (n > _MAX_NARROW_N) row for the lax.map path, with -inf padding.
    n = 2 * topk_module._MAX_NARROW_N + 3
    rows = 4 * topk_module._WIDE_BLOCK_ROWS + 5
    x = np.random.default_rng(3).integers(-3, 4, (rows, n)).astype(np.float32)
    x[::4, 2] = np.nan
    x[::6, 100:140] = -np.inf
    _check(jax.jit(top_k, static_argnums=1), x, 8)
    _check(jax.jit(VARIANTS["portable"], static_argnums=1), x, 8)


# ---------------------------------------------------------------------------------------
# The native CPU kernel (csrc/top_k_cpu.cc): its paths, its dispatch, its sharding.


def test_native_kernel_is_built_and_used_on_cpu():
    # `pip install -e .` builds it (setup.py). Were the build to fail silently, the library
    # would still be right but slow: this test says so instead.
    assert _native.available(), "sigmoid_moe._native_cpu is not built: reinstall the package"
    x = jnp.zeros((4, 16))
    assert "sigmoid_moe_top_k" in jax.jit(lambda x: top_k(x, 3)).lower(x).as_text()


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerator_programs_take_the_portable_path(platform):
    x = jnp.asarray(np.random.default_rng(4).standard_normal((8, 64)), jnp.float32)
    exported = jax.export.export(jax.jit(lambda x: top_k(x, 6)), platforms=(platform,))(x)
    assert "sigmoid_moe_top_k" not in exported.mlir_module()
    assert "stablehlo.custom_call" not in exported.mlir_module()
    # On a mesh without devices (how accelerator programs are exported from a CPU host):
    # the kernel's partitioning rule needs devices to lower, so the portable path serves.
    mesh = jax.sharding.AbstractMesh((8,), ("data",), (jax.sharding.AxisType.Auto,))
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P("data")))
    exported = jax.export.export(jax.jit(lambda x: top_k(x, 6)), platforms=(platform,))(spec)
    assert "sigmoid_moe_top_k" not in exported.mlir_module()


def test_environment_switch_and_unsupported_inputs_take_the_portable_path(monkeypatch):
    x = jnp.zeros((4, 80))
    assert "sigmoid_moe_top_k" not in jax.jit(lambda x: top_k(x, 65)).lower(x).as_text()
    fn = jax.jit(lambda x: top_k(x, 3))
    # A CPU program with the kernel cannot be exported (its custom call has no
    # compatibility guarantee); with the switch off it can (README, Set-up).
    with pytest.raises(ValueError, match="custom calls"):
        jax.export.export(fn)(x)
    monkeypatch.setenv("SIGMOID_MOE_NATIVE", "0")
    assert not _native.available()
    assert "sigmoid_moe_top_k" not in jax.jit(lambda x: top_k(x, 3)).lower(x).as_text()
    assert (
        "sigmoid_moe_top_k"
        not in jax.export.export(jax.jit(lambda x: top_k(x, 3)))(x).mlir_module()
    )


def _router_like(rng, rows, n):
    """Sigmoid scores plus a small bias, a few rows with one hot expert or saturation."""
    logits = rng.standard_normal((rows, n)).astype(np.float32) * 2
    logits[::13] *= 8  # saturated: many scores round to exactly 1.0
    scores = 1 / (1 + np.exp(-logits)) + 0.01 * rng.standard_normal(n).astype(np.float32)
    return scores.astype(np.float32)


@pytest.mark.parametrize(
    "rows, n, k",
    [(2048, 128, 8), (700, 384, 8), (300, 896, 16), (1030, 64, 6), (4096, 8, 4), (513, 16, 2)],
)
def test_native_matches_oracle_and_portable_at_router_shapes(rows, n, k):
    """Many rows (the threaded split, a short last task), router-like and tied inputs: the
    fast path, rows with more candidates than slots, and the general path all occur."""
    rng = np.random.default_rng(zlib.crc32(repr(("router", rows, n, k)).encode()))
    for x in (_router_like(rng, rows, n), _sample(rng, (rows, n), "ties")):
        x[5, : n // 2] = -np.inf  # fewer finite entries than chunks: the general path
        x[7] = np.nan
        x[9, -k:] = 100.0  # the k best at the end of the row
        _check(jax.jit(topk_module._top_k_native, static_argnums=1), x, k)
        want = jax.jit(topk_module._top_k_portable, static_argnums=1)(jnp.asarray(x), k)[1]
        got = jax.jit(top_k, static_argnums=1)(jnp.asarray(x), k)[1]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_native_values_carry_the_gradient():
    x = jnp.asarray(np.random.default_rng(5).standard_normal((6, 40)), jnp.float32)
    weights = jnp.arange(1.0, 6.0)

    def loss(fn):
        return lambda x: jnp.sum(fn(x, 5)[0] * weights)

    got = jax.grad(loss(topk_module._top_k_native))(x)
    want = jax.grad(loss(topk_module._top_k_portable))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.count_nonzero(np.asarray(got)) == 6 * 5


def _auto_mesh(shape, names):
    return jax.make_mesh(shape, names, (jax.sharding.AxisType.Auto,) * len(shape))


def test_native_keeps_row_sharding_without_gathering():
    mesh = _auto_mesh((8,), ("data",))  # the axes sigmoid_moe.make_mesh makes
    x = jax.device_put(
        jnp.asarray(_router_like(np.random.default_rng(6), 64, 128)),
        NamedSharding(mesh, P("data", None)),
    )
    fn = jax.jit(lambda x: top_k(x, 8))
    hlo = fn.lower(x).compile().as_text()
    assert "sigmoid_moe_top_k" in hlo
    assert "all-gather" not in hlo  # each device ranks its own 8 rows
    values, ids = fn(x)
    assert ids.sharding.spec[0] == "data"
    _check(lambda x, k: fn(x), x, 8)


def test_sharded_last_dimension_is_gathered_and_explicit_axes_take_the_portable_path():
    x = _sample(np.random.default_rng(7), (16, 64), "ties")
    fn = jax.jit(lambda x, k: top_k(x, k), static_argnums=1)
    # Auto axes: the expert axis is gathered for the kernel, the rows stay sharded.
    mesh = _auto_mesh((2, 4), ("data", "model"))
    xs = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("data", "model")))
    assert "sigmoid_moe_top_k" in fn.lower(xs, 6).compile().as_text()
    _check(fn, xs, 6)
    # Explicit axes: the sharding is in the type, and the portable path follows it.
    mesh = jax.make_mesh((2, 4), ("data", "model"), (jax.sharding.AxisType.Explicit,) * 2)
    for spec in (P("data", None), P("data", "model")):
        xs = jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec))
        assert "sigmoid_moe_top_k" not in fn.lower(xs, 6).compile().as_text()
        _check(fn, xs, 6)
