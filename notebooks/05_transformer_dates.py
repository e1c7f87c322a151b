# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 Training the Transformer on dates, and looking inside it
#
# The encoder-decoder Transformer learns the date translation task (`"Saturday, March 3rd
# 2021"` -> `"2021-03-03"`) with jattn's training program. Then we open it up: every
# attention layer hands back its weights (encoder self-attention, decoder causal
# self-attention, decoder cross-attention), drawn per layer and per head, and two
# diagnostics summarise them: the entropy of each head (how spread out its attention is) and
# attention rollout (Abnar & Zuidema, 2020), which follows attention through the encoder's
# layers back to the input characters.

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/jattn/jattn/blob/main/notebooks/05_transformer_dates.ipynb)

# %% tags=["skip-execution"]
# %pip install -q "jattn @ git+https://github.com/jattn/jattn"
# The configs live in the repository, next to the package:
# !git clone -q --depth 1 https://github.com/jattn/jattn /content/jattn-repo

# %%
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jattn
from jattn.data import BOS, EOS, PAD
from jattn.diagnostics import attention_entropy, attention_rollout
from jattn.train import load_config, make_datasets, restore_model, train_and_evaluate
from jattn.viz import collect_attention_weights, plot_attention, plot_attention_grid

SMALL = os.environ.get("JATTN_SMALL") == "1"  # the test suite runs a few-step tiny model

# %% [markdown]
# ## Configuration and data
#
# `configs/dates.py` is the README's main job: a 2+2-layer pre-norm Transformer, D=128,
# 4 heads, trained to >= 99% exact match on the held-out dates. Its `small` setting is a
# few steps of a tiny model, for tests.

# %%
candidates = [
    Path(jattn.__file__).resolve().parents[1] / "configs",  # a clone or an editable install
    Path("/content/jattn-repo/configs"),  # Colab, after the clone above
]
config_file = next(p / "dates.py" for p in candidates if (p / "dates.py").exists())
config = load_config(config_file, "small" if SMALL else None)
if SMALL:  # 3 steps, fewer weight shapes to initialise, no heatmap files (drawn below)
    config.model.mlp_features = config.model.features
    config.train.update(num_steps=3, checkpoint_every=3)
    config.eval.num_heatmaps = 0
print(config.model)

train_ds, test_ds = make_datasets(config)
for src, tgt in zip(train_ds.src_texts[:4], train_ds.tgt_texts[:4], strict=True):
    print(f"{src!r:36} -> {tgt!r}")

# %% [markdown]
# ## Training
#
# The same call as `python -m jattn.train --config configs/dates.py --workdir DIR`. About ten
# minutes on a 2-core CPU for the full setting, far less on a Colab GPU or TPU.

# %%
workdir = Path(tempfile.mkdtemp(prefix="transformer_dates_"))
result = train_and_evaluate(config, str(workdir))
print(result["eval"])

# %% [markdown]
# ## Load the trained model from its checkpoint

# %%
model = restore_model(config, workdir)

# %% [markdown]
# ## Every attention weight on a batch
#
# Decode a few held-out dates, feed the decoder its own output, and collect the weights of
# every attention layer in one call. Asking for the weights does not change the outputs.

# %%
texts = list(test_ds.src_texts[:4])
src = test_ds.src_tokenizer.encode_batch(texts, test_ds.src.shape[1])
pred = np.asarray(model.generate(src, max_len=test_ds.tgt.shape[1]))
tgt_in = np.concatenate([np.full((len(texts), 1), BOS), pred[:, :-1]], axis=1)
weights = collect_attention_weights(model, src, tgt_in)
for name, w in weights.items():
    print(f"{name:36} {w.shape}")  # [B, N, T, S]
for text, p in zip(texts, pred, strict=True):
    print(f"{text!r:32} -> {test_ds.decode(p)!r}")

# %% [markdown]
# ## Per-layer, per-head heatmaps of one example
#
# Rows of each grid are layers, columns are heads. Axes are cut to the example's characters
# (its padding is masked out of every softmax and carries no weight).

# %%
i = 0
s_len = int(np.sum(src[i] != PAD))
t_len = int(np.argmax(pred[i] == EOS)) + 1 if np.any(pred[i] == EOS) else pred.shape[1]
src_labels = [test_ds.src_tokenizer.token(j).replace(" ", "␣") for j in src[i, :s_len]]
out_labels = [test_ds.tgt_tokenizer.token(j) for j in pred[i, :t_len]]
in_labels = [test_ds.tgt_tokenizer.token(j) for j in tgt_in[i, :t_len]]


def layers_of(stack, kind):
    return [(k, v) for k, v in weights.items() if k.startswith(stack) and k.endswith(kind)]


# One example, cut to its characters: {layer: [N, T, S]}.
enc = {k: np.asarray(v)[i, :, :s_len, :s_len] for k, v in layers_of("encoder", "self_attention")}
dec = {k: np.asarray(v)[i, :, :t_len, :t_len] for k, v in layers_of("decoder", "self_attention")}
cross = {k: np.asarray(v)[i, :, :t_len, :s_len] for k, v in layers_of("decoder", "cross_attention")}

translation = f"{texts[i]!r} -> {test_ds.decode(pred[i])!r}"
# The figures are returned, not drawn on pyplot's canvas: a cell shows its last one.
plot_attention_grid(
    enc, row_labels=src_labels, col_labels=src_labels, title=f"encoder self-attention: {texts[i]!r}"
)

# %%
plot_attention_grid(
    dec, row_labels=out_labels, col_labels=in_labels, title="decoder causal self-attention"
)

# %%
plot_attention_grid(
    cross, row_labels=out_labels, col_labels=src_labels, title=f"cross-attention: {translation}"
)

# %% [markdown]
# In a trained model some cross-attention heads align output digits with the input
# characters they come from (the year's digits, the day, the month's name or number): the
# alignment a Bahdanau model learns (notebook 03), here split across heads and layers.

# %% [markdown]
# ## Diagnostics: per-head entropy
#
# `attention_entropy` averages, over the valid queries, the entropy of each head's attention
# distribution: 0 nats for a head that always looks at one key, `log S` for uniform attention.
# Low-entropy heads are sharp (copying, aligning); high-entropy heads pool broadly.

# %%
src_valid = jnp.asarray(src != PAD)  # [B, S]
tgt_valid = jnp.asarray(tgt_in != PAD)  # [B, T]
masks = {
    "encoder": src_valid[:, None, :, None] & src_valid[:, None, None, :],  # [B, 1, S, S]
    "cross": tgt_valid[:, None, :, None] & src_valid[:, None, None, :],  # [B, 1, T, S]
}
entropy_of = jax.jit(attention_entropy)  # one program per shape, not one per operation
names, entropies = [], []
for name, w in weights.items():
    if name.startswith("encoder"):
        mask = masks["encoder"]
    elif name.endswith("cross_attention"):
        mask = masks["cross"]
    else:  # decoder self-attention: causal and padded rows are already zero
        mask = None
    names.append(name)
    entropies.append(np.asarray(entropy_of(w, mask)).mean(axis=0))  # [N]
entropies = np.stack(entropies)  # [layers, N]

fig, ax = plt.subplots(figsize=(6, 0.5 * len(names) + 1.5), layout="constrained")
im = ax.imshow(entropies, cmap="magma")
ax.set_yticks(range(len(names)), names)
ax.set_xticks(range(entropies.shape[1]), [f"head {j}" for j in range(entropies.shape[1])])
for (r, c), v in np.ndenumerate(entropies):
    ax.text(c, r, f"{v:.2f}", ha="center", va="center", color="gray")
fig.colorbar(im, ax=ax, label="entropy (nats)")
ax.set_title(f"mean attention entropy (uniform over {s_len} characters: {np.log(s_len):.2f})")
plt.show()

# %% [markdown]
# ## Diagnostics: attention rollout through the encoder
#
# Rollout averages each encoder layer's heads, adds the identity for the residual
# connection, renormalises, and multiplies the layers: row *t* says how much the top of the
# encoder at character *t* draws on each input character.

# %%
encoder_stack = jnp.stack([w for k, w in weights.items() if k.startswith("encoder")])
rollout = attention_rollout(encoder_stack)  # [B, S, S]
plot_attention(
    np.asarray(rollout)[i, :s_len, :s_len],
    row_labels=src_labels,
    col_labels=src_labels,
    title=f"encoder attention rollout: {texts[i]!r}",
)
