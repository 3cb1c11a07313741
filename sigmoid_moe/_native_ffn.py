"""The blocked FFN's native CPU kernel (csrc/expert_ffn_cpu.cc), differentiable. Internal.

:func:`sigmoid_moe.blocked_ffn.blocked_expert_ffn` runs its float32 work here on the CPU
where :func:`serves` says so, through ``sigmoid_moe._native.native_or_portable`` (a
program lowered for another backend gets the pure-JAX block scan, as do other dtypes).
Same math, same layout (``BlockLayout``), the same saved pre-activations
(:func:`packed_rows`), and the same summation order of a token's rows; only the GEMMs'
rounding differs.

Why a kernel: at small shapes XLA's scan pays for its per-block dispatch, a copy of each
expert's weight slice before its dots, zero-filled gradient buffers and small
multithreaded GEMMs. The kernel runs one expert per task on XLA's intra-op pool with
single-threaded GEMMs from a vendor BLAS (OpenBLAS, csrc/blas_gemm.h, its kernels picked
for the CPU at run time) that read ``w[e]`` in place, keeps gathers and SwiGLU in cache,
and writes each weight gradient once.

Differentiation: ``blocked_ffn`` owns the one ``custom_vjp`` and calls :func:`forward` in
its forward rule and :func:`backward` in its backward rule. Both kernel calls carry a
``custom_jvp`` rule from a pure-JAX reference of the same math
(:func:`_reference_forward`, :func:`_reference_backward`), so that a gradient can itself
be differentiated (Hessian-vector products); only then does that reference run.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from sigmoid_moe import _native
from sigmoid_moe._dispatch_common import gather_rows, vary, varying
from sigmoid_moe.experts import swiglu

__all__ = [
    "backward",
    "forward",
    "gemm_uses_widest_vectors",
    "host_scratch_bytes",
    "packed_rows",
    "serves",
]

# The GEMM library's kernels (OpenBLAS cores, as ``openblas_get_corename`` names them) by
# the widest vectors they use: 512 (AVX-512) or 256 (AVX2 with FMA). Any other core is
# older, narrower code.
_CORE_VECTOR_BITS = {
    "skylakex": 512,
    "cooperlake": 512,
    "sapphirerapids": 512,
    "haswell": 256,
    "zen": 256,
    "excavator": 256,
}


def gemm_uses_widest_vectors(
    cpu_features: dict[str, bool] | None = None, gemm_core: str | None = None
) -> bool:
    """Whether the GEMM library runs kernels as wide as this CPU's widest FMA vectors.

    The rule behind ``kernel="auto"``'s native-or-scan choice: the kernel's GEMMs, most
    of its work, run at the library's speed, XLA's GEMMs (the block scan's) at the
    widest width the CPU has. The library picks its kernels for the CPU when it loads; on
    a CPU it does not know it falls back to narrower ones, and the kernel would then lose
    to the scan (a hand-written AVX2 GEMM did, on AVX-512 CPUs: the README's Benchmarks).
    A CPU feature rule, not a timing, so every run on a machine takes the same path and
    gives the same bits. Arguments default to this process's CPU and library
    (``_native.cpu_features()``, ``_native.gemm_library()["core"]``).
    """
    features = _native.cpu_features() if cpu_features is None else cpu_features
    core = _native.gemm_library().get("core", "") if gemm_core is None else gemm_core
    if features.get("avx512f"):
        needed = 512
    elif features.get("avx2") and features.get("fma"):
        needed = 256
    else:
        # An x86-64 CPU without AVX2 and FMA, or another architecture: XLA has no wider
        # FMA vectors than the library's kernels for it.
        return True
    # A core this table does not know takes the scan: never slower than the portable path.
    return _CORE_VECTOR_BITS.get(core.lower(), 0) >= needed


def serves(x_td: jax.Array, w_in_edf: jax.Array, w_out_efd: jax.Array) -> bool:
    """Whether the kernel takes this call: the kernels may take ``x`` (built, allowed by
    ``SIGMOID_MOE_NATIVE``, unsharded or on a mesh of CPU devices without ``Explicit``
    axes: ``_native.serves``), float32 activations and weights, no empty dimension, and
    GEMMs as wide as the CPU's (:func:`gemm_uses_widest_vectors`). The caller still
    picks the platform when lowering (``_native.native_or_portable``).
    """
    return _native.serves(
        x_td,
        lambda: (
            all(a.dtype == jnp.float32 for a in (x_td, w_in_edf, w_out_efd))
            and min(x_td.shape[1], w_out_efd.shape[1], w_in_edf.shape[0]) > 0
            and gemm_uses_widest_vectors()
        ),
    )


def host_scratch_bytes(num_tokens: int, num_rows: int, d_model: int, d_ff: int) -> int:
    """Upper bound of the kernel's host memory outside XLA's buffers, in bytes.

    For a layout of ``num_rows`` rows over ``num_tokens`` tokens:

    - the per-row outputs of one wave (rows spanning at most ``LIMITS.wave_row_bytes``,
      or one expert's: at most ``T`` rows, or all rows if a token lists an expert twice);
    - each token's rows (int64 indices, ``A <= num_rows`` of them, and ``2 T + 1``);
    - per thread (XLA's pool and the calling one), kept for reuse: one chunk of at most
      ``LIMITS.chunk_rows`` rows, ``d + F`` floats a row in the forward and ``2 d + 4 F``
      in the backward, and what the GEMM library packs of one product's two operands
      (bounded by their size: the largest product is ``chunk x 2F`` by ``2F x d``).
    0 where the extension is not built.
    """
    if _native.LIMITS is None:
        return 0
    d_model = max(1, d_model)
    wave_rows = min(num_rows, max(_native.LIMITS.wave_row_bytes // (4 * d_model), num_tokens))
    chunk_rows = min(num_rows, _native.LIMITS.chunk_rows)
    gemm_operands = 2 * d_ff * (chunk_rows + d_model) + chunk_rows * d_model
    per_thread = chunk_rows * (3 * d_model + 5 * d_ff) + gemm_operands
    threads = (os.cpu_count() or 1) + 1
    row_index = 8 * (num_rows + 2 * num_tokens + 1)
    return 4 * (wave_rows * d_model + threads * per_thread) + row_index


def packed_rows(
    src_bm: jax.Array, block_expert_b: jax.Array, num_tokens: int, num_experts: int
) -> jax.Array:
    """``[num_blocks]`` int32: each block's rows in the saved pre-activations ``h``.

    ``h`` holds each expert's rows up to its last filled one (empty rows among them
    included: they hold zeros), packed expert after expert in layout order; block ``b``'s
    rows start at ``cumsum(packed)[b] - packed[b]``. With the layouts of
    ``block_layout`` (each expert's filled rows a prefix of its blocks) that is every row
    of an expert's full blocks and the filled rows of its last, so ``A`` assignments take
    at most ``A`` rows. The kernel and the block scan both lay out ``h`` so.
    """
    num_blocks, block_size = src_bm.shape
    filled_bm = (src_bm >= 0) & (src_bm < num_tokens) & (block_expert_b[:, None] >= 0)
    row_m = jnp.arange(1, block_size + 1, dtype=jnp.int32)
    fill_b = jnp.max(jnp.where(filled_bm, row_m, 0), axis=1)  # last filled row + 1, or 0
    block_b = jnp.arange(num_blocks, dtype=jnp.int32)
    expert_b = jnp.where(block_expert_b >= 0, block_expert_b, num_experts)  # E: unused
    last_e = jax.ops.segment_max(
        jnp.where(fill_b > 0, block_b, -1), expert_b, num_segments=num_experts + 1
    )
    last_b = last_e[expert_b]  # the block's expert's last block with a filled row
    used_b = jnp.where(block_b < last_b, block_size, jnp.where(block_b == last_b, fill_b, 0))
    return jnp.where(block_expert_b >= 0, used_b, 0).astype(jnp.int32)


# ----------------------------------------------------------------- the kernel calls


def _varying_like_inputs(fn):
    """``fn`` with every output marked as varying over the mesh axes of any input (inside
    ``shard_map``; a kernel's outputs carry none, and the ``custom_vjp`` and the
    ``platform_dependent`` around it must see the inputs' types)."""

    def run(*args, **kwargs):
        axes = frozenset().union(*(varying(a) for a in args))
        return tuple(vary(out, axes) for out in fn(*args, **kwargs))

    return run


def forward(h_rows, x_td, src_r, weight_r, block_expert_b, w_in_edf, w_out_efd):
    """``(y_td, h_pf2)`` float32 by the kernel: the combined output and the saved
    pre-activations (``h_rows`` rows, laid out as :func:`packed_rows` says, zeros past
    the used rows)."""
    return _forward(
        h_rows, x_td, weight_r.astype(jnp.float32), w_in_edf, w_out_efd, src_r, block_expert_b
    )


def backward(x_td, dy_td, src_r, weight_r, block_expert_b, w_in_edf, w_out_efd, h_pf2):
    """``(dx_td, dweight_r, dw_in_edf, dw_out_efd)`` by the kernel, in the dtypes of
    ``x_td``, ``weight_r``, ``w_in_edf`` and ``w_out_efd``."""
    grads = _backward(
        x_td,
        dy_td.astype(jnp.float32),
        weight_r.astype(jnp.float32),
        w_in_edf,
        w_out_efd,
        h_pf2,
        src_r,
        block_expert_b,
    )
    like = (x_td, weight_r, w_in_edf, w_out_efd)
    return tuple(g.astype(a.dtype) for g, a in zip(grads, like, strict=True))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _forward(h_rows, x_td, weight_r, w_in_edf, w_out_efd, src_r, block_expert_b):
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
    return _varying_like_inputs(_native.expert_ffn_backward)(
        x_td, dy_td, weight_r, w_in_edf, w_out_efd, h_pf2, src_r, block_expert_b
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
# for everyday training, which is why the scan exists).


def _blocks(src_r, block_expert_b, num_tokens, num_experts):
    """``(src_bm, valid_bm, expert_b, packed_bm)``: rows by block (empty ones reading token
    ``T``), filled rows, a valid expert id per block, each row's place in ``h`` (past its
    end where the row has none: see :func:`packed_rows`)."""
    num_blocks, block_size = block_expert_b.shape[0], src_r.shape[0] // block_expert_b.shape[0]
    src_bm = src_r.reshape(num_blocks, block_size)
    used_b = packed_rows(src_bm, block_expert_b, num_tokens, num_experts)
    valid_bm = (src_bm >= 0) & (src_bm < num_tokens) & (block_expert_b[:, None] >= 0)
    src_bm = jnp.where(valid_bm, src_bm, num_tokens)
    row_m = jnp.arange(block_size, dtype=jnp.int32)
    big = jnp.iinfo(jnp.int32).max
    offset_b = jnp.cumsum(used_b) - used_b
    packed_bm = jnp.where(row_m < used_b[:, None], offset_b[:, None] + row_m, big)
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
