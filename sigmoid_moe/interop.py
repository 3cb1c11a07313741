"""Hugging Face DeepSeek-V3 MoE blocks <-> :class:`MoELayer`, NumPy only (no torch).

transformers' ``DeepseekV3MoE`` holds (torch ``Linear`` weights are ``[out, in]``):

- ``gate.weight [E, d]`` and the buffer ``gate.e_score_correction_bias [E]`` (float32);
- routed experts, either fused (``DeepseekV3NaiveMoe``): ``experts.gate_up_proj
  [E, 2*F, d]`` (gate rows first, ``linear(x, W).chunk(2)`` gives gate, up) and
  ``experts.down_proj [E, d, F]``; or per expert, as in the published checkpoints:
  ``experts.{i}.gate_proj.weight [F, d]``, ``experts.{i}.up_proj.weight [F, d]``,
  ``experts.{i}.down_proj.weight [d, F]``;
- ``shared_experts.{gate,up,down}_proj.weight``: one SwiGLU of width
  ``moe_intermediate_size * n_shared_experts``.

Its forward is ``y = sum_j w_j * down_e(silu(gate_e x) * up_e x) + shared(x)`` with the
routing of :func:`sigmoid_moe.route` (``RouterConfig.from_hf``). One difference: HF fills
group-excluded experts with 0.0 where we use -inf; they agree whenever the chosen
``score + bias`` are positive (always for a bias >= -min score), see ``routing.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigmoid_moe.config import RouterConfig
from sigmoid_moe.layer import MoEConfig, MoELayer

__all__ = ["from_hf_deepseek_v3_moe", "to_hf_deepseek_v3_moe"]


def _as_mapping(config: Any) -> Mapping[str, Any]:
    if isinstance(config, Mapping):
        return config
    to_dict = getattr(config, "to_dict", None)
    if to_dict is None:
        raise TypeError(
            f"config must be a Hugging Face config mapping, got {type(config).__name__}."
        )
    return to_dict()


def _get(state: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in state:
        raise KeyError(f"state_dict has no {key!r}; keys start with {sorted(state)[:4]}...")
    value = np.asarray(state[key])
    if value.shape != shape:
        raise ValueError(
            f"{key!r} must have shape {shape} (torch Linear is [out, in]), got {value.shape}."
        )
    return value


def _routed_experts(state, e: int, d: int, f: int) -> tuple[np.ndarray, np.ndarray]:
    """``w_in_edf [E, d, 2F]`` (gate | up) and ``w_out_efd [E, F, d]`` from either layout."""
    if "experts.gate_up_proj" in state:
        gate_up = _get(state, "experts.gate_up_proj", (e, 2 * f, d))
        down = _get(state, "experts.down_proj", (e, d, f))
        return gate_up.transpose(0, 2, 1), down.transpose(0, 2, 1)
    w_in, w_out = [], []
    for i in range(e):
        gate = _get(state, f"experts.{i}.gate_proj.weight", (f, d))
        up = _get(state, f"experts.{i}.up_proj.weight", (f, d))
        w_in.append(np.concatenate([gate.T, up.T], axis=1))
        w_out.append(_get(state, f"experts.{i}.down_proj.weight", (d, f)).T)
    return np.stack(w_in), np.stack(w_out)


def from_hf_deepseek_v3_moe(
    config: Any,
    state_dict: Mapping[str, Any],
    *,
    prefix: str = "",
    rngs: nnx.Rngs | None = None,
    **overrides: Any,
) -> MoELayer:
    """Builds a :class:`MoELayer` holding a Hugging Face ``DeepseekV3MoE``'s weights.

    Args:
      config: a DeepSeek-V3 config (dict or ``PretrainedConfig``): ``hidden_size``,
        ``moe_intermediate_size``, ``n_shared_experts``, ``hidden_act`` (must be silu)
        and the routing fields read by :meth:`RouterConfig.from_hf`.
      state_dict: name -> array (NumPy, or anything ``np.asarray`` takes), fused or
        per-expert layout.
      prefix: stripped from the names first, e.g. ``"model.layers.3.mlp."``.
      rngs: only for the throwaway initialisation; default ``nnx.Rngs(0)``.
      **overrides: :class:`MoEConfig` fields such as ``dispatch`` or ``dtype``.

    Returns:
      The layer; ``layer(x)`` equals the HF module's forward.
    """
    hf = _as_mapping(config)
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act={act!r}: only SwiGLU (silu) experts are supported.")
    router = RouterConfig.from_hf(hf)
    d, f = int(hf["hidden_size"]), int(hf["moe_intermediate_size"])
    shared = int(hf.get("n_shared_experts") or 0)
    state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    e = router.num_experts

    moe_config = MoEConfig(d, f, router, num_shared_experts=shared, **overrides)
    layer = MoELayer(moe_config, rngs=rngs or nnx.Rngs(0))
    dtype = moe_config.param_dtype

    def put(variable, value, as_dtype=dtype):
        variable[...] = jnp.asarray(np.asarray(value, np.float32), as_dtype)

    put(layer.router_w_de, _get(state, "gate.weight", (e, d)).T)
    if "gate.e_score_correction_bias" in state:
        bias = _get(state, "gate.e_score_correction_bias", (e,))
        put(layer.bias_e, bias, jnp.float32)  # float32 whatever the param dtype
    w_in, w_out = _routed_experts(state, e, d, f)
    put(layer.w_in_edf, w_in)
    put(layer.w_out_efd, w_out)
    if shared:
        fs = moe_config.shared_width
        gate = _get(state, "shared_experts.gate_proj.weight", (fs, d))
        up = _get(state, "shared_experts.up_proj.weight", (fs, d))
        put(layer.shared_w_in_df, np.concatenate([gate.T, up.T], axis=1))
        put(layer.shared_w_out_fd, _get(state, "shared_experts.down_proj.weight", (d, fs)).T)
    return layer


def to_hf_deepseek_v3_moe(
    layer: MoELayer, *, layout: Literal["fused", "per_expert"] = "fused", prefix: str = ""
) -> dict[str, np.ndarray]:
    """The way back: a ``DeepseekV3MoE`` state dict (NumPy, torch ``[out, in]`` layout).

    Weights keep the layer's ``param_dtype``; ``gate.e_score_correction_bias`` is float32.
    """
    if layout not in ("fused", "per_expert"):
        raise ValueError(f"layout={layout!r} is not supported; choose 'fused' or 'per_expert'.")
    f = layer.config.d_ff
    w_in = np.asarray(layer.w_in_edf[...])  # [E, d, 2F]
    w_out = np.asarray(layer.w_out_efd[...])  # [E, F, d]
    out = {
        "gate.weight": np.asarray(layer.router_w_de[...]).T.copy(),
        "gate.e_score_correction_bias": np.asarray(layer.bias_e[...], np.float32),
    }
    if layout == "fused":
        out["experts.gate_up_proj"] = w_in.transpose(0, 2, 1).copy()
        out["experts.down_proj"] = w_out.transpose(0, 2, 1).copy()
    else:
        for i in range(w_in.shape[0]):
            out[f"experts.{i}.gate_proj.weight"] = w_in[i, :, :f].T.copy()
            out[f"experts.{i}.up_proj.weight"] = w_in[i, :, f:].T.copy()
            out[f"experts.{i}.down_proj.weight"] = w_out[i].T.copy()
    if layer.shared_w_in_df is not None:
        fs = layer.config.shared_width
        shared_in = np.asarray(layer.shared_w_in_df[...])
        out["shared_experts.gate_proj.weight"] = shared_in[:, :fs].T.copy()
        out["shared_experts.up_proj.weight"] = shared_in[:, fs:].T.copy()
        out["shared_experts.down_proj.weight"] = np.asarray(layer.shared_w_out_fd[...]).T.copy()
    return {prefix + k: v for k, v in out.items()}
