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
# # 11 Attention for vision: a ViT on handwritten digits, questions about images, and a DETR
#
# Three tasks of the training program that are not sequence to sequence:
#
# 1. A Vision Transformer classifies scikit-learn's bundled 8x8 handwritten digits
#    (scikit-learn's example split: the first half trains, the second half tests; the
#    example's SVM scores 96.9%). Attention rollout shows which pixels the class token
#    draws on.
# 2. A visual-question-answering toy: a 3x3 canvas of digits and a question such as
#    "what is left of 3 ?" or "how many 7 ?". The question and the image cells attend to
#    each other (co-attention); the heatmaps show each question token's attention over
#    the cells.
# 3. A detection toy: a small DETR's object queries find digits on a canvas.

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/jattn/jattn/blob/main/notebooks/11_vision_and_vqa.ipynb)

# %% tags=["skip-execution"]
# %pip install -q "jattn @ git+https://github.com/jattn/jattn"
# %pip install -q scikit-learn  # the digits (jattn's "digits" extra)
# The configs live in the repository, next to the package:
# !git clone -q --depth 1 https://github.com/jattn/jattn /content/jattn-repo

# %%
import os
import tempfile
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import jattn
from jattn.data.vqa import QUESTION_WORDS
from jattn.layers import rollout_map
from jattn.train import load_config, make_datasets, restore_model, train_and_evaluate
from jattn.viz import collect_attention_weights, plot_attention_on_image

SMALL = os.environ.get("JATTN_SMALL") == "1"  # the test suite runs a few-step tiny model

candidates = [
    Path(jattn.__file__).resolve().parents[1] / "configs",  # a clone or an editable install
    Path("/content/jattn-repo/configs"),  # Colab, after the clone above
]
configs = next(p for p in candidates if (p / "vit_digits.py").exists())

# %% [markdown]
# ## A ViT on the digits
#
# `configs/vit_digits.py`: 2x2-pixel patches (a 4x4 grid), a convolutional stem (two 3x3
# convolutions before the patches, which help a transformer on a data set this small),
# 4 pre-norm layers of width 64, a class token. Training batches are shifted, rotated
# and scaled a little. The full setting takes about 3 minutes on a 2-core CPU and
# reaches 97.3% on the test half.

# %%
config = load_config(configs / "vit_digits.py", "small" if SMALL else None)
if SMALL:  # 3 steps, fewer weight shapes to initialise, no heatmap files (drawn below)
    config.model.update(stem_layers=1, stem_features=16, mlp_features=16)
    config.train.update(num_steps=3, checkpoint_every=3)
    config.eval.num_heatmaps = 0
train_ds, test_ds = make_datasets(config)
print(f"{len(train_ds)} training and {len(test_ds)} test images of {train_ds.model_sizes()}")
fig, axes = plt.subplots(1, 8, figsize=(8, 1.3))
batch = train_ds.sample_batch(0, 0, 8)  # an augmented training batch
for ax, image, label in zip(axes, batch["images"], batch["label"], strict=True):
    ax.imshow(image[..., 0], cmap="gray_r"), ax.set_title(str(label)), ax.axis("off")
plt.show()

# %%
workdir = Path(tempfile.mkdtemp(prefix="vit_digits_"))
result = train_and_evaluate(config, str(workdir))
print(result["eval"])

# %% [markdown]
# ## Attention rollout over the image
#
# `model.attention_weights(images)` gives each layer's weights `[B, N, T, T]`;
# `rollout_map` follows them through the layers (Abnar & Zuidema, 2020) and returns the
# class token's share of each patch, on the 4x4 grid, drawn over the image.

# %%
model = restore_model(workdir)
images = test_ds.inputs["images"][:6]
maps = np.asarray(rollout_map(model.attention_weights(images), model.grid_hw))
# one compiled forward pass (run op by op, a model compiles each of its operations)
predict = nnx.jit(lambda model, x: model(x, deterministic=True))
logits = np.asarray(predict(model, images))
fig, axes = plt.subplots(1, 6, figsize=(13, 2.4))
for ax, image, m, label, guess in zip(
    axes, images, maps, test_ds.labels[:6], logits.argmax(-1), strict=True
):
    plot_attention_on_image(image, m, ax=ax, colorbar=False, title=f"{label} -> {guess}")
plt.show()

# %% [markdown]
# ## Visual question answering with co-attention
#
# `configs/vqa_toy.py`: each 8x8 cell of the canvas is one patch; the question's tokens
# and the 9 cells attend to each other in every layer (`jattn.layers.CoAttention`), then
# each to itself. In the cells' self-attention four of the eight heads each see one
# neighbouring cell (left, right, above, below: per-head masks), so "what is left of 3"
# becomes: find the 3, read what its left-looking head gathered. Every training batch is
# freshly generated; the full setting reaches 100% on the test questions in about 2.5
# minutes on a 2-core CPU.

# %%
config = load_config(configs / "vqa_toy.py", "small" if SMALL else None)
train_ds, test_ds = make_datasets(config)
fig, axes = plt.subplots(1, 4, figsize=(10, 2.8))
for i, ax in enumerate(axes):
    words = " ".join(QUESTION_WORDS[t] for t in test_ds.inputs["question"][i] if t)
    ax.imshow(test_ds.inputs["images"][i, ..., 0], cmap="gray_r")
    ax.set_title(f"{words}\nanswer {test_ds.labels[i]}", fontsize=9), ax.axis("off")
plt.show()

# %%
workdir = Path(tempfile.mkdtemp(prefix="vqa_toy_"))
result = train_and_evaluate(config, str(workdir))
print(result["eval"])

# %% [markdown]
# The heatmaps the run wrote: each question token (columns) in each layer (rows), its
# attention over the cells. A trained model's digit token looks at the cell holding
# that digit.

# %%
for path in result["heatmaps"]:
    plt.figure(figsize=(9, 5))
    plt.imshow(plt.imread(path)), plt.axis("off")
    plt.show()

# %% [markdown]
# ## Finding digits: a small DETR
#
# `configs/detection_toy.py`: one to three digits of two sizes on a 32x32 canvas. Six
# object queries cross-attend to the image's patches; each predicts a digit or "no
# object" and a box. Training matches queries to objects with the Hungarian algorithm
# (scipy, inside the jitted step) and scores AP50; the full setting reaches 0.97 in about
# 4 minutes on a 2-core CPU. Below, the decoder's cross-attention: where each query looks.

# %%
config = load_config(configs / "detection_toy.py", "small" if SMALL else None)
if SMALL:  # 3 steps, fewer weight shapes to initialise
    config.model.update(stem_features=16, mlp_features=16)
    config.train.update(num_steps=3, checkpoint_every=3)
train_ds, test_ds = make_datasets(config)
workdir = Path(tempfile.mkdtemp(prefix="detection_toy_"))
result = train_and_evaluate(config, str(workdir))
print(result["eval"])

# %%
model = restore_model(workdir)
image = test_ds.images[:1]
logits, boxes = predict(model, image)  # class logits [1, Q, K + 1], boxes [1, Q, 4]
probs = np.asarray(jax.nn.softmax(logits, axis=-1))
sown = collect_attention_weights(model, image, deterministic=True)
cross = np.asarray([w for k, w in sown.items() if "cross" in k][-1])[0].mean(0)  # [Q, S]
h, w = model.grid_hw
fig, axes = plt.subplots(1, len(cross), figsize=(2.2 * len(cross), 2.6))
for q, ax in enumerate(axes):
    digit = probs[0, q].argmax()
    label = "none" if digit == probs.shape[-1] - 1 else str(digit)
    plot_attention_on_image(image[0], cross[q].reshape(h, w), ax=ax, colorbar=False,
                            title=f"query {q}: {label} ({probs[0, q].max():.2f})")  # fmt: skip
plt.show()
