"""One Hugging Face DeepSeek-family MoE block <-> :class:`MoELayer`: names, shapes, layouts.

transformers' ``DeepseekV3MoE`` (and V2's, GLM-4.5's, Kimi K2's) holds, under a prefix such
as ``model.layers.3.mlp.`` (torch ``Linear`` weights are ``[out, in]``):

- ``gate.weight [E, d]`` and, for the V3-style families, the float32 buffer
  ``gate.e_score_correction_bias [E]`` (DeepSeek-V2 has none, by design);
- routed experts, either fused (``experts.gate_up_proj [E, 2F, d]``, gate rows first, and
  ``experts.down_proj [E, d, F]``) or per expert, as the published checkpoints store them
  (``experts.{i}.gate_proj.weight [F, d]``, ``experts.{i}.up_proj.weight [F, d]``,
  ``experts.{i}.down_proj.weight [d, F]``);
- with ``n_shared_experts``, ``shared_experts.{gate,up,down}_proj.weight``: one SwiGLU of
  width ``moe_intermediate_size * n_shared_experts``;
- in FP8 checkpoints, beside each FP8 weight ``W``, its block scales ``W_scale_inv``
  (:mod:`sigmoid_moe.interop.fp8`).

Its forward is ``y = sum_j w_j * down_e(silu(gate_e x) * up_e x) + shared(x)`` with the
routing of :func:`sigmoid_moe.route` (``RouterConfig.from_hf``). One difference: HF fills
group-excluded experts with 0.0 where we use -inf; they agree whenever the chosen
``score + bias`` are positive (always for a bias >= -min score), see ``routing.py``.

Every tensor under the prefix is used or refused: :func:`build_layer` raises on any name
it did not consume (shared experts the config does not declare, a bias for a family that
has none, a stray scale, both layouts at once), and on any NaN or inf it reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from sigmoid_moe import _hf_config as hf
from sigmoid_moe.config import MoEConfig, RouterConfig
from sigmoid_moe.interop.fp8 import FP8_DTYPE, dequantize_blocks, scale_shape
from sigmoid_moe.layer import MoELayer

__all__ = [
    "ArraySource",
    "TensorSource",
    "build_layer",
    "from_hf_deepseek_v3_moe",
    "to_hf_deepseek_v3_moe",
]

Layout = Literal["fused", "per_expert"]
SCALE_SUFFIX = "_scale_inv"
_BF16 = np.dtype(ml_dtypes.bfloat16)
_ALIGN = 64  # bytes; XLA's CPU buffers
#: Stored dtypes a weight may have (FP8 only with its ``_scale_inv``).
WEIGHT_DTYPES = (np.dtype(np.float32), _BF16, np.dtype(np.float16), np.dtype(np.float64))


class TensorSource(Protocol):
    """The tensors of one MoE block, by name relative to its prefix."""

    names: frozenset[str]  # every tensor name the source holds (FP8 scales included)

    def key(self, name: str) -> str:
        """``name`` as it is stored (with its prefix), for messages."""

    def read(self, name: str, shape: tuple[int, ...], dtype: Any, index: int | None) -> Any:
        """``name`` (its ``index``-th slice along axis 0 when given) as a NumPy ``dtype``
        array, dequantised if stored as FP8. ``shape`` is the full tensor's expected shape,
        checked before any data is read."""


def _where(name: str, context: str) -> str:
    return f"{name!r} ({context})" if context else repr(name)


def check_stored(
    name: str, stored_shape: tuple[int, ...], stored_dtype: Any, shape: tuple, context: str
) -> None:
    """Shape and dtype checks shared by the sources; errors name the tensor."""
    if tuple(stored_shape) != tuple(shape):
        raise ValueError(
            f"{_where(name, context)} has shape {tuple(stored_shape)}, but the config needs "
            f"{tuple(shape)} (torch Linear is [out, in]; check hidden_size, "
            "moe_intermediate_size, n_routed_experts, n_shared_experts)."
        )
    if np.dtype(stored_dtype) not in (*WEIGHT_DTYPES, FP8_DTYPE):
        raise ValueError(
            f"{_where(name, context)} is stored as {stored_dtype}, which the loader does not "
            "know; weights must be float32, bfloat16, float16, float64 or float8_e4m3fn."
        )


def materialize(
    name: str,
    raw: np.ndarray,
    scale: np.ndarray | None,
    block: tuple[int, int] | None,
    dtype: Any,
    context: str = "",
) -> np.ndarray:
    """``raw`` as ``dtype``: FP8 codes dequantised with ``scale`` (required), else a cast."""
    if raw.dtype == FP8_DTYPE:
        if scale is None:
            raise ValueError(
                f"{_where(name, context)} is float8_e4m3fn but has no {name + SCALE_SUFFIX!r}; "
                "an FP8 weight cannot be read without its block scales."
            )
        if block is None:
            raise ValueError(
                f"{_where(name, context)} is float8_e4m3fn but the config has no block-wise "
                "quantization_config (weight_block_size)."
            )
        return dequantize_blocks(raw, np.asarray(scale, np.float32), block, dtype)
    if scale is not None:
        raise ValueError(
            f"{_where(name, context)} is stored as {raw.dtype} yet has a "
            f"{name + SCALE_SUFFIX!r}; only float8_e4m3fn weights carry scales."
        )
    return raw.astype(dtype, copy=False)


class ArraySource:
    """A state dict (name -> array) as a :class:`TensorSource`."""

    def __init__(
        self,
        state: Mapping[str, Any],
        prefix: str = "",
        block: tuple[int, int] | None = None,
    ):
        if not isinstance(state, Mapping):
            raise TypeError(
                f"state_dict must be a mapping of tensor name -> array, got {type(state).__name__}."
            )
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {prefix!r}.")
        self._state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        self._prefix = prefix
        self.names = frozenset(self._state)
        self._block = block

    def key(self, name: str) -> str:
        return self._prefix + name

    def read(self, name, shape, dtype, index=None):
        key = self.key(name)
        if name not in self._state:
            stored = sorted(self.key(n) for n in self._state)[:4]
            raise KeyError(f"state_dict has no {key!r}; its keys start with {stored}...")
        raw = np.asarray(self._state[name])
        check_stored(key, raw.shape, raw.dtype, shape, "")
        scale = self._state.get(name + SCALE_SUFFIX)
        if scale is not None:
            scale = np.asarray(scale)
            if self._block is not None and scale.shape != scale_shape(raw.shape, self._block):
                raise ValueError(
                    f"{key + SCALE_SUFFIX!r} has shape {scale.shape}, expected "
                    f"{scale_shape(raw.shape, self._block)} for blocks {self._block}."
                )
        if index is not None:
            raw = raw[index]
            scale = None if scale is None else scale[index]
        return materialize(key, raw, scale, self._block, dtype)


def _host_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array on a 64-byte boundary, so XLA's CPU client can alias it."""
    size = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(size + _ALIGN, np.uint8)
    start = (-buf.ctypes.data) % _ALIGN
    return buf[start : start + size].view(dtype).reshape(shape)


def expert_names(layout: Layout, num_experts: int) -> list[str]:
    """The routed-expert tensor names of ``layout``."""
    if layout == "fused":
        return ["experts.gate_up_proj", "experts.down_proj"]
    return [
        f"experts.{i}.{proj}_proj.weight"
        for i in range(num_experts)
        for proj in ("gate", "up", "down")
    ]


def _stored_layout(names: frozenset[str]) -> Layout:
    return "fused" if {"experts.gate_up_proj", "experts.down_proj"} & names else "per_expert"


def _resolve_dtype(param_dtype: Any) -> np.dtype:
    dtype = np.dtype(jnp.dtype(param_dtype))
    if dtype not in WEIGHT_DTYPES:
        raise TypeError(
            f"param_dtype must be float32, bfloat16, float16 or float64, got {param_dtype!r}."
        )
    return dtype


def build_layer(
    hf_config: Any,
    source: TensorSource,
    *,
    param_dtype: Any = jnp.float32,
    allow_missing_bias: bool = False,
    context: str = "",
    **overrides: Any,
) -> MoELayer:
    """A :class:`MoELayer` holding the MoE block that ``source`` reads.

    Each stacked weight is assembled expert by expert into one preallocated, aligned
    ``param_dtype`` host array that the CPU backend then uses in place, so the peak
    host memory is about the layer's size plus one expert's temporaries. The layer is created
    abstractly (``nnx.eval_shape``): no random initialisation is spent on it.

    Args:
      hf_config: the model's ``config.json`` (dict or ``PretrainedConfig``).
      source: the block's tensors (:class:`ArraySource`, or a checkpoint folder's).
      param_dtype: storage dtype of the weights; the bias is always float32.
      allow_missing_bias: a V3-style family without ``gate.e_score_correction_bias``
        is an error (many state dicts built from parameters lack this buffer); True
        takes a zero bias instead.
      context: names the block in errors (e.g. ``"layer 3"``).
      **overrides: :class:`MoEConfig` fields (``dispatch``, ``dtype``, ``router`` ...).
    """
    cfg = hf.as_mapping(hf_config)
    fam = hf.family(cfg)
    d, f, shared = hf.moe_widths(cfg)
    dtype = _resolve_dtype(param_dtype)
    router = overrides.pop("router", None)
    if router is None:
        router = RouterConfig.from_hf(cfg)
    e = router.num_experts
    moe_config = MoEConfig(
        d, f, router, num_shared_experts=shared, param_dtype=param_dtype, **overrides
    )
    used: set[str] = set()

    def read(name, shape, as_dtype=dtype, index=None):
        used.update((name, name + SCALE_SUFFIX))
        value = source.read(name, shape, as_dtype, index)
        if not np.all(np.isfinite(value)):
            part = "" if index is None else f" (expert {index})"
            raise ValueError(
                f"{_where(source.key(name), context)}{part} holds NaN or inf: a corrupt "
                "checkpoint, or an overflow in its conversion; refusing to route with it."
            )
        return value

    router_w_de = _host_empty((d, e), dtype)
    router_w_de[...] = read("gate.weight", (e, d)).T
    bias_e = np.zeros((e,), np.float32)
    if "gate.e_score_correction_bias" in source.names and fam.has_bias:
        bias_e[...] = read("gate.e_score_correction_bias", (e,), np.float32)
    elif fam.has_bias and not allow_missing_bias:
        raise ValueError(
            f"{_where(source.key('gate.e_score_correction_bias'), context)} is missing: the "
            f"{fam.name} gate selects with it, a zero bias would route differently. Pass "
            "allow_missing_bias=True to route with a zero bias on purpose."
        )

    w_in_edf = _host_empty((e, d, 2 * f), dtype)
    w_out_efd = _host_empty((e, f, d), dtype)
    if _stored_layout(source.names) == "fused":
        for i in range(e):
            w_in_edf[i] = read("experts.gate_up_proj", (e, 2 * f, d), index=i).T
            w_out_efd[i] = read("experts.down_proj", (e, d, f), index=i).T
    else:
        for i in range(e):
            w_in_edf[i, :, :f] = read(f"experts.{i}.gate_proj.weight", (f, d)).T
            w_in_edf[i, :, f:] = read(f"experts.{i}.up_proj.weight", (f, d)).T
            w_out_efd[i] = read(f"experts.{i}.down_proj.weight", (d, f)).T
    arrays = {"router_w_de": router_w_de, "w_in_edf": w_in_edf, "w_out_efd": w_out_efd}
    if shared:
        fs = moe_config.shared_width
        shared_in = _host_empty((d, 2 * fs), dtype)
        shared_in[:, :fs] = read("shared_experts.gate_proj.weight", (fs, d)).T
        shared_in[:, fs:] = read("shared_experts.up_proj.weight", (fs, d)).T
        shared_out = _host_empty((fs, d), dtype)
        shared_out[...] = read("shared_experts.down_proj.weight", (d, fs)).T
        arrays.update(shared_w_in_df=shared_in, shared_w_out_fd=shared_out)

    _refuse_unused(source, source.names - used, shared, fam, context)
    layer = nnx.eval_shape(lambda: MoELayer(moe_config, rngs=nnx.Rngs(0)))
    for name, value in arrays.items():
        # On CPU the aligned host buffer becomes the array (no second copy of the layer).
        getattr(layer, name).set_value(jax.device_put(value, may_alias=True))
    layer.bias_e.set_value(jnp.asarray(bias_e))
    return layer


def _refuse_unused(
    source: TensorSource, unused: set[str], shared: int, fam: hf.Family, context: str
) -> None:
    if not unused:
        return
    names = sorted(unused)
    hints = []
    if any(n.startswith("shared_experts.") for n in names) and not shared:
        hints.append("shared-expert tensors but n_shared_experts is 0 or absent in the config")
    if "gate.e_score_correction_bias" in unused and not fam.has_bias:
        hints.append(f"an e_score_correction_bias, which {fam.name} does not use")
    if any(n.startswith("experts.") for n in names):
        hints.append("experts beyond n_routed_experts, or both fused and per-expert keys")
    hint = f" ({'; '.join(hints)})" if hints else ""
    where = f" in {context}" if context else ""
    shown = ", ".join(repr(source.key(n)) for n in names[:8])
    if len(names) > 8:
        shown += f" and {len(names) - 8} more"
    raise ValueError(
        f"{len(names)} tensor(s){where} would be left unused{hint}: {shown}. "
        "Fix the config or drop them; nothing is ignored silently."
    )


def from_hf_deepseek_v3_moe(
    config: Any,
    state_dict: Mapping[str, Any],
    *,
    prefix: str = "",
    allow_missing_bias: bool = False,
    **overrides: Any,
) -> MoELayer:
    """Builds a :class:`MoELayer` holding a Hugging Face DeepSeek-family MoE block's weights.

    Args:
      config: the model config (dict or ``PretrainedConfig``): ``hidden_size``,
        ``moe_intermediate_size``, ``n_shared_experts``, ``hidden_act`` (must be silu),
        ``model_type`` and the routing fields read by :meth:`RouterConfig.from_hf`;
        ``quantization_config`` when the state dict holds FP8 weights.
      state_dict: name -> array (NumPy, or anything ``np.asarray`` takes), fused or
        per-expert layout. Every tensor under ``prefix`` must be used: unknown ones,
        shared experts the config does not declare, etc. are a ValueError listing them.
      prefix: selects and strips the block's names, e.g. ``"model.layers.3.mlp."``.
      allow_missing_bias: see :func:`build_layer`.
      **overrides: :class:`MoEConfig` fields such as ``dispatch``, ``dtype`` or
        ``param_dtype`` (default float32), or ``router``.

    Returns:
      The layer; ``layer(x)`` equals the HF module's forward.
    """
    cfg = hf.as_mapping(config)
    source = ArraySource(state_dict, prefix, hf.fp8_block_size(cfg))
    param_dtype = overrides.pop("param_dtype", jnp.float32)
    return build_layer(
        cfg,
        source,
        param_dtype=param_dtype,
        allow_missing_bias=allow_missing_bias,
        context=f"prefix {prefix!r}" if prefix else "",
        **overrides,
    )


def to_hf_deepseek_v3_moe(
    layer: MoELayer, *, layout: Layout = "fused", prefix: str = "", bias: bool = True
) -> dict[str, np.ndarray]:
    """The way back: a ``DeepseekV3MoE`` state dict (NumPy, torch ``[out, in]`` layout).

    Weights keep the layer's ``param_dtype``; ``gate.e_score_correction_bias`` is float32.
    ``bias=False`` leaves the bias out (DeepSeek-V2's gate has none), which needs it zero.
    """
    if not isinstance(layer, MoELayer):
        raise TypeError(f"layer must be a MoELayer, got {type(layer).__name__}.")
    if layout not in ("fused", "per_expert"):
        raise ValueError(f"layout={layout!r} is not supported; choose 'fused' or 'per_expert'.")
    f = layer.config.d_ff
    w_in = np.asarray(layer.w_in_edf[...])  # [E, d, 2F]
    w_out = np.asarray(layer.w_out_efd[...])  # [E, F, d]
    out = {"gate.weight": np.asarray(layer.router_w_de[...]).T.copy()}
    bias_e = np.asarray(layer.bias_e[...], np.float32)
    if bias:
        out["gate.e_score_correction_bias"] = bias_e
    elif np.any(bias_e != 0):
        raise ValueError(
            "bias=False but the layer's bias is nonzero; it would be lost. Keep bias=True "
            "(a V3-style gate), or zero it on purpose first."
        )
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
