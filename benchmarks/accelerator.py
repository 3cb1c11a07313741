"""Accelerator check: every expert kernel the layer can run here, against the CPU kernel,
with what XLA compiled for it and how long it takes.

One command on a GPU or TPU host::

    python benchmarks/accelerator.py                 # parity, compiled programs, timing
    python benchmarks/accelerator.py --skip-timing   # parity only (about a minute)

1. **Parity** (small shape, ``PARITY_SHAPE``), for every kernel that is timed, in the
   dtype it is timed in: outputs and gradients (``x``, routing weights, both expert
   weights) of the dispatch compiled for the accelerator against the same dispatch on the
   host CPU in float32 with the CPU kernel (the one the test suite covers):

   * bfloat16 against that float32 reference, within ``--bf16-tolerance`` (default 5e-2
     of the largest reference magnitude: bf16 rounds the inputs, ``h``, ``silu(g) * u``,
     the outputs and so the loss's cotangent, each to within 2^-9; on CPU every kernel,
     ``ragged_dot`` included, is 3.0e-2 off on the routing weights' gradient at the smoke
     shape and 1e-2 elsewhere; tests/test_dispatch.py allows bf16 gradients 8%);
   * float32 at ``jax.default_matmul_precision("highest")``, within ``--tolerance``
     (1e-4);
   * expert parallelism (dropless, ``kernel="auto"``: the platform's kernel) on a mesh of
     1 accelerator device and of all of them, float32, with the XLA ragged-all-to-all
     checked to be in the compiled program.

   Kernels: the platform's Pallas kernel (``triton`` on GPUs, ``megablox`` on TPU: what
   ``kernel="auto"`` runs there), ``ragged_dot``, on GPUs ``ragged_dot`` compiled with
   ``--xla_gpu_experimental_use_ragged_dot_fusion`` (the cuDNN fusion; bf16 only), and
   capacity dispatch with batched matmuls (factor 1.25, drops included).

2. **What XLA compiled**, per kernel at each timing shape (bfloat16 forward+backward with
   routing): custom-call targets and custom fusions, the largest ``dot``, and
   ``memory_analysis()``. It prints ``DENSE FALLBACK`` when a dot carries an expert-sized
   extra dimension: ``E`` next to all ``T * k`` rows (XLA:GPU's ``RaggedToDense`` rewrite),
   or ``E`` folded into a contraction over all rows (XLA:CPU's masked ``ragged_dot``).

3. **Timing** against a dense SwiGLU with ``d_ff = k * d_ff_expert`` (equal active
   FLOPs), at (T 16384, d 2048, d_ff 1408, E 64, k 6) and (T 16384, d 2048, d_ff 512,
   E 256, k 8): ms, ratio to dense, tokens/s and TFLOP/s counting ``3 * 2 * T * (3 d f k)``
   expert FLOPs plus ``3 * 2 * T * d * E`` for the router. Before a shape its inputs'
   size is estimated, and before a variant runs its compiled program's memory
   (``memory_analysis``) is checked against the device's; what would not fit is skipped
   with the reason, not run into an out-of-memory crash.

Exit status: 0 when every parity check passes and nothing raised (or when no accelerator
is visible: the script says so and stops), 1 otherwise; skipped timings do not fail.
``--cpu-smoke`` runs everything on the CPU at tiny shapes (the Pallas kernel in the
Pallas interpreter), to test this script where no accelerator is lent.
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import sys
import traceback
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from _timing import median_seconds
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sigmoid_moe import (
    RouterConfig,
    capacity_moe,
    dropless_moe,
    expert_parallel_moe,
    make_mesh,
    route,
)
from sigmoid_moe.experts import swiglu_ffn

# (tokens, d_model, d_ff, experts, top_k): the two shapes, and tiny ones for CI.
TIMING_SHAPES = ((16384, 2048, 1408, 64, 6), (16384, 2048, 512, 256, 8))
PARITY_SHAPE = (256, 64, 32, 16, 4)
SMOKE_TIMING_SHAPES = ((64, 16, 8, 8, 2),)
SMOKE_PARITY_SHAPE = (48, 16, 8, 8, 2)
CAPACITY_FACTOR = 1.25
FUSION_FLAG = "xla_gpu_experimental_use_ragged_dot_fusion"
GiB = 2**30


class Variant(NamedTuple):
    """One way to run the routed experts, and its CPU float32 reference."""

    name: str
    dispatch: Callable  # the dispatch signature of sigmoid_moe.dispatch
    reference: Callable
    compiler_options: dict  # XLA options for its compile
    float32: bool  # also checked in float32 (the cuDNN fusion takes bf16 only)


def variants(platform: str) -> list[Variant]:
    """The kernels timed on ``platform`` ("gpu", "tpu" or "cpu" for the smoke run)."""
    pallas = "megablox" if platform == "tpu" else "triton"
    dropless_ref = functools.partial(dropless_moe, kernel="blocked")
    capacity_ref = functools.partial(
        capacity_moe, capacity_factor=CAPACITY_FACTOR, kernel="blocked"
    )
    out = [
        Variant(
            f"dropless {pallas}",
            functools.partial(dropless_moe, kernel=pallas),
            dropless_ref,
            {},
            True,
        ),
        Variant(
            "dropless ragged_dot",
            functools.partial(dropless_moe, kernel="ragged_dot"),
            dropless_ref,
            {},
            True,
        ),
    ]
    if platform != "tpu":
        out.append(
            Variant(
                "dropless ragged_dot, cuDNN fusion flag",
                functools.partial(dropless_moe, kernel="ragged_dot"),
                dropless_ref,
                {FUSION_FLAG: True},
                False,
            )
        )
    out.append(
        Variant(
            f"capacity {CAPACITY_FACTOR} batched",
            functools.partial(capacity_moe, capacity_factor=CAPACITY_FACTOR, kernel="batched"),
            capacity_ref,
            {},
            True,
        )
    )
    return out


# --------------------------------------------------------------------------- parity


def _problem(t, d, f, e, k, seed=0):
    """Routing from a random router (so loads are uneven) plus expert weights, float32."""
    keys = jax.random.split(jax.random.key(seed), 5)
    x_td = jax.random.normal(keys[0], (t, d), jnp.float32)
    logits = jax.random.normal(keys[1], (t, e)) * 2
    routing = route(logits, None, RouterConfig(e, k))
    w_in = jax.random.normal(keys[2], (e, d, 2 * f)) / math.sqrt(d)
    w_out = jax.random.normal(keys[3], (e, f, d)) / math.sqrt(f)
    mask_t = jax.random.uniform(keys[4], (t,)) > 0.05  # some padding
    return x_td, routing.expert_ids, routing.weights, w_in, w_out, mask_t


def _cast(problem, dtype):
    x_td, ids_tk, weights_tk, w_in, w_out, mask_t = problem
    return x_td.astype(dtype), ids_tk, weights_tk, w_in.astype(dtype), w_out.astype(dtype), mask_t


def _outputs_and_grads(dispatch: Callable, problem, compiler_options=None):
    """``(y, dropped, d x, d weights, d w_in, d w_out)`` of ``sum(y * cos(y))``."""
    x_td, ids_tk, weights_tk, w_in, w_out, mask_t = problem

    def loss(x_td, weights_tk, w_in, w_out):
        out = dispatch(x_td, ids_tk, weights_tk, w_in, w_out, mask_t)
        y = out[0].astype(jnp.float32)
        return jnp.sum(y * jnp.cos(y)), (out[0], out[1])

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    args = (x_td, weights_tk, w_in, w_out)
    compiled = grad.lower(*args).compile(compiler_options=compiler_options or None)
    grads, (y_td, dropped) = compiled(*args)
    return (y_td, dropped, *grads)


def _compare(name: str, got, want, tol: float) -> bool:
    names = ("y", "dropped", "d x", "d weights", "d w_in", "d w_out")
    worst, ok = [], True
    for label, a, b in zip(names, got, want, strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(float(np.max(np.abs(b))), 1e-30)
        err = float(np.max(np.abs(a - b))) if a.size else 0.0
        ok &= a.shape == b.shape and err <= tol * scale
        if label == "dropped":  # counts: exact
            ok &= int(a) == int(b)
            worst.append(f"dropped {int(b)} vs {int(a)}")
        else:
            worst.append(f"{label} {err / scale:.1e}")
    print(f"  {'PASS' if ok else 'FAIL'} {name}: max |err| / max |ref| of {', '.join(worst)}")
    return ok


def parity_checks(args, accelerator, cpu, shape) -> bool:
    t, d, f, e, k = shape
    problem = _problem(t, d, f, e, k)
    platform = accelerator.platform
    print(f"[1] parity, T={t} d={d} d_ff={f} E={e} k={k}: {platform} against cpu float32")
    checks = []  # (name, dispatch, compiler options, dtype, bound, placement, reference)
    for v in variants(platform):
        checks.append(
            (
                f"{v.name}, bfloat16",
                v.dispatch,
                v.compiler_options,
                jnp.bfloat16,
                args.bf16_tolerance,
                accelerator,
                v.reference,
            )
        )
        if v.float32:
            checks.append(
                (
                    f"{v.name}, float32",
                    v.dispatch,
                    v.compiler_options,
                    jnp.float32,
                    args.tolerance,
                    accelerator,
                    v.reference,
                )
            )
    devices = [dev for dev in jax.devices() if dev.platform == platform]
    for n in sorted({1, max(n for n in range(1, len(devices) + 1) if e % n == 0)}):
        mesh = make_mesh(data=1, expert=n, devices=devices[:n])
        ep = functools.partial(expert_parallel_moe, mesh=mesh, capacity_factor=None)
        checks.append(
            (
                f"EP dropless auto, ragged_all_to_all, {n} device(s), float32",
                ep,
                {},
                jnp.float32,
                args.tolerance,
                NamedSharding(mesh, P()),
                functools.partial(dropless_moe, kernel="blocked"),
            )
        )
    if args.checks:
        checks = [c for c in checks if args.checks in c[0]]
    want = None
    ok = True
    with jax.default_matmul_precision("highest"):
        for name, dispatch, options, dtype, bound, placement, reference in checks:
            try:
                if want is None or want[0] is not reference:
                    want = (reference, _outputs_and_grads(reference, jax.device_put(problem, cpu)))
                placed = jax.device_put(_cast(problem, dtype), placement)
                got = _outputs_and_grads(dispatch, placed, options)
                ok &= _compare(f"{name} (bound {bound:g})", got, want[1], bound)
                if name.startswith("EP"):
                    ok &= _check_native_exchange(dispatch, placed, accelerator)
            except Exception:  # a crash is a failed check, and the others still run
                print(f"  FAIL {name}: raised\n{traceback.format_exc()}")
                ok = False
    return ok


def _check_native_exchange(dispatch, problem, accelerator) -> bool:
    """The compiled accelerator program holds the XLA ragged-all-to-all (not the emulation)."""
    if accelerator.platform == "cpu":
        print("  (cpu smoke: the exchange is the CPU emulation, no XLA ragged-all-to-all)")
        return True
    hlo = jax.jit(dispatch).lower(*problem).compile().as_text()
    found = "ragged-all-to-all" in hlo or "ragged_all_to_all" in hlo
    print(f"  {'PASS' if found else 'FAIL'} compiled program contains ragged-all-to-all")
    return found


# --------------------------------------------------------------------------- compiled programs

_INSTRUCTION = re.compile(r"%([\w.\-]+) = \w+\[([\d,]*)\]\S*\s+([\w\-]+)\(([^)]*)\)")


class Compiled(NamedTuple):
    """What ``inspect`` reads from a compiled program."""

    custom_calls: tuple[str, ...]  # custom-call targets and custom fusion kinds, sorted
    largest_dot: str  # "dot [out] = [lhs] x [rhs]" with the most output elements
    dense_dots: tuple[str, ...]  # dots with an expert-sized extra dimension
    memory_bytes: int  # arguments + outputs + temporaries - aliased
    memory: str  # memory_analysis(), in words


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


def dense_fallback(dims_list, experts: int, rows: int, widths) -> bool:
    """Whether shapes of one dot show a dense rewrite of a grouped matmul over ``rows``.

    An operand or result with all the rows (or more) and either ``E`` as a further
    dimension (rank 3 or more: ``[E, rows, width]``), or a dimension of ``E`` times a
    width (the experts folded into a contraction: ``[rows, E * width]``).
    """
    folded = {experts * w for w in widths}
    for dims in dims_list:
        if not any(n >= rows for n in dims):
            continue
        if len(dims) >= 3 and experts in dims:
            return True
        if folded & set(dims):
            return True
    return False


def inspect(compiled, experts: int, rows: int, widths) -> Compiled:
    """Custom calls, the largest dot, dense-fallback dots and memory of ``compiled``."""
    text = compiled.as_text()
    shapes, dots = {}, []
    for name, dims, op, operands in _INSTRUCTION.findall(text):
        shapes[name] = tuple(int(n) for n in dims.split(",") if n)
        if op == "dot":
            dots.append((name, [o.strip().lstrip("%") for o in operands.split(",")]))
    calls = set(re.findall(r'custom_call_target="([^"]+)"', text))
    calls |= set(re.findall(r'"kind":"(__[^"]+)"', text))
    described, dense = [], []
    for name, operands in dots:
        dims = [shapes[name], *(shapes.get(o, ()) for o in operands)]
        size = math.prod(dims[0])
        label = f"dot {list(dims[0])} = " + " x ".join(str(list(s)) for s in dims[1:])
        described.append((size, label))
        if dense_fallback(dims, experts, rows, widths):
            dense.append(label)
    stats = compiled.memory_analysis()
    total = 0
    memory = "memory_analysis() unavailable"
    if stats is not None:
        total = (
            stats.argument_size_in_bytes
            + stats.output_size_in_bytes
            + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes
        )
        memory = (
            f"memory: arguments {_size(stats.argument_size_in_bytes)}, outputs "
            f"{_size(stats.output_size_in_bytes)}, temporaries {_size(stats.temp_size_in_bytes)}"
        )
    largest = max(described)[1] if described else "no dot"
    return Compiled(tuple(sorted(calls)), largest, tuple(dense), total, memory)


def print_compiled(info: Compiled) -> None:
    print(f"      custom calls: {', '.join(info.custom_calls) or 'none'}")
    print(f"      largest {info.largest_dot}")
    print(f"      {info.memory}")
    for label in info.dense_dots[:3]:
        print(f"      DENSE FALLBACK: {label} has an expert-sized extra dimension")


# --------------------------------------------------------------------------- timing


def _moe_loss(dispatch, router, params, x_td):
    logits = jnp.dot(x_td, params["router_w_de"], preferred_element_type=jnp.float32)
    routing = route(logits, None, router)
    y_td = dispatch(
        x_td, routing.expert_ids, routing.weights, params["w_in_edf"], params["w_out_efd"]
    )[0]
    return jnp.sum(y_td.astype(jnp.float32) ** 2)


def _dense_loss(params, x_td):
    y_td = swiglu_ffn(x_td, params["w_in_df"], params["w_out_fd"])
    return jnp.sum(y_td.astype(jnp.float32) ** 2)


def input_bytes(shape) -> int:
    """bf16 bytes of one timing shape's inputs, parameters and their gradients: what must
    fit before anything is compiled."""
    t, d, f, e, k = shape
    dense = 3 * d * k * f
    moe = e * 3 * d * f + d * e
    return 2 * (t * d + 2 * (dense + moe))


def timing(args, shapes, accelerator, limit_bytes) -> bool:
    print(
        f"[2] compiled programs and timing, bfloat16 forward+backward on {accelerator.device_kind}"
    )
    if limit_bytes:
        print(f"    device memory for one program: {_size(limit_bytes)}")
    ok = True
    bf16 = jnp.bfloat16
    for shape in shapes:
        t, d, f, e, k = shape
        label = f"T{t} d{d} F{f} E{e} k{k}"
        print(f"  {label}")
        if limit_bytes and input_bytes(shape) > limit_bytes:
            print(
                f"    SKIP {label}: its inputs, parameters and gradients alone need "
                f"{_size(input_bytes(shape))}"
            )
            continue
        rng = np.random.default_rng(0)

        def normal(shape_, fan_in, rng=rng):
            value = rng.standard_normal(shape_, np.float32) / math.sqrt(fan_in)
            return jax.device_put(jnp.asarray(value, bf16), accelerator)

        try:
            x_td = normal((t, d), 1.0)
            dense = {"w_in_df": normal((d, 2 * k * f), d), "w_out_fd": normal((k * f, d), k * f)}
            moe = {
                "router_w_de": normal((d, e), d),
                "w_in_edf": normal((e, d, 2 * f), d),
                "w_out_efd": normal((e, f, d), f),
            }
        except Exception:
            print(f"    FAIL {label}: inputs could not be placed\n{traceback.format_exc()}")
            ok = False
            continue
        expert_flops = 3 * 2 * t * 3 * d * f * k  # fwd + 2x bwd of 3 matmuls per copy
        router_flops = 3 * 2 * t * d * e
        runs = [("dense SwiGLU d_ff=" + str(k * f), _dense_loss, dense, {}, expert_flops)]
        for v in variants(accelerator.platform):
            loss = functools.partial(_moe_loss, v.dispatch, RouterConfig(e, k))
            runs.append((v.name, loss, moe, v.compiler_options, expert_flops + router_flops))
        dense_s = None
        for name, loss, params, options, flops in runs:
            try:
                grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
                compiled = grad.lower(params, x_td).compile(compiler_options=options or None)
                info = inspect(compiled, e, t * k, (d, f, 2 * f))
                if limit_bytes and info.memory_bytes > limit_bytes:
                    why = "DENSE FALLBACK, " if info.dense_dots else ""
                    print(
                        f"    SKIP {name}: {why}its program needs {_size(info.memory_bytes)} "
                        f"of {_size(limit_bytes)}"
                    )
                    print_compiled(info)
                    continue
                seconds = median_seconds(compiled, (params, x_td), args.repeats)
                dense_s = dense_s or seconds
                print(
                    f"    {name:40s} {seconds * 1e3:9.2f} ms {seconds / dense_s:6.2f}x "
                    f"{t / seconds:11.3e} tok/s {flops / seconds / 1e12:7.2f} TFLOP/s"
                )
                print_compiled(info)
            except Exception:
                print(f"    FAIL {name}: raised\n{traceback.format_exc()}")
                ok = False
    print(
        "TFLOP/s: expert (or dense) matmul FLOPs + the router's, forward and backward, over "
        "the median time; the layer's routing, sort and gathers are in its time."
    )
    return ok


def _device_limit(accelerator, override_gib: float | None) -> int | None:
    """Bytes one program may use: the override, else 90% of the device's limit."""
    if override_gib is not None:
        return int(override_gib * GiB)
    stats = accelerator.memory_stats() or {}
    limit = stats.get("bytes_limit")
    return int(0.9 * limit) if limit else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="float32, of max |ref|")
    parser.add_argument("--bf16-tolerance", type=float, default=5e-2, help="bf16, of max |ref|")
    parser.add_argument("--checks", default="", help="run only checks whose name contains this")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument(
        "--memory-limit-gib",
        type=float,
        default=None,
        help="memory one program may use (default: 90%% of the device's)",
    )
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="run on the CPU at tiny shapes (tests the script)"
    )
    args = parser.parse_args(argv)
    backend = jax.default_backend()
    cpu = jax.devices("cpu")[0]
    if args.cpu_smoke:
        accelerator, shapes, parity_shape = cpu, SMOKE_TIMING_SHAPES, SMOKE_PARITY_SHAPE
    elif backend == "cpu":
        print(
            f"accelerator check: no GPU/TPU visible to JAX (backend {backend!r}, "
            f"{jax.device_count()} cpu device(s)); nothing to check here. Run it on a GPU/TPU "
            "host (or pass --cpu-smoke to exercise the script on the CPU)."
        )
        return 0
    else:
        accelerator, shapes, parity_shape = jax.devices()[0], TIMING_SHAPES, PARITY_SHAPE
    print(f"jax {jax.__version__}, {accelerator.platform}: {accelerator.device_kind}")
    ok = parity_checks(args, accelerator, cpu, parity_shape)
    if not args.skip_timing:
        ok &= timing(args, shapes, accelerator, _device_limit(accelerator, args.memory_limit_gib))
    print("accelerator check:", "all passed" if ok else "FAILED (see FAIL lines above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
