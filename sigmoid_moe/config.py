"""Router configuration: one frozen, validated dataclass.

Field names follow the routing vocabulary used by DeepSeek-V3 and its descendants;
:meth:`RouterConfig.from_hf` maps a Hugging Face config onto them 1:1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal, get_args

from sigmoid_moe._checks import require_choice, require_int

# Each option is declared once, as a Literal; its tuple of choices is derived from it.
ScoreFn = Literal["sigmoid", "softmax"]
BiasMode = Literal["selection", "logit"]
GroupScore = Literal["top2_sum", "max", "topk_sum"]

SCORE_FNS: tuple[str, ...] = get_args(ScoreFn)
BIAS_MODES: tuple[str, ...] = get_args(BiasMode)
GROUP_SCORES: tuple[str, ...] = get_args(GroupScore)


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
        ValueError, each naming the HF key; absent keys take the defaults documented in
        :func:`sigmoid_moe._hf_config.router_fields`; a variant the family's reference
        code does not run is refused. The bias is selection-only (``bias_mode=
        "selection"``). Keyword ``overrides`` replace any field (and settle the two
        cases where DeepSeek's code and transformers disagree).
        """
        from sigmoid_moe._hf_config import as_mapping, router_fields

        fields = router_fields(as_mapping(mapping, "mapping"), overrides)
        fields.update(overrides)
        return cls(**fields)
