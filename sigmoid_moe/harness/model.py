"""A small decoder-only byte-level transformer whose FFNs are :class:`MoELayer` s.

Pre-norm blocks (RMSNorm, causal multi-head attention with learned absolute positions,
RMSNorm, MoE FFN), as in DeepSeek-V3 (arXiv 2412.19437) minus MLA and multi-token
prediction, and sized so that a few hundred steps run on two CPU cores. The routing
bias of every layer is a :class:`~sigmoid_moe.routing_bias.RoutingBias` variable, so
``nnx.split(model, nnx.Param, RoutingBias)`` separates it from the weights.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from flax import nnx

from sigmoid_moe._checks import require_choice, require_float, require_int
from sigmoid_moe.config import RouterConfig, ScoreFn
from sigmoid_moe.dispatch import Kernel
from sigmoid_moe.layer import MoEAux, MoEConfig, MoELayer

__all__ = ["ModelConfig", "ModelOutput", "TransformerLM"]

VOCAB_SIZE = 256  # bytes

BalanceScope = Literal["global", "micro", "sequence"]
BALANCE_SCOPES: tuple[str, ...] = get_args(BalanceScope)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the language model.

    Attributes:
      num_layers: transformer blocks, each with one MoE FFN.
      d_model: residual width.
      num_heads: attention heads (must divide ``d_model``).
      seq_len: context length in bytes.
      num_experts, top_k: routed experts per layer and experts per token.
      d_ff: hidden width of one routed expert.
      num_shared_experts: always-active experts (DeepSeekMoE); 0 for none.
      score_fn: ``"sigmoid"`` (DeepSeek-V3) or ``"softmax"`` gate.
      balance_loss_coef: auxiliary balance loss coefficient per layer (0: off), a
        Switch-form loss over the ``balance_scope``.
      balance_scope: the tokens the balance statistics are taken over, for the loss-free
        bias and for the auxiliary loss alike ("Demons in the Detail", arXiv 2501.11873;
        DeepSeek-V3 section 4.5.3): ``"global"``, the whole optimizer step (all
        micro-batches: the loads summed before the sign, the loss's ``f_i`` from the
        summed counts, i.e. the global-batch balance loss); ``"micro"``, each micro-batch
        (its own sign, the steps averaged; the usual per-micro-batch Switch loss);
        ``"sequence"``, each sequence (per-sequence signs averaged; DeepSeek-V3's
        sequence-wise loss).
      router_init_scale: multiplies the router weights at init. Values > 1 make the
        initial routing more confident and so more skewed (used by tests).
      kernel: expert kernel of the MoE layer (see MoEConfig.kernel).
      expert_axis: the mesh axis the experts are split over (expert parallelism,
        ``MoEConfig.expert_axis``); set by the trainer from ``TrainConfig.mesh``.
    """

    num_layers: int = 2
    d_model: int = 64
    num_heads: int = 4
    seq_len: int = 64
    num_experts: int = 8
    top_k: int = 2
    d_ff: int = 64
    num_shared_experts: int = 0
    score_fn: ScoreFn = "sigmoid"
    balance_loss_coef: float = 0.0
    balance_scope: BalanceScope = "global"
    router_init_scale: float = 1.0
    kernel: Kernel = "auto"
    expert_axis: str | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "d_model", "num_heads", "seq_len", "num_experts", "top_k"):
            require_int(name, getattr(self, name))
        require_int("d_ff", self.d_ff)
        if self.d_model % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide d_model={self.d_model}; "
                "choose e.g. num_heads=4 with d_model=64."
            )
        require_float("balance_loss_coef", self.balance_loss_coef)
        require_choice("balance_scope", self.balance_scope, BALANCE_SCOPES)
        require_float("router_init_scale", self.router_init_scale)
        self.moe_config()  # validates top_k, score_fn, num_shared_experts, kernel

    def router_config(self) -> RouterConfig:
        return RouterConfig(self.num_experts, self.top_k, score_fn=self.score_fn)

    def moe_config(self) -> MoEConfig:
        """The layer of every block. Per-call statistics live in the layer: the micro-batch
        Switch loss, the sequence-wise loss and per-sequence loads. The global scope's loss
        needs the counts of all micro-batches, so the train step adds it
        (:func:`sigmoid_moe.losses.balance_loss` on ``MoEAux.router_prob``)."""
        coef = float(self.balance_loss_coef)
        return MoEConfig(
            d_model=self.d_model,
            d_ff=self.d_ff,
            router=self.router_config(),
            num_shared_experts=self.num_shared_experts,
            balance_loss_coef=coef if self.balance_scope == "micro" else 0.0,
            seq_balance_loss_coef=coef if self.balance_scope == "sequence" else 0.0,
            load_groups="sequence" if self.balance_scope == "sequence" else "call",
            kernel=self.kernel,
            expert_axis=self.expert_axis,
        )


class ModelOutput(NamedTuple):
    """What the model returns: its logits and its layers' :class:`MoEAux`, stacked."""

    logits: jax.Array  # [B, S, 256] float32 next-byte logits
    aux: MoEAux  # leading layer axis: expert_load [L, E], expert_ids [L, B, S, k], losses [L]


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale`` over the last axis (float32 statistics)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * rms * self.scale[...]).astype(x.dtype)


class CausalSelfAttention(nnx.Module):
    """Multi-head causal attention, ``x [B, S, d] -> [B, S, d]``."""

    def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.num_heads = num_heads
        self.qkv_d3d = nnx.Param(init(rngs.params(), (d_model, 3 * d_model), jnp.float32))
        self.out_dd = nnx.Param(init(rngs.params(), (d_model, d_model), jnp.float32))

    def __call__(self, x_bsd: jax.Array) -> jax.Array:
        b, s, d = x_bsd.shape
        h = self.num_heads
        qkv = (x_bsd @ self.qkv_d3d[...]).reshape(b, s, 3, h, d // h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, S, H, Dh]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // h).astype(x_bsd.dtype)
        causal = jnp.tril(jnp.ones((s, s), bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        attn = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, s, d)
        return out @ self.out_dd[...]


class Block(nnx.Module):
    """``x + attn(norm(x))``, then ``x + moe(norm(x))``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.d_model)
        self.attn = CausalSelfAttention(config.d_model, config.num_heads, rngs=rngs)
        self.ffn_norm = RMSNorm(config.d_model)
        self.moe = MoELayer(config.moe_config(), rngs=rngs)
        if config.router_init_scale != 1.0:
            self.moe.router_w_de[...] = self.moe.router_w_de[...] * config.router_init_scale

    def __call__(self, x_bsd: jax.Array, token_mask_bs: jax.Array | None):
        x_bsd = x_bsd + self.attn(self.attn_norm(x_bsd))
        y_bsd, aux = self.moe(self.ffn_norm(x_bsd), token_mask_bs)
        return x_bsd + y_bsd, aux


class TransformerLM(nnx.Module):
    """Byte-level decoder-only LM: ``model(tokens [B, S] int32) -> ModelOutput``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}.")
        # Only what the forward reads is kept (it is part of the graphdef): models that
        # differ in a training-side number (the global-scope aux coefficient, which the
        # train step applies) have equal graphdefs and share their compiled programs.
        self.seq_len = config.seq_len
        d = config.d_model
        self.embed_vd = nnx.Param(jax.random.normal(rngs.params(), (VOCAB_SIZE, d)) * 0.02)
        self.pos_sd = nnx.Param(jax.random.normal(rngs.params(), (config.seq_len, d)) * 0.02)
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(d)
        init = nnx.initializers.lecun_normal()
        self.unembed_dv = nnx.Param(init(rngs.params(), (d, VOCAB_SIZE), jnp.float32))

    def __call__(self, tokens_bs: jax.Array, token_mask_bs: jax.Array | None = None) -> ModelOutput:
        """``tokens_bs [B, S]`` int32; ``token_mask_bs [B, S]`` bool marks real tokens
        (False: padding, which the MoE layers do not count or route)."""
        s = tokens_bs.shape[-1]
        if s > self.seq_len:
            raise ValueError(f"tokens have length {s} > seq_len={self.seq_len}.")
        x = self.embed_vd[...][tokens_bs] + self.pos_sd[...][:s]
        auxes = []
        for block in self.blocks:
            x, aux = block(x, token_mask_bs)
            auxes.append(aux)
        logits = self.final_norm(x) @ self.unembed_dv[...]
        return ModelOutput(logits, jax.tree.map(lambda *a: jnp.stack(a), *auxes))
