"""Dispatch paths against a per-token NumPy loop, and against each other."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sigmoid_moe.blocked_ffn import block_layout, blocked_expert_ffn
from sigmoid_moe.dispatch import capacity, capacity_moe, dropless_moe


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
    no_drops = num_experts / k
    return {
        "capacity": functools.partial(capacity_moe, capacity_factor=no_drops, kernel="batched"),
        "capacity_b3": functools.partial(
            capacity_moe, capacity_factor=no_drops, kernel="blocked", block_size=3
        ),
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
    "path", ["capacity", "capacity_b3", "blocked_b1", "blocked_b3", "blocked_b64", "ragged_dot"]
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
@pytest.mark.parametrize("kernel", ["batched", "blocked"])
def test_capacity_drops_match_oracle(factor, kernel):
    x, ids, weights, w_in, w_out, mask = _problem(3, 24, 4, 3, 4, 2, masked=0.2)
    # Skew the routing so experts 0 and 1 overflow.
    ids = ids.at[:12, 0].set(0).at[:12, 1].set(1)
    slots = capacity(24, 2, 4, factor)
    want, want_dropped = oracle_moe(x, ids, weights, w_in, w_out, mask, slots=slots)
    run = functools.partial(capacity_moe, capacity_factor=factor, kernel=kernel, block_size=2)
    got = jax.jit(run)(x, ids, weights, w_in, w_out, mask)
    np.testing.assert_allclose(np.asarray(got.y_td), want, rtol=1e-5, atol=1e-5)
    assert int(got.dropped) == want_dropped
    if factor < 1.25:
        assert want_dropped > 0  # the case is not vacuous


@pytest.mark.parametrize("kernel", ["batched", "blocked"])
def test_capacity_hand_worked(kernel):
    # T=4, k=1, E=2, factor 1: C = ceil(1 * 4 * 1 / 2) = 2.
    # ids = [0, 0, 0, 1]: expert 0 admits tokens 0 and 1 (token order) and drops token 2.
    x = jnp.ones((4, 2), jnp.float32)
    ids = jnp.array([[0], [0], [0], [1]], jnp.int32)
    weights = jnp.ones((4, 1), jnp.float32)
    w_in = jnp.ones((2, 2, 2), jnp.float32)  # d_ff = 1: gate = up = x0 + x1 = 2
    w_out = jnp.ones((2, 1, 2), jnp.float32)
    got = capacity_moe(x, ids, weights, w_in, w_out, capacity_factor=1.0, kernel=kernel)
    assert capacity(4, 1, 2, 1.0) == 2
    assert int(got.dropped) == 1
    ffn = 2.0 / (1.0 + math.exp(-2.0)) * 2.0  # silu(2) * 2 = 3.5232...
    np.testing.assert_allclose(np.asarray(got.y_td[:, 0]), [ffn, ffn, 0.0, ffn], rtol=1e-6)


@pytest.mark.parametrize("kernel", ["batched", "blocked"])
def test_capacity_priority_is_choice_rank_first(kernel):
    # T=2, k=2, E=2, factor 0.5: C = ceil(0.5 * 2 * 2 / 2) = 1.
    # Token 0 chooses (0, 1); token 1 chooses (1, 0). The first choices take both slots,
    # so both second choices drop, although token 0's second choice comes first in token order.
    x = jnp.ones((2, 2), jnp.float32)
    ids = jnp.array([[0, 1], [1, 0]], jnp.int32)
    weights = jnp.array([[0.7, 0.3], [0.6, 0.4]], jnp.float32)
    w_in = jnp.ones((2, 2, 2), jnp.float32)
    w_out = jnp.ones((2, 1, 2), jnp.float32)
    got = capacity_moe(x, ids, weights, w_in, w_out, capacity_factor=0.5, kernel=kernel)
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


def _grads(path, x, ids, weights, w_in, w_out, mask=None):
    def loss(x, weights, w_in, w_out):
        return jnp.sum(jnp.sin(path(x, ids, weights, w_in, w_out, mask).y_td.astype(jnp.float32)))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, weights, w_in, w_out)


def test_gradients_agree_across_paths():
    x, ids, weights, w_in, w_out, mask = _problem(7, 12, 5, 4, 6, 2, idle=2, masked=0.25)
    grads = {
        name: _grads(path, x, ids, weights, w_in, w_out, mask)
        for name, path in _paths(6, 2).items()
    }
    for name, got in grads.items():
        for a, b in zip(got, grads["capacity"], strict=True):
            np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=name
            )
    # Idle experts get exactly zero weight gradient.
    assert np.all(np.asarray(grads["blocked_b3"][2])[4:] == 0)


@pytest.mark.parametrize(
    "path, shared_weights",
    [("capacity", True), ("capacity_b3", True), ("blocked_b3", True), ("ragged_dot", False)],
)
def test_vmap_and_grad_over_token_groups_equal_a_loop(path, shared_weights):
    """vmap over token groups = one call per group, values and gradients.

    JAX's ragged_dot batching rule needs every operand batched, so that kernel is vmapped
    with per-group expert weights (see dropless_moe's docstring).
    """
    problems = [_problem(20 + g, 9, 4, 3, 5, 2, masked=0.2) for g in range(3)]
    x, ids, weights, w_in, w_out, mask = (jnp.stack(parts) for parts in zip(*problems, strict=True))
    if shared_weights:
        w_in, w_out = w_in[0], w_out[0]
    w_axis = None if shared_weights else 0
    run = _paths(5, 2)[path]

    def loss(x, weights, w_in, w_out, ids, mask):
        return jnp.sum(jnp.sin(run(x, ids, weights, w_in, w_out, mask).y_td))

    grad = jax.grad(loss, argnums=(0, 1, 2, 3))
    batched = jax.vmap(grad, in_axes=(0, 0, w_axis, w_axis, 0, 0))
    got = jax.jit(batched)(x, weights, w_in, w_out, ids, mask)
    for g in range(3):
        w_g = (w_in, w_out) if shared_weights else (w_in[g], w_out[g])
        want = jax.jit(grad)(x[g], weights[g], *w_g, ids[g], mask[g])
        # Weight gradients come back per group (vmap does not sum them).
        for name, a, b in zip(("x", "weights", "w_in", "w_out"), got, want, strict=True):
            np.testing.assert_allclose(
                np.asarray(a[g]), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=name
            )


def test_blocked_expert_ffn_hand_worked():
    # Blocks of 2 rows. Expert 1 (w_out scale 3) holds token 1 (weight 0.5) and token 0
    # (weight 2); block 1 is unused (-1). d_ff = 1, so FFN_e(x) = silu(x0) * x1 * scale_e.
    x = jnp.array([[1.0, 2.0], [-1.0, 4.0], [5.0, 5.0]], jnp.float32)
    w_in = jnp.broadcast_to(jnp.eye(2, dtype=jnp.float32), (2, 2, 2))  # gate = x0, up = x1
    w_out = jnp.stack([jnp.ones((1, 2)), 3 * jnp.ones((1, 2))]).astype(jnp.float32)
    layout = block_layout(
        jnp.array([1, 1], jnp.int32),  # expert per assignment
        jnp.array([1, 0], jnp.int32),  # rank: token 1's copy comes first
        jnp.array([True, True]),
        jnp.array([0, 1], jnp.int32),  # token per assignment
        jnp.array([2.0, 0.5], jnp.float32),
        jnp.array([0, 2], jnp.int32),  # rows per expert
        num_tokens=3,
        block_size=2,
    )
    np.testing.assert_array_equal(np.asarray(layout.block_expert_b), [1, -1])
    np.testing.assert_array_equal(np.asarray(layout.src_bm), [[1, 0], [3, 3]])
    np.testing.assert_array_equal(np.asarray(layout.row_a), [1, 0])
    silu = lambda v: v / (1.0 + math.exp(-v))  # noqa: E731
    y = blocked_expert_ffn(x, layout, w_in, w_out)
    want = [2.0 * silu(1.0) * 2.0 * 3, 0.5 * silu(-1.0) * 4.0 * 3, 0.0]  # token 2: no row
    np.testing.assert_allclose(np.asarray(y[:, 0]), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(y[:, 1]), want, rtol=1e-6)


def _gather_einsum_scatter(token_a, expert_a, x, weight_a, w_in, w_out):
    """The expert FFN as whole-array gather, per-row einsums and a weighted scatter-add."""
    h = jnp.einsum("ad,adf->af", x[token_a], w_in[expert_a])
    gate, up = jnp.split(h, 2, axis=-1)
    o = jnp.einsum("af,afd->ad", jax.nn.silu(gate) * up, w_out[expert_a])
    return jnp.zeros_like(x).at[token_a].add(weight_a[:, None] * o)


def _assert_vjps_match(got_fn, want_fn, args, cotangent, *, y_atol):
    """Values (to ``y_atol``) and the VJPs of x, weights, w_in, w_out agree: to 1e-5, and
    to 2 float32 ulps of a gradient's largest entry (a weight gradient sums up to 800 rows
    here, entries up to ~500: the block scan's summation order moves a near-zero entry of
    it by 2.6e-5)."""
    got_y, got_vjp = jax.vjp(got_fn, *args)
    want_y, want_vjp = jax.vjp(want_fn, *args)
    np.testing.assert_allclose(np.asarray(got_y), np.asarray(want_y), rtol=1e-5, atol=y_atol)
    for name, a, b in zip(
        "x weights w_in w_out".split(), got_vjp(cotangent), want_vjp(cotangent), strict=True
    ):
        atol = max(1e-5, 2 * float(np.finfo(np.float32).eps) * float(np.max(np.abs(b))))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=atol, err_msg=name)


@pytest.mark.parametrize("block_size", [1, 2, 5, 32])
def test_blocked_expert_ffn_gradients_match_autodiff(block_size):
    """The hand-written backward equals autodiff of the plain gather-einsum-scatter form."""
    x, ids, weights, w_in, w_out, _ = _problem(11, 10, 4, 3, 5, 2, idle=1)
    expert_a = ids.reshape(-1)
    token_a = jnp.repeat(jnp.arange(10, dtype=jnp.int32), 2)
    order = jnp.argsort(expert_a, stable=True)
    count_e = jnp.bincount(expert_a, length=5)
    start_e = jnp.cumsum(count_e) - count_e
    rank_a = jnp.zeros_like(expert_a).at[order].set(jnp.arange(20) - start_e[expert_a[order]])

    def blocked(x, weight_a, w_in, w_out):
        layout = block_layout(
            expert_a,
            rank_a,
            jnp.ones(20, bool),
            token_a,
            weight_a,
            count_e,
            num_tokens=10,
            block_size=block_size,
        )
        return blocked_expert_ffn(x, layout, w_in, w_out)

    plain = functools.partial(_gather_einsum_scatter, token_a, expert_a)

    args = (x, weights.reshape(-1), w_in, w_out)
    cotangent = jnp.asarray(np.random.default_rng(0).normal(size=x.shape), jnp.float32)
    _assert_vjps_match(jax.jit(blocked), plain, args, cotangent, y_atol=1e-6)


@given(
    num_tokens=st.integers(1, 12),
    num_experts=st.integers(1, 6),
    block_size=st.integers(1, 5),
    capacity=st.one_of(st.none(), st.integers(1, 6)),
    seed=st.integers(0, 2**16),
)
def test_block_layout_invariants(num_tokens, num_experts, block_size, capacity, seed):
    """Every placed copy owns one row of a block of its expert; experts start on blocks."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, num_experts + 1))
    ids = np.stack([rng.choice(num_experts, k, replace=False) for _ in range(num_tokens)])
    expert_a = ids.reshape(-1)
    placed_a = rng.random(expert_a.size) < 0.8
    token_a = np.repeat(np.arange(num_tokens), k)
    weight_a = rng.random(expert_a.size).astype(np.float32)
    rank_a = np.zeros_like(expert_a)
    rows_e = np.zeros(num_experts, int)
    for a in np.flatnonzero(placed_a):
        if capacity is not None and rows_e[expert_a[a]] == capacity:
            placed_a[a] = False  # the expert is full: dropped
            continue
        rank_a[a] = rows_e[expert_a[a]]
        rows_e[expert_a[a]] += 1
    # One compiled program per example (eagerly, each of its ops compiles for new shapes).
    layout = jax.jit(
        functools.partial(
            block_layout,
            num_tokens=num_tokens,
            block_size=block_size,
            max_rows_per_expert=capacity,
        )
    )(*(jnp.asarray(v) for v in (expert_a, rank_a, placed_a, token_a, weight_a, rows_e)))
    num_blocks, block_size = layout.src_bm.shape
    if capacity is not None:  # a block never outgrows an expert's capacity
        assert block_size <= capacity and num_blocks <= num_experts * -(-capacity // block_size)
    src_p = np.asarray(layout.src_bm).reshape(-1)
    weight_p = np.asarray(layout.weight_bm).reshape(-1)
    block_expert = np.asarray(layout.block_expert_b)
    row_a = np.asarray(layout.row_a)
    num_rows = num_blocks * block_size
    assert np.all(row_a[~placed_a] == num_rows)
    rows = row_a[placed_a]
    assert len(set(rows.tolist())) == rows.size and np.all(rows < num_rows)
    np.testing.assert_array_equal(src_p[rows], token_a[placed_a])
    np.testing.assert_array_equal(weight_p[rows], weight_a[placed_a])
    np.testing.assert_array_equal(block_expert[rows // block_size], expert_a[placed_a])
    empty = np.setdiff1d(np.arange(num_rows), rows)
    assert np.all(src_p[empty] == num_tokens) and np.all(weight_p[empty] == 0)
    # Experts own consecutive blocks in expert order; unused blocks (-1) come last.
    blocks_e = -(-rows_e // block_size)
    want = np.concatenate([np.repeat(np.arange(num_experts), blocks_e), [-1] * num_blocks])
    np.testing.assert_array_equal(block_expert, want[:num_blocks])


@pytest.mark.parametrize("factor", [0.25, 0.5, 1.0])
def test_capacity_kernels_agree_on_gradients_with_drops_and_padding(factor):
    x, ids, weights, w_in, w_out, mask = _problem(13, 24, 4, 3, 4, 2, masked=0.2)
    ids = ids.at[:12, 0].set(0).at[:12, 1].set(1)  # experts 0 and 1 overflow
    grads = {
        kernel: _grads(
            functools.partial(capacity_moe, capacity_factor=factor, kernel=kernel, block_size=2),
            x,
            ids,
            weights,
            w_in,
            w_out,
            mask,
        )
        for kernel in ("batched", "blocked")
    }
    for name, a, b in zip(("x", "weights", "w_in", "w_out"), *grads.values(), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=name)
    dropped = capacity_moe(x, ids, weights, w_in, w_out, mask, capacity_factor=factor).dropped
    assert int(dropped) > 0 or factor == 1.0  # the small factors are not vacuous


def test_duplicate_expert_ids_in_one_token():
    """A token that lists an expert twice gets it twice (the rows share a block)."""
    x, ids, weights, w_in, w_out, _ = _problem(17, 8, 4, 3, 3, 2)
    ids = ids.at[:, 1].set(ids[:, 0])
    want, _ = oracle_moe(x, ids, weights, w_in, w_out)
    grads = {}
    for name, path in _paths(3, 1).items():  # factor E / 1: every copy has a slot
        got = jax.jit(path)(x, ids, weights, w_in, w_out)
        np.testing.assert_allclose(np.asarray(got.y_td), want, rtol=1e-5, atol=1e-5, err_msg=name)
        grads[name] = _grads(path, x, ids, weights, w_in, w_out)
    for name, got in grads.items():
        for a, b in zip(got, grads["capacity"], strict=True):
            np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=name
            )


def test_all_tokens_masked_gives_exact_zeros():
    x, ids, weights, w_in, w_out, _ = _problem(19, 6, 4, 3, 4, 2)
    mask = jnp.zeros(6, bool)
    for name, path in _paths(4, 2).items():
        assert np.all(np.asarray(jax.jit(path)(x, ids, weights, w_in, w_out, mask).y_td) == 0)
        for grad in _grads(path, x, ids, weights, w_in, w_out, mask):
            assert np.all(np.asarray(grad) == 0), name


def test_bf16_gradients_keep_dtypes_and_track_float32():
    x, ids, weights, w_in, w_out, _ = _problem(23, 16, 8, 6, 4, 2)
    want = _grads(dropless_moe, x, ids, weights, w_in, w_out)
    bf16 = [a.astype(jnp.bfloat16) for a in (x, w_in, w_out)]
    for name, path in _paths(4, 2).items():
        got = _grads(path, bf16[0], ids, weights, bf16[1], bf16[2])
        dtypes = [g.dtype for g in got]
        assert dtypes == [jnp.bfloat16, jnp.float32, jnp.bfloat16, jnp.bfloat16], name
        for a, b in zip(got, want, strict=True):
            # bf16 inputs alone move every path's x gradient by ~4% of its largest entry.
            scale = float(jnp.max(jnp.abs(b)))
            np.testing.assert_allclose(
                np.asarray(a, np.float32), np.asarray(b), atol=0.08 * scale, err_msg=name
            )


def test_second_order_blocked_equals_batched():
    """Hessian-vector products through the hand-written backward."""
    x, ids, weights, w_in, w_out, mask = _problem(29, 10, 4, 3, 4, 2, masked=0.2)
    tangent = jnp.asarray(np.random.default_rng(3).normal(size=x.shape), jnp.float32)

    def hvp(kernel):
        def loss(x):
            run = functools.partial(capacity_moe, capacity_factor=2.0, kernel=kernel)
            return jnp.sum(jnp.sin(run(x, ids, weights, w_in, w_out, mask).y_td))

        # Reverse over reverse: the blocked kernel has no forward mode.
        return jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), tangent))(x)

    np.testing.assert_allclose(
        np.asarray(hvp("blocked")), np.asarray(hvp("batched")), rtol=1e-4, atol=1e-6
    )


def test_forward_mode_needs_a_non_blocked_kernel():
    x, ids, weights, w_in, w_out, _ = _problem(31, 6, 4, 3, 4, 2)

    def run(kernel, x):
        return capacity_moe(x, ids, weights, w_in, w_out, capacity_factor=2.0, kernel=kernel).y_td

    jax.jvp(functools.partial(run, "batched"), (x,), (x,))  # forward mode works there
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(functools.partial(run, "blocked"), (x,), (x,))


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
    with pytest.raises(ValueError, match="kernel='magic'"):
        dropless_moe(x, ids, weights, w_in, w_out, kernel="magic")
    with pytest.raises(ValueError, match="kernel='ragged_dot' is not supported"):
        capacity_moe(x, ids, weights, w_in, w_out, kernel="ragged_dot")
    with pytest.raises(ValueError, match="block_size"):
        capacity_moe(x, ids, weights, w_in, w_out, block_size=0)
    with pytest.raises(ValueError, match="token_mask_t"):
        dropless_moe(x, ids, weights, w_in, w_out, jnp.ones(3, bool))


@pytest.mark.parametrize("num_experts", [7, 60_000])  # packed int32 keys; stable argsort
def test_rank_within_expert_matches_a_running_count(num_experts):
    """Both sort paths of the ranking (the second overflows packed int32 keys)."""
    from sigmoid_moe._dispatch_common import rank_within_expert

    num_assign = 40_000
    rng = np.random.default_rng(num_experts)
    expert_a = rng.integers(0, min(num_experts, 50), num_assign).astype(np.int32)
    valid_a = rng.random(num_assign) < 0.9
    assert ((num_experts + 1) * num_assign > 2**31 - 1) == (num_experts > 50_000)
    rank_a, count_e = jax.jit(rank_within_expert, static_argnums=2)(
        jnp.asarray(expert_a), jnp.asarray(valid_a), num_experts
    )
    want_rank = np.full(num_assign, -1)
    seen = np.zeros(num_experts, int)
    for a in np.flatnonzero(valid_a):
        want_rank[a] = seen[expert_a[a]]
        seen[expert_a[a]] += 1
    np.testing.assert_array_equal(np.asarray(rank_a), want_rank)
    np.testing.assert_array_equal(np.asarray(count_e), seen)


@pytest.mark.parametrize(
    "block_size, rows_e",
    [
        (128, [1, 129, 137, 17]),  # granule 8; every tail wastes 7 rows: the bound is tight
        (128, [126, 0, 128, 3, 255]),  # tails in the top class, a full block, an empty expert
        (400, [399, 26, 425, 800]),  # 16 classes of 25 rows (ceil(400 / 16))
        (48, [6, 53, 1]),  # a block below 128 rows: one class, the whole block
    ],
)
def test_partly_filled_blocks_run_their_size_class(block_size, rows_e):
    """Each block runs only its filled rows (in classes of ceil(B / 16) rows, whole below
    128 rows); values and gradients equal the plain gather-einsum-scatter form, whatever
    the fill."""
    from sigmoid_moe import blocked_ffn

    num_tokens, d_model, d_ff = 40, 4, 3
    num_experts = len(rows_e)
    rng = np.random.default_rng(sum(rows_e) + block_size)
    expert_a = jnp.asarray(np.repeat(np.arange(num_experts), rows_e), jnp.int32)
    rank_a = jnp.asarray(np.concatenate([np.arange(n) for n in rows_e]), jnp.int32)
    token_a = jnp.asarray(rng.integers(0, num_tokens, expert_a.size), jnp.int32)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    x = f32(rng.normal(size=(num_tokens, d_model)))
    w_in = f32(rng.normal(size=(num_experts, d_model, 2 * d_ff)))
    w_out = f32(rng.normal(size=(num_experts, d_ff, d_model)))

    def layout_of(weight_a):
        return block_layout(
            expert_a,
            rank_a,
            jnp.ones(expert_a.shape, bool),
            token_a,
            weight_a,
            jnp.asarray(rows_e, jnp.int32),
            num_tokens=num_tokens,
            block_size=block_size,
        )

    def blocked(x, weight_a, w_in, w_out):
        return blocked_expert_ffn(x, layout_of(weight_a), w_in, w_out)

    plain = functools.partial(_gather_einsum_scatter, token_a, expert_a)

    args = (x, f32(rng.random(expert_a.size)), w_in, w_out)
    cotangent = f32(rng.normal(size=x.shape))
    _assert_vjps_match(jax.jit(blocked), plain, args, cotangent, y_atol=1e-5)
    # The GEMMs run A rows plus < granule per expert; the saved pre-activations take one
    # row per assignment, within their static bound.
    sizes = blocked_ffn._size_classes(block_size)
    granule = sizes[0]
    tails = [n % block_size for n in rows_e if n % block_size]
    used = sum(rows_e) + sum(-t % granule for t in tails)
    layout = layout_of(args[1])
    plan = blocked_ffn._block_plan(layout.src_bm, layout.block_expert_b, num_tokens, num_experts)
    rows_b = np.minimum(np.asarray(plan.class_b) * granule, block_size)
    assert int(rows_b.sum()) == used
    saved = blocked_ffn._saved_rows(expert_a.size, block_size)
    assert int(np.sum(plan.used_b)) == sum(rows_e) <= saved - block_size


def test_auto_block_size():
    from sigmoid_moe.blocked_ffn import auto_block_size

    assert [auto_block_size(n) for n in (1, 10, 128, 171, 256, 768, 10**6)] == [
        16,
        16,
        192,
        272,
        384,
        512,
        512,
    ]


@pytest.mark.parametrize("dispatch", [dropless_moe, capacity_moe])
def test_degenerate_shapes_are_refused_naming_the_argument(dispatch):
    """No expert, no choice per token, or experts of width 0: a ValueError naming the
    argument (were ZeroDivisionError, IndexError, or Megablox's slice error)."""
    x, ids, weights, w_in, w_out, _ = _problem(1, 4, 4, 3, 2, 1)
    with pytest.raises(ValueError, match=r"w_in_edf must be .* E >= 1"):
        dispatch(x, ids, weights, w_in[:0], w_out[:0])
    with pytest.raises(ValueError, match=r"w_in_edf must be .* d_ff >= 1"):
        dispatch(x, ids, weights, w_in[..., :0], w_out[:, :0])
    with pytest.raises(ValueError, match="expert_ids_tk must have k >= 1"):
        dispatch(x, ids[:, :0], weights[:, :0], w_in, w_out)
