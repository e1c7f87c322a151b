"""Hashed dropout masks: exact NumPy reference, rate, independence, tiling, layer."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.functional import stochastic as dropout_mod
from jattn.functional.stochastic import dropout, keep_bits, keep_mask
from jattn.layers import Dropout

M32 = np.uint64(0xFFFFFFFF)


def _np_mix(x):
    x = x.astype(np.uint64)
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & M32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & M32
    return x ^ (x >> np.uint64(16))


def _np_keep(key_words, keep_prob, rows, cols):
    """The documented hash in NumPy (uint64 arithmetic reduced mod 2**32)."""
    k0, k1 = (np.uint64(w) for w in key_words)
    r = _np_mix(rows.astype(np.uint64) ^ k0)
    x = (r + cols.astype(np.uint64) * np.uint64(0x9E3779B9)) & M32
    bits = _np_mix(_np_mix(x) ^ k1)
    return bits < np.uint64(min(round(keep_prob * 2.0**32), 2**32 - 1))


@jax.jit
def _bits(key, rows, cols):
    return dropout_mod._hash_bits(key, rows, cols)


def test_matches_numpy_reference_for_raw_and_typed_keys():
    shape = (3, 5, 7, 11)
    rows = np.arange(np.prod(shape[:-1]), dtype=np.uint64).reshape(shape[:-1] + (1,))
    cols = np.arange(shape[-1], dtype=np.uint64)
    raw = jax.random.PRNGKey(42)
    ref = _np_keep(np.asarray(raw), 0.7, rows, cols).reshape(shape)
    np.testing.assert_array_equal(keep_mask(raw, 0.7, shape), ref)
    typed = jax.random.wrap_key_data(raw)
    np.testing.assert_array_equal(keep_mask(typed, 0.7, shape), ref)


def test_rate_and_bit_balance():
    n = 1 << 20
    bits = np.asarray(
        _bits(jax.random.key(3), jnp.arange(1024, dtype=jnp.uint32)[:, None], jnp.arange(1024))
    ).reshape(-1)
    assert bits.size == n
    # Each of the 32 bits is set half the time (within 5 sigma).
    ones = np.array([np.mean((bits >> np.uint32(i)) & np.uint32(1)) for i in range(32)])
    assert np.all(np.abs(ones - 0.5) < 5 * 0.5 / np.sqrt(n)), ones
    for keep in (0.1, 0.5, 0.9):
        mask = np.asarray(keep_mask(jax.random.key(4), keep, (1024, 1024)))
        assert abs(mask.mean() - keep) < 5 * np.sqrt(keep * (1 - keep) / n), (keep, mask.mean())


def _corr(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return np.corrcoef(a, b)[0, 1], a.size


def test_independence_between_neighbours_and_keys():
    key = jax.random.key(5)
    m = np.asarray(keep_mask(key, 0.5, (512, 512)))
    pairs = [
        (m[:, 1:], m[:, :-1]),  # neighbouring columns
        (m[1:], m[:-1]),  # neighbouring rows
        (m, np.asarray(keep_mask(jax.random.key(6), 0.5, (512, 512)))),  # another key
        (m, np.asarray(keep_mask(jax.random.fold_in(key, 1), 0.5, (512, 512)))),  # a fold_in
    ]
    for i, (a, b) in enumerate(pairs):
        c, n = _corr(a, b)
        assert abs(c) < 5 / np.sqrt(n), (i, c)
    # 2x2 neighbourhood patterns are uniform (chi-square, 15 dof, p ~ 1e-6 bound).
    codes = (m[:-1, :-1] * 8 + m[:-1, 1:] * 4 + m[1:, :-1] * 2 + m[1:, 1:]).ravel()
    counts = np.bincount(codes, minlength=16)
    expected = codes.size / 16
    assert np.sum((counts - expected) ** 2 / expected) < 50, counts


def test_any_tiling_draws_the_same_mask():
    key = jax.random.key(8)
    full = np.asarray(keep_mask(key, 0.6, (6, 4, 20)))  # rows = 24, cols = 20
    rows = jnp.arange(24, dtype=jnp.uint32).reshape(24, 1)
    for r0, c0 in ((0, 0), (8, 5), (16, 12)):
        tile = keep_bits(key, 0.6, rows[r0 : r0 + 8], jnp.arange(c0, c0 + 8))
        np.testing.assert_array_equal(tile, full.reshape(24, 20)[r0 : r0 + 8, c0 : c0 + 8])


def test_dropout_scales_kept_and_broadcasts():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6, 10)), jnp.float32)
    key = jax.random.key(1)
    y = np.asarray(dropout(x, 0.25, key))
    keep = np.asarray(keep_mask(key, 0.75, x.shape))
    np.testing.assert_allclose(y, np.where(keep, np.asarray(x) / 0.75, 0.0), rtol=1e-6)
    assert dropout(x, 0.0, key) is x
    np.testing.assert_array_equal(dropout(x, 1.0, key), np.zeros(x.shape))
    shared = np.asarray(dropout(jnp.ones((4, 6, 10)), 0.5, key, broadcast_dims=(0, -2)))
    assert np.all(shared == shared[:1, :1]) and 0 < np.mean(shared == 0) < 1
    bf = dropout(x.astype(jnp.bfloat16), 0.5, key)
    assert bf.dtype == jnp.bfloat16
    # The gradient is the mask scaled by 1 / keep_prob.
    g = jax.grad(lambda x: jnp.sum(dropout(x, 0.25, key)))(x)
    np.testing.assert_allclose(g, np.where(keep, 1 / 0.75, 0.0), rtol=1e-6)


@pytest.mark.parametrize(
    "call, exc, msg",
    [
        (lambda x: dropout(x, 1.5, jax.random.key(0)), ValueError, "must be a float in [0, 1]"),
        (
            lambda x: dropout(x, 0.5, jax.random.key(0), broadcast_dims=(3,)),
            ValueError,
            "broadcast_dims (3,) out of range for ndim 2",
        ),
        (lambda x: dropout(x, 0.5, jnp.zeros(2, jnp.int32)), TypeError, "must be a PRNG key"),
        (
            lambda x: dropout(x, 0.5, jax.random.split(jax.random.key(0), 2)),
            ValueError,
            "needs one PRNG key, got a key array of shape (2,)",
        ),
    ],
)
def test_errors(call, exc, msg):
    with pytest.raises(exc, match=re.escape(msg)):
        call(jnp.ones((3, 4)))


def test_layer_is_a_drop_in_nnx_dropout():
    x = jnp.ones((8, 16))
    layer = Dropout(0.5, rngs=nnx.Rngs(dropout=3))
    assert isinstance(layer, nnx.Dropout)
    a, b = layer(x), layer(x)  # the layer's own stream advances between calls
    assert not np.array_equal(a, b) and set(np.unique(np.asarray(a))) == {0.0, 2.0}
    # A key given at call time: exactly the functional dropout with that key.
    key = jax.random.key(9)
    np.testing.assert_array_equal(layer(x, rngs=key), dropout(x, 0.5, key))
    # Same Rngs seed -> same masks, as nnx.Dropout.
    np.testing.assert_array_equal(
        layer(x, rngs=nnx.Rngs(dropout=4)), layer(x, rngs=nnx.Rngs(dropout=4))
    )
    np.testing.assert_array_equal(layer(x, deterministic=True), x)
    layer.eval()
    np.testing.assert_array_equal(layer(x), x)
    with pytest.raises(ValueError, match="needs rngs"):
        Dropout(0.5)(x)
    with pytest.raises(TypeError, match="rngs must be nnx.Rngs, an nnx.RngStream, a PRNG key"):
        Dropout(0.5, rngs=nnx.Rngs(dropout=0))(x, rngs=3)
    with pytest.raises(ValueError, match="needs deterministic=True/False"):
        Dropout(0.5, deterministic=None, rngs=nnx.Rngs(dropout=0))(x)


def test_wider_keys_fold_all_words():
    """'rbg' keys carry four words: all of them change the mask."""
    data = jax.random.key_data(jax.random.key(0, impl="rbg"))
    base = keep_mask(jax.random.wrap_key_data(data, impl="rbg"), 0.5, (64, 64))
    for word in range(4):
        other = data.at[word].add(1)
        mask = keep_mask(jax.random.wrap_key_data(other, impl="rbg"), 0.5, (64, 64))
        assert 0.3 < np.mean(np.asarray(mask) != np.asarray(base)) < 0.7, word


def test_fold_in_gives_distinct_keys_of_the_same_kind():
    from jattn.functional.stochastic import fold_in

    typed, raw = jax.random.key(3), jax.random.PRNGKey(3)
    k0, k1 = fold_in(typed, 0), fold_in(typed, 1)
    assert k0.dtype == typed.dtype and jax.random.key_impl(k0) == jax.random.key_impl(typed)
    r0 = fold_in(raw, 0)
    assert r0.dtype == jnp.uint32 and r0.shape == (2,)
    np.testing.assert_array_equal(jax.random.key_data(k0), r0)  # same words either way
    np.testing.assert_array_equal(jax.random.key_data(fold_in(typed, 1)), jax.random.key_data(k1))
    words = {tuple(np.asarray(jax.random.key_data(fold_in(typed, c))).tolist()) for c in range(64)}
    assert len(words) == 64  # distinct counters give distinct keys
    # ...and masks that look independent of each other.
    c, n = _corr(
        np.asarray(keep_mask(k0, 0.5, (256, 256))), np.asarray(keep_mask(k1, 0.5, (256, 256)))
    )
    assert abs(c) < 5 / np.sqrt(n)


def test_next_key_advances_the_stream_like_calling_it():
    from jattn.functional.stochastic import fold_in
    from jattn.layers.dropout import next_key

    rngs = nnx.Rngs(dropout=5)
    stream = rngs["dropout"]
    key0 = stream.key[...]
    a, b = next_key(stream), next_key(stream)
    assert int(stream.count[...]) == 2
    np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(fold_in(key0, 0)))
    np.testing.assert_array_equal(jax.random.key_data(b), jax.random.key_data(fold_in(key0, 1)))
    # The layer draws with next_key: same seed, same masks; the stream moves on.
    layer = Dropout(0.5, rngs=nnx.Rngs(dropout=5))
    x = jnp.ones((16, 16))
    np.testing.assert_array_equal(layer(x, rngs=nnx.Rngs(dropout=5)), dropout(x, 0.5, a))


def test_fold_in_keeps_wider_keys_whole():
    from jattn.functional.stochastic import fold_in

    key = jax.random.key(0, impl="rbg")
    a, b = fold_in(key, 0), fold_in(key, 1)
    assert jax.random.key_data(a).shape == (4,) and jax.random.key_impl(a) == jax.random.key_impl(
        key
    )
    assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(b))
    raw = jax.random.key_data(key)
    np.testing.assert_array_equal(fold_in(raw, 1), jax.random.key_data(b))
