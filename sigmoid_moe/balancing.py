"""Auxiliary-loss-free bias correction: count the load, move the bias, no gradients.

Loss-Free Balancing (arXiv 2408.15664, Algorithm 1), as used by DeepSeek-V3
(arXiv 2412.19437, section 2.1.2): after each optimizer step, with ``c_i`` the tokens
routed to expert ``i`` over the *global* batch and ``c_bar`` their mean,

.. math::  b_i \\leftarrow b_i + u \\cdot \\operatorname{sign}(\\bar c - c_i)

so under-loaded experts (``c_i < c_bar``) become more attractive. The bias is float32 and
the counts integers whatever the compute dtype: bf16 spacing near 0.5 swallows a 1e-3 step
and bf16 counts flip the sign of the update.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

from sigmoid_moe._checks import check_token_mask, concrete_value, require_array, require_choice

__all__ = ["BIAS_RULES", "BiasRule", "expert_load", "update_bias"]

BiasRule = Literal["sign", "sign_zero_mean", "proportional"]
BIAS_RULES: tuple[str, ...] = get_args(BiasRule)
Rate = float | jax.Array | Callable[[jax.Array], jax.Array]
AxisName = str | Sequence[str] | None


INT32_MAX = 2**31 - 1


def expert_load(
    expert_ids: jax.Array, num_experts: int, token_mask: jax.Array | None = None
) -> jax.Array:
    """Exact tokens per expert.

    Args:
      expert_ids: ``[..., k]`` integer expert choices. An id outside ``[0, E)`` names no
        expert and is not counted (dispatch counts such an assignment as dropped).
      num_experts: E (static).
      token_mask: optional ``[...]`` bool mask; tokens where it is False (padding,
        eval-only tokens) are not counted. Integer or float masks are refused: a mask of
        2 would count a token twice.

    Returns:
      ``[E]`` int32 counts; ``sum == k * (number of unmasked tokens)`` when every id is
      in range.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}.")
    require_array("expert_ids", expert_ids, "[..., k]")
    if not jnp.issubdtype(jnp.result_type(expert_ids), jnp.integer):
        raise TypeError(f"expert_ids must be integer, got dtype {jnp.result_type(expert_ids)}.")
    ids = jnp.asarray(expert_ids, jnp.int32)
    if ids.ndim < 1:
        raise ValueError(f"expert_ids must have shape [..., k], got {ids.shape}.")
    counted = (ids >= 0) & (ids < num_experts)
    if token_mask is not None:
        token_mask = check_token_mask(token_mask, ids.shape[:-1], "token_mask")
        counted = counted & token_mask[..., None]
    # Integer scatter-add: exact for any count below 2**31. Uncounted ids go to index E,
    # which mode="drop" discards (a negative id would otherwise wrap to the last expert).
    return (
        jnp.zeros((num_experts,), jnp.int32)
        .at[jnp.where(counted, ids, num_experts).reshape(-1)]
        .add(1, mode="drop")
    )


def _rate_at(rate: Rate, step: jax.Array | int | None) -> jax.Array:
    """The rate ``u`` as a float32 scalar.

    A concrete value (a float, a concrete array, or what a schedule returns outside jit)
    must be finite and ``>= 0``, or this raises. A value only known inside jit (a traced
    rate, or a schedule of a traced step) cannot raise: a negative or non-finite ``u``
    becomes 0, so that update leaves the bias as it is rather than flipping or poisoning it.
    """
    if callable(rate):
        if step is None:
            raise ValueError(
                "rate is a schedule (a callable of the step); pass step=... to update_bias."
            )
        value = rate(step)
    else:
        numeric = (int, float, np.ndarray, np.generic, jax.Array)
        if isinstance(rate, bool) or not isinstance(rate, numeric):
            raise TypeError(f"rate must be a float or a schedule callable, got {rate!r}.")
        value = rate
    if jnp.ndim(value) != 0:
        raise ValueError(f"rate must be a scalar, got shape {jnp.shape(value)}.")
    concrete = concrete_value(value)
    if concrete is not None:
        if not (np.isfinite(concrete) and concrete >= 0):
            raise ValueError(
                f"rate must be >= 0 and finite, got {float(concrete)}: a negative rate feeds "
                "back positively (over-loaded experts get more attractive) and collapses "
                "routing; an infinite one makes the bias non-finite."
            )
        return jnp.asarray(concrete, jnp.float32)
    u = jnp.asarray(value, jnp.float32)
    return jnp.where(jnp.isfinite(u) & (u > 0), u, 0.0)


def _as_counts(load) -> jax.Array:
    """``load`` as int32 counts.

    Concrete loads are checked: non-negative, and a total below ``2**31`` (so neither a
    count nor the sum wraps in int32; NumPy int64 would wrap silently on conversion).
    Traced loads cannot raise: negative counts count as 0 and unsigned counts above
    ``2**31 - 1`` saturate there before the int32 cast, so the sign keeps its direction.
    """
    load_dtype = jnp.result_type(load)
    if not jnp.issubdtype(load_dtype, jnp.integer):
        raise TypeError(
            f"load must be integer token counts, got dtype {load_dtype}; use expert_load()."
        )
    concrete = concrete_value(load)
    if concrete is not None:
        counts = concrete.astype(np.int64) if concrete.dtype != np.uint64 else concrete
        if (counts < 0).any():
            raise ValueError(f"load holds negative counts {counts[counts < 0].tolist()}.")
        if int(counts.sum(dtype=np.uint64)) > INT32_MAX:
            raise ValueError(
                f"load sums to {int(counts.sum(dtype=np.uint64))} assignments, beyond the "
                "int32 counts the update is exact for (< 2**31 per step)."
            )
        return jnp.asarray(counts.astype(np.int32))
    load = jnp.asarray(load)
    if jnp.issubdtype(load.dtype, jnp.unsignedinteger):
        load = jnp.minimum(load, jnp.asarray(INT32_MAX, load.dtype))
    else:
        load = jnp.maximum(load, 0)
    return load.astype(jnp.int32)


def _total_divmod(load: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``divmod(sum(load), E)`` for ``[E]`` int32 counts ``>= 0``, exact even when the sum
    passes ``2**31`` (each count fits in int32, their total need not): the counts are
    summed as 16-bit halves, which cannot overflow for ``E < 2**14``. Beyond that many
    experts the plain int32 sum is used (exact for totals below ``2**31``)."""
    num_experts = load.shape[0]
    if num_experts >= 2**14:
        total = jnp.sum(load)
        return total // num_experts, total % num_experts
    high = jnp.sum(load >> 16)  # < E * 2**15
    low = jnp.sum(load & 0xFFFF)  # < E * 2**16
    rest = (high % num_experts) * 65536 + low  # < E * 2**17 < 2**31
    return (high // num_experts) * 65536 + rest // num_experts, rest % num_experts


def _sign_of_mean_minus(load: jax.Array) -> jax.Array:
    """``sign(mean(load) - load_i)`` in exact integer arithmetic (no float rounding)."""
    quotient, remainder = _total_divmod(load)  # mean = q + r/E
    below = (load < quotient) | ((load == quotient) & (remainder > 0))
    above = load > quotient
    return below.astype(jnp.float32) - above.astype(jnp.float32)


def update_bias(
    bias: jax.Array,
    load: jax.Array,
    *,
    rate: Rate,
    rule: BiasRule = "sign",
    step: jax.Array | int | None = None,
    axis_name: AxisName = None,
) -> jax.Array:
    """One bias-correction step from the tokens each expert received.

    Rules, with ``e_i = mean(load) - load_i`` (positive when under-loaded):

    - ``"sign"`` (LFB Algorithm 1, DeepSeek-V3): ``b_i += rate * sign(e_i)``.
    - ``"sign_zero_mean"`` (torchtitan, Moonlight): the sign step minus its mean, so
      ``mean(b)`` stays put; selection is unchanged because a constant shift of the bias
      changes no ranking.
    - ``"proportional"`` (LFB Table 3): ``b_i += rate * e_i / mean(load)``.

    This is the one array-level update; a model's biases are updated by
    :func:`sigmoid_moe.routing_bias_update`, which calls it per layer.

    Args:
      bias: ``[E]`` float32 current bias.
      load: ``[E]`` integer tokens per expert (:func:`expert_load`). With gradient
        accumulation pass the *sum* over micro-batches: the sign is taken once, on the
        total (the global balancing scope, as LFB and DeepSeek-V3 do). ``[G, E]`` gives
        one load per group (a micro-batch or a sequence: a narrower scope, as in "Demons
        in the Detail", arXiv 2501.11873): each group's step is taken, then averaged.
        Concrete loads must be ``>= 0`` and sum below ``2**31``; inside jit a negative
        count counts as 0.
      rate: ``u >= 0`` (a float or a scalar array), or an optax-style schedule
        ``step -> u`` (DeepSeek-V3: ``optax.piecewise_constant_schedule(1e-3, {N: 0.0})``).
        A concrete negative, NaN or infinite rate raises; a traced one (known only inside
        jit) that is negative or non-finite gives no update (``u`` taken as 0).
      rule: one of :data:`BIAS_RULES`.
      step: the optimizer step, required when ``rate`` is a schedule.
      axis_name: mesh axis name(s) to sum the load over first (inside ``shard_map``), so
        the update uses the global load and every replica gets the identical bias.

    Returns:
      The new ``[E]`` float32 bias; finite whenever ``bias`` is.
    """
    require_choice("rule", rule, BIAS_RULES)
    require_array("bias", bias, "[E]")
    require_array("load", load, "[E] or [G, E]")
    bias_dtype = jnp.result_type(bias)
    if bias_dtype != jnp.float32:
        raise TypeError(
            f"bias must be float32, got {bias_dtype}: in bf16 a 1e-3 step near 0.5 rounds "
            "away. Keep the routing bias in float32 under any dtype policy."
        )
    grouped = jnp.ndim(load) == 2
    if (
        jnp.ndim(bias) != 1
        or jnp.ndim(load) not in (1, 2)
        or jnp.shape(load)[-1:] != jnp.shape(bias)
    ):
        raise ValueError(
            f"bias must have shape [E] and load [E] (or [G, E] groups); got {jnp.shape(bias)} "
            f"and {jnp.shape(load)}."
        )
    load = _as_counts(load)
    u = _rate_at(rate, step)
    if axis_name is not None:
        load = jax.lax.psum(load, axis_name)
    delta = jax.vmap(functools.partial(_delta, rule=rule))(load) if grouped else _delta(load, rule)
    if grouped:  # one update per group, averaged: the micro-batch / sequence scopes
        delta = jnp.mean(delta, axis=0)
    return bias + u * delta


def _delta(load: jax.Array, rule: BiasRule) -> jax.Array:
    """The rule's step direction ``[E]`` for one ``[E]`` int32 load (before the rate)."""
    if rule == "proportional":
        load_f = load.astype(jnp.float32)
        mean = jnp.mean(load_f)
        return jnp.where(mean > 0, (mean - load_f) / jnp.maximum(mean, 1.0), 0.0)
    delta = _sign_of_mean_minus(load)
    if rule == "sign_zero_mean":
        delta = delta - jnp.mean(delta)
    return delta
