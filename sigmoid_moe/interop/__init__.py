"""Hugging Face DeepSeek-family MoE checkpoints <-> :class:`~sigmoid_moe.MoELayer`, no torch.

- :func:`load_moe_layers` / :func:`save_moe_layers`: a safetensors checkpoint folder
  (``config.json``, index, shards; bf16, fp32 or block-wise FP8) <-> ``{layer: MoELayer}``
  (:mod:`~sigmoid_moe.interop.folder`).
- :func:`from_hf_deepseek_v3_moe` / :func:`to_hf_deepseek_v3_moe`: one block's state dict
  (:mod:`~sigmoid_moe.interop.mapping`, which owns the names, shapes and layouts).
- :func:`dequantize_blocks` / :func:`quantize_blocks`: DeepSeek's FP8 e4m3 with a scale per
  128 x 128 block, and its error bound (:mod:`~sigmoid_moe.interop.fp8`).
- :func:`moe_layer_indices`: which decoder layers are MoE, from ``config.json``.
"""

from sigmoid_moe._hf_config import moe_layer_indices
from sigmoid_moe.interop.folder import CheckpointFolder, load_moe_layers, save_moe_layers
from sigmoid_moe.interop.fp8 import (
    FP8_RELATIVE_ERROR,
    FP8_SUBNORMAL_STEP,
    dequantize_blocks,
    quantize_blocks,
)
from sigmoid_moe.interop.mapping import from_hf_deepseek_v3_moe, to_hf_deepseek_v3_moe

__all__ = [
    "FP8_RELATIVE_ERROR",
    "FP8_SUBNORMAL_STEP",
    "CheckpointFolder",
    "dequantize_blocks",
    "from_hf_deepseek_v3_moe",
    "load_moe_layers",
    "moe_layer_indices",
    "quantize_blocks",
    "save_moe_layers",
    "to_hf_deepseek_v3_moe",
]
