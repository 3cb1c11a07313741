"""SwiGLU feed-forward math with fused gate/up weights: pure array functions, no Flax.

A SwiGLU FFN (Shazeer, "GLU Variants Improve Transformer", arXiv 2002.05202) is

.. math::  \\mathrm{FFN}(x) = (\\mathrm{silu}(x W_g) \\odot x W_u) W_o

Gate and up projections are stored side by side in one weight ``w_in [d_model, 2*d_ff]``
(gate columns first, then up: the order of Hugging Face's ``gate_up_proj``), so one
matmul computes both. Routed experts stack that weight over experts: ``w_in_edf``
``[E, d_model, 2*d_ff]`` and ``w_out_efd`` ``[E, d_ff, d_model]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["swiglu", "swiglu_ffn"]


def swiglu(h_mf2: jax.Array) -> jax.Array:
    """``silu(gate) * up`` from the fused projection ``h = x @ w_in`` of width ``2*d_ff``.

    Args:
      h_mf2: ``[..., 2*d_ff]``, gate half first.

    Returns:
      ``[..., d_ff]`` in the input dtype.
    """
    gate, up = jnp.split(h_mf2, 2, axis=-1)
    return jax.nn.silu(gate) * up


def swiglu_ffn(x_td: jax.Array, w_in_df2: jax.Array, w_out_fd: jax.Array) -> jax.Array:
    """A dense SwiGLU FFN on every token (shared experts, and the dense baseline).

    Args:
      x_td: ``[T, d_model]``.
      w_in_df2: ``[d_model, 2*d_ff]`` fused gate/up weight.
      w_out_fd: ``[d_ff, d_model]``.

    Returns:
      ``[T, d_model]`` in ``x_td``'s dtype.
    """
    h_tf2 = jnp.einsum("td,df->tf", x_td, w_in_df2)
    return jnp.einsum("tf,fd->td", swiglu(h_tf2), w_out_fd)
