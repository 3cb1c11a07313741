"""Summaries, tables and plots of lab trajectories (NumPy/matplotlib, outside jit).

Per configuration, from a :class:`~sigmoid_moe.lab.simulate.Trajectory` of S steps:

- ``steps_to_balance``: :func:`sigmoid_moe.metrics.steps_to_balance`, the training
  harness's definition: the first step after which the running mean of MaxVio_batch over
  ``window`` steps stays below ``factor`` times ``floor``; -1 if never.
- ``steady_maxvio``: mean MaxVio_batch over the last 25% of steps (LFB eq. 4,
  arXiv 2408.15664), reported next to ``floor`` = :func:`sigmoid_moe.uniform_maxvio_floor`
  for the same tokens/experts/top-k: no rule can beat uniform random routing's noise.
- ``steady_slope`` and ``still_falling``: :func:`sigmoid_moe.metrics.trend` over five
  windows of that last 25% (slope per step; True when its 95% interval is below 0).
- ``oscillation``: std over the last 25% of steps of each expert's centred bias
  ``b_i - mean_j b_j`` (a constant shift changes no selection), averaged over experts.
- ``drift``: change of ``mean_j b_j`` from the first to the last step (the sign rule
  drifts because the numbers of over- and under-loaded experts differ).
- ``bias_range``: ``max_i b_i - min_i b_i`` at the last step.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from sigmoid_moe._extras import require_research
from sigmoid_moe.metrics import (
    BALANCE_FACTOR,
    BALANCE_WINDOW,
    steps_to_balance,
    trend,
    uniform_maxvio_floor,
)

__all__ = ["Summary", "summarize", "markdown_table", "save_plots", "save_run"]


class Summary(NamedTuple):
    """Per-configuration figures; every field is ``[C]`` (or ``[]`` for one trajectory)."""

    steps_to_balance: np.ndarray  # [C] int, -1 when never reached
    steady_maxvio: np.ndarray  # [C] float mean MaxVio_batch over the last 25%
    steady_slope: np.ndarray  # [C] float its trend, MaxVio per step
    still_falling: np.ndarray  # [C] bool the trend's 95% interval is below 0
    floor: np.ndarray  # [C] float uniform-routing MaxVio at the same sizes
    oscillation: np.ndarray  # [C] float std of the centred bias over the last 25%
    drift: np.ndarray  # [C] float mean bias, last step minus first
    bias_range: np.ndarray  # [C] float max - min bias at the last step


def summarize(
    trajectory,
    *,
    top_k: int,
    factor: float = BALANCE_FACTOR,
    window: int = BALANCE_WINDOW,
) -> Summary:
    """Computes :class:`Summary` for a trajectory with or without a leading C axis;
    ``factor`` and ``window`` define "balanced" (:func:`~sigmoid_moe.metrics.steps_to_balance`)."""
    vio_cs = np.asarray(trajectory.max_violation, np.float64)
    load_cse = np.asarray(trajectory.load)
    bias_cse = np.asarray(trajectory.bias, np.float64)
    steps, num_experts = load_cse.shape[-2], load_cse.shape[-1]
    tail = max(1, steps // 4)
    tokens = int(load_cse[(0,) * (load_cse.ndim - 1)].sum()) // top_k  # exact: k per token
    floor = uniform_maxvio_floor(tokens, num_experts, top_k)
    rows = vio_cs.reshape(-1, steps)
    reach = [steps_to_balance(v, floor, factor=factor, window=window) for v in rows]
    trends = [trend(v, window=max(1, tail // 5)) for v in rows]
    batch = vio_cs.shape[:-1]
    centred = bias_cse - bias_cse.mean(axis=-1, keepdims=True)
    oscillation = centred[..., -tail:, :].std(axis=-2).mean(axis=-1)
    mean_bias = bias_cse.mean(axis=-1)
    return Summary(
        steps_to_balance=np.array([-1 if r is None else r for r in reach]).reshape(batch),
        steady_maxvio=vio_cs[..., -tail:].mean(axis=-1),
        steady_slope=np.array([t.slope for t in trends]).reshape(batch),
        still_falling=np.array([t.verdict == "still falling" for t in trends]).reshape(batch),
        floor=np.full(batch, floor),
        oscillation=oscillation,
        drift=mean_bias[..., -1] - mean_bias[..., 0],
        bias_range=bias_cse[..., -1, :].max(axis=-1) - bias_cse[..., -1, :].min(axis=-1),
    )


def markdown_table(
    summary: Summary,
    rules: Sequence[str],
    rates: Sequence[float],
    seeds: Sequence[int],
    *,
    factor: float = BALANCE_FACTOR,
) -> str:
    """One Markdown row per configuration (``factor``: the multiple of the floor that
    :func:`summarize` counted as balanced)."""
    head = (
        f"| rule | rate | seed | steps to balance (<{factor:g}x floor) | steady MaxVio | "
        "trend /100 steps | uniform floor | oscillation | drift | bias range |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for c, (rule, rate, seed) in enumerate(zip(rules, rates, seeds, strict=True)):
        reach = int(summary.steps_to_balance[c])
        rows.append(
            f"| {rule} | {rate:g} | {seed} | {reach if reach >= 0 else 'never'} | "
            f"{summary.steady_maxvio[c]:.3f} | {100 * summary.steady_slope[c]:+.4f}"
            f"{' still falling' if summary.still_falling[c] else ''} | {summary.floor[c]:.3f} | "
            f"{summary.oscillation[c]:.2e} | {summary.drift[c]:+.2e} | "
            f"{summary.bias_range[c]:.3f} |"
        )
    return head + "\n".join(rows) + "\n"


def _label(rule: str, rate: float, seed: int) -> str:
    return f"{rule} u={rate:g} s{seed}"


def save_plots(trajectory, summary: Summary, rules, rates, seeds, out_dir: str) -> list[str]:
    """Writes ``maxvio.png`` (all configurations) and ``bias.png`` (centred bias per config).
    Needs matplotlib (the ``[research]`` extra)."""
    require_research("sigmoid_moe.lab.save_plots", "matplotlib")
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a laptop run or CI
    import matplotlib.pyplot as plt

    vio_cs = np.asarray(trajectory.max_violation)
    bias_cse = np.asarray(trajectory.bias)
    paths = []
    fig, ax = plt.subplots(figsize=(9, 5))
    for c in range(vio_cs.shape[0]):
        ax.plot(vio_cs[c], lw=0.8, label=_label(rules[c], rates[c], seeds[c]))
    ax.axhline(summary.floor[0], color="k", ls="--", lw=1, label="uniform-routing floor")
    ax.set(yscale="log", xlabel="step", ylabel="MaxVio_batch", title="Load imbalance per batch")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "maxvio.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    cols = min(3, bias_cse.shape[0])
    rows_n = -(-bias_cse.shape[0] // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 2.6 * rows_n), squeeze=False)
    for c in range(bias_cse.shape[0]):
        ax = axes[c // cols][c % cols]
        centred = bias_cse[c] - bias_cse[c].mean(axis=-1, keepdims=True)
        ax.plot(centred[:, :16], lw=0.5)  # 16 experts keep the panel readable
        ax.set_title(_label(rules[c], rates[c], seeds[c]), fontsize=8)
        ax.tick_params(labelsize=6)
    for c in range(bias_cse.shape[0], rows_n * cols):
        axes[c // cols][c % cols].axis("off")
    fig.suptitle("Centred bias of experts 0-15 per step")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "bias.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def save_run(
    trajectory,
    summary: Summary,
    rules,
    rates,
    seeds,
    out_dir: str,
    meta: dict,
    *,
    factor: float = BALANCE_FACTOR,
    plots: bool = True,
) -> list[str]:
    """Writes ``summary.md``, ``summary.json``, ``trajectory.npz`` and (optionally) plots."""
    os.makedirs(out_dir, exist_ok=True)
    table = markdown_table(summary, rules, rates, seeds, factor=factor)
    paths = [
        os.path.join(out_dir, name) for name in ("summary.md", "summary.json", "trajectory.npz")
    ]
    with open(paths[0], "w") as f:
        f.write("# Balance lab run\n\n```\n" + json.dumps(meta, indent=1) + "\n```\n\n" + table)
    records = [
        {
            "rule": r,
            "rate": u,
            "seed": s,
            **{k: np.asarray(v)[c].item() for k, v in summary._asdict().items()},
        }
        for c, (r, u, s) in enumerate(zip(rules, rates, seeds, strict=True))
    ]
    with open(paths[1], "w") as f:
        json.dump({"meta": meta, "configs": records}, f, indent=1)
    np.savez_compressed(
        paths[2],
        max_violation=np.asarray(trajectory.max_violation),
        load=np.asarray(trajectory.load),
        bias=np.asarray(trajectory.bias),
    )
    if plots:
        paths += save_plots(trajectory, summary, rules, rates, seeds, out_dir)
    return paths
