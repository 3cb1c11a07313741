"""Hugging Face ``config.json`` fields of the DeepSeek family, read strictly.

One place reads the HF vocabulary, for :meth:`RouterConfig.from_hf` and for
:mod:`sigmoid_moe.interop`. Every value is type-checked as JSON gives it (an int is an
``int``, never a ``bool`` or ``8.7``; a bool is ``True``/``False``, never ``"false"``), and
every error names the Hugging Face key. A key that is absent, or ``null`` (HF writes
``None`` for unset optional fields), takes the default documented in
:data:`FAMILIES` / :func:`router_fields`; a present value is never replaced.

Routing variants, by ``model_type`` (the reference code each was checked against):

======================================  ==========================================
``deepseek_v3`` (V3, R1, Moonlight),    ``topk_method="noaux_tc"``: sigmoid scores,
``kimi_k2``, ``glm4_moe`` (GLM-4.5);    ``e_score_correction_bias`` for selection,
no ``model_type``: read as V3           group score = sum of a group's 2 best,
                                        weights normalised (``norm_topk_prob``), then
                                        always times ``routed_scaling_factor``.
``deepseek_v2`` (V2, V2-Lite, V2.5)     softmax scores, no bias (none by design);
                                        ``"greedy"``: plain top-k (``n_group`` unused);
                                        ``"group_limited_greedy"``: group score = the
                                        group's max. DeepSeek's code scales only
                                        *unnormalised* weights.
======================================  ==========================================

Anything else (another ``scoring_func`` / ``topk_method`` for a family, an unknown
``model_type``) is refused with the key and value; it is never treated as a neighbour.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection, Mapping
from typing import Any

_UNSET = object()


def as_mapping(config: Any, name: str = "config") -> Mapping[str, Any]:
    """A ``config.json`` dict, or a transformers ``PretrainedConfig`` (via ``to_dict``)."""
    if isinstance(config, Mapping):
        return config
    to_dict = getattr(config, "to_dict", None)
    if to_dict is None:
        raise TypeError(
            f"{name} must be a Hugging Face config (a config.json dict or a PretrainedConfig), "
            f"got {type(config).__name__}."
        )
    return to_dict()


def _lookup(cfg: Mapping[str, Any], key: str, default: Any) -> tuple[Any, bool]:
    """``(value, given)``; a missing required key is a ValueError naming it."""
    value = cfg.get(key)
    if value is not None:
        return value, True
    if default is _UNSET:
        raise ValueError(f"Hugging Face config has no {key!r}; it is required here.")
    return default, False


def hf_int(cfg: Mapping[str, Any], key: str, *, minimum: int, default: Any = _UNSET) -> Any:
    """``cfg[key]`` as an ``int >= minimum`` (``default`` when absent or null)."""
    value, given = _lookup(cfg, key, default)
    if not given:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"Hugging Face config {key!r} must be an integer, got {value!r} "
            f"({type(value).__name__})."
        )
    if value < minimum:
        raise ValueError(f"Hugging Face config {key!r} must be >= {minimum}, got {value}.")
    return value


def hf_float(cfg: Mapping[str, Any], key: str, *, default: Any = _UNSET) -> Any:
    """``cfg[key]`` as a finite float ``> 0`` (an int is accepted: JSON writes ``1`` for 1.0)."""
    value, given = _lookup(cfg, key, default)
    if not given:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"Hugging Face config {key!r} must be a number, got {value!r} ({type(value).__name__})."
        )
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"Hugging Face config {key!r} must be a finite number > 0, got {value}.")
    return float(value)


def hf_bool(cfg: Mapping[str, Any], key: str, *, default: Any = _UNSET) -> Any:
    """``cfg[key]`` as a JSON boolean."""
    value, given = _lookup(cfg, key, default)
    if given and not isinstance(value, bool):
        raise TypeError(
            f"Hugging Face config {key!r} must be true or false, got {value!r} "
            f"({type(value).__name__})."
        )
    return value


def hf_str(cfg: Mapping[str, Any], key: str, *, default: Any = _UNSET) -> Any:
    """``cfg[key]`` as a string."""
    value, given = _lookup(cfg, key, default)
    if given and not isinstance(value, str):
        raise TypeError(
            f"Hugging Face config {key!r} must be a string, got {value!r} ({type(value).__name__})."
        )
    return value


@dataclasses.dataclass(frozen=True)
class Family:
    """How one DeepSeek-family ``model_type`` routes.

    Attributes:
      name: for messages.
      scoring_func: the one ``scoring_func`` its reference code runs (also the default).
      topk_methods: ``topk_method`` -> group score (``None``: no group limiting).
      default_topk_method: when ``topk_method`` is absent.
      default_norm_topk_prob: transformers' config default for ``norm_topk_prob``.
      has_bias: the gate holds ``e_score_correction_bias`` (V2's has none by design).
      norm_replaces_scale: DeepSeek-V2's reference code multiplies by
        ``routed_scaling_factor`` only when it does not renormalise.
    """

    name: str
    scoring_func: str
    topk_methods: Mapping[str, str | None]
    default_topk_method: str
    default_norm_topk_prob: bool
    has_bias: bool
    norm_replaces_scale: bool


_V3 = Family(
    name="DeepSeek-V3 routing (noaux_tc)",
    scoring_func="sigmoid",
    topk_methods={"noaux_tc": "top2_sum"},
    default_topk_method="noaux_tc",
    default_norm_topk_prob=True,
    has_bias=True,
    norm_replaces_scale=False,
)
_V2 = Family(
    name="DeepSeek-V2 routing",
    scoring_func="softmax",
    topk_methods={"greedy": None, "group_limited_greedy": "max"},
    default_topk_method="greedy",
    default_norm_topk_prob=False,
    has_bias=False,
    norm_replaces_scale=True,
)

#: ``model_type`` -> its routing. A config without ``model_type`` is read as ``deepseek_v3``.
FAMILIES: Mapping[str, Family] = {
    "deepseek_v3": _V3,  # DeepSeek-V3 / R1 / V3.1, Moonlight
    "kimi_k2": _V3,  # Kimi K2 (DeepseekV3ForCausalLM, n_group 1, 384 experts)
    "glm4_moe": _V3,  # GLM-4.5 / 4.5-Air (transformers' Glm4MoeMoE routes as V3)
    "deepseek_v2": _V2,  # DeepSeek-V2 / V2-Lite / V2.5 / Coder-V2
}


def family(cfg: Mapping[str, Any]) -> Family:
    """The routing family of ``cfg`` from its ``model_type`` (absent: ``deepseek_v3``)."""
    model_type = hf_str(cfg, "model_type", default="deepseek_v3")
    if model_type not in FAMILIES:
        raise ValueError(
            f"Hugging Face config model_type={model_type!r} is not supported; choose one of "
            f"{tuple(FAMILIES)} (a model whose MoE block routes exactly like one of them can "
            "set that model_type in a copy of its config)."
        )
    return FAMILIES[model_type]


#: :class:`~sigmoid_moe.RouterConfig` field -> the Hugging Face key it is read from.
ROUTER_KEYS: Mapping[str, str] = {
    "num_experts": "n_routed_experts",
    "top_k": "num_experts_per_tok",
    "score_fn": "scoring_func",
    "normalize": "norm_topk_prob",
    "route_scale": "routed_scaling_factor",
    "num_groups": "n_group",
    "topk_groups": "topk_group",
}
_FIELD_WORD = re.compile(r"\b(" + "|".join(ROUTER_KEYS) + r")\b")


def in_hf_terms(message: str, keep: Collection[str] = ()) -> str:
    """``message`` (a :class:`~sigmoid_moe.RouterConfig` error) with every router field
    named by its Hugging Face key, except the fields in ``keep`` (the caller's overrides,
    which the user named in our terms): ``num_groups=3 does not divide num_experts=4``
    becomes ``Hugging Face config: n_group=3 does not divide n_routed_experts=4``."""
    text = _FIELD_WORD.sub(
        lambda m: m.group(1) if m.group(1) in keep else ROUTER_KEYS[m.group(1)], message
    )
    return f"Hugging Face config: {text}"


def router_fields(cfg: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`RouterConfig` fields from ``cfg`` (see the module docstring for the families).

    Required: ``n_routed_experts``, ``num_experts_per_tok``; ``topk_group`` when a
    group-limited method has ``n_group > 1``. Defaults when absent or null:
    ``scoring_func`` and ``topk_method`` the family's, ``norm_topk_prob`` transformers'
    family default (V3-style true, V2 false), ``routed_scaling_factor`` 1.0, ``n_group``
    and ``topk_group`` 1.

    Where DeepSeek's reference code and transformers disagree, the config is refused
    unless ``overrides`` settle it: ``norm_topk_prob`` with one expert per token (the
    reference code skips the renormalisation at ``top_k == 1``) needs ``normalize``;
    DeepSeek-V2 with ``norm_topk_prob`` (the reference code then drops
    ``routed_scaling_factor``, transformers ignores ``norm_topk_prob``) needs
    ``normalize`` and ``route_scale``.
    """
    fam = family(cfg)
    model_type = cfg.get("model_type") or "deepseek_v3"
    for key in ("n_routed_experts", "num_experts_per_tok"):
        if cfg.get(key) is None:
            raise ValueError(f"Hugging Face config is missing {key!r}; is it an MoE config?")
    num_experts = hf_int(cfg, "n_routed_experts", minimum=1)
    top_k = hf_int(cfg, "num_experts_per_tok", minimum=1)

    scoring = hf_str(cfg, "scoring_func", default=fam.scoring_func)
    if scoring != fam.scoring_func:
        raise ValueError(
            f"Hugging Face scoring_func={scoring!r} is not supported for "
            f"model_type={model_type!r}: score_fn={scoring!r} is not what {fam.name} runs; "
            f"its reference code uses scoring_func={fam.scoring_func!r}."
        )
    method = hf_str(cfg, "topk_method", default=fam.default_topk_method)
    if method not in fam.topk_methods:
        raise ValueError(
            f"Hugging Face topk_method={method!r} is not supported for model_type="
            f"{model_type!r}; {fam.name} implements {tuple(fam.topk_methods)}."
        )
    group_score = fam.topk_methods[method]
    norm = hf_bool(cfg, "norm_topk_prob", default=fam.default_norm_topk_prob)
    scale = hf_float(cfg, "routed_scaling_factor", default=1.0)
    n_group = hf_int(cfg, "n_group", minimum=1, default=1)
    topk_group = hf_int(cfg, "topk_group", minimum=1, default=None)

    if group_score is None:  # V2 "greedy": a plain top-k, the reference never reads n_group
        num_groups, topk_groups, group_score = 1, 1, "top2_sum"
    else:
        if n_group > 1 and topk_group is None:
            raise ValueError(
                f"Hugging Face config has n_group={n_group} but no 'topk_group' (groups kept "
                "per token); set it."
            )
        num_groups, topk_groups = n_group, topk_group or 1
        if topk_groups > num_groups:
            raise ValueError(
                f"Hugging Face topk_group={topk_groups} exceeds n_group={num_groups}; "
                "a token cannot keep more groups than there are."
            )

    if norm and top_k == 1 and "normalize" not in overrides:
        raise ValueError(
            "Hugging Face norm_topk_prob=true with num_experts_per_tok=1 is ambiguous: "
            "DeepSeek's reference code skips the renormalisation at top_k == 1, transformers "
            "renormalises to 1.0; pass normalize=False (reference) or normalize=True."
        )
    normalize = norm and top_k > 1
    if fam.norm_replaces_scale and normalize and not {"normalize", "route_scale"} <= set(overrides):
        raise ValueError(
            f"Hugging Face norm_topk_prob=true with model_type={model_type!r} is ambiguous: "
            "DeepSeek-V2's reference code renormalises and then ignores routed_scaling_factor, "
            "transformers never renormalises; pass normalize=True, route_scale=1.0 "
            f"(reference) or normalize=False, route_scale={scale} (transformers)."
        )
    return dict(
        num_experts=num_experts,
        top_k=top_k,
        score_fn=scoring,
        bias_mode="selection",
        normalize=normalize,
        route_scale=scale,
        num_groups=num_groups,
        topk_groups=topk_groups,
        group_score=group_score,
    )


def moe_layer_indices(cfg: Mapping[str, Any], *, include_mtp: bool = False) -> tuple[int, ...]:
    """Indices of the MoE decoder layers: DeepSeek's rule, also vLLM's and GLM's.

    Layer ``i`` is MoE when ``n_routed_experts`` is set, ``i >= first_k_dense_replace``
    (default 0) and ``i % moe_layer_freq == 0`` (default 1), for ``i`` in
    ``range(num_hidden_layers)``. With ``include_mtp`` the ``num_nextn_predict_layers``
    multi-token-prediction layers stored after them (DeepSeek-V3, GLM-4.5) count too.
    """
    num_layers = hf_int(cfg, "num_hidden_layers", minimum=1)
    first_dense = hf_int(cfg, "first_k_dense_replace", minimum=0, default=0)
    freq = hf_int(cfg, "moe_layer_freq", minimum=1, default=1)
    if include_mtp:
        num_layers += hf_int(cfg, "num_nextn_predict_layers", minimum=0, default=0)
    if cfg.get("n_routed_experts") is None:
        return ()
    return tuple(i for i in range(num_layers) if i >= first_dense and i % freq == 0)


def moe_widths(cfg: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(hidden_size, moe_intermediate_size, n_shared_experts)`` of an MoE block.

    ``n_shared_experts`` absent or null means none (as in DeepSeek's code); the experts
    must be SwiGLU (``hidden_act`` ``"silu"``, the default).
    """
    act = hf_str(cfg, "hidden_act", default="silu")
    if act not in ("silu", "swish"):
        raise ValueError(
            f"Hugging Face hidden_act={act!r}: only SwiGLU (silu) experts are supported."
        )
    return (
        hf_int(cfg, "hidden_size", minimum=1),
        hf_int(cfg, "moe_intermediate_size", minimum=1),
        hf_int(cfg, "n_shared_experts", minimum=0, default=0),
    )


def fp8_block_size(cfg: Mapping[str, Any]) -> tuple[int, int] | None:
    """The ``weight_block_size`` of a block-wise FP8 ``quantization_config``, or ``None``.

    Only DeepSeek's scheme is known: ``quant_method "fp8"``, ``fmt "e4m3"`` (the
    default), ``weight_block_size [rows, cols]``. Any other quantisation is refused.
    """
    quant = cfg.get("quantization_config")
    if quant is None:
        return None
    if not isinstance(quant, Mapping):
        raise TypeError(
            f"Hugging Face config 'quantization_config' must be a mapping, got {quant!r}."
        )
    method = hf_str(quant, "quant_method", default=None)
    if method != "fp8":
        raise ValueError(
            f"Hugging Face quantization_config quant_method={method!r} is not supported; only "
            "DeepSeek's block-wise 'fp8' (e4m3 with weight_block_size) is. Dequantise first."
        )
    fmt = hf_str(quant, "fmt", default="e4m3")
    if fmt != "e4m3":
        raise ValueError(
            f"Hugging Face quantization_config fmt={fmt!r} is not supported; only 'e4m3'."
        )
    block = quant.get("weight_block_size")
    if (
        not isinstance(block, (list, tuple))
        or len(block) != 2
        or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in block)
    ):
        raise ValueError(
            "Hugging Face quantization_config 'weight_block_size' must be two positive "
            f"integers such as [128, 128], got {block!r}."
        )
    return int(block[0]), int(block[1])
