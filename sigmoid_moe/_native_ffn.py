"""The blocked FFN's native CPU kernel (csrc/expert_ffn_cpu.cc), differentiable. Internal.

:func:`sigmoid_moe.blocked_ffn.blocked_expert_ffn` hands its float32 work here on the CPU
(:func:`serves`, then ``jax.lax.platform_dependent``: a program lowered for another
backend gets the pure-JAX block scan, as do other dtypes). Same math,
same layout (``BlockLayout``), and the same summation order of a token's rows; only the
GEMMs' rounding differs.

Why a kernel: at small shapes (the ``small`` preset of ``benchmarks/layer.py``: T 1024,
E 16, top-2, ~128 rows per expert) XLA's scan paid for its per-block dispatch, a copy of
each expert's weight slice before its dots, zero-filled gradient buffers and small
multithreaded GEMMs. The kernel runs one expert per task on the intra-op pool with
single-threaded GEMMs that read ``w[e]`` in place, keeps gathers and SwiGLU in cache, and
writes each weight gradient once.

Differentiation: reverse mode through a ``custom_vjp`` whose backward is the kernel's
backward. Both kernel calls also carry a ``custom_jvp`` rule from a pure-JAX reference of
the same math (:func:`_reference_forward`, :func:`_reference_backward`), so that a
gradient can itself be differentiated (Hessian-vector products); only then does that
reference run.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from sigmoid_moe import _native
from sigmoid_moe._dispatch_common import gather_rows, vary, varying
from sigmoid_moe.experts import swiglu

__all__ = ["expert_ffn", "host_scratch_bytes", "serves"]

# csrc/expert_ffn_cpu.cc's kWaveRowBytes and kChunkRows.
_WAVE_BYTES = 32 << 20
_CHUNK_ROWS = 256


def serves(x_td: jax.Array, w_in_edf: jax.Array, w_out_efd: jax.Array) -> bool:
    """Whether the kernel takes this call: built and allowed (``SIGMOID_MOE_NATIVE``),
    float32 activations and weights, and an ``x`` the kernels may take (unsharded, or on
    a mesh of CPU devices without ``Explicit`` axes; see ``_native.may_serve``). The
    caller still picks the platform when lowering (``platform_dependent``).
    """
    return (
        _native.available()
        and all(a.dtype == jnp.float32 for a in (x_td, w_in_edf, w_out_efd))
        and min(x_td.shape[1], w_out_efd.shape[1], w_in_edf.shape[0]) > 0
        and _native.may_serve(x_td)
    )


def host_scratch_bytes(num_tokens: int, num_rows: int, d_model: int, d_ff: int) -> int:
    """Upper bound of the kernel's host memory outside XLA's buffers, in bytes.

    For a layout of ``num_rows`` rows over ``num_tokens`` tokens:

    - the per-row outputs of one wave (rows spanning at most 32 MiB, or one expert's: at
      most ``T`` rows, or all rows if a token lists an expert twice);
    - each token's rows (int64 indices, ``A <= num_rows`` of them, and ``2 T + 1``);
    - per thread (XLA's pool and the calling one), kept for reuse: one chunk of at most
      256 rows, ``d + F`` floats a row in the forward and ``2 d + 4 F`` in the backward,
      and the GEMM's packed panels (192 rows and ``max(2 F, d)`` columns, 256 deep).
    """
    d_model = max(1, d_model)
    wave_rows = min(num_rows, max(_WAVE_BYTES // (4 * d_model), num_tokens))
    chunk_rows = min(num_rows, _CHUNK_ROWS)
    panel_cols = -(-max(2 * d_ff, d_model) // 16) * 16
    per_thread = chunk_rows * (3 * d_model + 5 * d_ff) + (192 + panel_cols) * 256
    threads = (os.cpu_count() or 1) + 1
    row_index = 8 * (num_rows + 2 * num_tokens + 1)
    return 4 * (wave_rows * d_model + threads * per_thread) + row_index


def expert_ffn(x_td, src_bm, weight_bm, block_expert_b, row_a, w_in_edf, w_out_efd):
    """``y_td`` float32 of :func:`sigmoid_moe.blocked_ffn.blocked_expert_ffn` by the kernel.

    ``row_a`` (the layout's ``[A]`` assignment rows) sizes the saved pre-activations:
    every filled row is one assignment's.
    """
    weight_r = weight_bm.reshape(-1).astype(jnp.float32)
    h_rows = max(1, row_a.shape[0])
    return _expert_ffn(
        h_rows, x_td, weight_r, w_in_edf, w_out_efd, src_bm.reshape(-1), block_expert_b
    )


# ----------------------------------------------------------------- reverse mode


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _expert_ffn(h_rows, x_td, weight_r, w_in_edf, w_out_efd, src_r, block_expert_b):
    return _forward(h_rows, x_td, weight_r, w_in_edf, w_out_efd, src_r, block_expert_b)[0]


def _expert_ffn_fwd(h_rows, x_td, weight_r, w_in_edf, w_out_efd, src_r, block_expert_b):
    y_td, h_pf2 = _forward(h_rows, x_td, weight_r, w_in_edf, w_out_efd, src_r, block_expert_b)
    return y_td, (x_td, weight_r, w_in_edf, w_out_efd, src_r, block_expert_b, h_pf2)


def _expert_ffn_bwd(h_rows, residuals, dy_td):
    del h_rows
    x_td, weight_r, w_in_edf, w_out_efd, src_r, block_expert_b, h_pf2 = residuals
    dx_td, dweight_r, dw_in, dw_out = _backward(
        x_td, dy_td, weight_r, w_in_edf, w_out_efd, h_pf2, src_r, block_expert_b
    )
    return dx_td, dweight_r, dw_in, dw_out, None, None


_expert_ffn.defvjp(_expert_ffn_fwd, _expert_ffn_bwd)


# ----------------------------------------------------------------- the kernel calls


def _varying_like_inputs(fn):
    """``fn`` with every output marked as varying over the mesh axes of any input (inside
    ``shard_map``; a kernel's outputs carry none, and the ``custom_vjp`` and the
    ``platform_dependent`` around it must see the inputs' types)."""

    def run(*args, **kwargs):
        axes = frozenset().union(*(varying(a) for a in args))
        return tuple(vary(out, axes) for out in fn(*args, **kwargs))

    return run


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _forward(h_rows, x_td, weight_r, w_in_edf, w_out_efd, src_r, block_expert_b):
    """``(y_td, h_pf2)``: the kernel's forward (``h`` packed; zeros past the segments' rows)."""
    return _varying_like_inputs(_native.expert_ffn_forward)(
        x_td, weight_r, w_in_edf, w_out_efd, src_r, block_expert_b, h_rows=h_rows
    )


@_forward.defjvp
def _forward_jvp(h_rows, primals, tangents):
    tangent = _reference_tangents(
        functools.partial(_reference_forward, h_rows=h_rows), primals, tangents
    )
    return _forward(h_rows, *primals), tangent


@jax.custom_jvp
def _backward(x_td, dy_td, weight_r, w_in_edf, w_out_efd, h_pf2, src_r, block_expert_b):
    """``(dx_td, dweight_r, dw_in_edf, dw_out_efd)`` from the kernel's backward."""
    return _varying_like_inputs(_native.expert_ffn_backward)(
        x_td,
        dy_td.astype(jnp.float32),
        weight_r,
        w_in_edf,
        w_out_efd,
        h_pf2,
        src_r,
        block_expert_b,
    )


@_backward.defjvp
def _backward_jvp(primals, tangents):
    return _backward(*primals), _reference_tangents(_reference_backward, primals, tangents)


def _reference_tangents(reference, primals, tangents):
    """The output tangents of ``reference(*floats, src_r, block_expert_b)``: the kernel
    calls' float operands come first, the layout's two integer arrays last."""
    *floats, src_r, block_expert_b = primals
    _, out_dot = jax.jvp(
        lambda *f: reference(*f, src_r, block_expert_b),
        tuple(floats),
        tuple(tangents[: len(floats)]),
    )
    return out_dot


# ----------------------------------------------------------------- pure-JAX reference
#
# The kernel's math over whole blocks, with each block's weights gathered
# ([num_blocks, ...]: fine for the rare second-order use, too big
# for everyday training, which is why the scan exists). ``h`` is packed as the kernel
# packs it: a filled row's place is the number of filled rows before it (each expert's
# filled rows are a prefix of its blocks).


def _blocks(src_r, block_expert_b, num_tokens, num_experts):
    """``(src_bm, valid_bm, expert_b, packed_bm)``: rows by block (empty ones reading token
    ``T``), filled rows, a valid expert id per block, each row's place in ``h``.

    As the kernel packs ``h``: an expert's rows up to its last filled one (empty rows
    among them included: they hold zeros) take consecutive places, expert after expert.
    """
    num_blocks, block_size = block_expert_b.shape[0], src_r.shape[0] // block_expert_b.shape[0]
    src_bm = src_r.reshape(num_blocks, block_size)
    valid_bm = (src_bm >= 0) & (src_bm < num_tokens) & (block_expert_b[:, None] >= 0)
    src_bm = jnp.where(valid_bm, src_bm, num_tokens)
    row_r = jnp.arange(src_r.shape[0], dtype=jnp.int32)
    expert_r = jnp.repeat(block_expert_b, block_size)
    segment_r = jnp.where(expert_r >= 0, expert_r, num_experts)
    last_e = jax.ops.segment_max(
        jnp.where(valid_bm.reshape(-1), row_r, -1), segment_r, num_segments=num_experts + 1
    )
    used_r = (expert_r >= 0) & (row_r <= last_e[segment_r])
    packed_r = jnp.cumsum(used_r.astype(jnp.int32)) - 1
    big = jnp.iinfo(jnp.int32).max
    packed_bm = jnp.where(used_r, packed_r, big).reshape(num_blocks, block_size)
    return src_bm, valid_bm, jnp.clip(block_expert_b, 0, num_experts - 1), packed_bm


def _reference_forward(x_td, weight_r, w_in_edf, w_out_efd, src_r, block_expert_b, *, h_rows):
    num_tokens, num_experts = x_td.shape[0], w_in_edf.shape[0]
    src_bm, valid_bm, expert_b, packed_bm = _blocks(src_r, block_expert_b, num_tokens, num_experts)
    x_bmd = gather_rows(x_td, src_bm)
    h_bmf2 = jnp.einsum("bmd,bdf->bmf", x_bmd, w_in_edf[expert_b])
    o_bmd = jnp.einsum("bmf,bfd->bmd", swiglu(h_bmf2), w_out_efd[expert_b])
    o_bmd = o_bmd * jnp.where(valid_bm, weight_r.reshape(valid_bm.shape), 0)[..., None]
    y_td = jnp.zeros(x_td.shape, jnp.float32).at[src_bm].add(o_bmd, mode="drop")
    h_pf2 = jnp.zeros((h_rows, h_bmf2.shape[-1]), jnp.float32)
    return y_td, h_pf2.at[packed_bm].set(h_bmf2, mode="drop")


def _reference_backward(x_td, dy_td, weight_r, w_in_edf, w_out_efd, h_pf2, src_r, block_expert_b):
    num_tokens, num_experts = x_td.shape[0], w_in_edf.shape[0]
    src_bm, valid_bm, expert_b, packed_bm = _blocks(src_r, block_expert_b, num_tokens, num_experts)
    weight_bm1 = jnp.where(valid_bm, weight_r.reshape(valid_bm.shape), 0)[..., None]
    x_bmd = gather_rows(x_td, src_bm)
    dy_bmd = gather_rows(dy_td, src_bm)
    h_bmf2 = gather_rows(h_pf2, packed_bm)
    a_bmf, swiglu_pullback = jax.vjp(swiglu, h_bmf2)
    w_in_b, w_out_b = w_in_edf[expert_b], w_out_efd[expert_b]
    da_bmf = jnp.einsum("bmd,bfd->bmf", dy_bmd, w_out_b)
    dweight_r = jnp.sum(a_bmf * da_bmf, axis=-1).reshape(-1)
    (dh_bmf2,) = swiglu_pullback(da_bmf * weight_bm1)
    used_b = jnp.where(block_expert_b >= 0, block_expert_b, num_experts)  # E: dropped
    dw_out = (
        jnp.zeros(w_out_efd.shape, jnp.float32)
        .at[used_b]
        .add(jnp.einsum("bmf,bmd->bfd", a_bmf * weight_bm1, dy_bmd), mode="drop")
    )
    dw_in = (
        jnp.zeros(w_in_edf.shape, jnp.float32)
        .at[used_b]
        .add(jnp.einsum("bmd,bmf->bdf", x_bmd, dh_bmf2), mode="drop")
    )
    dx_bmd = jnp.einsum("bmf,bdf->bmd", dh_bmf2, w_in_b)
    dx_td = jnp.zeros(x_td.shape, jnp.float32).at[src_bm].add(dx_bmd, mode="drop")
    return dx_td, dweight_r, dw_in, dw_out
