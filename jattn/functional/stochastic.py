"""Dropout masks from a counter-based hash of ``(key, row, column)``.

``jax.random.bernoulli`` runs Threefry-2x32 (20 rounds) for every element. Dropout
needs far less: independent-looking keep/drop bits at a given rate. Here each bit is
a hash of the element's coordinates and the key::

    r    = mix(row ^ k0)                 # once per row
    bits = mix(mix(r + col * 0x9E3779B9) ^ k1)
    keep = bits < round(keep_prob * 2**32)

where ``k0, k1`` are the two words of the PRNG key (``jax.random.key_data``) and
``mix`` is the ``lowbias32`` integer finalizer (C. Wellons, hash-prospector,
public domain), a bijection of uint32 with full avalanche. That is about 15 integer
operations per element instead of Threefry's ~100; a train step with dropout
compiles in less time and runs faster (BENCHMARKS.md).

Because a bit depends only on the key and the element's *global* coordinates, any
tiling of the same ``[rows, columns]`` matrix draws the same mask: the blocked
attention path reproduces the dense path's dropout exactly. Row indices are
computed modulo 2**32, so beyond 2**32 rows (e.g. ``B*N*T``) masks repeat.

The statistical quality is checked in ``tests/test_dropout.py`` (rate, bit balance,
correlation between neighbours and between keys); it is meant for dropout, not as a
general-purpose random number generator.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp

from jattn.functional import _checks

__all__ = ["dropout", "fold_in", "keep_bits", "keep_mask"]

_GOLDEN = 0x9E3779B9


def _mix(x: jax.Array) -> jax.Array:
    """lowbias32: a uint32 -> uint32 bijection with full avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _check_key(rng, name: str = "dropout_rng") -> jax.Array:
    """The key's uint32 data; a clear error naming ``name`` for anything that is not one
    key."""
    if isinstance(rng, jax.Array) and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if rng.shape != ():
            raise ValueError(
                f"dropout needs one PRNG key, got a key array of shape {rng.shape} ({name})"
            )
        return jax.random.key_data(rng)
    expected = (
        f"{name} must be a PRNG key (jax.random.key(...) or a raw uint32 key such as "
        "jax.random.PRNGKey(...)), got "
    )
    try:
        data = jnp.asarray(rng)
    except (TypeError, ValueError):  # None, a str, ...
        raise TypeError(f"{expected}{rng!r}{_checks.type_note(rng)}") from None
    if data.dtype != jnp.uint32 or data.ndim != 1 or data.shape[0] < 2:
        raise TypeError(f"{expected}{data.dtype}{list(data.shape)}")
    return data


def _key_words(rng) -> tuple[jax.Array, jax.Array]:
    """The key as two uint32 words (typed keys of any implementation, or raw keys)."""
    data = _check_key(rng)
    data = data.reshape(-1).astype(jnp.uint32)
    k0, k1 = data[0], data[1]
    for i in range(2, data.shape[0]):  # wider keys (e.g. 'rbg'): fold the other words in
        k0, k1 = (k0 ^ _mix(data[i]), k1) if i % 2 == 0 else (k0, k1 ^ _mix(data[i]))
    return k0, k1


def fold_in(rng, data) -> jax.Array:
    """A new key from ``rng`` and an integer ``data`` (e.g. a call counter): the role of
    ``jax.random.fold_in`` for dropout keys, with a few integer mixes instead of a
    Threefry call.

    The result is computed behind ``lax.optimization_barrier``, so XLA evaluates it
    once instead of fusing it into every kernel that reads the key: in a Transformer
    train step with 34 dropout sites this compiles 0.7 s faster than Threefry's
    ``fold_in`` (BENCHMARKS.md). Returns a key of the same kind: a typed key with the
    same implementation, or raw ``uint32`` data of the same shape.
    """
    typed = isinstance(rng, jax.Array) and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
    words = _check_key(rng, "rng")
    if isinstance(data, jax.Array):  # any integer array (a uint32 counter too): mod 2**32
        if not jnp.issubdtype(data.dtype, jnp.integer):
            raise TypeError(f"data must be an integer (a counter), got dtype {data.dtype}")
    else:  # a Python or NumPy value: an int32 (a float is not truncated, 2**40 not wrapped)
        data = _checks.check_int_array("data", data)
    data_words = _fold_words(words, data)
    if typed:
        return jax.random.wrap_key_data(data_words, impl=jax.random.key_impl(rng))
    return data_words


@jax.jit
def _fold_words(words: jax.Array, data: jax.Array) -> jax.Array:
    c = data.astype(jnp.uint32)
    w = words.astype(jnp.uint32)
    out = [  # even words: xor a mixed counter in; odd words: add the counter
        _mix(w[i] ^ _mix(c + jnp.uint32(_GOLDEN * (i // 2 + 1) % 2**32)))
        if i % 2 == 0
        else _mix(w[i] + c)
        for i in range(w.shape[0])
    ]
    return jax.lax.optimization_barrier(jnp.stack(out))


def _check_keep_prob(keep_prob) -> float:
    """``keep_prob`` as a float in [0, 1] (:func:`_checks.check_rate`): NaN, a str, a
    bool or a traced value is an error (it sets a static threshold)."""
    return _checks.check_rate("keep_prob", keep_prob, allow_one=True)


def _check_index(name: str, x) -> jax.Array:
    """Row or column indices: an integer array (a float is not truncated)."""
    x = _checks.as_array(name, x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be integer indices, got dtype {x.dtype}")
    return x


def _threshold(keep_prob: float) -> jax.Array:
    return jnp.uint32(min(max(round(keep_prob * 2.0**32), 0), 2**32 - 1))


def keep_bits(rng, keep_prob: float, row: jax.Array, col: jax.Array) -> jax.Array:
    """Keep (True) with probability ``keep_prob`` for each ``(row, col)``.

    Args:
      rng: a PRNG key.
      keep_prob: a Python or NumPy float in ``[0, 1]`` (NaN, a str or a traced value is
        an error).
      row: integer array of global row indices (taken modulo 2**32).
      col: integer array of global column indices, broadcasting against ``row``.

    Returns:
      A boolean array of the broadcast shape of ``row`` and ``col``.
    """
    keep_prob = _check_keep_prob(keep_prob)
    row, col = _check_index("row", row), _check_index("col", col)
    return _hash_bits(rng, row, col) < _threshold(keep_prob)


def _hash_bits(rng, row: jax.Array, col: jax.Array) -> jax.Array:
    """uint32 bits of ``(key, row, col)`` (see the module docstring)."""
    k0, k1 = _key_words(rng)
    row, col = jnp.broadcast_arrays(row, col)
    r = _mix(row.astype(jnp.uint32) ^ k0)
    return _mix(_mix(r + col.astype(jnp.uint32) * jnp.uint32(_GOLDEN)) ^ k1)


def keep_mask(rng, keep_prob: float, shape: Sequence[int]) -> jax.Array:
    """The keep-mask of an array of ``shape``: rows are the flattened leading axes,
    columns the last axis (``[..., S]``).

    ``keep_prob``: a Python or NumPy float in ``[0, 1]``; ``shape``: a sequence of
    ints >= 0."""
    _check_key(rng)
    keep_prob = _check_keep_prob(keep_prob)
    scalar = getattr(shape, "ndim", 1) == 0  # a 0-d array is Iterable, and fails to iterate
    if isinstance(shape, str | bytes) or not isinstance(shape, Iterable) or scalar:
        raise TypeError(
            f"shape must be a sequence of ints, got {shape!r}{_checks.type_note(shape)}"
        )
    shape = tuple(_checks.check_size(f"shape[{i}]", d, minimum=0) for i, d in enumerate(shape))
    return _keep_mask(rng, keep_prob, shape)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _keep_mask(rng, keep_prob: float, shape: tuple[int, ...]) -> jax.Array:
    # Jitted so that the many dropout sites of a model with equal shapes share one trace.
    if not shape:
        shape1 = (1, 1)
    else:
        shape1 = (math.prod(shape[:-1]), shape[-1])
    row = jax.lax.broadcasted_iota(jnp.uint32, shape1, 0)
    col = jax.lax.broadcasted_iota(jnp.uint32, shape1, 1)
    return keep_bits(rng, keep_prob, row, col).reshape(shape)


def dropout(x: jax.Array, rate: float, rng, *, broadcast_dims: Sequence[int] = ()) -> jax.Array:
    """Inverted dropout: zeroes each element with probability ``rate`` and scales the
    rest by ``1 / (1 - rate)``.

    Args:
      x: any array.
      rate: a Python or NumPy float in ``[0, 1]``; 0 returns ``x``, 1 returns zeros.
      rng: a PRNG key.
      broadcast_dims: axes of ``x`` that share one mask (e.g. ``(0,)`` for one mask
        over the batch).
    """
    # a static Python or NumPy number (np.float32 is not a float subclass); not a bool,
    # NaN, a str or a traced value (a TypeError: the rate decides whether dropout runs)
    try:
        rate = _checks.check_rate("rate", rate, allow_one=True)
    except ValueError as e:
        raise ValueError(f"dropout rate must be a float in [0, 1], got {rate!r}") from e
    array = _checks.as_array("x", x)
    if isinstance(broadcast_dims, str | bytes) or not isinstance(broadcast_dims, Iterable):
        raise TypeError(
            f"broadcast_dims must be a sequence of ints (axes of x), got {broadcast_dims!r}"
        )
    broadcast_dims = tuple(broadcast_dims)
    if not all(_checks.is_int(d) for d in broadcast_dims):
        raise TypeError(f"broadcast_dims must be ints (axes of x), got {broadcast_dims!r}")
    if rate == 0.0:
        return x
    x = array
    if rate == 1.0:
        return jnp.zeros_like(x)
    _check_key(rng, "rng")  # a key is needed only now (rate 0 or 1 takes None)
    ndim = jnp.ndim(x)
    dims = sorted({d % ndim if -ndim <= d < ndim else d for d in broadcast_dims})
    if any(not 0 <= d < ndim for d in dims):
        raise ValueError(f"broadcast_dims {tuple(broadcast_dims)} out of range for ndim {ndim}")
    mask_shape = tuple(1 if d in dims else n for d, n in enumerate(jnp.shape(x)))
    keep = keep_mask(rng, 1.0 - rate, mask_shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))
