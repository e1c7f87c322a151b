"""masked_softmax vs NumPy float64; fully masked rows; no NaN/inf in low precision."""

import functools

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest

import jattn

R, S = 6, 5
TOL = dict(rtol=1e-6, atol=1e-7)


def _case():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, R, S)).astype(np.float32) * 3
    mask = rng.random((2, R, S)) < 0.6
    mask[0, 1] = False  # fully masked rows
    mask[1, 4] = False
    mask[1, 0] = True  # a row with no masked entry
    return logits, mask


@functools.partial(jax.jit, static_argnames="fully_masked")
def _softmax_lse_and_grad(logits, mask, cot, fully_masked):
    def loss(z):
        w, _ = jattn.masked_softmax_with_lse(z, mask, fully_masked=fully_masked)
        return jnp.sum(w * cot)

    w, lse = jattn.masked_softmax_with_lse(logits, mask, fully_masked=fully_masked)
    return w, lse, jax.grad(loss)(logits)


def _np_softmax_grad(w, cot):
    """d/dz sum(softmax(z) * c) = w * (c - sum(w * c)), per row; rows of zeros get zeros."""
    return w * (cot - np.sum(w * cot, -1, keepdims=True))


@pytest.mark.parametrize("fully_masked", ["zeros", "uniform"])
def test_matches_numpy_and_rows_sum(fully_masked):
    logits, mask = _case()
    cot = np.random.default_rng(1).normal(size=logits.shape).astype(np.float32)
    w, lse, grad = _softmax_lse_and_grad(logits, mask, cot, fully_masked)
    assert w.dtype == lse.dtype == jnp.float32
    want = ref.masked_softmax(logits, mask, fully_masked)
    np.testing.assert_allclose(w, want, **TOL)
    np.testing.assert_allclose(lse, ref.masked_lse(logits, mask), rtol=1e-6)
    any_valid = mask.any(-1)
    sums = np.asarray(w, np.float64).sum(-1)
    np.testing.assert_allclose(sums[any_valid], 1.0, rtol=1e-6)
    if fully_masked == "zeros":
        np.testing.assert_array_equal(w[~any_valid], 0.0)
    else:
        np.testing.assert_allclose(w[~any_valid], 1.0 / S, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(w)[~mask & any_valid[..., None]], 0.0)
    # Gradient: the softmax Jacobian on valid rows; masked entries and dead rows get 0.
    want_grad = _np_softmax_grad(want, cot)
    want_grad[~any_valid] = 0.0
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_eager_no_mask_and_broadcast_mask():
    logits, _ = _case()
    np.testing.assert_allclose(jattn.masked_softmax(logits), ref.masked_softmax(logits), **TOL)
    key_mask = np.array([True, False, True, True, False])  # [S], broadcasts to [2, R, S]
    np.testing.assert_allclose(
        jattn.masked_softmax(logits, key_mask), ref.masked_softmax(logits, key_mask), **TOL
    )


def test_neg_inf_logits():
    logits = np.array(
        [[0.0, -np.inf, 1.0], [-np.inf, -np.inf, -np.inf], [2.0, 2.0, -np.inf]], np.float32
    )
    w = jattn.masked_softmax(jnp.asarray(logits))
    e = np.exp([0.0, 1.0])
    np.testing.assert_allclose(w[0], [e[0] / e.sum(), 0.0, e[1] / e.sum()], rtol=1e-6)
    np.testing.assert_array_equal(w[1], 0.0)  # documented: a row of only -inf gives zeros
    np.testing.assert_allclose(w[2], [0.5, 0.5, 0.0], rtol=1e-6)
    grad = jax.grad(lambda z: jnp.sum(jattn.masked_softmax(z) * jnp.arange(3.0)[None, :]))(logits)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[1], 0.0)


@pytest.mark.parametrize("fully_masked", ["zeros", "uniform"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_no_nan_or_inf_in_low_precision(dtype, fully_masked):
    """Fully masked rows, -inf entries and logits of 1e4 (near fp16 range): all finite."""
    logits = np.array(
        [
            [1e4, -1e4, 0.0, 5.0],  # huge spread
            [1e4, 1e4, 1e4, 1e4],  # huge and equal
            [-np.inf, 1.0, -np.inf, 2.0],  # -inf entries
            [3.0, 1.0, 2.0, 0.0],  # fully masked below
            [-np.inf, -np.inf, 0.0, 1.0],  # -inf and masked
        ],
        np.float32,
    )
    mask = np.ones(logits.shape, bool)
    mask[3] = False
    mask[4, 3] = False
    z = jnp.asarray(logits, dtype)
    cot = jnp.asarray(np.random.default_rng(0).normal(size=logits.shape), jnp.float32)
    w, lse, grad = _softmax_lse_and_grad(z, jnp.asarray(mask), cot, fully_masked)
    assert w.dtype == jnp.float32
    assert np.all(np.isfinite(w)) and np.all(np.isfinite(grad)) and np.all(np.isfinite(lse))
    # The inputs are exactly representable in every dtype, so the float64 reference applies.
    np.testing.assert_allclose(w, ref.masked_softmax(logits, mask, fully_masked), atol=1e-6)


@pytest.mark.parametrize("fully_masked", ["zeros", "uniform"])
def test_masked_key_never_wins_over_neg_inf_logits(fully_masked):
    """Regression: visible keys all at -inf (e.g. a -inf bias) must not hand the weight to a
    masked key, whose finite fill used to be the row maximum."""
    logits = jnp.array([[0.0, -jnp.inf, -jnp.inf], [2.0, -jnp.inf, 1.0]])
    mask = jnp.array([[False, True, True], [False, True, True]])
    w, lse, grad = _softmax_lse_and_grad(logits, mask, jnp.ones((2, 3)), fully_masked)
    np.testing.assert_array_equal(w[0], 0.0)
    np.testing.assert_array_equal(w[1], [0.0, 0.0, 1.0])
    assert np.all(np.isfinite(grad)) and np.all(np.isfinite(lse))


def test_scalar_and_complex_logits_are_named():
    """A scalar was JAX's "axis -1 is out of bounds", complex logits lost their imaginary
    part with only a ComplexWarning."""
    with pytest.raises(ValueError, match=r"logits must be \[..., S\] .*got a scalar"):
        jattn.masked_softmax(jnp.float32(1.0))
    with pytest.raises(TypeError, match="logits must be real, got dtype complex64"):
        jattn.masked_softmax(jnp.ones(3, jnp.complex64))
    np.testing.assert_allclose(jattn.masked_softmax([1, 1]), [0.5, 0.5])  # ints are fine
