# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Loss-free load balancing: bias trajectories and MaxVio for a few rates
#
# Loss-Free Balancing (arXiv 2408.15664, Algorithm 1): after each step,
# `b_i += u * sign(mean_load - load_i)`. Here a fixed, skewed router sees a fresh batch
# of tokens each step, and we watch the bias and MaxVio for several rates `u`, against
# the noise floor of uniform random routing. Then a short real training run of the
# harness's MoE language model. `SIGMOID_MOE_NB_SMALL=1` shrinks everything for CI.

# %%
import functools
import os
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from sigmoid_moe import (
    RouterConfig,
    expert_load,
    max_violation,
    route,
    uniform_maxvio_floor,
    update_bias,
)

SMALL = os.environ.get("SIGMOID_MOE_NB_SMALL") == "1"
TOKENS, STEPS = (256, 60) if SMALL else (2048, 600)
E, K, D = 16, 2, 32
config = RouterConfig(E, K)
w_de = jax.random.normal(jax.random.key(1), (D, E)) / np.sqrt(D)
skew_e = 0.5 * jax.random.normal(jax.random.key(2), (E,))


@functools.partial(jax.jit, static_argnames="rate")
def one_step(bias, key, rate):
    logits = jax.random.normal(key, (TOKENS, D)) @ w_de + skew_e
    load = expert_load(route(logits, bias, config).expert_ids, E)
    return update_bias(bias, load, rate=rate), max_violation(load)


def run(rate):
    bias, biases, vios = jnp.zeros((E,), jnp.float32), [], []
    for step in range(STEPS):
        bias, vio = one_step(bias, jax.random.fold_in(jax.random.key(0), step), rate)
        biases.append(np.asarray(bias))
        vios.append(float(vio))
    return np.array(biases), np.array(vios)


rates = [1e-4, 1e-3, 1e-2]
runs = {rate: run(rate) for rate in rates}
floor = uniform_maxvio_floor(TOKENS, E, K)

# %%
fig, axes = plt.subplots(1, len(rates) + 1, figsize=(4 * (len(rates) + 1), 3))
for ax, rate in zip(axes, rates, strict=False):
    ax.plot(runs[rate][0], lw=0.8)
    ax.set_title(f"bias, u={rate:g}")
    ax.set_xlabel("step")
for rate in rates:
    axes[-1].plot(runs[rate][1], label=f"u={rate:g}")
axes[-1].axhline(floor, color="k", ls=":", label="uniform floor")
axes[-1].set(yscale="log", title="MaxVio_batch", xlabel="step")
axes[-1].legend()
fig.tight_layout()
plt.show()
for rate in rates:
    print(f"u={rate:g}: final MaxVio {runs[rate][1][-10:].mean():.3f} (floor {floor:.3f})")

# %% [markdown]
# A large rate balances fast but then oscillates by about `u` around the balance point;
# a small one is smooth but slow: it needs about `max|logit gap| / u` steps to undo the
# skew. The paper's `u = 1e-3` assumes thousands of steps.
#
# ## The balance lab: DeepSeek-V3 scale without a model
# `sigmoid_moe.lab` runs the same loop for many (rule, rate, seed) configurations as one
# jitted `vmap` of a `lax.scan`, with the router logits generated inside the scan: a fixed
# skew plus a low-rank "learned router" part. Here: 256 experts, top-8, 8 groups with 4
# kept, as in DeepSeek-V3; the rules of the paper plus quantile balancing.
# `sigmoid-moe simulate` is the same from the command line.

# %%
from IPython.display import Markdown, display  # noqa: E402

from sigmoid_moe.lab import StreamConfig, grid, markdown_table, summarize, sweep  # noqa: E402

v3_router = RouterConfig(num_experts=256, top_k=8, num_groups=8, topk_groups=4)
lab_tokens, lab_steps = (256, 40) if SMALL else (4096, 500)
stream = StreamConfig(num_tokens=lab_tokens, num_experts=256, preference_std=0.3)
lab_rules, lab_rates, lab_seeds = grid(
    ["sign", "sign_zero_mean", "proportional", "quantile"], [1e-3, 1e-2], [0]
)
trajectory = sweep(
    stream, v3_router, rules=lab_rules, rates=lab_rates, seeds=lab_seeds, steps=lab_steps
)
summary = summarize(trajectory, top_k=8)
display(Markdown(markdown_table(summary, lab_rules, lab_rates, lab_seeds)))

fig, ax = plt.subplots(figsize=(7, 3))
for c, (rule, rate) in enumerate(zip(lab_rules, lab_rates, strict=True)):
    ax.plot(np.asarray(trajectory.max_violation[c]), lw=0.8, label=f"{rule} u={rate:g}")
ax.axhline(summary.floor[0], color="k", ls=":", label="uniform floor")
ax.set(yscale="log", xlabel="step", title="MaxVio_batch, 256 experts top-8")
ax.legend(fontsize=6, ncol=2)
plt.show()

# %% [markdown]
# Read each steady MaxVio against the uniform floor next to it. At the full setting
# (4096 tokens, 500 steps; about a minute on 2 cores) we measured: the sign rules at
# `u = 1e-3` reach the floor within a few hundred steps, at `u = 1e-2` they oscillate at
# about twice the floor; the proportional rule settles closest to the floor at both rates;
# quantile balancing, set from the previous batch's score quantiles, stays above it
# because those quantiles are themselves noisy at 16 tokens per expert per batch.
#
# ## The bias of a whole model: loads meet their own layer by structure
# In a model, every `MoELayer` records its load as an `ExpertLoad` variable inside
# `nnx.capture`, so the captured loads have the model's own structure and each one moves
# its own layer's bias, however the layers are named or nested. Here an encoder/decoder
# pair (whose attribute names sort the other way round from the call order) runs a few
# train steps; each layer balances its own skew.

# %%
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from sigmoid_moe import (  # noqa: E402
    ExpertLoad,
    MoEConfig,
    MoELayer,
    apply_routing_bias_update,
)

layer_config = MoEConfig(d_model=D, d_ff=16, router=RouterConfig(E, K))


class EncoderDecoder(nnx.Module):
    def __init__(self, rngs):
        self.encoder_moe = MoELayer(layer_config, rngs=rngs)
        self.decoder_moe = MoELayer(layer_config, rngs=rngs)

    def __call__(self, x):
        memory, _ = self.encoder_moe(x)
        out, _ = self.decoder_moe(jnp.tanh(x + memory))
        return out


model = EncoderDecoder(nnx.Rngs(0))
model.encoder_moe.router_w_de[...] = model.encoder_moe.router_w_de[...] + 0.5  # skewed
optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, x):
    def loss_fn(model):
        y, loads = nnx.capture(model, ExpertLoad)(x)
        return jnp.mean(y**2), loads

    (_, loads), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    apply_routing_bias_update(model, loads, rate=1e-2)
    return {name: max_violation(loads[name]["expert_load"][...]) for name in loads}


history = []
for step in range(20 if SMALL else 200):
    x = jax.random.normal(jax.random.fold_in(jax.random.key(5), step), (TOKENS, D))
    history.append({k: float(v) for k, v in train_step(model, optimizer, x).items()})
for name in ("encoder_moe", "decoder_moe"):
    print(f"{name}: MaxVio {history[0][name]:.3f} -> {history[-1][name]:.3f}")

# %% [markdown]
# ## A short real training run
# The harness's byte-level MoE LM (`sigmoid_moe.harness`) with the loss-free bias.

# %%
import dataclasses  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402

from sigmoid_moe.harness import PRESETS, train  # noqa: E402

base = PRESETS["tiny"].base
config = dataclasses.replace(base, steps=20 if SMALL else 200, bias_rate=1e-2)
out = pathlib.Path(tempfile.mkdtemp()) / "lossfree"
train(config, out, progress=False)
metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
fig, ax = plt.subplots(1, 2, figsize=(9, 3))
ax[0].plot([m["loss"] for m in metrics])
ax[0].set(title="training loss", xlabel="step")
ax[1].plot([np.mean(m["maxvio"]) for m in metrics])
ax[1].set(title="MaxVio_batch", xlabel="step")
plt.show()
