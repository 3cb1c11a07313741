"""The research harness: short real training runs at tiny sizes."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from sigmoid_moe.cli import main
from sigmoid_moe.harness import (
    PRESETS,
    DataConfig,
    ModelConfig,
    TrainConfig,
    build_corpus,
    train,
)
from sigmoid_moe.harness.checkpoint import Checkpointer
from sigmoid_moe.harness.data import train_batch
from sigmoid_moe.harness.report import PLOTS

# The whole module runs on one worker (pyproject: --dist loadgroup), so its module
# fixtures are built once; tests/test_xdist_groups.py checks that the group is in effect.
pytestmark = pytest.mark.xdist_group("harness")

TINY = PRESETS["tiny"].base


def _config(**changes) -> TrainConfig:
    return dataclasses.replace(TINY, **changes)


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(TINY.data, TINY.model.seq_len)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, corpus):
    """An uninterrupted 20-step run with the loss-free bias on."""
    config = _config(steps=20, checkpoint_every=10, bias_rate=1e-2)
    out = tmp_path_factory.mktemp("reference")
    train(config, out, progress=False, corpus=corpus)
    return config, out


def test_default_corpus_has_two_recorded_domains(corpus):
    assert corpus.domains == ("code", "prose")
    assert {f["domain"] for f in corpus.manifest} == {"code", "prose"}
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in corpus.manifest)
    assert set(np.unique(corpus.val_domain)) == {0, 1}
    again = build_corpus(TINY.data, TINY.model.seq_len)
    np.testing.assert_array_equal(corpus.train, again.train)
    np.testing.assert_array_equal(corpus.val, again.val)
    a = train_batch(corpus, 123, 4, seed=0)
    np.testing.assert_array_equal(a, train_batch(corpus, 123, 4, seed=0))
    assert a.shape == (4, TINY.model.seq_len + 1) and a.dtype == np.uint8


def test_user_data_and_missing_path(tmp_path):
    (tmp_path / "a.txt").write_text("hello world, " * 400)
    corpus = build_corpus(DataConfig(paths=(f"mine={tmp_path}",)), 16)
    assert corpus.domains == ("mine",) and corpus.manifest[0]["path"].endswith("a.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_corpus(DataConfig(paths=(str(tmp_path / "nope"),)), 16)


def test_config_validation_names_the_argument():
    with pytest.raises(ValueError, match="steps"):
        _config(steps=0)
    with pytest.raises(ValueError, match="bias_rule"):
        _config(bias_rule="median")
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(d_model=32, num_heads=3)
    with pytest.raises(TypeError, match="model"):
        TrainConfig(model="big")
    with pytest.raises(ValueError, match="val_fraction"):
        DataConfig(val_fraction=0.9)
    with pytest.raises(ValueError, match="bias_rate_schedule: schedule 'linear'"):
        _config(bias_rate_schedule="linear")
    with pytest.raises(ValueError, match="interference_every"):
        _config(interference_every=-1)


def test_a_rate_schedule_name_means_the_same_in_the_lab_and_the_harness():
    """One meaning per name: "cosine" decays to 0 at the run's end in both (and freeze:N
    and warmup:N are the same functions); the harness's u(step) is the lab's multiplier
    times u."""
    from sigmoid_moe.lab.cli import parse_schedule

    for name in ("cosine", "freeze:10", "warmup:7"):
        harness = _config(bias_rate=1e-3, bias_rate_schedule=name, steps=30).bias_rate_fn()
        lab = parse_schedule(name, 30)
        for step in (0, 5, 10, 15, 29, 30):
            assert float(harness(step)) == pytest.approx(1e-3 * float(lab(step)), rel=1e-6)
    cosine = _config(bias_rate=1e-3, bias_rate_schedule="cosine").bias_rate_fn()
    assert float(cosine(0)) == pytest.approx(1e-3) and float(cosine(TINY.steps)) == 0.0
    assert parse_schedule("constant", 30) is None


def test_loss_goes_down(tmp_path, corpus):
    train(_config(steps=40, eval_every=40), tmp_path, progress=False, corpus=corpus)
    losses = [m["loss"] for m in _metrics(tmp_path)]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    record = _metrics(tmp_path)[-1]
    num_layers, num_experts = TINY.model.num_layers, TINY.model.num_experts
    assert np.asarray(record["load"]).shape == (num_layers, num_experts)
    assert np.asarray(record["bias"]).shape == (num_layers, num_experts)
    assert len(record["maxvio"]) == len(record["aux_loss"]) == num_layers


def test_train_step_compiles_once_per_step_relevant_config():
    """Seeds, data, evaluation/checkpoint cadence, the run's length and schedules, the
    bias rate and the global-scope aux coefficient do not change the step's program: one
    cached jit for all of them (the numbers are inputs); anything structural (the rule,
    the model, the scope, the micro-batching) makes a new one."""
    from flax import nnx

    from sigmoid_moe.harness.model import TransformerLM
    from sigmoid_moe.harness.train import make_train_step
    from sigmoid_moe.routing_bias import RoutingBias

    def step_of(config):
        model = TransformerLM(config.model, rngs=nnx.Rngs(0))
        graphdef = nnx.split(model, nnx.Param, RoutingBias)[0]
        return make_train_step(graphdef, config)

    step = step_of(TINY).program
    aux = dataclasses.replace(TINY.model, balance_loss_coef=1e-2)
    same = dict(
        seed=3,
        eval_every=7,
        checkpoint_every=2,
        interference_every=3,
        weight_decay=0.0,
        data=DataConfig(code_bytes=1000, prose_bytes=1000),
        bias_rate=1e-2,
        model=aux,
        steps=31,
        warmup_steps=2,
        learning_rate=1e-3,
        final_lr_fraction=0.5,
        bias_rate_schedule="cosine",
    )
    for field, value in same.items():
        assert step_of(_config(**{field: value})).program is step, field
    other = dict(
        grad_accum=2,
        bias_rule="proportional",
        grad_clip=0.5,
        model=dataclasses.replace(aux, balance_scope="micro"),
    )
    for field, value in other.items():
        assert step_of(_config(**{field: value})).program is not step, field
    # Several micro-batches: the aux loss needs a counting pass, a program of its own.
    accum = _config(grad_accum=2)
    assert step_of(dataclasses.replace(accum, model=aux)).program is not step_of(accum).program
    assert step_of(dataclasses.replace(accum, bias_rate=0.0)).program is step_of(accum).program


def test_optimizer_with_the_rate_as_input_equals_optax_adamw_with_the_schedule():
    """The step's optimizer is optax.adamw under optax.inject_hyperparams, its learning rate
    set in the state each step from the schedule's value: updates and state bit for bit
    those of the same optimizer running the schedule itself, and the updates those of plain
    optax.adamw with the schedule."""
    import jax
    import optax

    from sigmoid_moe.harness.train import optimizer, with_learning_rate

    config = _config(steps=12, warmup_steps=3, weight_decay=0.1)
    schedule = config.lr_schedule()
    mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    scheduled = optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.inject_hyperparams(optax.adamw, static_args="mask")(
            learning_rate=schedule, b1=0.9, b2=0.95, weight_decay=0.1, mask=mask
        ),
    )
    plain = optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1, mask=mask),
    )
    ours = optimizer(config.grad_clip, config.weight_decay, schedule(0))
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "n": jnp.ones(3)}
    state_ref, state_plain, state = scheduled.init(params), plain.init(params), ours.init(params)
    # the same AdamW state (the scheduled one also counts its schedule's steps)
    assert jax.tree.structure(state_ref[1].inner_state) == jax.tree.structure(state[1].inner_state)
    p_ref = p_plain = p_ours = params
    for step in range(5):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        lr = jax.jit(schedule)(jnp.asarray(step, jnp.int32))
        up_ref, state_ref = jax.jit(scheduled.update)(grads, state_ref, p_ref)
        up_plain, state_plain = jax.jit(plain.update)(grads, state_plain, p_plain)
        up, state = jax.jit(ours.update)(grads, with_learning_rate(state, lr), p_ours)
        p_ref, p_ours = optax.apply_updates(p_ref, up_ref), optax.apply_updates(p_ours, up)
        p_plain = optax.apply_updates(p_plain, up_plain)
        leaves = (
            jax.tree.leaves((p_ref, state_ref[1].inner_state)),
            jax.tree.leaves((p_ours, state[1].inner_state)),
        )
        assert state[1].hyperparams["learning_rate"] == lr
        for a, b in zip(*leaves, strict=True):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(jax.tree.leaves(p_plain), jax.tree.leaves(p_ours), strict=True):
            np.testing.assert_array_equal(a, b)


def test_schedules_are_the_steps_inputs_with_the_values_of_the_optax_schedules():
    """The step's learning rate and bias rate are the optax schedules' values at that
    step, computed with the run's own numbers (no unit rate multiplied back in), so runs
    of different lengths share a program without changing their numbers."""
    from flax import nnx

    from sigmoid_moe.harness.model import TransformerLM
    from sigmoid_moe.harness.train import make_train_step
    from sigmoid_moe.routing_bias import RoutingBias

    config = _config(
        steps=40, warmup_steps=7, bias_rate=1e-2, bias_rate_schedule="cosine", learning_rate=2e-3
    )
    model = TransformerLM(config.model, rngs=nnx.Rngs(0))
    step = make_train_step(nnx.split(model, nnx.Param, RoutingBias)[0], config)
    peak, end, warm = 2e-3, 2e-3 * config.final_lr_fraction, 7
    for s in (0, 3, 7, 20, 39):
        got = step.rates(jnp.asarray(s, jnp.int32))
        assert got["learning_rate"].dtype == got["bias_rate"].dtype == jnp.float32
        cosine = 0.5 * (1 + np.cos(np.pi * (s - warm) / (40 - warm)))
        want_lr = peak * s / warm if s < warm else end + (peak - end) * cosine
        np.testing.assert_allclose(got["learning_rate"], want_lr, rtol=1e-6, atol=1e-12)
        want_u = 1e-2 * 0.5 * (1 + np.cos(np.pi * s / 40))  # decays to 0
        # float32: relative 1e-6 of the peak (near the end 1 + cos cancels)
        np.testing.assert_allclose(got["bias_rate"], want_u, rtol=1e-6, atol=1e-2 * 1e-6)


def test_interference_is_logged_on_its_steps_and_changes_no_number(tmp_path, corpus):
    """An aux-loss run logs the cosine and norm ratio of the aux and LM gradients on each
    layer's router weights at steps 1, 1 + every, ...; the training numbers are those of
    the same run without the logging, bit for bit. Checked against gradients computed
    here from the logged run's first step."""
    import jax
    from flax import nnx

    from sigmoid_moe.harness.model import TransformerLM
    from sigmoid_moe.routing_bias import RoutingBias

    aux = dataclasses.replace(TINY.model, balance_loss_coef=1e-2)
    config = _config(model=aux, steps=4, interference_every=3, eval_every=4)
    train(config, tmp_path / "logged", progress=False, corpus=corpus)
    train(dataclasses.replace(config, interference_every=0), tmp_path / "plain",
          progress=False, corpus=corpus)  # fmt: skip
    logged, plain = _metrics(tmp_path / "logged"), _metrics(tmp_path / "plain")
    assert [m["step"] for m in logged if "aux_lm_cosine" in m] == [1, 4]
    assert not any("aux_lm_cosine" in m for m in plain)
    for a, b in zip(logged, plain, strict=True):
        assert {k: a[k] for k in b} == b  # every other number, bit for bit
    # Step 1 by hand: gradients of the cross-entropy and of the aux loss (the global-scope
    # balance loss the step adds) on each router weight, at the initial parameters.
    model = TransformerLM(aux, rngs=nnx.Rngs(params=jax.random.key(config.seed)))
    _, params, bias = nnx.split(model, nnx.Param, RoutingBias)
    tokens = jnp.asarray(train_batch(corpus, 0, config.batch_size, config.seed), jnp.int32)

    def losses(params):
        import optax

        from sigmoid_moe.losses import balance_loss

        out = nnx.merge(nnx.graphdef(model), params, bias)(tokens[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, tokens[:, 1:]).mean()
        step_tokens = tokens.shape[0] * (tokens.shape[1] - 1)
        balance = balance_loss(out.aux.expert_load, out.aux.router_prob, step_tokens, aux.top_k)
        return ce, 1e-2 * jnp.sum(balance)

    g_ce, g_aux = jax.jit(jax.jacrev(losses))(params)
    for layer in range(aux.num_layers):
        lm = np.asarray(g_ce["blocks"][layer]["moe"]["router_w_de"][...], np.float64).ravel()
        ax = np.asarray(g_aux["blocks"][layer]["moe"]["router_w_de"][...], np.float64).ravel()
        cosine = lm @ ax / np.linalg.norm(lm) / np.linalg.norm(ax)
        ratio = np.linalg.norm(ax) / np.linalg.norm(lm)
        assert logged[0]["aux_lm_cosine"][layer] == pytest.approx(cosine, abs=1e-4)
        assert logged[0]["aux_lm_norm_ratio"][layer] == pytest.approx(ratio, rel=1e-4)


def test_rerun_is_bit_identical(tmp_path, reference_run, corpus):
    config, out = reference_run
    train(config, tmp_path, progress=False, corpus=corpus)
    assert (tmp_path / "metrics.jsonl").read_text() == (out / "metrics.jsonl").read_text()
    assert np.any(np.asarray(_metrics(out)[-1]["bias"]) != 0)


def test_interrupted_run_resumes_to_the_uninterrupted_metrics(tmp_path, reference_run, corpus):
    config, out = reference_run

    def interrupt(step, _):
        if step == 15:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path, progress=False, corpus=corpus, on_step=interrupt)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.latest_step() == 10  # the last checkpoint before the interruption
    ckpt.close()
    result = train(config, tmp_path, progress=False, corpus=corpus)
    assert result.step == 20
    assert (tmp_path / "metrics.jsonl").read_text() == (out / "metrics.jsonl").read_text()


def test_resume_with_another_config_is_refused(tmp_path, reference_run, corpus):
    config, out = reference_run
    train(dataclasses.replace(config, steps=10), tmp_path, progress=False, corpus=corpus)
    with pytest.raises(ValueError, match="different config"):
        train(dataclasses.replace(config, seed=1), tmp_path, progress=False, corpus=corpus)


@pytest.mark.slow
def test_lossfree_bias_lowers_maxvio_on_a_skewed_router(tmp_path, corpus):
    skewed = dataclasses.replace(TINY.model, router_init_scale=4.0)
    vio = {}
    for rate in (0.0, 2e-2):
        config = _config(model=skewed, steps=80, bias_rate=rate, eval_every=80)
        out = tmp_path / f"rate{rate}"
        train(config, out, progress=False, corpus=corpus)
        vio[rate] = np.mean([np.mean(m["maxvio"]) for m in _metrics(out)[-20:]])
    assert vio[2e-2] < 0.6 * vio[0.0], vio


# `sigmoid-moe compare` of the tiny preset as test_cli_compare_writes_report_and_plots runs
# it; two seeds, so that the two-worker test compares its runs against these.
CLI_STEPS, CLI_SEEDS = 8, (0, 1)
CLI_LOSSFREE = "sigmoid+lossfree(0.001,sign)"


@pytest.fixture(scope="module")
def cli_compare(tmp_path_factory):
    """``(exit status, out_dir, stdout)`` of the CLI comparison in one worker (its four
    runs of a seed share the worker's start-up; the seeds share its compilations)."""
    out = tmp_path_factory.mktemp("cli_compare") / "cmp"
    argv = ["compare", "--preset", "tiny", "--steps", str(CLI_STEPS), "--out", str(out)]
    argv += ["--seeds", ",".join(map(str, CLI_SEEDS)), "--quiet", "--jobs", "1"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main(argv)
    return status, out, stdout.getvalue()


@pytest.mark.slow
def test_cli_compare_writes_report_and_plots(cli_compare):
    status, out, stdout = cli_compare
    assert status == 0
    report = (out / "report.md").read_text()
    # the tiny preset is a smoke test and says so first
    assert report.splitlines()[0].startswith("**Smoke test, not evidence.**")
    for name in ("softmax+aux", "sigmoid+aux", CLI_LOSSFREE, "sigmoid+none"):
        assert name in report
    assert "MaxVio_global" in report and "floor" in report
    for plot in PLOTS:
        assert (out / plot).stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())["results"]
    assert {r["kind"] for r in results} == {"aux loss", "loss-free bias", "none"}
    assert all(set(r["domain_fraction"]) == {"code", "prose"} for r in results)
    for r in results:
        # the validation-loss curve ends on the table's value: the same windows
        evals = [json.loads(line) for line in open(pathlib.Path(r["run_dir"]) / "eval.jsonl")]
        assert evals[-1]["step"] == CLI_STEPS and evals[-1]["val_loss"] == r["val_loss"]
        assert evals[-1]["val_loss_per_domain"] == r["val_loss_per_domain"]
        assert set(r["val_loss_per_domain"]) == {"code", "prose"}
        logged = [m for m in _metrics(pathlib.Path(r["run_dir"])) if "aux_lm_cosine" in m]
        assert bool(logged) == (r["kind"] == "aux loss")  # interference: aux runs only
    assert "| strategy |" in stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rules", "median"], "unknown rule"),
        (["--bias-rates", "fast"], "comma-separated numbers"),
        (["--aux-coefs", "-1"], "argument --aux-coefs: must be > 0"),
        (["--steps", "0"], "steps"),
        (["--data", "/no/such/corpus"], "does not exist"),
        (["--preset", "huge"], "invalid choice"),
        (["--strategy", "sigmoid+magic"], "--strategy 'sigmoid+magic' is not one of"),
    ],
)
def test_cli_bad_flags_get_clear_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--preset", "tiny", "--quiet", "--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_a_second_run_of_the_same_config_compiles_nothing(tmp_path, corpus, reference_run):
    # Two models of one config have equal graphdefs (the layer keeps no per-instance
    # callables), so the cached train step and the evaluator's jit hit.
    config, _ = reference_run
    import jax.monitoring

    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        train(config, tmp_path / "again", progress=False, corpus=corpus)
        jax.jit(lambda v: v + 1)(np.float32(1))  # a control: a new program is heard
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(compiles) == 1  # the control's; the second run compiled nothing


def test_validation_windows_are_spread_through_every_region():
    from sigmoid_moe.harness.data import val_window_mask

    config = DataConfig(val_fraction=0.05)
    held = val_window_mask(1000, config, domain_index=0)
    assert held.sum() == 50
    # One window out of every stratum of 20 consecutive windows: every region is sampled.
    np.testing.assert_array_equal(held.reshape(50, 20).sum(axis=1), np.ones(50))
    np.testing.assert_array_equal(held, val_window_mask(1000, config, 0))  # deterministic
    assert not np.array_equal(held, val_window_mask(1000, config, 1))  # per domain
    other = dataclasses.replace(config, split_seed=1)
    assert not np.array_equal(held, val_window_mask(1000, other, 0))
    tail = val_window_mask(1000, dataclasses.replace(config, val_split="tail"), 0)
    assert tail.sum() == 50 and tail[-50:].all()  # the domain-shift probe: the end only


def test_built_corpus_validates_on_windows_of_every_file(tmp_path):
    # Five files of one domain, each of one repeated letter and 40 windows long: the spread
    # split holds out windows of every file (the tail split only of the last one).
    folder = tmp_path / "text"
    folder.mkdir()
    for i in range(5):
        (folder / f"f{i}.txt").write_bytes(bytes([65 + i]) * (40 * 33 - 1))
    paths = (f"text={folder}",)
    spread = build_corpus(DataConfig(paths=paths, val_fraction=0.05), seq_len=32)
    letters = {chr(b) for b in np.unique(spread.val) if 65 <= b < 70}
    assert letters == set("ABCDE")
    train_rows = {row.tobytes() for row in spread.train}
    assert len(spread.val) == 10 and len(spread.train) == 189  # 199 windows (files joined by \n)
    tail = build_corpus(DataConfig(paths=paths, val_split="tail"), seq_len=32)
    assert {chr(b) for b in np.unique(tail.val) if 65 <= b < 70} == {"E"}
    assert train_rows  # windows are disjoint by construction: each one is in one split
    with pytest.raises(ValueError, match="val_split"):
        DataConfig(val_split="random")


def test_specialisation_mutual_information_hand_worked():
    from sigmoid_moe.harness.evaluate import specialisation

    domain = np.array([0, 0, 1, 1])
    # Layer 0: domain 0 uses experts {0, 1}, domain 1 experts {2, 3}: I = H(D) = 1 bit.
    # Layer 1: both domains spread evenly over all four experts: I = 0.
    split = np.array([[2, 2, 0, 0], [2, 2, 0, 0], [0, 0, 2, 2], [0, 0, 2, 2]])
    even = np.ones((4, 4), np.int64)
    mi, floor = specialisation(np.stack([split, even]), domain)
    np.testing.assert_allclose(mi, [1.0, 0.0], atol=1e-12)
    assert 0.0 <= floor <= 1.0  # shuffled labels of 4 windows: at most the split's 1 bit


def test_batch_size_curve_matches_numpy():
    # Chunks of b consecutive tokens, each chunk's load per layer, MaxVio averaged over
    # chunks and layers; sizes beyond the token count are left out.
    from sigmoid_moe.harness.evaluate import batch_size_curve
    from sigmoid_moe.metrics import uniform_maxvio_floor

    rng = np.random.default_rng(3)
    num_layers, tokens, top_k, num_experts = 2, 100, 2, 8
    ids = np.stack(
        [
            np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(tokens)])
            for _ in range(num_layers)
        ]
    )  # [L, T, k], skewed in layer 1
    ids[1, :40] = [0, 1]
    got = batch_size_curve(ids, num_experts, sizes=(16, 32, 64, 128))
    assert got["sizes"] == [16, 32, 64]
    for size, maxvio, floor in zip(got["sizes"], got["maxvio"], got["floor"], strict=True):
        chunks = tokens // size
        vios = []
        for layer in range(num_layers):
            for c in range(chunks):
                load = np.bincount(ids[layer, c * size : (c + 1) * size].ravel(), minlength=8)
                vios.append((load.max() - load.mean()) / load.mean())
        assert maxvio == pytest.approx(np.mean(vios), rel=1e-6)
        assert floor == uniform_maxvio_floor(size, num_experts, top_k)
    assert batch_size_curve(ids[:, :10], num_experts) == {"sizes": [], "maxvio": [], "floor": []}


def test_evaluate_reports_train_window_balance_dead_experts_and_mi(reference_run, corpus):
    config, out = reference_run
    from sigmoid_moe.harness.evaluate import evaluate

    result = train(config, out, progress=False, corpus=corpus)  # resumes: nothing to train
    got = evaluate(result.model, corpus)
    layers = config.model.num_layers
    assert len(got["maxvio_global_train_per_layer"]) == layers
    assert len(got["dead_experts_per_layer"]) == layers
    assert all(0 <= d <= config.model.num_experts for d in got["dead_experts_per_layer"])
    assert len(got["specialisation_mi_per_layer"]) == layers
    assert all(0 <= v <= 1.0 for v in got["specialisation_mi_per_layer"])
    assert sum(got["domain_tokens"].values()) == got["val_tokens"]


def test_each_worker_takes_a_contiguous_share_of_the_tasks():
    # Neighbouring tasks (the seeds of one strategy) run in one process, so they share
    # its compiled train step; the shares differ by at most one task.
    import os

    from sigmoid_moe.harness.workers import map_in_workers

    pids = map_in_workers(os.getpid, [()] * 5, jobs=2)
    assert pids[0] == pids[1] == pids[2] != pids[3] == pids[4]


def test_runs_give_the_same_numbers_whatever_the_number_of_workers(tmp_path, corpus, cli_compare):
    # The CLI comparison ran every run in one worker; its loss-free runs of the two seeds
    # again over two workers (one seed each) give the same bytes and numbers.
    from sigmoid_moe.harness import Strategy, compare
    from sigmoid_moe.harness.compare import default_strategies

    status, cli_out, _ = cli_compare
    assert status == 0
    base = _config(steps=CLI_STEPS, warmup_steps=min(TINY.warmup_steps, CLI_STEPS // 10))
    serial_summary = json.loads((cli_out / "results.json").read_text())
    # The CLI's base, as built here (compared as results.json writes it).
    assert serial_summary["base_config"] == json.loads(json.dumps(base.to_dict()))
    (strategy,) = [s for s in default_strategies() if s.name == CLI_LOSSFREE]
    assert isinstance(strategy, Strategy) and strategy.bias_rate > 0
    kwargs = dict(seeds=CLI_SEEDS, progress=False, report=False, corpus=corpus)
    parallel = compare(base, [strategy], tmp_path / "parallel", jobs=2, **kwargs)
    assert [(r["name"], r["seed"]) for r in parallel] == [(CLI_LOSSFREE, 0), (CLI_LOSSFREE, 1)]
    # Both sides as results.json holds them (the serial side is read from there).
    parallel = json.loads((tmp_path / "parallel" / "results.json").read_text())["results"]
    serial = [r for r in serial_summary["results"] if r["name"] == CLI_LOSSFREE]
    assert [r["seed"] for r in serial] == list(CLI_SEEDS)
    for a, b in zip(serial, parallel, strict=True):
        metrics = "metrics.jsonl"
        a_dir, b_dir = pathlib.Path(a["run_dir"]), pathlib.Path(b["run_dir"])
        assert a_dir != b_dir
        assert (a_dir / metrics).read_bytes() == (b_dir / metrics).read_bytes()
        for key in ("val_loss", "maxvio_global", "maxvio_batch_steady", "load_fraction"):
            assert a[key] == b[key]
    assert serial[0]["val_loss"] != serial[1]["val_loss"]  # seeds differ


def test_strategies_that_would_share_a_run_folder_are_refused(tmp_path, corpus):
    # Distinct names, one folder name: their runs would train into (and resume) each other.
    from sigmoid_moe.harness import Strategy, compare

    strategies = [Strategy("lossfree+fast", bias_rate=1e-2), Strategy("lossfree fast")]
    with pytest.raises(ValueError, match=r"same run folder .*lossfree_fast"):
        compare(TINY, strategies, tmp_path, progress=False, report=False, corpus=corpus)
    for bad in ("++", ".."):  # runs//seed0, runs/../seed0
        with pytest.raises(ValueError, match="no run folder name"):
            compare(TINY, [Strategy(bad)], tmp_path, progress=False, report=False, corpus=corpus)
    assert not (tmp_path / "runs").exists()
