"""Why is sigmoid + aux loss worse than softmax + aux loss here? A gate ablation.

    python experiments/gate_ablation.py --out runs/gate-ablation

On the default preset's model, data and seeds it trains both gates with no balancing, with
the aux loss at the preset's coefficient and at a tenth of it, so the report's paired
differences separate the gate itself (``softmax+none`` vs ``sigmoid+none``) from the aux
loss's effect on each gate. Writes the same report as ``sigmoid-moe compare``.
"""

from __future__ import annotations

import argparse

from sigmoid_moe.harness import PRESETS, Strategy, compare
from sigmoid_moe.harness.report import results_table


def strategies(coef: float) -> list[Strategy]:
    small = coef / 10
    return [
        Strategy("softmax+none", "softmax"),
        Strategy("sigmoid+none", "sigmoid"),
        Strategy(f"softmax+aux({coef:g})", "softmax", coef),
        Strategy(f"sigmoid+aux({coef:g})", "sigmoid", coef),
        Strategy(f"softmax+aux({small:g})", "softmax", small),
        Strategy(f"sigmoid+aux({small:g})", "sigmoid", small),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gate-ablation")
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args()
    preset = PRESETS["default"]
    results = compare(
        preset.base,
        strategies(preset.aux_coefs[0]),
        args.out,
        seeds=preset.seeds,
        preset="default (gate ablation)",
        jobs=args.jobs,
    )
    print(results_table(results))


if __name__ == "__main__":
    main()
