"""The comparison's Markdown report and PNG plots (matplotlib, Agg backend).

``write_report(out_dir, summary)`` reads each run's ``metrics.jsonl`` / ``eval.jsonl`` and
writes ``report.md`` plus ``maxvio_steps.png``, ``val_loss_steps.png``,
``bias_trajectories.png``, ``load_heatmap.png`` and ``batch_curve.png`` into ``out_dir``.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

__all__ = ["PLOTS", "results_table", "write_report"]

PLOTS = (
    "maxvio_steps.png",
    "val_loss_steps.png",
    "bias_trajectories.png",
    "load_heatmap.png",
    "batch_curve.png",
)


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window < 2:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def results_table(results: list[dict]) -> str:
    """The Markdown results table (one row per strategy)."""
    head = (
        "| strategy | balancing | val loss | val PPL | MaxVio_global | floor (global) "
        "| mean MaxVio_batch | floor (batch) | run s |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    rows = [
        f"| {r['name']} | {r['kind']} | {r['val_loss']:.4f} | {r['val_ppl']:.3f} "
        f"| {r['maxvio_global']:.3f} | {r['maxvio_global_floor']:.3f} "
        f"| {r['maxvio_batch_mean']:.3f} | {r['maxvio_batch_floor']:.3f} | {r['seconds']:.0f} |"
        for r in results
    ]
    return head + "\n".join(rows) + "\n"


def _fraction_table(results: list[dict]) -> str:
    num_experts = len(results[0]["load_fraction"][0])
    head = "| strategy | " + " | ".join(f"e{e}" for e in range(num_experts)) + " |\n"
    head += "| --- |" + " ---: |" * num_experts + "\n"
    rows = []
    for r in results:
        frac = np.mean(np.asarray(r["load_fraction"]), axis=0)
        rows.append(f"| {r['name']} | " + " | ".join(f"{f:.3f}" for f in frac) + " |")
    return head + "\n".join(rows) + "\n"


def _domain_table(results: list[dict]) -> str:
    lines = [
        "| strategy | domain | top experts (share of the domain's assignments, layer 0) "
        "| share of its top E/4 experts (1/4 if spread evenly) |",
        "| --- | --- | --- | ---: |",
    ]
    for r in results:
        for domain, frac_le in r["domain_fraction"].items():
            frac = np.asarray(frac_le[0])
            order = np.argsort(-frac, kind="stable")[:4]
            top = ", ".join(f"e{e} {frac[e]:.2f}" for e in order)
            share = float(np.sort(frac)[::-1][: max(1, len(frac) // 4)].sum())
            lines.append(f"| {r['name']} | {domain} | {top} | {share:.2f} |")
    return "\n".join(lines) + "\n"


def _plots(out: pathlib.Path, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(r, _read_jsonl(pathlib.Path(r["run_dir"]) / "metrics.jsonl")) for r in results]

    fig, ax = plt.subplots(figsize=(7, 4))
    for r, metrics in runs:
        steps = np.array([m["step"] for m in metrics])
        vio = np.array([np.mean(m["maxvio"]) for m in metrics])
        window = max(1, len(vio) // 50)
        sm = _smooth(vio, window)
        ax.plot(steps[len(steps) - len(sm) :], sm, label=r["name"])
    ax.axhline(results[0]["maxvio_batch_floor"], color="k", ls=":", label="uniform floor")
    ax.set(xlabel="step", ylabel="MaxVio_batch (mean over layers)", yscale="log")
    ax.set_title("Balance during training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "maxvio_steps.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ev = _read_jsonl(pathlib.Path(r["run_dir"]) / "eval.jsonl")
        ax.plot([e["step"] for e in ev], [e["val_loss"] for e in ev], marker="o", label=r["name"])
    ax.set(xlabel="step", ylabel="validation loss (nats/byte)")
    ax.set_title("Validation loss (subset) over training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "val_loss_steps.png", dpi=110)
    plt.close(fig)

    biased = [(r, m) for r, m in runs if r["strategy"]["bias_rate"] > 0] or runs
    fig, axes = plt.subplots(1, len(biased), figsize=(4 * len(biased), 3.5), squeeze=False)
    for ax, (r, metrics) in zip(axes[0], biased, strict=True):
        steps = [m["step"] for m in metrics]
        bias = np.array([m["bias"][0] for m in metrics])  # [T, E], layer 0
        ax.plot(steps, bias, lw=0.8)
        ax.set(title=r["name"], xlabel="step", ylabel="bias (layer 0)")
        ax.title.set_fontsize(8)
    fig.tight_layout()
    fig.savefig(out / "bias_trajectories.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 1.8 * len(runs)), squeeze=False)
    for ax, (r, metrics) in zip(axes[:, 0], runs, strict=True):
        load = np.array([m["load"][0] for m in metrics], np.float64)  # [T, E]
        frac = load / load.sum(axis=1, keepdims=True)
        im = ax.imshow(
            frac.T, aspect="auto", interpolation="nearest", cmap="viridis",
            extent=(metrics[0]["step"], metrics[-1]["step"], frac.shape[1] - 0.5, -0.5),
        )  # fmt: skip
        ax.set_ylabel("expert")
        ax.set_title(f"{r['name']}: load share per step (layer 0)", fontsize=8)
        fig.colorbar(im, ax=ax, pad=0.01)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "load_heatmap.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        curve = r["batch_curve"]
        ax.plot(curve["sizes"], curve["maxvio"], marker="o", label=r["name"])
    curve = results[0]["batch_curve"]
    ax.plot(curve["sizes"], curve["floor"], "k:", label="uniform floor")
    ax.set(xscale="log", yscale="log", xlabel="computation batch (tokens)", ylabel="MaxVio")
    ax.set_title("MaxVio over computation-batch sizes (validation, bias frozen)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "batch_curve.png", dpi=110)
    plt.close(fig)


def write_report(out_dir: str | pathlib.Path, summary: dict) -> pathlib.Path:
    """Writes ``report.md`` and the plots for a :func:`~sigmoid_moe.harness.compare`
    summary (``{"base_config", "data", "results"}``). Returns the report's path."""
    out = pathlib.Path(out_dir)
    results = summary["results"]
    _plots(out, results)
    base, data = summary["base_config"], summary["data"]
    model = base["model"]
    size = sum(f["bytes"] for f in data["files"])
    lines = [
        "# Balancing strategies compared",
        "",
        f"{model['num_layers']} layers, d_model {model['d_model']}, {model['num_experts']} experts "
        f"top-{model['top_k']} (d_ff {model['d_ff']}), seq_len {model['seq_len']}, batch "
        f"{base['batch_size']} sequences, {base['steps']} steps, seed {base['seed']}. Data: "
        f"{len(data['files'])} files ({size:,} bytes), domains {', '.join(data['domains'])}; "
        f"{data['val_windows']} validation windows. Sources and sha256: `results.json`.",
        "",
        "MaxVio_global: load summed over the whole validation set with the bias frozen (mean "
        "over layers); mean MaxVio_batch: over training steps. Each stands next to the MaxVio "
        "that perfectly uniform random routing shows at the same token count (the floor).",
        "",
        results_table(results),
        "## Plots",
        "",
        "![MaxVio over steps](maxvio_steps.png)",
        "![validation loss over steps](val_loss_steps.png)",
        "![bias trajectories](bias_trajectories.png)",
        "![expert load heatmap](load_heatmap.png)",
        "![MaxVio over computation-batch sizes](batch_curve.png)",
        "",
        "## MaxVio over computation-batch sizes",
        "",
        "| strategy | " + " | ".join(str(s) for s in results[0]["batch_curve"]["sizes"]) + " |",
        "| --- |" + " ---: |" * len(results[0]["batch_curve"]["sizes"]),
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | " + " | ".join(f"{v:.3f}" for v in r["batch_curve"]["maxvio"]) + " |"
        )
    lines.append(
        "| uniform floor | "
        + " | ".join(f"{v:.3f}" for v in results[0]["batch_curve"]["floor"])
        + " |"
    )
    lines += [
        "",
        "## Token fraction per expert (validation, mean over layers)",
        "",
        _fraction_table(results),
        "## Which experts each domain uses",
        "",
        _domain_table(results),
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
