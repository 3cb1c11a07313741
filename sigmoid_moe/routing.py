"""Token-to-expert routing: sigmoid (or softmax) gate, bias correction, group limiting.

Pure array functions; no Flax. The data flow is
``logits -> scores -> selection scores (+bias, group mask) -> top-k -> weights``.

References:
  DeepSeek-V3 Technical Report, eq. 12-16 (arXiv 2412.19437).
  Wang et al., Auxiliary-Loss-Free Load Balancing Strategy for MoE (arXiv 2408.15664).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sigmoid_moe import _sigmoid_selection
from sigmoid_moe._checks import require_array
from sigmoid_moe.config import RouterConfig
from sigmoid_moe.topk import top_k

__all__ = ["Routing", "route", "sigmoid_moe_router"]


class Routing(NamedTuple):
    """The router's decision for every token (leading dims ``...`` as in the logits)."""

    expert_ids: jax.Array  # [..., k] int32, descending by selection score, ties to lower id
    weights: jax.Array  # [..., k] float32 combine weights, aligned with expert_ids
    scores: jax.Array  # [..., E] float32 gate scores the weights are taken from
    selection_scores: jax.Array  # [..., E] float32 what top-k ranked (-inf: group-excluded)
    routed: jax.Array  # [...] bool False: a non-finite logit or bias; ids -1, weights 0


def _check_inputs(logits: jax.Array, bias: jax.Array | None, config: RouterConfig) -> None:
    if not isinstance(config, RouterConfig):
        raise TypeError(f"config must be a RouterConfig, got {type(config).__name__}.")
    require_array("logits", logits, "[..., num_experts]")
    if bias is not None:
        require_array("bias", bias, "[num_experts]")
    shape = jnp.shape(logits)
    dtype = jnp.result_type(logits)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"logits must be a floating array, got dtype {dtype}; cast them, e.g. "
            "logits.astype(jnp.float32)."
        )
    if len(shape) < 1 or shape[-1] != config.num_experts:
        raise ValueError(
            f"logits must have shape [..., num_experts={config.num_experts}], got {shape}."
        )
    if bias is not None:
        bias_shape = jnp.shape(bias)
        if bias_shape != (config.num_experts,):
            raise ValueError(
                f"bias must have shape (num_experts,) = ({config.num_experts},), got {bias_shape}."
            )
        if not jnp.issubdtype(jnp.result_type(bias), jnp.floating):
            raise TypeError(f"bias must be floating (float32), got {jnp.result_type(bias)}.")


def _top2_sum(x: jax.Array) -> jax.Array:
    """Sum of the two largest entries along the last axis (ties counted twice), NaN as -inf.

    Three reductions instead of a top-k: the sum needs the two values, not their order.
    """
    x = jnp.where(jnp.isnan(x), -jnp.inf, x)
    first = jnp.max(x, axis=-1)
    first_count = jnp.sum(x == first[..., None], axis=-1)
    below = jnp.max(jnp.where(x < first[..., None], x, -jnp.inf), axis=-1)
    return first + jnp.where(first_count > 1, first, below)


def _group_scores(group_source: jax.Array, config: RouterConfig) -> jax.Array:
    """``[..., G]`` score per expert group (DeepSeek-V3: sum of its two best scores)."""
    grouped = group_source.reshape(
        *group_source.shape[:-1], config.num_groups, config.experts_per_group
    )
    summed = config.experts_summed_per_group
    if summed == 1:
        return jnp.max(grouped, axis=-1)
    if summed == 2:
        return _top2_sum(grouped)
    return jnp.sum(top_k(grouped, summed)[0], axis=-1)


def _kept_groups(group_source: jax.Array, config: RouterConfig) -> jax.Array:
    """``[..., topk_groups]`` int32 ids of each token's best groups, in ascending order."""
    _, kept = top_k(_group_scores(group_source, config), config.topk_groups)
    # Ascending group order keeps expert order inside the gathered candidates, so ties
    # among them still go to the lower expert index.
    return jnp.sort(kept, axis=-1)


def _group_mask(selection: jax.Array, kept_groups: jax.Array, config: RouterConfig) -> jax.Array:
    """``selection`` with every expert outside the kept groups set to ``-inf``.

    ``-inf``, never 0: with a negative bias a 0 would outrank the real selection scores.
    """
    group_ids = jnp.arange(config.num_groups, dtype=jnp.int32)
    keep_group = jnp.any(kept_groups[..., :, None] == group_ids, axis=-2)  # [..., G]
    keep_expert = jnp.repeat(keep_group, config.experts_per_group, axis=-1)  # [..., E]
    return jnp.where(keep_expert, selection, -jnp.inf)


def _group_limited_top_k(
    selection: jax.Array, kept_groups: jax.Array, config: RouterConfig
) -> jax.Array:
    """``[..., k]`` ids of the top-k of ``selection`` among the kept groups' experts only.

    Equal to ``top_k(_group_mask(...))`` but ranks ``topk_groups * E/G`` candidates
    instead of ``E`` (half at DeepSeek-V3's 4 of 8 groups).
    """
    per_group = config.experts_per_group
    grouped = selection.reshape(*selection.shape[:-1], config.num_groups, per_group)
    candidates = jnp.take_along_axis(grouped, kept_groups[..., None], axis=-2)  # [..., Gk, E/G]
    candidates = candidates.reshape(*selection.shape[:-1], config.topk_groups * per_group)
    _, position = top_k(candidates, config.top_k)  # [..., k] into the candidates
    group = jnp.take_along_axis(kept_groups, position // per_group, axis=-1)
    return (group * per_group + position % per_group).astype(jnp.int32)


def route(logits: jax.Array, bias: jax.Array | None, config: RouterConfig) -> Routing:
    """Routes every token to ``top_k`` experts.

    With ``bias_mode="selection"`` (DeepSeek-V3) and ``s = score_fn(logits)``::

        chosen  = top_k(s + bias)                         # selection only
        weights = route_scale * s[chosen] / sum(s[chosen])  # unbiased; no division if not normalize

    With ``bias_mode="logit"`` (the reference problem) ``s = score_fn(logits + bias)``,
    ``chosen = top_k(s)`` and the weights are those biased scores, normalised. The ranking
    uses the biased float32 logits, equal to ranking ``s`` because the score function is
    strictly increasing, except where float32 ``s`` saturates into ties (two logits above
    ~17 both give 1.0): there the larger logit wins, where :func:`sigmoid_moe_router`
    (the reference's float64 scores) may tie and take the lower index.

    Group-limited routing first keeps the ``topk_groups`` groups with the largest group
    score (computed from ``s + bias``) and masks the other experts with ``-inf``.

    Non-finite values have one behaviour: a token whose logits hold a NaN or an infinity
    (and every token, if the bias does) is not routed. It gets ``expert_ids = -1``,
    ``weights = 0``, ``scores = 0`` and ``routed = False``; :func:`sigmoid_moe.expert_load`
    does not count an id of -1, the dispatch gives such a token no expert, and
    :class:`sigmoid_moe.MoELayer` reports how many there were (``MoEAux.nonfinite_tokens``).

    On CPU, with the native kernels built, sigmoid selection without groups first narrows
    each token's experts in C++ (csrc/route_cpu.cc: approximate keys, every expert within
    a proven margin of the k-th) and ranks only those by their exact keys; the results
    are the portable path's, bit for bit (README, "How the CPU router is fast").

    Everything is computed in float32 whatever the input dtype. Normalised weights are a
    softmax of the chosen log-scores (``log_sigmoid``), so they sum to 1 even when every
    chosen sigmoid underflows. The bias gets no gradient; the logits get theirs through
    the weights.

    Args:
      logits: ``[..., E]`` router logits, any floating dtype.
      bias: ``[E]`` per-expert bias (float32), or ``None`` for zeros.
      config: the routing rules.

    Returns:
      A :class:`Routing`.
    """
    _check_inputs(logits, bias, config)
    with jax.named_scope("route"):  # labels the ops in profiles (benchmarks/breakdown.py)
        return _route(logits, bias, config)


def _route(logits: jax.Array, bias: jax.Array | None, config: RouterConfig) -> Routing:
    logits = jnp.asarray(logits, jnp.float32)
    if bias is None:
        bias = jnp.zeros((config.num_experts,), jnp.float32)
    bias = jax.lax.stop_gradient(jnp.asarray(bias, jnp.float32))
    # A token with a NaN or infinite logit, or any token when the bias is not finite, is
    # not routed. Non-finite logits are zeroed first, so neither the token's forward
    # values nor its gradients can carry a NaN into the rest of the batch (elementwise:
    # broadcasting the per-token flag over [..., E] cost a full pass on XLA:CPU).
    finite = jnp.isfinite(logits)
    zeroed = jnp.where(finite, logits, 0.0)

    if config.bias_mode == "logit":
        zeroed = zeroed + bias
    if config.score_fn == "sigmoid":
        scores = jax.nn.sigmoid(zeroed)
        log_scores = None  # log_sigmoid only of the k chosen logits, below
    else:
        log_scores = jax.nn.log_softmax(zeroed, axis=-1)
        scores = jnp.exp(log_scores)

    if config.bias_mode == "selection":
        selection = scores + bias
        group_source = selection
    else:
        # The score function is strictly increasing in the logit, so ranking the biased
        # logits ranks the scores, without the ties a saturated float32 sigmoid creates.
        # (sigmoid_moe_router, the reference drop-in, ranks float64 sigmoids instead.)
        selection = zeroed
        group_source = scores
    routed = chosen = None
    if config.group_limited:
        kept_groups = _kept_groups(group_source, config)
        expert_ids = _group_limited_top_k(selection, kept_groups, config)
        selection = _group_mask(selection, kept_groups, config)  # reported; unused -> DCE
    elif _sigmoid_selection.applies(logits, config):
        expert_ids, chosen, routed = _sigmoid_selection.select(logits, bias, config.top_k)
    else:
        _, expert_ids = top_k(selection, config.top_k)  # [..., k]
    if routed is None:
        routed = jnp.all(finite, axis=-1) & jnp.all(jnp.isfinite(bias))
    if config.normalize:
        if log_scores is None:
            if chosen is None:
                # Gathered, then zeroed (and shifted): the same bits as gathering the zeroed
                # (biased) logits, without a pass over [..., E] for them.
                chosen = jnp.take_along_axis(logits, expert_ids, axis=-1)  # [..., k]
                chosen = jnp.where(jnp.isfinite(chosen), chosen, 0.0)
            if config.bias_mode == "logit":
                chosen = chosen + bias[expert_ids]
            chosen_log = jax.nn.log_sigmoid(chosen)
        else:
            chosen_log = jnp.take_along_axis(log_scores, expert_ids, axis=-1)  # [..., k]
        weights = jax.nn.softmax(chosen_log, axis=-1)
    else:
        weights = jnp.take_along_axis(scores, expert_ids, axis=-1)
    weights = weights * jnp.float32(config.route_scale)
    return Routing(
        expert_ids=jnp.where(routed[..., None], expert_ids, -1),
        weights=jnp.where(routed[..., None], weights, 0.0),
        scores=jnp.where(routed[..., None], scores, 0.0),
        selection_scores=selection,
        routed=routed,
    )


def sigmoid_moe_router(
    token_embeddings: list[list[float]],
    expert_weights: list[list[float]],
    expert_bias: list[float],
    top_k: int,
) -> tuple[list[list[int]], list[list[float]]]:
    """Drop-in for the reference problem's router: lists in, lists out, its exact answer.

    For token ``b`` and expert ``e``: ``z = expert_bias[e] + sum_j x[b][j] * w[e][j]``
    (the products summed in order ``j = 0, 1, ...``), clamped to ``[-500, 500]``, scored
    ``s = 1 / (1 + exp(-z))``, all in float64. Each token keeps the ``top_k`` largest
    scores, equal scores going to the lower expert index, and returns them divided by
    their sum (taken in rank order).

    The arithmetic is the reference's, operation for operation, so the answer is too,
    ties included: with ``x = [100, 100]`` two experts can both score exactly ``1.0`` in
    float64, and the lower index ranks first. :func:`route` with ``bias_mode="logit"``
    ranks float32 logits instead (see there), which is what a model wants, not this.

    Args:
      token_embeddings: ``[B][d]``.
      expert_weights: ``[E][d]``.
      expert_bias: ``[E]``.
      top_k: experts per token, ``1 <= top_k <= E``.

    Returns:
      ``(indices [B][top_k], weights [B][top_k])`` as Python ints and floats.
    """
    x_bd = np.asarray(token_embeddings, dtype=np.float64)
    w_ed = np.asarray(expert_weights, dtype=np.float64)
    bias_e = np.asarray(expert_bias, dtype=np.float64)
    if x_bd.ndim != 2 or w_ed.ndim != 2 or x_bd.shape[1] != w_ed.shape[1]:
        raise ValueError(
            "token_embeddings must be [B][d] and expert_weights [E][d] with the same d; got "
            f"shapes {x_bd.shape} and {w_ed.shape}."
        )
    if bias_e.shape != (w_ed.shape[0],):
        raise ValueError(
            f"expert_bias must have one entry per expert ({w_ed.shape[0]}), got shape "
            f"{bias_e.shape}."
        )
    RouterConfig(num_experts=max(1, w_ed.shape[0]), top_k=top_k)  # validates top_k
    if x_bd.shape[0] == 0:
        return [], []
    # sum(...) in Python starts at 0 and adds each product in turn: accumulate the same way.
    dot_be = np.zeros((x_bd.shape[0], w_ed.shape[0]), np.float64)
    for j in range(x_bd.shape[1]):
        dot_be = dot_be + x_bd[:, j, None] * w_ed[None, :, j]
    z_be = np.clip(bias_e + dot_be, -500.0, 500.0)
    # math.exp (the C library's), not np.exp, whose vectorised exp may differ in the last bit.
    exp_be = np.vectorize(math.exp, otypes=[np.float64])(-z_be)
    scores_be = 1.0 / (1.0 + exp_be)
    order_bk = np.argsort(-scores_be, axis=-1, kind="stable")[:, :top_k]
    chosen_bk = np.take_along_axis(scores_be, order_bk, axis=-1)
    total_b = np.zeros(chosen_bk.shape[0], np.float64)
    for j in range(top_k):  # the sum in rank order, as sum() over the sorted pairs
        total_b = total_b + chosen_bk[:, j]
    total_b = np.where(total_b == 0.0, 1.0, total_b)
    return order_bk.tolist(), (chosen_bk / total_b[:, None]).tolist()
