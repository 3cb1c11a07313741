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
# # Routing walkthrough: sigmoid vs softmax gates, the bias, group limiting
#
# How `sigmoid_moe.route` turns router logits into expert choices and combine weights
# (DeepSeek-V3, arXiv 2412.19437 eq. 12-16; Loss-Free Balancing, arXiv 2408.15664).
# Set `SIGMOID_MOE_NB_SMALL=1` for the small settings CI uses.

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from sigmoid_moe import RouterConfig, expert_load, max_violation, route, sigmoid_moe_router

SMALL = os.environ.get("SIGMOID_MOE_NB_SMALL") == "1"
TOKENS = 256 if SMALL else 4096
E, K = 16, 2
key_x, key_w = jax.random.split(jax.random.key(0))
x_td = jax.random.normal(key_x, (TOKENS, 32))
w_de = jax.random.normal(key_w, (32, E)) / np.sqrt(32)
logits_te = x_td @ w_de + jnp.linspace(-1.0, 1.0, E)  # a router that prefers high ids

# %% [markdown]
# ## 1. Sigmoid vs softmax gate
# Softmax scores compete (they sum to 1 over all experts); sigmoid scores are
# independent per expert. With `normalize=True` both renormalise the chosen k, so the
# combine weights of a token sum to 1 either way. The *choice* of experts is the same
# (both are monotone in the logit); the weights differ.

# %%
sig = route(logits_te, None, RouterConfig(E, K, score_fn="sigmoid"))
soft = route(logits_te, None, RouterConfig(E, K, score_fn="softmax"))
print("same experts chosen:", bool(jnp.all(sig.expert_ids == soft.expert_ids)))
print(
    "token 0 sigmoid weights", np.round(sig.weights[0], 3), "softmax", np.round(soft.weights[0], 3)
)
fig, ax = plt.subplots(1, 2, figsize=(9, 3))
ax[0].hist(np.asarray(sig.scores).ravel(), 50)
ax[0].set_title("sigmoid scores (independent)")
ax[1].hist(np.asarray(soft.scores).ravel(), 50)
ax[1].set_title("softmax scores (sum to 1)")
plt.show()

# %% [markdown]
# ## 2. What the bias changes, and what it does not
# In DeepSeek-V3's `bias_mode="selection"` the bias is added to the scores **for the
# top-k choice only**: it moves tokens between experts, but the combine weights of a
# chosen expert still come from the unbiased score. A fixed bias only moves the crowd:
# expert 15's tokens go to the next favourites, and MaxVio need not fall. Balancing takes
# the feedback loop of the load-balancing notebook, a small step after every batch.

# %%
config = RouterConfig(E, K)
bias = jnp.zeros((E,), jnp.float32).at[E - 1].set(-0.3)  # make the favourite less attractive
unbiased = route(logits_te, None, config)
biased = route(logits_te, bias, config)
before, after = expert_load(unbiased.expert_ids, E), expert_load(biased.expert_ids, E)
print("load without bias", np.asarray(before))
print("load with bias   ", np.asarray(after))
print("MaxVio", float(max_violation(before)), "->", float(max_violation(after)))
same = jnp.all(unbiased.expert_ids == biased.expert_ids, axis=-1)
print(
    "tokens whose choice is unchanged keep identical weights:",
    bool(jnp.all(jnp.where(same[:, None], unbiased.weights == biased.weights, True))),
)

# %% [markdown]
# ## 3. Group-limited routing
# With `num_groups` groups each token first keeps its `topk_groups` best groups (scored
# by the sum of each group's two best selection scores), then picks top-k inside them.

# %%
grouped = route(logits_te, None, RouterConfig(E, K, num_groups=4, topk_groups=1))
per_token = np.asarray(grouped.expert_ids) // (E // 4)
print("every token stays inside one group:", bool(np.all(per_token[:, 0] == per_token[:, 1])))
plt.bar(range(E), np.asarray(expert_load(grouped.expert_ids, E)))
plt.title("load with 4 groups, 1 kept per token")
plt.xlabel("expert")
plt.show()

# %% [markdown]
# ## 4. The reference problem's function
# `sigmoid_moe_router(token_embeddings, expert_weights, expert_bias, top_k)` adds the
# bias to the logits before the sigmoid (`bias_mode="logit"`) and returns lists.

# %%
emb = np.asarray(x_td[:4]).tolist()
weights = np.asarray(w_de.T).tolist()
indices, gate = sigmoid_moe_router(emb, weights, [0.0] * E, top_k=K)
for t in range(4):
    print(t, indices[t], np.round(gate[t], 3))
