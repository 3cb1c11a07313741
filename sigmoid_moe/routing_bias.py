"""The routing bias as its own NNX variable type, and its update across a whole model.

The bias is state, not a parameter: it gets no gradient, must stay out of the optimizer
(weight decay would shrink it every step) and must stay float32 under any dtype policy.
Giving it its own :class:`nnx.Variable` type makes all three hold by filter, with no path
strings or class-name matching::

    optimizer = nnx.Optimizer(model, optax.adamw(3e-4), wrt=nnx.Param)  # bias excluded
    ...
    (loss, loads_le), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
    optimizer.update(model, grads)
    apply_routing_bias_update(model, loads_le, rate=1e-3)            # once per step

The loads are values the layers *return* (``MoEAux.expert_load``), so eval forwards and
remat recomputation can never leak into the update: only what the train step passes in
counts.

References:
  Wang et al., Auxiliary-Loss-Free Load Balancing (arXiv 2408.15664), Algorithm 1.
  DeepSeek-V3 Technical Report (arXiv 2412.19437), section 2.1.2.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sigmoid_moe.balancing import BiasRule, Rate, update_bias

__all__ = ["RoutingBias", "apply_routing_bias_update", "routing_bias_update"]


class RoutingBias(nnx.Variable):
    """Per-expert selection bias ``[E]`` (float32), updated only by the bias rule."""


def _stack_loads(loads: jax.Array | Sequence[jax.Array]) -> jax.Array:
    if isinstance(loads, (list, tuple)):
        loads = jnp.stack([jnp.asarray(load) for load in loads])
    loads = jnp.asarray(loads)
    if loads.ndim == 1:  # one layer's [E]: a model with a single MoE layer
        loads = loads[None]
    if not jnp.issubdtype(loads.dtype, jnp.integer):
        raise TypeError(
            f"loads must be integer token counts (MoEAux.expert_load), got dtype {loads.dtype}."
        )
    return loads


def routing_bias_update(
    bias_state: nnx.State,
    loads: jax.Array | Sequence[jax.Array],
    *,
    rate: Rate,
    rule: BiasRule = "sign",
    step: jax.Array | int | None = None,
) -> nnx.State:
    """Pure: new bias state from per-layer loads (:func:`sigmoid_moe.update_bias` per layer).

    Args:
      bias_state: ``nnx.state(model, RoutingBias)``. Each leaf is ``[E]``, or ``[L, E]``
        for layers stacked for ``nnx.scan``.
      loads: ``[num_layers, E]`` integer loads (or a list of ``[E]``, or one ``[E]`` for
        a model with a single MoE layer), one row per bias row, in the order
        ``jax.tree.leaves(bias_state)`` lists them (for a list of layers: their index
        order). Sum micro-batches before passing them.
      rate, rule, step: as in :func:`sigmoid_moe.update_bias`.

    Returns:
      A state of the same structure with the updated float32 biases.
    """
    leaves, treedef = jax.tree.flatten(bias_state)
    if not leaves:
        raise ValueError("the state holds no RoutingBias variable; is this an MoE model?")
    loads_le = _stack_loads(loads)
    num_experts = leaves[0].shape[-1]
    rows = [leaf.reshape(-1, leaf.shape[-1]) for leaf in leaves]
    total = sum(row.shape[0] for row in rows)
    if loads_le.shape != (total, num_experts):
        raise ValueError(
            f"loads must be [num_layers, E] = ({total}, {num_experts}) for this model's "
            f"RoutingBias variables, got {loads_le.shape}."
        )
    new_leaves, start = [], 0
    for leaf, row in zip(leaves, rows, strict=True):
        stop = start + row.shape[0]
        updated = jax.vmap(lambda b, c: update_bias(b, c, rate=rate, rule=rule, step=step))(
            row, loads_le[start:stop]
        )
        new_leaves.append(updated.reshape(leaf.shape))
        start = stop
    return jax.tree.unflatten(treedef, new_leaves)


def apply_routing_bias_update(
    model: nnx.Module,
    loads: jax.Array | Sequence[jax.Array],
    *,
    rate: Rate,
    rule: BiasRule = "sign",
    step: jax.Array | int | None = None,
) -> None:
    """Updates every :class:`RoutingBias` of ``model`` in place (call after the optimizer)."""
    state = nnx.state(model, RoutingBias)
    nnx.update(model, routing_bias_update(state, loads, rate=rate, rule=rule, step=step))
