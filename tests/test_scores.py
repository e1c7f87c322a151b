"""Score functions vs NumPy float64 references, jit and no-jit, and their gradients."""

import functools

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from jax.test_util import check_grads

import jattn

T, S, H, H2, A = 3, 4, 5, 6, 7
TOL = dict(rtol=1e-5, atol=1e-5)  # float32 vs float64, O(1) values


def _normal(seed, shape, scale=1.0):
    """Test data from NumPy: jax.random would compile a kernel for every new shape."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _additive_params():
    return jattn.AdditiveParams(_normal(10, (H, A)), _normal(11, (H2, A)), _normal(12, (A,)))


def _mlp_params():
    return jattn.MLPParams(
        _normal(20, (H, A), 0.5),
        _normal(21, (H, A), 0.5),
        _normal(22, (H, A), 0.5),
        _normal(23, (A,)),
        _normal(24, (A,)),
    )


# name -> (jattn score_fn, NumPy reference, params factory, key head dim)
CASES = {
    "dot": (jattn.dot_product_scores, ref.dot, lambda: None, H),
    "scaled_default": (jattn.scaled_dot_product_scores, ref.scaled_dot, lambda: None, H),
    "scaled_custom": (
        functools.partial(jattn.scaled_dot_product_scores, scale=0.37),
        functools.partial(ref.scaled_dot, scale=0.37),
        lambda: None,
        H,
    ),
    "additive": (jattn.additive_scores, ref.additive, _additive_params, H2),
    "bilinear": (jattn.bilinear_scores, ref.bilinear, lambda: _normal(30, (H, H2)), H2),
    "mlp": (jattn.mlp_scores, ref.mlp, _mlp_params, H),
}


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", list(CASES))
def test_score_matches_numpy(name, use_jit):
    fn, np_fn, make_params, hk = CASES[name]
    q, k, params = _normal(0, (T, H)), _normal(1, (S, hk)), make_params()
    f = jax.jit(fn) if use_jit else fn
    got = f(q, k, params)
    assert got.shape == (T, S) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_fn(np.asarray(q), np.asarray(k), params), **TOL)


def test_scaled_default_is_one_over_sqrt_h():
    q, k = _normal(0, (T, H)), _normal(1, (S, H))
    np.testing.assert_allclose(
        jattn.scaled_dot_product_scores(q, k),
        np.asarray(q, np.float64) @ np.asarray(k, np.float64).T / np.sqrt(H),
        **TOL,
    )


def test_mlp_with_zero_product_weights_is_additive_with_gelu():
    """W_p = 0 and b = 0 reduce the MLP score to w_out^T gelu(W_q q + W_k k)."""
    p = _mlp_params()._replace(w_product=jnp.zeros((H, A)), bias=jnp.zeros((A,)))
    q, k = _normal(0, (T, H)), _normal(1, (S, H))
    hidden = ref.f64(q)[:, None, :] @ ref.f64(p.w_query) + (ref.f64(k) @ ref.f64(p.w_key))[None]
    want = ref.gelu_tanh(hidden) @ ref.f64(p.w_out)
    np.testing.assert_allclose(jattn.mlp_scores(q, k, p), want, **TOL)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", ["scaled_default", "additive", "bilinear", "mlp"])
def test_low_precision_inputs_give_float32_logits(name, dtype):
    fn, np_fn, make_params, hk = CASES[name]
    q = _normal(0, (T, H)).astype(dtype)
    k = _normal(1, (S, hk)).astype(dtype)
    params = make_params()
    got = jax.jit(fn)(q, k, params)
    assert got.dtype == jnp.float32
    # The inputs were rounded to `dtype`; the reference sees the same rounded values.
    want = np_fn(np.asarray(q, np.float64), np.asarray(k, np.float64), params)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "name,order", [("scaled_custom", 2), ("additive", 1), ("bilinear", 2), ("mlp", 1)]
)
def test_score_gradients(name, order):
    # The scores are float32 inside. check_grads' default step (1e-4) leaves a float32
    # rounding error of about 1e-7 * |f| / 1e-4 in its second differences (|f| ~ 70
    # here: 0.07, at its own tolerance); a step of 3e-3 keeps rounding and truncation
    # both well inside it.
    fn, _, make_params, hk = CASES[name]
    q, k, params = _normal(0, (2, H)), _normal(1, (3, hk)), make_params()
    opts = dict(order=order, modes=["rev"], eps=3e-3)
    if params is None:
        check_grads(jax.jit(lambda q, k: fn(q, k, None)), (q, k), **opts)
    else:
        check_grads(jax.jit(fn), (q, k, params), **opts)
