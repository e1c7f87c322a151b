"""Positional encodings as pure functions: sinusoidal, rotary, ALiBi and T5 buckets.

Absolute encodings (sinusoidal) are added to the embeddings; relative ones act inside
attention: rotary rotates queries and keys, ALiBi and the T5 bias are additive
``bias=`` arguments of :func:`jattn.dot_product_attention`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jattn.functional import _checks
from jattn.functional._checks import check_int_array, check_positive_int, check_size, fmt

__all__ = [
    "sinusoidal_encoding",
    "rotary_embedding",
    "alibi_slopes",
    "alibi_bias",
    "relative_position_buckets",
]


def _relative_positions(num_queries: int, num_keys: int, offset) -> jax.Array:
    """``key_position - query_position``: ``[T, S]``, or ``[B, T, S]`` for ``offset [B]``."""
    num_queries = check_size("num_queries", num_queries)
    num_keys = check_size("num_keys", num_keys)
    offset = check_int_array("offset", offset)
    q = jnp.arange(num_queries, dtype=jnp.int32).reshape((1,) * offset.ndim + (num_queries,))
    q = offset[..., None] + q  # [..., T]
    k = jnp.arange(num_keys, dtype=jnp.int32).reshape((1,) * offset.ndim + (1, num_keys))
    return k - q[..., None]


def check_even_features(features) -> int:
    """``features`` of a sinusoidal encoding: a positive even int."""
    features = check_size("features", features)
    if features % 2:
        raise ValueError(f"sinusoidal encoding needs an even positive features, got {features}")
    return features


def _as_positions(positions) -> jax.Array:
    """Positions: integers (int32, values checked to fit) or floats, never complex."""
    if not isinstance(positions, jax.Array | np.ndarray) and not _checks.is_int(positions):
        positions = np.asarray(positions)  # NumPy first: an int64 position must not wrap
    if _checks.is_int(positions) or jnp.issubdtype(positions.dtype, jnp.integer):
        return check_int_array("positions", positions)
    return _checks.check_real("positions", positions)


def sinusoidal_encoding(positions: jax.Array, features: int) -> jax.Array:
    """Vaswani et al.'s sinusoidal encoding, with d2l's exact formula.

    ``P[i, 2j] = sin(i / 10000^(2j/D))`` and ``P[i, 2j+1] = cos(i / 10000^(2j/D))``.

    Args:
      positions: integer (within int32) or float positions ``[...]``, e.g.
        ``jnp.arange(T)``; complex ones are a TypeError.
      features: D, even.

    Returns:
      ``[..., D]`` float32.
    """
    features = check_even_features(features)
    positions = _as_positions(positions).astype(jnp.float32)
    inv = jnp.power(10000.0, jnp.arange(0, features, 2, dtype=jnp.float32) / features)  # [D/2]
    angles = positions[..., None] / inv.reshape((1,) * positions.ndim + (features // 2,))
    # interleave: sin at even, cos at odd indices
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(
        positions.shape + (features,)
    )


def rotary_embedding(
    x: jax.Array,
    positions: jax.Array,
    *,
    max_wavelength: float = 10000.0,
    interleaved: bool = False,
) -> jax.Array:
    """Rotary position embedding (RoPE, Su et al. 2021) of queries or keys.

    Feature pairs are rotated by the angle ``position * max_wavelength^(-2i/H)``, so
    that ``<rope(q, m), rope(k, n)>`` depends on ``m - n`` only. Pairs are
    ``(x[i], x[i + H/2])`` (half-split, as GPT-NeoX and Llama in Hugging Face) or, with
    ``interleaved=True``, ``(x[2i], x[2i+1])`` (as the RoFormer paper and GPT-J).

    Args:
      x: ``[..., T, N, H]`` with even H.
      positions: ``[T]`` or ``[..., T]`` integer positions (broadcast over N), within
        int32 (float positions, e.g. interpolated ones, are used as they are).
      max_wavelength: the base (10000 in the paper), finite and > 0.
      interleaved: the pairing of features, see above.

    Returns:
      ``[..., T, N, H]`` in the dtype of ``x`` (computed in float32).
    """
    x = _checks.as_array("x", x)
    max_wavelength = _checks.check_finite_scalar(
        "max_wavelength", max_wavelength, positive=True, allow_traced=True
    )
    interleaved = _checks.check_flag("interleaved", interleaved)
    if x.ndim < 3 or x.shape[-1] % 2:
        raise ValueError(
            f"rotary_embedding needs x of shape [..., T, N, H] with even H, got {fmt(x.shape)}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"rotary_embedding needs a float x, got dtype {x.dtype}")
    positions = _as_positions(positions)
    lead = x.shape[:-3]  # the batch dims positions [..., T] must broadcast to
    if (
        positions.ndim == 0
        or positions.shape[-1] != x.shape[-3]
        or positions.ndim > x.ndim - 2
        or any(p not in (1, b) for p, b in zip(positions.shape[-2::-1], lead[::-1], strict=False))
    ):
        raise ValueError(
            f"positions {fmt(positions.shape)} must be [T] or [..., T] with T={x.shape[-3]} "
            f"for x {fmt(x.shape)}"
        )
    half = x.shape[-1] // 2
    freqs = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * freqs.reshape(
        (1,) * positions.ndim + (half,)
    )  # [..., T, H/2]
    sin = jnp.sin(angles)[..., None, :]  # [..., T, 1, H/2]
    cos = jnp.cos(angles)[..., None, :]
    xf = x.astype(jnp.float32)
    if interleaved:
        pairs = xf.reshape(x.shape[:-1] + (half, 2))
        a, b = pairs[..., 0], pairs[..., 1]
    else:
        a, b = xf[..., :half], xf[..., half:]
    lead = x.ndim - sin.ndim
    sin = sin.reshape((1,) * lead + sin.shape)
    cos = cos.reshape((1,) * lead + cos.shape)
    ra, rb = a * cos - b * sin, a * sin + b * cos
    if interleaved:
        out = jnp.stack([ra, rb], axis=-1).reshape(x.shape)
    else:
        out = jnp.concatenate([ra, rb], axis=-1)
    return out.astype(x.dtype)


def alibi_slopes(num_heads: int) -> jax.Array:
    """ALiBi head slopes (Press et al. 2022), ``[N]`` float32.

    For N a power of two the slopes are the geometric sequence ``2^(-8/N), 2^(-16/N), ...``
    (N=8: 1/2, 1/4, ..., 1/256). Otherwise, with P the largest power of two below N,
    the P slopes of P heads followed by every other slope of 2P heads, as the
    paper's reference code does.
    """
    num_heads = check_positive_int("num_heads", num_heads)

    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    p = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two(p)
    if p != num_heads:
        slopes += power_of_two(2 * p)[0::2][: num_heads - p]
    return jnp.asarray(slopes, dtype=jnp.float32)


def alibi_bias(
    slopes: jax.Array,
    num_queries: int,
    num_keys: int,
    *,
    offset=0,
    bidirectional: bool = False,
) -> jax.Array:
    """ALiBi attention bias: ``slope_n * (j - i)`` (causal) or ``-slope_n * |j - i|``.

    The causal form is the paper's: key ``j`` of query ``i`` gets ``-slope * (i - j)``;
    keys after the query get a positive bias, so combine it with a causal mask.

    Args:
      slopes: ``[N]``, e.g. :func:`alibi_slopes`.
      num_queries: T; query ``i`` sits at position ``offset + i``.
      num_keys: S.
      offset: int or ``[B]`` (as :func:`jattn.causal_mask`).
      bidirectional: symmetric distance penalty (for encoders).

    Returns:
      ``[N, T, S]`` float32, or ``[B, N, T, S]`` for ``offset [B]``; usable as ``bias=``.
    """
    slopes = _checks.check_real("slopes", slopes).astype(jnp.float32)
    bidirectional = _checks.check_flag("bidirectional", bidirectional)
    if slopes.ndim != 1:
        raise ValueError(f"slopes must have shape [N], got {fmt(slopes.shape)}")
    rel = _relative_positions(num_queries, num_keys, offset).astype(jnp.float32)  # [..., T, S]
    if bidirectional:
        rel = -jnp.abs(rel)
    rel = jnp.expand_dims(rel, -3)  # [..., 1, T, S]
    return slopes.reshape((1,) * (rel.ndim - 3) + (-1, 1, 1)) * rel


def check_buckets(bidirectional, num_buckets, max_distance) -> tuple[bool, int, int]:
    """The options of :func:`relative_position_buckets`, checked: static ints that give
    each direction an exact and a logarithmic bucket."""
    bidirectional = _checks.check_flag("bidirectional", bidirectional)
    least = 4 if bidirectional else 2  # each direction needs an exact and a log bucket
    num_buckets = check_size("num_buckets", num_buckets)
    max_distance = check_size("max_distance", max_distance)
    if bidirectional and num_buckets % 2:
        raise ValueError(f"bidirectional buckets need an even num_buckets, got {num_buckets}")
    if num_buckets < least or max_distance <= num_buckets // least:
        raise ValueError(
            f"need num_buckets >= {least} and max_distance > the exact range, got "
            f"num_buckets={num_buckets}, max_distance={max_distance}"
        )
    return bidirectional, num_buckets, max_distance


def relative_position_buckets(
    relative_position: jax.Array,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> jax.Array:
    """T5's bucketing of relative positions ``key_position - query_position``.

    Half of the buckets (per direction when ``bidirectional``) hold exact small
    distances; the rest grow logarithmically up to ``max_distance``, beyond which
    everything shares the last bucket. The causal form puts all future keys in bucket 0.

    ``relative_position`` holds integers within int32 (floats are a TypeError, not
    truncated; every int32 value, the extremes included, gets its bucket);
    ``num_buckets`` and ``max_distance`` are ints.

    Returns:
      int32 buckets in ``[0, num_buckets)``, same shape as ``relative_position``.
    """
    bidirectional, num_buckets, max_distance = check_buckets(
        bidirectional, num_buckets, max_distance
    )
    rel = check_int_array("relative_position", relative_position)
    # -(-2**31) does not fit int32 (it wraps to -2**31, a negative bucket); -(2**31 - 1)
    # is as far beyond max_distance, in the same direction: the same bucket
    n = -jnp.maximum(rel, jnp.int32(-(2**31 - 1)))
    ret = jnp.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    scaled = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / math.log(
        max_distance / max_exact
    )
    large = max_exact + (scaled * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return ret + jnp.where(is_small, n, large)
