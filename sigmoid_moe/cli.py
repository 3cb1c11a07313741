"""Command line: ``sigmoid-moe <command>``."""

from __future__ import annotations

import argparse
import gc
import os
import sys
import traceback
from collections.abc import Sequence

from sigmoid_moe._cli_args import integer, real, run, usage_errors

__all__ = ["entry", "main"]


def _demo(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sigmoid_moe import (
        RouterConfig,
        expert_load,
        load_stats,
        route,
        uniform_maxvio_floor,
        update_bias,
    )

    with usage_errors():
        config = RouterConfig(
            num_experts=args.experts,
            top_k=args.top_k,
            num_groups=args.groups,
            topk_groups=args.topk_groups,
            route_scale=args.route_scale,
        )
    key_x, key_w, key_pref = jax.random.split(jax.random.key(args.seed), 3)
    # A skewed router: some experts are preferred by every token, as early in training.
    x_td = jax.random.normal(key_x, (args.tokens, args.d_model))
    w_de = jax.random.normal(key_w, (args.d_model, args.experts)) / np.sqrt(args.d_model)
    preference_e = args.skew * jax.random.normal(key_pref, (args.experts,))
    logits_te = x_td @ w_de + preference_e

    step = jax.jit(
        lambda bias: (lambda r: (r, expert_load(r.expert_ids, config.num_experts)))(
            route(logits_te, bias, config)
        )
    )
    bias = jnp.zeros((config.num_experts,), jnp.float32)
    routing, load = step(bias)

    print(
        f"Routing {args.tokens} tokens to {config.num_experts} experts, top-{config.top_k}", end=""
    )
    if config.group_limited:
        print(f", {config.topk_groups} of {config.num_groups} groups", end="")
    print(f", route_scale {config.route_scale}.\n")
    print("token | experts (weight)")
    for t in range(min(args.show, args.tokens)):
        pairs = ", ".join(
            f"{int(e):3d} ({float(w):.3f})"
            for e, w in zip(routing.expert_ids[t], routing.weights[t], strict=True)
        )
        print(f"{t:5d} | {pairs}")

    floor = uniform_maxvio_floor(args.tokens, config.num_experts, config.top_k)
    initial_load = load
    initial = load_stats(load)
    for _ in range(args.steps):
        bias = update_bias(bias, load, rate=args.rate)
        routing, load = step(bias)
    final = load_stats(load)
    print(f"\nload per expert, bias 0:        {np.asarray(initial_load).tolist()}")
    print(f"load per expert, {args.steps} updates: {np.asarray(load).tolist()}")
    print(f"\n{'':28s}{'MaxVio':>8s}{'CV':>8s}{'idle':>6s}")
    rows = [("bias 0", initial), (f"after {args.steps} sign updates", final)]
    for name, stats in rows:
        print(
            f"{name:28s}{float(stats.max_violation):8.3f}"
            f"{float(stats.coefficient_of_variation):8.3f}{int(stats.idle_experts):6d}"
        )
    print(f"{'uniform random routing':28s}{floor:8.3f}")
    print(f"\nbias range after updates: [{float(bias.min()):+.4f}, {float(bias.max()):+.4f}]")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sigmoid-moe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="route random tokens and balance them with the bias")
    count, index = integer(1), integer(0)
    demo.add_argument("--tokens", type=count, default=4096)
    demo.add_argument("--d-model", type=count, default=64)
    demo.add_argument("--experts", type=count, default=16)
    demo.add_argument("--top-k", type=count, default=2)
    demo.add_argument("--groups", type=count, default=4)
    demo.add_argument("--topk-groups", type=count, default=2)
    demo.add_argument("--route-scale", type=real(positive=True), default=1.0)
    demo.add_argument(
        "--skew", type=real(), default=1.0, help="std of a fixed per-expert preference"
    )
    demo.add_argument("--rate", type=real(), default=1e-3)
    demo.add_argument("--steps", type=index, default=300)
    demo.add_argument("--show", type=index, default=8, help="rows of the routing table to print")
    demo.add_argument("--seed", type=index, default=0)
    demo.set_defaults(func=_demo)

    from sigmoid_moe.lab.cli import add_simulate_parser

    add_simulate_parser(sub)

    from sigmoid_moe._extras import add_unavailable_parser, require_research
    from sigmoid_moe.errors import MissingExtraError

    try:
        require_research("sigmoid-moe compare")
    except MissingExtraError as missing:  # the core install: every other command works
        add_unavailable_parser(sub, "compare", "the main job (research harness)", missing)
    else:
        from sigmoid_moe.harness.cli import add_compare_parser

        add_compare_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``sigmoid-moe``: bad input exits 2 with one line (see
    :mod:`sigmoid_moe._cli_args`); an internal error keeps its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _build_parser().parse_args(argv)
    # This command again, as a new process: a multi-process launch starts one per process.
    args.relaunch = [sys.executable, "-m", "sigmoid_moe.cli", *argv]
    return run(args.command, lambda: args.func(args))


def entry() -> None:
    """The ``sigmoid-moe`` console script: :func:`main`, except that a command that fails
    (any exit status but 0: a signal, bad input, a bug, whose traceback is printed) ends
    the process at once, skipping the interpreter's teardown: XLA compile threads
    interrupted mid-compile can crash it (a segfault printed after the one line), and in a
    multi-process job it would wait for peers that are gone."""
    try:
        code = main()
    except SystemExit as exit_:
        code = exit_.code
    except BaseException:  # a bug: its traceback, then exit 1
        traceback.print_exc()
        code = 1
    if code:
        if not isinstance(code, int):  # SystemExit("message"), as sys.exit prints it
            print(code, file=sys.stderr)
            code = 1
        # Objects the command held are freed first, so their finalizers run: the worker
        # pools' semaphores are released (else multiprocessing's resource tracker warns).
        gc.collect()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(0)


if __name__ == "__main__":
    entry()
