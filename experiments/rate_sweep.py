"""Sweep the loss-free bias rate and rule on the default preset's model and data.

    python experiments/rate_sweep.py --out runs/rate-sweep --steps 800

Writes the same report as ``sigmoid-moe compare`` (one run per rate x rule, plus the
aux-loss and no-balancing baselines), over the default preset's seeds.
"""

from __future__ import annotations

import argparse
import dataclasses

from sigmoid_moe.harness import PRESETS, compare
from sigmoid_moe.harness.report import results_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/rate-sweep")
    parser.add_argument("--steps", type=int, default=PRESETS["default"].base.steps)
    parser.add_argument("--rates", default="1e-4,1e-3,1e-2")
    parser.add_argument("--rules", default="sign,sign_zero_mean,proportional")
    args = parser.parse_args()
    preset = PRESETS["default"]
    base = dataclasses.replace(preset.base, steps=args.steps)
    strategies = preset.strategies(
        bias_rates=[float(r) for r in args.rates.split(",")], rules=args.rules.split(",")
    )
    results = compare(base, strategies, args.out, seeds=preset.seeds)
    print(results_table(results))


if __name__ == "__main__":
    main()
