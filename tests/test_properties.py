"""Property-based tests (hypothesis) over shapes, masks and options.

Shapes are drawn from a small fixed set, and the static options from small sets, so
that jit compilations (the real cost here) are shared across examples.
"""

import functools

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jattn

# (B, T, S, N, K, H, Hv)
SHAPES = [(1, 3, 4, 2, 1, 4, 4), (2, 4, 4, 4, 2, 4, 3), (2, 2, 5, 2, 2, 4, 4)]
SETTINGS = settings(max_examples=12, deadline=None)
F64_TOL = dict(rtol=1e-5, atol=1e-5)

values = st.floats(-3, 3, width=32, allow_nan=False, allow_infinity=False)


@functools.partial(jax.jit, static_argnames=("is_causal", "fully_masked"))
def _run(q, k, v, bias, mask, q_len, kv_len, *, is_causal, fully_masked):
    return jattn.dot_product_attention(
        q, k, v, bias, mask, is_causal=is_causal, query_seq_lengths=q_len,
        key_value_seq_lengths=kv_len, fully_masked=fully_masked, return_weights=True,
    )  # fmt: skip


@st.composite
def attention_cases(draw):
    b, t, s, n, k, h, hv = draw(st.sampled_from(SHAPES))
    q = draw(hnp.arrays(np.float32, (b, t, n, h), elements=values))
    key = draw(hnp.arrays(np.float32, (b, s, k, h), elements=values))
    v = draw(hnp.arrays(np.float32, (b, s, k, hv), elements=values))
    bias = draw(hnp.arrays(np.float32, (b, 1, t, s), elements=values))
    mask = draw(hnp.arrays(np.bool_, (b, n, t, s)))  # any mask: rows may be fully masked
    q_len = draw(hnp.arrays(np.int32, (b,), elements=st.integers(0, t)))
    kv_len = draw(hnp.arrays(np.int32, (b,), elements=st.integers(0, s)))
    is_causal = draw(st.booleans())
    fully_masked = draw(st.sampled_from(["zeros", "uniform"]))
    return q, key, v, bias, mask, q_len, kv_len, is_causal, fully_masked


@SETTINGS
@given(attention_cases())
def test_matches_numpy_float64(case):
    q, k, v, bias, mask, q_len, kv_len, is_causal, fully_masked = case
    out, weights = _run(
        q, k, v, bias, mask, q_len, kv_len, is_causal=is_causal, fully_masked=fully_masked
    )
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(weights))
    want, want_w, _ = ref.attention(
        q, k, v, bias, mask, q_len=q_len, kv_len=kv_len, is_causal=is_causal,
        fully_masked=fully_masked,
    )  # fmt: skip
    np.testing.assert_allclose(out, want, **F64_TOL)
    np.testing.assert_allclose(weights, want_w, **F64_TOL)

    # Rows sum to 1 where a key is visible; dead rows sum to 0 ('zeros') or 1 ('uniform').
    b, t, n, _ = q.shape
    s = k.shape[1]
    visible = mask & ref.structural_mask(t, s, is_causal=is_causal)[None, None]
    visible &= (np.arange(t)[None, :] < q_len[:, None])[:, None, :, None]
    visible &= (np.arange(s)[None, :] < kv_len[:, None])[:, None, None, :]
    alive = visible.any(-1)
    sums = np.asarray(weights, np.float64).sum(-1)
    np.testing.assert_allclose(sums[alive], 1.0, rtol=1e-5)
    np.testing.assert_allclose(sums[~alive], 0.0 if fully_masked == "zeros" else 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(weights)[~visible & alive[..., None]], 0.0)


@functools.partial(jax.jit, static_argnames="fully_masked")
def _softmax_and_grad(logits, mask, *, fully_masked):
    def f(z):
        return jattn.masked_softmax(z, mask, fully_masked=fully_masked)

    w, vjp = jax.vjp(f, logits)
    return w, vjp(jnp.ones_like(w))[0]


special = st.sampled_from([0.0, 1e4, -1e4, 30.0, -30.0, float("-inf")])


@SETTINGS
@given(
    logits=hnp.arrays(np.float32, (3, 4), elements=st.one_of(values, special)),
    mask=hnp.arrays(np.bool_, (3, 4)),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
    fully_masked=st.sampled_from(["zeros", "uniform"]),
)
def test_masked_softmax_is_finite_and_normalised(logits, mask, dtype, fully_masked):
    z = jnp.asarray(logits, dtype)  # 1e4 and 30 are exact in every dtype; -inf stays -inf
    w, grad = _softmax_and_grad(z, mask, fully_masked=fully_masked)
    assert w.dtype == jnp.float32
    assert np.all(np.isfinite(w)) and np.all(np.isfinite(np.asarray(grad, np.float32)))
    finite = mask & np.isfinite(np.asarray(z, np.float32))  # entries that can get weight
    sums = np.asarray(w, np.float64).sum(-1)
    np.testing.assert_allclose(sums[finite.any(-1)], 1.0, rtol=1e-5)
    dead = ~mask.any(-1)
    np.testing.assert_allclose(sums[dead], 0.0 if fully_masked == "zeros" else 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(w)[~finite & ~dead[:, None]], 0.0)
    # Against float64 on the rounded inputs.
    want = ref.masked_softmax(np.asarray(z, np.float64), mask, fully_masked)
    np.testing.assert_allclose(w, want, atol=1e-6)


@SETTINGS
@given(
    ts=st.sampled_from([(1, 1), (3, 5), (5, 3)]),
    offsets=hnp.arrays(np.int32, (2,), elements=st.integers(0, 4)),
    left=st.integers(0, 3),
    right=st.integers(0, 3),
)
def test_causal_and_window_masks_match_definition(ts, offsets, left, right):
    t, s = ts
    causal = np.asarray(jattn.causal_mask(t, s, offset=offsets))
    window = np.asarray(jattn.sliding_window_mask(t, s, (left, right), offset=offsets))
    for b, o in enumerate(offsets):
        i = np.arange(t)[:, None] + o
        j = np.arange(s)[None, :]
        np.testing.assert_array_equal(causal[b], j <= i)
        np.testing.assert_array_equal(window[b], (j >= i - left) & (j <= i + right))


@jax.jit
def _grads_vs_jax_nn(q, k, v, bias, mask, kv_len, cot):
    """Gradients w.r.t. q, k, v, bias of jattn ('uniform') and of jax.nn."""

    def run(fn, **extra):
        def loss(q, k, v, bias):
            out = fn(q, k, v, bias, mask, key_value_seq_lengths=kv_len, **extra)
            return jnp.sum(out * cot)

        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)

    return run(jattn.dot_product_attention, fully_masked="uniform"), run(
        jax.nn.dot_product_attention
    )


@settings(max_examples=6, deadline=None)
@given(attention_cases())
def test_gradients_match_jax_nn(case):
    """Any mask (fully masked rows included): gradients equal jax.nn's to 1e-6."""
    q, k, _, bias, mask, _, kv_len, _, _ = case
    v = np.flip(k, axis=-1).copy()  # jax.nn needs Hv = H
    kv_len = np.maximum(kv_len, 1)
    cot = np.ones(q.shape, np.float32)
    ours, theirs = _grads_vs_jax_nn(q, k, v, bias, mask, kv_len, cot)
    for g, want in zip(ours, theirs, strict=True):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-6)
