# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 Score functions and masked softmax
#
# Attention starts with a *score* between a query and each key, turns the scores into
# weights with a softmax over the keys, and averages the values with those weights.
# This notebook compares jattn's score functions (dot product, scaled dot product,
# additive, bilinear, MLP: all with one signature `score_fn(query [T, H], key [S, H'],
# params) -> [T, S]`), then shows the masked softmax with valid lengths, causal and
# sliding-window masks, and the two choices for a row with no visible key.

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/jattn/jattn/blob/main/notebooks/01_scores_and_masked_softmax.ipynb)

# %% tags=["skip-execution"]
# %pip install -q "jattn @ git+https://github.com/jattn/jattn"

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jattn
from jattn.diagnostics import attention_entropy
from jattn.viz import plot_attention, plot_attention_grid

SMALL = os.environ.get("JATTN_SMALL") == "1"  # the test suite runs the small sizes
T, S, H, A = (4, 6, 8, 16) if SMALL else (6, 10, 32, 64)
print("backend:", jax.default_backend())

# %% [markdown]
# ## One signature, five score functions
#
# Each score function maps one head's queries `[T, H]` and keys `[S, H']` to float32 logits
# `[T, S]`. The additive (Bahdanau) and bilinear (Luong) scores have parameters; they are
# plain pytrees here (the layers in `jattn.layers` hold them as `nnx.Param`).

# %%
kq, kk, k1, k2, k3, k4, k5, k6 = jax.random.split(jax.random.key(0), 8)
queries = jax.random.normal(kq, (T, H))
keys = jax.random.normal(kk, (S, H))
init = jax.nn.initializers.lecun_normal()

score_fns = {
    "dot product": (jattn.dot_product_scores, None),
    "scaled dot product": (jattn.scaled_dot_product_scores, None),
    "additive": (
        jattn.additive_scores,
        jattn.AdditiveParams(init(k1, (H, A)), init(k2, (H, A)), jax.random.normal(k3, (A,))),
    ),
    "bilinear": (jattn.bilinear_scores, init(k4, (H, H))),
    "MLP": (
        jattn.mlp_scores,
        jattn.MLPParams(
            init(k5, (H, A)),
            init(k6, (H, A)),
            init(k1, (H, A)),
            jnp.zeros(A),
            init(k2, (A, 1))[:, 0],
        ),
    ),
}


@jax.jit
def all_scores(queries, keys):
    return {name: fn(queries, keys, params) for name, (fn, params) in score_fns.items()}


weights = {}
for name, logits in all_scores(queries, keys).items():  # each [T, S] float32
    weights[name] = jattn.masked_softmax(logits)[None]  # one "head" per score function
    print(f"{name:>20}: logits std {float(logits.std()):6.2f}")

# %%
plot_attention_grid(
    weights,
    row_labels=[f"q{i}" for i in range(T)],
    col_labels=[f"k{j}" for j in range(S)],
    head_names=["weights"],
    title="the same queries and keys under five score functions",
    cell_size=1.8,
)

# %% [markdown]
# ## Why scale the dot product
#
# With unit-variance entries the dot product has variance H, so for large H the softmax
# saturates to nearly one-hot weights (entropy near 0) and its gradients vanish. Dividing by
# sqrt(H) keeps the logits at unit variance and the entropy near that of a broad distribution.

# %%
dims = [4, 16, 64, 256] if SMALL else [4, 16, 64, 256, 1024, 4096]


@jax.jit
def entropies(q, k):
    plain = jattn.masked_softmax(jattn.dot_product_scores(q, k))
    scaled = jattn.masked_softmax(jattn.scaled_dot_product_scores(q, k))
    return attention_entropy(jnp.stack([plain, scaled])[:, None])[:, 0]  # [2]


rows = []
for h in dims:
    q = jax.random.normal(jax.random.key(h), (32, h))
    k = jax.random.normal(jax.random.key(h + 1), (32, h))
    rows.append(entropies(q, k))
rows = np.array(rows)

fig, ax = plt.subplots(figsize=(5, 3.5))
ax.semilogx(dims, rows[:, 0], "o-", label="q . k")
ax.semilogx(dims, rows[:, 1], "o-", label="q . k / sqrt(H)")
ax.axhline(np.log(32), color="grey", ls="--", label="uniform: log S")
ax.set_xlabel("head dim H")
ax.set_ylabel("mean entropy of the weights (nats)")
ax.legend()
plt.show()

# %% [markdown]
# ## Masked softmax
#
# Masks are boolean, True = attend. d2l's *valid lengths* let each example (or each query) see
# only its first `valid_len` keys; masked logits get a finite fill, so no NaN appears.

# %%
logits = jax.random.uniform(jax.random.key(1), (2, 2, 4))
valid_lens = jnp.array([2, 3])
mask = jattn.valid_lens_mask(valid_lens, 2, 4)  # [B, T, S]
print(jattn.masked_softmax(logits, mask))

# %%
n = 8 if SMALL else 12
scores = jax.random.normal(jax.random.key(2), (n, n))
masks = {
    "causal": jattn.causal_mask(n, n),
    "sliding window (2, 0)": jattn.sliding_window_mask(n, n, (2, 0)),
    "valid length 5": jattn.valid_lens_mask(jnp.array([5]), n, n)[0],
}
fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), layout="constrained")
for ax, (name, m) in zip(axes, masks.items(), strict=True):
    plot_attention(jattn.masked_softmax(scores, m), mask=m, ax=ax, title=name)
plt.show()

# %% [markdown]
# Masked cells are hatched: a masked key is not the same as a key with little weight.
#
# ## A query with no visible key
#
# When every key of a row is masked there is nothing to average. jattn's default
# (`fully_masked="zeros"`, as PyTorch's `scaled_dot_product_attention`) gives zero weights and a
# zero output; `fully_masked="uniform"` reproduces `jax.nn.dot_product_attention`, which averages
# all keys.

# %%
row_mask = jnp.array([[True, True, False, False], [False, False, False, False]])
x = jnp.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
print("zeros:  ", jattn.masked_softmax(x, row_mask))
print("uniform:", jattn.masked_softmax(x, row_mask, fully_masked="uniform"))

# %% [markdown]
# ## Low precision
#
# Logits and softmax run in float32 whatever the input dtype, so bfloat16 inputs give the same
# weights up to the rounding of the inputs themselves.

# %%
q16, k16 = queries.astype(jnp.bfloat16), keys.astype(jnp.bfloat16)
w16 = jattn.masked_softmax(jattn.scaled_dot_product_scores(q16, k16))
w32 = jattn.masked_softmax(
    jattn.scaled_dot_product_scores(q16.astype(jnp.float32), k16.astype(jnp.float32))
)
print(w16.dtype, "max difference:", float(jnp.max(jnp.abs(w16 - w32))))
