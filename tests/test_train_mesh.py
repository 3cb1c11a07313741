"""The research trainer on a device mesh (8 simulated CPU devices) against one device.

Tolerance: the integer loads and the biases must be identical step for step (the load is
an exact int32 sum over devices, and the bias moves by a sign of it); so must the routing
that produced them. Losses and parameters only up to float reduction order: a mesh sums
partial gradients and logits in a different order than one device (observed at most
~1.5e-6 on a loss of ~5 over 20 steps), hence rtol 1e-5 on the losses.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import pytest

from sigmoid_moe import MeshConfig
from sigmoid_moe.errors import RunFileError
from sigmoid_moe.harness import PRESETS, TrainConfig, build_corpus, train
from sigmoid_moe.harness.distributed import mesh_context
from sigmoid_moe.harness.evaluate import evaluate

# The whole module runs on one worker (pyproject: --dist loadgroup), so its module
# fixtures are built once; tests/test_xdist_groups.py checks that the group is in effect.
pytestmark = pytest.mark.xdist_group("train_mesh")

# warmup_steps = steps // 10, as `sigmoid-moe compare --steps 20` sets it: the CLI run of
# the two-process test trains this config.
BASE = dataclasses.replace(
    PRESETS["tiny"].base,
    steps=20,
    warmup_steps=2,
    bias_rate=1e-2,
    checkpoint_every=10,
    eval_every=10,
)
ON_2X4 = dataclasses.replace(BASE, mesh=MeshConfig(2, 4))


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(BASE.data, BASE.model.seq_len)


@pytest.fixture(scope="module")
def single_device(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("one")
    result = train(BASE, out, progress=False, corpus=corpus)
    return _metrics(out), evaluate(result.model, corpus)


def _assert_same_steps(got, want):
    assert len(got) == len(want) == 20
    for a, b in zip(got, want, strict=True):
        assert a["load"] == b["load"] and a["bias"] == b["bias"], a["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.parametrize("mesh", [MeshConfig(1, 8), MeshConfig(4, 2)], ids=str)
def test_mesh_run_matches_the_single_device_run(tmp_path, corpus, single_device, mesh):
    want, want_eval = single_device
    config = dataclasses.replace(BASE, mesh=mesh)
    result = train(config, tmp_path, progress=False, corpus=corpus)
    _assert_same_steps(_metrics(tmp_path), want)
    # Expert weights are split over the expert axis, the bias replicated.
    w_in = result.model.blocks[0].moe.w_in_edf[...]
    assert len(w_in.sharding.device_set) == 8
    assert w_in.addressable_shards[0].data.shape[0] == config.model.num_experts // mesh.expert
    assert result.model.blocks[0].moe.bias_e[...].sharding.is_fully_replicated
    with mesh_context(result.mesh):
        got_eval = evaluate(result.model, corpus, mesh=result.mesh)
    assert got_eval["load_fraction"] == want_eval["load_fraction"]
    assert got_eval["maxvio_global"] == want_eval["maxvio_global"]
    assert got_eval["val_loss"] == pytest.approx(want_eval["val_loss"], rel=1e-5)


@pytest.fixture(scope="module")
def run_2x4(tmp_path_factory, corpus):
    """``(out_dir, result)`` of an uninterrupted run on mesh (2, 4)."""
    out = tmp_path_factory.mktemp("mesh2x4")
    return out, train(ON_2X4, out, progress=False, corpus=corpus)


def test_mesh_2x4_run_matches_the_single_device_run(run_2x4, single_device):
    _assert_same_steps(_metrics(run_2x4[0]), single_device[0])


def test_trainer_places_every_param_by_its_logical_axes(run_2x4):
    # Every MoE parameter placed by its logical axes at init, and still there after the
    # optimizer steps.
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from sigmoid_moe import PARAM_AXES, logical_sharding, rules_for_mesh
    from sigmoid_moe.harness.model import TransformerLM

    mesh = run_2x4[1].mesh
    rules = rules_for_mesh(mesh)
    expected = {name: logical_sharding(mesh, axes, rules) for name, axes in PARAM_AXES.items()}

    def shardings(model):
        moe = model.blocks[0].moe
        return {
            name: getattr(moe, name)[...].sharding
            for name in expected
            if getattr(moe, name) is not None
        }

    with mesh_context(mesh):
        built = nnx.jit(lambda: TransformerLM(ON_2X4.model_on_mesh(), rngs=nnx.Rngs(0)))()
    before, after = shardings(built), shardings(run_2x4[1].model)
    split = NamedSharding(mesh, P("expert", None, None))
    assert before["w_in_edf"].is_equivalent_to(split, 3)
    assert before["router_w_de"].is_fully_replicated and before["bias_e"].is_fully_replicated
    for name, sharding in before.items():
        assert sharding.is_equivalent_to(expected[name], len(PARAM_AXES[name])), name
        assert after[name].is_equivalent_to(sharding, len(PARAM_AXES[name])), name


def test_resume_on_the_same_mesh_reproduces_the_uninterrupted_run(tmp_path, corpus, run_2x4):
    class Stop(Exception):
        pass

    def stop_at_12(step, record):
        if step == 12:
            raise Stop

    with pytest.raises(Stop):
        train(ON_2X4, tmp_path / "cut", progress=False, corpus=corpus, on_step=stop_at_12)
    train(ON_2X4, tmp_path / "cut", progress=False, corpus=corpus)  # resumes from step 10
    assert _metrics(tmp_path / "cut") == _metrics(run_2x4[0])


def test_a_batch_that_does_not_split_over_the_mesh_is_refused():
    with pytest.raises(ValueError, match="batch_size=4 does not split over the 8 devices"):
        dataclasses.replace(BASE, batch_size=4, mesh=MeshConfig(2, 4))
    with pytest.raises(ValueError, match="batch_size=4 does not split over the 8 devices"):
        dataclasses.replace(BASE, batch_size=16, grad_accum=4, mesh=MeshConfig(2, 4))  # micro
    with pytest.raises(ValueError, match="'expert' has 3 devices, which does not divide"):
        dataclasses.replace(BASE, mesh=MeshConfig(1, 3), batch_size=9)
    with pytest.raises(TypeError, match="mesh must be a MeshConfig"):
        dataclasses.replace(BASE, mesh=(2, 4))
    # config.json holds the mesh as a dict; older run folders hold [data, expert].
    assert TrainConfig.from_dict(ON_2X4.to_dict()) == ON_2X4
    assert TrainConfig.from_dict({**ON_2X4.to_dict(), "mesh": [2, 4]}) == ON_2X4


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def cut_at_10(tmp_path_factory, corpus):
    """A one-device run of BASE stopped just after its checkpoint at step 10."""
    out = tmp_path_factory.mktemp("cut")

    def stop_at_10(step, record):
        if step == 10:
            raise _Stop

    with pytest.raises(_Stop):
        train(BASE, out, progress=False, corpus=corpus, on_step=stop_at_10)
    return out


@pytest.mark.parametrize("mesh", [MeshConfig(2, 4), MeshConfig(4, 2)], ids=str)
def test_a_one_device_run_resumes_on_a_mesh_as_if_uninterrupted(
    tmp_path, corpus, single_device, cut_at_10, mesh
):
    # Steps 1-10 on one device, 11-20 on the mesh: the checkpoint is restored into the
    # mesh's shardings, and the run equals the uninterrupted one-device run.
    out = tmp_path / "run"
    shutil.copytree(cut_at_10, out)
    result = train(dataclasses.replace(BASE, mesh=mesh), out, progress=False, corpus=corpus)
    assert result.step == 20
    _assert_same_steps(_metrics(out), single_device[0])
    w_in = result.model.blocks[0].moe.w_in_edf[...]
    assert len(w_in.sharding.device_set) == 8
    assert w_in.addressable_shards[0].data.shape[0] == BASE.model.num_experts // mesh.expert
    assert json.loads((out / "config.json").read_text())["mesh"] == dataclasses.asdict(mesh)


@pytest.mark.parametrize(
    "change",
    [
        dict(batch_size=16),  # the global batch
        dict(model=dataclasses.replace(BASE.model, d_ff=16)),
        dict(grad_accum=2, mesh=MeshConfig()),
    ],
    ids=["batch", "model", "grad_accum"],
)
def test_resuming_with_another_batch_or_model_stays_refused(tmp_path, corpus, cut_at_10, change):
    out = tmp_path / "run"
    shutil.copytree(cut_at_10, out)
    config = dataclasses.replace(BASE, **{"mesh": MeshConfig(2, 4), **change})
    with pytest.raises(RunFileError, match="different config .*only the mesh may change"):
        train(config, out, progress=False, corpus=corpus)


@pytest.mark.slow
def test_two_processes_give_the_results_of_one_process(tmp_path, single_device):
    # Two local processes of 4 devices each (gloo on 127.0.0.1), joined into one (2, 4)
    # mesh, against the one-device run of the same config (which every mesh run above
    # matches): the same int loads, biases and routing; float sums cross processes in
    # another order (last-bit differences), hence the tolerance on losses.
    from sigmoid_moe.cli import main

    want, want_eval = single_device
    argv = ["compare", "--preset", "tiny", "--steps", str(BASE.steps), "--mesh", "data=2,expert=4"]
    argv += ["--bias-rates", str(BASE.bias_rate), "--strategy", "sigmoid+lossfree(0.01,sign)"]
    argv += ["--out", str(tmp_path), "--quiet", "--num-processes", "2"]
    assert main(argv) == 0
    (got_eval,) = json.loads((tmp_path / "results.json").read_text())["results"]
    assert got_eval["strategy"]["bias_rate"] == BASE.bias_rate
    for key in ("load_fraction", "maxvio_global", "dead_experts_per_layer", "batch_curve"):
        assert got_eval[key] == want_eval[key], key
    assert got_eval["val_loss"] == pytest.approx(want_eval["val_loss"], rel=1e-5)
    _assert_same_steps(_metrics(pathlib.Path(got_eval["run_dir"])), want)  # process 0 wrote


def test_evaluation_splits_over_a_mesh_whose_size_does_not_divide_its_batch(corpus):
    # TrainConfig accepts mesh (3, 1) with batch_size 6; evaluation must split over it too
    # (its padded batch is rounded up to the device count, the padding masked).
    import jax
    from flax import nnx

    from sigmoid_moe.harness.evaluate import validation_loss
    from sigmoid_moe.harness.model import TransformerLM
    from sigmoid_moe.sharding import make_mesh

    model = TransformerLM(BASE.model, rngs=nnx.Rngs(0))
    windows = corpus.val[:5]
    want = validation_loss(model, windows)
    mesh = make_mesh(data=3, devices=jax.devices()[:3])
    with mesh_context(mesh):
        got = validation_loss(model, windows, mesh)
    assert got == pytest.approx(want, rel=1e-5)
