"""Checks shared by the models: token ids against the vocabulary, special ids."""

from __future__ import annotations

import numpy as np

from jattn.functional._checks import concrete, is_int


def check_token_ids(name: str, tokens, vocab_size: int) -> None:
    """Raises ValueError for concrete ``tokens`` outside ``[0, vocab_size)``.

    An out-of-range id would gather NaN (beyond the table) or wrap around (negative)
    in the embedding, silently. Traced tokens (inside ``jax.jit``) cannot be checked.
    """
    values = concrete(tokens)
    if values is None or not values.size:
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"{name} holds token ids outside the vocabulary [0, {vocab_size}): min {lo}, max {hi}"
        )


def check_special_ids(vocab_size: int, vocab: str = "vocabulary", **ids) -> None:
    """``vocab_size`` is a positive int and each of ``ids`` (e.g. ``pad_id=0``) an int in
    ``[0, vocab_size)``."""
    if not is_int(vocab_size) or vocab_size <= 0:
        raise ValueError(f"the {vocab} size must be a positive int, got {vocab_size!r}")
    for name, value in ids.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
        if not 0 <= value < vocab_size:
            raise ValueError(f"{name}={value} is outside the {vocab} [0, {vocab_size})")


def check_search_options(beam_size, length_penalty) -> tuple[int, float]:
    """``beam_size`` a positive int, ``length_penalty`` a float >= 0."""
    if isinstance(beam_size, bool) or not isinstance(beam_size, int | np.integer) or beam_size <= 0:
        raise ValueError(f"beam_size must be a positive int, got {beam_size!r}")
    if isinstance(length_penalty, bool) or not isinstance(
        length_penalty, int | float | np.floating
    ):
        raise ValueError(f"length_penalty must be a float >= 0, got {length_penalty!r}")
    if not length_penalty >= 0:
        raise ValueError(f"length_penalty must be a float >= 0, got {length_penalty!r}")
    return int(beam_size), float(length_penalty)
