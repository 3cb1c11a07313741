"""The routing bias and the load that moves it, as NNX variable types, joined by structure.

The bias is state, not a parameter: it gets no gradient, must stay out of the optimizer
(weight decay would shrink it every step) and must stay float32 under any dtype policy.
Giving it its own :class:`nnx.Variable` type makes all three hold by filter, with no path
strings or class-name matching.

Each :class:`~sigmoid_moe.MoELayer` records the tokens it routed as an
:class:`ExpertLoad` next to its :class:`RoutingBias`, but only inside
``nnx.capture(..., ExpertLoad)``. The captured loads come back as an ``nnx.State`` with
the model's own structure, so every layer's load meets its own layer's bias by path,
whatever the model looks like (a list of blocks, a dict, ``layer0 .. layer11``
attributes, an encoder/decoder pair, an ``nnx.scan`` stack)::

    optimizer = nnx.Optimizer(model, optax.adamw(3e-4), wrt=nnx.Param)  # bias excluded

    def loss_fn(model, batch):
        logits, loads = nnx.capture(model, ExpertLoad)(batch)    # loads: nnx.State
        return loss(logits, batch), loads

    (loss, loads), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
    optimizer.update(model, grads)
    apply_routing_bias_update(model, loads, rate=1e-3)           # once per step

What counts is what the train step captures: an uncaptured forward (evaluation) records
nothing, and remat recomputation in the backward pass does not run the capture again.
With gradient accumulation, sum the micro-batches' loads first (exact int32)::

    loads = jax.tree.map(jnp.add, loads_micro_1, loads_micro_2)

References:
  Wang et al., Auxiliary-Loss-Free Load Balancing (arXiv 2408.15664), Algorithm 1.
  DeepSeek-V3 Technical Report (arXiv 2412.19437), section 2.1.2.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigmoid_moe._checks import concrete_value
from sigmoid_moe.balancing import INT32_MAX, BiasRule, Rate, update_bias

__all__ = [
    "ExpertLoad",
    "RoutingBias",
    "apply_routing_bias_update",
    "record_load",
    "routing_bias_update",
]


class RoutingBias(nnx.Variable):
    """Per-expert selection bias ``[E]`` (float32; ``[L, E]`` when stacked for
    ``nnx.scan``), moved only by :func:`routing_bias_update`."""


class ExpertLoad(nnx.Variable):
    """Tokens routed per expert ``[E]`` int32 (``[L, E]`` when stacked), recorded by a
    layer inside ``nnx.capture(fn, ExpertLoad)`` and summed over calls of that layer."""


def record_load(module: nnx.Module, load_e: jax.Array, name: str = "expert_load") -> None:
    """Records ``load_e`` as ``module``'s :class:`ExpertLoad` when a capture is running.

    Several calls of one module in a capture sum their loads (int32). Outside
    ``nnx.capture(..., ExpertLoad)`` nothing is recorded and the module is not changed, so
    evaluation forwards never count. (flax marks a module under capture with its
    ``__captures__`` attribute; without it ``Module.sow`` would set a new attribute.)
    """
    if not hasattr(module, "__captures__"):
        return
    module.sow(
        ExpertLoad,
        name,
        jnp.asarray(load_e, jnp.int32),
        reduce_fn=operator.add,
        init_fn=lambda: jnp.zeros(jnp.shape(load_e), jnp.int32),
    )


def _by_module(state: nnx.State, kind: type[nnx.Variable], what: str) -> dict:
    """``{module path: array}`` of the ``kind`` variables of ``state`` (one per module)."""
    out = {}
    for path, leaf in nnx.to_flat_state(state):
        if not isinstance(leaf, kind):
            raise TypeError(
                f"{what} must hold only {kind.__name__} variables, got {type(leaf).__name__} "
                f"at {'.'.join(map(str, path))}."
            )
        module = tuple(path[:-1])
        if module in out:
            raise ValueError(
                f"{what} has two {kind.__name__} variables in module "
                f"{_path_str(module)}; one bias and one load per MoE layer are expected."
            )
        out[module] = leaf[...]
    return out


def _path_str(path: tuple) -> str:
    return ".".join(map(str, path)) or "<root>"


def _check_state(value, kind: type[nnx.Variable], what: str, how: str) -> None:
    if not isinstance(value, nnx.State):
        raise TypeError(
            f"{what} must be an nnx.State of {kind.__name__} ({how}), got {type(value).__name__}."
        )


def _check_concrete_load(load, where: str) -> None:
    """A load known before tracing is checked here, before the per-layer ``vmap`` hides its
    values from :func:`sigmoid_moe.update_bias` (which would clamp them silently): integer
    counts, none negative, each layer's (or group's) total below ``2**31``."""
    dtype = jnp.result_type(load)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"the load of {where} must be integer token counts, got dtype {dtype}; record it "
            "with nnx.capture(model, ExpertLoad)."
        )
    concrete = concrete_value(load)
    if concrete is None:
        return
    if (concrete < 0).any():
        raise ValueError(
            f"the load of {where} holds negative counts {concrete[concrete < 0].tolist()[:8]}; "
            "a load counts the tokens routed to each expert."
        )
    total = int(np.max(concrete.astype(np.uint64).sum(axis=-1), initial=0))
    if total > INT32_MAX:
        raise ValueError(
            f"the load of {where} sums to {total} assignments, beyond the int32 counts the "
            "update is exact for (< 2**31 per step)."
        )


def routing_bias_update(
    bias_state: nnx.State,
    loads: nnx.State,
    *,
    rate: Rate,
    rule: BiasRule = "sign",
    step: jax.Array | int | None = None,
) -> nnx.State:
    """Pure: the new bias state, each layer's bias moved by its own layer's load.

    Biases and loads are joined by module path (``blocks.3.moe``), never by position, and
    each pair goes through :func:`sigmoid_moe.update_bias` (vmapped over the layer axis of
    ``nnx.scan``-stacked ``[L, E]`` leaves).

    Args:
      bias_state: ``nnx.state(model, RoutingBias)``.
      loads: the :class:`ExpertLoad` state from ``nnx.capture(model, ExpertLoad)(...)``
        (summed over micro-batches with ``jax.tree.map(jnp.add, ...)`` before passing it:
        the global scope). A load leaf may carry a group axis before ``E`` (``[G, E]``,
        e.g. micro-batches stacked, or sequences): then each group's step is taken and the
        steps averaged (:func:`sigmoid_moe.update_bias`), a narrower balancing scope.
      rate, rule, step: as in :func:`sigmoid_moe.update_bias`.

    Returns:
      A state of the same structure as ``bias_state`` with the updated float32 biases.

    Raises:
      ValueError: the two states do not pair up (a bias without a load, a load without a
        bias, or different shapes); the message lists both structures. Also a load known
        before tracing that holds a negative count or sums past ``2**31`` (named by its
        module path); inside jit such counts are clamped as in :func:`update_bias`.
      TypeError: a load that is not integer.
    """
    _check_state(bias_state, RoutingBias, "bias_state", "nnx.state(model, RoutingBias)")
    _check_state(loads, ExpertLoad, "loads", "nnx.capture(model, ExpertLoad)(...)")
    biases = _by_module(bias_state, RoutingBias, "bias_state")
    counts = _by_module(loads, ExpertLoad, "loads")
    if not biases:
        raise ValueError("bias_state holds no RoutingBias variable; is this an MoE model?")

    def pairs(bias_shape, load_shape):  # [..., E] with [..., E] or [..., G, E]
        return load_shape == bias_shape or (
            len(load_shape) == len(bias_shape) + 1
            and load_shape[:-2] == bias_shape[:-1]
            and load_shape[-1] == bias_shape[-1]
        )

    mismatched = set(biases) ^ set(counts) or {
        m for m in biases if not pairs(jnp.shape(biases[m]), jnp.shape(counts[m]))
    }
    if mismatched:

        def listing(table):
            rows = sorted(table.items(), key=lambda item: tuple(map(str, item[0])))
            return ", ".join(f"{_path_str(m)} {tuple(jnp.shape(v))}" for m, v in rows)

        raise ValueError(
            "loads do not pair up with the biases by module path (mismatch at "
            f"{', '.join(sorted(map(_path_str, mismatched)))}).\n"
            f"  biases: {listing(biases)}\n  loads:  {listing(counts)}\n"
            "Capture the loads from the same model: nnx.capture(model, ExpertLoad)(...), "
            "with every MoE layer called."
        )

    for module, load in counts.items():
        _check_concrete_load(load, _path_str(module))

    def update(bias, load):
        num_experts = bias.shape[-1]
        rows = bias.reshape(-1, num_experts)
        load = load.reshape(rows.shape[0], *load.shape[bias.ndim - 1 :])  # [rows, (G,) E]
        new_rows = jax.vmap(lambda b, c: update_bias(b, c, rate=rate, rule=rule, step=step))(
            rows, load
        )
        return new_rows.reshape(bias.shape)

    new = {m: update(biases[m], counts[m]) for m in biases}

    def replace(path, variable):
        return variable.replace(new[tuple(path[:-1])])

    return nnx.map_state(replace, bias_state)


def apply_routing_bias_update(
    model: nnx.Module,
    loads: nnx.State,
    *,
    rate: Rate,
    rule: BiasRule = "sign",
    step: jax.Array | int | None = None,
) -> None:
    """In place: every :class:`RoutingBias` of ``model`` moved by its layer's load.

    Call it after the optimizer step, with the loads captured in that step (see the module
    docstring). Equal to ``nnx.update(model, routing_bias_update(nnx.state(model,
    RoutingBias), loads, ...))``.
    """
    state = nnx.state(model, RoutingBias)
    nnx.update(model, routing_bias_update(state, loads, rate=rate, rule=rule, step=step))
