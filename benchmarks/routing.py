"""Router overhead: jitted ``x @ W`` + :func:`sigmoid_moe.route` against the bare ``x @ W``.

Each shape is timed in one run. Every call of a variant comes right after a call of the
bare matmul (``_timing.paired_rounds``), ``--repeats`` times, so that load drifting on a
shared machine hits both alike; the ratio column is the median of those paired ratios
(min-max in brackets), and ``min/min`` the ratio of the fastest calls, the steadier figure
where other jobs take the cores now and then. Times are medians. The ``lax`` rows
are the portable path with ``jax.lax.top_k`` in place of ours (for reference
only: ``lax.top_k`` does not canonicalise ``-0.0`` or NaN) so the gain from ours is visible.
The ``portable`` rows are ours with the native CPU kernels off (``SIGMOID_MOE_NATIVE=0``
at trace time): the pure-JAX path every other backend runs. The other rows take the
native route where it applies (sigmoid selection without groups: csrc/route_cpu.cc) and
the native top-k elsewhere.

Run::

    python benchmarks/routing.py --repeats 20
    python benchmarks/routing.py --shapes 0 --repeats 50   # the goal shape only

Goal (issues 15 and 28): ``x @ W`` + route (ids and weights) at most 1.15x the bare matmul
at every shape. The first lines say which CPU, vector extensions and threads measured
them, and each shape which router kernel its ``x@W + route`` program holds.

Measurements behind ``sigmoid_moe/topk.py``'s portable path (2 CPU cores, float32,
2026-11/12): XLA:CPU's ``TopK`` spends about 9 ns per element, more than the router
matmul it follows. At ``[16384, 128]`` k=8 the k-round formulation took 10.8 ms (the
router matmul 50 ms): a plain row max is 0.4 ms, but each round compares the row with the
previous round's reduced value, and XLA materialises that broadcast (the reduce and its
broadcast form one fusion whose output is the full block) before the select and the next
reduction, so a round costs about four passes over the block. Blocks of about 128 KiB of
rows were 2-4x faster than whole arrays at ``[4096, 256]`` and ``[16384, 128]``. The wide
formulation (chunks of 16, one chunk rescanned per round) took ``[8192, 384]`` k=8 from
34 ms to 11.7 ms (``lax.top_k``: 14 ms) and ``[4096, 896]`` k=16 from 113 to 23 ms. Tried
and slower: the chunked formulation at 128 columns (16-34 ms over chunks of 8-32 and
blocks of 64-256 rows); a sorted top-k list per row with the columns inserted one by
one, rows as vector lanes (``fori_loop``: 130-520 ms; unrolled, it did not finish
compiling).
"""

from __future__ import annotations

import argparse
import os
import statistics
from unittest import mock

import jax
import jax.numpy as jnp
from _machine import describe, kernels_in
from _timing import paired_rounds

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
        # The portable path with lax.top_k in it (the native route would not call it).
        with (
            mock.patch.dict(os.environ, {"SIGMOID_MOE_NATIVE": "0"}),
            mock.patch.object(routing_module, "top_k", _lax_top_k),
        ):
            lax = compile_all()
        calls["x@W + route[lax]"] = lambda: lax["routed"](x, w, bias)
        calls["route alone[lax]"] = lambda: lax["route alone"](logits, bias)
        calls["top-k alone[lax]"] = lambda: lax["top-k alone"](logits)

    bare_call = calls.pop("bare x@W")
    results = paired_rounds(bare_call, calls, args.repeats)
    bare_times = [t for base, _ in results.values() for t in base.wall]
    label = f"{tokens}x{d_model}x{num_experts}, k={k}, " + (
        f"{groups}g/{kept}" if groups > 1 else "no groups"
    )
    print(f"{label}: {kernels_in(ours['routed ids+w'].as_text()).split(', ')[1]}")
    rows = [("bare x@W", bare_times, None)]
    rows += [(name, cand.wall, base.wall) for name, (base, cand) in results.items()]
    for name, times, base in rows:
        ratio = min_ratio = ""
        if base is not None and name.startswith(("x@W", "ids+w")):
            ratios = [c / b for c, b in zip(times, base, strict=True)]
            ratio = f"{statistics.median(ratios):5.3f} ({min(ratios):4.2f}-{max(ratios):4.2f})"
            min_ratio = f"{min(times) / min(base):5.3f}"
        median_ms = statistics.median(times) * 1e3
        print(f"{label:<30} {name:<23} {median_ms:10.3f} {ratio:>18} {min_ratio:>8}")
        label = ""
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per variant")
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

    print(describe())
    print(f"{args.repeats} calls of each variant, each right after a bare matmul")
    header = (
        f"{'tokens x d x E, k, groups':<30} {'variant':<23} {'median ms':>10} "
        f"{'x bare (min-max)':>18} {'min/min':>8}"
    )
    print(header)
    print("-" * len(header))
    for shape in shapes:
        _measure(shape, args)


if __name__ == "__main__":
    main()
