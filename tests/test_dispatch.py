"""Dispatch paths against a per-token NumPy loop, and against each other."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sigmoid_moe.dispatch import blocked_grouped_matmul, capacity, capacity_moe, dropless_moe


def _silu(v):
    return v / (1.0 + np.exp(-v))


def oracle_moe(x, ids, weights, w_in, w_out, mask=None, slots=None):
    """For each token, for each chosen expert: y_t += w * FFN_e(x_t), in float64.

    With ``slots`` (capacity), assignments are admitted rank-major then token order and
    an expert that already holds ``slots`` copies drops the rest.
    """
    x, w_in, w_out = (np.asarray(a, np.float64) for a in (x, w_in, w_out))
    ids, weights = np.asarray(ids), np.asarray(weights, np.float64)
    num_tokens, k = ids.shape
    mask = np.ones(num_tokens, bool) if mask is None else np.asarray(mask, bool)
    d_ff = w_out.shape[1]
    kept = np.zeros((num_tokens, k), bool)
    used = np.zeros(w_in.shape[0], int)
    for j in range(k):
        for t in range(num_tokens):
            if mask[t] and (slots is None or used[ids[t, j]] < slots):
                kept[t, j] = True
                used[ids[t, j]] += 1
    y = np.zeros_like(x)
    for t in range(num_tokens):
        for j in range(k):
            if kept[t, j]:
                e = ids[t, j]
                h = x[t] @ w_in[e]
                y[t] += weights[t, j] * ((_silu(h[:d_ff]) * h[d_ff:]) @ w_out[e])
    dropped = int(mask.sum()) * k - int(kept.sum())
    return y, dropped


def _problem(seed, num_tokens, d_model, d_ff, num_experts, k, *, idle=0, masked=0.0):
    rng = np.random.default_rng(seed)
    live = num_experts - idle  # experts >= live never receive a token
    ids = np.stack([rng.choice(live, k, replace=False) for _ in range(num_tokens)])
    x = rng.normal(size=(num_tokens, d_model))
    weights = rng.random((num_tokens, k))
    w_in = rng.normal(size=(num_experts, d_model, 2 * d_ff)) / math.sqrt(d_model)
    w_out = rng.normal(size=(num_experts, d_ff, d_model)) / math.sqrt(d_ff)
    mask = rng.random(num_tokens) >= masked
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return (
        f32(x),
        jnp.asarray(ids, jnp.int32),
        f32(weights),
        f32(w_in),
        f32(w_out),
        jnp.asarray(mask),
    )


def _paths(num_experts, k):
    return {
        "capacity": functools.partial(capacity_moe, capacity_factor=num_experts / k),
        "blocked_b1": functools.partial(dropless_moe, kernel="blocked", block_size=1),
        "blocked_b3": functools.partial(dropless_moe, kernel="blocked", block_size=3),
        "blocked_b64": functools.partial(dropless_moe, kernel="blocked", block_size=64),
        "ragged_dot": functools.partial(dropless_moe, kernel="ragged_dot"),
    }


SHAPES = [
    # (tokens, d_model, d_ff, E, k, idle experts, masked fraction)
    (1, 4, 3, 1, 1, 0, 0.0),
    (9, 6, 5, 4, 2, 0, 0.0),
    (16, 8, 6, 8, 3, 3, 0.3),
    (33, 4, 2, 6, 6, 0, 0.5),
    (20, 3, 7, 16, 2, 12, 0.0),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "path", ["capacity", "blocked_b1", "blocked_b3", "blocked_b64", "ragged_dot"]
)
def test_matches_per_token_oracle(shape, path):
    *dims, idle, masked = shape
    x, ids, weights, w_in, w_out, mask = _problem(sum(dims), *dims, idle=idle, masked=masked)
    want, want_dropped = oracle_moe(x, ids, weights, w_in, w_out, mask)
    got = jax.jit(_paths(dims[3], dims[4])[path])(x, ids, weights, w_in, w_out, mask)
    np.testing.assert_allclose(np.asarray(got.y_td), want, rtol=1e-5, atol=1e-5)
    assert int(got.dropped) == want_dropped == 0
    # Masked (padding) tokens get exactly zero.
    assert np.all(np.asarray(got.y_td)[~np.asarray(mask)] == 0)


def test_all_tokens_on_one_expert_others_idle():
    x, ids, weights, w_in, w_out, _ = _problem(0, 10, 4, 3, 5, 1)
    ids = jnp.full_like(ids, 2)
    want, _ = oracle_moe(x, ids, weights, w_in, w_out)
    for path in _paths(5, 1).values():
        got = jax.jit(path)(x, ids, weights, w_in, w_out)
        np.testing.assert_allclose(np.asarray(got.y_td), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factor", [0.25, 0.5, 1.0, 1.25])
def test_capacity_drops_match_oracle(factor):
    x, ids, weights, w_in, w_out, mask = _problem(3, 24, 4, 3, 4, 2, masked=0.2)
    # Skew the routing so experts 0 and 1 overflow.
    ids = ids.at[:12, 0].set(0).at[:12, 1].set(1)
    slots = capacity(24, 2, 4, factor)
    want, want_dropped = oracle_moe(x, ids, weights, w_in, w_out, mask, slots=slots)
    got = jax.jit(functools.partial(capacity_moe, capacity_factor=factor))(
        x, ids, weights, w_in, w_out, mask
    )
    np.testing.assert_allclose(np.asarray(got.y_td), want, rtol=1e-5, atol=1e-5)
    assert int(got.dropped) == want_dropped
    if factor < 1.25:
        assert want_dropped > 0  # the case is not vacuous


def test_capacity_hand_worked():
    # T=4, k=1, E=2, factor 1: C = ceil(1 * 4 * 1 / 2) = 2.
    # ids = [0, 0, 0, 1]: expert 0 admits tokens 0 and 1 (token order) and drops token 2.
    x = jnp.ones((4, 2), jnp.float32)
    ids = jnp.array([[0], [0], [0], [1]], jnp.int32)
    weights = jnp.ones((4, 1), jnp.float32)
    w_in = jnp.ones((2, 2, 2), jnp.float32)  # d_ff = 1: gate = up = x0 + x1 = 2
    w_out = jnp.ones((2, 1, 2), jnp.float32)
    got = capacity_moe(x, ids, weights, w_in, w_out, capacity_factor=1.0)
    assert capacity(4, 1, 2, 1.0) == 2
    assert int(got.dropped) == 1
    ffn = 2.0 / (1.0 + math.exp(-2.0)) * 2.0  # silu(2) * 2 = 3.5232...
    np.testing.assert_allclose(np.asarray(got.y_td[:, 0]), [ffn, ffn, 0.0, ffn], rtol=1e-6)


def test_capacity_priority_is_choice_rank_first():
    # T=2, k=2, E=2, factor 0.5: C = ceil(0.5 * 2 * 2 / 2) = 1.
    # Token 0 chooses (0, 1); token 1 chooses (1, 0). The first choices take both slots,
    # so both second choices drop, although token 0's second choice comes first in token order.
    x = jnp.ones((2, 2), jnp.float32)
    ids = jnp.array([[0, 1], [1, 0]], jnp.int32)
    weights = jnp.array([[0.7, 0.3], [0.6, 0.4]], jnp.float32)
    w_in = jnp.ones((2, 2, 2), jnp.float32)
    w_out = jnp.ones((2, 1, 2), jnp.float32)
    got = capacity_moe(x, ids, weights, w_in, w_out, capacity_factor=0.5)
    ffn = 2.0 / (1.0 + math.exp(-2.0)) * 2.0
    assert int(got.dropped) == 2
    np.testing.assert_allclose(np.asarray(got.y_td[:, 0]), [0.7 * ffn, 0.6 * ffn], rtol=1e-6)


def test_large_factor_drops_nothing():
    x, ids, weights, w_in, w_out, _ = _problem(5, 40, 4, 3, 8, 3)
    # Every token's first choice becomes expert 0 (swapped, so no token picks it twice).
    ids = jnp.where(ids == 0, ids[:, :1], ids).at[:, 0].set(0)
    assert int(jnp.sum(ids == 0)) == 40
    run = jax.jit(functools.partial(capacity_moe, capacity_factor=8 / 3))
    assert int(run(x, ids, weights, w_in, w_out).dropped) == 0


def test_gradients_agree_across_paths():
    x, ids, weights, w_in, w_out, mask = _problem(7, 12, 5, 4, 6, 2, idle=2, masked=0.25)
    grads = {}
    for name, path in _paths(6, 2).items():

        def loss(x, weights, w_in, w_out, path=path):
            return jnp.sum(jnp.sin(path(x, ids, weights, w_in, w_out, mask).y_td))

        grads[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, weights, w_in, w_out)
    for name, got in grads.items():
        for a, b in zip(got, grads["capacity"], strict=True):
            np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=name
            )
    # Idle experts get exactly zero weight gradient.
    assert np.all(np.asarray(grads["blocked_b3"][2])[4:] == 0)


def test_blocked_grouped_matmul_hand_worked():
    # Two blocks of 2 rows: block 0 uses expert 1 (scale 3), block 1 unused (-1) -> zeros.
    lhs = jnp.arange(8, dtype=jnp.float32).reshape(4, 2)
    rhs = jnp.stack([jnp.eye(2), 3 * jnp.eye(2)])
    out = blocked_grouped_matmul(lhs, rhs, jnp.array([1, -1]), block_size=2)
    np.testing.assert_array_equal(np.asarray(out), [[0, 3], [6, 9], [0, 0], [0, 0]])


def test_bf16_close_to_float32():
    x, ids, weights, w_in, w_out, _ = _problem(9, 16, 8, 6, 4, 2)
    want = jax.jit(dropless_moe)(x, ids, weights, w_in, w_out).y_td
    for path in (dropless_moe, capacity_moe):
        got = jax.jit(path)(
            x.astype(jnp.bfloat16),
            ids,
            weights,
            w_in.astype(jnp.bfloat16),
            w_out.astype(jnp.bfloat16),
        )
        assert got.y_td.dtype == jnp.bfloat16
        np.testing.assert_allclose(
            np.asarray(got.y_td, np.float32), np.asarray(want), atol=0.1, rtol=0.05
        )


def test_bad_inputs():
    x, ids, weights, w_in, w_out, _ = _problem(1, 4, 4, 3, 2, 1)
    with pytest.raises(ValueError, match="capacity_factor"):
        capacity_moe(x, ids, weights, w_in, w_out, capacity_factor=0.0)
    with pytest.raises(ValueError, match="capacity_factor"):
        capacity_moe(x, ids, weights, w_in, w_out, capacity_factor=-1.0)
    with pytest.raises(TypeError, match="x_td must be floating"):
        dropless_moe(x.astype(jnp.int32), ids, weights, w_in, w_out)
    with pytest.raises(ValueError, match="d_model=4"):
        dropless_moe(x, ids, weights, w_in[:, :3], w_out)
    with pytest.raises(ValueError, match="w_out_efd"):
        capacity_moe(x, ids, weights, w_in, w_out[:, :2])
    with pytest.raises(ValueError, match="kernel"):
        dropless_moe(x, ids, weights, w_in, w_out, kernel="magic")
    with pytest.raises(ValueError, match="token_mask_t"):
        dropless_moe(x, ids, weights, w_in, w_out, jnp.ones(3, bool))
