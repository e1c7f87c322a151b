"""Checks shared by the models: token ids against the vocabulary, special ids."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jattn.functional._checks import check_size, check_static, concrete, is_int, type_note


def check_token_ids(name: str, tokens, vocab_size: int) -> None:
    """Raises ValueError for concrete ``tokens`` outside ``[0, vocab_size)``.

    An out-of-range id would gather NaN (beyond the table) or wrap around (negative)
    in the embedding, silently. Traced tokens (inside ``jax.jit``) cannot be checked:
    :func:`jattn.layers.positional.embed_ids` gives their rows NaN.
    """
    values = concrete(tokens)
    if values is None or not values.size:
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"{name} holds token ids outside the vocabulary [0, {vocab_size}): min {lo}, max {hi}"
        )


def check_special_ids(
    vocab_size: int, vocab: str = "vocabulary", *, vocab_name: str = "vocab_size", **ids
) -> None:
    """``vocab_size`` (the argument ``vocab_name``) is a positive int and each of ``ids``
    (e.g. ``pad_id=0``) an int in ``[0, vocab_size)``."""
    check_static(vocab_name, vocab_size, "int")
    if not is_int(vocab_size) or vocab_size <= 0:
        raise ValueError(
            f"{vocab_name}: the {vocab} size must be a positive int, got "
            f"{vocab_size!r}{type_note(vocab_size)}"
        )
    for name, value in ids.items():
        if not is_int(value):  # NumPy ints are ints; bools, floats and strs are not
            raise ValueError(f"{name} must be an int, got {value!r}")
        if not 0 <= value < vocab_size:
            raise ValueError(f"{name}={value} is outside the {vocab} [0, {vocab_size})")


def check_search_options(beam_size, length_penalty) -> tuple[int, float]:
    """``beam_size`` a positive int, ``length_penalty`` a float >= 0."""
    beam_size = check_size("beam_size", beam_size)
    if isinstance(length_penalty, bool) or not isinstance(
        length_penalty, int | float | np.floating
    ):
        raise ValueError(f"length_penalty must be a float >= 0, got {length_penalty!r}")
    if not length_penalty >= 0:  # NaN fails too
        raise ValueError(f"length_penalty must be a float >= 0, got {length_penalty!r}")
    if length_penalty == float("inf"):
        raise ValueError(f"length_penalty must be finite, got {length_penalty!r}")
    return int(beam_size), float(length_penalty)


def check_tokens(name: str, tokens, max_len: int | None = None, *, vocab_size: int | None = None):
    """``tokens`` as an integer ``[B, L]`` jax array: a ValueError naming ``name`` for
    another rank or dtype (a str, None), ids outside ``[0, vocab_size)`` (when concrete)
    or a length beyond ``max_len``."""
    if not isinstance(tokens, jax.Array | np.ndarray):  # NumPy first: an int64 id must not wrap
        try:
            tokens = np.asarray(tokens)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} must be integer tokens [B, L], got {tokens!r}") from e
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"{name} must be integer tokens [B, L], got {tokens.dtype}{list(tokens.shape)}"
        )
    if vocab_size is not None:  # before any int64 -> int32 conversion can wrap an id
        check_token_ids(name, tokens, vocab_size)
    tokens = jnp.asarray(tokens)
    if max_len is not None and tokens.shape[1] > max_len:
        raise ValueError(f"{name} length {tokens.shape[1]} exceeds max_len={max_len}")
    return tokens
