"""What logging the aux/LM gradient interference costs a training run.

    python benchmarks/interference.py [--preset default] [--steps 200] [--every 10]

Trains the preset's model with the aux loss (global scope, coefficient 1e-2) for
``--steps`` steps twice in this process, once measuring the interference every
``--every`` steps (:meth:`sigmoid_moe.harness.train.TrainStep.measure_interference`) and
once not, alternating the two for ``--rounds`` rounds after a compile-only warm-up, and
prints the median ratio of their wall times (the step loop only: no evaluation or
checkpoints), with the cost of one measurement in train steps. Single-threaded XLA, as
the comparison's workers run.
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


def loop(config, corpus, steps: int, every: int) -> float:
    """Seconds for ``steps`` train steps, measuring interference every ``every`` (0: never)."""
    model = TransformerLM(config.model, rngs=nnx.Rngs(params=jax.random.key(0)))
    graphdef, params, bias = nnx.split(model, nnx.Param, RoutingBias)
    opt_state = optimizer(config.grad_clip, config.weight_decay).init(params)
    step_fn = make_train_step(graphdef, config)
    batches = [
        jnp.asarray(train_batch(corpus, i * config.batch_size, config.batch_size, 0))
        for i in range(steps)
    ]
    start = time.perf_counter()
    for step, tokens in enumerate(batches):
        if every and step % every == 0:
            jax.block_until_ready(step_fn.measure_interference(params, bias, tokens))
        params, bias, opt_state, metrics = step_fn(
            params, bias, opt_state, tokens, jnp.asarray(step, jnp.int32)
        )
        jax.block_until_ready(metrics)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    base = PRESETS[args.preset].base
    model = dataclasses.replace(base.model, balance_loss_coef=1e-2)
    config = dataclasses.replace(base, model=model, interference_every=args.every)
    corpus = build_corpus(config.data, config.model.seq_len)
    print(f"cpu: {platform.processor() or platform.machine()}, load {os.getloadavg()}")
    loop(config, corpus, 2, 1)  # compile both programs
    ratios = []
    for _ in range(args.rounds):
        plain = loop(config, corpus, args.steps, 0)
        logged = loop(config, corpus, args.steps, args.every)
        ratios.append(logged / plain)
        print(f"{args.steps} steps: {plain:.2f} s plain, {logged:.2f} s logging every {args.every}")
    ratio = float(np.median(ratios))
    per_measure = (ratio - 1) * args.every
    print(
        f"median ratio {ratio:.3f} (range {min(ratios):.3f}-{max(ratios):.3f}): overhead "
        f"{100 * (ratio - 1):.1f}%, one measurement ~{per_measure:.2f} train steps"
    )


if __name__ == "__main__":
    main()
