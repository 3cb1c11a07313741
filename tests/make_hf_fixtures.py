"""Writes ``tests/fixtures/hf/``: Hugging Face's own MoE code run once at toy size.

Run it again only to refresh the fixtures (torch and transformers are in no extra)::

    pip install torch transformers   # a CPU build of torch is enough
    python tests/make_hf_fixtures.py

Each ``<case>.npz`` holds what transformers computed, so that ``tests/test_interop.py``
checks sigmoid_moe against Hugging Face's code on every CI run without torch:

- ``meta``: JSON: the config as ``config.json`` would hold it, the transformers class
  that computed the case, and the versions of torch, transformers, numpy and Python;
- ``x`` ``[2, 5, d]`` float32: the block's input; ``y``: its output;
- ``topk_indices`` / ``topk_weights`` ``[10, k]``: the router's choice (transformers'
  order, which is unsorted: compare as sets);
- ``state/<key>``: the block's ``state_dict`` (float32), keys as transformers names them.

The ``folder`` case is a whole ``save_pretrained`` folder instead: ``file/<name>`` holds
each file's bytes (the attention, embedding and norm weights zeroed, as the loader must
not need them), ``y/<layer>`` each MoE layer's output for ``x``.

``manifest.json`` lists each file's size and sha256 and the versions that wrote them.
Weights come from NumPy's generator, not torch's, so a rerun with other versions writes
the same inputs and weights; only the outputs can change.
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
import platform
import tempfile

import numpy as np

OUT = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf"

# Each case: (transformers module, MoE block class, config class, config, model_type for
# our loader when the family's config.json names another one than the class's).
_BLOCK = {
    "n_routed_experts": 8,
    "num_experts_per_tok": 3,
    "hidden_size": 8,
    "moe_intermediate_size": 4,
    "hidden_act": "silu",
    "num_hidden_layers": 1,
    "intermediate_size": 16,
    "num_attention_heads": 2,  # unused by the block; the configs check it divides d
    "num_key_value_heads": 2,
}
CASES = {
    # DeepSeek-V3 / R1: sigmoid, bias for the choice, 4 groups with 2 kept, 2 shared experts.
    "deepseek_v3": (
        "deepseek_v3",
        "DeepseekV3MoE",
        "DeepseekV3Config",
        dict(
            _BLOCK,
            n_shared_experts=2,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        ),
        None,
    ),
    # Kimi K2 runs DeepSeek-V3's code with one group; its config.json says kimi_k2.
    "kimi_k2": (
        "deepseek_v3",
        "DeepseekV3MoE",
        "DeepseekV3Config",
        dict(
            _BLOCK,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.827,
        ),
        "kimi_k2",
    ),
    # GLM-4.5: DeepSeek-V3's router in transformers' own class (excluded groups at -inf).
    "glm4_moe": (
        "glm4_moe",
        "Glm4MoeMoE",
        "Glm4MoeConfig",
        dict(
            _BLOCK,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        ),
        None,
    ),
    # DeepSeek-V2-Lite: softmax, greedy top-k, no renormalisation.
    "deepseek_v2_greedy": (
        "deepseek_v2",
        "DeepseekV2Moe",
        "DeepseekV2Config",
        dict(
            _BLOCK,
            n_shared_experts=2,
            n_group=1,
            topk_group=1,
            topk_method="greedy",
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
        ),
        None,
    ),
    # DeepSeek-V2: softmax, group-limited greedy (group max), scaled by 16.
    "deepseek_v2_group_limited": (
        "deepseek_v2",
        "DeepseekV2Moe",
        "DeepseekV2Config",
        dict(
            _BLOCK,
            n_shared_experts=2,
            n_group=4,
            topk_group=2,
            topk_method="group_limited_greedy",
            norm_topk_prob=False,
            routed_scaling_factor=16.0,
        ),
        None,
    ),
}

# A DeepSeek-V3 model at toy size for the folder case: layer 0 dense, layers 1-2 MoE.
FOLDER_CONFIG = {
    "hidden_size": 16,
    "intermediate_size": 24,
    "moe_intermediate_size": 8,
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
    "vocab_size": 32,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "q_lora_rank": None,
    "kv_lora_rank": 8,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 4,
    "v_head_dim": 4,
}


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _fill(module, rng: np.random.Generator, *, only=None) -> None:
    """Parameters ~ N(0, 0.3^2) (weights of order one, so outputs are too) and each
    ``e_score_correction_bias`` ~ U(0, 0.2), from ``rng``; ``only(name)`` picks which."""
    import torch

    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if only is not None and not only(name):
                continue
            shape = tuple(tensor.shape)
            if name.endswith("e_score_correction_bias"):
                value = rng.uniform(0.0, 0.2, shape)
            else:
                value = rng.normal(0.0, 0.3, shape)
            tensor.copy_(torch.from_numpy(value.astype(np.float32)))


def hf_block(case: str, config: dict, state: dict[str, np.ndarray] | None = None):
    """transformers' MoE block of ``case`` for ``config`` (a ``config.json`` dict) in eval
    mode, with ``state`` loaded when given."""
    import importlib

    import torch

    module_name, block_class, config_class, _, _ = CASES[case]
    modeling = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    configuration = importlib.import_module(
        f"transformers.models.{module_name}.configuration_{module_name}"
    )
    fields = {k: v for k, v in config.items() if k != "model_type"}  # kimi_k2: V3's class
    hf_config = getattr(configuration, config_class).from_dict(fields)
    block = getattr(modeling, block_class)(hf_config).eval()
    if state is not None:
        block.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return block


def run_block(block, x: np.ndarray) -> dict[str, np.ndarray]:
    """The block's output and its router's choice for ``x`` ``[..., d]``."""
    import torch

    with torch.no_grad():
        h = torch.from_numpy(x)
        _, weights, indices = block.gate(h.reshape(-1, x.shape[-1]))
        return {
            "y": block(h).numpy(),
            "topk_indices": indices.numpy().astype(np.int32),
            "topk_weights": weights.numpy(),
        }


def make_block(case: str, seed: int) -> dict[str, np.ndarray]:
    import transformers

    module_name, block_class, config_class, fields, model_type = CASES[case]
    config = json.loads(getattr(transformers, config_class)(**fields).to_json_string())
    if model_type is not None:
        config["model_type"] = model_type
    block = hf_block(case, config)
    rng = np.random.default_rng(seed)
    _fill(block, rng)
    x = rng.normal(size=(2, 5, fields["hidden_size"])).astype(np.float32)
    meta = {
        "case": case,
        "computed_by": f"transformers.{block_class}",
        "config": config,
        "versions": versions(),
    }
    state = {f"state/{k}": v.detach().numpy().copy() for k, v in block.state_dict().items()}
    return {"meta": np.array(json.dumps(meta)), "x": x, **run_block(block, x), **state}


def make_folder(seed: int) -> dict[str, np.ndarray]:
    """``DeepseekV3ForCausalLM.save_pretrained``'s folder and each MoE layer's output."""
    import torch
    import transformers

    torch.manual_seed(seed)  # the default init of the zeroed weights; nothing depends on it
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**FOLDER_CONFIG))
    model.eval()
    rng = np.random.default_rng(seed)
    moe = [i for i in range(FOLDER_CONFIG["num_hidden_layers"]) if i >= 1]
    with torch.no_grad():  # only the MoE blocks matter; zeros compress and are never read
        for param in model.parameters():
            param.zero_()
    for i in moe:
        _fill(model.model.layers[i].mlp, rng)
    x = rng.normal(size=(2, 5, FOLDER_CONFIG["hidden_size"])).astype(np.float32)
    out: dict[str, np.ndarray] = {"x": x}
    for i in moe:
        out[f"y/{i}"] = run_block(model.model.layers[i].mlp, x)["y"]
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, safe_serialization=True)
        for path in sorted(pathlib.Path(folder).iterdir()):
            out[f"file/{path.name}"] = np.frombuffer(path.read_bytes(), np.uint8)
    meta = {
        "case": "folder",
        "computed_by": "transformers.DeepseekV3ForCausalLM.save_pretrained",
        "config": FOLDER_CONFIG,
        "moe_layers": moe,
        "versions": versions(),
    }
    return {"meta": np.array(json.dumps(meta)), **out}


def _write(name: str, arrays: dict[str, np.ndarray]) -> dict:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    data = buffer.getvalue()
    (OUT / f"{name}.npz").write_bytes(data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    files = {}
    for seed, case in enumerate(CASES):
        files[f"{case}.npz"] = _write(case, make_block(case, seed))
    files["folder.npz"] = _write("folder", make_folder(len(CASES)))
    manifest = {"written_by": "tests/make_hf_fixtures.py", "versions": versions(), "files": files}
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for name, entry in files.items():
        print(f"{name}: {entry['bytes']} bytes")


if __name__ == "__main__":
    main()
