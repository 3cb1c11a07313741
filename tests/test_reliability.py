"""Issue 12: nothing corrupt is trusted, nothing bad is silent (runs, checkpoints, the CLI).

Class A: a run folder's checkpoints and files are verified on resume; damage a crash can
explain is repaired, any other damage is an error naming the file; a run stops at a
non-finite step. Class B: every command-line mistake exits 2 with one line naming the flag
or path, and a genuine bug keeps its traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sigmoid_moe.cli import main
from sigmoid_moe.errors import (
    CheckpointError,
    DataChangedError,
    NonFiniteError,
    RecoveryWarning,
    RunFileError,
)
from sigmoid_moe.harness import PRESETS, DataConfig, build_corpus, train
from sigmoid_moe.harness import checkpoint as checkpoint_module
from sigmoid_moe.harness.checkpoint import MANIFEST, Checkpointer
from sigmoid_moe.harness.run_files import read_jsonl, truncate_jsonl

# On the worker of tests/test_harness.py (pyproject: --dist loadgroup): this module's
# module fixtures are built once, and its runs share that module's compiled programs
# (CONFIG's train step is the one of test_harness's reference run: the numbers are inputs)
# and its first checkpoint restore, instead of compiling them on a second worker.
pytestmark = pytest.mark.xdist_group("harness")

COMPARE = importlib.import_module("sigmoid_moe.harness.compare")  # the module, not the function
TINY = PRESETS["tiny"].base
# Checkpoints at steps 2 and 4; one compiled step serves every run of this module.
CONFIG = dataclasses.replace(TINY, steps=4, checkpoint_every=2, eval_every=2, bias_rate=1e-2)


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(CONFIG.data, CONFIG.model.seq_len)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    """A finished, uninterrupted run of CONFIG."""
    out = tmp_path_factory.mktemp("reference")
    train(CONFIG, out, progress=False, corpus=corpus)
    return out


@pytest.fixture
def run(tmp_path, reference):
    """A copy of the reference run to damage."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


def _resume(out, corpus, **kwargs):
    return train(CONFIG, out, progress=False, corpus=corpus, **kwargs)


def _largest_file(step_dir: pathlib.Path) -> pathlib.Path:
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST]
    return max(files, key=lambda p: p.stat().st_size)


def _flip(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 4):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped bytes": (lambda d: _flip(_largest_file(d)), "fails its sha256 check"),
    "truncated file": (
        lambda d: os.truncate(_largest_file(d), _largest_file(d).stat().st_size // 2),
        "truncated",
    ),
    "deleted file": (lambda d: _largest_file(d).unlink(), "is missing"),
    "no manifest": (lambda d: (d / MANIFEST).unlink(), "save never finished"),
    "corrupt manifest": (lambda d: (d / MANIFEST).write_text('{"files": {'), "unreadable"),
    "corrupt _CHECKPOINT_METADATA": (
        lambda d: (d / "_CHECKPOINT_METADATA").write_text("{"),
        "_CHECKPOINT_METADATA",
    ),
    "corrupt _METADATA": (
        lambda d: (d / "default" / "_METADATA").write_text('{"tree_metadata": {'),
        "_METADATA",
    ),
}


# --- Class A: checkpoints and runs --------------------------------------------------


def test_every_checkpoint_has_a_manifest_of_all_its_files(reference):
    ckpt = Checkpointer(reference / "checkpoints")
    assert ckpt.steps() == [2, 4]
    for step in (2, 4):
        manifest = json.loads((reference / "checkpoints" / str(step) / MANIFEST).read_text())
        folder = reference / "checkpoints" / str(step)
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert set(manifest["files"]) == on_disk - {MANIFEST}
        assert "default/_METADATA" in manifest["files"]
        ckpt.verify(step)


def _state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {
        "params": {"w": rng.normal(size=(64, 32)).astype(np.float32), "b": np.zeros(3)},
        "counters": {"step": np.asarray(step, np.int64)},
    }


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_good_one(damage, tmp_path):
    corrupt, reason = DAMAGE[damage]
    ckpt = Checkpointer(tmp_path, max_to_keep=3)
    for step in (2, 4, 6):
        ckpt.save(step, _state(step))
    ckpt.close()
    corrupt(tmp_path / "6")
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match=f"step 6 in {tmp_path} is .*{reason}"):
        ckpt.restore(6, _state(0))
    with pytest.warns(RecoveryWarning, match=f"step 6 .*{reason}.*resuming from step 4") as rec:
        step, state = ckpt.restore_latest(_state(0))
    assert len(rec) == 1 and step == 4 and ckpt.steps() == [2, 4]  # the bad step is gone
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(_state(4)), strict=True):
        np.testing.assert_array_equal(got, want)
    ckpt.save(6, _state(6))  # training writes the step again
    ckpt.verify(6)
    ckpt.close()


def test_resuming_from_a_corrupt_checkpoint_equals_the_uninterrupted_run(run, reference, corpus):
    _flip(_largest_file(run / "checkpoints" / "4"))
    with pytest.warns(RecoveryWarning, match="step 4 .*fails its sha256 check.*from step 2"):
        result = _resume(run, corpus)
    assert result.step == 4
    # Steps 3-4 were retrained from the good step 2, never from the garbage.
    assert (run / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    assert (run / "eval.jsonl").read_text() == (reference / "eval.jsonl").read_text()
    Checkpointer(run / "checkpoints").verify(4)


def test_no_good_checkpoint_is_an_error_naming_the_folder_and_the_way_out(run, corpus):
    _flip(_largest_file(run / "checkpoints" / "4"))
    (run / "checkpoints" / "2" / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="no checkpoint in .*checkpoints can be trusted") as e:
        _resume(run, corpus)
    assert "step 4 is corrupt" in str(e.value) and "step 2 is incomplete" in str(e.value)
    assert "--no-resume" in str(e.value)
    assert Checkpointer(run / "checkpoints").steps() == [2, 4]  # nothing deleted


def test_a_verified_checkpoint_of_another_model_is_refused(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, {"params": [np.ones(3, np.float32)]})
    with pytest.raises(
        CheckpointError,
        match=r"does not fit this model \(params.0 has shape \(3,\), the model wants \(5,\)",
    ):
        ckpt.restore(1, {"params": [np.ones(5, np.float32)]})
    with pytest.raises(CheckpointError, match="does not fit this model"):
        ckpt.restore(1, {"params": [np.ones(3, np.float32), np.ones(2, np.float32)]})
    ckpt.close()


def test_a_checkpoint_is_restored_by_structure_not_by_position(tmp_path):
    # Same shapes, other names: joined by position, "a" would land in "b" and "b" in "c".
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, {"params": {"a": np.zeros(2, np.float32), "b": np.ones(2, np.float32)}})
    renamed = {"params": {"b": np.full(2, 7, np.float32), "c": np.full(2, 7, np.float32)}}
    with pytest.raises(CheckpointError, match=r"does not fit.*params\.a.*params\.c"):
        ckpt.restore(1, renamed)
    restored = ckpt.restore(1, {"params": {"b": np.zeros(2, np.float32), "a": np.ones(2)}})
    np.testing.assert_array_equal(restored["params"]["a"], np.zeros(2))
    np.testing.assert_array_equal(restored["params"]["b"], np.ones(2))
    assert restored["params"]["a"].dtype == np.float64  # the model's dtype
    ckpt.close()


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("config.json", '{"model": {"num_la', r"config.json is corrupt \(not JSON"),
        ("config.json", None, "config.json is missing"),
        ("data.json", "[1, 2", r"data.json is corrupt \(not JSON"),
        ("data.json", '{"windows": 3}', "data.json is corrupt"),
        ("metrics.jsonl", None, "metrics.jsonl is missing"),
    ],
)
def test_a_corrupt_or_missing_run_file_is_an_error_naming_it(run, corpus, name, text, message):
    if text is None:
        (run / name).unlink()
    else:
        (run / name).write_text(text)
    with pytest.raises(RunFileError, match=message):
        _resume(run, corpus)


def test_a_partial_last_metrics_line_is_repaired_on_resume(run, reference, corpus):
    # A crash while writing step 3's line, after the checkpoint at step 2.
    shutil.rmtree(run / "checkpoints" / "4")
    lines = (reference / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:2]) + lines[2][:40])
    with pytest.raises(RunFileError, match="partial line"):
        read_jsonl(run / "metrics.jsonl")  # a reader of a finished run does not guess
    with pytest.warns(RecoveryWarning, match="metrics.jsonl: dropped a partial last line"):
        _resume(run, corpus)
    assert (run / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda lines: [lines[0], "{not json\n", *lines[2:]], "metrics.jsonl line 2 is corrupt"),
        (lambda lines: [lines[1], lines[0], *lines[2:]], r"line 2 is corrupt \(step 1 after"),
        (lambda lines: [lines[0], '{"loss": 1.0}\n', *lines[2:]], "no 'step'"),
        (lambda lines: lines[:2], "needs every step 1..4"),
    ],
)
def test_damaged_metrics_lines_are_errors_naming_the_file_and_line(run, corpus, edit, message):
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(edit(lines)))
    with pytest.raises(RunFileError, match=message):
        _resume(run, corpus)


def test_truncate_jsonl_keeps_exactly_the_checkpointed_steps(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"step": 2, "v": 1.5}\n{"step": 4, "v": 1.25}\n{"step": 6, "v"')
    with pytest.warns(RecoveryWarning, match="partial"):
        truncate_jsonl(path, 5, every_step=False)
    assert path.read_text() == '{"step": 2, "v": 1.5}\n{"step": 4, "v": 1.25}\n'
    path.write_text('{"step": 1}\n{"step": 2}')  # unterminated but whole: kept
    truncate_jsonl(path, 2, every_step=True)
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]


def test_resuming_on_changed_data_is_refused_unless_allowed(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 300)
    config = dataclasses.replace(CONFIG, data=DataConfig(paths=(f"prose={text}",)))
    out = tmp_path / "run"
    train(config, out, progress=False)
    saved = (out / "data.json").read_text()
    (text / "a.txt").write_text("pack my box with five dozen liquor jugs. " * 300)
    with pytest.raises(DataChangedError, match=r"a.txt changed .*--allow-data-change"):
        train(config, out, progress=False)
    assert (out / "data.json").read_text() == saved  # not silently rewritten
    (text / "b.txt").write_text("x" * 100)
    with pytest.raises(DataChangedError, match="b.txt is new"):
        train(config, out, progress=False)
    with pytest.warns(RecoveryWarning, match="training data changed.*as allowed"):
        train(
            config,
            out,
            progress=False,
            allow_data_change=True,
        )
    assert json.loads((out / "data.json").read_text())["files"][1]["path"].endswith("b.txt")


@pytest.mark.parametrize("checkpoint_every", [6, 1])
def test_a_diverging_run_stops_at_that_step_and_never_saves_it(tmp_path, corpus, checkpoint_every):
    config = dataclasses.replace(
        CONFIG,
        steps=6,
        warmup_steps=0,
        learning_rate=1e30,
        checkpoint_every=checkpoint_every,
        eval_every=6,  # no validation on the way (its own guard is tested below)
    )
    with pytest.raises(NonFiniteError, match=r"^step (\d+): ") as err:
        train(config, tmp_path, progress=False, corpus=corpus)
    step = int(str(err.value).split()[1].rstrip(":"))
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["bias"]).all() for r in records)
    if checkpoint_every == 6:  # no save on the way: the step guard sees the loss first
        assert "non-finite loss" in str(err.value) and 1 < step < 6
        assert [r["step"] for r in records] == list(range(1, step))
    else:  # the loss of the last step is finite, its new optimizer state is not
        assert "refusing to save it" in str(err.value)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert all(s < step for s in ckpt.steps())
    for s in ckpt.steps():
        ckpt.verify(s)
        saved = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(s) / "default")
        for leaf in jax.tree.leaves(saved):
            assert np.isfinite(np.asarray(leaf, np.float64)).all()
    assert len(ckpt.steps()) == (0 if checkpoint_every == 6 else min(2, step - 1))


def test_a_non_finite_validation_loss_is_never_logged(tmp_path, corpus):
    # The step's own loss is finite (taken before the update), the updated model's is not.
    config = dataclasses.replace(
        CONFIG, steps=6, warmup_steps=0, learning_rate=1e30, checkpoint_every=6, eval_every=1
    )
    with pytest.raises(NonFiniteError, match=r"^step (\d+): non-finite val_loss") as err:
        train(config, tmp_path, progress=False, corpus=corpus)
    step = int(str(err.value).split()[1].rstrip(":"))
    evals = read_jsonl(tmp_path / "eval.jsonl")
    assert evals and all(np.isfinite(r["val_loss"]) for r in evals)
    assert [r["step"] for r in evals] == list(range(1, step))
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(1, step))


def test_a_non_finite_leaf_is_never_written_as_a_checkpoint(tmp_path):
    ckpt = Checkpointer(tmp_path)
    state = {"params": {"w": np.array([1.0, np.nan], np.float32)}, "step": np.int64(3)}
    with pytest.raises(NonFiniteError, match=r"step 3: \['params'\]\['w'\] holds 1 non-finite"):
        ckpt.save(3, state)
    assert ckpt.steps() == []
    with pytest.raises(NonFiniteError, match="bias"):
        ckpt.save(3, {"bias": [jax.numpy.array([np.inf])]})
    ckpt.close()


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt here, whatever the test runner inherited (under
    nohup or in a background shell SIGINT is ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


# The signal may land in another gc callback first (hypothesis keeps one); Python prints it
# there as "Exception ignored" and the command line's handler delivers it again.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_ctrl_c_during_a_save_finishes_the_checkpoint_then_interrupts(
    tmp_path, monkeypatch, ctrl_c_raises
):
    write = checkpoint_module._write_manifest

    def interrupted(folder, step):
        os.kill(os.getpid(), signal.SIGINT)  # delivered here, in the middle of the save
        write(folder, step)

    monkeypatch.setattr(checkpoint_module, "_write_manifest", interrupted)
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(5, {"params": [np.arange(4, dtype=np.float32)]})
    ckpt.verify(5)  # the checkpoint is whole
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    restored = ckpt.restore(5, {"params": [np.zeros(4, np.float32)]})
    np.testing.assert_array_equal(restored["params"][0], np.arange(4))
    ckpt.close()


def _data_file(step_dir: pathlib.Path) -> pathlib.Path:
    """The largest OCDBT data file of a checkpoint (the compressed arrays)."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _rewrite_manifest(step_dir: pathlib.Path) -> None:
    """As an adversary or a bad disk could: the manifest now matches the damaged data."""
    checkpoint_module._write_manifest(step_dir, int(step_dir.name))


def test_a_checkpoint_orbax_cannot_read_falls_back_and_never_raises_a_traceback(tmp_path):
    ckpt = Checkpointer(tmp_path, max_to_keep=3)
    for step in (2, 4, 6):
        ckpt.save(step, _state(step))
    ckpt.close()
    data = bytearray(_data_file(tmp_path / "6").read_bytes())
    data[8:12] = bytes(b ^ 0xFF for b in data[8:12])  # inside the zstd frame: unreadable
    _data_file(tmp_path / "6").write_bytes(bytes(data))
    _rewrite_manifest(tmp_path / "6")
    ckpt = Checkpointer(tmp_path)
    ckpt.verify(6)  # the manifest cannot tell
    with pytest.raises(CheckpointError, match=r"step 6 .* cannot be read \(.*ZSTD"):
        ckpt.restore(6, _state(0))
    with pytest.warns(RecoveryWarning, match=r"step 6 .*cannot be read.*resuming from step 4"):
        step, state = ckpt.restore_latest(_state(0))
    assert step == 4 and ckpt.steps() == [2, 4]
    np.testing.assert_array_equal(state["params"]["w"], _state(4)["params"]["w"])
    ckpt.close()


def test_any_exception_orbax_raises_on_restore_is_mapped(tmp_path, monkeypatch):
    # orbax and tensorstore raise bare Exceptions (a ZSTD failure among them).
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, _state(1))

    def fails(*args, **kwargs):
        raise Exception("ZSTD_decompressStream() failed: Data corruption detected")

    monkeypatch.setattr(ckpt._manager, "restore", fails)
    with pytest.raises(CheckpointError, match=r"step 1 .*cannot be read \(ZSTD_decompress"):
        ckpt.restore(1, _state(0))
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be trusted .*--no-resume"):
        ckpt.restore_latest(_state(0))
    ckpt.close()


def test_a_restored_state_that_is_not_finite_is_refused(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path, max_to_keep=3)
    ckpt.save(2, _state(2))
    bad = _state(4)
    bad["params"]["w"][3, 5] = np.inf
    monkeypatch.setattr(checkpoint_module, "_require_finite", lambda step, state: None)
    ckpt.save(4, bad)  # as a corruption that decodes to an infinity would restore
    monkeypatch.undo()
    with pytest.raises(
        CheckpointError, match=r"step 4 .* is corrupt \(\['params'\]\['w'\] holds 1"
    ):
        ckpt.restore(4, _state(0))
    with pytest.warns(RecoveryWarning, match="non-finite value.*resuming from step 2"):
        assert ckpt.restore_latest(_state(0))[0] == 2
    ckpt.close()


def test_a_state_changed_behind_a_valid_manifest_never_trains(run, reference, corpus):
    # Lighter corruption: the arrays decode, are finite and match a rewritten manifest, but
    # are not what was saved. The loss saved with the checkpoint (on the batch after it)
    # is not reproduced, so the run resumes from the good step before it.
    step_dir = run / "checkpoints" / "4" / "default"
    tree = ocp.StandardCheckpointer().restore(step_dir)
    moe = tree["params"]["blocks"]["0"]["moe"]
    moe["router_w_de"]["value"] = np.asarray(moe["router_w_de"]["value"]) * 3.0
    shutil.rmtree(step_dir)
    saver = ocp.StandardCheckpointer()
    saver.save(step_dir, tree)
    saver.wait_until_finished()
    _rewrite_manifest(step_dir.parent)
    with pytest.warns(RecoveryWarning, match=r"step 4 .*its loss on the batch after it is .*not"):
        result = _resume(run, corpus)
    assert result.step == 4
    assert (run / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    assert (run / "eval.jsonl").read_text() == (reference / "eval.jsonl").read_text()


def test_a_run_folder_has_one_writer(tmp_path, corpus):
    from sigmoid_moe.errors import RunFolderBusyError
    from sigmoid_moe.harness.run_files import LOCK_FILE, run_folder_lock, unique_temp_name

    busy = rf"run folder '{tmp_path}' is in use by another sigmoid-moe run \(pid {os.getpid()}\)"
    with run_folder_lock(tmp_path):
        with pytest.raises(RunFolderBusyError, match=busy):
            train(CONFIG, tmp_path, progress=False, corpus=corpus)
        with pytest.raises(RunFolderBusyError, match=busy):
            with run_folder_lock(tmp_path):
                pass
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert not (tmp_path / "checkpoints").exists()  # the refused run wrote nothing
    # A lock left by a process that died is stale: the next writer takes it.
    (tmp_path / LOCK_FILE).write_text("999999999\n")
    with run_folder_lock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    # Temporary names never collide between writers.
    names = {unique_temp_name(tmp_path / "config.json") for _ in range(100)}
    assert len(names) == 100 and all(n.parent == tmp_path for n in names)


# --- Class B: the command line ------------------------------------------------------


def _cli_error(argv, capsys, code=2) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"sigmoid-moe {argv[0]}: error: ")
    return last


SIM = ["simulate", "--experts", "8", "--top-k", "2", "--groups", "1", "--topk-groups", "1"]
SIM += ["--tokens", "32", "--steps", "3", "--rates", "1e-2", "--seeds", "0", "--no-plots"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--steps", "-5"], "argument --steps: must be >= 0, got -5"),
        (["demo", "--skew", "nan"], "argument --skew: must be a finite number"),
        (["demo", "--rate", "inf"], "argument --rate: must be a finite number"),
        (["demo", "--rate=-1e-3"], "argument --rate: must be >= 0"),
        (["demo", "--d-model", "0"], "argument --d-model: must be >= 1, got 0"),
        (["demo", "--tokens", "-3"], "argument --tokens: must be >= 1, got -3"),
        (["demo", "--route-scale", "0"], "argument --route-scale: must be > 0"),
        (["demo", "--show", "-1"], "argument --show: must be >= 0"),
        (["demo", "--experts", "2.5"], "argument --experts: invalid int value: '2.5'"),
        (["simulate", "--schedule", "freeze:abc"], "argument --schedule: schedule 'freeze:abc'"),
        (["simulate", "--schedule", "warmup:"], "argument --schedule: schedule 'warmup:'"),
        (["simulate", "--rules", "sign,median"], "argument --rules: unknown rule 'median'"),
        (["simulate", "--rates", "1e-3,nan"], "argument --rates: must be a finite number"),
        (["simulate", "--seeds", "0,-1"], "argument --seeds: must be >= 0, got -1"),
        (["simulate", "--threshold", "0"], "argument --threshold: must be > 0"),
        (["compare", "--data", "prose="], "argument --data: data path 'prose=' is empty"),
        (["compare", "--data", "=books"], "argument --data: data path '=books' has an empty"),
        (["compare", "--steps", "-5"], "argument --steps: must be >= 1, got -5"),
        (["compare", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["compare", "--bias-rates", "1e-3,inf"], "argument --bias-rates: must be a finite"),
        (["compare", "--aux-coefs", ","], "argument --aux-coefs: expected comma-separated"),
    ],
)
def test_a_bad_flag_value_is_exit_2_naming_the_flag(argv, message, capsys):
    assert message in _cli_error(argv, capsys)


def test_a_bad_flag_combination_is_exit_2_naming_the_argument(capsys, tmp_path):
    argv = ["demo", "--experts", "8", "--groups", "3"]
    assert "num_groups=3 does not divide num_experts=8" in _cli_error(argv, capsys)
    argv = [*SIM, "--out", str(tmp_path), "--seq-len", "5"]
    assert "seq_len=5 does not divide num_tokens=32" in _cli_error(argv, capsys)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seeds", "0,0"], "seeds must be a non-empty list without repeats"),
        (["--bias-rates", "1e-3,0.001"], "strategy names must be unique"),
        (["--aux-coefs", "0.01,1e-2"], "strategy names must be unique"),
    ],
)
def test_a_bad_run_plan_is_exit_2_before_any_run(flags, message, capsys, tmp_path):
    argv = ["compare", "--preset", "tiny", "--quiet", "--out", str(tmp_path), *flags]
    assert message in _cli_error(argv, capsys)
    assert not (tmp_path / "runs").exists()


def _read_only_dir(tmp_path) -> pathlib.Path:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except PermissionError:
        return folder
    (folder / "probe").unlink()  # root ignores permissions: use a read-only system folder
    for system in (pathlib.Path("/sys"), pathlib.Path("/proc")):
        try:
            (system / "sigmoid-moe-probe").mkdir()
        except OSError:
            return system
    pytest.skip("no read-only folder available")


@pytest.mark.parametrize("command", ["simulate", "compare"])
def test_file_system_problems_with_out_name_the_flag_and_path(command, tmp_path, capsys):
    argv = SIM if command == "simulate" else ["compare", "--preset", "tiny", "--quiet"]
    existing = tmp_path / "a-file"
    existing.write_text("")
    message = _cli_error([*argv, "--out", str(existing)], capsys)
    assert f"--out '{existing}' is an existing file" in message
    message = _cli_error([*argv, "--out", str(existing / "sub")], capsys)
    assert f"--out '{existing / 'sub'}' cannot be written (a parent of it is a file)" in message
    read_only = _read_only_dir(tmp_path) / "out"
    message = _cli_error([*argv, "--out", str(read_only)], capsys)
    assert f"--out '{read_only}' cannot be written" in message


def test_unreadable_or_missing_data_names_the_path(tmp_path, capsys):
    argv = ["compare", "--preset", "tiny", "--quiet", "--out", str(tmp_path / "out"), "--data"]
    missing = tmp_path / "nope"
    assert f"data path '{missing}' does not exist" in _cli_error([*argv, str(missing)], capsys)
    (tmp_path / "empty").mkdir()
    assert "holds no text file" in _cli_error([*argv, f"prose={tmp_path / 'empty'}"], capsys)
    unreadable = tmp_path / "secret.txt"
    unreadable.write_text("x" * 10_000)
    unreadable.chmod(0)
    if os.access(unreadable, os.R_OK):  # root: a file no one can read
        unreadable = pathlib.Path("/proc/self/mem")
        if not unreadable.exists():
            pytest.skip("no unreadable file available")
    message = _cli_error([*argv, f"prose={unreadable}"], capsys)
    assert f"data file '{unreadable}' cannot be read" in message


def test_an_over_long_out_name_is_exit_2_naming_the_flag(tmp_path, capsys):
    argv = ["compare", "--preset", "tiny", "--quiet", "--out"]
    long_name = tmp_path / ("x" * 300)  # one name past NAME_MAX (255 bytes)
    message = _cli_error([*argv, str(long_name)], capsys)
    assert message.endswith("cannot be written (File name too long).")
    assert "--out '" in message
    long_path = tmp_path.joinpath(*["d" * 200] * 25)  # a path past PATH_MAX (4096 bytes)
    message = _cli_error([*argv, str(long_path)], capsys)
    assert "--out '" in message and "cannot be written (File name too long)" in message
    assert len(message) < 400  # one readable line, the middle of the path elided
    message = _cli_error([*argv, str(tmp_path / "out"), "--data", str(long_name)], capsys)
    assert "cannot be read (File name too long)" in message


def test_data_is_read_from_regular_files_only(tmp_path, capsys):
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("some text " * 300)
    os.mkfifo(folder / "b.txt")

    def unblock():  # were a FIFO opened for reading, this ends the wait (EOF) in 20 s
        deadline = time.monotonic() + 20
        while not done and time.monotonic() < deadline:
            time.sleep(0.1)
        for path in (fifo, folder / "b.txt"):
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    done = False
    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    argv = ["compare", "--preset", "tiny", "--quiet", "--out", str(tmp_path / "out"), "--data"]
    try:
        message = _cli_error([*argv, str(fifo)], capsys)
        assert f"data path '{fifo}' is not a regular file or a folder" in message
        message = _cli_error([*argv, f"prose={folder}"], capsys)
        assert f"data path '{folder / 'b.txt'}' is not a regular file or a folder" in message
    finally:
        done = True
        thread.join()


def test_one_text_rule_for_a_data_file_and_a_folder(tmp_path, capsys):
    noise = np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    (tmp_path / "blob.bin").write_bytes(noise)
    (tmp_path / "bins").mkdir()
    (tmp_path / "bins" / "blob.bin").write_bytes(noise)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "blob.txt").write_bytes(noise)
    argv = ["compare", "--preset", "tiny", "--quiet", "--out", str(tmp_path / "out"), "--data"]
    blob = tmp_path / "blob.bin"
    message = _cli_error([*argv, str(blob)], capsys)
    assert f"data file '{blob}' is not named as a text file (suffix '.bin')" in message
    assert "holds no text file" in _cli_error([*argv, str(tmp_path / "bins")], capsys)
    blob = tmp_path / "texts" / "blob.txt"
    assert f"data file '{blob}' is not UTF-8 text" in _cli_error([*argv, str(blob)], capsys)
    message = _cli_error([*argv, str(tmp_path / "texts")], capsys)
    assert f"data file '{blob}' is not UTF-8 text" in message


@pytest.mark.parametrize("mesh", ["data=2,data=4", "", ",", "expert=2,", "data=-2"])
def test_a_bad_mesh_is_exit_2_naming_the_flag(mesh, capsys):
    message = _cli_error(["compare", "--preset", "tiny", "--mesh", mesh], capsys)
    assert message.startswith("sigmoid-moe compare: error: argument --mesh: ")
    assert "data=D,expert=E" in message


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--process-id", "1"], "--process-id and --coordinator go together"),
        (["--coordinator", "h:1", "--num-processes", "2"], "--process-id and --coordinator"),
        (
            ["--process-id", "2", "--coordinator", "h:1", "--num-processes", "2"],
            r"--process-id 2 must be in [0, --num-processes 2)",
        ),
        (["--num-processes", "3", "--mesh", "data=2"], "3 processes need a mesh whose devices"),
    ],
)
def test_bad_multi_process_flags_are_exit_2(flags, message, capsys, tmp_path):
    argv = ["compare", "--preset", "tiny", "--quiet", "--out", str(tmp_path), *flags]
    assert message in _cli_error(argv, capsys)


@pytest.mark.parametrize(
    "error, code, message",
    [
        (RunFileError("runs/x/config.json is corrupt; start over"), 2, "config.json is corrupt"),
        (CheckpointError("no checkpoint in runs/x can be trusted"), 2, "can be trusted"),
        (NonFiniteError("step 7: non-finite loss (loss holds nan)"), 1, "step 7: non-finite"),
    ],
)
def test_run_errors_are_one_line_with_their_exit_status(
    monkeypatch, capsys, tmp_path, error, code, message
):
    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(COMPARE, "compare", fails)
    argv = ["compare", "--preset", "tiny", "--quiet", "--out", str(tmp_path)]
    assert message in _cli_error(argv, capsys, code=code)


def test_warnings_are_one_line_and_ctrl_c_exits_130(monkeypatch, capsys, tmp_path):
    import warnings

    def warns(*args, **kwargs):
        assert kwargs["allow_data_change"] and not kwargs["resume"]
        message = "checkpoint step 4 in x is corrupt; resuming from step 2"
        warnings.warn(message, RecoveryWarning, stacklevel=2)
        raise KeyboardInterrupt

    monkeypatch.setattr(COMPARE, "compare", warns)
    argv = ["compare", "--preset", "tiny", "--quiet", "--out", str(tmp_path)]
    assert main([*argv, "--allow-data-change", "--no-resume"]) == 130
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        "sigmoid-moe compare: warning: checkpoint step 4 in x is corrupt; resuming from step 2"
    )
    assert "run the same command again to resume" in captured.out


@pytest.mark.parametrize("error", [ValueError, TypeError, FileNotFoundError])
def test_an_internal_bug_keeps_its_traceback(monkeypatch, tmp_path, error):
    def bug(*args, **kwargs):
        raise error("an internal bug")

    monkeypatch.setattr(COMPARE, "compare", bug)
    with pytest.raises(error, match="an internal bug"):
        main(["compare", "--preset", "tiny", "--quiet", "--out", str(tmp_path)])
    monkeypatch.setattr("sigmoid_moe.update_bias", bug)
    with pytest.raises(error, match="an internal bug"):
        main(["demo", "--tokens", "64", "--experts", "8", "--steps", "1", "--show", "0"])


# ``python -m sigmoid_moe.cli`` with Python's Ctrl-C handler, whatever this process
# inherited: an ignored SIGINT (under nohup, in a background shell) is inherited by a child,
# and Python then leaves it ignored.
CLI = [
    sys.executable,
    "-u",
    "-c",
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('sigmoid_moe.cli', run_name='__main__', alter_sys=True)",
]


def _command(*argv) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, *argv],
        cwd=pathlib.Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_the_console_command_exits_2_with_one_line():
    proc = _command("demo", "--tokens", "-3")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and out == ""
    last = "sigmoid-moe demo: error: argument --tokens: must be >= 1, got -3"
    assert err.splitlines()[-1] == last and "Traceback" not in err


def test_sigterm_during_a_save_finishes_the_checkpoint_then_stops(tmp_path, monkeypatch):
    from sigmoid_moe._cli_args import signals_as_exceptions
    from sigmoid_moe.errors import Terminated

    write = checkpoint_module._write_manifest

    def terminated(folder, step):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered here, in the middle of the save
        write(folder, step)

    monkeypatch.setattr(checkpoint_module, "_write_manifest", terminated)
    ckpt = Checkpointer(tmp_path)
    with signals_as_exceptions(), pytest.raises(Terminated):  # the command line's handler
        ckpt.save(5, {"params": [np.arange(4, dtype=np.float32)]})
    ckpt.verify(5)  # the checkpoint is whole
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)
    ckpt.close()


@pytest.mark.parametrize("where", ["gc callback", "weakref callback", "__del__"])
def test_ctrl_c_where_python_drops_exceptions_is_not_lost(ctrl_c_raises, where):
    """An exception raised in a gc callback (JAX runs one), in a weakref callback or
    finalizer that a collection runs, or in a ``__del__``, is printed as "Exception ignored
    in ..." and dropped, so Ctrl-C arriving there used to be lost. The command line's
    handler delivers it again a moment later, outside."""
    import gc
    import weakref

    from sigmoid_moe._cli_args import signals_as_exceptions

    # Armed inside the handler's block only: a collection that starts on its own before it
    # would take the signal under the test runner's handler.
    armed, raised = [], []

    def interrupt(*_):
        if armed and not raised:
            raised.append(True)
            signal.raise_signal(signal.SIGINT)  # its handler runs in this frame

    class Cycle:
        def __init__(self):
            self.me = self

    class Finalized:
        def __del__(self):
            interrupt()

    def gc_callback(phase, info):
        if phase == "start":
            interrupt()

    if where == "gc callback":
        gc.callbacks.append(gc_callback)
    garbage = Cycle()
    ref = weakref.ref(garbage, interrupt)  # called when the collector frees the cycle
    del garbage
    try:
        with signals_as_exceptions(), pytest.raises(KeyboardInterrupt):
            armed.append(True)
            if where == "__del__":
                Finalized()  # freed at once, by reference counting: no collection
            else:
                gc.collect()
            assert raised
            time.sleep(5)  # the signal delivered again arrives here
    finally:
        if gc_callback in gc.callbacks:
            gc.callbacks.remove(gc_callback)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert ref is not None


def test_ctrl_c_after_a_handler_block_left_during_a_collection(ctrl_c_raises):
    """A block left while the collector runs (a generator in a reference cycle, closed by
    gc.collect) sees that collection's start but not its stop; a later block must still
    raise at once, not defer the signal for ever."""
    import gc

    from sigmoid_moe._cli_args import signals_as_exceptions

    def holds_the_handler(box):
        with signals_as_exceptions():
            yield

    box = []
    generator = holds_the_handler(box)
    next(generator)
    box.append(generator)  # generator -> its frame -> box -> generator
    del generator, box
    gc.collect()
    started = time.monotonic()
    with signals_as_exceptions(), pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    assert time.monotonic() - started < 1


def test_ctrl_c_in_the_console_command_is_exit_130_with_one_line():
    proc = _command("demo", "--tokens", "256", "--experts", "8", "--steps", "100000000")
    try:
        for line in proc.stdout:  # the table is printed just before the update loop
            if line.startswith("token |"):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:  # whatever happens, the command does not outlive the test
        proc.kill()
        proc.communicate()
    assert proc.returncode == 130
    assert err.strip() == "sigmoid-moe demo: interrupted."
