"""top_k (and each internal formulation) against a stable-argsort NumPy oracle."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

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


# Every path top_k can take, each called on canonicalised input.
VARIANTS = {
    "top_k": top_k,
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


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("kind", ["normal", "ties", "special"])
@pytest.mark.parametrize("shape,k", SHAPES_K, ids=str)
def test_matches_oracle(name, kind, shape, k):
    if name in ("narrow", "wide") and k > topk_module._MAX_ITERATIVE_K:
        pytest.skip("iterative formulations are used only for small k")
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
    _check(top_k, x, k)
    if k <= topk_module._MAX_ITERATIVE_K:
        _check(VARIANTS["narrow"], x, k)
        _check(VARIANTS["wide"], x, k)


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
