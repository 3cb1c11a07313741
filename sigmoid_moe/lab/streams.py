"""Synthetic router-logit streams: what a router might emit, without a model.

A stream is a pure function of ``(params, key, step)`` so that it can be evaluated
inside ``jax.lax.scan`` with ``jax.random.fold_in(key, step)`` and nothing stored. The
logits of step ``t`` for token ``j`` and expert ``i`` are a sum of optional parts::

    logit_tji = skew_ti                       # fixed preference, drifting and/or domain-shifted
              + (x_tj @ W)_i                  # low-rank "learned router": x ~ N(0, I_R), W fixed
              + seq_t,j//L,i                  # latent shared by the L tokens of one sequence
              + noise_tji                     # full-rank iid noise (costs T*E normals a step)

with ``skew_t = cos(2 pi t / P) p0[d] + sin(2 pi t / P) p1[d]`` (P = ``drift_period``;
without drift ``skew_t = p0[d]``) and ``d = (t // shift_every) % num_domains`` the current
domain: a sudden shift every ``shift_every`` steps. ``p0, p1 ~ N(0, preference_std^2)``
per domain and expert, so the marginal skew keeps its scale while it rotates.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sigmoid_moe._checks import require_float, require_int

__all__ = ["StreamConfig", "StreamParams", "init_stream", "stream_logits"]


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """A generated stream of router logits ``[num_tokens, num_experts]`` per step.

    Attributes:
      num_tokens: T, tokens per batch (the counting scope of the bias update).
      num_experts: E.
      preference_std: scale of the fixed per-expert skew ``p0`` (the imbalance to fix).
      rank: R of the low-rank learned-router part ``x @ W`` (0 switches it off).
      rank_std: standard deviation of each logit from the low-rank part.
      noise_std: full-rank iid per-token noise; costly (T*E normals per step).
      drift_period: steps for the skew to rotate once from ``p0`` through ``p1``
        (0: stationary skew).
      num_domains: how many skew vectors to cycle through.
      shift_every: steps between sudden domain shifts (0: never shift).
      seq_len: L, tokens per sequence sharing a latent (must divide ``num_tokens``).
      seq_std: scale of the per-sequence latent (0 switches it off).
    """

    num_tokens: int
    num_experts: int
    preference_std: float = 1.0
    rank: int = 16
    rank_std: float = 1.0
    noise_std: float = 0.0
    drift_period: int = 0
    num_domains: int = 1
    shift_every: int = 0
    seq_len: int = 1
    seq_std: float = 0.0

    def __post_init__(self) -> None:
        require_int("num_tokens", self.num_tokens, 1)
        require_int("num_experts", self.num_experts, 1)
        require_int("rank", self.rank, 0)
        require_int("drift_period", self.drift_period, 0)
        require_int("num_domains", self.num_domains, 1)
        require_int("shift_every", self.shift_every, 0)
        require_int("seq_len", self.seq_len, 1)
        for name in ("preference_std", "rank_std", "noise_std", "seq_std"):
            require_float(name, getattr(self, name), hint=" (0 switches it off)")
        if self.num_tokens % self.seq_len:
            raise ValueError(
                f"seq_len={self.seq_len} does not divide num_tokens={self.num_tokens}; "
                "choose a divisor of num_tokens."
            )
        if self.num_domains > 1 and self.shift_every == 0:
            raise ValueError(
                f"num_domains={self.num_domains} needs shift_every > 0 to ever change domain; "
                "set shift_every or num_domains=1."
            )


class StreamParams(NamedTuple):
    """The fixed part of a stream, drawn once per seed."""

    preference_de: jax.Array  # [D, E] float32 skew p0 per domain
    preference2_de: jax.Array  # [D, E] float32 skew p1 per domain (drift direction)
    w_re: jax.Array  # [R, E] float32 low-rank router (R may be 0)


def init_stream(config: StreamConfig, key: jax.Array) -> StreamParams:
    """Draws the fixed preferences and low-rank router of one seed."""
    k_p0, k_p1, k_w = jax.random.split(key, 3)
    shape_de = (config.num_domains, config.num_experts)
    w_re = jax.random.normal(k_w, (config.rank, config.num_experts), jnp.float32)
    return StreamParams(
        preference_de=config.preference_std * jax.random.normal(k_p0, shape_de, jnp.float32),
        preference2_de=config.preference_std * jax.random.normal(k_p1, shape_de, jnp.float32),
        # Scaled so each low-rank logit has standard deviation rank_std.
        w_re=w_re * (config.rank_std / math.sqrt(max(config.rank, 1))),
    )


def stream_logits(
    config: StreamConfig, params: StreamParams, key: jax.Array, step: jax.Array
) -> jax.Array:
    """The ``[T, E]`` float32 logits of ``step``; ``key`` is the per-step key.

    Deterministic in ``(params, key, step)``: callers pass ``fold_in(stream_key, step)``.
    Parts whose scale is 0 are not computed at all (static switches).
    """
    t, e = config.num_tokens, config.num_experts
    k_x, k_seq, k_noise = jax.random.split(key, 3)
    step_f = jnp.asarray(step, jnp.float32)
    if config.shift_every:
        domain = (jnp.asarray(step, jnp.int32) // config.shift_every) % config.num_domains
    else:
        domain = jnp.zeros((), jnp.int32)
    p0_e = params.preference_de[domain]  # [E]
    if config.drift_period:
        angle = 2 * jnp.pi * step_f / config.drift_period
        skew_e = jnp.cos(angle) * p0_e + jnp.sin(angle) * params.preference2_de[domain]
    else:
        skew_e = p0_e
    logits_te = jnp.broadcast_to(skew_e, (t, e))
    if config.rank and config.rank_std:
        x_tr = jax.random.normal(k_x, (t, config.rank), jnp.float32)
        logits_te = logits_te + x_tr @ params.w_re
    if config.seq_std:
        seq_se = config.seq_std * jax.random.normal(k_seq, (t // config.seq_len, e), jnp.float32)
        logits_te = logits_te + jnp.repeat(seq_se, config.seq_len, axis=0)
    if config.noise_std:
        logits_te = logits_te + config.noise_std * jax.random.normal(k_noise, (t, e), jnp.float32)
    return logits_te
