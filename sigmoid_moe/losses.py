"""Auxiliary balance losses: the softmax baseline and complements to the bias.

All take router probabilities ``probs [..., E]`` that sum to 1 per token (softmax
outputs, or sigmoid scores divided by their sum: :func:`router_probs`) and the chosen
``expert_ids [..., k]``. Counts enter as constants (no gradient); gradients reach the
router through ``probs``. Each returns the unscaled loss; multiply by your coefficient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sigmoid_moe._checks import check_token_mask
from sigmoid_moe.balancing import AxisName, expert_load

__all__ = [
    "balance_loss",
    "global_batch_balance_loss",
    "load_balancing_loss",
    "router_probs",
    "router_z_loss",
    "sequence_balance_loss",
]


def router_probs(scores: jax.Array) -> jax.Array:
    """Per-token probabilities ``s_i / sum_j s_j`` from gate scores ``[..., E]``."""
    scores = jnp.asarray(scores, jnp.float32)
    return scores / jnp.maximum(
        jnp.sum(scores, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny
    )


def _mask(shape: tuple[int, ...], token_mask: jax.Array | None) -> jax.Array:
    if token_mask is None:
        return jnp.ones(shape, jnp.float32)
    return check_token_mask(token_mask, shape, "token_mask").astype(jnp.float32)


def _masked(values_e: jax.Array, mask: jax.Array) -> jax.Array:
    """``values_e [..., E]`` in float32 with masked tokens' rows set to 0, so that a masked
    token contributes exactly 0 (and no NaN, by value or by gradient) whatever it holds."""
    return jnp.where(mask[..., None] > 0, jnp.asarray(values_e, jnp.float32), 0.0)


def _check(probs: jax.Array, expert_ids: jax.Array) -> tuple[int, int]:
    if jnp.shape(probs)[:-1] != jnp.shape(expert_ids)[:-1]:
        raise ValueError(
            f"probs [..., E] and expert_ids [..., k] must share leading dims; got "
            f"{jnp.shape(probs)} and {jnp.shape(expert_ids)}."
        )
    return jnp.shape(probs)[-1], jnp.shape(expert_ids)[-1]


def balance_loss(
    count: jax.Array, mean_prob: jax.Array, num_tokens: jax.Array, top_k: int
) -> jax.Array:
    """The Switch-form balance loss from its statistics: ``sum_i f_i P_i``.

    ``f_i = E / (k T) * count_i`` (a constant: no gradient) and ``P_i = mean_prob_i``.
    The other losses here are this with the statistics taken over a batch, a sequence or
    a global batch; call it directly when the counts come from elsewhere, e.g. summed
    over the micro-batches of one optimizer step (the global-batch scope of "Demons in
    the Detail", arXiv 2501.11873) while ``P`` is the current micro-batch's.

    Args:
      count: ``[..., E]`` assignments per expert over ``num_tokens`` tokens.
      mean_prob: ``[..., E]`` mean router probability (:func:`router_probs`) per expert.
      num_tokens: ``[...]`` the tokens ``count`` was taken over.
      top_k: k.

    Returns:
      ``[...]`` float32; 1 under perfect balance.
    """
    num_experts = count.shape[-1]
    num_tokens = jnp.asarray(num_tokens, jnp.float32)
    f = num_experts / (top_k * jnp.maximum(num_tokens, 1.0))[..., None] * count
    return jnp.sum(jax.lax.stop_gradient(f.astype(jnp.float32)) * mean_prob, axis=-1)


def load_balancing_loss(
    probs: jax.Array, expert_ids: jax.Array, token_mask: jax.Array | None = None
) -> jax.Array:
    """Switch/GShard load-balancing loss (arXiv 2101.03961 eq. 4, top-k form).

    .. math::  L = \\sum_i f_i P_i,\\quad f_i = \\frac{N}{K T} c_i,\\quad
               P_i = \\frac{1}{T} \\sum_t p_{ti}

    over all tokens; equals 1 under perfect balance. Switch uses ``alpha = 1e-2``.
    """
    num_experts, k = _check(probs, expert_ids)
    mask = _mask(jnp.shape(probs)[:-1], token_mask)
    count = expert_load(expert_ids, num_experts, token_mask=mask > 0).astype(jnp.float32)
    num_tokens = jnp.sum(mask)
    mean_prob = jnp.einsum("...e,...->e", _masked(probs, mask), mask) / jnp.maximum(num_tokens, 1)
    return balance_loss(count, mean_prob, num_tokens, k)


def sequence_balance_loss(
    probs: jax.Array, expert_ids: jax.Array, token_mask: jax.Array | None = None
) -> jax.Array:
    """DeepSeek-V3 sequence-wise balance loss (arXiv 2412.19437 eq. 17-20).

    The Switch form computed per sequence and averaged over sequences; ``probs`` should
    be the normalised sigmoid scores :func:`router_probs`. DeepSeek-V3 uses ``alpha = 1e-4``.

    Args:
      probs: ``[B, S, E]``.
      expert_ids: ``[B, S, k]``.
      token_mask: optional ``[B, S]``.
    """
    num_experts, k = _check(probs, expert_ids)
    if jnp.ndim(probs) != 3:
        raise ValueError(
            f"probs must be [batch, seq, E] for a sequence-wise loss, got {jnp.shape(probs)}."
        )
    mask = _mask(jnp.shape(probs)[:-1], token_mask)  # [B, S]
    one_hot = jnp.sum(
        jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32), axis=-2
    )  # [B,S,E]
    count = jnp.einsum("bse,bs->be", one_hot, mask)
    num_tokens = jnp.sum(mask, axis=-1)  # [B]
    mean_prob = (
        jnp.einsum("bse,bs->be", _masked(probs, mask), mask) / jnp.maximum(num_tokens, 1)[:, None]
    )
    per_seq = balance_loss(count, mean_prob, num_tokens, k)  # [B]
    has_tokens = (num_tokens > 0).astype(jnp.float32)
    return jnp.sum(per_seq * has_tokens) / jnp.maximum(jnp.sum(has_tokens), 1)


def global_batch_balance_loss(
    probs: jax.Array,
    expert_ids: jax.Array,
    token_mask: jax.Array | None = None,
    *,
    axis_name: AxisName = None,
) -> jax.Array:
    """Global-batch balance loss ("Demons in the Detail", arXiv 2501.11873).

    The Switch form with ``f_i`` from integer counts summed over ``axis_name`` (an
    all-reduce of E integers inside ``shard_map``), so a micro-batch is not pushed to
    balance on its own; ``P_i`` stays local.
    """
    num_experts, k = _check(probs, expert_ids)
    mask = _mask(jnp.shape(probs)[:-1], token_mask)
    count = expert_load(expert_ids, num_experts, token_mask=mask > 0)
    num_tokens_local = jnp.sum(mask)
    num_tokens = num_tokens_local.astype(jnp.int32)
    if axis_name is not None:
        count = jax.lax.psum(count, axis_name)
        num_tokens = jax.lax.psum(num_tokens, axis_name)
    mean_prob = jnp.einsum("...e,...->e", _masked(probs, mask), mask) / jnp.maximum(
        num_tokens_local, 1
    )
    return balance_loss(count.astype(jnp.float32), mean_prob, num_tokens.astype(jnp.float32), k)


def router_z_loss(logits: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    """ST-MoE router z-loss (arXiv 2202.08906 eq. 5): ``mean_t logsumexp(x_t)^2``.

    Coefficient 1e-3 in ST-MoE.
    """
    logits = jnp.asarray(logits, jnp.float32)
    mask = _mask(jnp.shape(logits)[:-1], token_mask)
    z = jax.nn.logsumexp(_masked(logits, mask), axis=-1)
    return jnp.sum(z**2 * mask) / jnp.maximum(jnp.sum(mask), 1)
