"""The native CPU kernels (csrc/), registered with ``jax.ffi`` on first use.

Internal. Five FFI targets, each called by one function here:

- :func:`top_k_indices` (csrc/top_k_cpu.cc): exact top-k indices of each row, for
  :func:`sigmoid_moe.topk.top_k`;
- :func:`route_candidates` and :func:`rank_candidates` (csrc/route_cpu.cc): the few
  experts per token that can be among its top k under the sigmoid router's selection
  ``sigmoid(logits) + bias``, and their ranking once XLA has their exact keys, for
  :mod:`sigmoid_moe._sigmoid_selection`;
- :func:`expert_ffn_forward` and :func:`expert_ffn_backward` (csrc/expert_ffn_cpu.cc): the
  blocked FFN's routed experts, for :mod:`sigmoid_moe._native_ffn` (which differentiates
  them; they are not row-wise, so they get none of the wrapping below). Their GEMMs are
  OpenBLAS's, from the ``scipy-openblas32`` wheel, which is imported (so loaded) before
  the extension that links against it.

Callers keep a portable pure-JAX path for every other backend and case, and choose
between the two with one helper, :func:`native_or_portable`. The extension is built by
``pip install`` (setup.py); where it could not be (no C++ compiler), or with
``SIGMOID_MOE_NATIVE=0`` in the environment, :func:`available` is False and nothing uses
it. The kernels' limits come from the extension itself (:data:`LIMITS`).

The first three work row by row, so they get the same wrapping: under a mesh every device
handles its own rows (``custom_partitioning``: the leading dimensions keep their
sharding, only the last one is gathered if it was sharded, and parameters such as the
bias are replicated); under ``vmap`` the batch dimension is one more leading dimension.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

try:
    import scipy_openblas32  # noqa: F401  (loads the GEMM library the extension links to)

    from sigmoid_moe import _native_cpu
except ImportError:  # not built, or its GEMM library is missing: the portable paths serve
    _native_cpu = None

__all__ = [
    "LIMITS",
    "Limits",
    "available",
    "cpu_features",
    "expert_ffn_backward",
    "expert_ffn_forward",
    "gemm_library",
    "may_serve",
    "native_or_portable",
    "rank_candidates",
    "route_candidates",
    "serves",
    "top_k_indices",
]

_TOP_K = "sigmoid_moe_top_k"
_ROUTE_CANDIDATES = "sigmoid_moe_route_candidates"
_RANK_CANDIDATES = "sigmoid_moe_rank_candidates"
_EXPERT_FFN_FWD = "sigmoid_moe_expert_ffn_fwd"
_EXPERT_FFN_BWD = "sigmoid_moe_expert_ffn_bwd"


class Limits(NamedTuple):
    """The kernels' limits and codes, as csrc/kernel_limits.h defines them."""

    max_k: int  # top-k and route: the largest k
    max_fast_k: int  # the largest k of the vectorised row paths
    max_candidates: int  # route: candidate slots per token, at most
    not_routed: int  # route_candidates' status of a token with a non-finite logit or bias
    routed: int  # ... of a routed token
    too_many: int  # ... of a token with more candidates than slots
    chunk_rows: int  # expert FFN: rows of one task's chunk (its per-thread buffers)
    wave_row_bytes: int  # expert FFN: bytes of per-row outputs summed at a time, at most


# None where the extension is not built (then nothing reads it: available() is False).
LIMITS: Limits | None = None if _native_cpu is None else Limits(**_native_cpu.limits())


def available() -> bool:
    """Whether the extension was built and loads, and ``SIGMOID_MOE_NATIVE`` is not ``0``.

    Read at trace time: a program already compiled keeps the path it was traced with.
    """
    return _native_cpu is not None and os.environ.get("SIGMOID_MOE_NATIVE", "1") != "0"


def may_serve(x: jax.Array) -> bool:
    """Whether a kernel may take ``x``: unsharded, or on a mesh of CPU devices whose axes
    are not ``Explicit``.

    An ``Explicit`` axis puts the sharding in the type, and the portable paths' ops all
    have rules for it; under ``Auto`` axes (:func:`sigmoid_moe.make_mesh`) the kernels' own
    partitioning rule keeps the rows sharded. A mesh without devices (an ``AbstractMesh``,
    as when exporting for an accelerator) cannot lower that rule, and a mesh of other
    devices never runs a kernel: both take the portable paths.
    """
    sharding = jax.typeof(x).sharding
    if any(axis is not None for axis in sharding.spec):
        return False
    mesh = sharding.mesh
    if mesh.empty:
        return True
    device = mesh.abstract_device
    return device is not None and device.platform == "cpu"


def serves(x: jax.Array, when: Callable[[], bool] = lambda: True) -> bool:
    """Whether a kernel takes a call whose leading operand is ``x``: the kernels are
    :func:`available`, ``x`` passes :func:`may_serve`, and the caller's own predicate
    ``when`` holds (called only then, so it may read :data:`LIMITS`)."""
    return available() and may_serve(x) and when()


def native_or_portable(
    native: Callable, portable: Callable, *operands, when: Callable[[], bool] = lambda: True
):
    """``native(*operands)`` where the program runs on a CPU and a kernel takes the call
    (:func:`serves` of the first operand and ``when``), else ``portable(*operands)``.

    The one place where a caller's native path and its portable path meet. Where a kernel
    may serve, ``jax.lax.platform_dependent`` picks between the two when the program is
    lowered, so a program lowered for GPU or TPU (or exported for them) holds only the
    portable path; elsewhere only the portable path is traced. Both must return the same
    types.
    """
    if serves(operands[0], when):
        return jax.lax.platform_dependent(*operands, cpu=native, default=portable)
    return portable(*operands)


def cpu_features() -> dict[str, bool]:
    """The vector units of this CPU that the kernels know (``avx2``, ``fma``, ``avx512f``
    on x86-64; empty elsewhere or when the extension is not built)."""
    return {} if _native_cpu is None else dict(_native_cpu.cpu_features())


def gemm_library() -> dict[str, str]:
    """The expert kernel's GEMM library: ``config`` (its build) and ``core`` (the kernels
    it picked for this CPU at load, e.g. ``Haswell`` or ``SkylakeX``); empty when the
    extension is not built."""
    return {} if _native_cpu is None else dict(_native_cpu.gemm_library())


def _require() -> None:
    if not available():
        raise RuntimeError(
            "the native CPU kernels are off: not built (reinstall with a C++ compiler) or "
            "SIGMOID_MOE_NATIVE=0; call sigmoid_moe.topk.top_k or sigmoid_moe.route, which "
            "fall back by themselves."
        )


@functools.cache
def _register() -> None:
    for name, handler in _native_cpu.handlers().items():
        jax.ffi.register_ffi_target(f"sigmoid_moe_{name}", handler, platform="cpu")


def top_k_indices(x: jax.Array, k: int) -> jax.Array:
    """``[..., k]`` int32 indices of the ``k`` largest of float32 ``x [..., n]`` (CPU only).

    The order of :func:`sigmoid_moe.topk.top_k`: value descending, ties to the lower index,
    NaN as -inf, ``-0.0 == 0.0``. ``1 <= k <= LIMITS.max_k``, ``n < 2**31``. No gradient flows
    through it (indices); callers gather the values.
    """
    _require()
    return _wrapped(_TOP_K, k)(jax.lax.stop_gradient(x))


def route_candidates(
    logits: jax.Array, bias: jax.Array, k: int, num_candidates: int, *, allow_avx2: bool = True
):
    """Experts that can be among each token's top ``k`` by ``sigmoid(logits) + bias``.

    The kernel ranks approximate keys (within ``delta`` of the float32 ones, bounds in
    csrc/route_cpu.cc) and keeps every expert within ``2 delta`` of a lower bound of the
    ``k``-th; the exact top ``k`` are always among them. Float32 ``logits [..., E]``,
    ``bias [E]``; ``1 <= k <= num_candidates <= E``, ``k <= LIMITS.max_k``. No gradient.
    ``allow_avx2=False`` takes the kernel's generic path on every CPU (for tests).

    Returns, with ``C = num_candidates``:
      ``index [..., C]`` int32, the candidates ascending, padded with -1;
      ``logits [..., C]`` and ``bias [..., C]`` float32, theirs (pads: 0 and -inf);
      ``status [...]`` int32 (codes in :data:`LIMITS`): ``routed``; ``not_routed``, a
      non-finite logit or bias (then ``index`` is ``0 .. C-1`` with logits and biases 0);
      ``too_many``, more than ``C`` candidates (the caller must rank all experts).
    """
    _require()
    call = _wrapped(_ROUTE_CANDIDATES, k, num_candidates, bool(allow_avx2))
    return call(jax.lax.stop_gradient(logits), jax.lax.stop_gradient(bias))


def rank_candidates(keys: jax.Array, index: jax.Array, logits: jax.Array, k: int):
    """The ``k`` best candidates by their exact ``keys [..., C]``: keys descending, ties to
    the earlier candidate (NaN as -inf); ``1 <= k <= C <= LIMITS.max_candidates``.

    With ``index`` and ``logits`` from :func:`route_candidates` (ascending), returns each
    token's top-``k`` expert ids ``[..., k]`` int32 and their logits ``[..., k]`` float32.
    No gradient.
    """
    _require()
    call = _wrapped(_RANK_CANDIDATES, k)
    return call(jax.lax.stop_gradient(keys), index, jax.lax.stop_gradient(logits))


def expert_ffn_forward(
    x_td,
    weight_r,
    w_in_edf,
    w_out_efd,
    src_r,
    block_expert_b,
    *,
    h_rows: int,
    allow_avx2: bool = True,
):
    """The blocked FFN's forward on the CPU (csrc/expert_ffn_cpu.cc), float32 only.

    ``src_r [R]``, ``weight_r [R]`` are a ``BlockLayout``'s rows flattened, and
    ``block_expert_b [NB]`` its block experts. Returns ``y_td [T, d]`` and the
    pre-activations of each expert's rows up to its last filled one, packed in layout
    order, ``h_pf2 [h_rows, 2F]`` (zeros past them); ``h_rows`` must cover those rows.
    """
    _require()
    _register()
    out = (
        jax.ShapeDtypeStruct(x_td.shape, jnp.float32),
        jax.ShapeDtypeStruct((h_rows, w_in_edf.shape[2]), jnp.float32),
    )
    return jax.ffi.ffi_call(_EXPERT_FFN_FWD, out, vmap_method="sequential")(
        x_td,
        src_r,
        weight_r,
        block_expert_b,
        w_in_edf,
        w_out_efd,
        allow_avx2=np.int64(allow_avx2),
    )


def expert_ffn_backward(
    x_td,
    dy_td,
    weight_r,
    w_in_edf,
    w_out_efd,
    h_pf2,
    src_r,
    block_expert_b,
    *,
    allow_avx2: bool = True,
):
    """Gradients ``(dx_td, dweight_r, dw_in_edf, dw_out_efd)`` of :func:`expert_ffn_forward`
    from its ``h_pf2``, all float32."""
    _require()
    _register()
    out = (
        jax.ShapeDtypeStruct(x_td.shape, jnp.float32),
        jax.ShapeDtypeStruct(weight_r.shape, jnp.float32),
        jax.ShapeDtypeStruct(w_in_edf.shape, jnp.float32),
        jax.ShapeDtypeStruct(w_out_efd.shape, jnp.float32),
    )
    return jax.ffi.ffi_call(_EXPERT_FFN_BWD, out, vmap_method="sequential")(
        x_td,
        dy_td,
        src_r,
        weight_r,
        block_expert_b,
        w_in_edf,
        w_out_efd,
        h_pf2,
        allow_avx2=np.int64(allow_avx2),
    )


def _top_k_call(x: jax.Array, k: int) -> jax.Array:
    _register()
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (k,), jnp.int32)
    return jax.ffi.ffi_call(_TOP_K, out)(x, k=np.int64(k))


def _route_candidates_call(
    logits: jax.Array, bias: jax.Array, k: int, num_candidates: int, allow_avx2: bool
):
    _register()
    lead = logits.shape[:-1]
    out = (
        jax.ShapeDtypeStruct(lead + (num_candidates,), jnp.int32),
        jax.ShapeDtypeStruct(lead + (num_candidates,), jnp.float32),
        jax.ShapeDtypeStruct(lead + (num_candidates,), jnp.float32),
        jax.ShapeDtypeStruct(lead, jnp.int32),
    )
    return jax.ffi.ffi_call(_ROUTE_CANDIDATES, out)(
        logits, bias, k=np.int64(k), allow_avx2=np.int64(allow_avx2)
    )


def _rank_candidates_call(keys: jax.Array, index: jax.Array, logits: jax.Array, k: int):
    _register()
    out = (
        jax.ShapeDtypeStruct(keys.shape[:-1] + (k,), jnp.int32),
        jax.ShapeDtypeStruct(keys.shape[:-1] + (k,), jnp.float32),
    )
    return jax.ffi.ffi_call(_RANK_CANDIDATES, out)(keys, index, logits, k=np.int64(k))


# ----------------------------------------------------------------- rows under a mesh


class _Kernel(NamedTuple):
    """A row-wise FFI call ``call(*rows, *params, *static)``: operands ``rows`` share
    their leading (row) dimensions, ``params`` are the same for every row, and every
    result has those leading dimensions (Shardy rule: ``...`` the rows)."""

    call: Callable
    num_rows: int  # operands with the row dimensions
    num_params: int  # operands without
    sharding_rule: str
    replicated_factors: tuple[str, ...]


_KERNELS = {
    _TOP_K: _Kernel(_top_k_call, 1, 0, "... n -> ... k", ("n", "k")),
    _ROUTE_CANDIDATES: _Kernel(
        _route_candidates_call, 1, 1, "... e, e -> ... c, ... c, ... c, ...", ("e", "c")
    ),
    _RANK_CANDIDATES: _Kernel(
        _rank_candidates_call, 3, 0, "... c, ... c, ... c -> ... k, ... k", ("c", "k")
    ),
}


def _as_named(sharding, ndim: int) -> NamedSharding:
    """``sharding`` as a ``NamedSharding``: itself, or for any other kind GSPMD may hand a
    partitioning rule (``GSPMDSharding``, a replicated or one-device sharding) the same
    placement on a mesh of its own: one axis per tiled dimension of its device tiles."""
    if isinstance(sharding, NamedSharding):
        return sharding
    hlo = sharding._to_xla_hlo_sharding(ndim)
    by_id = {device.id: device for device in sharding.device_set}
    if hlo.is_replicated() or hlo.is_maximal() or not hlo.is_tiled():
        devices = np.array(sorted(by_id.values(), key=lambda device: device.id))
        return NamedSharding(Mesh(devices, ("replica",)), P())
    dims = tuple(hlo.tile_assignment_dimensions())
    devices = np.array([by_id[i] for i in hlo.tile_assignment_devices()]).reshape(dims)
    # Dimensions past the array's rank are replication (or other subgroup) axes.
    names = tuple(f"tiles{i}" for i in range(len(dims)))
    spec = tuple(n if size > 1 else None for n, size in zip(names[:ndim], dims[:ndim], strict=True))
    return NamedSharding(Mesh(devices, names), P(*spec))


def _shardings(arg_shapes, result_shapes, num_rows: int):
    """``(mesh, arg shardings, result shardings)``: rows keep the first operand's leading
    sharding; last dimensions and the operands past ``num_rows`` (parameters) are
    replicated. Accepts any sharding of the first operand (``_as_named``); the mesh is the
    one that sharding is named on."""
    first = arg_shapes[0]
    rank = len(first.shape)
    named = _as_named(first.sharding, rank)
    mesh = named.mesh
    lead = (tuple(named.spec) + (None,) * rank)[: rank - 1]

    def like_rows(shape):
        return NamedSharding(mesh, P(*lead, *(None,) * (len(shape.shape) - len(lead))))

    def replicated(shape):
        return NamedSharding(mesh, P(*(None,) * len(shape.shape)))

    args = tuple(
        like_rows(shape) if i < num_rows else replicated(shape)
        for i, shape in enumerate(arg_shapes)
    )
    return mesh, args, jax.tree.map(like_rows, result_shapes)


@functools.cache
def _wrapped(name: str, *static):
    """Kernel ``name`` with its static arguments bound, partitioned by rows (operand 0)
    and batched by rows."""
    kernel = _KERNELS[name]

    def partition(*args):
        *_, arg_shapes, result_shapes = args
        mesh, arg_shardings, result_shardings = _shardings(
            arg_shapes, result_shapes, kernel.num_rows
        )
        lower = lambda *operands: kernel.call(*operands, *static)  # noqa: E731
        return mesh, lower, result_shardings, arg_shardings

    def infer(*args):
        *_, arg_shapes, result_shapes = args
        return _shardings(arg_shapes, result_shapes, kernel.num_rows)[2]

    num_operands = kernel.num_rows + kernel.num_params
    partitioned = custom_partitioning(
        kernel.call, static_argnums=tuple(range(num_operands, num_operands + len(static)))
    )
    partitioned.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=kernel.sharding_rule,
        need_replication_factors=kernel.replicated_factors,
    )

    @jax.custom_batching.custom_vmap
    def batched(*operands):
        return partitioned(*operands, *static)

    @batched.def_vmap
    def _(axis_size, in_batched, *operands):
        operands = [
            x if is_batched else jnp.broadcast_to(x, (axis_size, *x.shape))
            for x, is_batched in zip(operands, in_batched, strict=True)
        ]
        if any(in_batched[kernel.num_rows :]):
            # Per-example parameters (a vmapped bias): one call per example.
            out = jax.lax.map(lambda ops: batched(*ops), tuple(operands))
        else:
            # The batch dimension, moved to the front, is one more row dimension; the
            # parameters were not batched, so they keep their shape.
            rows = operands[: kernel.num_rows]
            params = [p[0] for p in operands[kernel.num_rows :]]
            out = batched(*rows, *params)
        return out, jax.tree.map(lambda _: True, out)

    return batched
