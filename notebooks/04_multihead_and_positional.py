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
# # 04 Multi-head self-attention and positional encodings
#
# Self-attention is blind to order: permuting the tokens permutes the outputs. Positional
# encodings put order back in, either *absolutely* (sinusoidal vectors added to the
# embeddings) or *relatively* (rotary embeddings rotate queries and keys, ALiBi adds a distance
# penalty to the logits). This notebook draws each of them, then looks inside a small
# multi-head self-attention stack trained to reverse words: per-head weights, an
# interactive explorer, entropy and attention rollout.

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/jattn/jattn/blob/main/notebooks/04_multihead_and_positional.ipynb)

# %% tags=["skip-execution"]
# %pip install -q "jattn @ git+https://github.com/jattn/jattn"

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import jattn
from jattn.diagnostics import attention_entropy, attention_rollout
from jattn.explorer import attention_explorer
from jattn.functional.positional import (
    alibi_bias,
    alibi_slopes,
    rotary_embedding,
    sinusoidal_encoding,
)
from jattn.layers import MultiHeadAttention
from jattn.viz import collect_attention_weights, plot_attention, plot_attention_grid

SMALL = os.environ.get("JATTN_SMALL") == "1"  # the test suite runs the small sizes
T, D = (32, 32) if SMALL else (60, 64)

# %% [markdown]
# ## Sinusoidal encoding
#
# `P[i, 2j] = sin(i / 10000^(2j/D))`, `P[i, 2j+1] = cos(i / 10000^(2j/D))`: each pair of
# columns oscillates at its own frequency, from one cycle every 2 pi positions down to very slow.

# %%
P = sinusoidal_encoding(jnp.arange(T), D)  # [T, D]
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
im = ax0.imshow(P, aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
ax0.set_xlabel("encoding dimension")
ax0.set_ylabel("position")
fig.colorbar(im, ax=ax0)
for col in (6, 7, 8, 9):
    ax1.plot(P[:, col], label=f"col {col}")
ax1.set_xlabel("position")
ax1.legend()
plt.show()

# %% [markdown]
# Relative positions are linear in this encoding: for every offset `delta` one fixed rotation
# maps `P[i]` to `P[i + delta]`, whatever `i`. Each frequency pair `(sin, cos)` rotates by the
# angle `delta * omega_j`.

# %%
delta = 5
omega = 1 / 10000 ** (jnp.arange(0, D, 2) / D)  # [D/2]
c, s = jnp.cos(delta * omega), jnp.sin(delta * omega)
pairs = P[: T - delta].reshape(T - delta, D // 2, 2)  # (sin, cos) per frequency
shifted = jnp.stack(
    [
        pairs[..., 0] * c[None, :] + pairs[..., 1] * s[None, :],
        pairs[..., 1] * c[None, :] - pairs[..., 0] * s[None, :],
    ],
    axis=-1,
).reshape(T - delta, D)
print("max |R(delta) P[i] - P[i + delta]| =", float(jnp.max(jnp.abs(shifted - P[delta:]))))

# %% [markdown]
# ## Rotary embeddings
#
# RoPE rotates each query and key by its own position, so the score of a query at position `m`
# and a key at position `n` depends on `m - n` only: for one fixed query vector and key vector,
# the score matrix over positions is constant along its diagonals.

# %%
H = 16
q1 = jax.random.normal(jax.random.key(0), (H,))
k1 = jax.random.normal(jax.random.key(1), (H,))
positions = jnp.arange(T)
q_rot = rotary_embedding(jnp.broadcast_to(q1, (T, 1, H)), positions)[:, 0]  # [T, H]
k_rot = rotary_embedding(jnp.broadcast_to(k1, (T, 1, H)), positions)[:, 0]
scores = q_rot @ k_rot.T  # [T (query position), T (key position)]
fig, ax = plt.subplots(figsize=(4.5, 4))
im = ax.imshow(scores, cmap="RdBu")
ax.set_xlabel("key position n")
ax.set_ylabel("query position m")
ax.set_title("rope(q, m) . rope(k, n)")
fig.colorbar(im, ax=ax)
plt.show()
print("constant along diagonals:", bool(jnp.allclose(scores[1:, 1:], scores[:-1, :-1], atol=1e-4)))

# %% [markdown]
# ## ALiBi
#
# ALiBi adds `-slope_h * (i - j)` to the logits of head h; the slopes form a geometric sequence,
# so some heads look far back and others only at the last few tokens. With zero content logits
# the weights show each head's recency prior.

# %%
N = 4 if SMALL else 8
slopes = alibi_slopes(N)
print("slopes:", np.round(np.asarray(slopes), 4))
n = 12
causal = jattn.causal_mask(n, n)
prior = jattn.masked_softmax(alibi_bias(slopes, n, n), causal[None])  # [N, T, T]
plot_attention_grid(
    prior[None],
    mask=causal,
    layer_names=["ALiBi prior"],
    head_names=[f"slope {float(v):.3g}" for v in slopes],
    cell_size=2.0,
)

# %% [markdown]
# ## Multi-head self-attention, trained
#
# Two self-attention layers over token embeddings plus sinusoidal positions, trained for a
# few seconds to **reverse** a sequence of words (the output at position i is the word at
# position T-1-i). Random weights attend to nothing in particular; after training, the last
# layer's heads look at the mirrored position: an anti-diagonal. `collect_attention_weights`
# runs the stack once with `sow_weights=True` and returns every layer's `[B, N, T, T]`
# weights without changing the outputs.

# %%
tokens = "the cat sat on the mat because it was warm".split()
if SMALL:
    tokens = tokens[:6]
words = sorted(set(tokens) | set("a dog ran to his bed when he felt cold".split()))
vocab = {w: i for i, w in enumerate(words)}
L_TOKENS, FEATURES, HEADS = len(tokens), 32, 4
ids = jnp.array([[vocab[w] for w in tokens]])


class SelfAttentionStack(nnx.Module):
    def __init__(self, num_layers, *, rngs):
        self.embed = nnx.Embed(len(vocab), FEATURES, rngs=rngs)
        self.layers = nnx.List(
            [MultiHeadAttention(HEADS, FEATURES, rngs=rngs) for _ in range(num_layers)]
        )
        self.out = nnx.Linear(FEATURES, len(vocab), rngs=rngs)

    def __call__(self, ids, *, sow_weights=False):
        x = self.embed(ids) + sinusoidal_encoding(jnp.arange(ids.shape[1]), FEATURES)[None]
        for layer in self.layers:
            x = x + layer(x, sow_weights=sow_weights)
        return self.out(x)  # [B, T, vocab] logits


model = SelfAttentionStack(2, rngs=nnx.Rngs(0))
untrained = collect_attention_weights(model, ids)
optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, batch):
    def loss_fn(model):
        logits = model(batch)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, ::-1]).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


rng = np.random.default_rng(0)
for _ in range(300):
    loss = train_step(model, optimizer, jnp.asarray(rng.integers(0, len(vocab), (64, L_TOKENS))))
print(f"loss after 300 steps: {float(loss):.4f}")
reversed_words = [words[i] for i in np.asarray(model(ids).argmax(-1)[0])]
print("reversed:", reversed_words)
assert reversed_words == tokens[::-1]
weights = collect_attention_weights(model, ids)
print({name: w.shape for name, w in weights.items()})
plot_attention_grid(
    weights,
    batch_index=0,
    row_labels=tokens,
    col_labels=tokens,
    title="trained: per layer, per head",
)

# %%
plot_attention_grid(
    untrained, batch_index=0, row_labels=tokens, col_labels=tokens,
    title="the same stack before training",
)  # fmt: skip

# %% [markdown]
# ## Explore it
#
# `jattn.explorer.attention_explorer` shows the same weights interactively: pick a layer and
# heads, hover a word to see where it looks (head view), or see every layer and head at once
# (model view). Its `.save("explorer.html")` writes it as one offline HTML file.

# %%
attention_explorer(weights, tokens, batch_index=0, title="reversal, trained")

# %% [markdown]
# ## Diagnostics
#
# Entropy per head (`log T` for uniform attention, 0 for one-hot) and attention rollout
# (Abnar & Zuidema 2020): average the heads, add the identity for the residual path,
# renormalise and multiply through the layers, giving how much each output position draws on
# each input token.

# %%
stacked = jnp.stack(list(weights.values()))  # [L, B, N, T, T]
entropy = attention_entropy(stacked)[:, 0]  # [L, N]
print("entropy per layer and head (nats):\n", np.round(np.asarray(entropy), 3))
print("log T =", round(float(np.log(L_TOKENS)), 3))
rollout = attention_rollout(stacked)[0]  # [T, T]
plot_attention(rollout, row_labels=tokens, col_labels=tokens, title="attention rollout")
