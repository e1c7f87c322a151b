"""Boolean attention masks (True = attend), combined by logical AND.

Masks are built from positions, so they are cheap and XLA fuses them into the
softmax. Shapes follow the batched layout of :func:`jattn.dot_product_attention`:
a mask must broadcast to ``[B, N, T, S]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn.functional._checks import (  # noqa: F401  (re-exported: softmax, mods use them)
    _as_window,
    broadcasts_to,
    check_bool_mask,
    check_int_array,
    check_size,
    fmt,
    is_int,
)

__all__ = [
    "sequence_mask",
    "valid_lens_mask",
    "causal_mask",
    "sliding_window_mask",
    "key_padding_mask",
    "combine_masks",
]


def _positions(num_queries: int, num_keys: int, offset) -> tuple[jax.Array, jax.Array]:
    """Absolute query positions ``[..., T, 1]`` and key positions ``[1, S]``."""
    num_queries = check_size("num_queries", num_queries)
    num_keys = check_size("num_keys", num_keys)
    offset = check_int_array("offset", offset)
    q = jnp.arange(num_queries, dtype=jnp.int32)  # [T]
    q = offset[..., None] + jnp.broadcast_to(q, offset.shape + (num_queries,))  # [..., T]
    k = jnp.arange(num_keys, dtype=jnp.int32)
    k = k.reshape((1,) * offset.ndim + (1, num_keys))  # [..., 1, S]
    return q[..., None], k


def sequence_mask(lengths: jax.Array, length: int) -> jax.Array:
    """``mask[..., i] = i < lengths[...]``.

    Args:
      lengths: integer array of any shape ``[...]`` (a float array is a TypeError, not
        rounded; lengths beyond ``[0, length]`` mean none or all of it, never wrap).
      length: the static size of the new last axis.

    Returns:
      ``[..., length]`` boolean mask.
    """
    return _sequence_mask("lengths", lengths, length)


def _sequence_mask(name: str, lengths, length) -> jax.Array:
    length = check_size("length", length)
    # int32, lengths beyond [0, length] clipped first (the same mask), so none wraps around
    lengths = check_int_array(name, lengths, clip=(0, length))
    pos = jnp.arange(length, dtype=jnp.int32).reshape((1,) * lengths.ndim + (length,))
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
    num_queries = check_size("num_queries", num_queries)
    num_keys = check_size("num_keys", num_keys)
    valid_lens = check_int_array("valid_lens", valid_lens, clip=(0, num_keys))
    if valid_lens.ndim == 1:
        valid_lens = jnp.broadcast_to(valid_lens[:, None], (valid_lens.shape[0], num_queries))
    elif valid_lens.ndim != 2 or valid_lens.shape[1] != num_queries:
        raise ValueError(
            f"valid_lens must have shape [B] or [B, T] with T={num_queries}, "
            f"got {list(valid_lens.shape)}"
        )
    return _sequence_mask("valid_lens", valid_lens, num_keys)


def causal_mask(num_queries: int, num_keys: int, *, offset=0) -> jax.Array:
    """Causal mask: query ``i`` (at absolute position ``offset + i``) sees keys ``j <= offset + i``.

    ``offset=0`` is top-left aligned, as ``jax.nn.dot_product_attention(is_causal=True)``.
    For a key/value cache where the T queries are the last T of S positions use
    ``offset=S - T``; ``offset`` may be a traced ``[B]`` array (one cache index per example).
    ``num_queries`` and ``num_keys`` are positive ints; ``offset`` holds integers (a float
    is a TypeError, not truncated) that fit int32 (a ValueError otherwise, not wrapped).

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
    """Turns a ``[B, S]`` boolean key validity array (True = real token) into a
    ``[B, 1, 1, S]`` mask. Other dtypes are a TypeError: an additive float mask
    ``[0, 0, -inf]`` would otherwise be read inverted (``-inf`` as valid)."""
    key_valid = check_bool_mask(
        "key_valid", key_valid, hint="for token ids use key_padding_mask(tokens != pad_id)"
    )
    if key_valid.ndim != 2:
        raise ValueError(f"key_valid must have shape [B, S], got {list(key_valid.shape)}")
    return key_valid[:, None, None, :]


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    """Logical AND of the given masks (``None`` entries are skipped); ``None`` if none given.

    Masks of lower rank are aligned on the right, as NumPy broadcasting does; masks
    whose shapes do not broadcast together are a ValueError naming their positions.
    """
    indexed = [(i, check_bool_mask("mask", m)) for i, m in enumerate(masks) if m is not None]
    if not indexed:
        return None
    _check_broadcast_together(indexed)
    present = [m for _, m in indexed]
    ndim = max(m.ndim for m in present)
    out = None
    for m in present:
        m = m.reshape((1,) * (ndim - m.ndim) + m.shape)
        out = m if out is None else jnp.logical_and(out, m)
    return out


def _check_broadcast_together(indexed: list[tuple[int, jax.Array]]) -> None:
    """A ValueError naming the first two of ``(position, mask)`` whose shapes do not
    broadcast together (a set of shapes broadcasts when every pair does)."""
    for j, (pos_b, b) in enumerate(indexed):
        for pos_a, a in indexed[:j]:
            try:
                jnp.broadcast_shapes(a.shape, b.shape)
            except ValueError:
                raise ValueError(
                    f"combine_masks: masks[{pos_a}] {fmt(a.shape)} and masks[{pos_b}] "
                    f"{fmt(b.shape)} do not broadcast together (shapes are aligned on the "
                    "right; each axis must match or be 1)"
                ) from None
