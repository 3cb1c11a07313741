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
import pathlib
import time
from collections.abc import Sequence

import numpy as np

from sigmoid_moe._checks import require_choice, require_float, require_int
from sigmoid_moe.balancing import BIAS_RULES, BiasRule
from sigmoid_moe.config import SCORE_FNS, ScoreFn
from sigmoid_moe.harness.data import Corpus, build_corpus
from sigmoid_moe.harness.distributed import is_writer, mesh_context
from sigmoid_moe.harness.evaluate import evaluate
from sigmoid_moe.harness.model import BALANCE_SCOPES, BalanceScope
from sigmoid_moe.harness.run_files import read_jsonl
from sigmoid_moe.harness.train import TrainConfig, train
from sigmoid_moe.harness.workers import default_jobs, map_in_workers
from sigmoid_moe.metrics import (
    BALANCE_FACTOR,
    BALANCE_WINDOW,
    steps_to_balance,
    trend,
    uniform_maxvio_floor,
)

__all__ = ["Strategy", "check_runs", "compare", "default_strategies"]


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One balancing strategy.

    Attributes:
      name: run folder and label, e.g. ``"sigmoid+lossfree(0.001,sign)"``.
      score_fn: ``"sigmoid"`` or ``"softmax"``.
      aux_coef: auxiliary balance loss coefficient per layer (0: none).
      bias_rate: loss-free bias rate ``u`` (0: no bias).
      bias_rule: the bias rule when ``bias_rate > 0``.
      balance_scope: the tokens the balance statistics are taken over, for the bias and
        the aux loss (``ModelConfig.balance_scope``): with several micro-batches an aux
        loss at ``"global"`` scope is the global-batch balance loss (Demons, Qwen3), at
        ``"micro"`` the usual per-micro-batch Switch loss, at ``"sequence"``
        DeepSeek-V3's sequence-wise loss.
    """

    name: str
    score_fn: ScoreFn = "sigmoid"
    aux_coef: float = 0.0
    bias_rate: float = 0.0
    bias_rule: BiasRule = "sign"
    balance_scope: BalanceScope = "global"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}.")
        require_choice("score_fn", self.score_fn, SCORE_FNS)
        # The comparison's boundary for its numbers: the trainer trusts them from here.
        require_float("aux_coef", self.aux_coef)
        require_float("bias_rate", self.bias_rate)
        require_choice("bias_rule", self.bias_rule, BIAS_RULES)
        require_choice("balance_scope", self.balance_scope, BALANCE_SCOPES)

    @property
    def kind(self) -> str:
        if self.bias_rate > 0:
            return "loss-free bias"
        return "aux loss" if self.aux_coef > 0 else "none"

    def apply(self, base: TrainConfig) -> TrainConfig:
        model = dataclasses.replace(
            base.model,
            score_fn=self.score_fn,
            balance_loss_coef=float(self.aux_coef),
            balance_scope=self.balance_scope,
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
    scopes: Sequence[str] = ("global",),
    softmax_baseline: bool = True,
    softmax_lossfree_rates: Sequence[float] = (),
) -> list[Strategy]:
    """The comparison's strategies, at each balancing scope in ``scopes``.

    Per scope: softmax + aux (the Switch/GShard/Mixtral baseline) and sigmoid + aux per
    ``aux_coefs``, sigmoid + loss-free bias per ``(rate, rule)``, softmax + loss-free bias
    per ``(rate, rule)`` for the rates in ``softmax_lossfree_rates`` (the arm that
    separates the gate from the balancing); then sigmoid with no balancing. With more
    than one scope every name ends in ``@scope``. The numbers and rules are checked by
    :class:`Strategy` (a repeat gives a repeated name, which :func:`check_runs` refuses);
    a rate or coefficient of 0 belongs to no arm.
    """
    for name, values in {"bias_rates": bias_rates, "aux_coefs": aux_coefs, "rules": rules}.items():
        if not values:
            raise ValueError(f"{name} must be a non-empty list, got {values}.")
    if not scopes or len(set(scopes)) != len(scopes):
        raise ValueError(f"scopes must be a non-empty list without repeats, got {scopes}.")
    for name, values in (("bias_rates", bias_rates), ("aux_coefs", aux_coefs)):
        if 0 in values:
            raise ValueError(f"{name} holds 0, which is no balancing; sigmoid+none runs anyway.")
    runs = []
    for scope in scopes:
        at = f"@{scope}" if len(scopes) > 1 else ""
        for coef in aux_coefs:
            if softmax_baseline:
                runs.append(
                    Strategy(f"softmax+aux({_fmt(coef)}){at}", "softmax", coef, balance_scope=scope)
                )
            runs.append(
                Strategy(f"sigmoid+aux({_fmt(coef)}){at}", "sigmoid", coef, balance_scope=scope)
            )
        for gate, gate_rates in (("sigmoid", bias_rates), ("softmax", softmax_lossfree_rates)):
            for rate in gate_rates:
                for rule in rules:
                    name = f"{gate}+lossfree({_fmt(rate)},{rule}){at}"
                    runs.append(
                        Strategy(name, gate, bias_rate=rate, bias_rule=rule, balance_scope=scope)
                    )
    runs.append(Strategy("sigmoid+none"))
    return runs


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_")


def training_balance(metrics_path: pathlib.Path, steps: int, floor: float) -> dict:
    """MaxVio_batch over training, summarised so that steady state, whether it is still
    moving, and the time it took to get there are separate numbers.

    ``steady_steps = max(10, steps // 10)``: ``maxvio_batch_steady`` is the mean over the
    last ``steady_steps`` steps (per layer and mean over layers) and
    ``maxvio_batch_late_std`` the standard deviation of the layer-mean there (late
    jitter). ``maxvio_batch_trend`` is :func:`sigmoid_moe.metrics.trend` of the layer-mean
    over the last five windows of ``steady_steps`` (slope per step, its interval and
    verdict: ``"still falling"`` when the interval is below 0). ``steps_to_balance`` is
    :func:`sigmoid_moe.metrics.steps_to_balance` of the layer-mean against ``floor`` (the
    uniform floor at the step's tokens): the first step after which its running mean over
    ``BALANCE_WINDOW`` steps stays below ``BALANCE_FACTOR`` times the floor (None:
    never). ``maxvio_batch_all`` is the mean over every step.
    """
    vio_sl = np.asarray([record["maxvio"] for record in read_jsonl(metrics_path)], np.float64)
    steady_steps = max(10, steps // 10)
    late = vio_sl[-steady_steps:]
    steady_l = late.mean(axis=0)
    mean_s = vio_sl.mean(axis=1)
    slope = trend(mean_s, window=steady_steps)
    return {
        "maxvio_batch_steady": float(steady_l.mean()),
        "maxvio_batch_steady_per_layer": steady_l.tolist(),
        "maxvio_batch_late_std": float(late.mean(axis=1).std()),
        "maxvio_batch_all": float(mean_s.mean()),
        "maxvio_batch_trend": {
            "slope": slope.slope,
            "low": slope.low,
            "high": slope.high,
            "windows": slope.windows,
            "verdict": slope.verdict,
        },
        "steady_steps": steady_steps,
        "steps_to_balance": steps_to_balance(mean_s, floor),
        "balance_factor": BALANCE_FACTOR,
        "balance_window": BALANCE_WINDOW,
    }


def _run_one(base, strategy, seed, out, resume, progress, corpus, allow_data_change) -> dict:
    """Trains and evaluates one (strategy, seed) run; its result dict (see :func:`compare`)."""
    config = dataclasses.replace(strategy.apply(base), seed=seed)
    run_dir = pathlib.Path(out) / "runs" / _slug(strategy.name) / f"seed{seed}"
    started = time.perf_counter()
    trained = train(
        config,
        run_dir,
        resume=resume,
        progress=progress,
        corpus=corpus,
        desc=f"{strategy.name} seed {seed}",
        allow_data_change=allow_data_change,
    )
    with mesh_context(trained.mesh):
        measured = evaluate(trained.model, corpus, mesh=trained.mesh)
    model = config.model
    floor = uniform_maxvio_floor(config.batch_size * model.seq_len, model.num_experts, model.top_k)
    result = {
        "name": strategy.name,
        "kind": strategy.kind,
        "strategy": dataclasses.asdict(strategy),
        "seed": seed,
        "run_dir": str(run_dir),
        "seconds": round(time.perf_counter() - started, 2),
        **training_balance(run_dir / "metrics.jsonl", config.steps, floor),
        "maxvio_batch_floor": floor,
        **measured,
    }
    if is_writer():
        (run_dir / "eval_final.json").write_text(json.dumps(result, indent=2))
    return result


def check_runs(strategies: Sequence[Strategy], seeds: Sequence[int]) -> tuple[int, ...]:
    """Checks the runs :func:`compare` would train (before any of them starts): at least one
    strategy, unique names that map to distinct run folders, and unique seeds ``>= 0``.
    Returns the seeds as a tuple; raises ValueError naming the problem."""
    if not strategies:
        raise ValueError("strategies is empty; pass at least one Strategy.")
    names = [s.name for s in strategies]
    if len(set(names)) != len(names):
        raise ValueError(f"strategy names must be unique, got {names}.")
    folders: dict[str, str] = {}
    for name in names:
        if not _slug(name).strip("."):
            raise ValueError(f"strategy name {name!r} gives no run folder name; use letters.")
        other = folders.setdefault(_slug(name), name)
        if other != name:
            raise ValueError(
                f"strategies {other!r} and {name!r} would share the same run folder "
                f"runs/{_slug(name)}; rename one (letters, digits and -_. are kept)."
            )
    seeds = tuple(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list without repeats, got {seeds}.")
    for seed in seeds:
        require_int("seed", seed, 0)
    return seeds


def compare(
    base: TrainConfig,
    strategies: Sequence[Strategy],
    out_dir: str | pathlib.Path,
    *,
    seeds: Sequence[int] | None = None,
    preset: str | None = None,
    resume: bool = True,
    progress: bool = True,
    report: bool = True,
    corpus: Corpus | None = None,
    allow_data_change: bool = False,
    jobs: int | None = None,
) -> list[dict]:
    """Trains ``base`` under each strategy and seed into ``out_dir/runs/<name>/seed<k>``,
    evaluates every run, and writes ``results.json`` (and ``report.md`` with plots).

    Args:
      base: the run every strategy modifies (``Strategy.apply``).
      strategies: what to compare; names must be unique.
      out_dir: the output folder.
      seeds: training seeds; every strategy runs once per seed (default ``(base.seed,)``).
        A seed changes the initialisation and the data order, not the validation split.
      preset: its name, recorded in ``results.json``.
      resume, allow_data_change: passed to :func:`~sigmoid_moe.harness.train.train`; each
        run resumes on its own.
      corpus: a prebuilt corpus for ``base.data``.
      jobs: worker processes running at once (default one per core). Every run trains
        in a single-threaded worker (:func:`~sigmoid_moe.harness.workers.map_in_workers`),
        so its numbers are the same whatever ``jobs`` is and whatever the machine.

    Returns:
      One dict per (strategy, seed) run, in strategy then seed order: name, kind,
      strategy, seed, run folder, seconds, the :func:`training_balance` summary with
      ``maxvio_batch_floor`` (uniform routing at ``batch_size * seq_len`` tokens), and the
      :func:`~sigmoid_moe.harness.evaluate.evaluate` results.
    """
    seeds = check_runs(strategies, (base.seed,) if seeds is None else seeds)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if corpus is None:
        corpus = build_corpus(base.data, base.model.seq_len)
    if jobs is None:
        jobs = default_jobs(len(strategies) * len(seeds))
    require_int("jobs", jobs, 1)
    tasks = [
        (base, strategy, seed, out, resume, progress and jobs == 1, corpus, allow_data_change)
        for strategy in strategies
        for seed in seeds
    ]

    def done(index, result):
        if progress and is_writer():
            print(
                f"[{index + 1}/{len(tasks)}] {result['name']} seed {result['seed']}: val loss "
                f"{result['val_loss']:.4f}, MaxVio_global {result['maxvio_global']:.3f} "
                f"(floor {result['maxvio_global_floor']:.3f}), {result['seconds']:.0f}s",
                flush=True,
            )

    results = map_in_workers(_run_one, tasks, jobs, mesh=base.mesh, on_done=done)
    summary = {
        "base_config": base.to_dict(),
        "data": {**corpus.summary(), "val_split": base.data.val_split},
        "seeds": list(seeds),
        "preset": preset,
        "results": results,
    }
    if not is_writer():
        return results
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    if report:
        from sigmoid_moe.harness.report import write_report

        write_report(out, summary)
    return results
