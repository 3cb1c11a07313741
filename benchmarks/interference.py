"""What logging the aux/LM gradient interference costs a training run.

    python benchmarks/interference.py [--preset default] [--calls 100] [--every 10]

On the preset's model with the aux loss (global scope, coefficient 1e-2), in this
process, single-threaded as the comparison's workers run: after a compile-only warm-up,
``--calls`` pairs of one train step and one interference measurement
(:meth:`sigmoid_moe.harness.train.TrainStep.measure_interference`) on the same batch,
each timed on its own. Prints the median of the pairs' ratios (measurement / step: robust
to load that drifts on a shared machine) and the overhead that makes at one measurement
every ``--every`` steps.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
).strip()

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sigmoid_moe.harness import PRESETS, build_corpus  # noqa: E402
from sigmoid_moe.harness.data import train_batch  # noqa: E402
from sigmoid_moe.harness.model import TransformerLM  # noqa: E402
from sigmoid_moe.harness.train import make_train_step, optimizer  # noqa: E402
from sigmoid_moe.routing_bias import RoutingBias  # noqa: E402


def pairs(config, corpus, calls: int) -> list[tuple[float, float]]:
    """``(step seconds, measurement seconds)`` of ``calls`` alternating calls."""
    model = TransformerLM(config.model, rngs=nnx.Rngs(params=jax.random.key(0)))
    graphdef, params, bias = nnx.split(model, nnx.Param, RoutingBias)
    opt_state = optimizer(config.grad_clip, config.weight_decay).init(params)
    step_fn = make_train_step(graphdef, config)
    out = []
    for step in range(calls + 2):
        start = config.batch_size * step
        tokens = jnp.asarray(train_batch(corpus, start, config.batch_size, 0))
        t0 = time.perf_counter()
        jax.block_until_ready(step_fn.measure_interference(params, bias, tokens))
        t1 = time.perf_counter()
        params, bias, opt_state, metrics = step_fn(
            params, bias, opt_state, tokens, jnp.asarray(step, jnp.int32)
        )
        jax.block_until_ready(metrics)
        t2 = time.perf_counter()
        if step >= 2:  # the first two compile
            out.append((t2 - t1, t1 - t0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args()
    base = PRESETS[args.preset].base
    model = dataclasses.replace(base.model, balance_loss_coef=1e-2)
    config = dataclasses.replace(base, model=model, interference_every=args.every)
    corpus = build_corpus(config.data, config.model.seq_len)
    print(f"cpu: {platform.processor() or platform.machine()}, load {os.getloadavg()}")
    timed = pairs(config, corpus, args.calls)
    step = np.median([s for s, _ in timed])
    ratio = np.median([m / s for s, m in timed])
    q1, q3 = np.percentile([m / s for s, m in timed], [25, 75])
    print(
        f"{len(timed)} pairs: train step {1e3 * step:.1f} ms (median), one measurement "
        f"{ratio:.2f} train steps (median ratio; quartiles {q1:.2f}-{q3:.2f}); every "
        f"{args.every} steps: {100 * ratio / args.every:.1f}% overhead on the step loop"
    )


if __name__ == "__main__":
    main()
