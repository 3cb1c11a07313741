"""Safetensors checkpoint folders: MoE layers in, MoE layers out, FP8 included, no torch.

A Hugging Face folder holds ``config.json`` and either one ``model.safetensors`` or a
``model.safetensors.index.json`` whose ``weight_map`` names the shard of every tensor.
:func:`load_moe_layers` reads the config, resolves each MoE tensor of the requested
layers through the index and opens only the shards that hold them, lazily, with
safetensors' own reader (``safe_open(framework="numpy", backend="pread")``: a tensor's
bytes are read when it is asked for, one expert at a time, nothing else is touched).

NumPy has no float8 type, and safetensors' NumPy backend (0.8) looks ``float8_e4m3fn``
up as a ``numpy`` attribute and fails (safetensors issue #682). Before the first FP8
read this module points ``numpy.float8_e4m3fn`` at ``ml_dtypes.float8_e4m3fn`` (the type
JAX itself uses) when numpy lacks the name; a backend that returns the codes as ``uint8``
is viewed back as FP8.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from sigmoid_moe import _hf_config as hf
from sigmoid_moe.config import RouterConfig
from sigmoid_moe.interop.fp8 import FP8_DTYPE, quantize_blocks, scale_shape
from sigmoid_moe.interop.mapping import (
    SCALE_SUFFIX,
    Layout,
    build_layer,
    check_stored,
    materialize,
    to_hf_deepseek_v3_moe,
)
from sigmoid_moe.layer import MoELayer

__all__ = ["DEFAULT_PREFIX", "CheckpointFolder", "load_moe_layers", "save_moe_layers"]

DEFAULT_PREFIX = "model.layers.{layer}.mlp."
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_STORED_DTYPES = {
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": FP8_DTYPE,
}


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict; a key given twice is an error (JSON readers keep the
    last one silently: an index would then map a tensor to whichever shard came last)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"{key!r} twice (to {out[key]!r} and {value!r})")
        out[key] = value
    return out


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        return json.loads(path.read_text(), object_pairs_hook=_unique_keys)
    except _DuplicateKey as err:
        raise ValueError(
            f"{path} maps {err}; each tensor (and setting) must appear once: the file is "
            "corrupt or was edited by hand."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}.") from None


def _numpy_knows_float8() -> None:
    if "float8_e4m3fn" not in np.__dict__:
        np.float8_e4m3fn = ml_dtypes.float8_e4m3fn  # see the module docstring


class CheckpointFolder:
    """A checkpoint folder, read lazily. Use as a context manager to close its shards.

    Attributes:
      path: the folder.
      config: ``config.json`` as a dict.
      weight_map: tensor name -> shard file name (from the index, or the single file).
    """

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open  # core dependency; imported where it is used

        self._safe_open = safe_open
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint folder {self.path} does not exist.")
        self.config = _read_json(self.path / "config.json")
        if not isinstance(self.config, dict):
            raise ValueError(f"{self.path / 'config.json'} must hold a JSON object.")
        self._handles: dict[str, Any] = {}
        self._keys: dict[str, frozenset[str]] = {}
        index = self.path / INDEX_FILE
        if index.is_file():
            self.index_file = index
            data = _read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise ValueError(f"{index} must hold a 'weight_map' of tensor name -> shard file.")
            for shard in set(weight_map.values()):
                if Path(shard).name != shard:
                    raise ValueError(
                        f"{index} maps tensors to {shard!r}; shards must be plain file names "
                        "inside the folder."
                    )
            self.weight_map = dict(weight_map)
        elif (self.path / SINGLE_FILE).is_file():
            self.index_file = self.path / SINGLE_FILE
            self.weight_map = dict.fromkeys(self._shard_keys(SINGLE_FILE), SINGLE_FILE)
        else:
            raise FileNotFoundError(
                f"{self.path} holds neither {INDEX_FILE} nor {SINGLE_FILE}; is it a "
                "safetensors checkpoint folder?"
            )

    def __enter__(self) -> CheckpointFolder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def _handle(self, shard: str, for_tensor: str = "") -> Any:
        if shard not in self._handles:
            file = self.path / shard
            if not file.is_file():
                needed = f" (it holds {for_tensor!r})" if for_tensor else ""
                raise FileNotFoundError(
                    f"shard {file} named by {self.index_file.name} is missing{needed}."
                )
            try:
                handle = self._safe_open(str(file), framework="numpy", backend="pread")
                handle.__enter__()
            except Exception as err:  # safetensors raises its own error type
                raise ValueError(f"{file} is not a readable safetensors file: {err}") from None
            self._handles[shard] = handle
            self._keys[shard] = frozenset(handle.keys())
        return self._handles[shard]

    def _shard_keys(self, shard: str) -> frozenset[str]:
        self._handle(shard)
        return self._keys[shard]

    def _slice(self, name: str) -> Any:
        shard = self.weight_map.get(name)
        if shard is None:
            raise KeyError(f"{self.index_file.name} in {self.path} has no tensor {name!r}.")
        handle = self._handle(shard, name)
        if name not in self._keys[shard]:
            raise ValueError(
                f"{self.index_file.name} maps {name!r} to {shard}, which does not hold it "
                "(a stale or corrupt index)."
            )
        return handle.get_slice(name)

    def info(self, name: str) -> tuple[tuple[int, ...], Any]:
        """``(shape, dtype)`` of a stored tensor from its shard's header, no data read.

        An unknown stored dtype is a ValueError naming the tensor.
        """
        view = self._slice(name)
        stored = view.get_dtype()
        if stored not in _STORED_DTYPES:
            raise ValueError(
                f"{name!r} in {self.weight_map[name]} is stored as {stored}, which the loader "
                f"does not know; supported: {tuple(_STORED_DTYPES)}."
            )
        return tuple(view.get_shape()), _STORED_DTYPES[stored]

    def read(self, name: str, index: int | slice | None = None) -> np.ndarray:
        """A stored tensor (or rows ``index`` of its first axis) as NumPy, stored dtype."""
        _, dtype = self.info(name)
        if dtype == FP8_DTYPE:
            _numpy_knows_float8()
        view = self._slice(name)
        if index is None:
            raw = view[:]
        elif isinstance(index, slice):
            raw = view[index]
        else:
            raw = view[index : index + 1][0]
        raw = np.asarray(raw)
        if dtype == FP8_DTYPE and raw.dtype == np.uint8:
            raw = raw.view(FP8_DTYPE)
        return raw

    def layer_source(
        self, prefix: str, block: tuple[int, int] | None, context: str = ""
    ) -> _FolderSource:
        """The tensors under ``prefix`` as a :class:`~sigmoid_moe.interop.mapping.TensorSource`."""
        return _FolderSource(self, prefix, block, context)


class _FolderSource:
    def __init__(self, folder: CheckpointFolder, prefix: str, block, context: str):
        self._folder, self._prefix, self._block, self._context = folder, prefix, block, context
        self.names = frozenset(k[len(prefix) :] for k in folder.weight_map if k.startswith(prefix))

    def key(self, name: str) -> str:
        return self._prefix + name

    def stored_dtype(self, name: str) -> Any:
        return self._folder.info(self._prefix + name)[1]

    def read(self, name, shape, dtype, index=None):
        full = self._prefix + name
        if name not in self.names:
            raise KeyError(
                f"{self._folder.index_file.name} in {self._folder.path} has no tensor {full!r} "
                f"({self._context})."
            )
        stored_shape, stored_dtype = self._folder.info(full)
        check_stored(full, stored_shape, stored_dtype, shape, self._context)
        scale = None
        if name + SCALE_SUFFIX in self.names:
            scale_name = full + SCALE_SUFFIX
            got, scale_dtype = self._folder.info(scale_name)
            want = scale_shape(stored_shape, self._block) if self._block else got
            if got != want or scale_dtype.itemsize < 2:
                raise ValueError(
                    f"{scale_name!r} ({self._context}) has shape {got} and dtype {scale_dtype}; "
                    f"blocks {self._block} of {stored_shape} need float scales of shape {want}."
                )
            scale = self._folder.read(scale_name, index)
        raw = self._folder.read(full, index)
        return materialize(full, raw, scale, self._block, dtype, self._context)


def _layer_list(cfg: Mapping[str, Any], layers: Iterable[int] | int | None) -> list[int]:
    decoder = hf.moe_layer_indices(cfg)
    if layers is None:
        if not decoder:
            raise ValueError("config.json declares no MoE layer (no n_routed_experts).")
        return list(decoder)
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    layers = list(layers)
    moe = hf.moe_layer_indices(cfg, include_mtp=True)
    total = hf.hf_int(cfg, "num_hidden_layers", minimum=1) + hf.hf_int(
        cfg, "num_nextn_predict_layers", minimum=0, default=0
    )
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"layers must be layer indices (ints), got {layer!r}.")
        if not 0 <= layer < total:
            raise ValueError(f"layer {layer} does not exist: the model has layers 0..{total - 1}.")
        if layer not in moe:
            raise ValueError(
                f"layer {layer} is dense, not MoE (first_k_dense_replace="
                f"{cfg.get('first_k_dense_replace', 0)}, moe_layer_freq="
                f"{cfg.get('moe_layer_freq', 1)}); MoE layers: {_span(moe)}."
            )
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers lists a layer twice: {layers}.")
    return [int(layer) for layer in layers]


def _span(indices: tuple[int, ...]) -> str:
    if len(indices) > 6 and list(indices) == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}..{indices[-1]}"
    return str(list(indices))


def _default_param_dtype(source: _FolderSource) -> Any:
    weights = [
        n for n in source.names if n.endswith(("weight", "_proj")) and not n.endswith(SCALE_SUFFIX)
    ]
    narrow = all(source.stored_dtype(n) in (FP8_DTYPE, _STORED_DTYPES["BF16"]) for n in weights)
    return jnp.bfloat16 if narrow else jnp.float32


def load_moe_layers(
    path: str | os.PathLike,
    layers: Iterable[int] | int | None = None,
    *,
    param_dtype: Any = None,
    dtype: Any = None,
    allow_missing_bias: bool = False,
    prefix: str = DEFAULT_PREFIX,
    **overrides: Any,
) -> dict[int, MoELayer]:
    """The MoE layers of a Hugging Face safetensors checkpoint folder, as :class:`MoELayer`.

    ``load_moe_layers("DeepSeek-V3", [3])`` reads ``config.json``, finds layer 3's MoE
    tensors through the index and reads only those, from the shards that hold them, an
    expert at a time (peak host memory about the layer's size, see the README).

    Args:
      path: the folder (``config.json`` + ``model.safetensors.index.json`` and shards, or
        one ``model.safetensors``).
      layers: layer indices, or ``None`` for every MoE decoder layer. Layer ``i`` is MoE
        when ``i >= first_k_dense_replace`` and ``i % moe_layer_freq == 0``; a dense one
        is a ValueError. The multi-token-prediction layers stored after the decoder
        (``num_nextn_predict_layers``) load when asked for.
      param_dtype: weight dtype; ``None``: bfloat16 when every weight of the layer is
        stored in bfloat16 or FP8, float32 otherwise. FP8 weights (``float8_e4m3fn``
        with ``<name>_scale_inv`` per block of ``quantization_config.weight_block_size``)
        are dequantised block by block into it. The bias stays float32.
      dtype: activation dtype of the layers; default ``param_dtype``.
      allow_missing_bias: see :func:`sigmoid_moe.interop.mapping.build_layer`.
      prefix: the MoE block's name prefix, ``{layer}`` standing for the index.
      **overrides: :class:`MoEConfig` fields (``dispatch``, ``capacity_factor``,
        ``router`` ...).

    Returns:
      ``{layer_index: MoELayer}`` in the order asked for.

    Raises:
      FileNotFoundError: the folder, its config, its index or a needed shard is missing.
      KeyError: a tensor the config calls for is not in the index.
      ValueError: a dense layer, a shape or dtype that disagrees with the config, an
        index entry its shard does not hold, an FP8 weight without its scale, a tensor
        under a layer's prefix that would be left unused, an unsupported config.
    """
    if "{layer}" not in prefix:
        raise ValueError(f"prefix must contain '{{layer}}', got {prefix!r}.")
    with CheckpointFolder(path) as folder:
        cfg = folder.config
        block = hf.fp8_block_size(cfg)
        wanted = _layer_list(cfg, layers)
        moe = hf.moe_layer_indices(cfg, include_mtp=True)
        present = tuple(i for i in moe if _has_prefix(folder, prefix, i))
        out = {}
        for layer in wanted:
            context = f"layer {layer}"
            source = folder.layer_source(prefix.format(layer=layer), block, context)
            if not source.names:
                raise KeyError(
                    f"{folder.index_file.name} in {folder.path} has no tensor under "
                    f"{prefix.format(layer=layer)!r}; the folder holds MoE layers "
                    f"{_span(present)}. Pass layers= to choose among them."
                )
            pd = param_dtype if param_dtype is not None else _default_param_dtype(source)
            out[layer] = build_layer(
                cfg,
                source,
                param_dtype=pd,
                allow_missing_bias=allow_missing_bias,
                context=context,
                dtype=dtype if dtype is not None else pd,
                **overrides,
            )
        return out


def _has_prefix(folder: CheckpointFolder, prefix: str, layer: int) -> bool:
    start = prefix.format(layer=layer)
    return any(name.startswith(start) for name in folder.weight_map)


def _check_layer(index: int, layer: Any, cfg: Mapping[str, Any], router: RouterConfig) -> None:
    if not isinstance(layer, MoELayer):
        raise TypeError(f"layers[{index}] must be a MoELayer, got {type(layer).__name__}.")
    d, f, shared = hf.moe_widths(cfg)
    got = layer.config
    want = dict(d_model=d, d_ff=f, num_shared_experts=shared, shared_width=shared * f)
    have = dict(
        d_model=got.d_model,
        d_ff=got.d_ff,
        num_shared_experts=got.num_shared_experts,
        shared_width=got.shared_width,
    )
    if have != want or got.router != router:
        raise ValueError(
            f"layers[{index}] ({have}, {got.router}) does not match config.json ({want}, "
            f"{router}); the written folder would not reload to the same layer."
        )


def save_moe_layers(
    path: str | os.PathLike,
    layers: Mapping[int, MoELayer],
    config: Any,
    *,
    layout: Layout = "per_expert",
    fp8: bool = False,
    max_shard_size: int = 4 * 2**30,
    prefix: str = DEFAULT_PREFIX,
    overwrite: bool = False,
) -> Path:
    """Writes MoE layers as a Hugging Face safetensors folder that :func:`load_moe_layers` reads.

    The folder gets ``config.json`` (``config`` with its ``quantization_config`` set for
    FP8, removed otherwise), shards ``model-0000k-of-0000n.safetensors`` of at most
    ``max_shard_size`` bytes each (a bigger tensor gets a shard of its own) with
    ``model.safetensors.index.json`` (``metadata.total_size`` and ``weight_map``), or one
    ``model.safetensors`` when everything fits in one shard.

    Weights are written in each layer's ``param_dtype`` and reload bit-identical. With
    ``fp8`` the expert weights (routed and shared) are stored as ``float8_e4m3fn`` with
    float32 ``<name>_scale_inv`` per block (``weight_block_size`` of ``config``'s FP8
    quantisation, else 128 x 128), as DeepSeek-V3 does; the router weight and the bias
    stay as they are. They reload within ``2**-4 * |w| + 2**-10 * scale_inv`` per
    element (:mod:`sigmoid_moe.interop.fp8`), plus the rounding to ``param_dtype``.

    Args:
      path: the folder (created; existing checkpoint files are an error unless
        ``overwrite``, which removes them first).
      layers: ``{layer_index: MoELayer}``; each index must be an MoE layer of ``config``
        and each layer must match its widths and routing.
      config: the model's HF config (dict or ``PretrainedConfig``).
      layout: ``"per_expert"`` (the published checkpoints) or ``"fused"``.
      fp8: store the expert weights block-quantised.
      max_shard_size: bytes per shard.
      prefix: the MoE block's name prefix, ``{layer}`` standing for the index.
      overwrite: replace an existing checkpoint in ``path``.

    Returns:
      The path of the index (or of the single file).
    """
    cfg = dict(hf.as_mapping(config))
    if not isinstance(layers, Mapping) or not layers:
        raise TypeError("layers must be a non-empty mapping of layer index -> MoELayer.")
    if layout not in ("fused", "per_expert"):
        raise ValueError(f"layout={layout!r} is not supported; choose 'fused' or 'per_expert'.")
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int):
        raise TypeError(f"max_shard_size must be an int (bytes), got {max_shard_size!r}.")
    if max_shard_size < 1:
        raise ValueError(f"max_shard_size must be >= 1 byte, got {max_shard_size}.")
    fam = hf.family(cfg)
    router = RouterConfig.from_hf(cfg)
    _layer_list(cfg, list(layers))
    for index, layer in layers.items():
        _check_layer(index, layer, cfg, router)
    block = None
    if fp8:
        block = hf.fp8_block_size(cfg) or (128, 128)
        cfg["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": list(block),
        }
    else:
        cfg.pop("quantization_config", None)

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    old = [
        p
        for p in out.iterdir()
        if p.name.endswith((".safetensors", ".safetensors.partial")) or p.name == INDEX_FILE
    ]
    if (old or (out / "config.json").exists()) and not overwrite:
        raise FileExistsError(
            f"{out} already holds a checkpoint ({(old or [out / 'config.json'])[0].name}); "
            "choose an empty folder or pass overwrite=True."
        )
    for file in old:
        file.unlink()

    from safetensors.numpy import save_file

    shards: list[Path] = []
    weight_map: dict[str, int] = {}
    pending: dict[str, np.ndarray] = {}
    total = 0

    def flush() -> None:
        shards.append(out / f"model-{len(shards) + 1:05d}.safetensors.partial")
        save_file(pending, str(shards[-1]), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(pending, len(shards) - 1))
        pending.clear()

    for index in sorted(layers):
        layer_prefix = prefix.format(layer=index)
        state = to_hf_deepseek_v3_moe(
            layers[index], layout=layout, prefix=layer_prefix, bias=fam.has_bias
        )
        for name in list(state):
            value = state.pop(name)
            tensors = {name: value}
            if fp8 and name[len(layer_prefix) :].startswith(("experts.", "shared_experts.")):
                q, scale_inv = quantize_blocks(value, block)
                tensors = {name: q, name + SCALE_SUFFIX: scale_inv}
            for key, array in tensors.items():
                size = sum(a.nbytes for a in pending.values())
                if pending and size + array.nbytes > max_shard_size:
                    flush()
                pending[key] = np.ascontiguousarray(array)
                total += array.nbytes
    flush()

    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if len(shards) == 1:
        shards[0].rename(out / SINGLE_FILE)
        return out / SINGLE_FILE
    names = [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    for partial, name in zip(shards, names, strict=True):
        partial.rename(out / name)
    index_data = {
        "metadata": {"total_size": total},
        "weight_map": {key: names[k] for key, k in sorted(weight_map.items())},
    }
    (out / INDEX_FILE).write_text(json.dumps(index_data, indent=2) + "\n")
    return out / INDEX_FILE
