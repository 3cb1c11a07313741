"""What docs/conf.py generates: an API page with every public name once, and notebook
pages that reuse an executed copy only of the very same source.

(The site itself is built with warnings as errors by ``.ci/run``.)
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import pathlib
import re

import jupytext
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("sigmoid_moe", "sigmoid_moe.interop", "sigmoid_moe.lab", "sigmoid_moe.harness")


@pytest.fixture(scope="module")
def conf():
    spec = importlib.util.spec_from_file_location("docs_conf", ROOT / "docs" / "conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # no side effects: the pages are written by setup()
    return module


def test_api_page_lists_every_public_name_once(conf):
    listed, current = [], None
    for line in conf._api_page().splitlines():
        if match := re.fullmatch(r"\.\. currentmodule:: ([\w.]+)", line):
            current = match.group(1)
        elif match := re.fullmatch(r"   (\w+)", line):  # an autosummary entry
            listed.append((current, match.group(1)))
        elif match := re.fullmatch(r"\.\. py:data:: ([\w.]+)\.(\w+)", line):
            listed.append((match.group(1), match.group(2)))
    want = [
        (package, name) for package in PACKAGES for name in importlib.import_module(package).__all__
    ]
    assert sorted(listed) == sorted(want)


def test_a_constant_gets_its_value_and_the_comment_above_it(conf):
    page = conf._api_page()
    entry = page[page.index(".. py:data:: sigmoid_moe.PARAM_AXES") :].split("```")[0]
    assert "Keys: ``router_w_de``" in entry and "Logical axis names per parameter" in entry
    assert ":value: ('sign', 'sign_zero_mean', 'proportional')" in page  # BIAS_RULES


def _executed_copy(folder: pathlib.Path, source: pathlib.Path, digest: str) -> None:
    notebook = jupytext.read(source)
    cell = next(c for c in notebook.cells if c.cell_type == "code")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="from the tests\n")]
    notebook.metadata["sigmoid_moe"] = {"source_sha256": digest}
    nbformat.write(notebook, folder / f"{source.stem}.ipynb")


def _outputs(text: str) -> list:
    return [o for c in nbformat.reads(text, 4).cells if c.cell_type == "code" for o in c.outputs]


def test_notebook_pages_reuse_only_an_executed_copy_of_the_same_source(conf, tmp_path, monkeypatch):
    source = ROOT / "notebooks" / "routing_walkthrough.py"
    monkeypatch.delenv("SIGMOID_MOE_EXECUTED_NOTEBOOKS", raising=False)
    fresh = conf._notebook(source)
    assert _outputs(fresh) == [] and "mystnb" not in nbformat.reads(fresh, 4).metadata

    monkeypatch.setenv("SIGMOID_MOE_EXECUTED_NOTEBOOKS", str(tmp_path))
    _executed_copy(tmp_path, source, hashlib.sha256(source.read_bytes()).hexdigest())
    reused = nbformat.reads(conf._notebook(source), 4)
    assert reused.metadata["mystnb"] == {"execution_mode": "off"}  # not executed again
    assert [o["text"] for o in _outputs(nbformat.writes(reused))] == ["from the tests\n"]

    _executed_copy(tmp_path, source, "0" * 64)  # of another version of the notebook
    stale = conf._notebook(source)
    assert _outputs(stale) == [] and "mystnb" not in nbformat.reads(stale, 4).metadata
