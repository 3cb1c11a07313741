"""The core install: ``import sigmoid_moe``, the layer and ``sigmoid-moe demo`` work without
the ``[research]`` extra, and what needs the extra says so in one line.

Each check runs in a fresh interpreter whose import system refuses the extra's modules
(a meta-path finder, first in line), as a ``pip install sigmoid-moe`` without the extra
would have them missing.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from sigmoid_moe._extras import INSTALL_RESEARCH, RESEARCH_MODULES

BLOCKED = sorted({module.split(".")[0] for module in RESEARCH_MODULES})  # orbax, matplotlib, tqdm

# Runs first in the child: the extra's top-level packages cannot be imported or found.
PRELUDE = textwrap.dedent(
    f"""
    import sys

    class _WithoutResearchExtra:
        blocked = {BLOCKED!r}

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.blocked:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, _WithoutResearchExtra())
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_blocker_blocks():
    # The check below means something only if the child really cannot import the extra.
    child = _run("import tqdm")
    assert child.returncode == 1 and "No module named 'tqdm'" in child.stderr


def test_import_and_layer_and_demo_without_the_research_extra():
    child = _run(
        """
        import sys

        import jax
        import jax.numpy as jnp
        import numpy as np
        from flax import nnx

        import sigmoid_moe
        from sigmoid_moe import MoEConfig, MoELayer, RouterConfig
        from sigmoid_moe.cli import main

        layer = MoELayer(MoEConfig(d_model=8, d_ff=4, router=RouterConfig(4, 2)), rngs=nnx.Rngs(0))
        y, aux = layer(jax.random.normal(jax.random.key(0), (6, 8)))
        assert y.shape == (6, 8) and bool(jnp.all(jnp.isfinite(y))), y
        assert int(aux.expert_load.sum()) == 6 * 2, aux.expert_load  # every token, k=2
        assert main(["demo", "--tokens", "64", "--steps", "3", "--show", "1"]) == 0
        loaded = sorted({m.split(".")[0] for m in sys.modules} & {"orbax", "matplotlib", "tqdm"})
        print("LOADED", loaded)
        """
    )
    assert child.returncode == 0, child.stderr
    assert "LOADED []" in child.stdout
    assert "load per expert" in child.stdout  # the demo's table ran


@pytest.mark.parametrize(
    "argv, feature, missing",
    [
        (["compare"], "sigmoid-moe compare", "orbax-checkpoint, matplotlib, tqdm"),
        (["compare", "--preset", "tiny", "--jobs", "1"], "sigmoid-moe compare", "orbax-"),
        (
            ["simulate", "--steps", "2", "--tokens", "8", "--out", "{tmp}"],
            "sigmoid-moe simulate without --no-plots",
            "matplotlib",
        ),
    ],
)
def test_research_commands_without_the_extra_exit_2_with_one_line(tmp_path, argv, feature, missing):
    argv = [a.format(tmp=tmp_path) for a in argv]
    child = _run(
        f"""
        import sys

        from sigmoid_moe.cli import entry

        sys.argv = ["sigmoid-moe", *{argv!r}]
        entry()
        """
    )
    lines = child.stderr.strip().splitlines()
    assert child.returncode == 2, child.stderr
    assert len(lines) == 1, child.stderr
    command = argv[0]
    assert lines[0].startswith(f"sigmoid-moe {command}: error: {feature} needs the research extra")
    assert missing in lines[0] and lines[0].endswith(INSTALL_RESEARCH)


def test_harness_import_without_the_extra_names_it():
    child = _run(
        """
        from sigmoid_moe.errors import MissingExtraError

        try:
            import sigmoid_moe.harness
        except MissingExtraError as err:
            assert isinstance(err, ImportError)
            print("ERROR", err)
        """
    )
    assert child.returncode == 0, child.stderr
    assert "ERROR sigmoid_moe.harness needs the research extra" in child.stdout
    assert INSTALL_RESEARCH in child.stdout


def test_simulate_without_plots_runs_without_the_extra(tmp_path):
    child = _run(
        f"""
        import sys

        from sigmoid_moe.cli import main

        small = ["--experts", "8", "--top-k", "2", "--groups", "1", "--topk-groups", "1"]
        argv = ["simulate", *small, "--steps", "2", "--tokens", "64", "--rates", "1e-3"]
        assert main([*argv, "--seeds", "0", "--no-plots", "--out", {str(tmp_path)!r}]) == 0
        """
    )
    assert child.returncode == 0, child.stderr
    assert (tmp_path / "summary.md").exists()


def test_the_extra_lists_what_the_check_names():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    research = project["optional-dependencies"]["research"]
    assert sorted(re.split(r"[<>=!~ ]", r)[0] for r in research) == sorted(
        RESEARCH_MODULES.values()
    )
    core = {re.split(r"[<>=!~ \[]", r)[0] for r in project["dependencies"]}
    assert not core & set(RESEARCH_MODULES.values())
