"""Accelerator check: the GPU/TPU-only code paths against their CPU-tested references,
then bf16 forward+backward time of the MoE layer against a dense SwiGLU.

One command on a GPU or TPU host::

    python benchmarks/accelerator.py                 # checks, then both timing shapes
    python benchmarks/accelerator.py --skip-timing   # checks only (about a minute)

1. **Parity** (float32, ``jax_default_matmul_precision="highest"``, small shapes): each
   path as compiled for the accelerator against the same function on the host CPU with
   the CPU kernel (the one the test suite covers), outputs and gradients:

   * ``dropless_moe(kernel="ragged_dot")`` against ``kernel="blocked"``;
   * ``capacity_moe(kernel="batched")`` against ``kernel="blocked"`` (drops included);
   * ``expert_parallel_moe`` dropless on a mesh of 1 accelerator device (and of all of
     them when there are several) with the real ``ragged_all_to_all``, checked to be in
     the compiled program, against ``dropless_moe`` on CPU.

2. **Timing** (bfloat16, routing included): ``jax.grad`` of the layer (router matmul +
   :func:`sigmoid_moe.route` + dispatch, ``kernel="auto"``) against a dense SwiGLU with
   ``d_ff = k * d_ff_expert`` (equal active FLOPs), at (T 16384, d 2048, d_ff 1408, E 64,
   k 6) and (T 16384, d 2048, d_ff 512, E 256, k 8). Prints ms, the ratio to dense,
   tokens/s and achieved TFLOP/s, counting ``3 * 2 * T * (3 d f k)`` expert matmul
   FLOPs (forward + 2x backward) and ``3 * 2 * T * d * E`` for the router.

Exit status: 0 when every check passes (or when no accelerator is visible: the script
says so and stops), 1 when a parity check fails or a step raises. ``--cpu-smoke`` runs
everything on the CPU at tiny shapes, to test this script where no accelerator is lent.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import traceback
from collections.abc import Callable

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

# (tokens, d_model, d_ff, experts, top_k): the two shapes, and a tiny one for CI.
TIMING_SHAPES = ((16384, 2048, 1408, 64, 6), (16384, 2048, 512, 256, 8))
SMOKE_SHAPES = ((256, 32, 16, 16, 4),)
PARITY_SHAPE = (256, 64, 32, 16, 4)


def _problem(t, d, f, e, k, dtype, seed=0):
    """Routing from a random router (so loads are uneven) plus expert weights."""
    keys = jax.random.split(jax.random.key(seed), 5)
    x_td = jax.random.normal(keys[0], (t, d), jnp.float32)
    logits = jax.random.normal(keys[1], (t, e)) * 2
    routing = route(logits, None, RouterConfig(e, k))
    w_in = jax.random.normal(keys[2], (e, d, 2 * f)) / math.sqrt(d)
    w_out = jax.random.normal(keys[3], (e, f, d)) / math.sqrt(f)
    mask_t = jax.random.uniform(keys[4], (t,)) > 0.05  # some padding
    cast = lambda a: a.astype(dtype)  # noqa: E731
    return cast(x_td), routing.expert_ids, routing.weights, cast(w_in), cast(w_out), mask_t


def _outputs_and_grads(dispatch: Callable, problem):
    """``(y, dropped, d x, d weights, d w_in, d w_out)`` of ``sum(y * cos(y))``."""
    x_td, ids_tk, weights_tk, w_in, w_out, mask_t = problem

    def loss(x_td, weights_tk, w_in, w_out):
        out = dispatch(x_td, ids_tk, weights_tk, w_in, w_out, mask_t)
        return jnp.sum(out[0] * jnp.cos(out[0])), (out[0], out[1])

    grad = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    grads, (y_td, dropped) = jax.jit(grad)(x_td, weights_tk, w_in, w_out)
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
            worst.append(f"dropped {int(b)} vs {int(a)}")
        else:
            worst.append(f"{label} {err / scale:.1e}")
    print(f"  {'PASS' if ok else 'FAIL'} {name}: max |err| / max |ref| of {', '.join(worst)}")
    return ok


def parity_checks(args, accelerator, cpu) -> bool:
    t, d, f, e, k = PARITY_SHAPE
    problem = _problem(t, d, f, e, k, jnp.float32)
    print(f"[1] parity, float32 T={t} d={d} d_ff={f} E={e} k={k}, {accelerator.platform} vs cpu")
    # name: (accelerator function, where its inputs live, CPU reference)
    checks = {
        "dropless ragged_dot": (
            functools.partial(dropless_moe, kernel="ragged_dot"),
            accelerator,
            functools.partial(dropless_moe, kernel="blocked"),
        ),
        "capacity batched (factor 1.0, drops)": (
            functools.partial(capacity_moe, capacity_factor=1.0, kernel="batched"),
            accelerator,
            functools.partial(capacity_moe, capacity_factor=1.0, kernel="blocked"),
        ),
    }
    devices = [dev for dev in jax.devices() if dev.platform == accelerator.platform]
    sizes = sorted({1, max(n for n in range(1, len(devices) + 1) if e % n == 0)})
    for n in sizes:
        mesh = make_mesh(data=1, expert=n, devices=devices[:n])
        checks[f"EP dropless, ragged_all_to_all, {n} device(s)"] = (
            functools.partial(
                expert_parallel_moe, mesh=mesh, capacity_factor=None, kernel="ragged_dot"
            ),
            NamedSharding(mesh, P()),  # replicated; the layer splits the tokens
            functools.partial(dropless_moe, kernel="blocked"),
        )
    if args.checks:
        checks = {name: pair for name, pair in checks.items() if args.checks in name}
    ok = True
    with jax.default_matmul_precision("highest"):
        for name, (on_accelerator, placement, reference) in checks.items():
            try:
                placed = jax.device_put(problem, placement)
                got = _outputs_and_grads(on_accelerator, placed)
                want = _outputs_and_grads(reference, jax.device_put(problem, cpu))
                ok &= _compare(name, got, want, args.tolerance)
                if name.startswith("EP"):
                    ok &= _check_native_exchange(on_accelerator, placed, accelerator)
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


def timing(args, shapes, accelerator) -> bool:
    print(f"[2] timing, bfloat16 forward+backward on {accelerator.device_kind}")
    print(
        f"{'shape':34s} {'variant':26s} {'ms':>9s} {'vs dense':>8s} {'tokens/s':>11s} "
        f"{'TFLOP/s':>8s}"
    )
    ok = True
    bf16 = jnp.bfloat16
    for t, d, f, e, k in shapes:
        label = f"T{t} d{d} F{f} E{e} k{k}"
        rng = np.random.default_rng(0)

        def normal(shape, fan_in, rng=rng):
            return jax.device_put(
                jnp.asarray(rng.standard_normal(shape, np.float32) / math.sqrt(fan_in), bf16),
                accelerator,
            )

        try:
            x_td = normal((t, d), 1.0)
            dense = {"w_in_df": normal((d, 2 * k * f), d), "w_out_fd": normal((k * f, d), k * f)}
            moe = {
                "router_w_de": normal((d, e), d),
                "w_in_edf": normal((e, d, 2 * f), d),
                "w_out_efd": normal((e, f, d), f),
            }
            expert_flops = 3 * 2 * t * 3 * d * f * k  # fwd + 2x bwd of 3 matmuls per copy
            router_flops = 3 * 2 * t * d * e
            grad = lambda loss: jax.jit(jax.grad(loss, argnums=(0, 1)))  # noqa: E731
            compiled = grad(_dense_loss).lower(dense, x_td).compile()
            dense_s = median_seconds(compiled, (dense, x_td), args.repeats)
            _row(label, f"dense SwiGLU d_ff={k * f}", dense_s, dense_s, t, expert_flops)
            variants = {
                "dropless (auto kernel)": dropless_moe,
                "capacity 1.25 (auto kernel)": functools.partial(
                    capacity_moe, capacity_factor=1.25
                ),
            }
            for name, dispatch in variants.items():
                loss = functools.partial(_moe_loss, dispatch, RouterConfig(e, k))
                compiled = grad(loss).lower(moe, x_td).compile()
                seconds = median_seconds(compiled, (moe, x_td), args.repeats)
                _row(label, name, seconds, dense_s, t, expert_flops + router_flops)
        except Exception:
            print(f"  FAIL {label}: raised\n{traceback.format_exc()}")
            ok = False
    print(
        "TFLOP/s: expert (or dense) matmul FLOPs + the router's, forward and backward, "
        "over the median time; the layer's routing, sort and gathers are in its time."
    )
    return ok


def _row(shape, name, seconds, dense_s, tokens, flops) -> None:
    print(
        f"{shape:34s} {name:26s} {seconds * 1e3:9.2f} {seconds / dense_s:7.2f}x "
        f"{tokens / seconds:11.3e} {flops / seconds / 1e12:8.2f}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="relative to max |ref|")
    parser.add_argument("--checks", default="", help="run only checks whose name contains this")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="run on the CPU at tiny shapes (tests the script)"
    )
    args = parser.parse_args(argv)
    backend = jax.default_backend()
    cpu = jax.devices("cpu")[0]
    if args.cpu_smoke:
        accelerator, shapes = cpu, SMOKE_SHAPES
    elif backend == "cpu":
        print(
            f"accelerator check: no GPU/TPU visible to JAX (backend {backend!r}, "
            f"{jax.device_count()} cpu device(s)); nothing to check here. Run it on a GPU/TPU "
            "host (or pass --cpu-smoke to exercise the script on the CPU)."
        )
        return 0
    else:
        accelerator, shapes = jax.devices()[0], TIMING_SHAPES
    print(f"jax {jax.__version__}, {accelerator.platform}: {accelerator.device_kind}")
    ok = parity_checks(args, accelerator, cpu)
    if not args.skip_timing:
        ok &= timing(args, shapes, accelerator)
    print("accelerator check:", "all passed" if ok else "FAILED (see FAIL lines above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
