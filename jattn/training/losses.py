"""Padding-masked cross-entropy with label smoothing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["masked_cross_entropy"]


def masked_cross_entropy(
    logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0, pad_id: int = 0
) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy over the non-padding target positions.

    The smoothed target puts ``1 - label_smoothing`` on the label and spreads
    ``label_smoothing`` uniformly over all V classes (``optax.smooth_labels``).

    Args:
      logits: ``[B, T, V]``.
      labels: ``[B, T]`` int ids; positions equal to ``pad_id`` are ignored.
      label_smoothing: in ``[0, 1)``.
      pad_id: the padding id.

    Returns:
      ``(loss, num_tokens)``: the float32 mean over non-padding positions (0 when
      there are none) and their count.
    """
    if logits.ndim != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits must be [B, T, V] and labels [B, T], got {list(logits.shape)} and "
            f"{list(labels.shape)}"
        )
    num_classes = logits.shape[-1]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    per_token = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)  # [B, T]
    mask = (labels != pad_id).astype(jnp.float32)
    num_tokens = mask.sum()
    return (per_token * mask).sum() / jnp.maximum(num_tokens, 1.0), num_tokens
