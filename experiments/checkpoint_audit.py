"""Audit the routing bias of a published DeepSeek-family checkpoint, layer by layer.

    python experiments/checkpoint_audit.py /models/Moonlight-16B-A3B --hidden acts.npz
    python experiments/checkpoint_audit.py /models/DeepSeek-V3 --router-only --token-ids 1,2,3
    python experiments/checkpoint_audit.py /models/GLM-4.5 --text "The quick brown fox"

For every MoE layer it prints the two numbers published audits of DeepSeek-V3,
Moonlight, GLM-4.5 and Kimi K2 report: the range of ``e_score_correction_bias``, and the
fraction of tokens whose biased top-k (what the model runs) differs, as a set, from the
raw top-k of the same scores without the bias; plus MaxVio of the biased loads on these
tokens (``max_i load_i / mean_load - 1``).

The router needs each layer's *input* hidden states. Give them exactly with ``--hidden``
(``.npy [T, d]`` for every layer, or ``.npz`` with ``layer_<i>`` arrays, e.g. dumped from
a transformers forward with ``output_hidden_states``). Otherwise tokens (``--token-ids``,
or ``--text`` with the folder's ``tokenizer.json`` and the ``tokenizers`` package) are
embedded with ``model.embed_tokens.weight`` and RMS-normalised with the layer's
``post_attention_layernorm.weight``: a proxy that skips every attention block, labelled
``embedding proxy`` in the output.

Each layer is loaded with :func:`sigmoid_moe.interop.load_moe_layers` (one at a time) and
routed through the layer itself; ``--router-only`` reads just ``gate.weight`` and the bias
(what a laptop can do for DeepSeek-V3's 22 GB layers). Bad input exits 2 with one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from sigmoid_moe import RouterConfig, route
from sigmoid_moe._hf_config import hf_float
from sigmoid_moe.interop import CheckpointFolder, load_moe_layers, moe_layer_indices
from sigmoid_moe.interop.folder import DEFAULT_PREFIX


class UsageError(Exception):
    """Bad input: reported in one line, exit 2."""


def _checked(fn, *args, **kwargs):
    """Calls the loader; its documented bad-checkpoint errors become usage errors."""
    try:
        return fn(*args, **kwargs)
    except (FileNotFoundError, KeyError, ValueError, TypeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise UsageError(message) from None


def _token_ids(args: argparse.Namespace, folder: CheckpointFolder) -> np.ndarray:
    if args.token_ids is not None:
        try:
            ids = np.array([int(t) for t in args.token_ids.split(",") if t.strip()], np.int64)
        except ValueError:
            raise UsageError(
                f"--token-ids must be comma-separated ints, got {args.token_ids!r}"
            ) from None
    else:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UsageError(
                "--text needs the tokenizers package (pip install tokenizers)"
            ) from None
        file = folder.path / "tokenizer.json"
        if not file.is_file():
            raise UsageError(f"--text needs {file}; pass --token-ids or --hidden instead")
        ids = np.array(Tokenizer.from_file(str(file)).encode(args.text).ids, np.int64)
    vocab = _checked(folder.info, "model.embed_tokens.weight")[0][0]
    if ids.size == 0 or ids.min() < 0 or ids.max() >= vocab:
        raise UsageError(f"token ids must be 1 or more ids in [0, {vocab}), got {ids.tolist()}")
    return ids


def _embed(folder: CheckpointFolder, ids: np.ndarray) -> np.ndarray:
    """Rows of the embedding for ``ids``, read one distinct row at a time (float32)."""
    rows = {int(i): folder.read("model.embed_tokens.weight", slice(i, i + 1))[0] for i in set(ids)}
    return np.stack([np.asarray(rows[int(i)], np.float32) for i in ids])


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _inputs(args, folder, layers) -> tuple[dict[int, np.ndarray], str]:
    if args.hidden is not None:
        path = Path(args.hidden)
        if not path.is_file():
            raise UsageError(f"--hidden {path} does not exist")
        try:
            data = np.load(path)
        except (OSError, ValueError) as err:
            raise UsageError(f"--hidden {path} is not a .npy/.npz file: {err}") from None
        if isinstance(data, np.ndarray):
            return dict.fromkeys(layers, np.asarray(data, np.float32)), "hidden states"
        missing = [i for i in layers if f"layer_{i}" not in data]
        if missing:
            raise UsageError(f"--hidden {path} has no layer_{missing[0]} array")
        return {i: np.asarray(data[f"layer_{i}"], np.float32) for i in layers}, "hidden states"
    x = _embed(folder, _token_ids(args, folder))
    eps = _checked(hf_float, folder.config, "rms_norm_eps", default=1e-6)
    out = {}
    for i in layers:
        norm = f"model.layers.{i}.post_attention_layernorm.weight"
        weight = np.asarray(folder.read(norm), np.float32) if norm in folder.weight_map else 1.0
        out[i] = _rms_norm(x, weight, eps)
    return out, "embedding proxy"


def _router(folder: CheckpointFolder, layer: int) -> tuple[np.ndarray, np.ndarray, RouterConfig]:
    """``(w_de, bias_e, router)`` read from the folder alone (``--router-only``)."""
    router = RouterConfig.from_hf(folder.config)
    d, e = folder.config["hidden_size"], router.num_experts
    source = folder.layer_source(DEFAULT_PREFIX.format(layer=layer), None, f"layer {layer}")
    w_ed = source.read("gate.weight", (e, d), np.float32)
    bias = np.zeros(e, np.float32)
    if "gate.e_score_correction_bias" in source.names:
        bias = source.read("gate.e_score_correction_bias", (e,), np.float32)
    return w_ed.T, bias, router


def audit(args: argparse.Namespace) -> tuple[list[dict], str]:
    with _checked(CheckpointFolder, args.folder) as folder:
        moe = _checked(moe_layer_indices, folder.config)
        try:
            layers = [int(v) for v in args.layers.split(",")] if args.layers else list(moe)
        except ValueError:
            raise UsageError(
                f"--layers must be comma-separated ints, got {args.layers!r}"
            ) from None
        for i in layers:
            if i not in moe:
                raise UsageError(f"--layers {i} is not an MoE layer; MoE layers: {list(moe)}")
        inputs, source = _inputs(args, folder, layers)
        rows = []
        for i in layers:
            if args.router_only:
                w_de, bias, router = _checked(_router, folder, i)
            else:
                layer = _checked(load_moe_layers, folder.path, [i], param_dtype=jnp.float32)[i]
                w_de, bias = np.asarray(layer.router_w_de[...]), np.asarray(layer.bias_e[...])
                router = layer.config.router
            x = inputs[i]
            if x.ndim != 2 or x.shape[1] != w_de.shape[0]:
                raise UsageError(f"layer {i} inputs must be [T, {w_de.shape[0]}], got {x.shape}")
            logits = jnp.asarray(x @ w_de)
            biased = np.sort(np.asarray(route(logits, bias, router).expert_ids), axis=-1)
            raw = np.sort(np.asarray(route(logits, None, router).expert_ids), axis=-1)
            if not args.router_only:  # the layer itself routes as route() does
                load = np.asarray(layer(jnp.asarray(x))[1].expert_load)
                assert np.array_equal(load, np.bincount(biased.ravel(), minlength=len(bias)))
            load = np.bincount(biased.ravel(), minlength=len(bias))
            rows.append(
                {
                    "layer": i,
                    "experts": len(bias),
                    "bias_min": float(bias.min()),
                    "bias_max": float(bias.max()),
                    "topk_changed": float(np.mean(np.any(biased != raw, axis=-1))),
                    "maxvio": float(load.max() / load.mean() - 1),
                    "tokens": int(x.shape[0]),
                }
            )
    return rows, source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="checkpoint folder (config.json, index, shards)")
    parser.add_argument("--layers", help="comma-separated layer indices (default: all MoE)")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--hidden", help=".npy [T, d] or .npz with layer_<i> [T, d] arrays")
    given.add_argument("--token-ids", help="comma-separated token ids")
    given.add_argument("--text", help="text, tokenized with FOLDER/tokenizer.json")
    parser.add_argument("--router-only", action="store_true", help="read only gate and bias")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        rows, source = audit(args)
    except UsageError as err:
        print(f"checkpoint_audit: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"inputs": source, "layers": rows}))
        return 0
    print(f"{args.folder}: {rows[0]['tokens']} tokens ({source})\n")
    print("| layer | experts | bias min | bias max | top-k changed by bias | MaxVio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['layer']} | {r['experts']} | {r['bias_min']:+.4f} | {r['bias_max']:+.4f} | "
            f"{r['topk_changed']:.1%} | {r['maxvio']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
