"""Argument checks shared by the config dataclasses: one wording for every message.

Each raises ``TypeError`` for a wrong type and ``ValueError`` for a bad value, naming the
argument and the value (``bool`` is not accepted as a number).
"""

from __future__ import annotations

import math
from typing import Any


def require_int(name: str, value: Any, minimum: int = 1) -> None:
    """``value`` is an ``int >= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")


def require_float(name: str, value: Any, *, positive: bool = False, hint: str = "") -> None:
    """``value`` is a finite real ``>= 0`` (``> 0`` when ``positive``); ``hint`` ends the error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r}.")
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite float {bound}{hint}, got {value}.")


def require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """``value`` is one of ``choices`` (the args of the option's ``Literal``)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {choices}.")
