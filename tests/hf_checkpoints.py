"""Test helpers: tiny Hugging Face checkpoint folders written by hand, and NumPy oracles.

Independent of :mod:`sigmoid_moe.interop`: the folders are written with
``safetensors.numpy.save_file`` in the published layouts (per-expert or fused expert keys,
dense first layers, attention and embedding tensors the loader must not need), FP8 is
quantised and dequantised here with ``np.kron`` block grids, and the forward is a
line-by-line transcription of DeepSeek's MoE gate (V3 ``noaux_tc`` and V2's greedy /
group-limited greedy).
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)

# A DeepSeek-V3-shaped config at toy size: 3 layers, layer 0 dense; dims that are not
# multiples of 128 so FP8 checkpoints get edge blocks.
V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 136,
    "intermediate_size": 96,
    "moe_intermediate_size": 40,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "n_routed_experts": 8,
    "num_experts_per_tok": 3,
    "n_shared_experts": 1,
    "n_group": 4,
    "topk_group": 2,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "hidden_act": "silu",
    "vocab_size": 64,
    "rms_norm_eps": 1e-6,
}

V2_LITE_CONFIG = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "hidden_size": 24,
    "intermediate_size": 48,
    "moe_intermediate_size": 8,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 2,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "greedy",
    "scoring_func": "softmax",
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
    "hidden_act": "silu",
    "vocab_size": 64,
    "rms_norm_eps": 1e-6,
}


def moe_state(cfg: dict, seed: int, *, bias: bool = True) -> dict[str, np.ndarray]:
    """One MoE block's float32 tensors in the fused layout (the truth a folder encodes)."""
    rng = np.random.default_rng(seed)
    e, d, f = cfg["n_routed_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"]
    fs = f * (cfg.get("n_shared_experts") or 0)
    state = {
        "gate.weight": rng.normal(size=(e, d)) / np.sqrt(d),
        "experts.gate_up_proj": rng.normal(size=(e, 2 * f, d)) / np.sqrt(d),
        "experts.down_proj": rng.normal(size=(e, d, f)) / np.sqrt(f),
    }
    if bias:  # non-negative: HF masks excluded groups with 0.0 and we with -inf; equal then
        state["gate.e_score_correction_bias"] = rng.random(e) * 0.2
    if fs:
        state["shared_experts.gate_proj.weight"] = rng.normal(size=(fs, d)) / np.sqrt(d)
        state["shared_experts.up_proj.weight"] = rng.normal(size=(fs, d)) / np.sqrt(d)
        state["shared_experts.down_proj.weight"] = rng.normal(size=(d, fs)) / np.sqrt(fs)
    return {k: v.astype(np.float32) for k, v in state.items()}


def per_expert(fused: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The fused expert tensors split into the published per-expert keys."""
    f = fused["experts.down_proj"].shape[2]
    out = {k: v for k, v in fused.items() if not k.startswith("experts.")}
    for i, (gate_up, down) in enumerate(
        zip(fused["experts.gate_up_proj"], fused["experts.down_proj"], strict=True)
    ):
        out[f"experts.{i}.gate_proj.weight"] = gate_up[:f]
        out[f"experts.{i}.up_proj.weight"] = gate_up[f:]
        out[f"experts.{i}.down_proj.weight"] = down
    return out


def _grid(scale: np.ndarray, block: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    return np.kron(scale, np.ones(block, np.float32))[: shape[0], : shape[1]]


def fp8_quantize(w: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Reference block quantisation of a 2-D or 3-D weight: scale = amax / 448 per block."""
    if w.ndim == 3:
        pairs = [fp8_quantize(w_e, block) for w_e in w]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    rows, cols = w.shape
    nr, nc = -(-rows // block[0]), -(-cols // block[1])
    padded = np.zeros((nr * block[0], nc * block[1]), np.float32)
    padded[:rows, :cols] = np.abs(w)
    amax = padded.reshape(nr, block[0], nc, block[1]).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / 448.0, 1.0).astype(np.float32)
    q = np.clip(w / _grid(scale, block, w.shape), -448, 448).astype(FP8)
    return q, scale


def fp8_dequantize(q: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    if q.ndim == 3:
        return np.stack([fp8_dequantize(a, s, block) for a, s in zip(q, scale, strict=True)])
    return q.astype(np.float32) * _grid(scale.astype(np.float32), block, q.shape)


def write_folder(
    path: Path,
    cfg: dict,
    layers: dict[int, dict[str, np.ndarray]],
    *,
    layout: str = "per_expert",
    stored: str = "float32",
    block: tuple[int, int] = (128, 128),
    num_shards: int = 3,
    shard_of_layer: dict[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """Writes a checkpoint folder; returns the true float32 value of every MoE weight.

    ``layers`` holds the fused float32 state of each MoE layer. Dense layers of ``cfg``
    get a dense MLP; every layer gets attention and norm tensors; embeddings and head
    are written too. ``stored`` is ``"float32"``, ``"bfloat16"`` or ``"fp8"`` (expert
    weights as e4m3 + ``_scale_inv``, the gate as bfloat16, the bias float32).
    ``shard_of_layer`` places each layer's tensors in a chosen shard (default round
    robin); everything else goes to the last shard.

    Returns:
      ``{full tensor name: float32 value the loader must produce}`` for the MoE tensors.
    """
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(99)
    d = cfg["hidden_size"]
    cfg = dict(cfg)
    if stored == "fp8":
        cfg["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": list(block),
        }
    (path / "config.json").write_text(json.dumps(cfg))
    shards: list[dict[str, np.ndarray]] = [{} for _ in range(num_shards)]
    truth = {}
    other = shards[-1]
    other["model.embed_tokens.weight"] = rng.normal(size=(cfg["vocab_size"], d)).astype(BF16)
    other["model.norm.weight"] = np.ones(d, BF16)
    other["lm_head.weight"] = rng.normal(size=(cfg["vocab_size"], d)).astype(BF16)
    for i in range(cfg["num_hidden_layers"]):
        shard = shards[(shard_of_layer or {}).get(i, i % num_shards)]
        base = f"model.layers.{i}."
        shard[base + "self_attn.o_proj.weight"] = rng.normal(size=(d, d)).astype(BF16)
        shard[base + "input_layernorm.weight"] = np.ones(d, BF16)
        shard[base + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.normal(size=d)).astype(
            BF16
        )
        if i not in layers:
            inter = cfg["intermediate_size"]
            for name, shape in (("gate", (inter, d)), ("up", (inter, d)), ("down", (d, inter))):
                shard[f"{base}mlp.{name}_proj.weight"] = rng.normal(size=shape).astype(BF16)
            continue
        state = layers[i] if layout == "fused" else per_expert(layers[i])
        for name, value in state.items():
            full = f"{base}mlp.{name}"
            if name == "gate.e_score_correction_bias":
                shard[full], truth[full] = value, value
            elif stored == "fp8" and name != "gate.weight":
                q, scale = fp8_quantize(value, block)
                shard[full], shard[full + "_scale_inv"] = q, scale
                truth[full] = fp8_dequantize(q, scale, block)
            elif stored in ("bfloat16", "fp8"):
                shard[full] = value.astype(BF16)
                truth[full] = shard[full].astype(np.float32)
            else:
                shard[full], truth[full] = value, value
    names = [f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors" for k in range(num_shards)]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return truth


def fused_from_truth(truth: dict[str, np.ndarray], prefix: str, cfg: dict) -> dict:
    """The fused float32 block state back from a folder's truth (either layout)."""
    state = {k[len(prefix) :]: v for k, v in truth.items() if k.startswith(prefix)}
    if "experts.gate_up_proj" in state:
        return state
    e = cfg["n_routed_experts"]
    out = {k: v for k, v in state.items() if not k.startswith("experts.")}
    out["experts.gate_up_proj"] = np.stack(
        [
            np.concatenate(
                [state[f"experts.{i}.gate_proj.weight"], state[f"experts.{i}.up_proj.weight"]]
            )
            for i in range(e)
        ]
    )
    out["experts.down_proj"] = np.stack([state[f"experts.{i}.down_proj.weight"] for i in range(e)])
    return out


def hf_route(cfg: dict, state: dict, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek's gate in float64, transcribed line by line: ``(topk_idx, topk_w) [T, k]``.

    V3 family (``noaux_tc``, transformers' ``DeepseekV3MoE``): sigmoid, ``+ bias`` for
    the choice, group score = sum of a group's top 2, excluded groups filled with 0.0,
    weights from the unbiased scores, renormalised if ``norm_topk_prob``, times
    ``routed_scaling_factor``. V2 (DeepSeek's ``MoEGate``): softmax, ``greedy`` or
    ``group_limited_greedy`` (group max), renormalise if ``top_k > 1 and
    norm_topk_prob`` else scale.
    """
    s = {k: np.asarray(v, np.float64) for k, v in state.items()}
    e, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    v2 = cfg.get("model_type") == "deepseek_v2"
    logits = np.asarray(h, np.float64) @ s["gate.weight"].T
    if v2:
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        choice = scores
    else:
        scores = 1 / (1 + np.exp(-logits))
        choice = scores + s["gate.e_score_correction_bias"][None]
    n_group, topk_group = cfg.get("n_group") or 1, cfg.get("topk_group") or 1
    grouped_method = not v2 or cfg.get("topk_method") == "group_limited_greedy"
    if grouped_method and n_group > 1:
        grouped = choice.reshape(-1, n_group, e // n_group)
        if v2:
            group_scores = grouped.max(-1)
        else:
            group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
        group_idx = np.argsort(-group_scores, axis=-1, kind="stable")[:, :topk_group]
        group_mask = np.zeros_like(group_scores)
        np.put_along_axis(group_mask, group_idx, 1, axis=1)
        choice = np.where(np.repeat(group_mask, e // n_group, axis=1) > 0, choice, 0.0)
    topk_idx = np.argsort(-choice, axis=-1, kind="stable")[:, :k]
    topk_w = np.take_along_axis(scores, topk_idx, axis=1)
    if v2:
        if k > 1 and cfg.get("norm_topk_prob"):
            topk_w = topk_w / (topk_w.sum(-1, keepdims=True) + 1e-20)
        else:
            topk_w = topk_w * cfg.get("routed_scaling_factor", 1.0)
    else:
        if cfg.get("norm_topk_prob"):
            topk_w = topk_w / (topk_w.sum(-1, keepdims=True) + 1e-20)
        topk_w = topk_w * cfg.get("routed_scaling_factor", 1.0)
    return topk_idx, topk_w


def hf_forward_numpy(cfg: dict, state: dict, x: np.ndarray) -> np.ndarray:
    """DeepSeek's MoE forward in float64 (fused state), routing by :func:`hf_route`."""
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    linear = lambda v, w: v @ w.T  # noqa: E731  torch F.linear, weight [out, in]
    s = {k: np.asarray(v, np.float64) for k, v in state.items()}
    k = cfg["num_experts_per_tok"]
    h = x.reshape(-1, cfg["hidden_size"]).astype(np.float64)
    topk_idx, topk_w = hf_route(cfg, state, h)
    y = np.zeros_like(h)
    f = cfg["moe_intermediate_size"]
    for t in range(len(h)):  # per token, per chosen expert: SwiGLU, weighted sum
        for j in range(k):
            ex = topk_idx[t, j]
            gate, up = np.split(linear(h[t], s["experts.gate_up_proj"][ex]), [f])
            y[t] += topk_w[t, j] * linear(silu(gate) * up, s["experts.down_proj"][ex])
    if cfg.get("n_shared_experts"):
        shared = silu(linear(h, s["shared_experts.gate_proj.weight"])) * linear(
            h, s["shared_experts.up_proj.weight"]
        )
        y += linear(shared, s["shared_experts.down_proj.weight"])
    return y.reshape(x.shape)
