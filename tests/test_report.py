"""The report's statistics and claims on made-up results (the fields of SCHEMA16 / compare),
and write_report on tiny made-up metrics files. No training, no JAX."""

import json
import math

import numpy as np
import pytest

from sigmoid_moe.harness.report import PLOTS, results_table, write_report
from sigmoid_moe.harness.stats import (
    NO,
    NOISE,
    ONE_SEED,
    UNMEASURED,
    YES,
    band,
    claims,
    curve_slope,
    exceeds_spread,
    group_runs,
    paired,
    summarize,
    verdict,
)

SIZES = [16, 64, 256, 1024, 4096]
LAYERS, EXPERTS = 2, 4
STRATEGY = {
    "score_fn": "sigmoid",
    "aux_coef": 0.0,
    "aux_loss": "switch",
    "bias_rate": 0.0,
    "bias_rule": "sign",
    "balance_scope": "global",
}
SOFTMAX_AUX = {**STRATEGY, "score_fn": "softmax", "aux_coef": 1e-3}
SIGMOID_AUX = {**STRATEGY, "aux_coef": 1e-3}
LOSS_FREE = {**STRATEGY, "bias_rate": 1e-3}
NONE = dict(STRATEGY)


def _falling(c):  # a curve like the uniform floor: slope -1/2 in log-log
    return [c / math.sqrt(s) for s in SIZES]


def _flat(c):  # held up by global imbalance
    return [c + 1 / math.sqrt(s) for s in SIZES]


def _run(name, strategy, seed, **values):
    """One run dict with every SCHEMA16 field; ``values`` override the defaults."""
    run = {
        "name": name,
        "kind": "loss-free bias" if strategy["bias_rate"] > 0 else "aux loss",
        "strategy": {"name": name, **strategy},
        "seed": seed,
        "run_dir": "",
        "seconds": 10.0,
        "val_loss": 1.45,
        "val_ppl": math.exp(1.45),
        "val_bits_per_byte": 1.45 / math.log(2),
        "val_tokens": 8192,
        "maxvio_global": 0.5,
        "maxvio_global_per_layer": [0.4, 0.6],
        "maxvio_global_floor": 0.05,
        "maxvio_global_train": 0.45,
        "maxvio_global_train_per_layer": [0.35, 0.55],
        "maxvio_batch_steady": 0.3,
        "maxvio_batch_steady_per_layer": [0.2, 0.4],
        "maxvio_batch_all": 1.0,
        "steady_steps": 10,
        "steps_to_balance": 20,
        "maxvio_batch_late_std": 0.05,
        "maxvio_batch_floor": 0.08,
        "dead_experts_per_layer": [0, 1],
        "load_fraction": [[0.25] * EXPERTS] * LAYERS,
        "domain_fraction": {"code": [[0.4, 0.3, 0.2, 0.1]] * LAYERS, "prose": [[0.25] * 4] * 2},
        "domain_tokens": {"code": 4096, "prose": 4096},
        "specialisation_mi_per_layer": [0.05, 0.07],
        "specialisation_mi_floor": 0.001,
        "batch_curve": {"sizes": SIZES, "maxvio": _flat(0.5), "floor": _falling(1.0)},
    }
    run.update(values)
    return run


def _results(table, seeds=(0, 1, 2)):
    """``table``: ``{name: (strategy, {field: value or [value per seed]})}``."""
    out = []
    for name, (strategy, fields) in table.items():
        for i, seed in enumerate(seeds):
            values = {k: v[i] if isinstance(v, list) and k not in _LISTS else v
                      for k, v in fields.items()}  # fmt: skip
            out.append(_run(name, strategy, seed, **values))
    return out


_LISTS = {k for k, v in _run("x", STRATEGY, 0).items() if isinstance(v, list)}


def _by_key(rows, key):
    return [c for c in rows if c.key == key]


# --- spreads -----------------------------------------------------------------------------


def test_summarize_min_max_below_five_seeds():
    s = summarize([1.0, 2.0, 4.0])
    # mean 7/3; deviations -4/3, -1/3, 5/3 -> sum of squares 42/9, / (n-1) = 7/3
    assert s.mean == pytest.approx(7 / 3) and s.sd == pytest.approx(math.sqrt(7 / 3))
    assert (s.low, s.high, s.n, s.missing, s.rule) == (1.0, 4.0, 3, 0, "min/max")
    assert s.fmt(".2f") == "2.33 [1.00, 4.00]"


def test_summarize_sd_from_five_seeds():
    s = summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    # deviations -2..2 -> sum of squares 10, / 4 = 2.5
    assert s.sd == pytest.approx(math.sqrt(2.5)) and s.rule == "sd"
    assert (s.low, s.high) == pytest.approx((3 - math.sqrt(2.5), 3 + math.sqrt(2.5)))
    assert s.fmt(".2f") == "3.00 ± 1.58"


def test_summarize_one_seed_and_missing_values():
    one = summarize([1.5])
    assert (one.rule, one.low, one.high, one.fmt()) == ("1 seed", 1.5, 1.5, "1.500")
    assert math.isnan(one.sd)
    s = summarize([math.nan, 100.0, 300.0])  # one run never balanced
    assert (s.n, s.missing, s.mean) == (2, 1, 200.0)
    assert s.fmt(".0f", "never") == "200 [100, 300] (1 of 3 never)"
    assert summarize([math.nan, math.nan]).fmt(".0f", "never") == "never"


def test_band_follows_the_same_rule():
    curves = np.array([[1.0, 2.0], [3.0, 2.0], [2.0, 5.0]])
    mean, low, high = band(curves)
    np.testing.assert_allclose(mean, [2.0, 3.0])
    np.testing.assert_array_equal(low, [1.0, 2.0])
    np.testing.assert_array_equal(high, [3.0, 5.0])
    five = np.arange(5.0)[:, None] * [1.0, 2.0]  # columns 0..4 and 0..8
    mean, low, high = band(five)
    np.testing.assert_allclose(high - mean, [math.sqrt(2.5), 2 * math.sqrt(2.5)])
    mean, low, high = band(np.array([[4.0, 5.0]]))
    np.testing.assert_array_equal(low, high)


# --- paired differences and the verdict rule --------------------------------------------


def test_paired_uses_only_common_seeds():
    def runs(name, values_by_seed):
        return [_run(name, STRATEGY, s, val_loss=v) for s, v in values_by_seed.items()]

    a = runs("a", {0: 1.0, 1: 2.0, 2: 3.0, 3: 9.0})
    b = runs("b", {0: 0.9, 1: 1.85, 2: 2.95, 5: 1.0})
    p = paired(a, b, "val_loss")
    # seeds 0, 1, 2: differences 0.10, 0.15, 0.05 -> mean 0.10, sd 0.05 (deviations 0, +-0.05)
    assert p.seeds == (0, 1, 2) and p.n == 3
    np.testing.assert_allclose(p.diffs, [0.10, 0.15, 0.05])
    assert (p.mean, p.sd) == pytest.approx((0.10, 0.05))
    assert p.agree == 3 and p.exceeds  # 0.10 > 0.05, all positive
    assert p.fmt("+.3f", "nats") == "+0.100 ± 0.050 nats, 3 of 3 seeds positive"
    assert paired(a[3:], b[3:], "val_loss").fmt() == "no seed in common"
    assert paired(a[:1], b[:1], "val_loss").fmt("+.2f") == "+0.10 (1 seed, no spread)"
    assert paired(a, a, "val_loss").fmt("+.1f") == "+0.0 ± 0.0, equal in all 4 seeds"


@pytest.mark.parametrize(
    "diffs, exceeds",
    [
        ([0.10, 0.15, 0.05], True),
        ([1.0, 1.1], True),  # mean 1.05 > sd 0.071
        ([-0.2, -0.3, -0.25], True),
        ([0.1, -0.01, 0.2], False),  # mixed signs
        ([0.0, 0.1, 0.2], False),  # a zero difference has no sign
        ([0.01, 0.01, 1.0], False),  # one sign, but mean 0.34 < sd 0.57
        ([5.0], False),  # one seed: never
        ([], False),
    ],
)
def test_exceeds_spread(diffs, exceeds):
    assert exceeds_spread(diffs) is exceeds


def test_verdict():
    def runs(name, values):
        return [_run(name, STRATEGY, s, val_loss=v) for s, v in enumerate(values)]

    lower = paired(runs("a", [1.0, 1.1, 1.2]), runs("b", [1.2, 1.3, 1.5]), "val_loss")
    assert verdict(lower, -1) == YES and verdict(lower, +1) == NO
    mixed = paired(runs("a", [1.0, 1.4, 1.2]), runs("b", [1.2, 1.3, 1.5]), "val_loss")
    assert verdict(mixed, -1) == NOISE
    assert verdict(paired(runs("a", [1.0]), runs("b", [2.0]), "val_loss"), -1) == ONE_SEED
    assert verdict(paired(runs("a", []), runs("b", [2.0]), "val_loss"), -1) == UNMEASURED


@pytest.mark.parametrize("n, rate", [(2, 0.39), (3, 0.21), (5, 0.055)])
def test_documented_false_pass_rate_under_no_difference(n, rate):
    diffs = np.random.default_rng(n).standard_normal((8000, n))
    passed = np.mean([exceeds_spread(d) for d in diffs])
    assert abs(passed - rate) < 0.02, passed


def test_group_runs_sorts_by_seed_and_refuses_duplicates():
    results = [_run("a", STRATEGY, 2), _run("b", LOSS_FREE, 0), _run("a", STRATEGY, 0)]
    groups = group_runs(results)
    assert list(groups) == ["a", "b"] and [r["seed"] for r in groups["a"]] == [0, 2]
    with pytest.raises(ValueError, match="'a' has seeds"):
        group_runs([_run("a", STRATEGY, 0), _run("a", STRATEGY, 0)])
    with pytest.raises(ValueError, match="two different strategy"):
        group_runs([_run("a", STRATEGY, 0), _run("a", LOSS_FREE, 1)])


def test_curve_slope_over_the_large_sizes():
    falling = _run("a", STRATEGY, 0, batch_curve={"sizes": SIZES, "maxvio": _falling(2.0)})
    assert curve_slope(falling) == pytest.approx(-0.5)
    flat = {"sizes": SIZES, "maxvio": [0.7] * len(SIZES)}
    assert curve_slope(_run("a", STRATEGY, 0, batch_curve=flat)) == pytest.approx(0.0)
    # only the upper half counts: a steep start does not make a flat tail fall
    bent = {"sizes": SIZES, "maxvio": [5.0, 2.0, 0.7, 0.7, 0.7]}
    assert curve_slope(_run("a", STRATEGY, 0, batch_curve=bent)) == pytest.approx(0.0)
    one = {"sizes": [16], "maxvio": [1.0]}
    assert math.isnan(curve_slope(_run("a", STRATEGY, 0, batch_curve=one)))


# --- the claims --------------------------------------------------------------------------


def _table(**changes):
    """Loss-free beats aux as in the paper; ``changes`` replaces whole strategies."""
    table = {
        "softmax+aux": (SOFTMAX_AUX, {"maxvio_global": [1.30, 1.40, 1.35],
                                      "val_loss": [1.440, 1.450, 1.445]}),
        "sigmoid+aux": (SIGMOID_AUX, {"maxvio_global": [1.20, 1.30, 1.25],
                                      "val_loss": [1.465, 1.479, 1.470]}),
        "lossfree": (LOSS_FREE, {"maxvio_global": [0.12, 0.14, 0.13],
                                 "val_loss": [1.430, 1.440, 1.436],
                                 "batch_curve": {"sizes": SIZES, "maxvio": _falling(2.0),
                                                 "floor": _falling(1.0)}}),
        "none": (NONE, {"maxvio_global": [3.0, 3.5, 3.2]}),
    }  # fmt: skip
    table.update(changes)
    return table


def _paper_like(**changes):
    return _results(_table(**changes))


def test_claims_yes_when_loss_free_wins():
    rows = claims(_paper_like(), run_steps=100)
    a, b, c = (_by_key(rows, k) for k in "abc")
    assert [r.compared for r in a] == ["lossfree vs softmax+aux", "lossfree vs sigmoid+aux"]
    assert [r.verdict for r in a + b + c] == [YES] * 6
    assert "paired -1.220 ± 0.040, 3 of 3 seeds negative" in a[0].figures
    assert "aux / loss-free = 10.4x" in a[0].figures
    # aux: 0.5 + 1/sqrt(b) at b = 256, 1024, 4096 -> slope ln(0.515625 / 0.5625) / ln 16 = -0.031
    assert "loss-free -0.50 [-0.50, -0.50], aux -0.03 [-0.03, -0.03]" in c[0].figures


def test_claims_flip_when_the_numbers_flip():
    table = _table()
    rows = claims(_results(table), run_steps=100)
    # loss-free and softmax+aux swap every measured number, keeping their strategies
    table["lossfree"], table["softmax+aux"] = (
        (LOSS_FREE, table["softmax+aux"][1]),
        (SOFTMAX_AUX, table["lossfree"][1]),
    )
    flipped = claims(_results(table), run_steps=100)
    for key in "abc":
        before, after = _by_key(rows, key)[0], _by_key(flipped, key)[0]
        assert before.compared == after.compared == "lossfree vs softmax+aux"
        assert (before.verdict, after.verdict) == (YES, NO), key


def test_claims_within_noise_when_seeds_disagree():
    results = _paper_like(
        lossfree=(LOSS_FREE, {"maxvio_global": [1.20, 1.50, 1.30],  # vs softmax 1.30 1.40 1.35
                              "val_loss": [1.445, 1.440, 1.450]}),  # vs 1.440 1.450 1.445
    )  # fmt: skip
    rows = claims(results, run_steps=100)
    assert _by_key(rows, "a")[0].verdict == NOISE
    assert _by_key(rows, "b")[0].verdict == NOISE
    assert "2 of 3 seeds negative" in _by_key(rows, "a")[0].figures  # -0.10, +0.10, -0.05


def test_claim_e_names_the_better_gate():
    (e,) = _by_key(claims(_paper_like(), run_steps=100), "e")
    # sigmoid - softmax: +0.025, +0.029, +0.025 -> +0.0263 +- 0.0023
    assert e.compared == "sigmoid+aux vs softmax+aux" and e.verdict == NO
    assert "+0.0263 ± 0.0023 nats/byte, 3 of 3 seeds positive" in e.figures
    assert "softmax lower by 0.0263" in e.figures


def _sweep(steps, late, steady):
    """Loss-free runs at u = 1e-4, 1e-3, 1e-2 with the given per-rate values."""
    table = {}
    for i, rate in enumerate((1e-4, 1e-3, 1e-2)):
        fields = {
            "steps_to_balance": steps[i],
            "maxvio_batch_late_std": late[i],
            "maxvio_batch_steady": steady[i],
        }
        table[f"lf{rate:g}"] = ({**LOSS_FREE, "bias_rate": rate}, fields)
    table["aux"] = (SIGMOID_AUX, {})
    return _results(table)


def test_claim_d_the_rate_sweep_shape():
    # 1e-4 never balances in 3 of 3 seeds (counted as run_steps = 100) vs 1e-3 at ~40
    good = _sweep(
        steps=[None, [40, 45, 50], [20, 25, 30]],
        late=[0.02, [0.05, 0.06, 0.05], [0.20, 0.30, 0.25]],
        steady=[[0.9, 1.0, 0.95], [0.20, 0.22, 0.21], [0.40, 0.45, 0.50]],
    )
    rows = _by_key(claims(good, run_steps=100), "d")
    assert [r.compared for r in rows] == [
        "lf0.0001 vs lf0.001",
        "lf0.001 vs lf0.0001",
        "lf0.01 vs lf0.001",
        "lf0.001 vs lf0.01",
    ]
    assert [r.verdict for r in rows] == [YES] * 4
    assert "+55 ± 5 steps, 3 of 3 seeds positive" in rows[0].figures
    bad = _sweep(
        steps=[[10, 12, 11], [40, 45, 50], [20, 25, 30]],  # the small rate is fastest
        late=[0.02, [0.05, 0.06, 0.05], [0.01, 0.02, 0.01]],  # the large one is calmest
        steady=[[0.1, 0.1, 0.1], [0.20, 0.22, 0.21], [0.40, 0.45, 0.50]],
    )
    assert [r.verdict for r in _by_key(claims(bad, run_steps=100), "d")] == [NO, NO, NO, YES]


def test_claim_f_scope_effect_on_specialisation():
    def scopes(global_mi, global_loss):
        table = {
            "lf-global": (LOSS_FREE, {"specialisation_mi_per_layer": global_mi,
                                      "val_loss": global_loss}),
            "lf-micro": ({**LOSS_FREE, "balance_scope": "micro"},
                         {"specialisation_mi_per_layer": [0.04, 0.06],
                          "val_loss": [1.450, 1.452, 1.448]}),
            "lf-sequence": ({**LOSS_FREE, "balance_scope": "sequence"},
                            {"specialisation_mi_per_layer": [0.04, 0.06],
                             "val_loss": [1.450, 1.452, 1.448]}),
        }  # fmt: skip
        return _by_key(claims(_results(table), run_steps=100), "f")

    rows = scopes([0.10, 0.12], [1.449, 1.453, 1.448])  # MI +0.06 every seed, loss within noise
    assert [r.compared for r in rows] == ["lf-global vs lf-micro", "lf-global vs lf-sequence"]
    assert [r.verdict for r in rows] == [YES, YES]
    assert "MI global - micro +0.0600" in rows[0].figures
    worse = scopes([0.10, 0.12], [1.460, 1.462, 1.458])  # loss +0.01 in every seed
    assert [r.verdict for r in worse] == [NO, NO]
    less = scopes([0.02, 0.03], [1.449, 1.453, 1.448])
    assert [r.verdict for r in less] == [NO, NO]


def test_claims_identify_strategies_by_fields_not_names():
    results = _paper_like()
    names = {"softmax+aux": "A", "sigmoid+aux": "B", "lossfree": "C", "none": "D"}
    for r in results:
        r["name"] = r["strategy"]["name"] = names[r["name"]]
    rows = claims(results, run_steps=100)
    assert [r.verdict for r in rows] == [r.verdict for r in claims(_paper_like(), run_steps=100)]
    assert _by_key(rows, "a")[0].compared == "C vs A"


def test_claims_not_measured_without_their_strategies():
    only_aux = _results({"softmax+aux": (SOFTMAX_AUX, {}), "sigmoid+aux": (SIGMOID_AUX, {})})
    rows = claims(only_aux, run_steps=100)
    verdicts = {c.key: c.verdict for c in rows}
    assert verdicts == {"a": UNMEASURED, "b": UNMEASURED, "c": UNMEASURED, "d": UNMEASURED,
                        "e": NOISE, "f": UNMEASURED}  # fmt: skip
    assert "needs a loss-free run" in _by_key(rows, "a")[0].figures


def test_claims_with_one_seed_say_so():
    rows = claims(_paper_like()[::3], run_steps=100)  # seed 0 of each strategy
    assert {c.verdict for c in rows} == {ONE_SEED, UNMEASURED}
    assert "(1 seed, no spread)" in _by_key(rows, "a")[0].figures


# --- the table and the report -------------------------------------------------------------


def test_results_table_rows_and_cells():
    results = _paper_like(
        lossfree=(LOSS_FREE, {"steps_to_balance": [None, 30, 50],
                              "val_loss": [1.430, 1.440, 1.436]}),
    )  # fmt: skip
    table = results_table(results).splitlines()
    assert len(table) == 2 + 4 + 1  # header, rule, four strategies, floors
    assert len({line.count("|") for line in table}) == 1
    row = next(line for line in table if line.startswith("| lossfree"))
    assert "| loss-free bias, global | 3 |" in row
    assert "1.4353 [1.4300, 1.4400]" in row  # val loss mean and min/max over 3 seeds
    assert "40 [30, 50] (1 of 3 never)" in row
    assert table[-1].startswith("| uniform floor |") and "0.050" in table[-1]
    single = results_table(results[::3]).splitlines()
    assert "| 1 | 1.4300 |" in next(line for line in single if line.startswith("| lossfree"))


def _write_run_files(run, root, steps=30):
    run_dir = root / "runs" / f"{run['name']}-seed{run['seed']}"
    run_dir.mkdir(parents=True)
    rng = np.random.default_rng(run["seed"])
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            load = rng.integers(50, 150, (LAYERS, EXPERTS)).tolist()
            line = {
                "step": step,
                "loss": 3.0 - step / steps,
                "maxvio": (2.0 / step + rng.uniform(0, 0.1, LAYERS)).tolist(),
                "bias": (rng.normal(0, 1e-3, (LAYERS, EXPERTS)) * step).tolist(),
                "load": load,
                "aux_loss": [0.01] * LAYERS,
            }
            f.write(json.dumps(line) + "\n")
    evals = [{"step": s, "val_loss": 3.0 - s / steps + 0.01 * run["seed"]} for s in (10, 20, 30)]
    (run_dir / "eval.jsonl").write_text("\n".join(json.dumps(e) for e in evals) + "\n")
    run["run_dir"] = str(run_dir)


def _summary(results, root):
    for r in results:
        _write_run_files(r, root)
    model = {"num_layers": LAYERS, "d_model": 32, "num_experts": EXPERTS, "top_k": 2,
             "d_ff": 64, "seq_len": 64}  # fmt: skip
    data = {"files": [{"bytes": 1000}, {"bytes": 2000}], "domains": ["code", "prose"],
            "val_windows": 128, "val_split": "spread"}  # fmt: skip
    seeds = sorted({r["seed"] for r in results})
    base = {"model": model, "batch_size": 8, "steps": 30}
    return {"base_config": base, "data": data, "seeds": seeds, "preset": "tiny", "results": results}


@pytest.mark.parametrize("seeds", [(0, 1, 2), (0,)], ids=["3 seeds", "1 seed"])
def test_write_report_writes_every_plot_and_section(tmp_path, seeds):
    results = [r for r in _paper_like() if r["seed"] in seeds]
    path = write_report(tmp_path, _summary(results, tmp_path))
    for plot in PLOTS:
        assert (tmp_path / plot).stat().st_size > 1000, plot
    report = path.read_text()
    sections = ("Results", "Claims", "Paired comparisons", "Per-layer balance",
                "MaxVio over computation-batch sizes", "Which experts each domain")  # fmt: skip
    for section in sections:
        assert f"## {section}" in report, section
    assert "per **byte**" in report and "not comparable with the paper's per-token PPL" in report
    assert f"seeds {', '.join(map(str, seeds))} ({len(seeds)} per strategy)" in report
    assert "in-distribution" in report
    comparisons = report[report.index("## Paired comparisons") : report.index("## Per-layer")]
    sentence = next(line for line in comparisons.splitlines() if line.startswith("- `softmax"))
    if len(seeds) == 3:
        assert "MaxVio_global +1.220 ± 0.040, 3 of 3 seeds positive: exceeds the seed" in sentence
        assert "| a | loss-free MaxVio_global below" in report and "| **yes** |" in report
    else:
        assert sentence.count("(1 seed, no spread)") == 2 and "| **yes** |" not in report
    per_layer = report[report.index("## Per-layer") : report.index("## MaxVio over")]
    assert "| lossfree | 1 |" in per_layer  # one row per strategy and layer


def test_gate_ablation_separates_the_gate_from_the_aux_loss():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "gate_ablation.py"
    spec = importlib.util.spec_from_file_location("gate_ablation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    runs = module.strategies(1e-3)
    assert len({s.name for s in runs}) == len(runs) == 6
    # Each sigmoid strategy has a softmax twin that differs only in the gate.
    for s in runs:
        if s.score_fn == "sigmoid":
            twins = [t for t in runs if t.score_fn == "softmax" and t.aux_coef == s.aux_coef]
            assert len(twins) == 1 and twins[0].bias_rate == s.bias_rate == 0
