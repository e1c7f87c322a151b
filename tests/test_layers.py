"""NNX layers vs flax.nnx.MultiHeadAttention (copied weights) and NumPy float64 references."""

import functools

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from _layers import normal as _normal
from _layers import randomize as _randomize
from flax import nnx

import jattn
from jattn.layers import (
    AdditiveAttention,
    AdditiveScore,
    BilinearScore,
    DotProductAttention,
    MLPScore,
    MultiHeadAttention,
)

B, T, S = 2, 3, 4
FLAX_TOL = dict(rtol=1e-6, atol=1e-6)
F64_TOL = dict(rtol=1e-5, atol=1e-5)


def _params64(layer):
    """The projection parameters as float64 NumPy arrays (zeros for absent biases)."""
    out = {}
    for name in ("query", "key", "value", "out"):
        lin = getattr(layer, name)
        kernel = np.asarray(lin.kernel[...], np.float64)
        bias = lin.bias[...] if lin.bias is not None else 0.0
        out[name] = (kernel, np.asarray(bias, np.float64))
    return out


def _np_mha(layer, xq, xk, xv, mask=None, *, is_causal=False, score=ref.scaled_dot, params=None):
    """The layer in float64: project, per-head attention (NumPy loop), project back."""
    p = _params64(layer)
    q = np.einsum("btd,dnh->btnh", ref.f64(xq), p["query"][0]) + p["query"][1]
    k = np.einsum("bsd,dnh->bsnh", ref.f64(xk), p["key"][0]) + p["key"][1]
    v = np.einsum("bsd,dnh->bsnh", ref.f64(xv), p["value"][0]) + p["value"][1]
    out, weights, _ = ref.attention(
        q, k, v, mask=mask, is_causal=is_causal, score=score, params=params,
        per_head_params=params is not None,
    )  # fmt: skip
    return np.einsum("btnh,nho->bto", out, p["out"][0]) + p["out"][1], weights


@nnx.jit(static_argnames=("is_causal",))
def _call_both(ours, theirs, xq, xk, mask, flax_mask, is_causal=False):
    return ours(xq, xk, mask=mask, is_causal=is_causal), theirs(xq, xk, mask=flax_mask)


_call = nnx.jit(lambda m, *a, **kw: m(*a, **kw), static_argnames="return_weights")


FLAX_CASES = {
    # name: (constructor kwargs, key input width, mask shape or None, causal)
    "self": (dict(num_heads=2, in_features=8), 8, (B, 1, T, T), False),
    "cross_out": (
        dict(num_heads=4, in_features=8, qkv_features=12, out_features=5, in_kv_features=6),
        6,
        (B, 1, 1, S),
        False,
    ),
    "gqa": (dict(num_heads=4, in_features=8, num_kv_heads=2, in_kv_features=6), 6, None, False),
    "mqa_no_bias": (
        dict(num_heads=4, in_features=8, num_kv_heads=1, use_bias=False),
        8,
        (1, 4, T, T),
        False,
    ),
    "causal": (dict(num_heads=2, in_features=8, num_kv_heads=1), 8, None, True),
}


@pytest.mark.parametrize("name", list(FLAX_CASES))
def test_multihead_matches_flax(name):
    kwargs, dk, mask_shape, causal = FLAX_CASES[name]
    theirs = _randomize(nnx.MultiHeadAttention(**kwargs, decode=False, rngs=nnx.Rngs(0)))
    ours = MultiHeadAttention(**kwargs, rngs=nnx.Rngs(1))
    nnx.update(ours, nnx.state(theirs, nnx.Param))
    xq = _normal(1, (B, T, kwargs["in_features"]))
    xk = xq if dk == kwargs["in_features"] and name != "cross_out" else _normal(2, (B, S, dk))
    s = xk.shape[1]
    mask = None
    if mask_shape is not None:
        m = np.random.default_rng(3).random(mask_shape[:-1] + (s,)) < 0.6
        m[..., 0] = True  # no fully masked rows (flax gives uniform weights there)
        mask = jnp.asarray(m)
    flax_mask = mask
    if causal:  # flax gets the causal mask explicitly; ours uses is_causal
        flax_mask = nnx.make_causal_mask(jnp.ones((B, T)))
    out, want = _call_both(ours, theirs, xq, xk, mask, flax_mask, is_causal=causal)
    np.testing.assert_allclose(out, want, **FLAX_TOL)


def test_value_head_dim_and_value_width_vs_numpy():
    layer = _randomize(
        MultiHeadAttention(
            4, 8, 12, out_features=7, num_kv_heads=2, in_kv_features=6, in_value_features=5,
            v_head_dim=2, rngs=nnx.Rngs(0),
        )
    )  # fmt: skip
    assert layer.value.kernel.shape == (5, 2, 2) and layer.out.kernel.shape == (4, 2, 7)
    xq, xk, xv = _normal(1, (B, T, 8)), _normal(2, (B, S, 6)), _normal(3, (B, S, 5))
    mask = np.random.default_rng(4).random((B, 1, T, S)) < 0.6
    out, weights = _call(layer, xq, xk, xv, mask=mask, return_weights=True)
    want, want_w = _np_mha(layer, xq, xk, xv, mask)
    assert out.shape == (B, T, 7)
    np.testing.assert_allclose(out, want, **F64_TOL)
    np.testing.assert_allclose(weights, want_w, **F64_TOL)


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
def test_return_and_sow_weights_leave_output_bitwise_unchanged(use_jit):
    layer = _randomize(MultiHeadAttention(2, 8, num_kv_heads=1, rngs=nnx.Rngs(0)))
    x = _normal(1, (B, T, 8))

    def call(m, x, **kw):
        return m(x, is_causal=True, **kw)

    if use_jit:
        call = nnx.jit(call, static_argnames=("return_weights", "sow_weights"))
    plain = call(layer, x)
    out, weights = call(layer, x, return_weights=True)
    np.testing.assert_array_equal(out, plain)
    capture = nnx.capture(lambda m, x: m(x, is_causal=True, sow_weights=True), nnx.Intermediate)
    sown_out, sown = (nnx.jit(capture) if use_jit else capture)(layer, x)
    np.testing.assert_array_equal(sown_out, plain)
    (sown_weights,) = sown["attention_weights"].get_value()
    np.testing.assert_array_equal(sown_weights, weights)
    assert weights.shape == (B, 2, T, T) and weights.dtype == jnp.float32
    want, want_w = _np_mha(layer, x, x, x, is_causal=True)
    np.testing.assert_allclose(plain, want, **F64_TOL)
    np.testing.assert_allclose(weights, want_w, rtol=1e-6, atol=1e-6)


def test_dropout():
    layer = _randomize(MultiHeadAttention(2, 8, dropout_rate=0.5, rngs=nnx.Rngs(0, dropout=1)))
    x = _normal(1, (B, T, 8))
    call = nnx.jit(lambda m, x, **kw: m(x, **kw), static_argnames="deterministic")
    # Deterministic: no dropout, the float64 result of the same weights.
    plain = call(layer, x, deterministic=True)
    np.testing.assert_allclose(plain, _np_mha(layer, x, x, x)[0], **F64_TOL)
    # Not deterministic: the layer's own stream advances, so two calls differ.
    a = call(layer, x, deterministic=False)
    b = call(layer, x, deterministic=False)
    assert not np.allclose(a, plain) and not np.allclose(a, b)
    # Explicit rngs make it reproducible.
    c = call(layer, x, deterministic=False, rngs=nnx.Rngs(dropout=7))
    d = call(layer, x, deterministic=False, rngs=nnx.Rngs(dropout=7))
    np.testing.assert_array_equal(c, d)
    # A key is used as the dropout key itself: the attention with that dropout_rng.
    key = jax.random.key(3)
    e = call(layer, x, deterministic=False, rngs=key)
    q, k, v = layer.query(x), layer.key(x), layer.value(x)
    ref = jattn.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=key)
    np.testing.assert_allclose(e, layer.out(ref), atol=1e-5)
    assert not np.allclose(e, c)


@pytest.mark.parametrize(
    "dtype,param_dtype", [(jnp.bfloat16, jnp.float32), (jnp.bfloat16, jnp.bfloat16)]
)
def test_dtype_and_param_dtype(dtype, param_dtype):
    layer = _randomize(
        MultiHeadAttention(2, 8, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    assert layer.query.kernel.dtype == param_dtype
    ref_layer = MultiHeadAttention(2, 8, rngs=nnx.Rngs(0))
    nnx.update(
        ref_layer, jax.tree.map(lambda p: p.astype(jnp.float32), nnx.state(layer, nnx.Param))
    )
    x = _normal(1, (B, T, 8))
    call = nnx.jit(lambda m, x: m(x, is_causal=True))
    out = call(layer, x)
    assert out.dtype == dtype and np.all(np.isfinite(np.asarray(out, np.float32)))
    # bfloat16 projections of O(1) values: 4 bfloat16 eps (2^-7) relative to the output scale.
    want = np.asarray(call(ref_layer, x))
    np.testing.assert_allclose(
        np.asarray(out, np.float32), want, atol=4 * 2.0**-7 * np.abs(want).max()
    )


@pytest.mark.parametrize("kind", ["additive", "bilinear", "mlp"])
def test_learned_scores(kind):
    n, h = 2, 4
    if kind == "additive":
        score = AdditiveScore(n, h, h, 5, rngs=nnx.Rngs(0))
    elif kind == "bilinear":
        score = BilinearScore(n, h, h, rngs=nnx.Rngs(0))
    else:
        score = MLPScore(n, h, 5, rngs=nnx.Rngs(0))
    kv_heads = 2 if kind == "additive" else 1  # per-head score params with G = 1 and G = 2
    layer = _randomize(
        MultiHeadAttention(n, 8, num_kv_heads=kv_heads, score=score, rngs=nnx.Rngs(0))
    )
    xq, xk = _normal(1, (B, T, 8)), _normal(2, (B, S, 8))
    mask = np.random.default_rng(3).random((B, 1, T, S)) < 0.6
    out, weights = _call(layer, xq, xk, mask=mask, return_weights=True)
    np_score = {"additive": ref.additive, "bilinear": ref.bilinear, "mlp": ref.mlp}[kind]
    params = jax.tree.map(np.asarray, score.params())
    want, want_w = _np_mha(layer, xq, xk, xk, mask, score=np_score, params=params)
    np.testing.assert_allclose(out, want, **F64_TOL)
    np.testing.assert_allclose(weights, want_w, **F64_TOL)


def test_injected_attention_fn_is_called():
    calls = []

    def recording(q, k, v, bias, mask, **kwargs):
        calls.append((q.shape, k.shape, sorted(kwargs)))
        return jattn.dot_product_attention(q, k, v, bias, mask, **kwargs)

    layer = _randomize(MultiHeadAttention(4, 8, num_kv_heads=2, attention_fn=recording,
                                          rngs=nnx.Rngs(0)))  # fmt: skip
    default = MultiHeadAttention(4, 8, num_kv_heads=2, rngs=nnx.Rngs(0))
    nnx.update(default, nnx.state(layer, nnx.Param))
    x = _normal(1, (B, T, 8))
    # Both under jit (the default layer calls a jitted attention: compare like with like).
    out = nnx.jit(lambda m, x: m(x, is_causal=True))(layer, x)
    assert calls == [
        (
            (B, T, 4, 2),
            (B, T, 2, 2),
            ["dropout_rate", "dropout_rng", "is_causal", "return_weights"],
        )
    ]
    np.testing.assert_array_equal(out, nnx.jit(lambda m, x: m(x, is_causal=True))(default, x))


# ------------------------------------------------------------------ d2l single-head layers


@functools.partial(nnx.jit)
def _d2l_call(layer, q, k, v, valid_lens):
    return layer(q, k, v, valid_lens), layer.attention_weights[...]


def _d2l_reference(scores, values, valid_lens):
    """d2l's masked_softmax: keys at or past valid_len are masked, softmax, @ values."""
    b, t, s = scores.shape
    lens = np.broadcast_to(np.asarray(valid_lens).reshape(b, -1), (b, t))
    mask = np.arange(s)[None, None, :] < lens[:, :, None]
    weights = ref.masked_softmax(scores, mask)
    return np.einsum("bts,bsh->bth", weights, ref.f64(values)), weights


@pytest.mark.parametrize("lens", [[2, 4], [[1, 4, 3], [2, 0, 4]]], ids=["B", "BT"])
def test_dot_product_attention_layer(lens):
    q, k, v = _normal(1, (B, T, 5)), _normal(2, (B, S, 5)), _normal(3, (B, S, 6))
    valid_lens = jnp.asarray(lens, jnp.int32)
    layer = DotProductAttention()
    out, weights = _d2l_call(layer, q, k, v, valid_lens)
    scores = np.einsum("bth,bsh->bts", ref.f64(q), ref.f64(k)) / np.sqrt(5)
    want, want_w = _d2l_reference(scores, v, valid_lens)
    np.testing.assert_allclose(out, want, **F64_TOL)
    np.testing.assert_allclose(weights, want_w, **F64_TOL)
    np.testing.assert_allclose(layer.attention_weights[...], want_w, **F64_TOL)  # kept


@pytest.mark.parametrize("lens", [[2, 4], [[1, 4, 3], [2, 0, 4]]], ids=["B", "BT"])
def test_additive_attention_layer(lens):
    q, k, v = _normal(1, (B, T, 3)), _normal(2, (B, S, 5)), _normal(3, (B, S, 6))
    valid_lens = jnp.asarray(lens, jnp.int32)
    layer = AdditiveAttention(key_size=5, query_size=3, num_hiddens=7, rngs=nnx.Rngs(0))
    out, weights = _d2l_call(layer, q, k, v, valid_lens)
    params = (layer.w_query[...], layer.w_key[...], layer.w_value[...])
    scores = np.stack([ref.additive(np.asarray(q[b]), np.asarray(k[b]), params) for b in range(B)])
    want, want_w = _d2l_reference(scores, v, valid_lens)
    np.testing.assert_allclose(out, want, **F64_TOL)
    np.testing.assert_allclose(weights, want_w, **F64_TOL)
    np.testing.assert_allclose(layer.attention_weights[...], want_w, **F64_TOL)


def test_single_head_eager_no_lens_and_dropout():
    q, k, v = _normal(1, (B, T, 5)), _normal(2, (B, S, 5)), _normal(3, (B, S, 6))
    out = DotProductAttention()(q, k, v)  # eager, no valid_lens
    scores = np.einsum("bth,bsh->bts", ref.f64(q), ref.f64(k)) / np.sqrt(5)
    want, _ = _d2l_reference(scores, v, np.full((B,), S))
    np.testing.assert_allclose(out, want, **F64_TOL)
    layer = DotProductAttention(0.5, rngs=nnx.Rngs(dropout=0))
    both = nnx.jit(lambda m, *a: (m(*a, deterministic=True), m(*a, deterministic=False)))
    kept, dropped = both(layer, q, k, v)
    np.testing.assert_allclose(kept, want, **F64_TOL)
    assert not np.allclose(dropped, want)
