"""``sigmoid-moe simulate``: a balance-lab sweep from the command line.

Wire it into :mod:`sigmoid_moe.cli` with ``add_simulate_parser(sub)``; the parser's
default ``func`` is :func:`run_simulate`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

__all__ = ["add_simulate_parser", "parse_schedule", "run_simulate"]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _words(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_schedule(text: str, steps: int):
    """``constant`` | ``freeze:N`` (V3: rate until N, then 0) | ``cosine`` | ``warmup:N``.

    Returns an optax schedule ``step -> multiplier of the rate`` or None for constant.
    """
    import optax

    name, _, arg = text.partition(":")
    if name == "constant":
        return None
    if name == "freeze" and arg:
        return optax.piecewise_constant_schedule(1.0, {int(arg): 0.0})
    if name == "cosine":
        return optax.cosine_decay_schedule(1.0, steps)
    if name == "warmup" and arg:
        return optax.linear_schedule(0.0, 1.0, int(arg))
    raise ValueError(
        f"--schedule={text!r} is not understood; use constant, freeze:N, cosine or warmup:N."
    )


def add_simulate_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the ``simulate`` command to an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser(
        "simulate",
        help="sweep bias-correction rules/rates/seeds on synthetic router logits",
        description="Balance lab: routes generated logits with the bias updated every step, "
        "as one jitted vmap over (rule, rate, seed); writes tables and plots.",
    )
    from sigmoid_moe.config import SCORE_FNS

    p.add_argument("--out", default=None, help="output folder (default runs/simulate-<time>)")
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--topk-groups", type=int, default=4)
    p.add_argument("--score-fn", choices=SCORE_FNS, default="sigmoid")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per batch (counting scope)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument(
        "--rules",
        type=_words,
        default=["sign", "sign_zero_mean", "proportional"],
        help="comma list of: sign, sign_zero_mean, proportional, multiplicative, "
        "quantile, aux_loss, negated",
    )
    p.add_argument("--rates", type=_floats, default=[1e-4, 1e-3, 1e-2])
    p.add_argument("--seeds", type=_ints, default=[0, 1])
    p.add_argument("--schedule", default="constant", help="constant | freeze:N | cosine | warmup:N")
    p.add_argument("--threshold", type=float, default=0.2, help="MaxVio_batch counted as balanced")
    g = p.add_argument_group("stream")
    g.add_argument("--preference-std", type=float, default=1.0)
    g.add_argument("--rank", type=int, default=16)
    g.add_argument("--rank-std", type=float, default=1.0)
    g.add_argument("--noise-std", type=float, default=0.0)
    g.add_argument("--drift-period", type=int, default=0)
    g.add_argument("--domains", type=int, default=1)
    g.add_argument("--shift-every", type=int, default=0)
    g.add_argument("--seq-len", type=int, default=1)
    g.add_argument("--seq-std", type=float, default=0.0)
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=run_simulate)
    return p


def run_simulate(args: argparse.Namespace) -> int:
    """Runs the sweep described by ``args`` and writes the outputs; returns 0."""
    import jax

    from sigmoid_moe.config import RouterConfig
    from sigmoid_moe.lab.report import markdown_table, save_run, summarize
    from sigmoid_moe.lab.simulate import grid, sweep
    from sigmoid_moe.lab.streams import StreamConfig

    router = RouterConfig(
        num_experts=args.experts,
        top_k=args.top_k,
        score_fn=args.score_fn,
        num_groups=args.groups,
        topk_groups=args.topk_groups,
    )
    stream = StreamConfig(
        num_tokens=args.tokens,
        num_experts=args.experts,
        preference_std=args.preference_std,
        rank=args.rank,
        rank_std=args.rank_std,
        noise_std=args.noise_std,
        drift_period=args.drift_period,
        num_domains=args.domains,
        shift_every=args.shift_every,
        seq_len=args.seq_len,
        seq_std=args.seq_std,
    )
    schedule = parse_schedule(args.schedule, args.steps)
    rules, rates, seeds = grid(args.rules, args.rates, args.seeds)
    out = args.out or os.path.join("runs", time.strftime("simulate-%Y%m%d-%H%M%S"))
    start = time.perf_counter()
    trajectory = jax.block_until_ready(
        sweep(
            stream,
            router,
            rules=rules,
            rates=rates,
            seeds=seeds,
            steps=args.steps,
            schedule=schedule,
        )
    )
    seconds = time.perf_counter() - start
    summary = summarize(trajectory, top_k=args.top_k, threshold=args.threshold)
    routed = len(rules) * args.steps * args.tokens
    meta = {
        "router": dataclasses.asdict(router),
        "stream": dataclasses.asdict(stream),
        "schedule": args.schedule,
        "configs": len(rules),
        "seconds_incl_compile": round(seconds, 2),
        "routed_tokens_per_s": round(routed / seconds),
    }
    meta = json.loads(json.dumps(meta, default=str))
    paths = save_run(
        trajectory,
        summary,
        rules,
        rates,
        seeds,
        out,
        meta,
        threshold=args.threshold,
        plots=not args.no_plots,
    )
    print(markdown_table(summary, rules, rates, seeds, threshold=args.threshold))
    print(
        f"{len(rules)} configs x {args.steps} steps x {args.tokens} tokens in {seconds:.1f} s "
        f"({routed / seconds:,.0f} routed tokens/s, compile included)"
    )
    print("wrote " + ", ".join(paths))
    return 0
