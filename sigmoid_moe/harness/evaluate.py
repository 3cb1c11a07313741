"""Evaluation with the bias frozen: validation loss, global load, per-domain load, and
MaxVio over computation-batch sizes.

MaxVio_global (Loss-Free Balancing, arXiv 2408.15664 section 4.1) is the MaxVio of the
load summed over the whole validation set; MaxVio over computation batches (its Fig. 5)
chunks the validation tokens, in order, into batches of ``b`` tokens and averages the
MaxVio of each chunk. Each is reported next to :func:`uniform_maxvio_floor` at the same
token count: what perfectly uniform random routing would show.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sigmoid_moe.harness.data import Corpus
from sigmoid_moe.metrics import uniform_maxvio_floor

__all__ = [
    "batch_size_curve",
    "eval_subset",
    "evaluate",
    "maxvio_np",
    "validation_loss",
]

EVAL_BATCH = 32
CHUNK_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def eval_subset(corpus: Corpus, num_windows: int) -> np.ndarray:
    """``num_windows`` validation windows spread evenly over all domains (fixed)."""
    n = corpus.val.shape[0]
    index = np.unique(np.linspace(0, n - 1, min(num_windows, n)).round().astype(int))
    return corpus.val[index]


@functools.partial(nnx.jit, static_argnames="return_ids")
def _forward(model, tokens, return_ids: bool):
    tokens = tokens.astype(jnp.int32)
    out = model(tokens[:, :-1], return_ids=return_ids)
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, tokens[:, 1:])
    return ce.sum(axis=-1), out.expert_ids


def _batches(windows: np.ndarray):
    for start in range(0, windows.shape[0], EVAL_BATCH):
        chunk = windows[start : start + EVAL_BATCH]
        pad = EVAL_BATCH - chunk.shape[0]
        if pad:  # fixed shape, one compilation; padded rows are dropped below
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        yield chunk, EVAL_BATCH - pad


def validation_loss(model, windows: np.ndarray) -> float:
    """Mean next-byte cross-entropy (nats) over ``windows [N, S+1]``."""
    total, count = 0.0, 0
    for chunk, real in _batches(windows):
        ce, _ = _forward(model, jnp.asarray(chunk), False)
        total += float(np.asarray(ce)[:real].sum())
        count += real * (windows.shape[1] - 1)
    return total / count


def maxvio_np(load: np.ndarray) -> np.ndarray:
    """MaxVio over the last axis, NumPy."""
    load = np.asarray(load, np.float64)
    mean = load.mean(axis=-1)
    return np.where(mean > 0, (load.max(axis=-1) - mean) / np.where(mean > 0, mean, 1), 0.0)


def batch_size_curve(ids_ltk: np.ndarray, num_experts: int, sizes=CHUNK_SIZES) -> dict:
    """Mean MaxVio (over chunks and layers) of the tokens cut into batches of ``b``.

    Args:
      ids_ltk: ``[L, T, k]`` expert ids of ``T`` tokens in validation order.
    Returns:
      ``{"sizes": [...], "maxvio": [...], "floor": [...]}`` for each ``b <= T``.
    """
    num_layers, tokens, top_k = ids_ltk.shape
    out = {"sizes": [], "maxvio": [], "floor": []}
    for size in sizes:
        chunks = tokens // size
        if chunks < 1:
            break
        ids = ids_ltk[:, : chunks * size].reshape(num_layers, chunks, size * top_k)
        onehot = np.zeros((num_layers, chunks, num_experts), np.int64)
        for layer in range(num_layers):
            for c in range(chunks):
                onehot[layer, c] = np.bincount(ids[layer, c], minlength=num_experts)
        out["sizes"].append(int(size))
        out["maxvio"].append(float(maxvio_np(onehot).mean()))
        out["floor"].append(uniform_maxvio_floor(int(size), num_experts, top_k))
    return out


def evaluate(model, corpus: Corpus) -> dict:
    """Everything measured on the full validation set with the bias frozen.

    Returns a JSON-ready dict: ``val_loss``, ``val_ppl``, ``val_tokens``,
    ``maxvio_global`` (mean over layers) with ``maxvio_global_per_layer`` and
    ``maxvio_global_floor``; ``load_fraction [L][E]``; ``domain_fraction
    {domain: [L][E]}`` (which experts each domain uses); ``batch_curve``.
    """
    num_experts = model.config.num_experts
    top_k = model.config.top_k
    total, ids = 0.0, []
    for chunk, real in _batches(corpus.val):
        ce, chunk_ids = _forward(model, jnp.asarray(chunk), True)
        total += float(np.asarray(ce)[:real].sum())
        ids.append(np.asarray(chunk_ids)[:, :real])  # [L, real, S, k]
    ids_lnsk = np.concatenate(ids, axis=1)
    num_layers, n, s, _ = ids_lnsk.shape
    tokens = n * s
    ids_ltk = ids_lnsk.reshape(num_layers, tokens, top_k)
    load = np.stack(
        [np.bincount(ids_ltk[i].ravel(), minlength=num_experts) for i in range(num_layers)]
    )
    vio = maxvio_np(load)
    domain_fraction = {}
    for d, name in enumerate(corpus.domains):
        rows = ids_lnsk[:, corpus.val_domain == d].reshape(num_layers, -1)
        dl = np.stack([np.bincount(r, minlength=num_experts) for r in rows]).astype(np.float64)
        domain_fraction[name] = (dl / dl.sum(axis=-1, keepdims=True)).round(5).tolist()
    val_loss = total / tokens
    return {
        "val_loss": val_loss,
        "val_ppl": float(np.exp(val_loss)),
        "val_bits_per_byte": val_loss / np.log(2),
        "val_tokens": int(tokens),
        "maxvio_global": float(vio.mean()),
        "maxvio_global_per_layer": vio.tolist(),
        "maxvio_global_floor": uniform_maxvio_floor(int(tokens), num_experts, top_k),
        "load_fraction": (load / load.sum(axis=-1, keepdims=True)).round(5).tolist(),
        "domain_fraction": domain_fraction,
        "batch_curve": batch_size_curve(ids_ltk, num_experts),
    }
