"""Argument checks shared across the package: one wording for every message.

Each raises ``TypeError`` for a wrong type and ``ValueError`` for a bad value, naming the
argument and the value (``bool`` is not accepted as a number).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


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


def require_array(name: str, value: Any, shape_hint: str) -> None:
    """``value`` is an array with a dtype (a ``jax.Array``, a NumPy array or a tracer), not
    a list or a Python number, whose dtype JAX would have to guess; ``shape_hint`` (e.g.
    ``"[..., num_experts]"``) ends the error."""
    if not (hasattr(value, "dtype") and hasattr(value, "shape")):
        raise TypeError(
            f"{name} must be an array of shape {shape_hint}, got {type(value).__name__}; "
            f"convert it first with jnp.asarray({name}) (its dtype stated, e.g. jnp.float32)."
        )


def check_token_mask(token_mask, token_shape: tuple[int, ...], name: str) -> jax.Array:
    """``token_mask`` as a bool array of ``token_shape``; raises for another shape or dtype."""
    token_mask = jnp.asarray(token_mask)
    if token_mask.dtype != jnp.bool_:
        raise TypeError(
            f"{name} must be a bool array (True: a real token), got dtype {token_mask.dtype}; "
            "pass mask.astype(bool) if it holds 0/1."
        )
    if token_mask.shape != tuple(token_shape):
        raise ValueError(
            f"{name} must have the token shape {tuple(token_shape)}, got {token_mask.shape}."
        )
    return token_mask


def concrete_value(value) -> np.ndarray | None:
    """``value`` as a NumPy array when it is known at trace time, else None (a tracer)."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return np.asarray(value)
    except (jax.errors.ConcretizationTypeError, TypeError):
        return None
