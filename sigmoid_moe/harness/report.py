"""The comparison's Markdown report and PNG plots (matplotlib, Agg backend).

``write_report(out_dir, summary)`` reads ``results.json``'s summary (one run per strategy
and seed) and each run's ``metrics.jsonl`` / ``eval.jsonl``, and writes ``report.md`` plus
the :data:`PLOTS` into ``out_dir``. Every number is a mean over seeds with its spread and
every comparison is paired by seed (:mod:`sigmoid_moe.harness.stats`); the claims section
is computed, never written by hand. Each strategy keeps one colour, line style and marker
in every plot (:func:`styles`).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np

from sigmoid_moe.harness.stats import (
    ALPHA,
    LEVEL,
    LOSS_MARGIN,
    SD_MIN_SEEDS,
    Metric,
    band,
    claims,
    dead_experts,
    frontier,
    group_runs,
    metric_value,
    paired,
    reference_strategy,
    specialisation_mi,
    strategy_fields,
    summarize,
    t_test,
    table_error_bound,
)

__all__ = ["PLOTS", "results_table", "styles", "write_report"]

PLOTS = (
    "maxvio_steps.png",
    "val_loss_steps.png",
    "bias_trajectories.png",
    "load_heatmap.png",
    "batch_curve.png",
    "pareto.png",
    "interference.png",
)

SPREAD_NOTE = (
    f"Each cell: the mean over seeds, then the spread: [min, max] for fewer than "
    f"{SD_MIN_SEEDS} seeds, ± sd (ddof 1) for {SD_MIN_SEEDS} or more; a single seed shows "
    "its value alone (1 seed, no spread)."
)

# matplotlib's tab20, its ten dark shades first, then the ten light ones: 20 distinct colours
_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
    "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)  # fmt: skip
_LINES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p", "8", "d", "H", "1")


def styles(names: Sequence[str]) -> dict[str, dict]:
    """One matplotlib style per strategy, distinct in colour *and* line style *and* marker
    (colours cycle every 20, line styles every 4, markers every 16), so no two strategies
    look alike even where their curves coincide."""
    return {
        name: {
            "color": _COLOURS[i % len(_COLOURS)],
            "ls": _LINES[i % len(_LINES)],
            "marker": _MARKERS[i % len(_MARKERS)],
        }
        for i, name in enumerate(names)
    }


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


def _trend_cell(runs: Sequence[dict]) -> str:
    """Mean slope of MaxVio_batch per 100 steps over the last windows, and how many seeds'
    intervals say it is still falling (or rising)."""
    trends = [r.get("maxvio_batch_trend") for r in runs]
    if any(t is None for t in trends):
        return "n/a"
    slope = summarize([100 * t["slope"] for t in trends])
    falling = sum(t["verdict"] == "still falling" for t in trends)
    rising = sum(t["verdict"] == "still rising" for t in trends)
    words = [f"{falling} of {len(runs)} still falling"] if falling else []
    words += [f"{rising} of {len(runs)} rising"] if rising else []
    return f"{slope.mean:+.3f}/100 steps, " + (", ".join(words) or "flat")


def results_table(results: list[dict]) -> str:
    """The Markdown results table: one row per strategy, each metric as mean and spread
    over its seeds (see ``SPREAD_NOTE``), and a last row with the uniform-routing floors."""
    head = (
        "| strategy | balancing | seeds | val loss (nats/byte) | PPL (per byte) "
        "| MaxVio_global (val) | MaxVio_global (train windows) | MaxVio_batch steady "
        "| its trend | MaxVio_batch late sd | steps to balance | dead experts "
        "| specialisation MI (bits) | run s |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: "
        "| ---: | ---: |\n"
    )
    rows = []
    for name, runs in group_runs(results).items():
        s = strategy_fields(runs[0])
        rows.append(
            f"| {name} | {runs[0]['kind']}, {s['balance_scope']} | {len(runs)} "
            f"| {_cell(runs, 'val_loss', '.4f')} | {_cell(runs, 'val_ppl', '.3f')} "
            f"| {_cell(runs, 'maxvio_global')} | {_cell(runs, 'maxvio_global_train')} "
            f"| {_cell(runs, 'maxvio_batch_steady')} | {_trend_cell(runs)} "
            f"| {_cell(runs, 'maxvio_batch_late_std')} "
            f"| {_cell(runs, 'steps_to_balance', '.0f', 'never')} "
            f"| {_cell(runs, dead_experts, '.1f')} | {_cell(runs, specialisation_mi, '.4f')} "
            f"| {_cell(runs, 'seconds', '.0f')} |"
        )
    rows.append(
        f"| uniform floor | | | | | {_floor(results, 'maxvio_global_floor', '.3f')} "
        f"| {_floor(results, 'maxvio_global_floor', '.3f')} "
        f"| {_floor(results, 'maxvio_batch_floor', '.3f')} | | | | | "
        f"{_floor(results, 'specialisation_mi_floor', '.4f')} | |"
    )
    return head + "\n".join(rows) + "\n"


def _domain_loss_table(groups: dict[str, list[dict]]) -> str:
    domains = list(next(iter(groups.values()))[0].get("val_loss_per_domain", {}))
    if not domains:
        return "(these runs predate per-domain validation loss)\n"
    lines = [
        "| strategy | " + " | ".join(f"val loss, {d}" for d in domains) + " |",
        "| --- |" + " ---: |" * len(domains),
    ]
    for name, runs in groups.items():
        cells = [_cell(runs, lambda r, d=d: r["val_loss_per_domain"][d], ".4f") for d in domains]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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


def _interval(p, spec: str, unit: str = "") -> str:
    """``"+0.0123 nats/byte (95% CI [+0.0050, +0.0196], 3 seeds)"``, or what ``p.fmt``
    says below two seeds."""
    if p.n < 2:
        return p.fmt(spec, unit)
    t = t_test(p)
    unit = f" {unit}" if unit else ""
    return f"{p.mean:{spec}}{unit} ({LEVEL:.0%} CI [{t.low:{spec}}, {t.high:{spec}}], {p.n} seeds)"


def _comparisons(groups: dict[str, list[dict]]) -> list[str]:
    """One sentence per strategy against the reference loss-free strategy (the first
    strategy when there is none), paired by seed, on val loss and MaxVio_global."""
    ref = reference_strategy(groups) or next(iter(groups))
    lines = [
        f"Each strategy minus `{ref}`, paired by seed, with the {LEVEL:.0%} t interval of the "
        "mean difference (descriptive: the claims above are the corrected tests):",
        "",
    ]
    for name, runs in groups.items():
        if name == ref:
            continue
        loss = paired(runs, groups[ref], "val_loss")
        vio = paired(runs, groups[ref], "maxvio_global")
        lines.append(
            f"- `{name}`: val loss {_interval(loss, '+.4f', 'nats/byte')}; "
            f"MaxVio_global {_interval(vio, '+.3f')}."
        )
    return lines


def _claims_table(rows) -> str:
    lines = ["| | claim | compared | verdict | figures |", "| --- | --- | --- | --- | --- |"]
    for c in rows:
        lines.append(f"| {c.key} | {c.claim} | {c.compared} | **{c.verdict}** | {c.figures} |")
    return "\n".join(lines) + "\n"


def _gate_frontiers(groups) -> dict[str, list[str]]:
    """Per gate, its aux-loss strategies at global scope (two or more: a frontier)."""
    out: dict[str, list[str]] = {}
    for name, runs in groups.items():
        s = strategy_fields(runs[0])
        if s["aux_coef"] > 0 and s["bias_rate"] == 0 and s["balance_scope"] == "global":
            out.setdefault(s["score_fn"], []).append(name)
    return {gate: names for gate, names in out.items() if len(names) >= 2}


def _pareto_table(groups) -> str:
    """Per strategy: the mean point on the loss-vs-balance plane and whether it is on its
    gate's frontier of means (aux strategies and no balancing)."""
    fronts = _gate_frontiers(groups)
    on_front = set()
    for gate, names in fronts.items():
        members = names + [
            n
            for n, runs in groups.items()
            if strategy_fields(runs[0])["score_fn"] == gate
            and strategy_fields(runs[0])["aux_coef"] == 0
            and strategy_fields(runs[0])["bias_rate"] == 0
        ]
        means = {
            n: (
                summarize([metric_value(r, "maxvio_global") for r in groups[n]]).mean,
                summarize([metric_value(r, "val_loss") for r in groups[n]]).mean,
            )
            for n in members
        }
        front = frontier(means.values())
        on_front |= {n for n, point in means.items() if point in front}
    lines = [
        "| strategy | gate | aux coef | bias rate | MaxVio_global (val) | val loss (nats/byte) "
        "| on its gate's aux frontier (means) |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, runs in groups.items():
        s = strategy_fields(runs[0])
        tag = "yes" if name in on_front else ("" if s["bias_rate"] > 0 else "no")
        lines.append(
            f"| {name} | {s['score_fn']} | {s['aux_coef']:g} | {s['bias_rate']:g} "
            f"| {_cell(runs, 'maxvio_global')} | {_cell(runs, 'val_loss', '.4f')} | {tag} |"
        )
    return "\n".join(lines) + "\n"


def _interference_table(series: dict[str, dict]) -> str:
    """Per aux strategy and layer: the mean cosine and norm ratio over the first and the
    second half of the logged steps (each a mean over seeds with its spread)."""
    lines = [
        "| strategy | layer | cosine, first half | cosine, second half "
        "| norm ratio aux/LM, first half | norm ratio, second half | logged steps |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, (steps, cos_sld, ratio_sld) in series.items():
        half = len(steps) // 2
        for layer in range(cos_sld.shape[2]):

            def cell(values, part, layer=layer):
                return summarize(values[:, part, layer].mean(axis=1)).fmt(".3f")

            first, second = slice(0, max(half, 1)), slice(half, None)
            lines.append(
                f"| {name} | {layer} | {cell(cos_sld, first)} | {cell(cos_sld, second)} "
                f"| {cell(ratio_sld, first)} | {cell(ratio_sld, second)} | {len(steps)} |"
            )
    return "\n".join(lines) + "\n"


def _aligned(series: list[dict[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """The steps every seed logged, and the ``[S, T]`` values at them."""
    steps = sorted(set.intersection(*(set(s) for s in series)))
    return np.array(steps), np.array([[s[t] for t in steps] for s in series], np.float64)


def _draw_band(ax, x, values_sn, label, style, markers: int = 10):
    mean, low, high = band(values_sn)
    every = max(1, len(x) // markers)
    (line,) = ax.plot(x, mean, label=label, markevery=every, ms=4, lw=1.2, **style)
    if values_sn.shape[0] > 1:
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15, lw=0)


def _band_title(groups) -> str:
    rules = {summarize([0.0] * len(runs)).rule for runs in groups.values()}
    if rules == {"1 seed"}:
        return "1 seed, no band"
    words = {"sd": "± sd", "min/max": "min/max", "1 seed": "none for 1 seed"}
    return "mean over seeds, band: " + ", ".join(words[r] for r in sorted(rules))


def _read_runs(groups) -> tuple[dict, dict, dict]:
    """From the runs' metrics: per strategy the per-seed ``{step: MaxVio_batch}`` (mean
    over layers); the first seed's ``(steps [T], bias [T, L, E])``; for runs that logged
    interference, ``(steps [T], cosine [S, T, L], norm ratio [S, T, L])``."""
    vio_by_step, first_bias, interference = {}, {}, {}
    for name, runs in groups.items():
        vio_by_step[name], cos, ratio = [], [], []
        for i, run in enumerate(runs):
            lines = _read_jsonl(pathlib.Path(run["run_dir"]) / "metrics.jsonl")
            vio_by_step[name].append({m["step"]: float(np.mean(m["maxvio"])) for m in lines})
            if i == 0:
                first_bias[name] = (
                    np.array([m["step"] for m in lines]),
                    np.array([m["bias"] for m in lines], np.float64),
                )
            logged = [m for m in lines if "aux_lm_cosine" in m]
            cos.append({m["step"]: m["aux_lm_cosine"] for m in logged})
            ratio.append({m["step"]: m["aux_lm_norm_ratio"] for m in logged})
            del lines
        steps = sorted(set.intersection(*(set(c) for c in cos)))
        if steps:
            interference[name] = (
                np.array(steps),
                np.array([[c[t] for t in steps] for c in cos], np.float64),
                np.array([[r[t] for t in steps] for r in ratio], np.float64),
            )
    return vio_by_step, first_bias, interference


def _legend(ax, count: int) -> None:
    """Inside the axes for a few strategies, to the right of them for many (where it
    would hide curves)."""
    if count <= 6:
        ax.legend(fontsize=6)
    else:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _plots(out: pathlib.Path, groups: dict, interference: dict, vio_by_step, first_bias) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = styles(list(groups))
    first = next(iter(groups.values()))[0]
    title = _band_title(groups)

    wide = (10.5 if len(groups) > 6 else 8, 4.5)
    fig, ax = plt.subplots(figsize=wide)
    for name, per_seed in vio_by_step.items():
        steps, vio = _aligned(per_seed)
        window = max(1, len(steps) // 50)
        smooth = np.array([_smooth(v, window) for v in vio])
        _draw_band(ax, steps[len(steps) - smooth.shape[1] :], smooth, name, style[name])
    floor = first["maxvio_batch_floor"]
    ax.axhline(floor, color="k", ls=":", label="uniform floor")
    factor = first.get("balance_factor")
    if factor:
        ax.axhline(factor * floor, color="k", ls="--", lw=0.8, label=f"{factor:g}x floor")
    ax.set(xlabel="step", ylabel="MaxVio_batch (mean over layers)", yscale="log")
    ax.set_title(f"Balance during training ({title})", fontsize=9)
    _legend(ax, len(groups))
    fig.tight_layout()
    fig.savefig(out / "maxvio_steps.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=wide)
    for name, runs in groups.items():
        evals = [_read_jsonl(pathlib.Path(r["run_dir"]) / "eval.jsonl") for r in runs]
        steps, loss = _aligned([{e["step"]: e["val_loss"] for e in ev} for ev in evals])
        _draw_band(ax, steps, loss, name, style[name], markers=len(steps))
    ax.set(xlabel="step", ylabel="validation loss (nats/byte)")
    ax.set_title(f"Validation loss over training, every validation window ({title})", fontsize=9)
    _legend(ax, len(groups))
    fig.tight_layout()
    fig.savefig(out / "val_loss_steps.png", dpi=110)
    plt.close(fig)

    _bias_plot(plt, out, groups, first_bias)

    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 1.8 * len(groups)), squeeze=False)
    for ax, name in zip(axes[:, 0], groups, strict=True):
        run_dir = pathlib.Path(groups[name][0]["run_dir"])
        lines = _read_jsonl(run_dir / "metrics.jsonl")
        steps = np.array([m["step"] for m in lines])
        load = np.array([m["load"][0] for m in lines], np.float64)
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

    fig, ax = plt.subplots(figsize=wide)
    for name, runs in groups.items():
        size = min(len(r["batch_curve"]["sizes"]) for r in runs)
        vio = np.array([r["batch_curve"]["maxvio"][:size] for r in runs], np.float64)
        sizes = runs[0]["batch_curve"]["sizes"][:size]
        _draw_band(ax, sizes, vio, name, style[name], markers=size)
    ax.plot(first["batch_curve"]["sizes"], first["batch_curve"]["floor"], "k:", label="floor")
    ax.set(xscale="log", yscale="log", xlabel="computation batch (tokens)", ylabel="MaxVio")
    ax.set_title(f"MaxVio over computation batches, validation, bias frozen ({title})", fontsize=9)
    _legend(ax, len(groups))
    fig.tight_layout()
    fig.savefig(out / "batch_curve.png", dpi=110)
    plt.close(fig)

    _pareto_plot(plt, out, groups, style)
    _interference_plot(plt, out, interference, style, title)


def _bias_plot(plt, out, groups, first_bias) -> None:
    """Per loss-free strategy (rows) and layer (columns), the first seed's centred bias
    ``b_i - mean_j b_j`` per step; the most and least loaded experts (validation load,
    two each when E > 8, all when E <= 8) drawn in colour and labelled, the others grey."""
    biased = [n for n, runs in groups.items() if runs[0]["strategy"]["bias_rate"] > 0]
    biased = biased or list(groups)[:1]
    layers = first_bias[biased[0]][1].shape[1]
    fig, axes = plt.subplots(
        len(biased), layers, figsize=(4.2 * layers, 2.8 * len(biased)), squeeze=False
    )
    for row, name in enumerate(biased):
        steps, bias_tle = first_bias[name]
        run = groups[name][0]
        for layer in range(layers):
            ax = axes[row, layer]
            centred = bias_tle[:, layer] - bias_tle[:, layer].mean(axis=-1, keepdims=True)
            num_experts = centred.shape[1]
            frac = np.asarray(run["load_fraction"][layer])
            order = np.argsort(-frac, kind="stable")
            marked = order if num_experts <= 8 else np.concatenate([order[:2], order[-2:]])
            for e in range(num_experts):
                if e not in marked:
                    ax.plot(steps, centred[:, e], color="0.8", lw=0.5)
            for rank, e in enumerate(marked):
                share = f"{frac[e]:.3f}"
                ax.plot(steps, centred[:, e], lw=1.1, label=f"e{e} (val share {share})",
                        color=_COLOURS[rank % len(_COLOURS)])  # fmt: skip
            ax.set_title(f"{name}, seed {run.get('seed', 0)}, layer {layer}", fontsize=8)
            ax.set(xlabel="step", ylabel="bias - mean bias")
            ax.legend(fontsize=5)
    fig.suptitle("Bias per expert (most and least loaded on validation in colour)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "bias_trajectories.png", dpi=110)
    plt.close(fig)


def _errorbar(ax, runs, style, label, annotate: str | None):
    vio = summarize([metric_value(r, "maxvio_global") for r in runs])
    loss = summarize([metric_value(r, "val_loss") for r in runs])
    ax.errorbar(
        vio.mean, loss.mean,
        xerr=[[vio.mean - vio.low], [vio.high - vio.mean]],
        yerr=[[loss.mean - loss.low], [loss.high - loss.mean]],
        color=style["color"], marker=style["marker"], ms=6, capsize=2, lw=1, label=label,
    )  # fmt: skip
    if annotate:
        ax.annotate(annotate, (vio.mean, loss.mean), fontsize=6, xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
    return vio.mean, loss.mean


def _pareto_plot(plt, out, groups, style) -> None:
    """Validation loss against MaxVio_global: each strategy's mean with its seed spread in
    both directions; per gate the aux-loss sweep joined in coefficient order (thin) and
    its frontier of means (thick)."""
    fronts = _gate_frontiers(groups)
    fig, ax = plt.subplots(figsize=(10.5 if len(groups) > 4 else 8, 5.5))
    for gate, names in fronts.items():
        points = []
        for name in sorted(names, key=lambda n: strategy_fields(groups[n][0])["aux_coef"]):
            coef = strategy_fields(groups[name][0])["aux_coef"]
            points.append(_errorbar(ax, groups[name], style[name], name, f"{coef:g}"))
        ax.plot(*zip(*points, strict=True), color="0.6", lw=0.6)
        front = frontier(points)
        gate_line = "-" if gate == "sigmoid" else "--"
        ax.plot(*zip(*front, strict=True), color="k", ls=gate_line, lw=1.6, alpha=0.6,
                label=f"{gate} aux frontier (means)")  # fmt: skip
    for name, runs in groups.items():
        s = strategy_fields(runs[0])
        if name in {n for names in fronts.values() for n in names}:
            continue
        tag = f"{s['score_fn']} u={s['bias_rate']:g}" if s["bias_rate"] > 0 else None
        _errorbar(ax, runs, style[name], name, tag)
    first = next(iter(groups.values()))[0]
    ax.axvline(first["maxvio_global_floor"], color="k", ls=":", lw=0.8, label="uniform floor")
    ax.set(xscale="log", xlabel="MaxVio_global (validation, bias frozen; log)",
           ylabel="validation loss (nats/byte)")  # fmt: skip
    seeds = min(len(runs) for runs in groups.values())
    spread = "± sd" if seeds >= SD_MIN_SEEDS else ("min/max" if seeds > 1 else "none, 1 seed")
    ax.set_title(f"Loss against balance: the aux-loss dilemma (bars: seed {spread})", fontsize=9)
    _legend(ax, len(groups) + len(fronts) + 1)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)


def _interference_plot(plt, out, interference, style, title) -> None:
    """Per layer: the cosine between the aux-loss and LM gradients on the router weights,
    and the norm ratio |g_aux| / |g_LM| (log), over the logged steps."""
    if not interference:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "no aux-loss run logged interference", ha="center", va="center")
        ax.axis("off")
        fig.savefig(out / "interference.png", dpi=110)
        plt.close(fig)
        return
    layers = next(iter(interference.values()))[1].shape[2]
    extra = 2.5 if len(interference) > 6 else 0  # room for the legend
    fig, axes = plt.subplots(2, layers, figsize=(4.5 * layers + extra, 6), squeeze=False)
    for name, (steps, cos, ratio) in interference.items():
        for layer in range(layers):
            window = max(1, len(steps) // 20)
            for ax, values in ((axes[0, layer], cos), (axes[1, layer], ratio)):
                smooth = np.array([_smooth(v, window) for v in values[:, :, layer]])
                _draw_band(ax, steps[len(steps) - smooth.shape[1] :], smooth, name, style[name])
    for layer in range(layers):
        axes[0, layer].axhline(0, color="k", lw=0.6)
        axes[0, layer].set(title=f"layer {layer}: cosine(g_aux, g_LM), router weights",
                           xlabel="step")  # fmt: skip
        axes[1, layer].set(title=f"layer {layer}: |g_aux| / |g_LM|", xlabel="step",
                           yscale="log")  # fmt: skip
        axes[0, layer].title.set_fontsize(8)
        axes[1, layer].title.set_fontsize(8)
    _legend(axes[0, -1], len(interference))
    fig.suptitle(f"Aux-loss against language-model gradient ({title})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "interference.png", dpi=110)
    plt.close(fig)


_SPLITS = {
    "spread": "held-out windows spread through each domain (in-distribution)",
    "tail": "the tail of each domain's byte stream: a domain-shift probe, not in-distribution",
}


def data_note(base: dict, data: dict) -> str:
    """What the data was: per domain the bytes the config asked for (built-in corpus) and
    the bytes it got, saying so where a domain got less."""
    got: dict[str, int] = {}
    for f in data["files"]:
        got[f["domain"]] = got.get(f["domain"], 0) + int(f["bytes"])
    asked = {}
    if not base.get("data", {}).get("paths"):
        asked = {d: base["data"].get(f"{d}_bytes") for d in ("code", "prose")}
    parts = []
    for domain, size in got.items():
        want = asked.get(domain)
        if want is None:
            parts.append(f"{domain} {size:,} bytes")
        elif size < want:
            parts.append(f"{domain} {size:,} bytes (**asked for {want:,}**: all there is)")
        else:
            parts.append(f"{domain} {size:,} bytes (as asked)")
    return "; ".join(parts)


def _smoke_line(summary: dict) -> str | None:
    from sigmoid_moe.harness.presets import PRESETS

    preset = PRESETS.get(summary.get("preset") or "")
    if preset is None or not preset.smoke:
        return None
    return (
        f"**Smoke test, not evidence.** The `{summary['preset']}` preset checks that training, "
        "evaluation, the report and the plots run end to end in seconds; its runs are far too "
        "short for the bias or the aux loss to balance anything, so no number below says "
        "anything about balancing."
    )


def write_report(out_dir: str | pathlib.Path, summary: dict) -> pathlib.Path:
    """Writes ``report.md`` and the plots for a :func:`~sigmoid_moe.harness.compare`
    summary (``{"base_config", "data", "seeds", "preset", "results"}``, one result per
    strategy and seed). Returns the report's path."""
    out = pathlib.Path(out_dir)
    results = summary["results"]
    groups = group_runs(results)
    vio_by_step, first_bias, interference = _read_runs(groups)
    _plots(out, groups, interference, vio_by_step, first_bias)
    base, data = summary["base_config"], summary["data"]
    model = base["model"]
    seeds = summary.get("seeds") or sorted({r.get("seed", 0) for r in results})
    split = _SPLITS.get(data.get("val_split"), "")
    steady = sorted({r["steady_steps"] for r in results})
    first = results[0]
    factor, window = first.get("balance_factor"), first.get("balance_window")
    rows = claims(results, run_steps=base["steps"])
    families, bound = table_error_bound(rows)
    smoke = _smoke_line(summary)
    lines = [smoke, ""] if smoke else []
    lines += [
        "# Balancing strategies compared",
        "",
        f"{model['num_layers']} layers, d_model {model['d_model']}, {model['num_experts']} experts "
        f"top-{model['top_k']} (d_ff {model['d_ff']}), seq_len {model['seq_len']}, batch "
        f"{base['batch_size']} sequences, {base['steps']} steps; seeds "
        f"{', '.join(str(s) for s in seeds)} ({len(seeds)} per strategy)"
        + (f", preset `{summary['preset']}`" if summary.get("preset") else "")
        + f". Data: {len(data['files'])} files: {data_note(base, data)}; "
        f"{data['val_windows']} validation windows"
        + (f", {split}" if split else "")
        + ". Sources and sha256: `results.json`.",
        "",
        "## How to read the numbers",
        "",
        f"- {SPREAD_NOTE}",
        "- val loss is in nats per byte, over every validation window (the curves in "
        "`val_loss_steps.png` use the same windows). PPL = exp(val loss) is per **byte** (a "
        "byte-level model), so its size is not comparable with the paper's per-token PPL "
        "(9.50 for LFB 1B); compare ratios between strategies only.",
        "- MaxVio_global (LFB eq. 4): load summed over the whole validation set, bias frozen, "
        "mean over layers; (train windows): the same on a seeded sample of training windows "
        "with as many tokens. A gap between the two is a distribution shift, not imbalance.",
        f"- MaxVio_batch steady: the mean over the last {', '.join(map(str, steady))} training "
        "steps; its trend: the least-squares slope of the means of the last five such windows "
        f"(per 100 steps, mean over seeds), *still falling* when a seed's {LEVEL:.0%} t "
        "interval of the slope is below 0; late sd: the standard deviation in the last window "
        "(jitter).",
        f"- Steps to balance: the first step after which the running mean of MaxVio_batch "
        f"over {window} steps stays below {factor:g}x the uniform floor of MaxVio_batch "
        "(never: not by the end of the run); the balance lab uses the same definition "
        "(`sigmoid_moe.metrics.steps_to_balance`). Dead experts: zero load over the "
        "validation set, summed over layers. Specialisation MI: I(domain; expert) in bits, "
        "mean over layers, next to its value under independence at this sample size (the "
        "floor row).",
        "- The uniform floor: what perfectly uniform random routing shows at the same token count.",
        "",
        "## Results",
        "",
        results_table(results),
        "## Validation loss per domain",
        "",
        _domain_loss_table(groups),
        "## Claims",
        "",
        f"Computed from the table's runs (the rules: `sigmoid_moe.harness.stats.claims`). Every "
        f"row is a paired t test over the seeds the strategies share ({LEVEL:.0%} interval of "
        f"the mean difference). The rows of one claim (one letter) are Holm-corrected "
        f"together: **yes** / **no** when the Holm-adjusted p is at most {ALPHA:.2f} and the "
        "difference lies on the claimed / the other side; **inconclusive** otherwise (rerun "
        'with more seeds). "No worse" is a non-inferiority test with a margin of '
        f"**{LOSS_MARGIN:g} nats/byte**: **yes** when the loss difference is significantly "
        "below the margin, **no** when significantly above it. Error rate: when no "
        f"strategy differs (every true difference at its threshold), each claim gives a yes "
        f"or no with probability at most {ALPHA:.0%}, and this table of {families} tested "
        f"claims any false yes or no with probability at most {bound:.0%} (union bound; "
        "checked by simulation in `tests/test_report.py`).",
        "",
        _claims_table(rows),
    ]
    fronts = _gate_frontiers(groups)
    if fronts:
        lines += [
            "## The dilemma: loss against balance",
            "",
            "Each point is a strategy's mean over seeds; per gate, the aux-loss frontier is "
            "the set of aux (and no-balancing) strategies that no other beats in both "
            "MaxVio_global and validation loss. Claim g tests each loss-free strategy against "
            "the frontier seed by seed, interpolating in log MaxVio_global between the "
            "frontier's runs and holding the end values beyond them (`pareto.png`).",
            "",
            _pareto_table(groups),
        ]
    if interference:
        lines += [
            "## Interference: the aux-loss gradient against the language-model gradient",
            "",
            "On the router weights of each layer, every `interference_every` steps (from the "
            "parameters and batch of that step, before its update): the cosine between the "
            "gradient of the aux loss and that of the cross-entropy (negative: the aux loss "
            "pulls against the language model), and the ratio of their norms "
            "(`interference.png`).",
            "",
            _interference_table(interference),
        ]
    lines += [
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
        "![validation loss against MaxVio_global](pareto.png)",
        "![aux-loss against LM gradient](interference.png)",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
