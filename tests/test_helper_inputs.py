"""The public helpers on inputs a fuzzing pass found mishandled: narrow or wrong dtypes,
mismatched shapes, NumPy scalars. Each case gives the right answer or a clear error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
import jattn.functional as F
from jattn.functional.scores import AdditiveParams


def test_lengths_of_a_narrow_integer_dtype_do_not_wrap_around():
    # positions 0..299 in uint8 wrapped past 255, so 256..258 counted as < 3
    assert int(F.sequence_mask(jnp.array([3], jnp.uint8), 300).sum()) == 3
    assert int(F.sequence_mask(jnp.array([100], jnp.int8), 200).sum()) == 100
    assert int(F.valid_lens_mask(jnp.array([3], jnp.uint8), 1, 260).sum()) == 3
    np.testing.assert_array_equal(
        F.sequence_mask(jnp.array([0, 2, 5], jnp.uint16), 4),
        np.arange(4)[None, :] < np.array([0, 2, 5])[:, None],
    )


def test_masks_must_be_boolean_in_the_softmax_and_combine_masks():
    additive = jnp.array([[0.0, 0.0, -jnp.inf]])  # read as a bool mask, it hid keys 0, 1
    with pytest.raises(TypeError, match="mask must be boolean .* got dtype float32"):
        F.masked_softmax(jnp.array([[1.0, 2.0, 3.0]]), additive)
    with pytest.raises(TypeError, match="mask must be boolean .* got dtype int32"):
        F.masked_softmax_with_lse(jnp.zeros((1, 3)), jnp.array([[1, 1, 0]]))
    with pytest.raises(TypeError, match="mask must be boolean .* got dtype float32"):
        F.combine_masks(jnp.array([True, False]), additive[0, :2])
    both = F.combine_masks(jnp.array([True, True, False]), jnp.array([[True], [False]]))
    np.testing.assert_array_equal(both, [[True, True, False], [False, False, False]])


def test_pooling_integer_values_gives_the_float_average():
    out = F.attention_pooling(jnp.array([[0.5, 0.5], [0.25, 0.75]]), jnp.array([[1], [3]]))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, [[2.0], [2.5]])


def test_score_functions_name_mismatched_shapes():
    q, k = jnp.ones((3, 4)), jnp.ones((5, 6))
    with pytest.raises(ValueError, match=r"dot_product_scores: query \[3, 4\], key \[5, 6\]: "):
        F.dot_product_scores(q, k)
    with pytest.raises(ValueError, match="query and key need the same head dim H"):
        F.scaled_dot_product_scores(q, k)
    with pytest.raises(ValueError, match=r"bilinear_scores: .*W must be \[4, 6\], got \[4, 5\]"):
        F.bilinear_scores(q, k, jnp.ones((4, 5)))
    bad = AdditiveParams(jnp.ones((4, 7)), jnp.ones((6, 8)), jnp.ones(7))
    with pytest.raises(ValueError, match=r"w_key must be \[6, 7\], got \[6, 8\]"):
        F.additive_scores(q, k, bad)
    with pytest.raises(ValueError, match=r"query must be \[T, H\] and key \[S, H'\]"):
        F.dot_product_scores(jnp.ones((2, 3, 4)), jnp.ones((2, 5, 4)))
    good = AdditiveParams(jnp.ones((4, 7)), jnp.ones((6, 7)), jnp.ones(7))
    assert F.additive_scores(q, k, good).shape == (3, 5)
    assert F.bilinear_scores(q, k, jnp.ones((4, 6))).shape == (3, 5)


def test_positional_helpers_check_their_inputs_and_take_numpy_ints():
    with pytest.raises(ValueError, match="need num_buckets >= 4"):  # was ZeroDivisionError
        F.relative_position_buckets(
            jnp.arange(-3, 4), bidirectional=True, num_buckets=2, max_distance=8
        )
    x = jnp.ones((2, 5, 3, 4))
    with pytest.raises(TypeError, match="rotary_embedding needs a float x, got dtype int32"):
        F.rotary_embedding(jnp.ones((5, 3, 4), jnp.int32), jnp.arange(5))
    with pytest.raises(ValueError, match=r"positions \[3, 5\] must be \[T\] or \[\.\.\., T\]"):
        F.rotary_embedding(x, jnp.zeros((3, 5), jnp.int32))
    per_example = jnp.stack([jnp.arange(5), jnp.arange(5) + 2])
    np.testing.assert_allclose(
        F.rotary_embedding(x, per_example)[1], F.rotary_embedding(x[1], jnp.arange(5) + 2)
    )
    np.testing.assert_array_equal(
        F.sinusoidal_encoding(jnp.arange(3), np.int64(4)), F.sinusoidal_encoding(jnp.arange(3), 4)
    )
    np.testing.assert_array_equal(F.alibi_slopes(np.int64(4)), F.alibi_slopes(4))


def test_scalars_as_numpy_values_or_concrete_arrays():
    q = jax.random.normal(jax.random.key(0), (1, 6, 2, 4))
    ref = jattn.dot_product_attention(q, q, q, scale=0.5)
    np.testing.assert_array_equal(jattn.dot_product_attention(q, q, q, scale=jnp.float32(0.5)), ref)
    np.testing.assert_array_equal(jattn.dot_product_attention(q, q, q, scale=np.float32(0.5)), ref)
    with pytest.raises(TypeError, match="scale must be known at trace time"):
        jax.jit(lambda s: jattn.dot_product_attention(q, q, q, scale=s))(0.5)
    with pytest.raises(TypeError, match="scale must be a real number or None, got Array"):
        jattn.dot_product_attention(q, q, q, scale=jnp.ones(2))
    blocked = F.blocked_attention(q, q, q, block_sizes=(np.int64(2), 2))
    np.testing.assert_array_equal(blocked, F.blocked_attention(q, q, q, block_sizes=(2, 2)))
    key = jax.random.key(1)
    np.testing.assert_array_equal(F.dropout(q, np.float32(0.5), key), F.dropout(q, 0.5, key))
    with pytest.raises(ValueError, match="dropout rate must be a float in \\[0, 1\\], got True"):
        F.dropout(q, True, key)
