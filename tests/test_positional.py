"""Positional encodings: exact formulas and defining properties."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.functional.positional import (
    alibi_bias,
    alibi_slopes,
    relative_position_buckets,
    rotary_embedding,
    sinusoidal_encoding,
)
from jattn.layers.positional import (
    ALiBi,
    LearnedPositionalEmbedding,
    RelativePositionBias,
    RotaryEmbedding,
    SinusoidalEncoding,
)


def test_sinusoidal_matches_d2l_formula():
    max_len, d = 40, 12
    p = np.zeros((max_len, d))
    for i in range(max_len):
        for j in range(d // 2):
            p[i, 2 * j] = math.sin(i / 10000 ** (2 * j / d))
            p[i, 2 * j + 1] = math.cos(i / 10000 ** (2 * j / d))
    got = sinusoidal_encoding(jnp.arange(max_len), d)
    np.testing.assert_allclose(np.asarray(got), p, atol=2e-5)
    layer = SinusoidalEncoding(d)
    np.testing.assert_array_equal(np.asarray(layer(jnp.arange(max_len)[None])[0]), got)


def test_sinusoidal_relative_shift_is_a_fixed_rotation():
    d, k = 8, 5
    pe = np.asarray(sinusoidal_encoding(jnp.arange(60), d), np.float64)
    # PE[pos + k] = M_k PE[pos] with M_k block-diagonal rotations independent of pos
    m = np.zeros((d, d))
    for j in range(d // 2):
        w = 1.0 / 10000 ** (2 * j / d)
        c, s = math.cos(k * w), math.sin(k * w)
        m[2 * j : 2 * j + 2, 2 * j : 2 * j + 2] = [[c, s], [-s, c]]
    np.testing.assert_allclose(pe[k:], pe[:-k] @ m.T, atol=1e-6)  # float32 encodings
    np.testing.assert_allclose(m @ m.T, np.eye(d), atol=1e-12)  # a rotation
    assert np.abs(pe[k:] - pe[:-k]).max() > 0.5  # the shift is not trivial


def test_sinusoidal_layer_keeps_to_its_max_len():
    """max_len was stored and never used: position 9 of a 4-position layer, or -1, were
    encoded without a word (the learned table refuses them)."""
    layer = SinusoidalEncoding(8, max_len=4)
    np.testing.assert_array_equal(layer(jnp.arange(4)), sinusoidal_encoding(jnp.arange(4), 8))
    for bad, (lo, hi) in ((jnp.arange(10), (0, 9)), (jnp.array([-1, 2]), (-1, 2))):
        with pytest.raises(ValueError, match=rf"positions must be in \[0, 4\) \(the encoded "
                           rf"positions, max_len=4\), got min {lo}, max {hi}"):  # fmt: skip
            layer(bad)
    traced = jax.jit(layer)(jnp.arange(6))  # no check can run: computed, not looked up
    np.testing.assert_array_equal(traced, sinusoidal_encoding(jnp.arange(6), 8))


def test_sinusoidal_rejects_odd_features():
    with pytest.raises(ValueError, match="even positive features"):
        sinusoidal_encoding(jnp.arange(3), 7)
    with pytest.raises(ValueError, match="even positive features"):
        SinusoidalEncoding(5)


def test_learned_embedding_is_a_table():
    layer = LearnedPositionalEmbedding(6, 4, rngs=nnx.Rngs(0))
    table = np.asarray(layer.embedding.embedding[...])
    np.testing.assert_array_equal(np.asarray(layer(jnp.array([[2, 5]]))), table[None, [2, 5]])
    with pytest.raises(TypeError, match="positions must be integers"):
        layer(jnp.array([1.0]))


def _rope_reference(x, pos, interleaved, base=10000.0):
    """NumPy float64 RoPE via complex multiplication of feature pairs."""
    x = np.asarray(x, np.float64)
    h = x.shape[-1]
    freqs = base ** (-np.arange(h // 2) / (h // 2))
    if interleaved:
        z = x[..., 0::2] + 1j * x[..., 1::2]
    else:
        z = x[..., : h // 2] + 1j * x[..., h // 2 :]
    z = z * np.exp(1j * np.asarray(pos, np.float64)[:, None, None] * freqs)
    if interleaved:
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
        return out
    return np.concatenate([z.real, z.imag], axis=-1)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_matches_reference_and_depends_on_relative_position(interleaved):
    x = jax.random.normal(jax.random.key(0), (5, 2, 8))  # [T, N, H]
    pos = jnp.array([0, 3, 7, 1, 20])
    got = rotary_embedding(x, pos, interleaved=interleaved)
    np.testing.assert_allclose(np.asarray(got), _rope_reference(x, pos, interleaved), atol=1e-5)
    # <rope(q, m), rope(k, n)> depends on m - n only
    q, k = jax.random.normal(jax.random.key(1), (2, 1, 1, 8))
    rope = RotaryEmbedding(interleaved=interleaved)

    def dot(m, n):
        return float(jnp.sum(rope(q, jnp.array([m])) * rope(k, jnp.array([n]))))

    assert dot(5, 2) == pytest.approx(dot(13, 10), abs=1e-4)
    assert dot(0, 4) == pytest.approx(dot(30, 34), abs=1e-4)
    assert abs(dot(5, 2) - dot(5, 3)) > 1e-3  # it does depend on the offset
    # norms are preserved
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(got), axis=-1), np.linalg.norm(np.asarray(x), axis=-1), rtol=1e-5
    )


def test_rotary_batched_positions_and_errors():
    x = jax.random.normal(jax.random.key(0), (2, 3, 1, 4))  # [B, T, N, H]
    pos = jnp.array([[0, 1, 2], [5, 6, 7]])
    got = rotary_embedding(x, pos)
    for b in range(2):
        np.testing.assert_allclose(
            np.asarray(got[b]), _rope_reference(x[b], pos[b], False), atol=1e-5
        )
    with pytest.raises(ValueError, match="even H"):
        rotary_embedding(jnp.zeros((3, 1, 5)), jnp.arange(3))
    with pytest.raises(ValueError, match="positions"):
        rotary_embedding(jnp.zeros((3, 1, 4)), jnp.arange(4))


def test_alibi_slopes_match_the_paper():
    np.testing.assert_allclose(np.asarray(alibi_slopes(8)), [2.0**-i for i in range(1, 9)])
    # N=6: the 4 slopes of 4 heads (1/4 .. 1/256), then every other slope of 8 heads
    np.testing.assert_allclose(
        np.asarray(alibi_slopes(6)), [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]
    )
    np.testing.assert_allclose(np.asarray(alibi_slopes(1)), [2.0**-8])
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        alibi_slopes(0)


def test_alibi_bias_values_and_offset():
    slopes = alibi_slopes(2)  # [1/16, 1/256]
    bias = np.asarray(alibi_bias(slopes, 3, 3))
    assert bias.shape == (2, 3, 3)
    i, j = np.meshgrid(np.arange(3), np.arange(3), indexing="ij")
    np.testing.assert_allclose(bias[0], -(i - j) / 16)
    sym = np.asarray(alibi_bias(slopes, 3, 3, bidirectional=True))
    np.testing.assert_allclose(sym[1], -np.abs(i - j) / 256)
    off = np.asarray(alibi_bias(slopes, 1, 4, offset=jnp.array([1, 3])))
    assert off.shape == (2, 2, 1, 4)
    np.testing.assert_allclose(off[1, 0, 0], (np.arange(4) - 3) / 16)
    layer = ALiBi(2)
    assert layer(3, 3).shape == (1, 2, 3, 3)
    # usable as bias=: rows with bias 0 at the diagonal and causal mask
    from jattn import dot_product_attention

    q = jax.random.normal(jax.random.key(0), (1, 3, 2, 4))
    out = dot_product_attention(q, q, q, bias=layer(3, 3), is_causal=True)
    assert out.shape == (1, 3, 2, 4)
    with pytest.raises(ValueError, match=r"slopes must have shape \[N\]"):
        alibi_bias(jnp.ones((2, 2)), 3, 3)


def _t5_bucket_numpy(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """A NumPy port of T5's ``_relative_position_bucket`` (mesh-tensorflow / HF)."""
    ret = 0
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).astype(np.int64) * num_buckets
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    with np.errstate(divide="ignore", invalid="ignore"):
        val_if_large = max_exact + (
            np.log(n.astype(np.float64) / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).astype(np.int64)
    val_if_large = np.minimum(val_if_large, num_buckets - 1)
    return ret + np.where(is_small, n, val_if_large)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20)])
def test_t5_buckets_match_reference(bidirectional, num_buckets, max_distance):
    rel = np.arange(-300, 301)
    got = relative_position_buckets(
        jnp.asarray(rel),
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
    )
    want = _t5_bucket_numpy(rel, bidirectional, num_buckets, max_distance)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert int(got.min()) == 0 and int(got.max()) == num_buckets - 1


def test_relative_position_bias_layer():
    layer = RelativePositionBias(3, num_buckets=8, max_distance=16, rngs=nnx.Rngs(0))
    bias = layer(4, 5)
    assert bias.shape == (1, 3, 4, 5)
    table = np.asarray(layer.embedding.embedding[...])  # [buckets, N]
    rel = np.arange(5)[None, :] - np.arange(4)[:, None]
    buckets = _t5_bucket_numpy(rel, True, 8, 16)
    np.testing.assert_allclose(np.asarray(bias[0]), np.moveaxis(table[buckets], -1, 0))
    causal = RelativePositionBias(2, bidirectional=False, rngs=nnx.Rngs(0))
    off = causal(1, 6, offset=jnp.array([2, 5]))
    assert off.shape == (2, 2, 1, 6)
    # causal buckets: all future keys share bucket 0
    t = np.asarray(causal.embedding.embedding[...])
    np.testing.assert_allclose(np.asarray(off[0, :, 0, 3:]), np.repeat(t[0][:, None], 3, 1))
    with pytest.raises(ValueError, match="even num_buckets"):
        RelativePositionBias(2, num_buckets=7, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_heads must be a positive int, got 0"):
        RelativePositionBias(0, rngs=nnx.Rngs(0))  # was a ZeroDivisionError in the init
    with pytest.raises(ValueError, match="max_len must be a positive int, got 0"):
        LearnedPositionalEmbedding(0, 6, rngs=nnx.Rngs(0))
