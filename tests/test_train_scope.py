"""Gradient accumulation and the balancing scope of the train step.

- ``global`` with N micro-batches equals one batch N times larger: identical int loads and
  bias, the same parameters up to float rounding (a mean of N means vs one mean).
- ``micro``: the bias step is the mean of the micro-batches' own steps; ``sequence``: of the
  sequences' own steps. On a batch whose micro-batches (or sequences) are skewed in
  different directions, each is smaller than the global step where they disagree.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sigmoid_moe import ExpertLoad, RoutingBias, expert_load, update_bias
from sigmoid_moe.harness import PRESETS, build_corpus
from sigmoid_moe.harness.data import train_batch
from sigmoid_moe.harness.model import TransformerLM
from sigmoid_moe.harness.train import TrainConfig, make_train_step, optimizer

# The whole module runs on one worker (pyproject: --dist loadgroup), so its module
# fixtures are built once; tests/test_xdist_groups.py checks that the group is in effect.
pytestmark = pytest.mark.xdist_group("train_scope")

BASE = PRESETS["tiny"].base
RATE = 1e-2


@pytest.fixture(scope="module")
def skewed_tokens():
    """Eight sequences, the first four of one repeated byte and the last four of another, so
    that (with a confident router) the two halves, and the sequences, route apart."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (8, BASE.model.seq_len + 1))
    same = np.where(rng.random(noise.shape) < 0.8, np.repeat([[10], [200]], 4, 0), noise)
    return jnp.asarray(same, jnp.int32)


def _config(grad_accum, scope, coef=0.0, rate=RATE) -> TrainConfig:
    model = dataclasses.replace(
        BASE.model, balance_scope=scope, balance_loss_coef=coef, router_init_scale=4.0
    )
    return dataclasses.replace(
        BASE, batch_size=8, grad_accum=grad_accum, bias_rate=rate, warmup_steps=1, model=model
    )


def _steps(config, batches):
    model = TransformerLM(config.model, rngs=nnx.Rngs(params=jax.random.key(0)))
    graphdef, params, bias = nnx.split(model, nnx.Param, RoutingBias)
    opt_state = optimizer(config.grad_clip, config.weight_decay).init(params)
    step_fn = make_train_step(graphdef, config)
    history = []
    for step, tokens in enumerate(batches):
        params, bias, opt_state, metrics = step_fn(
            params, bias, opt_state, tokens, jnp.asarray(step, jnp.int32)
        )
        history.append(jax.device_get(metrics))
    return graphdef, params, bias, history


def test_global_scope_with_micro_batches_equals_one_big_batch():
    corpus = build_corpus(BASE.data, BASE.model.seq_len)
    batches = [jnp.asarray(train_batch(corpus, 8 * i, 8, seed=0)) for i in range(3)]
    for coef in (0.0, 1e-2):  # loss-free bias, and the global-batch aux loss
        _, p1, b1, h1 = _steps(_config(1, "global", coef), batches)
        _, p4, b4, h4 = _steps(_config(4, "global", coef), batches)
        for one, four in zip(h1, h4, strict=True):
            np.testing.assert_array_equal(one["load"], four["load"])
            np.testing.assert_array_equal(one["bias"], four["bias"])
            np.testing.assert_allclose(one["loss"], four["loss"], rtol=1e-6)
            # f from the whole step's counts: the global-batch loss is the big batch's.
            np.testing.assert_allclose(one["balance_loss"], four["balance_loss"], rtol=1e-6)
        np.testing.assert_array_equal(
            np.asarray(jax.tree.leaves(b1)[0]), np.asarray(jax.tree.leaves(b4)[0])
        )
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def _layer_loads(config, tokens, per_sequence=False):
    """Each layer's load on ``tokens`` through an independent captured forward."""
    model = TransformerLM(config.model, rngs=nnx.Rngs(params=jax.random.key(0)))
    out, _ = nnx.jit(lambda m, t: nnx.capture(m, ExpertLoad)(t))(model, tokens[:, :-1])
    ids = np.asarray(out.aux.expert_ids)  # [L, B, S, k]
    num_experts = config.model.num_experts
    if per_sequence:
        return [
            [np.asarray(expert_load(jnp.asarray(seq), num_experts)) for seq in lay] for lay in ids
        ]
    return [np.asarray(expert_load(jnp.asarray(lay), num_experts)) for lay in ids]


def test_micro_scope_averages_the_micro_batches_steps(skewed_tokens):
    config = _config(2, "micro")
    *_, history = _steps(config, [skewed_tokens])
    _, _, _, global_history = _steps(_config(2, "global"), [skewed_tokens])
    zero = jnp.zeros(config.model.num_experts, jnp.float32)
    halves = [skewed_tokens[:4], skewed_tokens[4:]]
    per_micro = [_layer_loads(config, half) for half in halves]  # [2][L] of [E]
    smaller = []
    for layer in range(config.model.num_layers):
        steps = [np.asarray(update_bias(zero, jnp.asarray(m[layer]), rate=RATE)) for m in per_micro]
        np.testing.assert_allclose(history[0]["bias"][layer], np.mean(steps, axis=0), atol=1e-9)
        micro_step = np.abs(history[0]["bias"][layer])
        global_step = np.abs(global_history[0]["bias"][layer])
        # Where the two halves disagree, their mean step is smaller than the global one.
        assert np.all(micro_step <= global_step + 1e-9)
        smaller.append(np.any(micro_step < global_step - 1e-9))
    assert any(smaller)  # the halves do disagree somewhere


def test_sequence_scope_averages_the_sequences_steps(skewed_tokens):
    config = _config(2, "sequence")
    *_, history = _steps(config, [skewed_tokens])
    _, _, _, global_history = _steps(_config(2, "global"), [skewed_tokens])
    zero = jnp.zeros(config.model.num_experts, jnp.float32)
    loads = _layer_loads(config, skewed_tokens, per_sequence=True)  # [L][B] of [E]
    for layer in range(config.model.num_layers):
        steps = [np.asarray(update_bias(zero, jnp.asarray(c), rate=RATE)) for c in loads[layer]]
        np.testing.assert_allclose(history[0]["bias"][layer], np.mean(steps, axis=0), atol=1e-9)
        assert np.all(
            np.abs(history[0]["bias"][layer]) <= np.abs(global_history[0]["bias"][layer]) + 1e-9
        )
    assert np.any(np.abs(history[0]["bias"]) < np.abs(global_history[0]["bias"]) - 1e-9)
    # The step's logged load is still the whole batch's.
    np.testing.assert_array_equal(history[0]["load"], global_history[0]["load"])


def test_grad_accum_must_divide_the_batch():
    with pytest.raises(ValueError, match="grad_accum=3 must divide batch_size=8"):
        dataclasses.replace(BASE, batch_size=8, grad_accum=3)
    with pytest.raises(ValueError, match="balance_scope"):
        dataclasses.replace(BASE.model, balance_scope="device")
