"""Boolean attention masks (True = attend), combined by logical AND.

Masks are built from positions, so they are cheap and XLA fuses them into the
softmax. Shapes follow the batched layout of :func:`jattn.dot_product_attention`:
a mask must broadcast to ``[B, N, T, S]``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = [
    "sequence_mask",
    "valid_lens_mask",
    "causal_mask",
    "sliding_window_mask",
    "key_padding_mask",
    "combine_masks",
]


def is_int(x) -> bool:
    """A static Python or NumPy integer (``np.int64`` is not an ``int``), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Whether ``shape`` broadcasts to ``target`` without changing it."""
    if len(shape) > len(target):
        return False
    return all(a in (1, t) for a, t in zip(shape[::-1], target[::-1], strict=False))


def _as_window(window: int | tuple[int, int]) -> tuple[int, int]:
    parts = window if isinstance(window, tuple | list) else (window,)
    if any(isinstance(w, jax.core.Tracer) for w in parts):
        raise TypeError(
            "window sizes set the shape of the computation, so they must be static Python "
            f"ints, got a traced value {window!r} (under jax.jit, close over the window or "
            "mark it static_argnames)"
        )
    if is_int(window):
        window = (window, window)
    if (
        not isinstance(window, tuple | list)
        or len(window) != 2
        or not all(is_int(w) and w >= 0 for w in window)
    ):
        raise ValueError(
            f"window must be a non-negative int or a pair (left, right) of non-negative ints, "
            f"got {window!r}"
        )
    return int(window[0]), int(window[1])


def _positions(num_queries: int, num_keys: int, offset) -> tuple[jax.Array, jax.Array]:
    """Absolute query positions ``[..., T, 1]`` and key positions ``[1, S]``."""
    offset = jnp.asarray(offset, dtype=jnp.int32)
    q = jnp.arange(num_queries, dtype=jnp.int32)  # [T]
    q = offset[..., None] + jnp.broadcast_to(q, offset.shape + (num_queries,))  # [..., T]
    k = jnp.arange(num_keys, dtype=jnp.int32)
    k = k.reshape((1,) * offset.ndim + (1, num_keys))  # [..., 1, S]
    return q[..., None], k


def check_bool_mask(name: str, mask, *, hint: str = "add float masks to the logits") -> jax.Array:
    """``mask`` as a boolean array; a TypeError for other dtypes, whose 0/1 or 0/-inf
    entries would otherwise be read as False/True (an additive mask turned inside out)."""
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"{name} must be boolean (True = attend), got dtype {mask.dtype}; {hint}")
    return mask


def sequence_mask(lengths: jax.Array, length: int) -> jax.Array:
    """``mask[..., i] = i < lengths[...]``.

    Args:
      lengths: integer array of any shape ``[...]``.
      length: the static size of the new last axis.

    Returns:
      ``[..., length]`` boolean mask.
    """
    lengths = jnp.asarray(lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"lengths must be integers, got dtype {lengths.dtype}")
    if lengths.dtype.itemsize < 4:  # positions up to `length` must not wrap around
        lengths = lengths.astype(jnp.int32)
    pos = jnp.arange(length, dtype=lengths.dtype).reshape((1,) * lengths.ndim + (length,))
    return pos < lengths[..., None]


def valid_lens_mask(valid_lens: jax.Array, num_queries: int, num_keys: int) -> jax.Array:
    """The mask of d2l's ``valid_lens``: each query sees the first ``valid_len`` keys.

    Args:
      valid_lens: ``[B]`` (one length per example) or ``[B, T]`` (one per query).
      num_queries: T.
      num_keys: S.

    Returns:
      ``[B, T, S]`` boolean mask.
    """
    valid_lens = jnp.asarray(valid_lens)
    if valid_lens.ndim == 1:
        valid_lens = jnp.broadcast_to(valid_lens[:, None], (valid_lens.shape[0], num_queries))
    elif valid_lens.ndim != 2 or valid_lens.shape[1] != num_queries:
        raise ValueError(
            f"valid_lens must have shape [B] or [B, T] with T={num_queries}, "
            f"got {list(valid_lens.shape)}"
        )
    return sequence_mask(valid_lens, num_keys)


def causal_mask(num_queries: int, num_keys: int, *, offset=0) -> jax.Array:
    """Causal mask: query ``i`` (at absolute position ``offset + i``) sees keys ``j <= offset + i``.

    ``offset=0`` is top-left aligned, as ``jax.nn.dot_product_attention(is_causal=True)``.
    For a key/value cache where the T queries are the last T of S positions use
    ``offset=S - T``; ``offset`` may be a traced ``[B]`` array (one cache index per example).

    Returns:
      ``[T, S]`` boolean mask, or ``[B, T, S]`` when ``offset`` has shape ``[B]``.
    """
    q, k = _positions(num_queries, num_keys, offset)
    return k <= q


def sliding_window_mask(
    num_queries: int, num_keys: int, window: int | tuple[int, int], *, offset=0
) -> jax.Array:
    """Local window: query at position ``p`` sees keys ``p - left <= j <= p + right``.

    Same convention as ``local_window_size`` of ``jax.nn.dot_product_attention``; an int
    ``w`` means ``(w, w)``. ``offset`` as in :func:`causal_mask`.

    Returns:
      ``[T, S]`` boolean mask, or ``[B, T, S]`` when ``offset`` has shape ``[B]``.
    """
    left, right = _as_window(window)
    q, k = _positions(num_queries, num_keys, offset)
    return (k >= q - left) & (k <= q + right)


def key_padding_mask(key_valid: jax.Array) -> jax.Array:
    """Turns a ``[B, S]`` key validity array (True = real token) into a ``[B, 1, 1, S]`` mask."""
    key_valid = jnp.asarray(key_valid)
    if key_valid.ndim != 2:
        raise ValueError(f"key_valid must have shape [B, S], got {list(key_valid.shape)}")
    return key_valid.astype(bool)[:, None, None, :]


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    """Logical AND of the given masks (``None`` entries are skipped); ``None`` if none given.

    Masks of lower rank are aligned on the right, as NumPy broadcasting does.
    """
    present = [check_bool_mask("mask", m) for m in masks if m is not None]
    if not present:
        return None
    ndim = max(m.ndim for m in present)
    out = None
    for m in present:
        m = m.reshape((1,) * (ndim - m.ndim) + m.shape)
        out = m if out is None else jnp.logical_and(out, m)
    return out
