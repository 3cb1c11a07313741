"""Sphinx configuration: ``sphinx-build -W docs docs/_build/html`` (README, "Docs").

These pages are generated when a build starts, from the code, so they cannot drift:

- ``api.md``: an autosummary of every name in the ``__all__`` of ``sigmoid_moe`` (grouped
  by the module that defines it) and of the interop, lab and harness packages;
- ``notebooks/<name>.ipynb``: the jupytext notebooks in ``notebooks/``. myst-nb executes
  them during the build, unless ``SIGMOID_MOE_EXECUTED_NOTEBOOKS`` names a folder where
  tests/test_notebooks.py left an executed copy of the same source (same sha256): then
  that copy's outputs are shown, and CI does not run the notebooks twice.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pathlib
import pprint
import re
import shutil

import jupytext
import nbformat

import sigmoid_moe

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent

project = "sigmoid-moe"
author = "the sigmoid-moe authors"
copyright = "the sigmoid-moe authors"
release = sigmoid_moe.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
exclude_patterns = ["_build", "**.ipynb_checkpoints"]

html_theme = "sphinx_book_theme"
html_title = "sigmoid-moe"
html_theme_options = {"show_toc_level": 2}

myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

autosummary_generate = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # dataclass fields once, in the class's own entry

nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_timeout = 900
nb_merge_streams = True

# --- the API page -----------------------------------------------------------------------

PACKAGES = {
    "sigmoid_moe.interop": "Hugging Face checkpoints",
    "sigmoid_moe.lab": "The balance lab",
    "sigmoid_moe.harness": "The research harness (the `[research]` extra)",
}


def _summary(module) -> str:
    return (module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")


def _constant(qualname: str, value) -> list[str]:
    """A ``py:data`` entry for a constant (autodoc would show its type's docstring): its
    value, or a dict's keys, and the comment above its assignment in the defining module."""
    package, name = qualname.rsplit(".", 1)
    pattern = re.compile(rf"^{name}\b[^=\n]*=", re.M)
    comment: list[str] = []
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        text = path.read_text()
        if match := pattern.search(text):
            above = text[: match.start()].splitlines()
            while above and above[-1].startswith("#"):
                comment.insert(0, above.pop()[1:].strip())
            break
    lines = ["```{eval-rst}", f".. py:data:: {qualname}"]
    shown = repr(value)
    if len(shown) <= 80:
        lines.append(f"   :value: {shown}")
    lines.append("")
    if isinstance(value, dict) and len(shown) > 80:
        lines.append("   Keys: " + ", ".join(f"``{key}``" for key in value) + ".")
        lines.append("")
    elif len(shown) > 80:
        lines += ["   .. code-block:: python", ""]
        lines += [f"      {line}" for line in pprint.pformat(value, width=80).splitlines()]
        lines.append("")
    lines += [f"   {line}" for line in comment] + ["```", ""]
    return lines


def _autosummary(package: str, names: list[str]) -> list[str]:
    module = importlib.import_module(package)
    documented = [n for n in names if callable(getattr(module, n))]
    lines = []
    if documented:
        lines += ["```{eval-rst}", f".. currentmodule:: {package}", "", ".. autosummary::"]
        lines += ["   :toctree: _autosummary", "", *[f"   {name}" for name in documented]]
        lines += ["```", ""]
    for name in names:
        if name not in documented:
            lines += _constant(f"{package}.{name}", getattr(module, name))
    return lines


def _api_page() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings. Everything in the first part is importable from",
        "`sigmoid_moe`; it is grouped by the module that defines it.",
        "",
    ]
    by_module: dict[str, list[str]] = {}
    for name in sigmoid_moe.__all__:
        module = getattr(getattr(sigmoid_moe, name), "__module__", None)
        if not (isinstance(module, str) and module.startswith("sigmoid_moe")):
            module = "sigmoid_moe"  # a constant
        by_module.setdefault(module, []).append(name)
    for module_name, names in sorted(by_module.items()):
        if module_name == "sigmoid_moe":
            heading, summary = "Constants", "With the comment above each one's definition."
        else:
            heading, summary = f"`{module_name}`", _summary(importlib.import_module(module_name))
        lines += [f"## {heading}", "", summary, "", *_autosummary("sigmoid_moe", names)]
    for package, title in PACKAGES.items():
        module = importlib.import_module(package)
        lines += [f"## {title}: `{package}`", "", _summary(module), ""]
        lines += _autosummary(package, sorted(module.__all__))
    return "\n".join(lines)


def _write_if_changed(path: pathlib.Path, text: str) -> None:
    """Rewrites ``path`` only when ``text`` differs, so Sphinx rebuilds only what changed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


# --- the notebooks ----------------------------------------------------------------------


def _notebook(source: pathlib.Path) -> str:
    """``source`` as an .ipynb: the executed copy from the test run when it is of this
    very source (``mystnb.execution_mode: off``), else without outputs, to be executed."""
    executed_dir = os.environ.get("SIGMOID_MOE_EXECUTED_NOTEBOOKS")
    if executed_dir:
        executed = pathlib.Path(executed_dir) / f"{source.stem}.ipynb"
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        if executed.exists():
            notebook = nbformat.read(executed, as_version=4)
            if notebook.metadata.get("sigmoid_moe", {}).get("source_sha256") == digest:
                notebook.metadata["mystnb"] = {"execution_mode": "off"}
                return nbformat.writes(notebook)
    return nbformat.writes(jupytext.read(source))


def _generate(app, config) -> None:
    shutil.rmtree(DOCS / "_autosummary", ignore_errors=True)  # no stubs of names gone since
    _write_if_changed(DOCS / "api.md", _api_page())
    for source in sorted((ROOT / "notebooks").glob("*.py")):
        _write_if_changed(DOCS / "notebooks" / f"{source.stem}.ipynb", _notebook(source))


def setup(app) -> None:
    # At config-inited, before Sphinx lists the source files: autosummary (builder-inited)
    # only generates stubs for pages it found then, and a clean clone has no api.md yet.
    app.connect("config-inited", _generate)
