"""The ``[research]`` extra: what only the research side needs, and the error without it.

``pip install sigmoid-moe`` brings what the layer, routing, balancing, sharding and
interop need. The research harness (:mod:`sigmoid_moe.harness`, ``sigmoid-moe compare``)
and the plots of the harness and the lab also need orbax-checkpoint, matplotlib and tqdm:
``pip install "sigmoid-moe[research]"``. ``import sigmoid_moe`` imports none of them.

A feature that needs the extra calls :func:`require_research` before any work; without
the extra it raises :class:`~sigmoid_moe.errors.MissingExtraError`, which the command line
prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib.util

from sigmoid_moe.errors import MissingExtraError

__all__ = ["INSTALL_RESEARCH", "add_unavailable_parser", "missing_research", "require_research"]

# The extra's modules and the distributions that provide them (pyproject.toml's
# [project.optional-dependencies] research lists the same three).
RESEARCH_MODULES = {
    "orbax.checkpoint": "orbax-checkpoint",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
}
INSTALL_RESEARCH = "pip install 'sigmoid-moe[research]'"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a missing parent package (``orbax`` of ``orbax.checkpoint``)
        return False


def missing_research(modules: tuple[str, ...] = tuple(RESEARCH_MODULES)) -> list[str]:
    """The ``[research]`` distributions providing ``modules`` (default: all of the extra's)
    that cannot be imported here, found without importing them; empty when all can."""
    return [RESEARCH_MODULES[m] for m in modules if not _importable(m)]


def require_research(feature: str, *modules: str) -> None:
    """Raises :class:`~sigmoid_moe.errors.MissingExtraError` naming ``feature`` (e.g.
    ``"sigmoid-moe compare"``), the missing distributions and the install line, unless
    ``modules`` (default: the whole ``[research]`` extra) can be imported."""
    missing = missing_research(modules or tuple(RESEARCH_MODULES))
    if missing:
        error = MissingExtraError(
            f"{feature} needs the research extra (missing: {', '.join(missing)}): "
            f"{INSTALL_RESEARCH}"
        )
        error.name = next(m for m, d in RESEARCH_MODULES.items() if d == missing[0])
        raise error


def add_unavailable_parser(sub, command: str, help: str, error: MissingExtraError) -> None:
    """Adds ``command`` to the ``sigmoid-moe`` subparsers as a placeholder for a command
    whose extra is missing: it takes any arguments and raises ``error`` (from
    :func:`require_research`: one line, exit 2), so the other commands still work."""
    # No prefix characters: every argument, flags included, is a positional to ignore.
    p = sub.add_parser(command, help=f"{help} (needs the research extra)", prefix_chars="\0")
    p.add_argument("ignored", nargs="*", help=argparse.SUPPRESS)

    def fail(args: argparse.Namespace) -> int:
        raise error

    p.set_defaults(func=fail)
