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

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp

__all__ = [
    "BIAS_RULES",
    "BiasState",
    "BiasCorrection",
    "bias_correction",
    "expert_load",
    "update_bias",
]

BiasRule = Literal["sign", "sign_zero_mean", "proportional"]
BIAS_RULES: tuple[str, ...] = get_args(BiasRule)
Rate = float | Callable[[jax.Array], jax.Array]
AxisName = str | Sequence[str] | None


def expert_load(
    expert_ids: jax.Array, num_experts: int, token_mask: jax.Array | None = None
) -> jax.Array:
    """Exact tokens per expert.

    Args:
      expert_ids: ``[..., k]`` integer expert choices.
      num_experts: E (static).
      token_mask: optional ``[...]`` bool (or 0/1) mask; tokens where it is False
        (padding, eval-only tokens) are not counted.

    Returns:
      ``[E]`` int32 counts; ``sum == k * (number of unmasked tokens)``.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}.")
    if not jnp.issubdtype(jnp.result_type(expert_ids), jnp.integer):
        raise TypeError(f"expert_ids must be integer, got dtype {jnp.result_type(expert_ids)}.")
    ids = jnp.asarray(expert_ids, jnp.int32)
    if ids.ndim < 1:
        raise ValueError(f"expert_ids must have shape [..., k], got {ids.shape}.")
    if token_mask is None:
        weight = jnp.ones(ids.shape, jnp.int32)
    else:
        token_mask = jnp.asarray(token_mask)
        if token_mask.shape != ids.shape[:-1]:
            raise ValueError(
                f"token_mask must have the token shape {ids.shape[:-1]} of expert_ids "
                f"{ids.shape}, got {token_mask.shape}."
            )
        weight = jnp.broadcast_to(token_mask.astype(jnp.int32)[..., None], ids.shape)
    # Integer scatter-add: exact for any count below 2**31.
    return (
        jnp.zeros((num_experts,), jnp.int32)
        .at[ids.reshape(-1)]
        .add(weight.reshape(-1), mode="drop")
    )


def _rate_at(rate: Rate, step: jax.Array | int | None) -> jax.Array:
    if callable(rate):
        if step is None:
            raise ValueError(
                "rate is a schedule (a callable of the step); pass step=... to update_bias."
            )
        value = rate(step)
    else:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)):
            raise TypeError(f"rate must be a float or a schedule callable, got {rate!r}.")
        value = rate
    try:
        concrete = float(value)
    except (jax.errors.ConcretizationTypeError, TypeError):
        concrete = None  # a traced schedule value: nothing to check at trace time
    if concrete is not None:
        if not concrete >= 0:  # also catches NaN
            raise ValueError(
                f"rate must be >= 0, got {concrete}: a negative rate feeds back positively "
                "(over-loaded experts get more attractive) and collapses routing."
            )
    return jnp.asarray(value, jnp.float32)


def _sign_of_mean_minus(load: jax.Array) -> jax.Array:
    """``sign(mean(load) - load_i)`` in exact integer arithmetic (no float rounding)."""
    num_experts = load.shape[0]
    total = jnp.sum(load)
    quotient, remainder = total // num_experts, total % num_experts  # mean = q + r/E
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

    Args:
      bias: ``[E]`` float32 current bias.
      load: ``[E]`` integer tokens per expert (:func:`expert_load`). With gradient
        accumulation pass the *sum* over micro-batches: the sign is taken once, on the total.
      rate: ``u >= 0``, or an optax-style schedule ``step -> u`` (DeepSeek-V3:
        ``optax.piecewise_constant_schedule(1e-3, {N: 0.0})``).
      rule: one of :data:`BIAS_RULES`.
      step: the optimizer step, required when ``rate`` is a schedule.
      axis_name: mesh axis name(s) to sum the load over first (inside ``shard_map``), so
        the update uses the global load and every replica gets the identical bias.

    Returns:
      The new ``[E]`` float32 bias.
    """
    if rule not in BIAS_RULES:
        raise ValueError(f"rule={rule!r} is not supported; choose one of {BIAS_RULES}.")
    bias_dtype = jnp.result_type(bias)
    if bias_dtype != jnp.float32:
        raise TypeError(
            f"bias must be float32, got {bias_dtype}: in bf16 a 1e-3 step near 0.5 rounds "
            "away. Keep the routing bias in float32 under any dtype policy."
        )
    load_dtype = jnp.result_type(load)
    if not jnp.issubdtype(load_dtype, jnp.integer):
        raise TypeError(
            f"load must be integer token counts, got dtype {load_dtype}; use expert_load()."
        )
    if jnp.ndim(bias) != 1 or jnp.shape(load) != jnp.shape(bias):
        raise ValueError(
            f"bias and load must both have shape [E]; got {jnp.shape(bias)} and {jnp.shape(load)}."
        )
    u = _rate_at(rate, step)
    load = jnp.asarray(load, jnp.int32)
    if axis_name is not None:
        load = jax.lax.psum(load, axis_name)

    if rule == "proportional":
        load_f = load.astype(jnp.float32)
        mean = jnp.mean(load_f)
        delta = jnp.where(mean > 0, (mean - load_f) / jnp.maximum(mean, 1.0), 0.0)
    else:
        delta = _sign_of_mean_minus(load)
        if rule == "sign_zero_mean":
            delta = delta - jnp.mean(delta)
    return bias + u * delta


class BiasState(NamedTuple):
    """Optax-style state of the bias correction."""

    bias: jax.Array  # [E] float32
    step: jax.Array  # [] int32, updates applied so far (drives a rate schedule)


class BiasCorrection(NamedTuple):
    """An ``(init, update)`` pair of pure functions, like an optax transformation."""

    init: Callable[[int], BiasState]
    update: Callable[..., BiasState]


def bias_correction(
    rate: Rate, rule: BiasRule = "sign", *, axis_name: AxisName = None
) -> BiasCorrection:
    """The bias correction as an ``init``/``update`` pair.

    Example::

        corrector = bias_correction(optax.piecewise_constant_schedule(1e-3, {1000: 0.0}))
        state = corrector.init(num_experts)
        state = corrector.update(state, expert_load(routing.expert_ids, num_experts))
    """
    if rule not in BIAS_RULES:
        raise ValueError(f"rule={rule!r} is not supported; choose one of {BIAS_RULES}.")
    _rate_at(rate, 0)  # validate eagerly

    def init(num_experts: int) -> BiasState:
        return BiasState(bias=jnp.zeros((num_experts,), jnp.float32), step=jnp.zeros((), jnp.int32))

    def update(state: BiasState, load: jax.Array) -> BiasState:
        bias = update_bias(
            state.bias, load, rate=rate, rule=rule, step=state.step, axis_name=axis_name
        )
        return BiasState(bias=bias, step=state.step + 1)

    return BiasCorrection(init=init, update=update)
