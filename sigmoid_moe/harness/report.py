"""The comparison's Markdown report and PNG plots (matplotlib, Agg backend).

``write_report(out_dir, summary)`` reads ``results.json``'s summary (one run per strategy
and seed) and each run's ``metrics.jsonl`` / ``eval.jsonl``, and writes ``report.md`` plus
the :data:`PLOTS` into ``out_dir``. Every number is a mean over seeds with its spread and
every comparison is paired by seed (:mod:`sigmoid_moe.harness.stats`); the claims section
is computed, never written by hand.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np

from sigmoid_moe.harness.stats import (
    SD_MIN_SEEDS,
    Metric,
    band,
    claims,
    dead_experts,
    group_runs,
    metric_value,
    paired,
    reference_strategy,
    specialisation_mi,
    strategy_fields,
    summarize,
)

__all__ = ["PLOTS", "results_table", "write_report"]

PLOTS = (
    "maxvio_steps.png",
    "val_loss_steps.png",
    "bias_trajectories.png",
    "load_heatmap.png",
    "batch_curve.png",
)

SPREAD_NOTE = (
    f"Each cell: the mean over seeds, then the spread: [min, max] for fewer than "
    f"{SD_MIN_SEEDS} seeds, ± sd (ddof 1) for {SD_MIN_SEEDS} or more; a single seed shows "
    "its value alone (1 seed, no spread)."
)


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window < 2:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def _cell(runs: Sequence[dict], metric: Metric, spec: str = ".3f", missing="missing") -> str:
    return summarize([metric_value(r, metric) for r in runs]).fmt(spec, missing)


def _floor(results: Sequence[dict], key: str, spec: str) -> str:
    return format(float(np.mean([r[key] for r in results])), spec)


def results_table(results: list[dict]) -> str:
    """The Markdown results table: one row per strategy, each metric as mean and spread
    over its seeds (see ``SPREAD_NOTE``), and a last row with the uniform-routing floors."""
    head = (
        "| strategy | balancing | seeds | val loss (nats/byte) | PPL (per byte) "
        "| MaxVio_global (val) | MaxVio_global (train windows) | MaxVio_batch steady "
        "| MaxVio_batch late sd | steps to balance | dead experts | specialisation MI (bits) "
        "| run s |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |\n"
    )
    rows = []
    for name, runs in group_runs(results).items():
        s = strategy_fields(runs[0])
        rows.append(
            f"| {name} | {runs[0]['kind']}, {s['balance_scope']} | {len(runs)} "
            f"| {_cell(runs, 'val_loss', '.4f')} | {_cell(runs, 'val_ppl', '.3f')} "
            f"| {_cell(runs, 'maxvio_global')} | {_cell(runs, 'maxvio_global_train')} "
            f"| {_cell(runs, 'maxvio_batch_steady')} | {_cell(runs, 'maxvio_batch_late_std')} "
            f"| {_cell(runs, 'steps_to_balance', '.0f', 'never')} "
            f"| {_cell(runs, dead_experts, '.1f')} | {_cell(runs, specialisation_mi, '.4f')} "
            f"| {_cell(runs, 'seconds', '.0f')} |"
        )
    rows.append(
        f"| uniform floor | | | | | {_floor(results, 'maxvio_global_floor', '.3f')} "
        f"| {_floor(results, 'maxvio_global_floor', '.3f')} "
        f"| {_floor(results, 'maxvio_batch_floor', '.3f')} | | | | "
        f"{_floor(results, 'specialisation_mi_floor', '.4f')} | |"
    )
    return head + "\n".join(rows) + "\n"


def _per_layer_table(groups: dict[str, list[dict]]) -> str:
    lines = [
        "| strategy | layer | MaxVio_global (val) | MaxVio_global (train windows) "
        "| MaxVio_batch steady | dead experts | specialisation MI (bits) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, runs in groups.items():
        for layer in range(len(runs[0]["maxvio_global_per_layer"])):

            def at(key: str, layer=layer):
                return lambda r: r[key][layer]

            lines.append(
                f"| {name} | {layer} | {_cell(runs, at('maxvio_global_per_layer'))} "
                f"| {_cell(runs, at('maxvio_global_train_per_layer'))} "
                f"| {_cell(runs, at('maxvio_batch_steady_per_layer'))} "
                f"| {_cell(runs, at('dead_experts_per_layer'), '.1f')} "
                f"| {_cell(runs, at('specialisation_mi_per_layer'), '.4f')} |"
            )
    return "\n".join(lines) + "\n"


def _curve_table(groups: dict[str, list[dict]]) -> str:
    sizes = next(iter(groups.values()))[0]["batch_curve"]["sizes"]
    lines = [
        "| strategy | " + " | ".join(str(s) for s in sizes) + " |",
        "| --- |" + " ---: |" * len(sizes),
    ]
    for name, runs in groups.items():
        cells = [
            _cell(runs, lambda r, i=i: r["batch_curve"]["maxvio"][i]) for i in range(len(sizes))
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    floor = next(iter(groups.values()))[0]["batch_curve"]["floor"]
    lines.append("| uniform floor | " + " | ".join(f"{v:.3f}" for v in floor) + " |")
    return "\n".join(lines) + "\n"


def _fraction_table(groups: dict[str, list[dict]]) -> str:
    num_experts = len(next(iter(groups.values()))[0]["load_fraction"][0])
    head = "| strategy | " + " | ".join(f"e{e}" for e in range(num_experts)) + " |\n"
    head += "| --- |" + " ---: |" * num_experts + "\n"
    rows = []
    for name, runs in groups.items():
        frac = np.mean([np.mean(r["load_fraction"], axis=0) for r in runs], axis=0)
        rows.append(f"| {name} | " + " | ".join(f"{f:.3f}" for f in frac) + " |")
    return head + "\n".join(rows) + "\n"


def _domain_table(groups: dict[str, list[dict]]) -> str:
    lines = [
        "| strategy | domain | validation tokens | top experts, layer 0, first seed "
        "(share of the domain's assignments) |",
        "| --- | --- | ---: | --- |",
    ]
    for name, runs in groups.items():
        first = runs[0]
        for domain, frac_le in first["domain_fraction"].items():
            frac = np.asarray(frac_le[0])
            order = np.argsort(-frac, kind="stable")[:4]
            top = ", ".join(f"e{e} {frac[e]:.2f}" for e in order)
            tokens = first.get("domain_tokens", {}).get(domain, "")
            lines.append(f"| {name} | {domain} | {tokens} | {top} |")
    return "\n".join(lines) + "\n"


def _judged(p, spec: str, unit: str = "") -> str:
    """The paired figures and, from two seeds on, whether they exceed the seed spread."""
    if p.n < 2:  # fmt says "no seed in common" / "(1 seed, no spread)"
        return p.fmt(spec, unit)
    return f"{p.fmt(spec, unit)}: " + (
        "exceeds the seed spread" if p.exceeds else "within the seed spread"
    )


def _comparisons(groups: dict[str, list[dict]]) -> list[str]:
    """One sentence per strategy against the reference loss-free strategy (the first
    strategy when there is none), paired by seed, on val loss and MaxVio_global."""
    ref = reference_strategy(groups) or next(iter(groups))
    lines = [
        f"Each strategy minus `{ref}`, paired by seed (± the sd of the paired differences):",
        "",
    ]
    for name, runs in groups.items():
        if name == ref:
            continue
        loss = paired(runs, groups[ref], "val_loss")
        vio = paired(runs, groups[ref], "maxvio_global")
        lines.append(
            f"- `{name}`: val loss {_judged(loss, '+.4f', 'nats/byte')}; "
            f"MaxVio_global {_judged(vio, '+.3f')}."
        )
    return lines


def _claims_table(results: list[dict], run_steps: int) -> str:
    lines = ["| | claim | compared | verdict | figures |", "| --- | --- | --- | --- | --- |"]
    for c in claims(results, run_steps=run_steps):
        lines.append(f"| {c.key} | {c.claim} | {c.compared} | **{c.verdict}** | {c.figures} |")
    return "\n".join(lines) + "\n"


def _aligned(series: list[dict[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """The steps every seed logged, and the ``[S, T]`` values at them."""
    steps = sorted(set.intersection(*(set(s) for s in series)))
    return np.array(steps), np.array([[s[t] for t in steps] for s in series], np.float64)


def _draw_band(ax, x, values_sn, label, **kw):
    mean, low, high = band(values_sn)
    (line,) = ax.plot(x, mean, label=label, **kw)
    if values_sn.shape[0] > 1:
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, lw=0)


def _band_title(groups) -> str:
    rules = {summarize([0.0] * len(runs)).rule for runs in groups.values()}
    if rules == {"1 seed"}:
        return "1 seed, no band"
    words = {"sd": "± sd", "min/max": "min/max", "1 seed": "none for 1 seed"}
    return "mean over seeds, band: " + ", ".join(words[r] for r in sorted(rules))


def _plots(out: pathlib.Path, groups: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vio_by_step = {}  # name -> per seed {step: MaxVio_batch, mean over layers}
    layer0 = {}  # name -> first seed's (steps [T], bias [T, E], load [T, E]) of layer 0
    for name, runs in groups.items():
        vio_by_step[name] = []
        for i, run in enumerate(runs):
            lines = _read_jsonl(pathlib.Path(run["run_dir"]) / "metrics.jsonl")
            vio_by_step[name].append({m["step"]: float(np.mean(m["maxvio"])) for m in lines})
            if i == 0:
                layer0[name] = (
                    np.array([m["step"] for m in lines]),
                    np.array([m["bias"][0] for m in lines], np.float64),
                    np.array([m["load"][0] for m in lines], np.float64),
                )
            del lines
    first = next(iter(groups.values()))[0]
    title = _band_title(groups)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, per_seed in vio_by_step.items():
        steps, vio = _aligned(per_seed)
        window = max(1, len(steps) // 50)
        smooth = np.array([_smooth(v, window) for v in vio])
        _draw_band(ax, steps[len(steps) - smooth.shape[1] :], smooth, name)
    ax.axhline(first["maxvio_batch_floor"], color="k", ls=":", label="uniform floor")
    ax.set(xlabel="step", ylabel="MaxVio_batch (mean over layers)", yscale="log")
    ax.set_title(f"Balance during training ({title})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "maxvio_steps.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, runs in groups.items():
        evals = [_read_jsonl(pathlib.Path(r["run_dir"]) / "eval.jsonl") for r in runs]
        steps, loss = _aligned([{e["step"]: e["val_loss"] for e in ev} for ev in evals])
        _draw_band(ax, steps, loss, name, marker="o", ms=3)
    ax.set(xlabel="step", ylabel="validation loss (nats/byte)")
    ax.set_title(f"Validation loss (subset) over training ({title})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "val_loss_steps.png", dpi=110)
    plt.close(fig)

    biased = [n for n, runs in groups.items() if runs[0]["strategy"]["bias_rate"] > 0]
    biased = biased or list(groups)
    fig, axes = plt.subplots(1, len(biased), figsize=(4 * len(biased), 3.5), squeeze=False)
    for ax, name in zip(axes[0], biased, strict=True):
        steps, bias, _ = layer0[name]
        ax.plot(steps, bias, lw=0.8)
        ax.set(xlabel="step", ylabel="bias (layer 0)")
        ax.set_title(f"{name}, seed {groups[name][0].get('seed', 0)}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bias_trajectories.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 1.8 * len(groups)), squeeze=False)
    for ax, name in zip(axes[:, 0], groups, strict=True):
        steps, _, load = layer0[name]
        frac = load / np.maximum(load.sum(axis=1, keepdims=True), 1)  # [T, E]
        im = ax.imshow(
            frac.T, aspect="auto", interpolation="nearest", cmap="viridis",
            extent=(steps[0], steps[-1], frac.shape[1] - 0.5, -0.5),
        )  # fmt: skip
        ax.set_ylabel("expert")
        seed = groups[name][0].get("seed", 0)
        ax.set_title(f"{name}, seed {seed}: load share per step (layer 0)", fontsize=8)
        fig.colorbar(im, ax=ax, pad=0.01)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "load_heatmap.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, runs in groups.items():
        size = min(len(r["batch_curve"]["sizes"]) for r in runs)
        vio = np.array([r["batch_curve"]["maxvio"][:size] for r in runs], np.float64)
        _draw_band(ax, runs[0]["batch_curve"]["sizes"][:size], vio, name, marker="o", ms=3)
    ax.plot(first["batch_curve"]["sizes"], first["batch_curve"]["floor"], "k:", label="floor")
    ax.set(xscale="log", yscale="log", xlabel="computation batch (tokens)", ylabel="MaxVio")
    ax.set_title(f"MaxVio over computation batches, validation, bias frozen ({title})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "batch_curve.png", dpi=110)
    plt.close(fig)


_SPLITS = {
    "spread": "held-out windows spread through each domain (in-distribution)",
    "tail": "the tail of each domain's byte stream: a domain-shift probe, not in-distribution",
}


def write_report(out_dir: str | pathlib.Path, summary: dict) -> pathlib.Path:
    """Writes ``report.md`` and the plots for a :func:`~sigmoid_moe.harness.compare`
    summary (``{"base_config", "data", "seeds", "preset", "results"}``, one result per
    strategy and seed). Returns the report's path."""
    out = pathlib.Path(out_dir)
    results = summary["results"]
    groups = group_runs(results)
    _plots(out, groups)
    base, data = summary["base_config"], summary["data"]
    model = base["model"]
    seeds = summary.get("seeds") or sorted({r.get("seed", 0) for r in results})
    size = sum(f["bytes"] for f in data["files"])
    split = _SPLITS.get(data.get("val_split"), "")
    steady = sorted({r["steady_steps"] for r in results})
    lines = [
        "# Balancing strategies compared",
        "",
        f"{model['num_layers']} layers, d_model {model['d_model']}, {model['num_experts']} experts "
        f"top-{model['top_k']} (d_ff {model['d_ff']}), seq_len {model['seq_len']}, batch "
        f"{base['batch_size']} sequences, {base['steps']} steps; seeds "
        f"{', '.join(str(s) for s in seeds)} ({len(seeds)} per strategy)"
        + (f", preset `{summary['preset']}`" if summary.get("preset") else "")
        + f". Data: {len(data['files'])} files ({size:,} bytes), domains "
        f"{', '.join(data['domains'])}; {data['val_windows']} validation windows"
        + (f", {split}" if split else "")
        + ". Sources and sha256: `results.json`.",
        "",
        "## How to read the numbers",
        "",
        f"- {SPREAD_NOTE} Differences between strategies are paired by seed (same "
        "initialisation and data order) and given as mean ± sd of the paired differences. A "
        "difference *exceeds the seed spread* when every seed's difference has the same sign "
        "and |mean| > sd; one seed never does. This is a screen, not a significance test: with "
        "no true difference it still passes about 21% of the time at 3 seeds (5% at 5).",
        "- val loss is in nats per byte. PPL = exp(val loss) is per **byte** (a byte-level "
        "model), so its size is not comparable with the paper's per-token PPL (9.50 for "
        "LFB 1B); compare ratios between strategies only.",
        "- MaxVio_global (LFB eq. 4): load summed over the whole validation set, bias frozen, "
        "mean over layers; (train windows): the same on a seeded sample of training windows "
        "with as many tokens. A gap between the two is a distribution shift, not imbalance.",
        f"- MaxVio_batch steady: the mean over the last {', '.join(map(str, steady))} training "
        "steps; late sd: its standard deviation there (jitter); steps to balance: the first "
        "step whose running-mean MaxVio_batch is within 1.25x of the steady value (never: "
        "not reached within the run). Dead experts: zero load over the validation set, summed "
        "over layers. Specialisation MI: I(domain; expert) in bits, mean over layers, next "
        "to its value under independence at this sample size (the floor row).",
        "- The uniform floor: what perfectly uniform random routing shows at the same token count.",
        "",
        "## Results",
        "",
        results_table(results),
        "## Claims",
        "",
        "Computed from the table's runs (the rules: `sigmoid_moe.harness.stats.claims`). "
        "**yes** / **no**: the paired difference exceeds the seed spread in the claimed / the "
        "opposite direction; **within noise**: it does not (for a 'no worse' claim that is "
        "consistent with the claim, not a confirmation of a gain); **1 seed, no spread**: "
        "rerun with more seeds; **not measured**: the strategies the claim needs did not run.",
        "",
        _claims_table(results, base["steps"]),
        "## Paired comparisons",
        "",
        *_comparisons(groups),
        "",
        "## Per-layer balance",
        "",
        _per_layer_table(groups),
        "## MaxVio over computation-batch sizes (validation, bias frozen)",
        "",
        _curve_table(groups),
        "## Which experts each domain uses",
        "",
        _domain_table(groups),
    ]
    if model["num_experts"] <= 16:
        lines += [
            "## Token fraction per expert (validation, mean over layers and seeds)",
            "",
            _fraction_table(groups),
        ]
    lines += [
        "## Plots",
        "",
        "![MaxVio over steps](maxvio_steps.png)",
        "![validation loss over steps](val_loss_steps.png)",
        "![bias trajectories](bias_trajectories.png)",
        "![expert load heatmap](load_heatmap.png)",
        "![MaxVio over computation-batch sizes](batch_curve.png)",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
