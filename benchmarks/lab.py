"""Balance-lab speed: routed tokens per second of a vmapped sweep on CPU.

Goal (issue 7): 18 configurations x 2000 steps x 4096 tokens x 256 experts (8 groups,
4 kept, top-8) within 5 minutes on 2 CPU cores. Run::

    python benchmarks/lab.py                 # scaled-down grid + extrapolation
    python benchmarks/lab.py --full          # also the full sweep once (minutes)

Each measurement excludes compilation (a warm-up call with another seed first). Time
per routed token is reported against tokens per batch and against experts, and the full
goal is extrapolated from the 4096 x 256 point (per-step cost is linear in steps and
in configurations).
"""

from __future__ import annotations

import argparse
import os
import time

import jax

from sigmoid_moe import RouterConfig
from sigmoid_moe.lab import StreamConfig, sweep

RULES = ["sign", "sign_zero_mean", "proportional"]  # x 3 rates x 2 seeds = 18 configs


def measure(tokens: int, experts: int, configs: int, steps: int) -> float:
    """Seconds per sweep of ``configs`` x ``steps`` (compiled beforehand)."""
    groups = 8 if experts >= 64 else 1
    router = RouterConfig(
        num_experts=experts, top_k=8, num_groups=groups, topk_groups=4 if groups > 1 else 1
    )
    stream = StreamConfig(num_tokens=tokens, num_experts=experts)
    rules = [RULES[c % 3] for c in range(configs)]
    rates = [1e-3 * (1 + c // 3 % 3) for c in range(configs)]
    run = lambda seed: jax.block_until_ready(  # noqa: E731
        sweep(
            stream,
            router,
            rules=rules,
            rates=rates,
            seeds=[seed + c // 9 for c in range(configs)],
            steps=steps,
        )
    )
    run(100)
    start = time.perf_counter()
    run(0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--configs", type=int, default=18)
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args()
    print(f"devices: {jax.devices()}, cpu count: {os.cpu_count()}, load: {os.getloadavg()}")
    print(
        f"{'tokens':>7} {'experts':>7} {'s/sweep':>8} {'us/config-step':>15} {'routed tok/s':>13}"
    )
    results = {}
    for tokens, experts in ((1024, 256), (2048, 256), (4096, 256), (4096, 64), (4096, 128)):
        sec = measure(tokens, experts, args.configs, args.steps)
        per_step = sec / (args.configs * args.steps)
        results[tokens, experts] = per_step
        print(
            f"{tokens:7d} {experts:7d} {sec:8.2f} {per_step * 1e6:15.0f} {tokens / per_step:13,.0f}"
        )
    goal = results[4096, 256] * 18 * 2000
    print(f"extrapolated goal sweep (18 x 2000 x 4096 x 256): {goal:.0f} s (goal 300 s)")
    if args.full:
        sec = measure(4096, 256, 18, 2000)
        print(f"full goal sweep measured: {sec:.0f} s, {18 * 2000 * 4096 / sec:,.0f} routed tok/s")


if __name__ == "__main__":
    main()
