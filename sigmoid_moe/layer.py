"""The MoE layer: a Flax NNX module that wraps routing, dispatch and the expert math.

Per token ``x`` (DeepSeekMoE, arXiv 2401.06066; DeepSeek-V3, arXiv 2412.19437 eq. 12)::

    logits = x @ W_router                     # float32
    ids, w = route(logits, bias, router)      # sigmoid gate, bias for selection only
    y = sum_j w_j * FFN_{ids_j}(x) + FFN_shared(x)

Everything but the parameters and the dispatch choice lives in pure functions
(:mod:`sigmoid_moe.routing`, :mod:`sigmoid_moe.dispatch`, :mod:`sigmoid_moe.experts`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType

from sigmoid_moe._checks import check_token_mask
from sigmoid_moe.balancing import expert_load

# MoEConfig lives in sigmoid_moe.config; it stays importable from here.
from sigmoid_moe.config import LOAD_GROUPS, MoEConfig
from sigmoid_moe.dispatch import capacity_moe, dropless_moe
from sigmoid_moe.expert_parallel import expert_parallel_moe
from sigmoid_moe.experts import swiglu_ffn
from sigmoid_moe.losses import (
    load_balancing_loss,
    router_probs,
    router_z_loss,
    sequence_balance_loss,
)
from sigmoid_moe.routing import route
from sigmoid_moe.routing_bias import RoutingBias, record_load

__all__ = ["LOAD_GROUPS", "PARAM_AXES", "MoEAux", "MoEConfig", "MoELayer"]

# Logical axis names per parameter, attached as flax ``out_sharding=`` metadata and mapped
# onto mesh axes by sigmoid_moe.sharding.DEFAULT_RULES. The router's expert axis has its own
# name ("router_exp", replicated by default): top-k needs all E scores of a token on one
# device and every replica must hold the same bias, while "exp" (stacked expert weights)
# is split over the expert mesh axis.
PARAM_AXES = {
    "router_w_de": ("embed", "router_exp"),
    "w_in_edf": ("exp", "embed", "mlp"),
    "w_out_efd": ("exp", "mlp", "embed"),
    "shared_w_in_df": ("embed", "mlp"),
    "shared_w_out_fd": ("mlp", "embed"),
    "bias_e": ("router_exp",),
}


class MoEAux(NamedTuple):
    """What the layer reports besides its output (``...``: the token shape of ``x``).

    Callers use these values; they never route again to get them. The same load reaches
    the bias update through ``nnx.capture(model, ExpertLoad)`` (see
    :mod:`sigmoid_moe.routing_bias`), which carries each layer's place in the model.
    """

    expert_load: jax.Array  # [E] int32 assignments per expert, padding not counted
    expert_ids: jax.Array  # [..., k] int32 the experts each token was routed to
    router_prob: jax.Array  # [E] float32 mean router probability over real tokens (P_i)
    dropped: jax.Array  # [] int32 assignments dropped by capacity (0 when dropless)
    nonfinite_tokens: jax.Array  # [] int32 real tokens not routed: a NaN/inf logit or bias
    balance_loss: jax.Array  # [] float32 Switch loss, unscaled (0 when its coef is 0)
    seq_balance_loss: jax.Array  # [] float32 DeepSeek-V3 sequence loss, unscaled
    z_loss: jax.Array  # [] float32 router z-loss, unscaled
    aux_loss: jax.Array  # [] float32 sum of coef * loss: add this to the training loss


def _dispatch(config: MoEConfig, *args) -> tuple[jax.Array, jax.Array]:
    """``(y_td, dropped)`` from ``(x_td, ids_tk, weights_tk, w_in, w_out, mask_t)`` by the
    dispatch ``config`` chooses (a function of the config, so no callable is stored on the
    layer and identically configured layers have equal graphdefs)."""
    if config.expert_axis is not None:
        # Its psum-ed load equals expert_load of the (global-view) routing, counted in _aux.
        out = expert_parallel_moe(
            *args,
            expert_axis=config.expert_axis,
            capacity_factor=config.capacity_factor if config.dispatch == "capacity" else None,
            kernel=config.kernel,
            block_size=config.block_size,
        )
        return out.y_td, out.dropped
    mesh = jax.sharding.get_abstract_mesh()
    types = set(mesh.axis_types)
    num_tokens = args[0].shape[0]
    # Every device holds every expert: each computes its own tokens (equal to the global
    # dispatch), instead of GSPMD all-gathering the tokens into the expert kernels. Not
    # inside the caller's own shard_map (Manual axes: the tokens are already local), nor on
    # a mesh mixing Auto and Explicit axes.
    if (
        config.dispatch == "dropless"
        and mesh.size > 1
        and num_tokens % mesh.size == 0
        and types in ({AxisType.Auto}, {AxisType.Explicit})
    ):
        out = expert_parallel_moe(
            *args,
            expert_axis=None,
            capacity_factor=None,
            kernel=config.kernel,
            block_size=config.block_size,
        )
        return out.y_td, out.dropped
    if config.dispatch == "capacity":
        return capacity_moe(
            *args,
            capacity_factor=config.capacity_factor,
            kernel=config.kernel,
            block_size=config.block_size,
        )
    return dropless_moe(*args, kernel=config.kernel, block_size=config.block_size)


class MoELayer(nnx.Module):
    """Routed SwiGLU experts plus optional shared experts.

    ``y, aux = layer(x, token_mask=None)`` for ``x [..., d_model]``; ``token_mask [...]``
    marks real tokens (False: padding, excluded from loads, losses and expert slots,
    and given zero routed output).

    Parameters (``nnx.Param``, ``param_dtype``): ``router_w_de [d, E]``, ``w_in_edf
    [E, d, 2 d_ff]`` (gate then up), ``w_out_efd [E, d_ff, d]``, and with shared experts
    ``shared_w_in_df``, ``shared_w_out_fd``. State: ``bias_e`` (:class:`RoutingBias`,
    float32 ``[E]``, zeros), never touched by the optimizer.
    """

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}.")
        self.config = config
        d, f, e = config.d_model, config.d_ff, config.num_experts
        init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        dense_init = nnx.initializers.lecun_normal()

        # The logical axes always travel as metadata; values are placed (eager sharding)
        # only under a mesh, so the single-device path is untouched.
        placed = not jax.sharding.get_abstract_mesh().empty

        def param(name, initializer, shape):
            value = initializer(rngs.params(), shape, config.param_dtype)
            return nnx.Param(value, out_sharding=PARAM_AXES[name], eager_sharding=placed)

        self.router_w_de = param("router_w_de", dense_init, (d, e))
        self.w_in_edf = param("w_in_edf", init, (e, d, 2 * f))
        self.w_out_efd = param("w_out_efd", init, (e, f, d))
        if config.shared_width:
            self.shared_w_in_df = param("shared_w_in_df", dense_init, (d, 2 * config.shared_width))
            self.shared_w_out_fd = param("shared_w_out_fd", dense_init, (config.shared_width, d))
        else:
            self.shared_w_in_df = None
            self.shared_w_out_fd = None
        # float32 whatever param_dtype is: a 1e-3 step near 0.5 rounds away in bf16.
        self.bias_e = RoutingBias(
            jnp.zeros((e,), jnp.float32), out_sharding=PARAM_AXES["bias_e"], eager_sharding=placed
        )

    def _check(self, x: jax.Array, token_mask: jax.Array | None) -> None:
        dtype = jnp.result_type(x)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"x must be a floating array, got dtype {dtype}; embed token ids first or cast, "
                "e.g. x.astype(jnp.float32)."
            )
        if jnp.ndim(x) < 1 or jnp.shape(x)[-1] != self.config.d_model:
            raise ValueError(
                f"x must have shape [..., d_model={self.config.d_model}], got {jnp.shape(x)}."
            )
        if token_mask is not None:
            check_token_mask(token_mask, jnp.shape(x)[:-1], "token_mask")
        if self.config.load_groups == "sequence" and jnp.ndim(x) != 3:
            raise ValueError(
                f"load_groups='sequence' needs x as [batch, seq, d_model], got {jnp.shape(x)}."
            )
        if self.config.seq_balance_loss_coef > 0 and jnp.ndim(x) != 3:
            raise ValueError(
                f"seq_balance_loss_coef > 0 needs x as [batch, seq, d_model], got {jnp.shape(x)}; "
                "reshape x or set seq_balance_loss_coef=0."
            )

    def __call__(
        self, x: jax.Array, token_mask: jax.Array | None = None
    ) -> tuple[jax.Array, MoEAux]:
        self._check(x, token_mask)
        cfg = self.config
        lead = jnp.shape(x)[:-1]
        x_td = jnp.reshape(x, (-1, cfg.d_model)).astype(cfg.dtype)
        mask_t = None if token_mask is None else jnp.reshape(token_mask, (-1,))
        # A token whose input holds a NaN or an infinity gets a zero input row before every
        # matmul that sees it (router, experts, shared experts), and NaN logits for route(),
        # which routes it nowhere: so it cannot reach another token's output or any
        # gradient (in a backward pass NaN * 0 is NaN, so masking only outputs would not do).
        finite_t = jnp.all(jnp.isfinite(x_td), axis=-1)
        x_td = jnp.where(finite_t[:, None], x_td, jnp.zeros((), x_td.dtype))

        logits_te = jnp.dot(x_td.astype(jnp.float32), self.router_w_de[...].astype(jnp.float32))
        routing = route(
            jnp.where(finite_t[:, None], logits_te, jnp.nan), self.bias_e[...], cfg.router
        )
        # Tokens route() could not route (non-finite logits) are masked from here on: no
        # expert, no load, no loss; MoEAux.nonfinite_tokens counts the real ones.
        real_t = jnp.ones(x_td.shape[:1], bool) if mask_t is None else mask_t
        nonfinite = jnp.sum(real_t & ~routing.routed, dtype=jnp.int32)
        mask_t = real_t & routing.routed
        y_td, dropped = _dispatch(
            cfg,
            x_td,
            routing.expert_ids,
            routing.weights,
            self.w_in_edf[...].astype(cfg.dtype),
            self.w_out_efd[...].astype(cfg.dtype),
            mask_t,
        )
        if self.shared_w_in_df is not None:
            shared_td = swiglu_ffn(
                x_td,
                self.shared_w_in_df[...].astype(cfg.dtype),
                self.shared_w_out_fd[...].astype(cfg.dtype),
            )
            y_td = y_td + shared_td
        aux = self._aux(logits_te, routing, mask_t, lead, dropped, nonfinite)
        recorded = aux.expert_load
        if cfg.load_groups == "sequence":  # [B, E]: one load per sequence
            mask_bs = mask_t.reshape(lead)
            count = lambda i, m: expert_load(i, cfg.num_experts, m)  # noqa: E731
            recorded = jax.vmap(count)(aux.expert_ids, mask_bs)
        record_load(self, recorded)  # only inside nnx.capture(..., ExpertLoad)
        return y_td.reshape(*lead, cfg.d_model), aux

    def _aux(self, logits_te, routing, mask_t, lead, dropped, nonfinite) -> MoEAux:
        cfg = self.config
        zero = jnp.zeros((), jnp.float32)
        load = expert_load(routing.expert_ids, cfg.num_experts, token_mask=mask_t)
        real = mask_t.astype(jnp.float32)
        probs = jnp.where(mask_t[:, None], router_probs(routing.scores), 0.0)
        mean_prob = jnp.sum(probs, axis=0) / jnp.maximum(jnp.sum(real), 1.0)
        balance = seq_balance = z = zero
        if cfg.balance_loss_coef > 0:
            balance = load_balancing_loss(router_probs(routing.scores), routing.expert_ids, mask_t)
        if cfg.seq_balance_loss_coef > 0:
            shape = lambda a: a.reshape(*lead, a.shape[-1])  # noqa: E731
            seq_mask = mask_t.reshape(lead)
            seq_balance = sequence_balance_loss(
                shape(router_probs(routing.scores)), shape(routing.expert_ids), seq_mask
            )
        if cfg.z_loss_coef > 0:
            z = router_z_loss(logits_te, mask_t)
        total = (
            cfg.balance_loss_coef * balance
            + cfg.seq_balance_loss_coef * seq_balance
            + cfg.z_loss_coef * z
        )
        return MoEAux(
            expert_load=load,
            expert_ids=routing.expert_ids.reshape(*lead, cfg.router.top_k),
            router_prob=mean_prob,
            dropped=dropped,
            nonfinite_tokens=nonfinite,
            balance_loss=balance,
            seq_balance_loss=seq_balance,
            z_loss=z,
            aux_loss=jnp.asarray(total, jnp.float32),
        )
