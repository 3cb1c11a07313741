"""The main job: train one small MoE LM per balancing strategy and compare them.

The Loss-Free Balancing experiment (arXiv 2408.15664, Table 2 and Fig. 5) at laptop
size: softmax + auxiliary loss, sigmoid + auxiliary loss, sigmoid + loss-free bias and
no balancing at all, trained from the same seed on the same data, then measured on the
same validation set with the bias frozen. Sweeps over the bias rate, the bias rule and
the auxiliary coefficient add runs. ``sigmoid-moe compare`` is the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Sequence

import numpy as np

from sigmoid_moe._checks import require_choice
from sigmoid_moe.balancing import BIAS_RULES
from sigmoid_moe.config import SCORE_FNS
from sigmoid_moe.harness.data import Corpus, build_corpus
from sigmoid_moe.harness.evaluate import evaluate
from sigmoid_moe.harness.run_files import read_jsonl
from sigmoid_moe.harness.train import TrainConfig, train

__all__ = ["Strategy", "compare", "default_strategies"]


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One balancing strategy.

    Attributes:
      name: run folder and label, e.g. ``"sigmoid+lossfree(u=1e-3,sign)"``.
      score_fn: ``"sigmoid"`` or ``"softmax"``.
      aux_coef: Switch auxiliary loss coefficient per layer (0: none).
      bias_rate: loss-free bias rate ``u`` (0: no bias).
      bias_rule: the bias rule when ``bias_rate > 0``.
    """

    name: str
    score_fn: str = "sigmoid"
    aux_coef: float = 0.0
    bias_rate: float = 0.0
    bias_rule: str = "sign"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}.")
        require_choice("score_fn", self.score_fn, SCORE_FNS)
        for field in ("aux_coef", "bias_rate"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{field} must be a float, got {value!r}.")
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{field} must be a finite float >= 0, got {value}.")
        require_choice("bias_rule", self.bias_rule, BIAS_RULES)

    @property
    def kind(self) -> str:
        if self.bias_rate > 0:
            return "loss-free bias"
        return "aux loss" if self.aux_coef > 0 else "none"

    def apply(self, base: TrainConfig) -> TrainConfig:
        model = dataclasses.replace(
            base.model, score_fn=self.score_fn, balance_loss_coef=float(self.aux_coef)
        )
        return dataclasses.replace(
            base, model=model, bias_rate=float(self.bias_rate), bias_rule=self.bias_rule
        )


def _fmt(x: float) -> str:
    return f"{x:g}"


def default_strategies(
    bias_rates: Sequence[float] = (1e-3,),
    rules: Sequence[str] = ("sign",),
    aux_coefs: Sequence[float] = (1e-3,),
) -> list[Strategy]:
    """Softmax + aux and sigmoid + aux per ``aux_coefs``, sigmoid + loss-free bias per
    ``(rate, rule)``, and sigmoid with no balancing."""
    for name, values in (("bias_rates", bias_rates), ("aux_coefs", aux_coefs)):
        if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
            raise ValueError(f"{name} must be a non-empty list of finite values > 0, got {values}.")
    for rule in rules:
        require_choice("rule", rule, BIAS_RULES)
    runs = []
    for coef in aux_coefs:
        runs.append(Strategy(f"softmax+aux({_fmt(coef)})", "softmax", aux_coef=coef))
        runs.append(Strategy(f"sigmoid+aux({_fmt(coef)})", "sigmoid", aux_coef=coef))
    for rate in bias_rates:
        for rule in rules:
            runs.append(
                Strategy(f"sigmoid+lossfree({_fmt(rate)},{rule})", bias_rate=rate, bias_rule=rule)
            )
    runs.append(Strategy("sigmoid+none"))
    return runs


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_")


def _mean_maxvio_batch(metrics_path: pathlib.Path) -> float:
    vios = [np.mean(record["maxvio"]) for record in read_jsonl(metrics_path)]
    return float(np.mean(vios))


def compare(
    base: TrainConfig,
    strategies: Sequence[Strategy],
    out_dir: str | pathlib.Path,
    *,
    resume: bool = True,
    progress: bool = True,
    report: bool = True,
    corpus: Corpus | None = None,
    allow_data_change: bool = False,
) -> list[dict]:
    """Trains ``base`` under each strategy into ``out_dir/runs/<name>`` and evaluates it.

    Returns one dict per strategy (also written to ``out_dir/results.json``): its name,
    kind and config, the :func:`~sigmoid_moe.harness.evaluate.evaluate` results, and
    ``maxvio_batch_mean`` over training with ``maxvio_batch_floor`` (uniform routing at
    ``batch_size * seq_len`` tokens). With ``report`` writes ``report.md`` and PNG plots.
    ``corpus`` is a prebuilt corpus for ``base.data``; ``resume`` and ``allow_data_change``
    go to :func:`~sigmoid_moe.harness.train.train`.
    """
    from sigmoid_moe.metrics import uniform_maxvio_floor

    if not strategies:
        raise ValueError("strategies is empty; pass at least one Strategy.")
    names = [s.name for s in strategies]
    if len(set(names)) != len(names):
        raise ValueError(f"strategy names must be unique, got {names}.")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if corpus is None:
        corpus = build_corpus(base.data, base.model.seq_len)
    batch_tokens = base.batch_size * base.model.seq_len
    results = []
    for index, strategy in enumerate(strategies):
        config = strategy.apply(base)
        run_dir = out / "runs" / _slug(strategy.name)
        started = time.perf_counter()
        trained = train(
            config,
            run_dir,
            resume=resume,
            progress=progress,
            corpus=corpus,
            desc=f"[{index + 1}/{len(strategies)}] {strategy.name}",
            allow_data_change=allow_data_change,
        )
        measured = evaluate(trained.model, corpus)
        result = {
            "name": strategy.name,
            "kind": strategy.kind,
            "strategy": dataclasses.asdict(strategy),
            "run_dir": str(run_dir),
            "seconds": round(time.perf_counter() - started, 2),
            "maxvio_batch_mean": _mean_maxvio_batch(run_dir / "metrics.jsonl"),
            "maxvio_batch_floor": uniform_maxvio_floor(
                batch_tokens, base.model.num_experts, base.model.top_k
            ),
            **measured,
        }
        (run_dir / "eval_final.json").write_text(json.dumps(result, indent=2))
        results.append(result)
        if progress:
            print(
                f"{strategy.name}: val loss {result['val_loss']:.4f}, MaxVio_global "
                f"{result['maxvio_global']:.3f} (floor {result['maxvio_global_floor']:.3f}), "
                f"{result['seconds']:.0f}s",
                flush=True,
            )
    summary = {"base_config": base.to_dict(), "data": corpus.summary(), "results": results}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    if report:
        from sigmoid_moe.harness.report import write_report

        write_report(out, summary)
    return results
