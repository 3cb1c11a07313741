"""The accelerator expert kernels, as far as a CPU host can check them.

- Parity: the Pallas Triton tile kernels and Pallas Megablox, run by the Pallas
  interpreter, against a float64 NumPy oracle (values and every gradient) and against
  ``ragged_dot``, in float32 and bfloat16; the problem has an empty expert, an expert with
  more rows than a tile, and a row count that is not a multiple of the tile.
- Lowering: ``kernel="auto"`` is resolved for the platform a program is lowered for. The
  layer's forward+backward exported on this CPU host for ``cuda`` holds the Triton calls
  and no ``ragged_dot``; for ``tpu``, the Megablox calls; neither holds a CPU kernel; the
  CPU program holds the CPU kernel.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sigmoid_moe import MoEConfig, MoELayer, RouterConfig, dropless_moe
from sigmoid_moe._grouped_matmul import tile_rows

T, K, E, D, F = 23, 2, 4, 12, 6


def _problem():
    """23 tokens x top-2 over 4 experts: expert 0 takes every first choice (23 rows, more
    than one 16-row tile), expert 1 none; token 7 is padding. 44 placed rows: not a
    multiple of the tile; d_model 12 and d_ff 6 are not multiples of 16 either."""
    rng = np.random.default_rng(0)
    ids = np.stack([np.zeros(T, int), rng.choice([2, 3], T)], axis=1)
    mask = np.ones(T, bool)
    mask[7] = False
    return (
        rng.normal(size=(T, D)),
        ids.astype(np.int32),
        rng.uniform(0.1, 1.0, (T, K)),
        rng.normal(size=(E, D, 2 * F)) * 0.4,
        rng.normal(size=(E, F, D)) * 0.4,
        mask,
        rng.normal(size=(T, D)),  # the loss's cotangent: L = sum(y * ct)
    )


def _silu(g):
    return g / (1.0 + np.exp(-g))


def _oracle(x, ids, weights, w_in, w_out, mask, ct):
    """float64 ``y`` and the gradients of ``L = sum(y * ct)``, one copy at a time:
    h = x W_in[e]; a = silu(g) u; o = a W_out[e]; y_t += w o."""
    y, dx = np.zeros_like(x), np.zeros_like(x)
    dw, dw_in, dw_out = np.zeros_like(weights), np.zeros_like(w_in), np.zeros_like(w_out)
    for t in range(T):
        for j in range(K):
            if not mask[t]:
                continue
            e, w = ids[t, j], weights[t, j]
            h = x[t] @ w_in[e]
            g, u = h[:F], h[F:]
            a = _silu(g) * u
            o = a @ w_out[e]
            y[t] += w * o
            dw[t, j] = o @ ct[t]
            do = w * ct[t]
            dw_out[e] += np.outer(a, do)
            da = w_out[e] @ do
            sig = 1.0 / (1.0 + np.exp(-g))
            dh = np.concatenate([da * u * sig * (1.0 + g * (1.0 - sig)), da * _silu(g)])
            dw_in[e] += np.outer(x[t], dh)
            dx[t] += w_in[e] @ dh
    return y, (dx, dw, dw_in, dw_out)


def _run(kernel: str, dtype):
    """``y`` and the gradients of ``sum(y * ct)`` by ``dropless_moe(kernel=...)``."""
    x, ids, weights, w_in, w_out, mask, ct = _problem()
    cast = functools.partial(jnp.asarray, dtype=dtype)

    def loss(x, weights, w_in, w_out):
        y = dropless_moe(x, ids, weights, w_in, w_out, mask, kernel=kernel).y_td
        return jnp.sum(y.astype(jnp.float32) * ct), y

    grad = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    grads, y = jax.jit(grad)(cast(x), jnp.asarray(weights, jnp.float32), cast(w_in), cast(w_out))
    return np.asarray(y, np.float64), [np.asarray(g, np.float64) for g in grads]


@functools.cache
def _ragged_dot(dtype):
    return _run("ragged_dot", dtype)


def _relative_errors(got, want):
    y, grads = got
    y_ref, grads_ref = want
    return {
        name: float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
        for name, a, b in zip(
            ("y", "d x", "d weights", "d w_in", "d w_out"),
            (y, *grads),
            (y_ref, *grads_ref),
            strict=True,
        )
    }


def test_problem_covers_the_tile_edge_cases():
    _, ids, _, _, _, mask, _ = _problem()
    rows = np.bincount(ids[mask].reshape(-1), minlength=E)
    tile = tile_rows(-(-T * K // E))
    assert tile == 16
    assert rows[1] == 0 and rows[0] > tile and rows.sum() % tile  # empty, > a tile, ragged


# Bounds on max |error| / max |reference|, per output and gradient.
# float32: the kernels sum the oracle's products in float32 in another order: within 1e-6
# (~16 float32 roundoffs; measured <= 2.7e-7, as ragged_dot's own error).
# bfloat16 (roundoff u = 2^-9): inputs, h, silu(g) * u and the outputs are each rounded to
# bf16, so against the float64 oracle the error is a few u: within 2e-2 (~10 u; measured
# 8.3e-3, ragged_dot's too). Against ragged_dot in bf16, which rounds at the same points,
# only the float32 summation order differs, which can flip one bf16 rounding: within 2^-8
# (one bf16 ulp; measured 0 here).
F32_BOUND, BF16_ORACLE_BOUND, BF16_RAGGED_BOUND = 1e-6, 2e-2, 2**-8
# A float32 Hessian-vector product against another kernel's: two passes, each summing in
# another order than the other kernel's, so within 2 * F32_BOUND (measured <= 3.9e-7).
HVP_F32_BOUND = 2 * F32_BOUND


@pytest.mark.parametrize("kernel", ["triton", "megablox"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_interpreted_kernel_matches_oracle_and_ragged_dot(kernel, dtype):
    dtype = jnp.dtype(dtype)
    got = _run(kernel, dtype)
    want = _oracle(*_problem())
    oracle_errors = _relative_errors(got, want)
    ragged_errors = _relative_errors(got, _ragged_dot(dtype))
    if dtype == jnp.float32:
        assert max(oracle_errors.values()) <= F32_BOUND, oracle_errors
        assert max(ragged_errors.values()) <= F32_BOUND, ragged_errors
    else:
        assert max(oracle_errors.values()) <= BF16_ORACLE_BOUND, oracle_errors
        assert max(ragged_errors.values()) <= BF16_RAGGED_BOUND, ragged_errors
    y, grads = got
    _, ids, _, _, _, mask, _ = _problem()
    assert np.all(y[~mask] == 0) and np.all(grads[0][~mask] == 0)  # padding: exact zeros
    assert np.all(grads[2][1] == 0) and np.all(grads[3][1] == 0)  # the idle expert


# --------------------------------------------------------------------------- lowering

_KERNEL_CALLS = ("__gpu$xla.gpu.triton", "tpu_custom_call")


def _layer_grad(kernel: str = "auto", dtype=jnp.bfloat16):
    """jit(grad) of a dropless layer with a shared expert, and its abstract inputs."""
    cfg = MoEConfig(
        d_model=32,
        d_ff=16,
        router=RouterConfig(8, 2),
        num_shared_experts=1,
        kernel=kernel,
        dtype=dtype,
        param_dtype=dtype,
    )
    graphdef, params, rest = nnx.split(MoELayer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)

    def loss(params, rest, x):
        y, aux = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y.astype(jnp.float32) ** 2) + aux.aux_loss

    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, rest))
    x = jax.ShapeDtypeStruct((2, 16, 32), dtype)
    return jax.jit(jax.grad(loss, argnums=(0, 2))), (*shapes, x)


def _exported_text(platform: str, kernel: str = "auto") -> str:
    fn, args = _layer_grad(kernel)
    checks = [jax.export.DisabledSafetyCheck.custom_call(c) for c in _KERNEL_CALLS]
    return jax.export.export(fn, platforms=(platform,), disabled_checks=checks)(*args).mlir_module()


def _targets(text: str) -> list[str]:
    return re.findall(r"stablehlo\.custom_call @([\w$.]+)", text)


@pytest.mark.parametrize(
    "platform, kernel_call", [("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")]
)
def test_auto_exports_the_accelerator_kernel(platform, kernel_call):
    """Forward (2 grouped matmuls) and backward (2 for the weights, 2 for the rows)."""
    targets = _targets(_exported_text(platform))
    assert targets.count(kernel_call) == 6, targets
    assert not [t for t in targets if t.startswith("sigmoid_moe")]  # no CPU kernel
    assert "ragged_dot" not in " ".join(targets)


def test_lowering_checks_see_ragged_dot_when_it_is_chosen():
    """The other side of the check above: kernel='ragged_dot' does reach the export."""
    text = _exported_text("cuda", "ragged_dot")
    assert "chlo.ragged_dot" in text and "__gpu$xla.gpu.triton" not in text
    assert "chlo.ragged_dot" not in _exported_text("cuda")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_program_holds_the_cpu_kernel(dtype):
    """The blocked kernel: native (when built, for the dtypes it takes) or the block scan
    (a while loop); no accelerator kernel, no ragged_dot."""
    fn, args = _layer_grad(dtype=jnp.dtype(dtype))
    text = fn.lower(*args).as_text()
    targets = _targets(text)
    assert not set(_KERNEL_CALLS) & set(targets) and "chlo.ragged_dot" not in text
    native = [t for t in targets if t.startswith("sigmoid_moe_expert_ffn")]
    assert native or "stablehlo.while" in text


def test_auto_costs_the_cpu_program_nothing():
    """Under jit the lowering keeps the CPU kernel only: the accelerator branch's residuals
    (zeros on the CPU) are gone, and the program's memory is kernel='blocked''s."""
    x, ids, weights, w_in, w_out, mask, _ = (jnp.asarray(a) for a in _problem())
    x, weights, w_in, w_out = (a.astype(jnp.float32) for a in (x, weights, w_in, w_out))

    def temp_bytes(kernel):
        def loss(x, w_in, w_out):
            return jnp.sum(
                dropless_moe(x, ids, weights, w_in, w_out, mask, kernel=kernel).y_td ** 2
            )

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(x, w_in, w_out).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes("auto") == temp_bytes("blocked")


def test_grouped_swiglu_refuses_what_it_cannot_run():
    from sigmoid_moe.expert_kernels import ExpertAssignments, grouped_swiglu

    x, ids, weights, w_in, w_out, mask, _ = (jnp.asarray(a) for a in _problem())
    copies = ExpertAssignments(
        ids.reshape(-1),
        jnp.zeros(T * K, jnp.int32),
        jnp.ones(T * K, bool),
        weights.reshape(-1),
        jnp.bincount(ids.reshape(-1), length=E).astype(jnp.int32),
    )
    with pytest.raises(ValueError, match="kernel='batched' .* needs capacity=C"):
        grouped_swiglu(x, copies, w_in, w_out, kernel="batched")
    with pytest.raises(ValueError, match="kernel='dense' is not a routed-expert kernel"):
        grouped_swiglu(x, copies, w_in, w_out, kernel="dense")
    with pytest.raises(ValueError, match="46 copies for 5 tokens"):
        grouped_swiglu(x[:5], copies, w_in, w_out)
    # Shapes, dtypes and sizes are refused naming the argument, never by the kernels (the
    # native one raised an XLA runtime error; a short rows_e ran, a zero block divided).
    with pytest.raises(ValueError, match="w_in_edf must be"):
        grouped_swiglu(x, copies, w_in[:, :5], w_out)
    with pytest.raises(ValueError, match="x_td must be"):
        grouped_swiglu(x[None], copies, w_in, w_out)
    with pytest.raises(TypeError, match="w_out_efd must have x_td's dtype"):
        grouped_swiglu(x, copies, w_in, w_out.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"assignments.rows_e must have shape \(4,\)"):
        grouped_swiglu(x, copies._replace(rows_e=copies.rows_e[:3]), w_in, w_out)
    with pytest.raises(ValueError, match=r"assignments.rank_a must have shape \(46,\)"):
        grouped_swiglu(x, copies._replace(rank_a=copies.rank_a[:3]), w_in, w_out)
    with pytest.raises(TypeError, match="assignments.placed_a must be bool"):
        grouped_swiglu(x, copies._replace(placed_a=copies.rank_a), w_in, w_out)
    with pytest.raises(TypeError, match="assignments must be an ExpertAssignments"):
        grouped_swiglu(x, tuple(copies), w_in, w_out)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        grouped_swiglu(x, copies, w_in, w_out, kernel="blocked", block_size=0)
    with pytest.raises(TypeError, match="capacity must be an int"):
        grouped_swiglu(x, copies, w_in, w_out, kernel="batched", capacity=2.5)
    with pytest.raises(ValueError, match="rows_per_expert must be >= 1"):
        grouped_swiglu(x, copies, w_in, w_out, rows_per_expert=0)


@pytest.mark.parametrize(
    "kernel, capacity",
    [("blocked", 9), ("batched", 9), ("blocked", None), ("ragged_dot", None), ("triton", None)],
)
def test_grouped_swiglu_skips_copies_without_a_row_of_their_own(kernel, capacity):
    """A placed copy ranked at or past the capacity, past its expert's rows_e, or of an
    expert outside [0, E) adds 0: it does not land among another expert's rows (it did:
    with capacity 9 expert 0's copies 9.. took expert 1's slots and blocks)."""
    from sigmoid_moe._dispatch_common import rank_within_expert
    from sigmoid_moe.expert_kernels import ExpertAssignments, grouped_swiglu

    x, ids, weights, w_in, w_out, mask, _ = (jnp.asarray(a) for a in _problem())
    x, weights, w_in, w_out = (a.astype(jnp.float32) for a in (x, weights, w_in, w_out))
    expert_a = ids.reshape(-1).at[5].set(E).at[6].set(-1)  # no such experts
    rank_a, rows_e = rank_within_expert(expert_a, jnp.repeat(mask, K), E)
    placed_a = rank_a >= 0
    rank_a = rank_a.at[8].set(rows_e[expert_a[8]])  # one past its expert's rows
    copies = ExpertAssignments(expert_a, rank_a, placed_a, weights.reshape(-1), rows_e)
    assert int(rows_e[0]) > 9  # expert 0 overflows the capacity
    rowed_a = placed_a & (rank_a < (rows_e[expert_a.clip(0, E - 1)] if capacity is None else 9))
    rowed_a = rowed_a & (expert_a >= 0) & (expert_a < E)
    rowed_a = rowed_a.at[8].set(False)
    want = grouped_swiglu(x, copies._replace(placed_a=rowed_a), w_in, w_out, kernel="ragged_dot")
    got = grouped_swiglu(x, copies, w_in, w_out, kernel=kernel, capacity=capacity)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel", ["triton", "megablox"])
def test_interpreted_kernel_gradient_can_be_differentiated(kernel):
    """Reverse over reverse (a Hessian-vector product) through the tile kernels, against
    the batched slot buffers' plain autodiff (capacity E / k drops nothing here). Was an
    AssertionError from inside Pallas: the grouped matmuls had no derivative rule, so the
    second pass asked Pallas to differentiate a kernel."""
    from sigmoid_moe import capacity_moe

    x, ids, weights, w_in, w_out, mask, ct = (
        jnp.asarray(a, jnp.float32) if a.dtype.kind == "f" else jnp.asarray(a) for a in _problem()
    )
    primals = (x, weights, w_in, w_out)

    def hvp(dispatch):
        def loss(x, weights, w_in, w_out):
            y = dispatch(x, ids, weights, w_in, w_out, mask).y_td
            return jnp.sum(jnp.sin(y) * ct)

        def directional(*p):  # <grad L(p), p0>: its gradient is H p0
            return sum(
                jnp.vdot(g, v)
                for g, v in zip(jax.grad(loss, (0, 1, 2, 3))(*p), primals, strict=True)
            )

        return jax.jit(jax.grad(directional, (0, 1, 2, 3)))(*primals)

    got = hvp(functools.partial(dropless_moe, kernel=kernel))
    want = hvp(functools.partial(capacity_moe, capacity_factor=E / K, kernel="batched"))
    for name, a, b in zip(("x", "weights", "w_in", "w_out"), got, want, strict=True):
        error = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        assert error <= HVP_F32_BOUND, (name, error)
