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
# # 03 Bahdanau attention on dates
#
# An RNN encoder-decoder with additive attention (Bahdanau, Cho & Bengio, 2015) learns to
# translate dates as people write them (`"Saturday, March 3rd 2021"`, `"3/3/21"`,
# `"03 Mar 2021"` ...) into ISO `"2021-03-03"`, one character at a time.
#
# A bidirectional GRU reads the source characters. At every output step the decoder's
# *previous hidden state is the query*; the encoder's states at all source positions are the
# *keys and values*. The score `w^T tanh(W_q q + W_k k)` says how well each source character
# fits the next output character; its softmax (padding masked out) weighs the encoder states
# into a context vector the decoder reads with the previous output character. Those weights
# are an *alignment*: plotted as a heatmap they show which input characters each output
# character was copied or inferred from.

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/jattn/jattn/blob/main/notebooks/03_bahdanau_dates.ipynb)

# %% tags=["skip-execution"]
# %pip install -q "jattn @ git+https://github.com/jattn/jattn"
# The configs live in the repository, next to the package:
# !git clone -q --depth 1 https://github.com/jattn/jattn /content/jattn-repo

# %%
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import jattn
from jattn.data import BOS, EOS, PAD
from jattn.train import load_config, make_datasets, restore_model, train_and_evaluate
from jattn.viz import collect_attention_weights, plot_attention

SMALL = os.environ.get("JATTN_SMALL") == "1"  # the test suite runs a few-step tiny model

# %% [markdown]
# ## The configuration
#
# `configs/bahdanau_dates.py` is the same kind of `ml_collections` config as the
# Transformer's `configs/dates.py`; only `config.model` differs. Its `small` setting trains a
# tiny model for a few steps (for tests); the default trains to >= 99% exact match.

# %%
candidates = [
    Path(jattn.__file__).resolve().parents[1] / "configs",  # a clone or an editable install
    Path("/content/jattn-repo/configs"),  # Colab, after the clone above
]
config_file = next(
    p / "bahdanau_dates.py" for p in candidates if (p / "bahdanau_dates.py").exists()
)
config = load_config(config_file, "small" if SMALL else None)
print(config.model)

# %% [markdown]
# ## The task
#
# Characters in, characters out. The held-out split contains no (date, format) pair seen in
# training.

# %%
train_ds, test_ds = make_datasets(config)
for src, tgt in zip(train_ds.src_texts[:6], train_ds.tgt_texts[:6], strict=True):
    print(f"{src!r:36} -> {tgt!r}")
print("source ids [B, S]:", train_ds.src.shape, " target ids [B, T]:", train_ds.tgt.shape)

# %% [markdown]
# ## Training
#
# The same training program as every jattn model (`python -m jattn.train --config
# configs/bahdanau_dates.py --workdir ...`): AdamW with warmup and cosine decay, the
# padding-masked cross-entropy of teacher-forced logits, checkpoints, and a final evaluation
# that decodes the held-out set greedily and reports exact match.

# %%
workdir = Path(tempfile.mkdtemp(prefix="bahdanau_dates_"))
result = train_and_evaluate(config, str(workdir))
print(result["eval"])

# %% [markdown]
# ## Load the trained model
#
# The checkpoint holds the whole train state; the model is its parameters merged into the
# model's graph.

# %%
model = restore_model(config, workdir)

# %% [markdown]
# ## Translate new dates
#
# `model.generate` decodes greedily (`beam_size=1`) or with beam search; both are single
# jit-compiled loops. Tokens after EOS are PAD.

# %%
texts = list(test_ds.src_texts[:4])  # held out: never seen in training
src = test_ds.src_tokenizer.encode_batch(texts, test_ds.src.shape[1])
max_len = test_ds.tgt.shape[1]
greedy = model.generate(src, max_len=max_len)
beam = model.generate(src, max_len=max_len, beam_size=4)
for text, g, b in zip(texts, greedy, beam, strict=True):
    print(f"{text!r:28} greedy {test_ds.decode(g)!r:14} beam {test_ds.decode(b)!r}")

# %% [markdown]
# ## Alignment heatmaps
#
# Feed the decoder its own output (teacher forcing on the prediction) with
# `sow_weights=True`; `collect_attention_weights` returns the alignment `[B, T, S]`. Row *t*
# is the attention used to produce output character *t*: its query is the state after
# reading output characters `< t`. A trained model looks at the year's digits while writing
# the year, at the month name (or number) while writing the month, and at the day while
# writing the day: a diagonal-ish band, reordered by the input format.

# %%
tgt_in = np.concatenate([np.full((len(texts), 1), BOS), np.asarray(greedy)[:, :-1]], axis=1)
weights = collect_attention_weights(model, src, tgt_in)
(alignment,) = weights.values()  # [B, T, S]
print({name: w.shape for name, w in weights.items()})

fig, axes = plt.subplots(2, 2, figsize=(13, 8), layout="constrained")
for i, ax in enumerate(axes.flat):
    s_len = int(np.sum(src[i] != PAD))
    out = np.asarray(greedy[i])
    t_len = int(np.argmax(out == EOS)) + 1 if np.any(out == EOS) else len(out)
    plot_attention(
        alignment[i, :t_len, :s_len],
        row_labels=[test_ds.tgt_tokenizer.token(j) for j in out[:t_len]],
        col_labels=[test_ds.src_tokenizer.token(j).replace(" ", "␣") for j in src[i, :s_len]],
        title=f"{texts[i]!r} -> {test_ds.decode(out)!r}",
        ax=ax,
    )
plt.show()

# %% [markdown]
# The training program also wrote heatmaps of held-out examples next to its checkpoints:

# %%
print(result["heatmaps"])

# %% [markdown]
# ## Luong attention through the same API
#
# `score="bilinear"` swaps the additive score for Luong's general score `q^T W k` (and
# `score="dot"`, with a unidirectional encoder, for the plain dot product). Only the score
# function changes: the masking, the softmax and the pooling are the same `jattn.attention`.
# Try it: `config.model.score = "bilinear"`, then train again.
