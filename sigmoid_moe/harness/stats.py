"""Statistics over seeds for the comparison report: spreads, paired tests, claims.

NumPy, and SciPy's t distribution. The input is the ``results`` list of ``results.json``
(one dict per strategy and seed, the fields :func:`sigmoid_moe.harness.compare` writes).

- :func:`summarize`: mean and spread of one metric over a strategy's seeds. The spread is
  the sample sd (ddof 1) for ``n >= 5`` seeds and the min/max for ``2 <= n < 5`` (an sd of 2
  to 4 numbers is itself too noisy to print); one seed has no spread.
- :func:`paired`: the differences ``a - b`` of two strategies seed by seed (only the seeds
  both ran). Seed ``s`` shares its initialisation and data order between the two, so the
  paired differences cancel the seed noise that the per-strategy spreads contain.
- :func:`t_test`: the paired t test of the mean difference against a threshold (0, or a
  margin for a "no worse" claim), with its t interval at :data:`LEVEL`.
- :func:`claims`: the Loss-Free Balancing paper's headline claims (arXiv 2408.15664; the
  scope claim from arXiv 2501.11873), each row judged by paired t tests. Strategies are
  identified by their ``strategy`` fields (``score_fn``, ``aux_coef``, ``bias_rate``,
  ``bias_rule``, ``balance_scope``), never by name.

The error rate. A claim (a key, "a" .. "g") is one family: the tests of all its rows (a
hypothesis tested against several runs, e.g. loss-free against each aux coefficient)
are corrected together by Holm's step-down method at ``alpha = 1 - LEVEL``. A row says
**yes** or **no** only when its Holm-adjusted p-value is at most ``alpha``: **yes** when the
difference lies on the claimed side of the threshold, **no** when on the other;
otherwise **inconclusive**. So when nothing differs (every true mean difference exactly
at its threshold), a claim gives any yes or no with probability at most ``alpha`` (Holm
holds under any dependence between the rows), and a table of ``K`` claims at most
``K * alpha`` (:func:`table_error_bound`). The t test assumes the paired differences are
roughly normal over seeds; ``tests/test_report.py`` simulates tables under no effect and
checks both rates.

"No worse" claims are non-inferiority tests with the margin :data:`LOSS_MARGIN` (nats per
byte): **yes** when the difference is significantly below the margin, **no** when it is
significantly above it (worse by more than the margin).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats as scipy_stats

__all__ = [
    "ALPHA",
    "INCONCLUSIVE",
    "LEVEL",
    "LOSS_MARGIN",
    "NO",
    "ONE_SEED",
    "SD_MIN_SEEDS",
    "UNMEASURED",
    "YES",
    "Claim",
    "Metric",
    "Paired",
    "Summary",
    "TTest",
    "band",
    "claims",
    "curve_slope",
    "dead_experts",
    "frontier",
    "frontier_loss",
    "group_runs",
    "holm",
    "metric_value",
    "paired",
    "reference_strategy",
    "specialisation_mi",
    "strategy_fields",
    "summarize",
    "t_test",
    "table_error_bound",
]

SD_MIN_SEEDS = 5  # from this many seeds on the spread is the sd; below it, min/max
REFERENCE_RATE = 1e-3  # LFB's best bias rate: the loss-free run the claims compare
LEVEL = 0.95  # every interval's level; each claim's family-wise error rate is 1 - LEVEL
ALPHA = 1 - LEVEL
# "No worse" in validation loss: worse by less than this many nats per byte (1% in
# perplexity per byte). LFB's whole gain over the aux loss was 0.6% in PPL per token.
LOSS_MARGIN = 0.01
YES, NO, INCONCLUSIVE, ONE_SEED, UNMEASURED = (
    "yes",
    "no",
    "inconclusive",
    "1 seed, no test",
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
            text = f"{self.mean:{spec}} ± {self.sd:{spec.replace('+', '')}}"
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


class Paired(NamedTuple):
    """Differences ``a - b`` seed by seed, over the seeds where both values are finite."""

    seeds: tuple[int, ...]  # [n] the seeds both strategies ran
    diffs: tuple[float, ...]  # [n] a - b per seed
    mean: float  # mean difference (NaN when n == 0)
    sd: float  # sample sd of the differences, ddof 1 (NaN when n < 2)
    agree: int  # seeds whose difference has the sign of the mean

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


def differences(seeds: Sequence[int], diffs: Sequence[float]) -> Paired:
    """A :class:`Paired` from per-seed differences (non-finite ones dropped)."""
    kept = [(s, float(d)) for s, d in zip(seeds, diffs, strict=True) if math.isfinite(d)]
    d = np.array([x for _, x in kept], np.float64)
    if d.size == 0:
        return Paired((), (), math.nan, math.nan, 0)
    mean = float(d.mean())
    sd = float(d.std(ddof=1)) if d.size >= 2 else math.nan
    agree = int(np.sum(np.sign(d) == np.sign(mean))) if mean != 0 else 0
    return Paired(tuple(s for s, _ in kept), tuple(x for _, x in kept), mean, sd, agree)


def paired(runs_a: Sequence[dict], runs_b: Sequence[dict], metric: Metric) -> Paired:
    """``metric(a) - metric(b)`` for each seed both strategies ran with finite values."""
    a = {r.get("seed", 0): metric_value(r, metric) for r in runs_a}
    b = {r.get("seed", 0): metric_value(r, metric) for r in runs_b}
    seeds = [s for s in sorted(a) if s in b]
    return differences(seeds, [a[s] - b[s] for s in seeds])


class TTest(NamedTuple):
    """A paired t test of ``mean difference == threshold`` (two-sided)."""

    paired: Paired
    threshold: float  # 0, or the margin of a "no worse" claim
    low: float  # the mean difference's t interval at LEVEL (n - 1 degrees of freedom)
    high: float
    p: float  # two-sided p-value (NaN for fewer than 2 seeds)


def t_test(p: Paired, threshold: float = 0.0, level: float = LEVEL) -> TTest:
    """The t test and interval of ``p``'s mean difference against ``threshold``. With zero
    spread the interval is the mean itself and p is 0 (1 when the mean is the threshold)."""
    if p.n < 2:
        return TTest(p, threshold, math.nan, math.nan, math.nan)
    se = p.sd / math.sqrt(p.n)
    half = float(scipy_stats.t.ppf(0.5 + level / 2, p.n - 1)) * se
    gap = p.mean - threshold
    if se == 0:
        prob = 1.0 if gap == 0 else 0.0
    else:
        prob = float(2 * scipy_stats.t.sf(abs(gap) / se, p.n - 1))
    return TTest(p, threshold, p.mean - half, p.mean + half, prob)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN entries stay NaN and do not count): the
    ``i``-th smallest of ``m`` is ``max_{j <= i} min(1, (m - j + 1) p_(j))``. Rejecting
    where the adjusted value is ``<= alpha`` keeps the family-wise error rate at ``alpha``
    under any dependence."""
    p = np.asarray(p_values, np.float64)
    out = np.full(p.shape, math.nan)
    index = np.flatnonzero(np.isfinite(p))
    order = index[np.argsort(p[index], kind="stable")]
    m, running = order.size, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def _decide(test: TTest, p_adjusted: float, want: int, alpha: float) -> str:
    """YES / NO when the adjusted p is at most ``alpha`` and the mean lies on the ``want``
    (+1 / -1) side of the threshold / the other side; else INCONCLUSIVE (ONE_SEED,
    UNMEASURED below two seeds)."""
    if test.paired.n == 0:
        return UNMEASURED
    if test.paired.n == 1:
        return ONE_SEED
    if not p_adjusted <= alpha:
        return INCONCLUSIVE
    return YES if np.sign(test.paired.mean - test.threshold) == want else NO


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


# --- the aux-loss frontier ------------------------------------------------------------------


def frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The Pareto frontier of ``(maxvio, loss)`` points: those no other point beats in
    both (lower or equal MaxVio and lower or equal loss, one strictly), by MaxVio
    ascending (so loss descending). Points with a non-finite value are left out."""
    pts = sorted(
        (float(vio), float(loss))
        for vio, loss in points
        if math.isfinite(vio) and math.isfinite(loss)
    )
    front: list[tuple[float, float]] = []
    for vio, loss in pts:  # MaxVio ascending: keep a point only if its loss beats all before
        if not front or loss < front[-1][1]:
            front.append((vio, loss))
    return front


def frontier_loss(front: Sequence[tuple[float, float]], maxvio: float) -> tuple[float, str]:
    """The frontier's loss at ``maxvio``: linear in ``log MaxVio`` between the two frontier
    points around it; held at the end point's loss outside them (past the most balanced
    point that is the loss of a better-balanced run than any aux run reached, an
    optimistic frontier, so the test against it is conservative). Returns ``(loss,
    where)``, ``where`` one of ``"between"``, ``"beyond the most balanced"``, ``"beyond
    the least balanced"`` or ``"at"``."""
    if not front:
        return math.nan, ""
    if maxvio <= front[0][0]:
        return front[0][1], "at" if maxvio == front[0][0] else "beyond the most balanced"
    if maxvio >= front[-1][0]:
        return front[-1][1], "at" if maxvio == front[-1][0] else "beyond the least balanced"
    logs = np.log([v for v, _ in front])
    return float(np.interp(math.log(maxvio), logs, [loss for _, loss in front])), "between"


# --- the claims ----------------------------------------------------------------------------


class Claim(NamedTuple):
    """One row of the claims section."""

    key: str  # "a" .. "g", the claim (the family its tests are corrected in)
    claim: str  # the claim in words, with its source
    compared: str  # the strategies compared, e.g. "A vs B"
    verdict: str  # YES, NO, INCONCLUSIVE, ONE_SEED or UNMEASURED
    figures: str  # the numbers behind the verdict: the interval, p and Holm-adjusted p


class _Test(NamedTuple):
    """One test of a pending row: the test, the claimed side (+1 / -1), how to print it."""

    test: TTest
    want: int
    label: str  # e.g. "val loss"
    spec: str  # number format of the difference
    unit: str


class _Row(NamedTuple):
    """A claim row before the family's correction: its tests must all say YES for YES;
    any NO makes it NO."""

    key: str
    claim: str
    compared: str
    tests: tuple[_Test, ...]
    context: str  # figures printed before the tests'


def _test(p: Paired, want: int, label: str, spec: str, unit: str = "", threshold=0.0) -> _Test:
    return _Test(t_test(p, threshold), want, label, spec, unit)


def _is_loss_free(s: dict) -> bool:
    return s["bias_rate"] > 0


def _is_aux(s: dict) -> bool:
    return s["aux_coef"] > 0 and s["bias_rate"] == 0


def _is_none(s: dict) -> bool:
    return s["aux_coef"] == 0 and s["bias_rate"] == 0


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


def _unmeasured(key: str, claim: str, need: str) -> _Row:
    return _Row(key, claim, "-", (), f"needs {need}")


def _loss_test(p: Paired, margin: float, label: str = "val loss") -> _Test:
    """Non-inferiority in validation loss: claimed side below the margin."""
    return _test(p, -1, label, "+.4f", "nats/byte", threshold=margin)


def _lossfree_vs_aux(groups, ref: str | None, margin: float) -> list[_Row]:
    """(a) MaxVio_global, (b) validation loss, (c) batch curve: the reference loss-free run
    against each aux-loss run (``aux_coef > 0``, no bias), whatever its scope (the paper's
    baseline is the per-micro-batch Switch loss; the global-batch loss is Demons')."""
    texts = {
        "a": "loss-free MaxVio_global below the aux loss's (LFB Table 2: 0.04 vs 0.72)",
        "b": "loss-free validation loss no worse than the aux loss's (LFB Table 2: PPL 9.50 vs "
        "9.56; here PPL per byte)",
        "c": "MaxVio over computation batches falls for loss-free, and more steeply than for "
        "the aux loss (LFB Fig. 5)",
    }
    aux = [n for n in groups if _is_aux(strategy_fields(groups[n][0]))]
    if ref is None or not aux:
        need = "a loss-free run" if ref is None else "an aux-loss run"
        return [_unmeasured(k, t, need) for k, t in texts.items()]
    rows = []
    for other in aux:
        a, b = groups[ref], groups[other]
        compared = f"{ref} vs {other}"
        sa, sb = (summarize([metric_value(r, "maxvio_global") for r in g]) for g in (a, b))
        ratio = f"; aux / loss-free = {sb.mean / sa.mean:.1f}x" if sa.mean > 0 else ""
        rows.append(
            _Row(
                "a",
                texts["a"],
                compared,
                (_test(paired(a, b, "maxvio_global"), -1, "MaxVio_global", "+.3f"),),
                f"MaxVio_global {sa.fmt()} vs {sb.fmt()}{ratio}",
            )
        )
        p = paired(a, b, "val_loss")
        ppl = f"PPL/byte ratio {math.exp(p.mean):.4f}" if p.n else ""
        rows.append(_Row("b", texts["b"], compared, (_loss_test(p, margin),), ppl))
        la, lb = (summarize([curve_slope(r) for r in g]) for g in (a, b))
        slope_a = differences([r.get("seed", 0) for r in a], [curve_slope(r) for r in a])
        rows.append(
            _Row(
                "c",
                texts["c"],
                compared,
                (
                    _test(slope_a, -1, "loss-free slope", "+.2f"),
                    _test(paired(a, b, curve_slope), -1, "slope loss-free - aux", "+.2f"),
                ),
                f"log-log slope at the large sizes: loss-free {la.fmt('+.2f')}, aux "
                f"{lb.fmt('+.2f')} (uniform floor -0.50)",
            )
        )
    return rows


def _rate_sweep(groups, ref: str | None, run_steps: int) -> list[_Row]:
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
        return [_unmeasured("d", text, "loss-free runs at two or more rates")]

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
            test = _test(p, +1, "steps to balance (never = run length)", "+.0f", "steps")
        else:
            p = paired(groups[other], groups[ref], "maxvio_batch_late_std")
            what = f"u={u:g} jitters more late in training than u={u_ref:g}"
            test = _test(p, +1, "late sd of MaxVio_batch", "+.3f")
        rows.append(_Row("d", f"{text}: {what}", f"{other} vs {ref}", (test,), ""))
        p = paired(groups[ref], groups[other], "maxvio_batch_steady")
        rows.append(
            _Row(
                "d",
                f"{text}: u={u_ref:g} balances better in the steady state than u={u:g}",
                f"{ref} vs {other}",
                (_test(p, -1, "steady MaxVio_batch", "+.3f"),),
                "",
            )
        )
    return rows


def _gates(groups, margin: float) -> list[_Row]:
    """(e) the sigmoid gate against softmax, equal in every other field (with the aux loss,
    and with the loss-free bias when both gates ran it): sigmoid's validation loss no
    worse (non-inferiority at ``margin``)."""
    text = "sigmoid gate no worse than softmax, at equal balancing (V3, LFB)"
    rows = []
    for name in groups:
        s = strategy_fields(groups[name][0])
        if _is_none(s) or s["score_fn"] != "sigmoid":
            continue
        for other in _differ_only_in(groups, name, "score_fn"):
            p = paired(groups[name], groups[other], "val_loss")
            context = ""
            if p.n:
                better = "softmax" if p.mean > 0 else "sigmoid"
                context = f"{better} lower by {abs(p.mean):.4f} nats/byte on average"
            rows.append(_Row("e", text, f"{name} vs {other}", (_loss_test(p, margin),), context))
    return rows or [_unmeasured("e", text, "the same balancing under both gates")]


def _scopes(groups, margin: float) -> list[_Row]:
    """(f) Demons (arXiv 2501.11873): global-scope balancing gives more specialised experts
    (higher ``specialisation_mi``, mean over layers) at no worse loss than micro or
    sequence scope: both tests must say YES."""
    text = "global balancing scope: more domain specialisation at no worse loss (Demons)"
    rows = []
    for name in groups:
        if strategy_fields(groups[name][0])["balance_scope"] != "global":
            continue
        for other in _differ_only_in(groups, name, "balance_scope"):
            floor = summarize([r["specialisation_mi_floor"] for r in groups[name]]).mean
            tests = (
                _test(
                    paired(groups[name], groups[other], specialisation_mi),
                    +1,
                    "MI global - other",
                    "+.4f",
                    "bits",
                ),
                _loss_test(paired(groups[name], groups[other], "val_loss"), margin),
            )
            rows.append(_Row("f", text, f"{name} vs {other}", tests, f"MI floor {floor:.4f}"))
    return rows or [_unmeasured("f", text, "strategies differing only in balance_scope")]


def _frontier_of(groups, lossfree: str, gate: str) -> list[str]:
    """The aux-loss strategies (and the no-balancing one) of ``gate`` that share the
    loss-free strategy's scope: the points of its frontier."""
    scope = strategy_fields(groups[lossfree][0])["balance_scope"]
    out = []
    for name in groups:
        s = strategy_fields(groups[name][0])
        if s["score_fn"] == gate and (_is_aux(s) or _is_none(s)) and s["balance_scope"] == scope:
            out.append(name)
    return out


def frontier_gaps(
    groups: dict[str, list[dict]], lossfree: str, points: Sequence[str]
) -> tuple[Paired, list[str]]:
    """Seed by seed: the loss-free run's validation loss minus the aux frontier's loss at
    the loss-free run's MaxVio_global (:func:`frontier` of that seed's runs of ``points``,
    :func:`frontier_loss`). Seeds with fewer than two frontier runs are left out. Returns
    the differences and, per seed kept, where on the frontier the point fell."""
    by_seed: dict[int, list[tuple[float, float]]] = {}
    for name in points:
        for run in groups[name]:
            value = (metric_value(run, "maxvio_global"), metric_value(run, "val_loss"))
            by_seed.setdefault(run.get("seed", 0), []).append(value)
    seeds, gaps, where = [], [], []
    for run in groups[lossfree]:
        seed = run.get("seed", 0)
        if len(by_seed.get(seed, ())) < 2:
            continue
        loss, at = frontier_loss(frontier(by_seed[seed]), metric_value(run, "maxvio_global"))
        seeds.append(seed)
        gaps.append(metric_value(run, "val_loss") - loss)
        where.append(at)
    return differences(seeds, gaps), where


def _pareto(groups, ref: str | None, margin: float) -> list[_Row]:
    """(g) the dilemma (LFB section 2): each loss-free strategy against the aux-loss
    frontier of its own gate (the aux coefficients and no balancing, same scope), and the
    reference against the softmax frontier (the paper's baseline): its validation loss
    minus the frontier's at its own MaxVio_global, per seed, no worse than ``margin``."""
    text = (
        "loss-free on or beyond the aux-loss frontier at its own balance: val loss no worse "
        "than the frontier's at the same MaxVio_global (LFB section 2)"
    )
    pairs = []
    for name in groups:
        s = strategy_fields(groups[name][0])
        if _is_loss_free(s) and s["aux_coef"] == 0:
            pairs.append((name, s["score_fn"]))
    if ref is not None and strategy_fields(groups[ref][0])["score_fn"] == "sigmoid":
        pairs.append((ref, "softmax"))
    rows = []
    for name, gate in pairs:
        points = _frontier_of(groups, name, gate)
        if sum(_is_aux(strategy_fields(groups[n][0])) for n in points) < 2:
            continue
        gaps, where = frontier_gaps(groups, name, points)
        spots = ", ".join(f"{where.count(w)} {w}" for w in dict.fromkeys(where))
        vio = summarize([metric_value(r, "maxvio_global") for r in groups[name]])
        context = (
            f"at MaxVio_global {vio.fmt()}; seeds on the frontier: {spots}"
            if where
            else "no seed with two frontier runs"
        )
        compared = f"{name} vs the {gate} aux frontier ({len(points)} strategies)"
        rows.append(
            _Row("g", text, compared, (_loss_test(gaps, margin, "val loss - frontier"),), context)
        )
    return rows or [_unmeasured("g", text, "a loss-free run and two aux-loss runs of its gate")]


def _fmt_test(t: _Test, p_adjusted: float, family: int) -> str:
    p = t.test.paired
    if p.n < 2:
        return f"{t.label} {p.fmt(t.spec, t.unit)}"
    spec = t.spec
    against = "" if t.test.threshold == 0 else f" vs margin {t.test.threshold:+g} {t.unit}"
    unit = f" {t.unit}" if t.unit else ""
    return (
        f"{t.label} {p.mean:{spec}}{unit} ({LEVEL:.0%} CI [{t.test.low:{spec}}, "
        f"{t.test.high:{spec}}], {p.n} seeds){against}; p {t.test.p:.3g}, Holm p "
        f"{p_adjusted:.3g} (family of {family})"
    )


def claims(
    results: Sequence[dict], *, run_steps: int, margin: float = LOSS_MARGIN, alpha: float = ALPHA
) -> list[Claim]:
    """The claims section, computed from the runs.

    The rows (each a paired t test over seeds, or two that must both hold):

    - the reference loss-free strategy (``bias_rate > 0``; prefer no aux loss, sigmoid,
      rule ``sign``, ``global`` scope, the rate nearest 1e-3) against every aux-loss
      strategy (``aux_coef > 0``, ``bias_rate == 0``): (a) ``maxvio_global`` lower, (b)
      ``val_loss`` no worse (below ``margin``), (c) its :func:`curve_slope` below 0 and
      below the aux run's;
    - (d) the reference against the loss-free strategies that differ only in
      ``bias_rate`` (see :func:`_rate_sweep`);
    - (e) every sigmoid strategy with balancing against the softmax one equal in all
      other fields: ``val_loss`` no worse;
    - (f) every ``global``-scope strategy against those differing only in
      ``balance_scope``: mean ``specialisation_mi`` higher and ``val_loss`` no worse;
    - (g) every loss-free strategy against the aux frontier of its gate (and the
      reference against softmax's): ``val_loss`` minus the frontier's at the same
      MaxVio_global no worse (:func:`frontier_gaps`).

    Each claim's tests are Holm-corrected together at ``alpha`` (the module docstring).
    A claim whose strategies are absent gets one :data:`UNMEASURED` row saying what it
    needs. ``run_steps`` (training steps per run) stands in for ``steps_to_balance`` of a
    run that never balanced.
    """
    groups = group_runs(results)
    ref = reference_strategy(groups)
    rows = [
        *_lossfree_vs_aux(groups, ref, margin),
        *_rate_sweep(groups, ref, run_steps),
        *_gates(groups, margin),
        *_scopes(groups, margin),
        *_pareto(groups, ref, margin),
    ]
    rows.sort(key=lambda row: row.key)  # stable: each claim's rows together, in order
    adjusted: dict[str, list[float]] = {}
    for key in dict.fromkeys(r.key for r in rows):
        family = [t.test.p for r in rows if r.key == key for t in r.tests]
        adjusted[key] = holm(family)
    out, position = [], dict.fromkeys(adjusted, 0)
    for row in rows:
        family = adjusted[row.key]
        size = sum(math.isfinite(p) for p in family)
        verdicts, texts = [], [row.context] if row.context else []
        for t in row.tests:
            p_adj = family[position[row.key]]
            position[row.key] += 1
            verdicts.append(_decide(t.test, p_adj, t.want, alpha))
            texts.append(_fmt_test(t, p_adj, size))
        if not row.tests:
            verdict = UNMEASURED
        elif NO in verdicts:
            verdict = NO
        elif all(v == YES for v in verdicts):
            verdict = YES
        elif any(v in (ONE_SEED, UNMEASURED) for v in verdicts):
            verdict = ONE_SEED if ONE_SEED in verdicts else UNMEASURED
        else:
            verdict = INCONCLUSIVE
        out.append(Claim(row.key, row.claim, row.compared, verdict, "; ".join(texts)))
    return out


def table_error_bound(rows: Sequence[Claim], alpha: float = ALPHA) -> tuple[int, float]:
    """``(K, bound)``: the claims (families) with at least one test, and the chance that
    any of them gives a false yes or no when nothing differs: at most ``K * alpha``
    (each family is held at ``alpha`` by Holm; the union bound joins them)."""
    tested = {r.key for r in rows if r.verdict in (YES, NO, INCONCLUSIVE)}
    return len(tested), min(1.0, len(tested) * alpha)
