"""Router overhead: jitted ``x @ W`` + :func:`sigmoid_moe.route` against the bare ``x @ W``.

Each shape is timed in one run, the variants interleaved repeat by repeat so that load on
a shared machine hits them alike: warm-up (compile + one call), then ``--repeats`` calls of
each, ``block_until_ready`` on every output, median (and min-max range) reported. The
``lax.top_k`` rows swap our top-k for ``jax.lax.top_k`` inside ``route`` (for reference
only: ``lax.top_k`` does not canonicalise ``-0.0`` or NaN) so the gain from ours is visible.
The ``portable`` rows are ours with the native CPU kernel off (``SIGMOID_MOE_NATIVE=0`` at
trace time): the pure-JAX path every other backend runs.

Run::

    python benchmarks/routing.py --repeats 20
    python benchmarks/routing.py --shapes 0 --repeats 50   # the goal shape only

Goal (issue 3): route adds at most 25% over the bare matmul at the first shape.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from unittest import mock

import jax
import jax.numpy as jnp

import sigmoid_moe.routing as routing_module
from sigmoid_moe import RouterConfig, route

# (tokens, d_model, E, k, groups, kept groups)
SHAPES = [
    (4096, 2048, 64, 6, 1, 1),
    (4096, 7168, 256, 8, 8, 4),
    (16384, 1024, 128, 8, 1, 1),
    (8192, 2048, 384, 8, 1, 1),  # Kimi-K2-like router: 384 experts, top-8
]


def _lax_top_k(x, k):
    values, indices = jax.lax.top_k(x, k)
    return values, indices.astype(jnp.int32)


def _time(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Interleaves the calls; returns seconds per call for each name."""
    for fn in fns.values():  # warm-up: compile and one more call
        jax.block_until_ready(fn())
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return times


def _compiled(fn, *args):
    """AOT-compiles ``fn`` for ``args``, so a later patch cannot change what runs."""
    return fn.lower(*args).compile()


def _measure(shape, args) -> None:
    """Times every variant for one shape and prints a block of rows."""
    tokens, d_model, num_experts, k, groups, kept = shape
    key_x, key_w, key_b = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, (tokens, d_model), jnp.float32)
    w = jax.random.normal(key_w, (d_model, num_experts), jnp.float32) / d_model**0.5
    bias = 0.01 * jax.random.normal(key_b, (num_experts,), jnp.float32)
    logits = jax.block_until_ready(x @ w)
    cfg = RouterConfig(num_experts=num_experts, top_k=k, num_groups=groups, topk_groups=kept)

    def compile_all():
        return {
            "routed": _compiled(jax.jit(lambda x, w, b: route(x @ w, b, cfg)), x, w, bias),
            # What the MoE layer consumes: the [T, E] score outputs are not written out.
            "routed ids+w": _compiled(
                jax.jit(lambda x, w, b: route(x @ w, b, cfg)[:2]), x, w, bias
            ),
            "route alone": _compiled(
                jax.jit(lambda logits_te, b: route(logits_te, b, cfg)), logits, bias
            ),
            "top-k alone": _compiled(
                jax.jit(lambda logits_te: routing_module.top_k(logits_te, k)), logits
            ),
        }

    bare = _compiled(jax.jit(lambda x, w: x @ w), x, w)
    ours = compile_all()
    calls = {"bare x@W": lambda: bare(x, w)}
    calls["x@W + route"] = lambda: ours["routed"](x, w, bias)
    calls["x@W + route ids+w"] = lambda: ours["routed ids+w"](x, w, bias)
    calls["route alone"] = lambda: ours["route alone"](logits, bias)
    calls["top-k alone"] = lambda: ours["top-k alone"](logits)
    with mock.patch.dict(os.environ, {"SIGMOID_MOE_NATIVE": "0"}):
        portable = compile_all()
    calls["x@W + route[portable]"] = lambda: portable["routed"](x, w, bias)
    calls["ids+w[portable]"] = lambda: portable["routed ids+w"](x, w, bias)
    calls["top-k alone[portable]"] = lambda: portable["top-k alone"](logits)
    if not args.no_lax:
        with mock.patch.object(routing_module, "top_k", _lax_top_k):
            lax = compile_all()
        calls["x@W + route[lax]"] = lambda: lax["routed"](x, w, bias)
        calls["route alone[lax]"] = lambda: lax["route alone"](logits, bias)
        calls["top-k alone[lax]"] = lambda: lax["top-k alone"](logits)

    times = _time(calls, args.repeats)
    bare_median = statistics.median(times["bare x@W"])
    label = f"{tokens}x{d_model}x{num_experts}, k={k}, " + (
        f"{groups}g/{kept}" if groups > 1 else "no groups"
    )
    for name, ts in times.items():
        med = statistics.median(ts)
        ratio = f"{med / bare_median:7.3f}" if name.startswith(("bare", "x@W", "ids+w")) else ""
        print(
            f"{label:<30} {name:<23} {med * 1e3:10.3f} "
            f"{min(ts) * 1e3:8.3f}-{max(ts) * 1e3:8.3f} {ratio:>7}"
        )
        label = ""
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per variant")
    parser.add_argument(
        "--shapes",
        type=int,
        nargs="*",
        default=None,
        help=f"indices into {SHAPES} (default: all)",
    )
    parser.add_argument("--no-lax", action="store_true", help="skip the lax.top_k reference rows")
    args = parser.parse_args()
    shapes = [SHAPES[i] for i in (args.shapes if args.shapes is not None else range(len(SHAPES)))]

    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; median of {args.repeats} "
        "(min-max) ms, variants interleaved"
    )
    header = (
        f"{'tokens x d x E, k, groups':<30} {'variant':<14} {'median ms':>10} "
        f"{'range ms':>17} {'x bare':>7}"
    )
    print(header)
    print("-" * len(header))
    for shape in shapes:
        _measure(shape, args)


if __name__ == "__main__":
    main()
