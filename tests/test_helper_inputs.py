"""The public helpers on inputs a fuzzing pass found mishandled: narrow or wrong dtypes,
mismatched shapes, NumPy scalars. Each case gives the right answer or a clear error."""

import re

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


# Found by a fuzzing pass over the classic mechanisms (kernel regression, scores, softmax,
# single-head layers, diagnostics).


def test_kernel_regression_width_is_a_positive_scalar_and_kernels_go_by_name():
    from jattn.functional import kernel_regression as kr

    q, k = jnp.zeros(3), jnp.array([-1.0, 0.5, 2.0])
    # a per-query width [T] was applied per key when T == S: wrong weights, no error
    with pytest.raises(ValueError, match=r"width must be a scalar, got shape \[3\]"):
        kr.nadaraya_watson_weights(q, k, width=jnp.array([0.5, 1.0, 4.0]))
    for width, kind, message in (
        (None, TypeError, "width must be a positive number, got NoneType"),
        ("a", TypeError, "width must be a positive number, got str"),
        (True, TypeError, "width must be a positive number, got bool"),
        (0.0, ValueError, "width must be finite and > 0, got 0.0"),
        (float("inf"), ValueError, "width must be finite and > 0, got inf"),
    ):
        with pytest.raises(kind, match=message):
            kr.nadaraya_watson_weights(q, k, width=width)
    # a traced width cannot be checked: <= 0 shows as NaN instead of silently wrong weights
    weights = jax.jit(
        lambda w: kr.nadaraya_watson_weights(q, k, kernel=kr.triangular_kernel, width=w)
    )
    assert jnp.all(jnp.isnan(weights(-1.0))) and jnp.allclose(weights(2.0).sum(-1), 1.0)
    np.testing.assert_array_equal(
        kr.nadaraya_watson_weights(q, k, kernel="gaussian", width=0.7),
        kr.nadaraya_watson_weights(q, k, kernel=kr.gaussian_kernel, width=0.7),
    )
    assert kr.KERNELS["epanechnikov"] is kr.epanechnikov_kernel
    assert kr.KERNELS["epanechikov"] is kr.KERNELS["triangular"] is kr.triangular_kernel  # d2l
    with pytest.raises(ValueError, match=r"unknown kernel 'gauss'; expected one of \['boxcar'"):
        kr.nadaraya_watson(q, k, k, kernel="gauss")
    with pytest.raises(TypeError, match="kernel must be a function .* got int"):
        kr.nadaraya_watson(q, k, k, kernel=3)
    np.testing.assert_array_equal(kr.leave_one_out_mask(np.int64(3)), ~np.eye(3, dtype=bool))


def test_nw_layer_takes_numpy_ints():
    from flax import nnx

    from jattn.layers import NWKernelRegression

    layer = NWKernelRegression(np.int64(2), rngs=nnx.Rngs(0))
    assert layer.num_heads == 2 and type(layer.num_heads) is int


def test_score_functions_check_scale_params_and_take_lists():
    q, k = jnp.ones((2, 4)), jnp.ones((3, 4))
    with pytest.raises(ValueError, match=r"scale must be a scalar .* got shape \[3\]"):
        F.scaled_dot_product_scores(q, k, scale=jnp.arange(3.0))
    with pytest.raises(ValueError, match=r"default scale 1/sqrt\(H\) needs H > 0"):
        F.scaled_dot_product_scores(jnp.ones((2, 0)), jnp.ones((3, 0)))
    np.testing.assert_array_equal(F.dot_product_scores([[1.0, 2.0]], [[3.0, 4.0]]), [[11.0]])
    # the hidden size A is what most parameters agree on, so the wrong one is named
    ap = AdditiveParams(jnp.ones((4, 7)), jnp.ones((6, 7)), jnp.ones((1,)))
    with pytest.raises(ValueError, match=r"additive_scores: .*: w_value must be \[7\], got \[1\]$"):
        F.additive_scores(jnp.ones((3, 4)), jnp.ones((5, 6)), ap)
    from jattn.functional.scores import MLPParams

    good = MLPParams(*(jnp.ones(s) for s in ((4, 7), (4, 7), (4, 7), (7,), (7,))))
    assert F.mlp_scores(q, k, good).shape == (2, 3)
    for field, bad, message in (
        ("bias", jnp.float32(0.0), r"bias must be \[7\], got \[\]"),
        ("w_product", jnp.ones((5, 7)), r"w_product must be \[4, 7\], got \[5, 7\]"),
        ("w_out", jnp.ones((1,)), r"w_out must be \[7\], got \[1\]"),  # broadcast before
    ):
        with pytest.raises(
            ValueError, match=rf"mlp_scores: query \[2, 4\], key \[3, 4\]: {message}"
        ):
            F.mlp_scores(q, k, good._replace(**{field: bad}))


def test_masked_softmax_takes_lists_and_names_a_mask_that_does_not_fit():
    np.testing.assert_allclose(F.masked_softmax([[0.0, 0.0]]), [[0.5, 0.5]])
    for shape in ((2, 4), (3, 2, 3)):
        message = f"mask of shape {list(shape)} must broadcast to the logits' shape [2, 3]"
        with pytest.raises(ValueError, match=re.escape(message)):
            F.masked_softmax(jnp.ones((2, 3)), jnp.ones(shape, bool))


def test_single_head_layers_check_ranks_first_and_take_lists():
    from flax import nnx

    from jattn.layers import AdditiveAttention, DotProductAttention

    layer = AdditiveAttention(4, 4, 6, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"queries must have shape \[B, L, F\], got \[\]"):
        layer(jnp.float32(1.0), jnp.ones((2, 5, 4)), jnp.ones((2, 5, 6)))
    out = DotProductAttention()([[[1.0, 0.0]]], [[[1.0, 0.0], [0.0, 1.0]]], [[[1.0], [3.0]]])
    w = np.exp(1 / np.sqrt(2))
    np.testing.assert_allclose(out, [[[(w + 3) / (w + 1)]]], rtol=1e-6)


def test_entropy_shows_nan_weights():
    from jattn.diagnostics import attention_entropy

    assert jnp.isnan(attention_entropy(jnp.full((1, 2, 2), jnp.nan)))[0]
    mixed = jnp.array([[[jnp.nan, 0.5], [0.5, 0.5]], [[1.0, 0.0], [0.5, 0.5]]])
    entropy = attention_entropy(mixed)
    assert jnp.isnan(entropy[0]) and jnp.allclose(entropy[1], np.log(2) / 2)
