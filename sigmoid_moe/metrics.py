"""Balance metrics computed from per-expert token counts.

MaxVio (LFB eq. 4, arXiv 2408.15664): ``(max_i load_i - mean load) / mean load``. Even a
perfectly uniform random router shows MaxVio > 0 at a finite token count, so every
reported MaxVio should stand next to :func:`uniform_maxvio_floor` for the same counts.

Two summaries of a MaxVio_batch series (one value per step, host NumPy), shared by the
balance lab and the training harness: :func:`steps_to_balance` (when the series gets
near the floor and stays there) and :func:`trend` (whether its end is still moving).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BALANCE_FACTOR",
    "BALANCE_WINDOW",
    "TREND_LEVEL",
    "LoadStats",
    "Trend",
    "coefficient_of_variation",
    "idle_experts",
    "load_fraction",
    "load_stats",
    "max_violation",
    "steps_to_balance",
    "trend",
    "uniform_maxvio_approx",
    "uniform_maxvio_floor",
]


def _as_float_load(load: jax.Array) -> jax.Array:
    if jnp.ndim(load) < 1:
        raise ValueError(f"load must have shape [..., E], got {jnp.shape(load)}.")
    return jnp.asarray(load, jnp.float32)


def max_violation(load: jax.Array) -> jax.Array:
    """MaxVio ``(max load - mean load) / mean load`` over the last axis (0 when empty)."""
    load = _as_float_load(load)
    mean = jnp.mean(load, axis=-1)
    return jnp.where(mean > 0, (jnp.max(load, axis=-1) - mean) / jnp.where(mean > 0, mean, 1), 0.0)


def load_fraction(load: jax.Array) -> jax.Array:
    """Each expert's share of the routed assignments ``[..., E]`` (zeros when empty)."""
    load = _as_float_load(load)
    total = jnp.sum(load, axis=-1, keepdims=True)
    return load / jnp.where(total > 0, total, 1)


def coefficient_of_variation(load: jax.Array) -> jax.Array:
    """Standard deviation over mean of the load (0 when empty)."""
    load = _as_float_load(load)
    mean = jnp.mean(load, axis=-1)
    return jnp.where(mean > 0, jnp.std(load, axis=-1) / jnp.where(mean > 0, mean, 1), 0.0)


def idle_experts(load: jax.Array) -> jax.Array:
    """Number of experts that received no token, int32."""
    return jnp.sum(jnp.asarray(load) == 0, axis=-1).astype(jnp.int32)


class LoadStats(NamedTuple):
    """Balance statistics of one load (:func:`load_stats`)."""

    max_violation: jax.Array  # [...] float32
    coefficient_of_variation: jax.Array  # [...] float32
    idle_experts: jax.Array  # [...] int32
    fraction: jax.Array  # [..., E] float32


def load_stats(load: jax.Array) -> LoadStats:
    """All of the above for one ``[..., E]`` load."""
    return LoadStats(
        max_violation=max_violation(load),
        coefficient_of_variation=coefficient_of_variation(load),
        idle_experts=idle_experts(load),
        fraction=load_fraction(load),
    )


def _check_counts(num_tokens: int, num_experts: int, top_k: int) -> None:
    for name, value in (("num_tokens", num_tokens), ("num_experts", num_experts), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}.")


def uniform_maxvio_approx(num_tokens: int, num_experts: int, top_k: int) -> float:
    """Closed-form estimate of uniform routing's expected MaxVio.

    Each count is hypergeometric-like with mean ``T K / N`` and relative standard
    deviation ``sqrt((1 - K/N) / (T K / N))``; the maximum of ``N`` such is about
    ``0.8 sqrt(2 ln N)`` standard deviations above the mean.
    """
    _check_counts(num_tokens, num_experts, top_k)
    if top_k == num_experts:
        return 0.0
    n, k, t = num_experts, top_k, num_tokens
    return 0.8 * math.sqrt(2 * math.log(n)) * math.sqrt((1 - k / n) / (t * k / n))


@functools.lru_cache(maxsize=256)
def uniform_maxvio_floor(
    num_tokens: int, num_experts: int, top_k: int, *, samples: int = 32, seed: int = 0
) -> float:
    """Expected MaxVio of perfectly uniform random top-k routing, by simulation.

    Each of ``num_tokens`` tokens picks ``top_k`` distinct experts uniformly at random;
    the MaxVio of the resulting counts is averaged over ``samples`` draws (NumPy,
    deterministic in ``seed``). This is the noise floor a measured MaxVio_batch at the
    same token count must be compared with.
    """
    _check_counts(num_tokens, num_experts, top_k)
    if top_k == num_experts:
        return 0.0
    rng = np.random.default_rng(seed)
    chunk = max(1, 2**22 // num_experts)  # ~16 MB of random numbers at a time
    vios = []
    for _ in range(samples):
        counts = np.zeros(num_experts, np.int64)
        remaining = num_tokens
        while remaining:
            rows = min(chunk, remaining)
            picks = np.argpartition(rng.random((rows, num_experts)), top_k - 1, axis=1)[:, :top_k]
            counts += np.bincount(picks.ravel(), minlength=num_experts)
            remaining -= rows
        mean = counts.mean()
        vios.append((counts.max() - mean) / mean)
    return float(np.mean(vios))


BALANCE_FACTOR = 3.0  # balanced: within this multiple of the uniform floor
BALANCE_WINDOW = 20  # steps in the running mean that steps_to_balance reads
TREND_LEVEL = 0.95  # two-sided level of the trend's interval


def steps_to_balance(
    maxvio_s, floor: float, *, factor: float = BALANCE_FACTOR, window: int = BALANCE_WINDOW
) -> int | None:
    """Steps until MaxVio_batch is balanced for good: the first step ``t`` such that the
    running mean of the series over ``window`` consecutive steps is below ``factor *
    floor`` for every window that ends at ``t`` or later. None ("never") when the last
    window is not below it.

    Args:
      maxvio_s: ``[S]`` MaxVio_batch of steps 1..S (one value per step, e.g. the mean over
        layers).
      floor: :func:`uniform_maxvio_floor` at the step's token count.
      factor, window: the threshold's multiple of the floor and the running-mean length
        (the whole series when it is shorter).

    Returns:
      ``t`` in steps taken (``window`` at the earliest), or None.
    """
    vio = np.asarray(maxvio_s, np.float64).reshape(-1)
    if vio.size == 0:
        return None
    window = max(1, min(int(window), vio.size))
    running = np.convolve(vio, np.ones(window) / window, mode="valid")  # ends at window..S
    above = np.flatnonzero(~(running < factor * floor))
    if above.size and above[-1] == running.size - 1:
        return None
    first = 0 if above.size == 0 else int(above[-1]) + 1
    return first + window


class Trend(NamedTuple):
    """The slope of a series' last windows (:func:`trend`)."""

    slope: float  # change of the window mean per step (least squares over the windows)
    low: float  # the slope's interval at TREND_LEVEL (t, windows - 2 degrees of freedom)
    high: float
    windows: int  # window means fitted
    window: int  # steps per window

    @property
    def verdict(self) -> str:
        """``"still falling"`` / ``"still rising"`` when the interval excludes 0, else
        ``"flat"``."""
        if self.high < 0:
            return "still falling"
        if self.low > 0:
            return "still rising"
        return "flat"


def trend(values_s, *, window: int, windows: int = 5, level: float = TREND_LEVEL) -> Trend:
    """Is the end of a series still moving? The least-squares slope of the means of its
    last ``windows`` windows of ``window`` steps, against the windows' centre steps, with
    its two-sided t interval at ``level`` (``windows - 2`` degrees of freedom).

    Averaging each window first keeps the step-to-step noise (which is autocorrelated
    under a bias feedback loop) out of the error; the fit assumes the window means'
    deviations from a line are independent with one variance. Fewer windows are used when
    the series is shorter; with fewer than 3 the interval is infinite (no verdict).
    """
    from scipy import stats

    vals = np.asarray(values_s, np.float64).reshape(-1)
    window = max(1, int(window))
    count = min(int(windows), vals.size // window)
    if count < 2:
        return Trend(math.nan, -math.inf, math.inf, count, window)
    tail = vals[vals.size - count * window :].reshape(count, window).mean(axis=1)
    x = (np.arange(count) + 0.5) * window
    x_c = x - x.mean()
    slope = float(np.sum(x_c * (tail - tail.mean())) / np.sum(x_c**2))
    if count < 3:
        return Trend(slope, -math.inf, math.inf, count, window)
    resid = tail - tail.mean() - slope * x_c
    se = math.sqrt(float(np.sum(resid**2)) / (count - 2) / float(np.sum(x_c**2)))
    half = float(stats.t.ppf(0.5 + level / 2, count - 2)) * se
    return Trend(slope, slope - half, slope + half, count, window)
