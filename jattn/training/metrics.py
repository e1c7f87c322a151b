"""Evaluation metrics: token accuracy, exact match and BLEU."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import sacrebleu

from jattn.training.losses import check_logits_and_labels

__all__ = ["bleu", "exact_match", "token_accuracy_counts"]


def token_accuracy_counts(
    logits: jax.Array, labels: jax.Array, *, pad_id: int = 0
) -> tuple[jax.Array, jax.Array]:
    """``(correct, total)``: argmax hits and count over non-padding positions.

    Args:
      logits: ``[B, T, V]``.
      labels: ``[B, T]`` int ids; positions equal to ``pad_id`` are not counted.
    """
    logits, labels = check_logits_and_labels(logits, labels, pad_id)
    mask = labels != pad_id
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == labels) & mask)
    return correct, jnp.sum(mask)


def _check_texts(predictions, references) -> None:
    """One string per example in each: a lone string would be compared (or scored)
    character by character, as a sequence of one-character examples."""
    for name, texts in (("predictions", predictions), ("references", references)):
        if isinstance(texts, str | bytes) or not hasattr(texts, "__len__"):
            raise TypeError(
                f"{name} must be a sequence of strings (one per example), got "
                f"{type(texts).__name__} {texts!r:.40}"
            )
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference string."""
    _check_texts(predictions, references)
    if not references:
        raise ValueError("exact_match needs at least one reference")
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def bleu(predictions: Sequence[str], references: Sequence[str], *, tokenize: str = "char") -> float:
    """Corpus BLEU (sacrebleu, 0..100); ``tokenize='char'`` suits character tasks (the
    others: sacrebleu's, e.g. ``'13a'``, ``'intl'``, ``'none'``)."""
    _check_texts(predictions, references)
    if not references:
        raise ValueError("bleu needs at least one reference")
    try:
        score = sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize=tokenize)
    except KeyError as e:  # sacrebleu's own error is the bare name: KeyError: 'foo'
        if e.args != (tokenize,):
            raise
        raise ValueError(
            f"tokenize={tokenize!r} is not one of sacrebleu's tokenizers ('char', '13a', "
            "'intl', 'none', ...)"
        ) from e
    return float(score.score)
