"""The layer's configuration: frozen, validated dataclasses.

:class:`RouterConfig` (how tokens pick experts) and :class:`MoEConfig` (one MoE FFN layer,
holding a router). Field names follow the vocabulary of DeepSeek-V3 and its descendants;
:meth:`RouterConfig.from_hf` maps a Hugging Face config onto them 1:1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal, get_args

import jax.numpy as jnp

from sigmoid_moe._checks import require_choice, require_float, require_int
from sigmoid_moe.dispatch import (
    DISPATCH_KINDS,
    CapacityKernel,
    DispatchKind,
    DroplessKernel,
    Kernel,
)

__all__ = ["BIAS_MODES", "GROUP_SCORES", "LOAD_GROUPS", "SCORE_FNS", "MoEConfig", "RouterConfig"]

# Each option is declared once, as a Literal; its tuple of choices is derived from it.
ScoreFn = Literal["sigmoid", "softmax"]
BiasMode = Literal["selection", "logit"]
GroupScore = Literal["top2_sum", "max", "topk_sum"]
LoadGroups = Literal["call", "sequence"]

SCORE_FNS: tuple[str, ...] = get_args(ScoreFn)
BIAS_MODES: tuple[str, ...] = get_args(BiasMode)
GROUP_SCORES: tuple[str, ...] = get_args(GroupScore)
LOAD_GROUPS: tuple[str, ...] = get_args(LoadGroups)


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """How tokens pick experts.

    Attributes:
      num_experts: E, routed experts (HF ``n_routed_experts``).
      top_k: k, experts per token (HF ``num_experts_per_tok``).
      score_fn: ``"sigmoid"`` scores each expert independently (DeepSeek-V3);
        ``"softmax"`` is the Switch/GShard/Mixtral baseline (HF ``scoring_func``).
      bias_mode: where the per-expert bias enters. ``"selection"`` (DeepSeek-V3): the
        bias is added to the scores for top-k selection only and the combine weights
        use the unbiased scores. ``"logit"``: the bias is added to the logits before the
        score function and the weights use those biased scores (the reference problem).
      normalize: renormalise the chosen weights to sum to 1 (HF ``norm_topk_prob``).
      route_scale: multiplies the (normalised) weights (HF ``routed_scaling_factor``).
      num_groups: expert groups for group-limited routing (HF ``n_group``).
      topk_groups: groups each token keeps (HF ``topk_group``).
      group_score: how a group is scored from its members' selection scores:
        ``"top2_sum"`` (DeepSeek-V3: sum of the two best; a one-expert group uses its
        single score), ``"max"`` (DeepSeek-V2) or ``"topk_sum"`` (Megatron: sum of the
        best ``top_k // topk_groups``).
    """

    num_experts: int
    top_k: int
    score_fn: ScoreFn = "sigmoid"
    bias_mode: BiasMode = "selection"
    normalize: bool = True
    route_scale: float = 1.0
    num_groups: int = 1
    topk_groups: int = 1
    group_score: GroupScore = "top2_sum"

    def __post_init__(self) -> None:
        require_int("num_experts", self.num_experts, 1)
        require_int("top_k", self.top_k, 1)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} exceeds num_experts={self.num_experts}; "
                "choose top_k <= num_experts."
            )
        require_choice("score_fn", self.score_fn, SCORE_FNS)
        require_choice("bias_mode", self.bias_mode, BIAS_MODES)
        require_choice("group_score", self.group_score, GROUP_SCORES)
        if not isinstance(self.normalize, bool):
            raise TypeError(f"normalize must be a bool, got {self.normalize!r}.")
        if isinstance(self.route_scale, bool) or not isinstance(self.route_scale, (int, float)):
            raise TypeError(f"route_scale must be a float, got {self.route_scale!r}.")
        if not (self.route_scale > 0 and self.route_scale < float("inf")):
            raise ValueError(f"route_scale must be a finite float > 0, got {self.route_scale}.")
        require_int("num_groups", self.num_groups, 1)
        require_int("topk_groups", self.topk_groups, 1)
        if self.num_experts % self.num_groups:
            raise ValueError(
                f"num_groups={self.num_groups} does not divide num_experts={self.num_experts}; "
                "choose a divisor of num_experts."
            )
        if self.topk_groups > self.num_groups:
            raise ValueError(
                f"topk_groups={self.topk_groups} exceeds num_groups={self.num_groups}; "
                "choose topk_groups <= num_groups."
            )
        if self.topk_groups * self.experts_per_group < self.top_k:
            raise ValueError(
                f"group limiting keeps topk_groups * experts_per_group = {self.topk_groups} * "
                f"{self.experts_per_group} = {self.topk_groups * self.experts_per_group} experts, "
                f"fewer than top_k={self.top_k}; raise topk_groups or lower top_k."
            )
        if self.group_score == "topk_sum" and self.num_groups > 1:
            if self.top_k % self.topk_groups:
                raise ValueError(
                    f"group_score='topk_sum' sums the best top_k // topk_groups scores per group "
                    f"and needs topk_groups={self.topk_groups} to divide top_k={self.top_k}."
                )

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.num_groups

    @property
    def group_limited(self) -> bool:
        """True when group limiting can exclude experts."""
        return self.num_groups > 1 and self.topk_groups < self.num_groups

    @property
    def experts_summed_per_group(self) -> int:
        """How many of a group's best scores make its group score."""
        if self.group_score == "max":
            return 1
        if self.group_score == "top2_sum":
            return min(2, self.experts_per_group)
        return min(self.top_k // self.topk_groups, self.experts_per_group)

    @classmethod
    def from_hf(cls, mapping: Mapping[str, Any], **overrides: Any) -> RouterConfig:
        """Builds a config from a Hugging Face DeepSeek-family ``config.json``.

        Families by ``model_type``: ``deepseek_v3`` (V3, R1, Moonlight; also a config
        without ``model_type``), ``kimi_k2``, ``glm4_moe`` (GLM-4.5) route as DeepSeek-V3
        (sigmoid, ``group_score="top2_sum"``); ``deepseek_v2`` (V2, V2-Lite) as V2
        (softmax, ``"greedy"`` or ``"group_limited_greedy"`` = ``group_score="max"``).
        Reads ``n_routed_experts``, ``num_experts_per_tok``, ``scoring_func``,
        ``topk_method``, ``n_group``, ``topk_group``, ``norm_topk_prob`` and
        ``routed_scaling_factor`` strictly: a wrong type is a TypeError and a bad value a
        ValueError, each naming the HF key (also when the values disagree with each other,
        e.g. ``n_group`` that does not divide ``n_routed_experts``); absent keys take the
        defaults documented in :func:`sigmoid_moe._hf_config.router_fields`; a variant the
        family's reference code does not run is refused. The bias is selection-only (``bias_mode=
        "selection"``). Keyword ``overrides`` replace any field (and settle the two
        cases where DeepSeek's code and transformers disagree).
        """
        from sigmoid_moe._hf_config import as_mapping, in_hf_terms, router_fields

        fields = router_fields(as_mapping(mapping, "mapping"), overrides)
        fields.update(overrides)
        try:
            return cls(**fields)
        except (TypeError, ValueError) as err:  # name the HF keys the values came from
            raise type(err)(in_hf_terms(str(err), keep=overrides)) from None


def _float_dtype(name: str, value: Any) -> None:
    try:
        floating = jnp.issubdtype(jnp.dtype(value), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise TypeError(f"{name} must be a floating dtype such as jnp.bfloat16, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """One MoE FFN layer.

    Attributes:
      d_model: model width (HF ``hidden_size``).
      d_ff: hidden width of one routed expert (HF ``moe_intermediate_size``).
      router: how tokens pick experts (:class:`RouterConfig`).
      num_shared_experts: always-active experts (HF ``n_shared_experts``); they run as
        one SwiGLU of width ``shared_d_ff``.
      shared_d_ff: that width; default ``num_shared_experts * d_ff`` (as HF does).
      dispatch: ``"dropless"`` (no token dropped) or ``"capacity"`` (GShard/Switch).
      capacity_factor: slots per expert ``= ceil(factor * T * k / E)`` (capacity only);
        at most ``num_experts`` (``num_experts / top_k`` already drops nothing).
      kernel: expert kernel (:mod:`sigmoid_moe.expert_kernels`). ``"auto"`` is chosen
        per platform when the program is lowered: on CPU ``"blocked"`` (the fused block
        kernel of :mod:`sigmoid_moe.blocked_ffn`, every dispatch mode); dropless on GPUs
        ``"triton"`` (Pallas tile kernels) and on TPU ``"megablox"``; capacity
        ``"batched"`` (the ``[E, C, d]`` slot buffer). ``"ragged_dot"`` is selectable.
      block_size: rows per block of the blocked kernel; ``None`` (default) lets the kernel
        choose from the rows per expert (:func:`sigmoid_moe.blocked_ffn.auto_block_size`).
      dtype: activation / expert-matmul dtype. Router math is always float32.
      param_dtype: storage dtype of the weights. The bias is always float32.
      balance_loss_coef: Switch load-balancing loss coefficient (1e-2 in Switch).
      seq_balance_loss_coef: DeepSeek-V3 sequence-wise loss (1e-4); needs ``x [B, S, d]``.
      z_loss_coef: ST-MoE router z-loss (1e-3).
      expert_axis: mesh axis for expert parallelism (:mod:`sigmoid_moe.expert_parallel`):
        ``None`` runs every expert on each device (single-device dispatch); a name such as
        ``"expert"`` splits the experts over that axis of the mesh set by ``jax.set_mesh``
        and moves tokens with all-to-alls. There ``"capacity"`` uses ``capacity_factor``
        slots per (sending device, expert), and ``"dropless"`` a ragged exchange that moves
        each token copy once (``jax.lax.ragged_all_to_all`` on GPU/TPU, an emulation on
        CPU; :mod:`sigmoid_moe.ragged_exchange`).
      load_groups: how the layer's :class:`~sigmoid_moe.routing_bias.ExpertLoad` is
        recorded. ``"call"``: one ``[E]`` load per call (summing calls gives the global
        balancing scope, stacking them the micro-batch scope). ``"sequence"``: one load per
        sequence, ``[B, E]`` for ``x [B, S, d]``, so the bias update averages the
        sequences' steps (the sequence scope; DeepSeek-V3 section 4.5.3 compares it).
    """

    d_model: int
    d_ff: int
    router: RouterConfig
    num_shared_experts: int = 0
    shared_d_ff: int | None = None
    dispatch: DispatchKind = "dropless"
    capacity_factor: float = 1.25
    kernel: Kernel = "auto"
    block_size: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    balance_loss_coef: float = 0.0
    seq_balance_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    expert_axis: str | None = None
    load_groups: LoadGroups = "call"

    def __post_init__(self) -> None:
        require_int("d_model", self.d_model)
        require_int("d_ff", self.d_ff)
        if not isinstance(self.router, RouterConfig):
            raise TypeError(
                f"router must be a RouterConfig, got {type(self.router).__name__}; "
                "e.g. RouterConfig(num_experts=64, top_k=6)."
            )
        require_int("num_shared_experts", self.num_shared_experts, 0)
        if self.shared_d_ff is not None:
            require_int("shared_d_ff", self.shared_d_ff)
            if self.num_shared_experts == 0:
                raise ValueError(
                    f"shared_d_ff={self.shared_d_ff} is set but num_shared_experts=0; "
                    "set num_shared_experts >= 1 or leave shared_d_ff=None."
                )
        require_choice("dispatch", self.dispatch, DISPATCH_KINDS)
        require_float(
            "capacity_factor",
            self.capacity_factor,
            positive=True,
            hint=" (1.25 is usual, num_experts / top_k drops nothing)",
        )
        if self.dispatch == "capacity" and self.capacity_factor > self.num_experts:
            # Past num_experts / top_k every token has a slot at every expert; a larger
            # factor only adds empty slots (and overflows the buffer's shape long before 1e30).
            raise ValueError(
                f"capacity_factor={self.capacity_factor} exceeds num_experts="
                f"{self.num_experts}; at num_experts / top_k = "
                f"{self.num_experts / self.router.top_k:g} capacity already drops nothing, so "
                f"choose a factor in (0, {self.num_experts / self.router.top_k:g}]."
            )
        # The kernels follow the dispatch kind, with or without expert parallelism.
        if self.dispatch == "capacity":
            kernels, where = get_args(CapacityKernel), "dispatch='capacity'"
        else:
            kernels, where = get_args(DroplessKernel), "dispatch='dropless'"
        if self.kernel not in kernels:
            raise ValueError(
                f"kernel={self.kernel!r} is not supported with {where}; choose one of {kernels}."
            )
        if self.block_size is not None:
            require_int("block_size", self.block_size)
        _float_dtype("dtype", self.dtype)
        _float_dtype("param_dtype", self.param_dtype)
        for name in ("balance_loss_coef", "seq_balance_loss_coef", "z_loss_coef"):
            require_float(name, getattr(self, name), hint=" (0 turns the loss off)")
        require_choice("load_groups", self.load_groups, LOAD_GROUPS)
        if self.expert_axis is not None and (
            not isinstance(self.expert_axis, str) or not self.expert_axis
        ):
            raise TypeError(
                f"expert_axis must be a mesh axis name (str) or None, got {self.expert_axis!r}."
            )

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def shared_width(self) -> int:
        """Hidden width of the shared SwiGLU (0 when there is none)."""
        if self.num_shared_experts == 0:
            return 0
        return (
            self.shared_d_ff
            if self.shared_d_ff is not None
            else self.num_shared_experts * self.d_ff
        )
