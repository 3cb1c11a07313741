"""Balancing control laws for the lab, each as (initial state, selection, update).

Every rule keeps one ``[E]`` float32 control vector ``c`` and acts on routing only
through what it hands to :func:`sigmoid_moe.route`, so one ``route`` call serves every
rule and a sweep can ``vmap`` over an integer rule index (``lax.switch`` among the rules
compiled in). With ``e_i = mean(load) - load_i`` (positive when under-loaded):

- ``sign`` / ``sign_zero_mean`` / ``proportional``: ``c`` is the additive selection bias,
  updated by :func:`sigmoid_moe.update_bias` (LFB Algorithm 1 and Table 3, arXiv
  2408.15664).
- ``multiplicative`` (LFB Table 4): select on ``s_i * b_i``, ``b`` starts at 1 and moves by
  ``b_i <- b_i * (1 + u sign(e_i))`` (stays positive for ``u < 1``). ``route`` adds its bias,
  so the lab feeds it logits whose scores are a positive per-token rescale of ``s * b``:
  sigmoid: ``z = logit(s b / max(b))`` (computed in log space, ``route`` then selects on
  ``sigmoid(z) = s b / max b``); softmax: ``z = logits + log b`` since
  ``softmax(z) = s b / sum_j s_j b_j``. Rescaling every score of a token by one positive
  factor changes neither the expert ranking nor the group ranking (sums of group members).
- ``quantile`` (Kimi K3, Megatron ``quantile_balancing``): ``b_i = -(q_i - mean_j q_j)``
  with ``q_i`` the ``(1 - k/E)`` quantile of expert ``i``'s scores over the batch, so every
  expert's selection threshold lines up. The bias is set outright from the last batch;
  the rate is not used.
- ``aux_loss``: the Switch load-balancing loss (arXiv 2101.03961) as a control law: ``c`` is
  a learnable per-expert logit offset, routing uses ``logits + c`` (selection and weights),
  and ``c <- c - (u E) grad_c L`` with ``L = load_balancing_loss(probs(logits + c), ids)``.
  The gradient is about ``(f_j - 1) / E`` per expert, so scaling the SGD step by E makes a
  rate comparable with the proportional rule's ``(1 - f_j)``.
- ``negated``: the sign rule with the sign flipped, ``b_i <- b_i - u sign(e_i)`` (positive
  feedback, routing collapses). :func:`sigmoid_moe.update_bias` refuses a negative rate, so
  this is an explicit negated delta, only for demonstrating divergence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from sigmoid_moe.balancing import update_bias
from sigmoid_moe.config import RouterConfig
from sigmoid_moe.losses import load_balancing_loss, router_probs
from sigmoid_moe.routing import Routing, route

__all__ = ["RULES", "initial_control", "rule_indices", "routed", "updated"]

RULES = (
    "sign",
    "sign_zero_mean",
    "proportional",
    "multiplicative",
    "quantile",
    "aux_loss",
    "negated",
)
_ADDITIVE = ("sign", "sign_zero_mean", "proportional", "quantile", "negated")


def rule_indices(rules: Sequence[str], compiled: Sequence[str]) -> list[int]:
    """Positions of ``rules`` among the ``compiled`` branches, with a clear error."""
    for rule in rules:
        if rule not in RULES:
            raise ValueError(f"rule={rule!r} is not supported; choose one of {RULES}.")
        if rule not in compiled:
            raise ValueError(f"rule={rule!r} is not among the compiled rules {tuple(compiled)}.")
    return [list(compiled).index(rule) for rule in rules]


def initial_control(rule: str, num_experts: int) -> jax.Array:
    """``[E]`` float32: ones for ``multiplicative`` (a factor), zeros otherwise."""
    fill = 1.0 if rule == "multiplicative" else 0.0
    return jnp.full((num_experts,), fill, jnp.float32)


def _scores(logits_te: jax.Array, config: RouterConfig) -> jax.Array:
    if config.score_fn == "sigmoid":
        return jax.nn.sigmoid(logits_te)
    return jax.nn.softmax(logits_te, axis=-1)


def _route_inputs(rule: str, logits_te: jax.Array, c_e: jax.Array, config: RouterConfig):
    """``(logits, bias)`` that make ``route`` select as ``rule`` prescribes."""
    if rule in _ADDITIVE:
        return logits_te, c_e
    zero_e = jnp.zeros_like(c_e)
    if rule == "aux_loss":
        return logits_te + c_e, zero_e
    # multiplicative: see the module docstring.
    log_b_e = jnp.log(jnp.maximum(c_e, 0.0))  # b <= 0 would mean "never pick": -inf
    if config.score_fn == "softmax":
        return logits_te + log_b_e, zero_e
    log_p_te = jax.nn.log_sigmoid(logits_te) + (log_b_e - jnp.max(log_b_e))  # log(s b / max b)
    log_p_te = jnp.minimum(log_p_te, 0.0)
    return log_p_te - jnp.log(-jnp.expm1(log_p_te)), zero_e  # logit(p) = log p - log(1 - p)


def routed(
    compiled: Sequence[str],
    rule_index: jax.Array,
    logits_te: jax.Array,
    c_e: jax.Array,
    config: RouterConfig,
) -> Routing:
    """Routes ``logits_te`` under rule ``compiled[rule_index]`` (one ``route`` call).

    The returned ``scores`` are those ``route`` saw; use the logits for unbiased scores.
    """
    branches = [(lambda lg, c, r=rule: _route_inputs(r, lg, c, config)) for rule in compiled]
    if len(branches) == 1:
        logits_in, bias_in = branches[0](logits_te, c_e)
    else:
        logits_in, bias_in = jax.lax.switch(rule_index, branches, logits_te, c_e)
    return route(logits_in, bias_in, config)


_BISECTIONS = 24  # halvings of [min, max]: float32 resolution of a score in (0, 1)


def _quantile_bias(scores_te: jax.Array, top_k: int) -> jax.Array:
    """``-(q - mean q)`` with ``q_i`` the ``(1 - k/E)`` quantile of ``s_:i`` over the batch.

    ``q_i`` is the smallest threshold (to within ``range / 2**24``) with at most
    ``m = round(T k / E)`` tokens strictly above it: ``m`` tokens per expert is perfect
    balance. Found by bisection, 24 counting passes over ``[T, E]``: on CPU this is ~40x
    faster than ``lax.top_k``/sort over the tokens at T=4096, E=256.
    """
    t, e = scores_te.shape
    m = min(max(round(t * top_k / e), 1), t)

    def halve(_, bounds):
        lo_e, hi_e = bounds
        mid_e = 0.5 * (lo_e + hi_e)
        too_many_e = jnp.sum(scores_te > mid_e, axis=0) > m  # [E]
        return jnp.where(too_many_e, mid_e, lo_e), jnp.where(too_many_e, hi_e, mid_e)

    bounds = (jnp.min(scores_te, axis=0), jnp.max(scores_te, axis=0))  # [E], [E]
    _, q_e = jax.lax.fori_loop(0, _BISECTIONS, halve, bounds)
    return -(q_e - jnp.mean(q_e))


def _sign_delta(load_e: jax.Array) -> jax.Array:
    # rate=1 on a zero bias returns sign(e_i) itself, computed exactly by update_bias.
    return update_bias(jnp.zeros(load_e.shape, jnp.float32), load_e, rate=1.0, rule="sign")


def _next(
    rule: str,
    c_e: jax.Array,
    load_e: jax.Array,
    expert_ids_tk: jax.Array,
    logits_te: jax.Array,
    u: jax.Array,
    step: jax.Array,
    config: RouterConfig,
) -> jax.Array:
    if rule in ("sign", "sign_zero_mean", "proportional"):
        # u was checked where the sweep took it; traced here, update_bias uses it as is.
        return update_bias(c_e, load_e, rate=u, rule=rule)
    if rule == "negated":
        return c_e - u * _sign_delta(load_e)
    if rule == "multiplicative":
        return c_e * (1.0 + u * _sign_delta(load_e))
    if rule == "quantile":
        return _quantile_bias(_scores(logits_te, config), config.top_k)

    # aux_loss: SGD on the Switch loss w.r.t. the logit offset; the choices are constants.
    def loss(offset_e: jax.Array) -> jax.Array:
        shifted_te = logits_te + offset_e
        if config.score_fn == "sigmoid":
            probs_te = router_probs(jax.nn.sigmoid(shifted_te))
        else:
            probs_te = jax.nn.softmax(shifted_te, axis=-1)
        return load_balancing_loss(probs_te, expert_ids_tk)

    return c_e - (u * config.num_experts) * jax.grad(loss)(c_e)


def updated(
    compiled: Sequence[str],
    rule_index: jax.Array,
    c_e: jax.Array,
    load_e: jax.Array,
    expert_ids_tk: jax.Array,
    logits_te: jax.Array,
    u: jax.Array,
    step: jax.Array,
    config: RouterConfig,
) -> jax.Array:
    """The next ``[E]`` control under rule ``compiled[rule_index]`` at rate ``u``."""
    branches: list[Callable[..., jax.Array]] = [
        (lambda *a, r=rule: _next(r, *a, config)) for rule in compiled
    ]
    args = (c_e, load_e, expert_ids_tk, logits_te, u, step)
    if len(branches) == 1:
        return branches[0](*args)
    return jax.lax.switch(rule_index, branches, *args)
