"""Bias-correction dynamics without a model: a whole trajectory in one ``lax.scan``.

Each step ``t``: logits of a batch (generated from ``fold_in(key, t)`` or read from an
explicit ``[S, T, E]`` array) are routed with :func:`sigmoid_moe.route` under the current
control (bias), the exact load is counted with :func:`sigmoid_moe.expert_load`, and the
control moves by the rule (:mod:`sigmoid_moe.lab.rules`) at rate
``u_t = rate * schedule(t)``. :func:`sweep` runs ``(rule, rate, seed)`` configurations,
one or many, as one jitted ``vmap`` of the same scan.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sigmoid_moe.balancing import expert_load
from sigmoid_moe.config import RouterConfig
from sigmoid_moe.lab.rules import RULES, initial_control, routed, rule_indices, updated
from sigmoid_moe.lab.streams import StreamConfig, init_stream, stream_logits
from sigmoid_moe.metrics import max_violation

__all__ = ["Trajectory", "grid", "sweep"]

Schedule = Callable[[jax.Array], jax.Array]


class Trajectory(NamedTuple):
    """Per-step record; a sweep adds a leading configuration axis ``C``."""

    max_violation: jax.Array  # [C?, S] float32 MaxVio_batch of each step's load
    load: jax.Array  # [C?, S, E] int32 tokens per expert at each step
    bias: jax.Array  # [C?, S, E] float32 control used at each step (before its update)


def _check(stream, router: RouterConfig, steps: int | None) -> int:
    if not isinstance(router, RouterConfig):
        raise TypeError(f"router must be a RouterConfig, got {type(router).__name__}.")
    if isinstance(stream, StreamConfig):
        if stream.num_experts != router.num_experts:
            raise ValueError(
                f"stream.num_experts={stream.num_experts} != router.num_experts="
                f"{router.num_experts}; make them equal."
            )
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1 for a generated stream, got {steps!r}.")
        return steps
    shape = jnp.shape(stream)
    if len(shape) != 3 or shape[-1] != router.num_experts:
        raise ValueError(
            f"an explicit stream must be logits [steps, tokens, E={router.num_experts}], got "
            f"shape {shape}; or pass a StreamConfig."
        )
    if steps is not None and steps != shape[0]:
        raise ValueError(f"steps={steps} disagrees with the stream's {shape[0]} steps; drop steps.")
    return shape[0]


def _trajectory(
    rule_index: jax.Array,
    rate: jax.Array,
    key: jax.Array,
    logits_ste: jax.Array | None,
    *,
    stream: StreamConfig | None,
    router: RouterConfig,
    steps: int,
    schedule: Schedule | None,
    compiled: tuple[str, ...],
) -> Trajectory:
    num_experts = router.num_experts
    key_params, key_steps = jax.random.split(key)
    params = init_stream(stream, key_params) if stream is not None else None
    # One row per compiled rule, picked by the (possibly batched) index.
    c0_e = jnp.stack([initial_control(r, num_experts) for r in compiled])[rule_index]

    def body(c_e, xs):
        step, given_te = xs
        if stream is not None:
            logits_te = stream_logits(stream, params, jax.random.fold_in(key_steps, step), step)
        else:
            logits_te = jnp.asarray(given_te, jnp.float32)
        routing = routed(compiled, rule_index, logits_te, c_e, router)
        load_e = expert_load(routing.expert_ids, num_experts)
        u = rate if schedule is None else rate * jnp.asarray(schedule(step), jnp.float32)
        c_next_e = updated(
            compiled, rule_index, c_e, load_e, routing.expert_ids, logits_te, u, step, router
        )
        return c_next_e, Trajectory(max_violation(load_e), load_e, c_e)

    step_s = jnp.arange(steps, dtype=jnp.int32)
    _, record = jax.lax.scan(body, c0_e, (step_s, logits_ste))
    return record


@functools.partial(jax.jit, static_argnames=("stream", "router", "steps", "schedule", "compiled"))
def _many(rule_index_c, rate_c, key_c, logits_ste, **static) -> Trajectory:
    run = functools.partial(_trajectory, **static)
    return jax.vmap(run, in_axes=(0, 0, 0, None))(rule_index_c, rate_c, key_c, logits_ste)


def _as_key(seed: int | jax.Array) -> jax.Array:
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return jax.random.key(int(seed))
    return seed


def _check_rate(rate: float) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating)) or not rate >= 0:
        raise ValueError(
            f"rate must be a float >= 0, got {rate!r}; to see positive feedback use "
            "rule='negated' with a positive rate."
        )
    return float(rate)


def grid(
    rules: Sequence[str], rates: Sequence[float], seeds: Sequence[int]
) -> tuple[list[str], list[float], list[int]]:
    """The Cartesian product as three flat, equally long lists (rule-major)."""
    combos = [(r, u, s) for r in rules for u in rates for s in seeds]
    return [c[0] for c in combos], [c[1] for c in combos], [c[2] for c in combos]


def sweep(
    stream: StreamConfig | jax.Array,
    router: RouterConfig,
    *,
    rules: Sequence[str],
    rates: Sequence[float],
    seeds: Sequence[int],
    steps: int | None = None,
    schedule: Schedule | None = None,
    compiled: Sequence[str] | None = None,
) -> Trajectory:
    """Configurations as ONE jitted ``vmap`` of the scan (one configuration is a sweep of
    one).

    Args:
      stream: a :class:`StreamConfig` (logits generated inside the scan from
        ``fold_in(key, step)``) or explicit logits ``[S, T, E]``.
      router: the routing rules (``score_fn="softmax"`` for softmax gating).
      rules, rates, seeds: equally long; configuration ``c`` is ``(rules[c], rates[c],
        seeds[c])`` (:func:`grid` builds a product). A rule is one of
        :data:`sigmoid_moe.lab.rules.RULES`, a rate ``u >= 0``, a seed an int or a JAX key
        (it draws the stream's fixed parts and per-step samples: configurations sharing a
        seed see the same logits).
      steps: S, required for a generated stream.
      schedule: optax-style ``step -> multiplier`` of every rate, e.g.
        ``optax.piecewise_constant_schedule(1.0, {1000: 0.0})`` (DeepSeek-V3's freeze);
        :func:`sigmoid_moe.lab.cli.parse_schedule` builds the named ones.
      compiled: the rules compiled as ``lax.switch`` branches (default: the distinct rules
        present, in :data:`RULES` order). The rules enter as an integer index, so under
        ``vmap`` every compiled branch is evaluated and the wanted one selected; pass a
        larger sweep's rules to get that sweep's exact program for a part of it.

    Returns:
      A :class:`Trajectory` with a leading axis ``C = len(rules)``.
    """
    steps = _check(stream, router, steps)
    if not (len(rules) == len(rates) == len(seeds)) or not rules:
        raise ValueError(
            f"rules, rates and seeds must be equally long and non-empty, got lengths "
            f"{len(rules)}, {len(rates)}, {len(seeds)}; use grid(...) for a product."
        )
    if compiled is None:
        compiled = tuple(r for r in RULES if r in set(rules))
    compiled = tuple(compiled)
    index_c = jnp.asarray(rule_indices(rules, compiled), jnp.int32)
    rate_c = jnp.asarray([_check_rate(u) for u in rates], jnp.float32)
    key_c = jnp.stack([_as_key(s) for s in seeds])
    is_config = isinstance(stream, StreamConfig)
    return _many(
        index_c,
        rate_c,
        key_c,
        None if is_config else jnp.asarray(stream, jnp.float32),
        stream=stream if is_config else None,
        router=router,
        steps=steps,
        schedule=schedule,
        compiled=compiled,
    )
