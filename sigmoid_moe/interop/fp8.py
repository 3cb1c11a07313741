"""Block-wise FP8 (e4m3) weights as DeepSeek-V3 stores them, in NumPy (ml_dtypes' float8).

A weight ``W [R, C]`` is stored as ``float8_e4m3fn`` codes ``Q`` and a float32
``scale_inv [ceil(R/br), ceil(C/bc)]``, one per ``br x bc`` block (``weight_block_size``,
128 x 128 for DeepSeek-V3 / R1 and Kimi K2; edge blocks are smaller)::

    W[i, j] = Q[i, j] * scale_inv[i // br, j // bc]

Quantisation (:func:`quantize_blocks`) picks ``scale_inv = amax(|block|) / 448`` (448 is
e4m3's largest finite value; an all-zero block gets 1) and rounds ``W / scale_inv`` to the
nearest e4m3 value. e4m3 has 3 mantissa bits, so the round trip obeys, element by element,
with ``s`` the block's stored float32 ``scale_inv``::

    |dequant(quant(W)) - W| <= 2**-4 * |W| + 2**-10 * s    # FP8_RELATIVE_ERROR, FP8_SUBNORMAL_STEP

``2**-4`` is half an ulp relative to a normal value; ``2**-10 * s`` is half the spacing of
e4m3's subnormals (``2**-9``), which covers values below ``2**-6 * s``. The scale's own
rounding to float32 does not enter: the bound is stated against the stored ``s``. Both
float32 steps (``W / s`` and ``Q * s``) add at most ``2**-23 * |W|``, and a cast to
bfloat16 afterwards adds its own ``2**-9`` relative rounding.

A 3-D ``[E, R, C]`` tensor (the fused expert layout) has blocks over its last two axes,
one scale grid per leading index: ``scale_inv [E, ceil(R/br), ceil(C/bc)]``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "FP8_RELATIVE_ERROR",
    "FP8_SUBNORMAL_STEP",
    "dequantize_blocks",
    "quantize_blocks",
    "scale_shape",
]

FP8_DTYPE = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448.0
FP8_RELATIVE_ERROR = 2.0**-4  # half an ulp of a normal e4m3 value (3 mantissa bits)
FP8_SUBNORMAL_STEP = 2.0**-10  # half e4m3's subnormal spacing 2**-9, in units of the scale


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """Shape of ``scale_inv`` for a weight of ``shape`` (2-D, or 3-D with leading experts)."""
    *lead, rows, cols = shape
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


def _check(shape: tuple[int, ...], block: tuple[int, int]) -> None:
    if len(shape) not in (2, 3):
        raise ValueError(f"block-wise FP8 needs a 2-D or 3-D weight, got shape {shape}.")
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"block must be two positive ints (rows, cols), got {block}.")


def dequantize_blocks(
    q: np.ndarray,
    scale_inv: np.ndarray,
    block: tuple[int, int],
    dtype: np.dtype | type = np.float32,
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``q * scale_inv`` per block, written into ``out`` (or a new ``dtype`` array).

    Works one strip of ``block[0]`` rows at a time, so the float32 temporaries stay at
    ``block[0] * C`` elements whatever the weight's size.

    Args:
      q: ``[R, C]`` or ``[E, R, C]`` ``float8_e4m3fn`` codes.
      scale_inv: float32 ``scale_shape(q.shape, block)``.
      block: ``(rows, cols)`` of one block.
      dtype: dtype of the result when ``out`` is not given.
      out: preallocated ``q.shape`` destination (any float dtype), e.g. a slice of a
        layer's stacked weight.

    Returns:
      ``out``.
    """
    q = np.asarray(q)
    _check(q.shape, block)
    if q.dtype != FP8_DTYPE:
        raise TypeError(f"q must be float8_e4m3fn codes, got dtype {q.dtype}.")
    scale_inv = np.asarray(scale_inv)
    want = scale_shape(q.shape, block)
    if scale_inv.shape != want:
        raise ValueError(
            f"scale_inv for a weight of shape {q.shape} with blocks {block} must have shape "
            f"{want}, got {scale_inv.shape}."
        )
    if out is None:
        out = np.empty(q.shape, dtype)
    if q.ndim == 3:
        for e in range(q.shape[0]):
            dequantize_blocks(q[e], scale_inv[e], block, out=out[e])
        return out
    br, bc = block
    cols = q.shape[1]
    for i in range(scale_inv.shape[0]):
        rows = slice(i * br, (i + 1) * br)
        scales_c = np.repeat(scale_inv[i].astype(np.float32), bc)[:cols]  # [C]
        out[rows] = q[rows].astype(np.float32) * scales_c
    return out


def quantize_blocks(w: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(q, scale_inv)`` of ``w`` (``[R, C]`` or ``[E, R, C]``, any float dtype).

    ``scale_inv = amax(|block|) / 448`` (1 for an all-zero block); ``q`` rounds
    ``w / scale_inv`` to nearest e4m3. Non-finite weights are refused: e4m3fn has no inf.
    """
    w = np.asarray(w)
    _check(w.shape, block)
    if not np.issubdtype(w.dtype, np.floating) and w.dtype != np.dtype(ml_dtypes.bfloat16):
        raise TypeError(f"w must be a floating array, got dtype {w.dtype}.")
    if w.ndim == 3:
        pairs = [quantize_blocks(w_e, block) for w_e in w]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    br, bc = block
    rows, cols = w.shape
    scale_inv = np.empty(scale_shape(w.shape, block), np.float32)
    q = np.empty(w.shape, FP8_DTYPE)
    for i in range(scale_inv.shape[0]):
        strip = w[i * br : (i + 1) * br].astype(np.float32)  # [br, C]
        if not np.all(np.isfinite(strip)):
            raise ValueError("w has a non-finite value; e4m3fn cannot store inf or NaN.")
        pad = scale_inv.shape[1] * bc - cols
        amax = np.abs(np.pad(strip, ((0, 0), (0, pad)))).reshape(len(strip), -1, bc)
        amax = amax.max(axis=(0, 2))  # [ceil(C/bc)]
        scale = np.where(amax > 0, amax / np.float32(FP8_MAX), np.float32(1)).astype(np.float32)
        scale_inv[i] = scale
        scaled = strip / np.repeat(scale, bc)[:cols]
        q[i * br : (i + 1) * br] = np.clip(scaled, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)
    return q, scale_inv
