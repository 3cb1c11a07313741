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

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sigmoid_moe.balancing import expert_load
from sigmoid_moe.harness.data import Corpus
from sigmoid_moe.harness.distributed import fetch, global_batch, replicated
from sigmoid_moe.metrics import idle_experts, max_violation, uniform_maxvio_floor

__all__ = [
    "batch_size_curve",
    "domain_losses",
    "evaluate",
    "specialisation",
    "validation_loss",
    "validation_losses",
]

EVAL_BATCH = 32
CHUNK_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@nnx.jit
def _forward_jit(model, tokens_bs1, real_b):
    tokens_bs1 = tokens_bs1.astype(jnp.int32)
    mask_bs = jnp.broadcast_to(real_b[:, None], (tokens_bs1.shape[0], tokens_bs1.shape[1] - 1))
    out = model(tokens_bs1[:, :-1], mask_bs)
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, tokens_bs1[:, 1:])
    return replicated((ce.sum(axis=-1), out.aux.expert_load, out.aux.expert_ids))


def _forward(model, chunk: np.ndarray, real_b: np.ndarray, mesh):
    """Per-row summed cross-entropy ``[B]``, the layers' loads ``[L, E]`` (real rows only)
    and their routing ``expert_ids [L, B, S, k]``: the values the model returned, on the
    host. On a mesh each process places its own rows of the batch."""
    tokens = global_batch(lambda a, b: chunk[a:b], chunk.shape, mesh)
    real = global_batch(lambda a, b: real_b[a:b], real_b.shape, mesh)
    return fetch(_forward_jit(model, tokens, real))


def _batches(windows: np.ndarray, mesh):
    """``(chunk, real rows, real_b)`` batches of ``EVAL_BATCH`` rows, rounded up to a
    multiple of the mesh's devices so that every batch splits over them."""
    devices = 1 if mesh is None else mesh.devices.size
    size = -(-EVAL_BATCH // devices) * devices
    for start in range(0, windows.shape[0], size):
        chunk = windows[start : start + size]
        real = chunk.shape[0]
        if real < size:  # fixed shape, one compilation; padded rows are masked out
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - real, axis=0)])
        yield chunk, real, np.arange(size) < real


def _window_ce(model, windows: np.ndarray, mesh) -> np.ndarray:
    """``[N]`` summed next-byte cross-entropy (nats) of each window."""
    rows = []
    for chunk, real, real_b in _batches(windows, mesh):
        ce, _, _ = _forward(model, chunk, real_b, mesh)
        rows.append(np.asarray(ce[:real], np.float64))
    return np.concatenate(rows)


def validation_loss(model, windows: np.ndarray, mesh=None) -> float:
    """Mean next-byte cross-entropy (nats) over ``windows [N, S+1]`` (``mesh``: the one the
    model lives on, None for one device)."""
    return float(_window_ce(model, windows, mesh).sum()) / (windows.size - windows.shape[0])


def domain_losses(window_ce: np.ndarray, corpus: Corpus) -> dict[str, float]:
    """Mean cross-entropy per byte of each domain's validation windows, from the windows'
    summed cross-entropy ``[N_val]``."""
    per_window = corpus.val.shape[1] - 1
    return {
        name: float(window_ce[corpus.val_domain == d].sum())
        / (per_window * int(np.sum(corpus.val_domain == d)))
        for d, name in enumerate(corpus.domains)
    }


def validation_losses(model, corpus: Corpus, mesh=None) -> dict:
    """``{"val_loss", "val_loss_per_domain": {domain: loss}}`` over every validation window
    of ``corpus`` (nats per byte): the windows :func:`evaluate` measures."""
    window_ce = _window_ce(model, corpus.val, mesh)
    return {
        "val_loss": float(window_ce.sum()) / (corpus.val.size - corpus.val.shape[0]),
        "val_loss_per_domain": domain_losses(window_ce, corpus),
    }


def _chunk_loads(ids_ltk: jax.Array, num_experts: int, size: int) -> jax.Array:
    """``[L, chunks, E]`` loads of consecutive chunks of ``size`` tokens."""
    num_layers, tokens, top_k = ids_ltk.shape
    chunks = tokens // size
    ids = ids_ltk[:, : chunks * size].reshape(num_layers * chunks, size, top_k)
    loads = jax.vmap(lambda i: expert_load(i, num_experts))(ids)
    return loads.reshape(num_layers, chunks, num_experts)


@functools.partial(jax.jit, static_argnames=("num_experts", "sizes"))
def _curve_maxvio(ids_ltk: jax.Array, num_experts: int, sizes: tuple[int, ...]) -> jax.Array:
    """``[len(sizes)]`` mean MaxVio of the chunks of each size: one compiled program for
    the whole curve (op by op, every size compiled a dozen primitives of its own)."""
    return jnp.stack(
        [jnp.mean(max_violation(_chunk_loads(ids_ltk, num_experts, size))) for size in sizes]
    )


@functools.partial(jax.jit, static_argnames="num_experts")
def _window_loads(ids_lnsk: jax.Array, num_experts: int) -> jax.Array:
    """``[L, N, E]`` load of each window from ``expert_ids [L, N, S, k]``."""
    return jax.vmap(jax.vmap(lambda ids: expert_load(ids, num_experts)))(ids_lnsk)


def batch_size_curve(ids_ltk: np.ndarray, num_experts: int, sizes=CHUNK_SIZES) -> dict:
    """Mean MaxVio (over chunks and layers) of the tokens cut into batches of ``b``.

    Args:
      ids_ltk: ``[L, T, k]`` expert ids of ``T`` tokens in validation order.
    Returns:
      ``{"sizes": [...], "maxvio": [...], "floor": [...]}`` for each ``b <= T``.
    """
    _, tokens, top_k = ids_ltk.shape
    kept = []
    for size in sizes:
        if tokens // size < 1:
            break
        kept.append(int(size))
    if not kept:
        return {"sizes": [], "maxvio": [], "floor": []}
    vio = _curve_maxvio(jnp.asarray(ids_ltk, jnp.int32), int(num_experts), tuple(kept))
    return {
        "sizes": kept,
        "maxvio": [float(v) for v in np.asarray(vio)],
        "floor": [uniform_maxvio_floor(size, num_experts, top_k) for size in kept],
    }


def _loads_and_ids(model, windows: np.ndarray, mesh):
    """Each window's summed cross-entropy ``[N]``, the summed ``[L, E]`` load and
    ``expert_ids [L, N, S, k]`` of ``windows [N, S+1]``, as the layers returned them (bias
    frozen)."""
    window_ce, load_le, ids = [], 0, []
    for chunk, real, real_b in _batches(windows, mesh):
        ce, chunk_load, chunk_ids = _forward(model, chunk, real_b, mesh)
        window_ce.append(np.asarray(ce[:real], np.float64))
        load_le = load_le + np.asarray(chunk_load, np.int64)
        ids.append(np.asarray(chunk_ids)[:, :real])  # [L, real, S, k]
    return np.concatenate(window_ce), load_le, np.concatenate(ids, axis=1)


def _mutual_information_bits(joint_lde: np.ndarray) -> np.ndarray:
    """``I(domain; expert)`` in bits per layer from joint counts ``[L, D, E]``."""
    joint = joint_lde / np.maximum(joint_lde.sum(axis=(1, 2), keepdims=True), 1)
    p_d = joint.sum(axis=2, keepdims=True)
    p_e = joint.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(joint > 0, joint * np.log2(joint / (p_d * p_e)), 0.0)
    return terms.sum(axis=(1, 2))


def specialisation(window_load_lne: np.ndarray, window_domain: np.ndarray, shuffles: int = 8):
    """Mutual information between a token's domain and the experts it is routed to.

    ``I(D; X) = sum_{d,e} p(d,e) log2(p(d,e) / (p(d) p(e)))`` over the routed assignments,
    per layer, in bits (0: every domain uses the experts alike; at most ``H(D)``, 1 bit for
    two equal domains). A finite sample shows a small positive MI even when routing ignores
    the domain, so the floor is the mean MI after shuffling the windows' domain labels
    (``shuffles`` seeded permutations, which keep each window's own correlations).

    Args:
      window_load_lne: ``[L, N, E]`` int loads of each validation window.
      window_domain: ``[N]`` int domain of each window.

    Returns:
      ``(mi_per_layer [L], floor)``, both in bits.
    """
    domains = int(window_domain.max()) + 1

    def joint(labels):
        onehot = np.eye(domains, dtype=np.int64)[labels]  # [N, D]
        return np.einsum("nd,lne->lde", onehot, window_load_lne)

    mi = _mutual_information_bits(joint(window_domain))
    rng = np.random.default_rng(0)
    floor = np.mean(
        [
            _mutual_information_bits(joint(rng.permutation(window_domain))).mean()
            for _ in range(shuffles)
        ]
    )
    return mi, float(floor)


def evaluate(model, corpus: Corpus, *, mesh=None, train_sample_seed: int = 0) -> dict:
    """Everything measured with the bias frozen, on the validation set and on a sample of
    training windows of the same size.

    The loads are the ones the layers return (exact int32, summed over batches) and the
    routing is the one they used (``MoEAux.expert_ids``); nothing is routed again.

    Returns a JSON-ready dict: ``val_loss`` with ``val_loss_per_domain`` (nats per byte),
    ``val_ppl`` (per byte), ``val_bits_per_byte``, ``val_tokens``; ``maxvio_global`` (mean
    over layers) with ``maxvio_global_per_layer`` and ``maxvio_global_floor``;
    ``maxvio_global_train`` (+ ``_per_layer``): the same on training windows, so a
    distribution shift shows as a gap, not as imbalance;
    ``dead_experts_per_layer`` (zero validation load); ``load_fraction [L][E]``;
    ``domain_fraction {domain: [L][E]}`` and ``domain_tokens``; ``specialisation_mi_per_layer``
    with its ``specialisation_mi_floor`` (:func:`specialisation`); ``batch_curve``.
    ``mesh``: the one the model lives on (call it under ``distributed.mesh_context``).
    """
    window_ce, load_le, ids_lnsk = _loads_and_ids(model, corpus.val, mesh)
    num_layers, n, s, top_k = ids_lnsk.shape
    num_experts = load_le.shape[-1]
    tokens = n * s
    vio = np.asarray(max_violation(jnp.asarray(load_le)), np.float64)
    window_load = np.asarray(_window_loads(jnp.asarray(ids_lnsk), num_experts), np.int64)
    domain_fraction, domain_tokens = {}, {}
    for d, name in enumerate(corpus.domains):
        dl = window_load[:, corpus.val_domain == d].sum(axis=1).astype(np.float64)
        domain_fraction[name] = (
            (dl / np.maximum(dl.sum(axis=-1, keepdims=True), 1)).round(5).tolist()
        )
        domain_tokens[name] = int(np.sum(corpus.val_domain == d)) * s
    mi, mi_floor = specialisation(window_load, corpus.val_domain)
    rng = np.random.default_rng(train_sample_seed)
    sample = np.sort(
        rng.choice(corpus.train.shape[0], size=min(n, corpus.train.shape[0]), replace=False)
    )
    _, train_load, _ = _loads_and_ids(model, corpus.train[sample], mesh)
    train_vio = np.asarray(max_violation(jnp.asarray(train_load)), np.float64)
    val_loss = float(window_ce.sum()) / tokens
    return {
        "val_loss": val_loss,
        "val_loss_per_domain": domain_losses(window_ce, corpus),
        "val_ppl": float(np.exp(val_loss)),
        "val_bits_per_byte": val_loss / np.log(2),
        "val_tokens": int(tokens),
        "maxvio_global": float(vio.mean()),
        "maxvio_global_per_layer": vio.tolist(),
        "maxvio_global_floor": uniform_maxvio_floor(int(tokens), num_experts, top_k),
        "maxvio_global_train": float(train_vio.mean()),
        "maxvio_global_train_per_layer": train_vio.tolist(),
        "dead_experts_per_layer": np.asarray(idle_experts(jnp.asarray(load_le))).tolist(),
        "load_fraction": (load_le / load_le.sum(axis=-1, keepdims=True)).round(5).tolist(),
        "domain_fraction": domain_fraction,
        "domain_tokens": domain_tokens,
        "specialisation_mi_per_layer": mi.tolist(),
        "specialisation_mi_floor": mi_floor,
        "batch_curve": batch_size_curve(ids_lnsk.reshape(num_layers, tokens, top_k), num_experts),
    }
