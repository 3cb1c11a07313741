"""Statistics over seeds for the comparison report: spreads, paired differences, claims.

Pure NumPy. The input is the ``results`` list of ``results.json`` (one dict per strategy and
seed, fields in SCHEMA16.md). Three ideas:

- :func:`summarize`: mean and spread of one metric over a strategy's seeds. The spread is
  the sample sd (ddof 1) for ``n >= 5`` seeds and the min/max for ``2 <= n < 5`` (an sd of 2
  to 4 numbers is itself too noisy to print); one seed has no spread.
- :func:`paired`: the differences ``a - b`` of two strategies seed by seed (only the seeds
  both ran). Seed ``s`` shares its initialisation and data order between the two, so the
  paired differences cancel the seed noise that the per-strategy spreads contain.
- :func:`claims`: the Loss-Free Balancing paper's headline claims (arXiv 2408.15664; the
  scope claim from arXiv 2501.11873), each judged from paired differences. Strategies are
  identified by their ``strategy`` fields (``score_fn``, ``aux_coef``, ``aux_loss``,
  ``bias_rate``, ``bias_rule``, ``balance_scope``), never by name.

The verdict rule (:func:`exceeds_spread`): a paired difference exceeds the seed spread when
``n >= 2``, every seed's difference is non-zero with the same sign, and
``|mean| > sd`` (sample sd of the differences, ddof 1), i.e. ``t = mean / (sd / sqrt n) >
sqrt n``. With one seed it never does. It is a screen, not a significance test: if the true
difference is zero and the seed noise Gaussian, it still passes with probability about 0.39
at ``n = 2``, 0.21 at ``n = 3`` and 0.055 at ``n = 5`` (checked by a test), so a "yes" at 3
seeds is a lead to rerun at more seeds, not a proof.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "NO",
    "SD_MIN_SEEDS",
    "NOISE",
    "ONE_SEED",
    "UNMEASURED",
    "YES",
    "Claim",
    "Metric",
    "Paired",
    "Summary",
    "band",
    "claims",
    "curve_slope",
    "dead_experts",
    "exceeds_spread",
    "group_runs",
    "metric_value",
    "paired",
    "reference_strategy",
    "specialisation_mi",
    "strategy_fields",
    "summarize",
    "verdict",
]

SD_MIN_SEEDS = 5  # from this many seeds on the spread is the sd; below it, min/max
REFERENCE_RATE = 1e-3  # LFB's best bias rate: the loss-free run the claims compare
YES, NO, NOISE, ONE_SEED, UNMEASURED = (
    "yes",
    "no",
    "within noise",
    "1 seed, no spread",
    "not measured",
)

Metric = str | Callable[[dict], float]


def metric_value(run: dict, metric: Metric) -> float:
    """``run[metric]`` (or ``metric(run)``) as a float; ``None`` (e.g. a run that never
    balanced) becomes NaN."""
    value = metric(run) if callable(metric) else run[metric]
    return math.nan if value is None else float(value)


def strategy_fields(run: dict) -> dict:
    """The run's ``strategy`` dict without its name; results written before
    ``balance_scope`` / ``aux_loss`` existed read as ``"global"`` / ``"switch"``."""
    fields = {"aux_loss": "switch", "balance_scope": "global", **run["strategy"]}
    fields.pop("name", None)
    return fields


def group_runs(results: Sequence[dict]) -> dict[str, list[dict]]:
    """Runs grouped by strategy name (first-appearance order), each group sorted by seed.

    Raises ValueError when one (name, seed) appears twice, or one name carries two
    different strategies.
    """
    groups: dict[str, list[dict]] = {}
    for run in results:
        groups.setdefault(run["name"], []).append(run)
    for name, runs in groups.items():
        seeds = [r.get("seed", 0) for r in runs]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"strategy {name!r} has seeds {seeds}: each seed once.")
        if any(strategy_fields(r) != strategy_fields(runs[0]) for r in runs):
            raise ValueError(f"strategy {name!r} names two different strategy dicts.")
        runs.sort(key=lambda r: r.get("seed", 0))
    return groups


class Summary(NamedTuple):
    """One metric over a strategy's seeds (non-finite values are counted, not averaged)."""

    mean: float  # mean of the finite values (NaN when none)
    low: float  # band: mean - sd (n >= 5), min (2 <= n < 5), mean (n == 1)
    high: float  # band: mean + sd, max, mean
    sd: float  # sample sd, ddof 1 (NaN when n < 2)
    n: int  # finite values
    missing: int  # non-finite values (e.g. runs that never balanced)

    @property
    def rule(self) -> str:
        """How the spread is given: ``"sd"``, ``"min/max"`` or ``"1 seed"``."""
        return "sd" if self.n >= SD_MIN_SEEDS else ("min/max" if self.n >= 2 else "1 seed")

    def fmt(self, spec: str = ".3f", missing: str = "missing") -> str:
        """``"1.423 ± 0.015"`` (sd), ``"1.423 [1.410, 1.446]"`` (min/max), ``"1.423"`` (one
        seed); ``"(1 of 3 never)"`` appended when values are missing (``missing="never"``)."""
        if self.n == 0:
            text = "n/a"
        elif self.n == 1:
            text = format(self.mean, spec)
        elif self.rule == "sd":
            text = f"{self.mean:{spec}} ± {self.sd:{spec}}"
        else:
            text = f"{self.mean:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"
        if self.missing:
            total = self.n + self.missing
            text = missing if self.n == 0 else f"{text} ({self.missing} of {total} {missing})"
        return text


def summarize(values: Sequence[float]) -> Summary:
    """Mean and spread (see the module docstring for the sd vs min/max rule)."""
    array = np.asarray(values, np.float64).reshape(-1)
    finite = array[np.isfinite(array)]
    n, missing = int(finite.size), int(array.size - finite.size)
    if n == 0:
        return Summary(math.nan, math.nan, math.nan, math.nan, 0, missing)
    mean = float(finite.mean())
    sd = float(finite.std(ddof=1)) if n >= 2 else math.nan
    if n >= SD_MIN_SEEDS:
        low, high = mean - sd, mean + sd
    else:
        low, high = float(finite.min()), float(finite.max())
    return Summary(mean, low, high, sd, n, missing)


def band(values_sn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and band ``(mean, low, high)`` over axis 0 (seeds) of ``[S, N]`` curves, by the
    same rule as :func:`summarize` (``low == high == mean`` for one seed)."""
    values = np.asarray(values_sn, np.float64)
    mean = values.mean(axis=0)
    if values.shape[0] >= SD_MIN_SEEDS:
        sd = values.std(axis=0, ddof=1)
        return mean, mean - sd, mean + sd
    return mean, values.min(axis=0), values.max(axis=0)


def exceeds_spread(diffs: Sequence[float]) -> bool:
    """The verdict rule: ``n >= 2``, all differences non-zero with one sign, and
    ``|mean| > sd`` (ddof 1). Never true for one seed."""
    d = np.asarray(diffs, np.float64)
    if d.size < 2 or not (np.all(d > 0) or np.all(d < 0)):
        return False
    return bool(abs(d.mean()) > d.std(ddof=1))


class Paired(NamedTuple):
    """Differences ``a - b`` seed by seed, over the seeds where both values are finite."""

    seeds: tuple[int, ...]  # [n] the seeds both strategies ran
    diffs: tuple[float, ...]  # [n] a - b per seed
    mean: float  # mean difference (NaN when n == 0)
    sd: float  # sample sd of the differences, ddof 1 (NaN when n < 2)
    agree: int  # seeds whose difference has the sign of the mean
    exceeds: bool  # exceeds_spread(diffs)

    @property
    def n(self) -> int:
        return len(self.diffs)

    def fmt(self, spec: str = "+.3f", unit: str = "") -> str:
        """``"+0.027 ± 0.006 nats/byte (sd of the paired differences), 3 of 3 seeds
        positive"``; ``"... (1 seed, no spread)"``; ``"no seed in common"``."""
        unit = f" {unit}" if unit else ""
        if self.n == 0:
            return "no seed in common"
        if self.n == 1:
            return f"{self.mean:{spec}}{unit} (1 seed, no spread)"
        sd = format(self.sd, spec.replace("+", ""))
        if self.mean == 0:
            equal = all(d == 0 for d in self.diffs)
            return f"{self.mean:{spec}} ± {sd}{unit}, " + (
                f"equal in all {self.n} seeds" if equal else "mean exactly 0"
            )
        sign = "positive" if self.mean > 0 else "negative"
        return f"{self.mean:{spec}} ± {sd}{unit}, {self.agree} of {self.n} seeds {sign}"


def paired(runs_a: Sequence[dict], runs_b: Sequence[dict], metric: Metric) -> Paired:
    """``metric(a) - metric(b)`` for each seed both strategies ran with finite values."""
    a = {r.get("seed", 0): metric_value(r, metric) for r in runs_a}
    b = {r.get("seed", 0): metric_value(r, metric) for r in runs_b}
    seeds = tuple(s for s in sorted(a) if s in b and math.isfinite(a[s] - b[s]))
    d = np.array([a[s] - b[s] for s in seeds], np.float64)
    if d.size == 0:
        return Paired((), (), math.nan, math.nan, 0, False)
    mean = float(d.mean())
    sd = float(d.std(ddof=1)) if d.size >= 2 else math.nan
    agree = int(np.sum(np.sign(d) == np.sign(mean))) if mean != 0 else 0
    return Paired(seeds, tuple(float(x) for x in d), mean, sd, agree, exceeds_spread(d))


def verdict(p: Paired, want: int) -> str:
    """:data:`YES` when ``p`` exceeds the seed spread with the sign ``want`` (+1 / -1),
    :data:`NO` when it does with the other sign, else :data:`NOISE` (:data:`ONE_SEED` for
    one seed, :data:`UNMEASURED` for none)."""
    if p.n == 0:
        return UNMEASURED
    if not p.exceeds:
        return ONE_SEED if p.n == 1 else NOISE
    return YES if np.sign(p.mean) == want else NO


def curve_slope(run: dict) -> float:
    """Least-squares slope of ``log MaxVio`` against ``log batch size`` over the upper half
    of the run's ``batch_curve`` sizes (those ``>=`` the median size, at least two). The
    uniform floor falls with slope -1/2; a curve held up by global imbalance flattens to 0
    (LFB Fig. 5). NaN with fewer than two sizes or a non-positive MaxVio."""
    sizes = np.asarray(run["batch_curve"]["sizes"], np.float64)
    vio = np.asarray(run["batch_curve"]["maxvio"], np.float64)
    keep = sizes >= np.median(sizes) if sizes.size else sizes.astype(bool)
    if keep.sum() < 2 or np.any(vio[keep] <= 0):
        return math.nan
    return float(np.polyfit(np.log(sizes[keep]), np.log(vio[keep]), 1)[0])


def specialisation_mi(run: dict) -> float:
    """``specialisation_mi_per_layer`` averaged over layers (bits)."""
    return float(np.mean(run["specialisation_mi_per_layer"]))


def dead_experts(run: dict) -> float:
    """``dead_experts_per_layer`` summed over layers."""
    return float(np.sum(run["dead_experts_per_layer"]))


class Claim(NamedTuple):
    """One row of the claims section."""

    key: str  # "a" .. "f", the claim it tests
    claim: str  # the claim in words, with its source
    compared: str  # the strategies compared, e.g. "A vs B"
    verdict: str  # YES, NO, NOISE, ONE_SEED or UNMEASURED
    figures: str  # the numbers behind the verdict


def _is_loss_free(s: dict) -> bool:
    return s["bias_rate"] > 0


def _is_aux(s: dict) -> bool:
    return s["aux_coef"] > 0 and s["bias_rate"] == 0


def reference_strategy(groups: dict[str, list[dict]]) -> str | None:
    """The loss-free strategy the claims compare: among ``bias_rate > 0``, prefer no aux
    loss, then sigmoid, then rule ``sign``, then ``global`` scope, then the rate closest to
    1e-3 in log scale, then the first listed."""

    def key(item):
        index, name = item
        s = strategy_fields(groups[name][0])
        return (
            s["aux_coef"] != 0,
            s["score_fn"] != "sigmoid",
            s["bias_rule"] != "sign",
            s["balance_scope"] != "global",
            abs(math.log10(s["bias_rate"] / REFERENCE_RATE)),
            index,
        )

    loss_free = [
        (i, n) for i, n in enumerate(groups) if _is_loss_free(strategy_fields(groups[n][0]))
    ]
    return min(loss_free, key=key)[1] if loss_free else None


def _differ_only_in(groups: dict[str, list[dict]], name: str, field: str) -> list[str]:
    """Other strategies whose fields equal ``name``'s except ``field``."""
    base = strategy_fields(groups[name][0])
    same = {k: v for k, v in base.items() if k != field}
    return [
        other
        for other in groups
        if other != name
        and {k: v for k, v in strategy_fields(groups[other][0]).items() if k != field} == same
    ]


def _lossfree_vs_aux(groups, ref: str | None) -> list[Claim]:
    """(a) MaxVio_global, (b) validation loss, (c) batch curve: the reference loss-free run
    against each aux-loss run (``aux_coef > 0``, no bias), whatever its scope (the paper's
    baseline is the per-micro-batch Switch loss; the global-batch loss is Demons')."""
    texts = {
        "a": "loss-free MaxVio_global below the aux loss's (LFB Table 2: 0.04 vs 0.72)",
        "b": "loss-free validation loss no worse than the aux loss's (LFB Table 2: PPL 9.50 vs "
        "9.56; here PPL per byte)",
        "c": "MaxVio over computation batches falls for loss-free, flattens for the aux loss "
        "(LFB Fig. 5)",
    }
    aux = [n for n in groups if _is_aux(strategy_fields(groups[n][0]))]
    if ref is None or not aux:
        need = "a loss-free run" if ref is None else "an aux-loss run"
        return [Claim(k, t, "-", UNMEASURED, f"needs {need}") for k, t in texts.items()]
    rows = []
    for other in aux:
        a, b = groups[ref], groups[other]
        compared = f"{ref} vs {other}"
        p = paired(a, b, "maxvio_global")
        sa, sb = (summarize([metric_value(r, "maxvio_global") for r in g]) for g in (a, b))
        ratio = f"; aux / loss-free = {sb.mean / sa.mean:.1f}x" if sa.mean > 0 else ""
        rows.append(
            Claim(
                "a",
                texts["a"],
                compared,
                verdict(p, -1),
                f"MaxVio_global {sa.fmt()} vs {sb.fmt()}{ratio}; paired {p.fmt()}",
            )
        )
        p = paired(a, b, "val_loss")
        rows.append(
            Claim(
                "b",
                texts["b"],
                compared,
                verdict(p, -1),
                f"val loss paired {p.fmt('+.4f', 'nats/byte')}; PPL/byte ratio "
                f"{math.exp(p.mean):.4f}"
                if p.n
                else "no seed in common",
            )
        )
        p = paired(a, b, curve_slope)
        la, lb = (summarize([curve_slope(r) for r in g]) for g in (a, b))
        v = verdict(p, -1)
        if v == YES and not la.mean < 0:
            v = NO  # the loss-free curve is steeper, but it does not fall
        rows.append(
            Claim(
                "c",
                texts["c"],
                compared,
                v,
                f"log-log slope at the large sizes: loss-free {la.fmt('+.2f')}, aux "
                f"{lb.fmt('+.2f')} (uniform floor -0.50); paired {p.fmt('+.2f')}",
            )
        )
    return rows


def _rate_sweep(groups, ref: str | None, run_steps: int) -> list[Claim]:
    """(d) LFB Fig. 3: a smaller rate converges more slowly (``steps_to_balance``, a run
    that never balanced counted as ``run_steps``, a lower bound), a larger one jitters late
    (``maxvio_batch_late_std``), the reference rate balances best (``maxvio_batch_steady``).
    Compared: loss-free runs that differ from the reference only in ``bias_rate``."""
    text = "u sweep (LFB Fig. 3: 1e-4 slow, 1e-2 jitters late, 1e-3 best)"
    others = [
        n
        for n in (_differ_only_in(groups, ref, "bias_rate") if ref else [])
        if _is_loss_free(strategy_fields(groups[n][0]))
    ]
    if not others:
        return [Claim("d", text, "-", UNMEASURED, "needs loss-free runs at two or more rates")]

    def steps(run: dict) -> float:
        value = run["steps_to_balance"]
        return float(run_steps if value is None else value)

    def rate(name: str) -> float:
        return strategy_fields(groups[name][0])["bias_rate"]

    rows, u_ref = [], rate(ref)
    for other in sorted(others, key=rate):
        u = rate(other)
        if u < u_ref:
            p = paired(groups[other], groups[ref], steps)
            what = f"u={u:g} converges more slowly than u={u_ref:g}"
            figs = f"steps to balance, paired {p.fmt('+.0f', 'steps')}"
        else:
            p = paired(groups[other], groups[ref], "maxvio_batch_late_std")
            what = f"u={u:g} jitters more late in training than u={u_ref:g}"
            figs = f"late sd of MaxVio_batch, paired {p.fmt('+.3f')}"
        rows.append(Claim("d", f"{text}: {what}", f"{other} vs {ref}", verdict(p, +1), figs))
        p = paired(groups[ref], groups[other], "maxvio_batch_steady")
        rows.append(
            Claim(
                "d",
                f"{text}: u={u_ref:g} balances better in the steady state than u={u:g}",
                f"{ref} vs {other}",
                verdict(p, -1),
                f"steady MaxVio_batch, paired {p.fmt('+.3f')}",
            )
        )
    return rows


def _gates(groups) -> list[Claim]:
    """(e) sigmoid + aux vs softmax + aux, equal in every other field: which gate gives the
    lower validation loss, and by how much."""
    text = "sigmoid gate no worse than softmax, both with the aux loss (V3, LFB)"
    rows = []
    for name in groups:
        s = strategy_fields(groups[name][0])
        if not (_is_aux(s) and s["score_fn"] == "sigmoid"):
            continue
        for other in _differ_only_in(groups, name, "score_fn"):
            p = paired(groups[name], groups[other], "val_loss")
            if p.n == 0:
                figs = "no seed in common"
            else:
                better = "softmax" if p.mean > 0 else "sigmoid"
                figs = (
                    f"sigmoid - softmax val loss {p.fmt('+.4f', 'nats/byte')}: {better} lower "
                    f"by {abs(p.mean):.4f} nats/byte (PPL/byte x{math.exp(abs(p.mean)):.4f})"
                )
            rows.append(Claim("e", text, f"{name} vs {other}", verdict(p, -1), figs))
    return rows or [Claim("e", text, "-", UNMEASURED, "needs sigmoid+aux and softmax+aux")]


def _scopes(groups) -> list[Claim]:
    """(f) Demons (arXiv 2501.11873): global-scope balancing gives more specialised experts
    (higher ``specialisation_mi``, mean over layers) at no worse loss than micro or
    sequence scope. YES needs the MI difference to exceed the seed spread upwards while the
    loss difference does not exceed it upwards; NO when either goes the other way."""
    text = "global balancing scope: more domain specialisation at no worse loss (Demons)"
    rows = []
    for name in groups:
        if strategy_fields(groups[name][0])["balance_scope"] != "global":
            continue
        for other in _differ_only_in(groups, name, "balance_scope"):
            scope = strategy_fields(groups[other][0])["balance_scope"]
            p_mi = paired(groups[name], groups[other], specialisation_mi)
            p_loss = paired(groups[name], groups[other], "val_loss")
            v = verdict(p_mi, +1)
            if verdict(p_loss, -1) == NO:
                v = NO
            floor = summarize([r["specialisation_mi_floor"] for r in groups[name]]).mean
            figs = (
                f"MI global - {scope} {p_mi.fmt('+.4f', 'bits')} (floor {floor:.4f}); "
                f"val loss {p_loss.fmt('+.4f', 'nats/byte')}"
            )
            rows.append(Claim("f", text, f"{name} vs {other}", v, figs))
    return rows or [
        Claim("f", text, "-", UNMEASURED, "needs strategies differing only in balance_scope")
    ]


def claims(results: Sequence[dict], *, run_steps: int) -> list[Claim]:
    """The claims section, computed from the runs.

    The comparison pairs (each verdict by :func:`verdict` on :func:`paired` differences):

    - the reference loss-free strategy (``bias_rate > 0``; prefer no aux loss, sigmoid,
      rule ``sign``, ``global`` scope, the rate nearest 1e-3) against every aux-loss
      strategy (``aux_coef > 0``, ``bias_rate == 0``) at the same scope: (a)
      ``maxvio_global`` lower, (b) ``val_loss`` lower, (c) :func:`curve_slope` more
      negative, and the loss-free slope below 0;
    - (d) the reference against the loss-free strategies that differ only in
      ``bias_rate`` (see :func:`_rate_sweep`);
    - (e) every sigmoid aux-loss strategy against the softmax one equal in all other
      fields: ``val_loss`` lower for sigmoid;
    - (f) every ``global``-scope strategy against those differing only in
      ``balance_scope``: mean ``specialisation_mi`` higher and ``val_loss`` not higher.

    YES / NO: the difference exceeds the seed spread in the claimed / the other direction;
    NOISE: it does not (for the "no worse" claim (b) that is consistent with the claim but
    confirms no gain). A claim whose strategies are absent gets one :data:`UNMEASURED` row
    saying what it needs. ``run_steps`` (training steps per run) stands in for
    ``steps_to_balance`` of a run that never balanced.
    """
    groups = group_runs(results)
    ref = reference_strategy(groups)
    return [
        *_lossfree_vs_aux(groups, ref),
        *_rate_sweep(groups, ref, run_steps),
        *_gates(groups),
        *_scopes(groups),
    ]
