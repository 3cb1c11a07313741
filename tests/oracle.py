"""Independent float64 NumPy oracles: slow, obvious loops that define the semantics."""

from __future__ import annotations

import math

import numpy as np


def _rank_desc(values: np.ndarray) -> list[int]:
    """Indices by value descending, ties to the lower index (Python's sort is stable)."""
    return sorted(range(len(values)), key=lambda i: -values[i])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.where(
        x >= 0, 1 / (1 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1 + np.exp(-np.abs(x)))
    )


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def route_one(
    logits: np.ndarray,
    bias: np.ndarray,
    *,
    top_k: int,
    score_fn: str = "sigmoid",
    bias_mode: str = "selection",
    normalize: bool = True,
    route_scale: float = 1.0,
    num_groups: int = 1,
    topk_groups: int = 1,
    group_score: str = "top2_sum",
) -> tuple[list[int], list[float]]:
    """Routes one token ``logits [E]``; returns (expert ids, weights)."""
    logits = logits.astype(np.float64)
    bias = bias.astype(np.float64)
    num_experts = len(logits)
    gate = _sigmoid if score_fn == "sigmoid" else _softmax
    if bias_mode == "selection":
        scores = gate(logits)
        selection = scores + bias
        group_basis = selection
    else:
        scores = gate(logits + bias)
        selection = scores
        group_basis = scores
    if num_groups > 1 and topk_groups < num_groups:
        size = num_experts // num_groups
        group_values = []
        for g in range(num_groups):
            members = sorted(group_basis[g * size : (g + 1) * size], reverse=True)
            if group_score == "max":
                n = 1
            elif group_score == "top2_sum":
                n = min(2, size)
            else:
                n = min(top_k // topk_groups, size)
            group_values.append(sum(members[:n]))
        kept = set(_rank_desc(np.array(group_values))[:topk_groups])
        selection = np.array(
            [selection[e] if e // size in kept else -np.inf for e in range(num_experts)]
        )
    chosen = _rank_desc(selection)[:top_k]
    picked = [scores[e] for e in chosen]
    if normalize:
        if sum(picked) > 0:
            weights = [p / sum(picked) for p in picked]
        else:  # every picked sigmoid underflowed even in float64: use log space
            logs = [
                -math.log1p(math.exp(-(logits + (bias if bias_mode == "logit" else 0))[e]))
                for e in chosen
            ]
            top = max(logs)
            weights = [math.exp(v - top) / sum(math.exp(u - top) for u in logs) for v in logs]
    else:
        weights = picked
    return chosen, [w * route_scale for w in weights]


def route(logits: np.ndarray, bias: np.ndarray, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Routes ``logits [..., E]`` token by token."""
    flat = logits.reshape(-1, logits.shape[-1])
    ids, weights = zip(*(route_one(row, bias, **kwargs) for row in flat), strict=True)
    k = kwargs["top_k"]
    return (
        np.array(ids, np.int64).reshape(*logits.shape[:-1], k),
        np.array(weights, np.float64).reshape(*logits.shape[:-1], k),
    )


def reference_router(token_embeddings, expert_weights, expert_bias, top_k):
    """The reference problem's semantics, written from its description (pure Python)."""
    indices, weights = [], []
    for token in token_embeddings:
        scored = []
        for e, w in enumerate(expert_weights):
            z = expert_bias[e] + sum(a * b for a, b in zip(token, w, strict=True))
            z = max(-500.0, min(500.0, z))
            scored.append((1.0 / (1.0 + math.exp(-z)), e))
        scored.sort(key=lambda pair: -pair[0])
        best = scored[:top_k]
        total = sum(v for v, _ in best) or 1.0
        indices.append([e for _, e in best])
        weights.append([v / total for v, _ in best])
    return indices, weights


def expert_load(expert_ids: np.ndarray, num_experts: int, token_mask=None) -> np.ndarray:
    counts = np.zeros(num_experts, np.int64)
    ids = expert_ids.reshape(-1, expert_ids.shape[-1])
    mask = np.ones(len(ids), bool) if token_mask is None else np.asarray(token_mask).reshape(-1)
    for row, keep in zip(ids, mask, strict=True):
        if keep:
            for e in row:
                counts[e] += 1
    return counts


def update_bias(bias: np.ndarray, load: np.ndarray, rate: float, rule: str) -> np.ndarray:
    from fractions import Fraction

    mean = Fraction(int(load.sum()), len(load))  # exact
    new = bias.astype(np.float64).copy()
    signs = np.array([(mean > c) - (mean < c) for c in load.tolist()], np.float64)
    if rule == "sign":
        new += rate * signs
    elif rule == "sign_zero_mean":
        new += rate * (signs - signs.mean())
    elif rule == "proportional":
        new += rate * np.array([float((mean - c) / mean) if mean else 0.0 for c in load.tolist()])
    return new


def max_violation(load: np.ndarray) -> float:
    mean = load.mean()
    return float((load.max() - mean) / mean) if mean else 0.0
