"""The bias rate's schedules, by name: one meaning per name for the lab and the harness.

A schedule is written as text (a flag value, a config field) and becomes an optax
schedule ``step -> u(step)`` for a run of ``steps`` steps and peak rate ``u``:

- ``constant``: ``u`` at every step (LFB, arXiv 2408.15664).
- ``cosine``: ``optax.cosine_decay_schedule(u, steps)``, from ``u`` at step 0 to 0 at
  ``steps``.
- ``freeze:N``: ``u`` until step ``N``, then 0 (DeepSeek-V3, arXiv 2412.19437 section
  4.2: the rate is set to 0 for the last stretch of training).
- ``warmup:N``: ``optax.linear_schedule`` from 0 to ``u`` over ``N >= 1`` steps, then ``u``.
"""

from __future__ import annotations

import optax

__all__ = ["RATE_SCHEDULE_FORMS", "check_rate_schedule", "rate_schedule"]

RATE_SCHEDULE_FORMS = "constant, cosine, freeze:N (N >= 0) or warmup:N (N >= 1)"


def _parts(text: str) -> tuple[str, int]:
    """``(name, N)`` of a schedule's text (N is 0 for ``constant`` and ``cosine``)."""
    name, sep, arg = str(text).partition(":")
    if name in ("constant", "cosine") and not sep:
        return name, 0
    minimum = {"freeze": 0, "warmup": 1}.get(name)
    if minimum is not None and arg.isdigit() and int(arg) >= minimum:
        return name, int(arg)
    raise ValueError(
        f"schedule {text!r} is not understood; use {RATE_SCHEDULE_FORMS}, with N a whole "
        "number of steps."
    )


def check_rate_schedule(text: str) -> str:
    """Returns ``text`` if it names a schedule; ``ValueError`` naming the forms if not."""
    if not isinstance(text, str):
        raise TypeError(f"a rate schedule is text such as 'cosine', got {text!r}.")
    _parts(text)
    return text


def rate_schedule(text: str, rate: float, steps: int) -> optax.Schedule:
    """The optax schedule ``step -> u(step)`` named by ``text`` (see the module docstring),
    for peak rate ``rate`` over a run of ``steps`` steps (used by ``cosine`` only)."""
    name, n = _parts(text)
    if name == "cosine":
        return optax.cosine_decay_schedule(rate, steps)
    if name == "freeze":
        return optax.piecewise_constant_schedule(rate, {n: 0.0})
    if name == "warmup":
        return optax.linear_schedule(0.0, rate, n)
    return optax.constant_schedule(rate)
