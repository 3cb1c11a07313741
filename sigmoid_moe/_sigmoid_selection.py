"""DeepSeek-V3 selection ``top_k(sigmoid(logits) + bias)`` without groups, fast on CPU.

Internal: :func:`sigmoid_moe.route` calls :func:`select` where :func:`applies`. Two paths
give the same bits:

- portable (every backend): the keys of all ``E`` experts, then :func:`sigmoid_moe.top_k`;
- CPU, with the native kernels built: csrc/route_cpu.cc reads the float32 logits once and
  returns, per token, the few experts that can be among its top ``k`` (approximate keys,
  every expert within a proven margin of a lower bound of the ``k``-th; see the header of
  csrc/route_cpu.cc), with their logits and biases. Only their exact keys are computed,
  with the portable path's float32 operations, and a second kernel ranks them, ties to
  the lower expert index. Should a token have more near ties than candidate slots, the
  call ranks all experts instead (a ``lax.cond``, so only then).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sigmoid_moe import _native
from sigmoid_moe.config import RouterConfig
from sigmoid_moe.topk import top_k

__all__ = ["Selection", "applies", "num_candidates", "select"]


def num_candidates(k: int) -> int:
    """Candidate slots per token for top-``k``: room for ``k`` plus 8 near ties, and for
    ``2k - 1`` (whole groups of tied experts above the ``k``-th, at most ``k`` of the
    ``k``-th's group: the kernel keeps no more of a group that ties exactly), in
    multiples of 8."""
    return -(-max(k + 8, 2 * k) // 8) * 8


def applies(logits: jax.Array, config: RouterConfig) -> bool:
    """Whether ``route`` selects through :func:`select`: sigmoid scores, the bias for
    selection only, no groups, and the kernels take ``logits`` (:func:`_kernel_takes`)."""
    return (
        config.score_fn == "sigmoid"
        and config.bias_mode == "selection"
        and not config.group_limited
        and _native.serves(logits, lambda: _kernel_takes(config.num_experts, config.top_k))
    )


def _kernel_takes(num_experts: int, k: int) -> bool:
    """The kernels' own limits: more experts than candidate slots, within their slots and k."""
    slots = num_candidates(k)
    return (
        num_experts > slots and slots <= _native.LIMITS.max_candidates and k <= _native.LIMITS.max_k
    )


class Selection(NamedTuple):
    """What :func:`select` returns (``...``: the token dimensions of the logits)."""

    expert_ids: jax.Array  # [..., k] int32 by key descending, ties to the lower id
    chosen_logits: jax.Array  # [..., k] float32 the logits at expert_ids, 0 if not finite
    routed: jax.Array  # [...] bool every logit and the bias finite


def select(logits: jax.Array, bias: jax.Array, k: int) -> Selection:
    """Top-``k`` experts by ``sigmoid(logits) + bias`` (float32 ``logits [..., E]``,
    ``bias [E]``). ``chosen_logits`` is differentiable in ``logits`` (the gather's
    derivative); the ids and ``routed`` carry none."""
    ids, values, routed = _native.native_or_portable(
        functools.partial(_by_candidates, k=k),
        functools.partial(_of_all, k=k),
        jax.lax.stop_gradient(logits),
        bias,
        when=lambda: _kernel_takes(logits.shape[-1], k),
    )
    return Selection(ids, _gathered(logits, ids, values), routed)


@jax.custom_jvp
def _gathered(logits: jax.Array, ids: jax.Array, values: jax.Array) -> jax.Array:
    """``values``, equal to ``take_along_axis(logits, ids)`` zeroed where not finite, with
    that gather's derivatives (of every order): the forward pass need not read
    ``[..., E]`` again."""
    del logits, ids
    return values


@_gathered.defjvp
def _gathered_jvp(primals, tangents):
    logits, ids, values = primals
    finite = jnp.isfinite(jnp.take_along_axis(logits, ids, axis=-1))
    tangent = jnp.where(finite, jnp.take_along_axis(tangents[0], ids, axis=-1), 0.0)
    # The primal through the rule again, so that a second derivative sees the gather too.
    return _gathered(logits, ids, values), tangent


def _of_all(logits, bias, *, k):
    """The portable path: every expert's key, then the top k."""
    finite = jnp.isfinite(logits)
    routed = jnp.all(finite, axis=-1) & jnp.all(jnp.isfinite(bias))
    zeroed = jnp.where(finite, logits, 0.0)
    ids = top_k(jax.nn.sigmoid(zeroed) + bias, k)[1]
    return ids, jnp.take_along_axis(zeroed, ids, axis=-1), routed


def _by_candidates(logits, bias, *, k):
    """The CPU path: the kernel's candidates, their exact keys, their ranking."""
    index, chosen, chosen_bias, status = _native.route_candidates(
        logits, bias, k, num_candidates(k)
    )
    # The exact keys of the candidates: a routed token's logits are all finite, so these
    # are the bits _of_all ranks; pads are -inf (bias -inf).
    keys = jax.nn.sigmoid(chosen) + chosen_bias  # [..., C]
    # Candidates are ascending, so ties among them still go to the lower expert index.
    ids, values = _native.rank_candidates(keys, index, chosen, k)
    ids, values = jax.lax.cond(
        _any_in_batch(status == _native.LIMITS.too_many),
        lambda: _of_all(logits, bias, k=k)[:2],
        lambda: (ids, values),
    )
    return ids, values, (status != _native.LIMITS.not_routed) & jnp.all(jnp.isfinite(bias))


@jax.custom_batching.custom_vmap
def _any_in_batch(flags: jax.Array) -> jax.Array:
    """``any(flags)``, and under ``vmap`` over the whole batch too: the fallback's
    predicate stays a scalar, so ``lax.cond`` stays a branch (a batched predicate would
    make it a select that always runs the fallback)."""
    return jnp.any(flags)


@_any_in_batch.def_vmap
def _any_in_batch_vmap(axis_size, in_batched, flags):
    del axis_size, in_batched
    return _any_in_batch(flags), False
