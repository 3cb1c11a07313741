"""Helpers shared by the dispatch paths (:mod:`sigmoid_moe.dispatch`,
:mod:`sigmoid_moe.expert_parallel`) and the CPU kernel (:mod:`sigmoid_moe.blocked_ffn`).

Internal: pure array functions and argument checks, no Flax, no import of the modules that
use them. Public names of the dispatch API live in :mod:`sigmoid_moe.dispatch`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sigmoid_moe._checks import check_token_mask, require_int

__all__ = ["check_block_size", "check_dispatch_args", "gather_rows", "resolve_kernel"]


def check_dispatch_args(x_td, expert_ids_tk, weights_tk, w_in_edf, w_out_efd, token_mask_t):
    """Shapes and dtypes of the one dispatch signature; raises naming the argument."""
    if not jnp.issubdtype(jnp.result_type(x_td), jnp.floating):
        raise TypeError(f"x_td must be floating, got dtype {jnp.result_type(x_td)}.")
    if jnp.ndim(x_td) != 2:
        raise ValueError(f"x_td must be [tokens, d_model], got shape {jnp.shape(x_td)}.")
    num_tokens, d_model = jnp.shape(x_td)
    if jnp.ndim(expert_ids_tk) != 2 or jnp.shape(expert_ids_tk)[0] != num_tokens:
        raise ValueError(
            f"expert_ids_tk must be [tokens={num_tokens}, k], got {jnp.shape(expert_ids_tk)}."
        )
    if not jnp.issubdtype(jnp.result_type(expert_ids_tk), jnp.integer):
        raise TypeError(f"expert_ids_tk must be integer, got {jnp.result_type(expert_ids_tk)}.")
    if jnp.shape(weights_tk) != jnp.shape(expert_ids_tk):
        raise ValueError(
            f"weights_tk {jnp.shape(weights_tk)} must match expert_ids_tk "
            f"{jnp.shape(expert_ids_tk)}."
        )
    if jnp.ndim(w_in_edf) != 3 or jnp.shape(w_in_edf)[1] != d_model or jnp.shape(w_in_edf)[2] % 2:
        raise ValueError(
            f"w_in_edf must be [E, d_model={d_model}, 2*d_ff], got {jnp.shape(w_in_edf)}."
        )
    num_experts, _, two_ff = jnp.shape(w_in_edf)
    if jnp.shape(w_out_efd) != (num_experts, two_ff // 2, d_model):
        raise ValueError(
            f"w_out_efd must be [E, d_ff, d_model] = {(num_experts, two_ff // 2, d_model)}, "
            f"got {jnp.shape(w_out_efd)}."
        )
    if token_mask_t is not None:
        check_token_mask(token_mask_t, (num_tokens,), "token_mask_t")


def check_block_size(block_size) -> None:
    """Rows per block of the blocked kernel: an int >= 1 (128 is usual)."""
    require_int("block_size", block_size, 1)


def resolve_kernel(kernel: str, choices: tuple[str, ...], gpu_choice: str) -> str:
    """``kernel``, checked against ``choices`` (the Literal's args), with "auto" resolved."""
    if kernel not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"kernel={kernel!r} is not supported here; choose {options}.")
    if kernel != "auto":
        return kernel
    # XLA:CPU lowers ragged_dot to a dense masked matmul over all E experts (E times the
    # FLOPs; its gradient at T8192/E64 asked for 38 GB), and large fresh buffers cost more
    # than the GEMMs' memory traffic there, so CPU runs the fused blocked scan.
    return "blocked" if jax.default_backend() == "cpu" else gpu_choice


def gather_rows(rows_nd: jax.Array, index_p: jax.Array) -> jax.Array:
    """``rows_nd[index_p]`` along axis 0, with an index ``>= N`` reading a zero row."""
    return jnp.take(rows_nd, index_p, axis=0, mode="fill", fill_value=0)
