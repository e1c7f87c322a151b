"""Positional encodings as thin NNX layers over :mod:`jattn.functional.positional`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.functional import _checks, mods
from jattn.functional._checks import check_positive_int
from jattn.functional.positional import (
    _relative_positions,
    alibi_bias,
    alibi_slopes,
    check_buckets,
    check_even_features,
    relative_position_buckets,
    rotary_embedding,
    sinusoidal_encoding,
)
from jattn.layers.axes import names

__all__ = [
    "SinusoidalEncoding",
    "LearnedPositionalEmbedding",
    "RotaryEmbedding",
    "ALiBi",
    "RelativePositionBias",
]


def _check_positions(positions):
    return _checks.check_int_array("positions", positions)


def embed_ids(embed: nnx.Embed, ids: jax.Array, **kwargs) -> jax.Array:
    """``embed(ids)`` with every id outside ``[0, num_embeddings)`` a NaN row: for traced
    ids (under ``jax.jit``), which no check can see. The gather already fills NaN at or
    beyond the table, but would read a negative id (a ``-1`` used as padding) from the
    end of the table, silently; it is moved beyond the table first."""
    return embed(jnp.where(ids < 0, embed.num_embeddings, ids), **kwargs)


def _check_in_table(positions, max_len: int, what: str) -> jax.Array:
    """``positions`` as int32; concrete ones outside ``[0, max_len)`` a ValueError."""
    positions = _check_positions(positions)  # int32, or a ValueError naming positions
    values = _checks.concrete(positions)
    if values is not None and values.size:
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= max_len:
            raise ValueError(
                f"positions must be in [0, {max_len}) ({what}, max_len={max_len}), got min "
                f"{lo}, max {hi}"
            )
    return positions


class SinusoidalEncoding(nnx.Module):
    """Fixed sinusoidal encodings (no parameters): ``__call__(positions [...]) -> [..., D]``.

    Positions must be in ``[0, max_len)`` (the rows of d2l's precomputed table), checked
    when they are concrete, as :class:`LearnedPositionalEmbedding`'s; the encoding itself
    is computed, not looked up, so traced positions need no table.
    """

    def __init__(self, features: int, max_len: int = 10_000):
        self.features = check_even_features(features)
        self.max_len = check_positive_int("max_len", max_len)

    def __call__(self, positions: jax.Array) -> jax.Array:
        positions = _check_in_table(positions, self.max_len, "the encoded positions")
        return sinusoidal_encoding(positions, self.features)


class LearnedPositionalEmbedding(nnx.Module):
    """A learned table ``[max_len, D]``: ``__call__(positions [...]) -> [..., D]``.

    Positions must be in ``[0, max_len)``: concrete ones (outside ``jax.jit``) outside
    that range are a ValueError, as out-of-vocabulary token ids are. A traced position
    (under ``jax.jit``, where nothing can raise) outside it gives a NaN row, as a traced
    token id outside the vocabulary does, instead of a row of the table it does not
    name.
    """

    def __init__(self, max_len: int, features: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        max_len = check_positive_int("max_len", max_len)
        features = check_positive_int("features", features)
        _checks.check_dtype("param_dtype", param_dtype)
        self.max_len = max_len
        self.embedding = nnx.Embed(
            max_len,
            features,
            param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(0.02),
            embedding_metadata=names("position", "embed"),
            rngs=rngs,
        )

    def __call__(self, positions: jax.Array) -> jax.Array:
        positions = _check_in_table(positions, self.max_len, "the rows of the learned table")
        return embed_ids(self.embedding, positions)


class RotaryEmbedding(nnx.Module):
    """RoPE with fixed options: ``__call__(x [..., T, N, H], positions [T] | [..., T])``."""

    def __init__(self, *, max_wavelength: float = 10000.0, interleaved: bool = False):
        self.max_wavelength = _checks.check_finite_scalar(
            "max_wavelength", max_wavelength, positive=True
        )
        self.interleaved = _checks.check_flag("interleaved", interleaved)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        return rotary_embedding(
            x, positions, max_wavelength=self.max_wavelength, interleaved=self.interleaved
        )


class ALiBi(nnx.Module):
    """ALiBi bias with the paper's slopes: ``__call__(T, S, *, offset=0) -> [1|B, N, T, S]``."""

    def __init__(self, num_heads: int, *, bidirectional: bool = False):
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.bidirectional = _checks.check_flag("bidirectional", bidirectional)
        self.slopes = nnx.data(alibi_slopes(num_heads))

    def __call__(self, num_queries: int, num_keys: int, *, offset=0) -> jax.Array:
        bias = alibi_bias(
            self.slopes, num_queries, num_keys, offset=offset, bidirectional=self.bidirectional
        )
        return bias if bias.ndim == 4 else bias[None]

    def score_mod(self) -> mods.Mod:
        """The same bias as a score_mod (:func:`jattn.mods.alibi`): no ``[N, T, S]``
        array, for ``score_mod=`` of the attention functions and layers."""
        return mods.alibi(self.slopes, bidirectional=self.bidirectional)


class RelativePositionBias(nnx.Module):
    """T5's learned relative position bias: a table ``[num_buckets, N]`` over bucketed distances.

    ``__call__(T, S, *, offset=0) -> [1, N, T, S]`` (``[B, N, T, S]`` for ``offset [B]``),
    usable as ``bias=`` of the attention layers. ``bidirectional=False`` for decoders.
    """

    def __init__(
        self,
        num_heads: int,
        *,
        num_buckets: int = 32,
        max_distance: int = 128,
        bidirectional: bool = True,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_positive_int("num_heads", num_heads)
        bidirectional, num_buckets, max_distance = check_buckets(
            bidirectional, num_buckets, max_distance
        )
        _checks.check_dtype("param_dtype", param_dtype)
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.embedding = nnx.Embed(
            num_buckets,
            num_heads,
            param_dtype=param_dtype,
            embedding_metadata=names("position", "heads"),
            rngs=rngs,
        )

    def __call__(self, num_queries: int, num_keys: int, *, offset=0) -> jax.Array:
        rel = _relative_positions(num_queries, num_keys, offset)  # [..., T, S]
        buckets = relative_position_buckets(
            rel,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        bias = jnp.moveaxis(self.embedding(buckets), -1, -3)  # [..., N, T, S]
        return bias if bias.ndim == 4 else bias[None]

    def score_mod(self) -> mods.Mod:
        """The same bias as a score_mod (:func:`jattn.mods.relative_position_bias`) over
        this layer's table, which gets gradients through every attention path: no
        ``[N, T, S]`` array, for ``score_mod=`` of the attention functions and layers."""
        return mods.relative_position_bias(
            self.embedding.embedding[...],
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
