"""The blocked FFN's native CPU kernel against the pure-JAX block scan.

The rest of the suite runs float32 dispatch through the kernel (it is the CPU default),
float64 oracles included; these tests pin what is specific to it: its gradients against
the scan's, bit-identical AVX2 and generic paths, determinism, empty experts, the pure-JAX
reference its second-order rules use, and the scan in programs for other backends.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sigmoid_moe import _native, _native_ffn
from sigmoid_moe._dispatch_common import rank_within_expert
from sigmoid_moe.blocked_ffn import BlockLayout, block_layout, blocked_expert_ffn
from sigmoid_moe.dispatch import dropless_moe

pytestmark = pytest.mark.skipif(not _native.available(), reason="native kernels not built")


def _layout_problem(seed, num_tokens, d_model, d_ff, num_experts, k, block_size, *, idle=0):
    """A top-k assignment with ``idle`` experts that get no token, and its block layout."""
    rng = np.random.default_rng(seed)
    live = num_experts - idle
    # Skewed: expert 0 gets most tokens, so it spans several blocks.
    probs = np.linspace(3.0, 1.0, live) / np.linspace(3.0, 1.0, live).sum()
    ids = np.stack([rng.choice(live, k, replace=False, p=probs) for _ in range(num_tokens)])
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    x = f32(rng.normal(size=(num_tokens, d_model)))
    weight_a = f32(rng.random(num_tokens * k))
    w_in = f32(rng.normal(size=(num_experts, d_model, 2 * d_ff)) / np.sqrt(d_model))
    w_out = f32(rng.normal(size=(num_experts, d_ff, d_model)) / np.sqrt(d_ff))
    expert_a = jnp.asarray(ids.reshape(-1), jnp.int32)
    token_a = jnp.repeat(jnp.arange(num_tokens, dtype=jnp.int32), k)
    rank_a, count_e = rank_within_expert(expert_a, jnp.ones(expert_a.shape, bool), num_experts)

    def layout_of(weight_a):
        return block_layout(
            expert_a,
            rank_a,
            jnp.ones(expert_a.shape, bool),
            token_a,
            weight_a,
            count_e,
            num_tokens=num_tokens,
            block_size=block_size,
        )

    return x, weight_a, w_in, w_out, layout_of


def _value_and_grads(layout_of, x, weight_a, w_in, w_out, cotangent):
    def f(x, weight_a, w_in, w_out):
        return blocked_expert_ffn(x, layout_of(weight_a), w_in, w_out)

    y, pullback = jax.vjp(jax.jit(f), x, weight_a, w_in, w_out)
    return (y, *pullback(cotangent))


def _scan(monkeypatch, fn):
    """``fn()`` traced with the native kernels off: the pure-JAX block scan."""
    with monkeypatch.context() as m:
        m.setenv("SIGMOID_MOE_NATIVE", "0")
        return fn()


@pytest.mark.parametrize(
    "shape",
    [
        # tokens, d_model, d_ff, experts, k, block, idle
        (37, 8, 6, 5, 2, 4, 1),
        (64, 16, 12, 4, 3, 8, 0),
        (9, 24, 20, 6, 1, 16, 2),  # d and F past one AVX2 panel; most experts empty
        (50, 5, 3, 3, 2, 7, 0),  # widths below one vector
        (1100, 8, 6, 2, 1, 64, 0),  # an expert past one task chunk (256 rows)
    ],
)
def test_kernel_equals_the_scan(shape, monkeypatch):
    *dims, block, idle = shape
    x, weight_a, w_in, w_out, layout_of = _layout_problem(0, *dims, block, idle=idle)
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
    run = functools.partial(_value_and_grads, layout_of, x, weight_a, w_in, w_out, cotangent)
    got = run()
    want = _scan(monkeypatch, run)
    for name, a, b in zip(("y", "dx", "dweight", "dw_in", "dw_out"), got, want, strict=True):
        assert a.dtype == b.dtype, name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5, err_msg=name)
    if idle:
        # Experts that got no token: exactly zero weight gradients (the kernel writes them).
        assert not np.any(np.asarray(got[3])[-idle:]) and not np.any(np.asarray(got[4])[-idle:])


def _kernel_args(seed=3, block=8):
    x, weight_a, w_in, w_out, layout_of = _layout_problem(seed, 41, 24, 20, 5, 3, block, idle=1)
    layout = layout_of(weight_a)
    rows = (layout.weight_bm.reshape(-1), w_in, w_out, layout.src_bm.reshape(-1))
    return x, (*rows, layout.block_expert_b), layout.row_a.shape[0]


@pytest.mark.skipif(
    jax.devices()[0].platform != "cpu", reason="the kernel's two paths run on the CPU only"
)
def test_avx2_and_generic_paths_give_the_same_bits():
    x, (weight_r, w_in, w_out, src_r, block_expert_b), h_rows = _kernel_args()
    dy = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)
    # Arguments spanning the exp clamp and NaN-free extremes of the SwiGLU.
    x = x.at[0].multiply(40.0)
    outs = {}
    for allow in (True, False):
        y, h = _native.expert_ffn_forward(
            x, weight_r, w_in, w_out, src_r, block_expert_b, h_rows=h_rows, allow_avx2=allow
        )
        grads = _native.expert_ffn_backward(
            x, dy, weight_r, w_in, w_out, h, src_r, block_expert_b, allow_avx2=allow
        )
        outs[allow] = [np.asarray(a) for a in (y, *grads)]
        filled = int(jnp.sum((src_r < x.shape[0]) & (jnp.repeat(block_expert_b, 8) >= 0)))
        outs[allow].append(np.asarray(h)[:filled])
    for a, b in zip(outs[True], outs[False], strict=True):
        np.testing.assert_array_equal(a, b)


def test_kernel_is_deterministic():
    x, args, h_rows = _kernel_args(seed=5)
    run = jax.jit(functools.partial(_native.expert_ffn_forward, h_rows=h_rows))
    first, second = run(x, *args), run(x, *args)
    np.testing.assert_array_equal(np.asarray(first[0]), np.asarray(second[0]))


def test_pure_jax_reference_equals_the_kernel():
    """The reference gives the kernel calls their derivatives (second order)."""
    x, args, h_rows = _kernel_args(seed=7)
    dy = jnp.asarray(np.random.default_rng(4).normal(size=x.shape), jnp.float32)
    y, h = _native.expert_ffn_forward(x, *args, h_rows=h_rows)
    ref_y, ref_h = _native_ffn._reference_forward(x, *args, h_rows=h_rows)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), rtol=1e-5, atol=1e-5)
    filled = int(jnp.sum(args[3] < x.shape[0]))
    np.testing.assert_allclose(
        np.asarray(h)[:filled], np.asarray(ref_h)[:filled], rtol=1e-5, atol=1e-5
    )
    weight_r, w_in, w_out, src_r, block_expert_b = args
    got = _native.expert_ffn_backward(x, dy, weight_r, w_in, w_out, h, src_r, block_expert_b)
    want = _native_ffn._reference_backward(x, dy, weight_r, w_in, w_out, h, src_r, block_expert_b)
    for name, a, b in zip(("dx", "dweight", "dw_in", "dw_out"), got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5, err_msg=name)


def test_dropless_layer_path_uses_the_kernel_and_matches_the_scan(monkeypatch):
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(96, 16)), jnp.float32)
    ids = jnp.asarray(np.stack([rng.choice(8, 2, replace=False) for _ in range(96)]), jnp.int32)
    weights = jnp.asarray(rng.random((96, 2)), jnp.float32)
    w_in = jnp.asarray(rng.normal(size=(8, 16, 24)) / 4, jnp.float32)
    w_out = jnp.asarray(rng.normal(size=(8, 12, 16)) / 4, jnp.float32)

    def loss(x, weights, w_in, w_out):
        return jnp.sum(jnp.tanh(dropless_moe(x, ids, weights, w_in, w_out).y_td))

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    hlo = grad.lower(x, weights, w_in, w_out).as_text()
    assert "sigmoid_moe_expert_ffn_fwd" in hlo and "sigmoid_moe_expert_ffn_bwd" in hlo
    got = grad(x, weights, w_in, w_out)
    want = _scan(
        monkeypatch,
        lambda: jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(x, weights, w_in, w_out),
    )
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


def test_programs_for_other_backends_get_the_scan():
    """``platform_dependent``: a program lowered for a GPU holds the scan, not the kernel."""
    x, weight_a, w_in, w_out, layout_of = _layout_problem(9, 24, 8, 6, 4, 2, 8)

    def grad(x):
        return jax.grad(lambda x: jnp.sum(blocked_expert_ffn(x, layout_of(weight_a), w_in, w_out)))(
            x
        )

    cpu = jax.jit(grad).lower(x).as_text()
    cuda = jax.export.export(jax.jit(grad), platforms=("cuda",))(x).mlir_module()
    assert "sigmoid_moe_expert_ffn_fwd" in cpu and "sigmoid_moe_expert_ffn_bwd" in cpu
    assert "sigmoid_moe_expert_ffn" not in cuda and "stablehlo.while" in cuda


def test_second_order_with_empty_rows_among_an_experts_rows(monkeypatch):
    """A layout whose filled rows are not a prefix (ranks with gaps): the kernel packs the
    gaps into ``h`` and its second-order rules must agree (Hessian-vector products)."""
    rng = np.random.default_rng(0)
    t, d, f, e = 4, 3, 4, 2
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    w_in = jnp.asarray(rng.normal(size=(e, d, 2 * f)), jnp.float32)
    w_out = jnp.asarray(rng.normal(size=(e, f, d)), jnp.float32)
    weight_bm = jnp.asarray([[0.5, 0, 0.7, 0], [0.3, 0.9, 0, 0]], jnp.float32)
    layout_of = functools.partial(
        BlockLayout,
        jnp.asarray([[0, t, 1, t], [2, 3, t, t]], jnp.int32),  # a gap in expert 0's rows
        block_expert_b=jnp.asarray([0, 1], jnp.int32),
        row_a=jnp.asarray([0, 2, 4, 5, 8, 8], jnp.int32),
    )

    def loss(x, weight_bm, w_in, w_out):
        return jnp.sum(jnp.sin(blocked_expert_ffn(x, layout_of(weight_bm), w_in, w_out)))

    def hvp():
        primals = (x, weight_bm, w_in, w_out)
        tangents = tuple(jnp.ones_like(p) for p in primals)
        return jax.jit(lambda *p: jax.jvp(jax.grad(loss, (0, 1, 2, 3)), p, tangents)[1])(*primals)

    got = hvp()
    want = _scan(monkeypatch, hvp)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------
# kernel="auto": the native-or-scan rule (issue 28), one residual layout, determinism.


@pytest.mark.parametrize(
    "features, core, native",
    [
        ({"avx2": True, "fma": True, "avx512f": True}, "SkylakeX", True),
        ({"avx2": True, "fma": True, "avx512f": True}, "Cooperlake", True),
        ({"avx2": True, "fma": True, "avx512f": True}, "SapphireRapids", True),
        # An AVX-512 CPU whose library kernels are AVX2 (the hand-written GEMM's case).
        ({"avx2": True, "fma": True, "avx512f": True}, "Haswell", False),
        ({"avx2": True, "fma": True, "avx512f": False}, "Haswell", True),
        ({"avx2": True, "fma": True, "avx512f": False}, "Zen", True),
        ({"avx2": True, "fma": True, "avx512f": False}, "SkylakeX", True),
        ({"avx2": True, "fma": True, "avx512f": False}, "Sandybridge", False),
        ({"avx2": True, "fma": True, "avx512f": False}, "NewCoreOfTomorrow", False),
        ({"avx2": False, "fma": False, "avx512f": False}, "Nehalem", True),
        ({}, "ARMV8SVE", True),  # another architecture: nothing wider for XLA
    ],
)
def test_auto_rule_compares_the_librarys_vectors_with_the_cpus(features, core, native):
    assert _native_ffn.gemm_uses_widest_vectors(features, core) is native


def _lowered_experts(x, w_in, w_out, layout_of, weight_a, platforms=None):
    def loss(x):
        return jnp.sum(blocked_expert_ffn(x, layout_of(weight_a), w_in, w_out) ** 2)

    grad = jax.jit(jax.grad(loss))
    if platforms is None:
        return grad.lower(x).as_text(debug_info=True)
    return jax.export.export(grad, platforms=platforms)(x).mlir_module()


def test_auto_picks_a_valid_kernel_and_never_a_disabled_one(monkeypatch):
    """The rule's choice reaches the program: the kernel where it says so and the kernels
    are on; the scan where it says no, where ``SIGMOID_MOE_NATIVE=0``, for other dtypes,
    and in programs for other backends, whatever the rule says."""
    x, weight_a, w_in, w_out, layout_of = _layout_problem(11, 24, 8, 6, 4, 2, 8)
    args = (w_in, w_out, layout_of, weight_a)
    kernel, scan = "sigmoid_moe_expert_ffn_fwd", "save_h"  # a scope of the scan's only
    for says in (True, False):
        monkeypatch.setattr(_native_ffn, "gemm_uses_widest_vectors", lambda says=says: says)
        text = _lowered_experts(x, *args)
        assert (kernel in text) is says and (scan in text) is not says
        assert kernel not in _lowered_experts(x, *args, platforms=("cuda",))
        as_f64 = (a.astype(jnp.float64) for a in (x, w_in, w_out))
        with jax.enable_x64(True):
            assert kernel not in _lowered_experts(*as_f64, layout_of, weight_a)
        with monkeypatch.context() as m:
            m.setenv("SIGMOID_MOE_NATIVE", "0")
            text = _lowered_experts(x, *args)
            assert kernel not in text and scan in text


def _residuals(f, *primals):
    """``(shapes and dtypes, bytes)`` of what a ``jax.vjp`` of ``f`` holds for its pullback."""
    _, pullback = jax.vjp(f, *primals)
    leaves = [leaf for leaf in jax.tree.leaves(pullback) if hasattr(leaf, "nbytes")]
    return [(leaf.shape, leaf.dtype) for leaf in leaves], sum(leaf.nbytes for leaf in leaves)


def test_kernel_and_scan_keep_one_residual_layout(monkeypatch):
    """A ``jax.vjp`` of the jitted layer, held outside ``jit``: the pullback keeps the
    residuals of the path that ran and no others (before, the platform choice over two
    ``custom_vjp`` functions kept both paths' residuals, 1.8x the bytes here), and the
    kernel and the scan keep the same ones."""
    x, weight_a, w_in, w_out, layout_of = _layout_problem(12, 256, 32, 48, 8, 2, 32)
    layout = layout_of(weight_a)
    f = jax.jit(lambda x, w_in, w_out: blocked_expert_ffn(x, layout, w_in, w_out))
    native = _residuals(f, x, w_in, w_out)
    with monkeypatch.context() as m:
        m.setenv("SIGMOID_MOE_NATIVE", "0")
        # Traced anew, now with the kernels off.
        f = jax.jit(lambda x, w_in, w_out: blocked_expert_ffn(x, layout, w_in, w_out))
        scan = _residuals(f, x, w_in, w_out)
    assert native == scan
    # One set: the inputs, the layout's rows and blocks, and h (A + B rows of 2F).
    num_assign, block = layout.row_a.shape[0], layout.src_bm.shape[1]
    rows = layout.src_bm.size
    want = x.nbytes + w_in.nbytes + w_out.nbytes + 8 * rows + 4 * layout.block_expert_b.size
    want += 4 * (num_assign + block) * w_in.shape[2]
    assert native[1] == want


_SAME_BITS_CHILD = """
import hashlib, os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one CPU: XLA's pool has 1 thread
import numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, sys.argv[1])
from test_native_ffn import _kernel_outputs
print(len(os.sched_getaffinity(0)), _kernel_outputs())
"""


def _kernel_outputs() -> str:
    """SHA-256 of the kernel's forward and backward outputs on a fixed problem with
    experts of several tasks' work and of more than one chunk of rows."""
    x, weight_a, w_in, w_out, layout_of = _layout_problem(13, 1100, 64, 48, 4, 2, 128)
    layout = layout_of(weight_a)
    args = (
        layout.weight_bm.reshape(-1),
        w_in,
        w_out,
        layout.src_bm.reshape(-1),
        layout.block_expert_b,
    )
    h_rows = layout.row_a.shape[0]
    dy = jnp.asarray(np.random.default_rng(14).normal(size=x.shape), jnp.float32)
    y, h = jax.jit(functools.partial(_native.expert_ffn_forward, h_rows=h_rows))(x, *args)
    grads = jax.jit(_native.expert_ffn_backward)(x, dy, args[0], w_in, w_out, h, *args[3:])
    digest = hashlib.sha256()
    for out in (y, h, *grads):
        digest.update(np.asarray(out).tobytes())
    return digest.hexdigest()


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs 2 CPUs and Linux affinity",
)
def test_same_bits_with_one_thread_and_with_all():
    """The kernel's results do not depend on XLA's thread count: its GEMMs run on one
    thread each (the library set to one thread), its sums in a fixed order."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", ""
    )
    tests_dir = os.path.dirname(__file__)
    out = subprocess.run(
        [sys.executable, "-c", _SAME_BITS_CHILD, tests_dir],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    threads, child = out.stdout.split()
    assert threads == "1"
    assert child == _kernel_outputs()
