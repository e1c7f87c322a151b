"""Transformer blocks against NumPy float64 references, and their configuration errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.functional.positional import alibi_bias, alibi_slopes
from jattn.layers import BilinearScore
from jattn.models import (
    DecoderBlock,
    EncoderBlock,
    FeedForward,
    TransformerDecoder,
    TransformerEncoder,
)

D, N, F = 16, 2, 24


def _np(x):
    return np.asarray(x[...], np.float64)


def _layer_norm(x, ln, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * _np(ln.scale) + _np(ln.bias)


def _mha(mha, xq, xkv, mask, bias=None):
    """NumPy multi-head attention with the layer's weights; mask [B, 1|N, T, S] True = attend."""
    q = np.einsum("btd,dnh->btnh", xq, _np(mha.query.kernel)) + _np(mha.query.bias)
    k = np.einsum("bsd,dnh->bsnh", xkv, _np(mha.key.kernel)) + _np(mha.key.bias)
    v = np.einsum("bsd,dnh->bsnh", xkv, _np(mha.value.kernel)) + _np(mha.value.bias)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    o = np.einsum("bnts,bsnh->btnh", w, v)
    return np.einsum("btnh,nhd->btd", o, _np(mha.out.kernel)) + _np(mha.out.bias)


def _ffn(mlp, x, gelu=False):
    h = x @ _np(mlp.linear1.kernel) + _np(mlp.linear1.bias)
    if gelu:
        from math import erf

        h = 0.5 * h * (1 + np.vectorize(erf)(h / np.sqrt(2)))
    else:
        h = np.maximum(h, 0)
    return h @ _np(mlp.linear2.kernel) + _np(mlp.linear2.bias)


def _encoder_ref(block, x, mask, pre_norm, gelu, bias=None):
    sa = lambda h: _mha(block.self_attention, h, h, mask, bias)  # noqa: E731
    if pre_norm:
        x = x + sa(_layer_norm(x, block.norm1))
        return x + _ffn(block.mlp, _layer_norm(x, block.norm2), gelu)
    x = _layer_norm(x + sa(x), block.norm1)
    return _layer_norm(x + _ffn(block.mlp, x, gelu), block.norm2)


def _randomize_norms(block, key):
    for name in ("norm1", "norm2", "norm3"):
        ln = getattr(block, name, None)
        if ln is not None:
            key, k1, k2 = jax.random.split(key, 3)
            ln.scale[...] = 1 + 0.3 * jax.random.normal(k1, ln.scale.shape)
            ln.bias[...] = 0.3 * jax.random.normal(k2, ln.bias.shape)


@pytest.mark.parametrize("pre_norm,activation", [(False, "relu"), (True, "gelu")])
def test_encoder_block_matches_numpy(pre_norm, activation):
    block = EncoderBlock(
        D, N, F, dropout_rate=0.0, pre_norm=pre_norm, activation=activation, rngs=nnx.Rngs(0)
    )
    _randomize_norms(block, jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (2, 5, D))
    valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
    mask = valid[:, None, None, :]
    # the pre-norm case also takes an additive bias (bidirectional ALiBi)
    bias = (
        np.asarray(alibi_bias(alibi_slopes(N), 5, 5, bidirectional=True))[None]
        if pre_norm
        else None
    )
    got = block(x, mask=jnp.asarray(mask), bias=None if bias is None else jnp.asarray(bias))
    x = np.asarray(x, np.float64)
    want = _encoder_ref(block, x, mask, pre_norm, activation == "gelu", bias)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_decoder_block_matches_numpy(pre_norm):
    block = DecoderBlock(D, N, F, dropout_rate=0.0, pre_norm=pre_norm, rngs=nnx.Rngs(0))
    _randomize_norms(block, jax.random.key(1))
    y = jax.random.normal(jax.random.key(2), (2, 4, D))
    mem = jax.random.normal(jax.random.key(3), (2, 3, D))
    cross = np.array([[1, 1, 1], [1, 1, 0]], bool)[:, None, None, :]
    got = block(y, mem, cross_mask=jnp.asarray(cross))
    y, mem = np.asarray(y, np.float64), np.asarray(mem, np.float64)
    causal = np.tril(np.ones((4, 4), bool))[None, None]
    sa = lambda h: _mha(block.self_attention, h, h, causal)  # noqa: E731
    ca = lambda h: _mha(block.cross_attention, h, mem, cross)  # noqa: E731
    if pre_norm:
        y = y + sa(_layer_norm(y, block.norm1))
        y = y + ca(_layer_norm(y, block.norm2))
        want = y + _ffn(block.mlp, _layer_norm(y, block.norm3))
    else:
        y = _layer_norm(y + sa(y), block.norm1)
        y = _layer_norm(y + ca(y), block.norm2)
        want = _layer_norm(y + _ffn(block.mlp, y), block.norm3)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_stacks_chain_blocks_and_final_norm():
    enc = TransformerEncoder(2, D, N, F, dropout_rate=0.0, final_norm=True, rngs=nnx.Rngs(0))
    assert len(enc.layers) == 2 and isinstance(enc.norm, nnx.LayerNorm)
    x = jax.random.normal(jax.random.key(0), (1, 3, D))
    want = enc.norm(enc.layers[1](enc.layers[0](x)))
    np.testing.assert_allclose(np.asarray(enc(x)), np.asarray(want), atol=1e-6)
    dec = TransformerDecoder(1, D, N, F, rngs=nnx.Rngs(0))
    assert dec.norm is None and isinstance(dec.layers[0], DecoderBlock)
    assert dec(x, x).shape == (1, 3, D)


def test_dropout_is_active_only_when_not_deterministic():
    block = EncoderBlock(D, N, F, dropout_rate=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 4, D))
    a = block(x)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(block(x)))
    b = block(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
    c = block(x, deterministic=False, rngs=nnx.Rngs(dropout=2))
    assert not np.allclose(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(b), np.asarray(c))


def test_a_bare_key_gives_every_dropout_site_its_own_key(monkeypatch):
    """A PRNG key passed to a block is a stream, as nnx.Rngs(dropout=key) is: each site
    (attention weights, two residuals, the MLP) draws a different key. Used as is, one
    key dropped the same units at every site of the same shape."""
    import jattn.layers.dropout as dropout_lib

    drawn = []
    original = dropout_lib.dropout_key

    def record(*args, **kwargs):
        key = original(*args, **kwargs)
        if key is not None:
            drawn.append(np.asarray(jax.random.key_data(key)).tobytes())
        return key

    monkeypatch.setattr(dropout_lib, "dropout_key", record)
    block = EncoderBlock(D, N, F, dropout_rate=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 4, D))
    key = jax.random.key(7)
    a = block(x, deterministic=False, rngs=key)
    assert len(drawn) >= 3 and len(set(drawn)) == len(drawn)
    monkeypatch.undo()
    b = block(x, deterministic=False, rngs=nnx.Rngs(dropout=key))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_score_factory_and_sown_weights():
    def score(n, h, *, rngs):
        return BilinearScore(n, h, h, rngs=rngs)

    block = DecoderBlock(D, N, F, dropout_rate=0.0, score=score, rngs=nnx.Rngs(0))
    assert isinstance(block.self_attention.score, BilinearScore)
    assert block.self_attention.score is not block.cross_attention.score
    y = jax.random.normal(jax.random.key(0), (2, 3, D))
    mem = jax.random.normal(jax.random.key(1), (2, 5, D))
    capture = nnx.capture(lambda m, *a: m(*a, sow_weights=True), nnx.Intermediate)
    _, sown = capture(block, y, mem)
    (self_w,) = sown["self_attention"]["attention_weights"].get_value()
    (cross_w,) = sown["cross_attention"]["attention_weights"].get_value()
    assert self_w.shape == (2, N, 3, 3) and cross_w.shape == (2, N, 3, 5)
    np.testing.assert_allclose(np.asarray(jnp.triu(self_w, 1)), 0.0)  # causal
    np.testing.assert_allclose(np.asarray(cross_w.sum(-1)), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda r: EncoderBlock(30, 4, F, rngs=r), "features=30 must be divisible by num_heads=4"),
        (lambda r: DecoderBlock(D, N, F, activation="tanh", rngs=r), "activation must be one of"),
        (lambda r: FeedForward(D, 0, rngs=r), "mlp_features must be a positive int"),
        (lambda r: EncoderBlock(D, N, F, dropout_rate=1.0, rngs=r), r"dropout_rate must be in"),
        (lambda r: TransformerEncoder(0, D, N, F, rngs=r), "num_layers must be a positive int"),
    ],
)
def test_config_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make(nnx.Rngs(0))
