"""First-line checks that the package imports and agrees with jax.nn."""

import jax
import jax.numpy as jnp
import numpy as np

import jattn


def test_matches_jax_nn_on_causal_gqa():
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 5, 4, 8))
    k = jax.random.normal(kk, (2, 7, 2, 8))
    v = jax.random.normal(kv, (2, 7, 2, 8))
    ours = jattn.dot_product_attention(q, k, v, is_causal=True)
    ref = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


def test_fully_masked_row_is_zero_not_nan():
    q = jnp.ones((1, 2, 1, 4))
    mask = jnp.array([True, False])[None, None, :, None] & jnp.ones((1, 1, 2, 3), bool)
    out = jattn.dot_product_attention(q, q[:, :1].repeat(3, 1), q[:, :1].repeat(3, 1), mask=mask)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0, 1], 0.0)
