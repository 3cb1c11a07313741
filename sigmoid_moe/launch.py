"""A sharded train step of a tiny MoE model, on one process or several (``python -m``).

One host, N devices::

    python -m sigmoid_moe.launch --data 2 --expert 4 --steps 3

Several processes, started the way a multi-host job is (one process per host, each with
its local devices; here all on 127.0.0.1 with gloo CPU collectives)::

    python -m sigmoid_moe.launch --num-processes 2 --local-devices 4 --data 2 --expert 4
    # which spawns, per process i:
    python -m sigmoid_moe.launch --num-processes 2 --process-id i \\
        --coordinator 127.0.0.1:PORT --local-devices 4 --data 2 --expert 4

On real hosts run the second form on each host with its own ``--process-id`` and the
first host's address as ``--coordinator``. Every process prints one ``RESULT {json}`` line
(losses, the final bias, loads, dropped counts); the launcher prints them all.

The model: token embedding -> :class:`MoELayer` (expert parallel over ``"expert"``) ->
readout, next-token cross entropy, optax AdamW on ``nnx.Param`` only, then the routing
bias update from the global load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sigmoid_moe.config import RouterConfig
from sigmoid_moe.layer import MoEConfig, MoELayer
from sigmoid_moe.routing_bias import ExpertLoad, apply_routing_bias_update
from sigmoid_moe.sharding import DEFAULT_RULES, logical_sharding, make_mesh, rules_for_mesh

# jax is imported but no backend is started at import, so a worker can still set its
# device count and collectives before the first jax.devices().

__all__ = [
    "RunResult",
    "TinyMoEModel",
    "create",
    "make_batch",
    "make_train_step",
    "model_config",
    "model_rules",
    "put_batch",
    "run",
    "spawn",
]


def model_config(expert_axis: str | None) -> MoEConfig:
    """The tiny model's layer; ``expert_axis="expert"`` for the sharded run."""
    # Dropless (the ragged exchange under EP) so the sharded and unsharded runs match.
    return MoEConfig(
        d_model=16,
        d_ff=8,
        router=RouterConfig(num_experts=8, top_k=2),
        num_shared_experts=1,
        dispatch="dropless",
        kernel="blocked",
        block_size=8,
        balance_loss_coef=1e-2,
        expert_axis=expert_axis,
    )


class TinyMoEModel(nnx.Module):
    """``tokens [B, S] int32 -> logits [B, S, V]``: embedding, one MoE layer, readout."""

    def __init__(self, config: MoEConfig, vocab: int, *, rngs: nnx.Rngs):
        placed = not jax.sharding.get_abstract_mesh().empty
        init = nnx.initializers.normal(0.5)
        self.embed_vd = nnx.Param(
            init(rngs.params(), (vocab, config.d_model)),
            out_sharding=("vocab", "embed"),
            eager_sharding=placed,
        )
        self.moe = MoELayer(config, rngs=rngs)
        self.readout_dv = nnx.Param(
            init(rngs.params(), (config.d_model, vocab)),
            out_sharding=("embed", "vocab"),
            eager_sharding=placed,
        )

    def __call__(self, tokens_bs: jax.Array):
        x_bsd = self.embed_vd[...][tokens_bs]
        y_bsd, aux = self.moe(x_bsd)
        return (x_bsd + y_bsd) @ self.readout_dv[...], aux


class RunResult(NamedTuple):
    """Per step ``losses`` / ``loads [E]`` / ``dropped``, and the final ``bias [E]``."""

    losses: list[float]
    loads: list[list[int]]
    dropped: list[int]
    bias: list[float]


VOCAB = 32
BIAS_RATE = 1e-3


def make_batch(step: int, batch: int = 16, seq: int = 8, seed: int = 0):
    """The global token batch ``[batch, seq]`` int32 of ``step`` (identical on every host)."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, VOCAB, size=(batch, seq), dtype=np.int32)


def make_train_step(rate: float = BIAS_RATE):
    """``step(model, optimizer, tokens) -> (loss, load [E], dropped)``, jitted, in place."""

    def loss_fn(model, tokens_bs):
        (logits_bsv, aux), loads = nnx.capture(model, ExpertLoad)(tokens_bs)
        ce = optax.softmax_cross_entropy_with_integer_labels(
            logits_bsv[:, :-1].astype(jnp.float32), tokens_bs[:, 1:]
        ).mean()
        return ce + aux.aux_loss, (aux.expert_load, aux.dropped, loads)

    @nnx.jit
    def train_step(model, optimizer, tokens_bs):
        grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
        (loss, (load_e, dropped, loads)), grads = grad_fn(model, tokens_bs)
        optimizer.update(model, grads)
        # After the optimizer, from the global int32 load: identical on every replica.
        apply_routing_bias_update(model, loads, rate=rate)
        return loss, load_e, dropped

    return train_step, loss_fn


def create(mesh, *, seed: int = 0, learning_rate: float = 1e-2):
    """``(model, optimizer)``; placed on ``mesh`` (expert parallel) or unsharded if None."""
    config = model_config(None if mesh is None else "expert")

    @nnx.jit
    def build():
        model = TinyMoEModel(config, VOCAB, rngs=nnx.Rngs(seed))
        optimizer = nnx.Optimizer(model, optax.adamw(learning_rate), wrt=nnx.Param)
        return model, optimizer

    return build()


def put_batch(tokens_bs, mesh):
    """Places the global ``[B, S]`` batch on ``mesh`` (each process supplies its shards)."""
    sharding = logical_sharding(mesh, ("activation_batch", None))
    return jax.make_array_from_callback(tokens_bs.shape, sharding, lambda idx: tokens_bs[idx])


def _local(x):
    """A replicated global array as numpy, on any process."""
    return np.asarray(x.addressable_data(0)) if hasattr(x, "addressable_data") else np.asarray(x)


def run(mesh=None, *, steps: int = 2, seed: int = 0) -> RunResult:
    """``steps`` train steps on ``mesh`` (under its rules) or unsharded when ``mesh=None``."""
    ctx = contextlib.ExitStack()
    if mesh is not None:
        ctx.enter_context(jax.set_mesh(mesh))
        ctx.enter_context(nnx.logical_axis_rules(rules_for_mesh(mesh, model_rules())))
    with ctx:
        model, optimizer = create(mesh, seed=seed)
        train_step, _ = make_train_step()
        losses, loads, dropped = [], [], []
        for step in range(steps):
            tokens = make_batch(step, seed=seed)
            batch = tokens if mesh is None else put_batch(tokens, mesh)
            loss, load_e, drop = train_step(model, optimizer, batch)
            losses.append(float(_local(loss)))
            loads.append(_local(load_e).tolist())
            dropped.append(int(_local(drop)))
        bias = _local(model.moe.bias_e[...]).tolist()
    return RunResult(losses=losses, loads=loads, dropped=dropped, bias=bias)


def model_rules():
    # The model's own names ("vocab") join the layer's table; user rules extend it likewise.
    return (*DEFAULT_RULES, ("vocab", None))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(args) -> None:
    jax.config.update("jax_num_cpu_devices", args.local_devices)
    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    mesh = make_mesh(data=args.data, expert=args.expert)
    result = run(mesh, steps=args.steps, seed=args.seed)
    payload = {"process_id": jax.process_index(), **result._asdict()}
    print("RESULT " + json.dumps(payload), flush=True)
    if args.num_processes > 1:
        jax.distributed.shutdown()


def spawn(
    num_processes: int,
    *,
    local_devices: int,
    data: int,
    expert: int,
    steps: int = 2,
    seed: int = 0,
    timeout: float = 300.0,
) -> list[dict]:
    """Starts ``num_processes`` workers on 127.0.0.1 and returns their RESULT payloads."""
    coordinator = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ)
    # Each worker sets its own device count; a forced count from the parent would clash.
    env["XLA_FLAGS"] = " ".join(
        flag
        for flag in env.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    )
    env["JAX_PLATFORMS"] = "cpu"
    procs = []
    for pid in range(num_processes):
        cmd = [
            sys.executable,
            "-m",
            "sigmoid_moe.launch",
            f"--num-processes={num_processes}",
            f"--process-id={pid}",
            f"--coordinator={coordinator}",
            f"--local-devices={local_devices}",
            f"--data={data}",
            f"--expert={expert}",
            f"--steps={steps}",
            f"--seed={seed}",
        ]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results, errors = [], []
    try:
        for pid, proc in enumerate(procs):
            out, err = proc.communicate(timeout=timeout)
            lines = [ln for ln in out.decode().splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                errors.append(f"process {pid} exited {proc.returncode}:\n{err.decode()[-3000:]}")
            else:
                results.append(json.loads(lines[-1][len("RESULT ") :]))
    finally:
        for proc in procs:  # only the processes started here
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if errors:
        raise RuntimeError("\n".join(errors))
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sigmoid_moe.launch", description=__doc__)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=None, help="worker mode when set")
    parser.add_argument("--coordinator", default=None, help="host:port of process 0")
    parser.add_argument("--local-devices", type=int, default=8, help="CPU devices per process")
    parser.add_argument("--data", type=int, default=2)
    parser.add_argument("--expert", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_processes < 1 or args.local_devices < 1:
        parser.error("--num-processes and --local-devices must be >= 1")
    if args.process_id is None and args.num_processes > 1:
        results = spawn(
            args.num_processes,
            local_devices=args.local_devices,
            data=args.data,
            expert=args.expert,
            steps=args.steps,
            seed=args.seed,
        )
        for payload in results:
            print("RESULT " + json.dumps(payload))
        return
    if args.num_processes > 1 and not args.coordinator:
        parser.error("--coordinator host:port is required with --process-id")
    args.process_id = args.process_id or 0
    _worker(args)


if __name__ == "__main__":
    main()
