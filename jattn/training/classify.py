"""The training program's classification tasks: evaluation, samples and heatmaps.

A classification task (:class:`jattn.data.ClassificationDataset`) feeds the model its
inputs by argument name (``model(images=...)``) and scores the logits ``[B, K]``
against one label per example (:func:`jattn.training.state.forward_loss`).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jattn.data import eval_batches
from jattn.training.state import PAD_LABEL

__all__ = [
    "evaluate",
    "sample_lines",
    "save_heatmaps",
    "save_question_heatmaps",
    "save_rollout_heatmaps",
]


def evaluate(eval_step, state, ds, *, batch_size: int, place=None):
    """``({'loss', 'accuracy'}, predicted [N])`` on ``ds``; ``place(batch)`` puts each
    batch where ``eval_step`` (:func:`~jattn.training.state.make_eval_step` with
    ``kind='classification'``) reads it."""
    loss_sum = correct = count = 0.0
    predicted = []
    for n, batch in eval_batches(ds, batch_size, "label", PAD_LABEL):
        batch = batch if place is None else place(batch)
        ls, c, k, pred = jax.device_get(eval_step(state.params, state.rest, batch))
        loss_sum, correct, count = loss_sum + ls, correct + c, count + k
        predicted.append(np.asarray(pred[:n]))
    metrics = {"loss": float(loss_sum / count), "accuracy": float(correct / count)}
    return metrics, np.concatenate(predicted)


def sample_lines(ds, predicted, count: int) -> list[str]:
    """One line per example for the first ``count``: right or wrong, label, prediction."""
    lines = []
    for i in range(min(count, len(ds))):
        label, guess = ds.class_names[ds.labels[i]], ds.class_names[predicted[i]]
        mark = "ok " if predicted[i] == ds.labels[i] else "BAD"
        lines.append(f"  {mark} example {i}: label {label!r} -> predicted {guess!r}")
    return lines


def save_heatmaps(graphdef, state, ds, predicted, workdir, *, count: int) -> list[str]:
    """The heatmaps of the model: :func:`save_question_heatmaps` for a model that
    answers questions about images, :func:`save_rollout_heatmaps` for an image
    classifier; none for others."""
    model = nnx.merge(graphdef, state.params, state.rest)
    if hasattr(model, "question_to_image_weights"):
        return save_question_heatmaps(model, ds, predicted, workdir, count=count)
    return save_rollout_heatmaps(model, ds, predicted, workdir, count=count)


def save_question_heatmaps(model, ds, predicted, workdir, *, count: int) -> list[str]:
    """Writes ``question_attention_{i}.png`` for the first ``count`` test examples: for
    each real question token (columns) and layer (rows), its question-to-image weights
    (mean over heads) laid over the image, titled with the answer and the prediction."""
    if count <= 0:
        return []
    import matplotlib.pyplot as plt

    from jattn.data.vqa import QUESTION_WORDS
    from jattn.viz import plot_attention_on_image, save_figure

    n = min(count, len(ds))
    images, question = ds.inputs["images"][:n], ds.inputs["question"][:n]
    layers = [np.asarray(w).mean(axis=1) for w in model.question_to_image_weights(images, question)]
    h, w = model.grid_hw
    paths = []
    for i in range(n):
        tokens = [int(t) for t in question[i] if t != 0]
        fig, axes = plt.subplots(len(layers), len(tokens), squeeze=False,
                                 figsize=(1.6 * len(tokens), 1.7 * len(layers)))  # fmt: skip
        for row, weights in enumerate(layers):
            for col, token in enumerate(tokens):
                ax = axes[row, col]
                plot_attention_on_image(images[i], weights[i, col].reshape(h, w), ax=ax,
                                        colorbar=False, title=QUESTION_WORDS[token])  # fmt: skip
                ax.set_xticks([]), ax.set_yticks([])
            axes[row, 0].set_ylabel(f"layer {row}")
        words = " ".join(QUESTION_WORDS[t] for t in tokens)
        answer, guess = ds.class_names[ds.labels[i]], ds.class_names[predicted[i]]
        fig.suptitle(f"{words}  answer {answer}, predicted {guess}")
        fig.tight_layout()
        paths.append(save_figure(fig, Path(workdir) / f"question_attention_{i}.png", dpi=90))
        plt.close(fig)  # made by pyplot: closed, or it stays in memory (and on a notebook)
    return paths


def save_rollout_heatmaps(model, ds, predicted, workdir, *, count: int) -> list[str]:
    """Writes ``rollout_{i}.png`` for the first ``count`` test images: attention rollout
    (:func:`jattn.layers.rollout_map`) of the trained model laid over each image, titled
    with the label and the prediction. Models without ``attention_weights`` (or data
    without ``images``) get none."""
    if count <= 0 or "images" not in ds.inputs or not hasattr(model, "attention_weights"):
        return []  # nor import matplotlib, which writes its font cache on import
    from jattn.layers import rollout_map
    from jattn.viz import plot_attention_on_image, save_figure

    images = ds.inputs["images"][: min(count, len(ds))]
    weights = model.attention_weights(images)
    prefix = model.num_prefix_tokens
    maps = np.asarray(rollout_map(weights, model.grid_hw, num_prefix_tokens=prefix))
    paths = []
    for i, image in enumerate(images):
        label, guess = ds.class_names[ds.labels[i]], ds.class_names[predicted[i]]
        fig = plot_attention_on_image(
            image, maps[i], title=f"rollout: label {label}, predicted {guess}"
        )
        paths.append(save_figure(fig, Path(workdir) / f"rollout_{i}.png", dpi=110))
    return paths
