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

from sigmoid_moe._cli_args import checked, choice, integer, listed, output_dir, real, usage_errors
from sigmoid_moe._rate_schedule import RATE_SCHEDULE_FORMS, check_rate_schedule, rate_schedule
from sigmoid_moe.metrics import BALANCE_FACTOR, BALANCE_WINDOW

__all__ = ["add_simulate_parser", "parse_schedule", "run_simulate"]


def parse_schedule(text: str, steps: int):
    """The rate multiplier ``step -> u(step) / u`` named by ``text`` (constant, cosine,
    freeze:N, warmup:N: :mod:`sigmoid_moe._rate_schedule`, the harness's meanings), or None
    for constant; ``ValueError`` for any other text."""
    if check_rate_schedule(text) == "constant":
        return None
    return rate_schedule(text, 1.0, steps)


def add_simulate_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the ``simulate`` command to an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser(
        "simulate",
        help="sweep bias-correction rules/rates/seeds on synthetic router logits",
        description="Balance lab: routes generated logits with the bias updated every step, "
        "as one jitted vmap over (rule, rate, seed); writes tables and plots.",
    )
    from sigmoid_moe.config import SCORE_FNS
    from sigmoid_moe.lab.rules import RULES

    count, index, std = integer(1), integer(0), real()
    p.add_argument("--out", default=None, help="output folder (default runs/simulate-<time>)")
    p.add_argument("--experts", type=count, default=256)
    p.add_argument("--top-k", type=count, default=8)
    p.add_argument("--groups", type=count, default=8)
    p.add_argument("--topk-groups", type=count, default=4)
    p.add_argument("--score-fn", choices=SCORE_FNS, default="sigmoid")
    p.add_argument("--tokens", type=count, default=4096, help="tokens per batch (counting scope)")
    p.add_argument("--steps", type=count, default=2000)
    p.add_argument(
        "--rules",
        type=listed(choice(RULES, "rule"), "rules", "sign,proportional"),
        default=["sign", "sign_zero_mean", "proportional"],
        help=f"comma list of: {', '.join(RULES)}",
    )
    rates = listed(real(), "numbers", "1e-3,1e-2")
    p.add_argument("--rates", type=rates, default=[1e-4, 1e-3, 1e-2])
    p.add_argument("--seeds", type=listed(index, "integers", "0,1"), default=[0, 1])
    p.add_argument(
        "--schedule",
        type=checked(check_rate_schedule),
        default="constant",
        help=f"how the rate changes over the steps: {RATE_SCHEDULE_FORMS} (cosine decays to 0)",
    )
    p.add_argument(
        "--threshold",
        type=real(positive=True),
        default=BALANCE_FACTOR,
        help="MaxVio_batch counted as balanced, as a multiple of the uniform floor (steps to "
        f"balance: its running mean over {BALANCE_WINDOW} steps stays below it; default "
        f"{BALANCE_FACTOR:g})",
    )
    g = p.add_argument_group("stream")
    g.add_argument("--preference-std", type=std, default=1.0)
    g.add_argument("--rank", type=index, default=16)
    g.add_argument("--rank-std", type=std, default=1.0)
    g.add_argument("--noise-std", type=std, default=0.0)
    g.add_argument("--drift-period", type=index, default=0)
    g.add_argument("--domains", type=count, default=1)
    g.add_argument("--shift-every", type=index, default=0)
    g.add_argument("--seq-len", type=count, default=1)
    g.add_argument("--seq-std", type=std, default=0.0)
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=run_simulate)
    return p


def run_simulate(args: argparse.Namespace) -> int:
    """Runs the sweep described by ``args`` and writes the outputs; returns 0."""
    import jax

    from sigmoid_moe._extras import require_research
    from sigmoid_moe.config import RouterConfig
    from sigmoid_moe.lab.report import markdown_table, save_run, summarize
    from sigmoid_moe.lab.simulate import grid, sweep
    from sigmoid_moe.lab.streams import StreamConfig

    with usage_errors():
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
    if not args.no_plots:
        require_research("sigmoid-moe simulate without --no-plots", "matplotlib")
    rules, rates, seeds = grid(args.rules, args.rates, args.seeds)
    out = str(output_dir(args.out or os.path.join("runs", time.strftime("simulate-%Y%m%d-%H%M%S"))))
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
    summary = summarize(trajectory, top_k=args.top_k, factor=args.threshold)
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
        factor=args.threshold,
        plots=not args.no_plots,
    )
    print(markdown_table(summary, rules, rates, seeds, factor=args.threshold))
    print(
        f"{len(rules)} configs x {args.steps} steps x {args.tokens} tokens in {seconds:.1f} s "
        f"({routed / seconds:,.0f} routed tokens/s, compile included)"
    )
    print("wrote " + ", ".join(paths))
    return 0
