"""Padding-masked cross-entropy with label smoothing."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import optax

from jattn.functional import _checks
from jattn.functional._checks import concrete

__all__ = ["masked_cross_entropy"]


def check_logits_and_labels(logits, labels, pad_id) -> tuple[jax.Array, jax.Array]:
    """``logits [B, T, V]`` (real numbers) and ``labels [B, T]`` (integer ids) as arrays,
    ``pad_id`` an int: a float label (``1.5``) would one-hot to zeros and count as a
    miss without a word."""
    logits = _checks.check_real("logits", logits)
    labels = _checks.check_int_array("labels", labels)
    if not _checks.is_int(pad_id):
        raise TypeError(f"pad_id must be an int, got {pad_id!r}{_checks.type_note(pad_id)}")
    if logits.ndim != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits must be [B, T, V] and labels [B, T], got {list(logits.shape)} and "
            f"{list(labels.shape)}"
        )
    return logits, labels


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
    logits, labels = check_logits_and_labels(logits, labels, pad_id)
    if (
        isinstance(label_smoothing, bool)
        or not isinstance(label_smoothing, numbers.Real)
        or not 0.0 <= label_smoothing < 1.0
    ):
        raise ValueError(f"label_smoothing must be a float in [0, 1), got {label_smoothing!r}")
    num_classes = logits.shape[-1]
    values = concrete(labels)
    if values is not None:  # ids in [0, V) or padding
        bad = (values != pad_id) & ((values < 0) | (values >= num_classes))
        if bad.any():
            raise ValueError(
                f"labels must be in [0, {num_classes}) or pad_id={pad_id}, got "
                f"{sorted(set(values[bad].tolist()))[:5]}"
            )
    mask = labels != pad_id
    # Padding positions may hold anything (NaN, inf): they are replaced before the loss,
    # so neither the loss nor its gradient sees them.
    logits = jnp.where(mask[..., None], logits.astype(jnp.float32), jnp.float32(0.0))
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    # safe_: a -inf logit (a banned class) with target 0 contributes 0, not 0 * -inf
    per_token = optax.safe_softmax_cross_entropy(logits, targets)  # [B, T]
    per_token = jnp.where(mask, per_token, jnp.float32(0.0))
    num_tokens = mask.astype(jnp.float32).sum()
    return per_token.sum() / jnp.maximum(num_tokens, 1.0), num_tokens
