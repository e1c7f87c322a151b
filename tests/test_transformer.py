"""The Transformer models: masking from token ids, causality, sown weights, jit, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn.layers import BilinearScore
from jattn.models import DecoderLM, EncoderClassifier, Transformer

SMALL = dict(features=16, num_heads=2, mlp_features=32, dropout_rate=0.0, max_len=16)
SRC = jnp.array([[3, 4, 5, 6, 2, 0, 0], [7, 8, 2, 0, 0, 0, 0]])
TGT = jnp.array([[1, 3, 4, 5, 6], [1, 6, 5, 2, 0]])


_forward = nnx.jit(lambda m, s, t: m(s, t))
_capture = nnx.capture(lambda m, *a: m(*a, sow_weights=True), nnx.Intermediate)


@pytest.fixture(scope="module")
def model():
    return Transformer(9, 7, num_encoder_layers=2, num_decoder_layers=1, rngs=nnx.Rngs(0), **SMALL)


def test_logits_shape_dtype_and_padding_is_ignored(model):
    forward = _forward
    logits = forward(model, SRC, TGT)
    assert logits.shape == (2, 5, 7) and logits.dtype == jnp.float32
    # the same sources with less padding (none for the first example)
    np.testing.assert_allclose(
        np.asarray(forward(model, SRC[:, :5], TGT)), np.asarray(logits), atol=1e-5
    )
    # the second example alone, without padding
    alone = forward(model, SRC[1:, :3], TGT[1:])
    np.testing.assert_allclose(np.asarray(alone), np.asarray(logits[1:]), atol=1e-5)
    # but a real source token does matter
    changed = forward(model, SRC.at[1, 1].set(5), TGT)
    assert not np.allclose(np.asarray(changed[1]), np.asarray(logits[1]), atol=1e-3)


def test_decoder_is_causal(model):
    logits = _forward(model, SRC, TGT)
    changed = TGT.at[:, 3:].set(jnp.array([[5, 5], [4, 3]]))
    new = _forward(model, SRC, changed)
    np.testing.assert_allclose(np.asarray(new[:, :3]), np.asarray(logits[:, :3]), atol=1e-6)
    assert not np.allclose(np.asarray(new[:, 3:]), np.asarray(logits[:, 3:]))


def test_every_attention_layer_sows_weights(model):
    out, sown = _capture(model, SRC, TGT)
    weights = {
        path: leaf for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(sown))
    }
    shapes = {jax.tree_util.keystr(p): w.shape for p, w in weights.items()}
    assert len(shapes) == 2 + 2  # 2 encoder self, 1 decoder self + 1 cross
    enc = [w for p, w in weights.items() if "encoder" in jax.tree_util.keystr(p)]
    cross = [w for p, w in weights.items() if "cross_attention" in jax.tree_util.keystr(p)]
    dec_self = [
        w
        for p, w in weights.items()
        if "decoder" in jax.tree_util.keystr(p) and "self_attention" in jax.tree_util.keystr(p)
    ]
    assert all(w.shape == (2, 2, 7, 7) for w in enc) and len(enc) == 2
    assert dec_self[0].shape == (2, 2, 5, 5) and cross[0].shape == (2, 2, 5, 7)
    # padding keys get no weight; causal self-attention has none above the diagonal
    np.testing.assert_allclose(np.asarray(cross[0][1, :, :, 3:]), 0.0)
    np.testing.assert_allclose(np.asarray(enc[0][0, :, :, 5:]), 0.0)
    np.testing.assert_allclose(np.asarray(jnp.triu(dec_self[0], 1)), 0.0)
    np.testing.assert_allclose(np.asarray(cross[0].sum(-1)), 1.0, rtol=1e-5)
    # sowing does not change the outputs, and nothing is sown without the flag
    np.testing.assert_allclose(np.asarray(_forward(model, SRC, TGT)), np.asarray(out), atol=1e-5)
    _, none_sown = nnx.capture(lambda m, *a: m(*a), nnx.Intermediate)(model, SRC, TGT)
    assert not jax.tree_util.tree_leaves(nnx.to_pure_dict(none_sown))
    assert not jax.tree_util.tree_leaves(nnx.state(model, nnx.Intermediate))  # nothing stored


@pytest.mark.parametrize("positional", ["learned", "rotary"])
def test_positional_variants_and_shared_embeddings(positional):
    m = Transformer(
        9, 9, positional=positional, share_embeddings=True, pre_norm=True, rngs=nnx.Rngs(1),
        **SMALL,
    )  # fmt: skip
    assert m.output is None and m.tgt_embed.token is m.src_embed.token
    assert m.encoder.norm is not None  # pre-norm gets a final norm by default
    logits = _forward(m, SRC, TGT)
    assert logits.shape == (2, 5, 9)

    @nnx.jit
    def reference(m):
        y = m.decoder(m.tgt_embed(TGT), m.encode(SRC), cross_mask=(SRC != 0)[:, None, None, :])
        return y @ m.src_embed.token.embedding[...].T

    want = reference(m)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=1e-5)
    if positional == "rotary":
        assert m.src_embed.position is None
    else:  # learned: positions matter through the table
        assert m.src_embed.position.embedding.embedding.shape == (16, 16)


def test_embedding_dropout_needs_not_deterministic():
    m = Transformer(9, 7, num_layers=1, **{**SMALL, "dropout_rate": 0.5}, rngs=nnx.Rngs(0))
    a = m.src_embed(SRC)
    np.testing.assert_allclose(
        np.asarray(a), np.asarray(m.src_embed.token(SRC) * 4.0 + m.src_embed.position(
            jnp.arange(7)[None, :])), rtol=1e-6,
    )  # fmt: skip
    b = m.src_embed(SRC, deterministic=False, rngs=nnx.Rngs(dropout=1))
    dropped = np.asarray(b) == 0
    assert 0.3 < dropped.mean() < 0.7
    np.testing.assert_allclose(np.asarray(b)[~dropped], 2 * np.asarray(a)[~dropped], rtol=1e-6)


def test_decoder_lm_is_causal_and_sows():
    lm = DecoderLM(10, num_layers=2, rngs=nnx.Rngs(0), **SMALL)
    tokens = jnp.array([[1, 4, 5, 6, 7], [1, 3, 2, 0, 0]])
    logits, sown = _capture(lm, tokens)
    assert logits.shape == (2, 5, 10) and logits.dtype == jnp.float32
    sown = jax.tree_util.tree_leaves(nnx.to_pure_dict(sown))
    assert len(sown) == 2 and all(w.shape == (2, 2, 5, 5) for w in sown)
    np.testing.assert_allclose(np.asarray(jnp.triu(sown[0], 1)), 0.0)
    changed = lm(tokens.at[:, 3:].set(9))
    np.testing.assert_allclose(np.asarray(changed[:, :3]), np.asarray(logits[:, :3]), atol=1e-6)
    assert not np.allclose(np.asarray(changed[:, 3:]), np.asarray(logits[:, 3:]))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_encoder_classifier_pools_real_tokens(pooling):
    clf = EncoderClassifier(9, 3, pooling=pooling, rngs=nnx.Rngs(0), **SMALL)
    forward = nnx.jit(lambda m, t: m(t))
    logits = forward(clf, SRC)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(forward(clf, SRC[1:, :3])), np.asarray(logits[1:]), atol=1e-5
    )

    @nnx.jit
    def reference(clf):
        x = clf.encoder(clf.embed(SRC), mask=(SRC != 0)[:, None, None, :])
        return clf.classifier(x[:, 0] if pooling == "cls" else x[1, :3].mean(0)[None])

    want = reference(clf)
    rows = slice(None) if pooling == "cls" else slice(1, 2)
    np.testing.assert_allclose(np.asarray(logits[rows]), np.asarray(want), atol=1e-5)


def test_attention_fn_and_score_reach_every_attention_layer():
    calls = []

    def attention_fn(q, k, v, bias, mask, **kw):
        calls.append((q.shape, k.shape, sorted(kw)))
        return jattn.attention(q, k, v, bias, mask, **kw)

    def score(n, h, *, rngs):
        return BilinearScore(n, h, h, rngs=rngs)

    m = Transformer(
        9, 7, num_layers=1, positional="rotary", attention_fn=attention_fn, score=score,
        rngs=nnx.Rngs(0), **SMALL,
    )  # fmt: skip
    mhas = [m.encoder.layers[0].self_attention, m.decoder.layers[0].self_attention,
            m.decoder.layers[0].cross_attention]  # fmt: skip
    assert all(isinstance(a.score, BilinearScore) for a in mhas)
    assert len({id(a.score) for a in mhas}) == 3
    _forward(m, SRC, TGT)  # calls are recorded while tracing
    # encoder self, decoder self, cross: each with the score function's kwargs
    assert [c[:2] for c in calls] == [
        ((2, 7, 2, 8), (2, 7, 2, 8)),
        ((2, 5, 2, 8), (2, 5, 2, 8)),
        ((2, 5, 2, 8), (2, 7, 2, 8)),
    ]
    assert all("score_fn" in c[2] for c in calls)
    # the cached decoder uses the same function and score
    calls.clear()
    m.generate(SRC, max_len=2)
    # encoder, then one traced step: self-attention over the cache (2 slots), cross
    assert [c[:2] for c in calls] == [
        ((2, 7, 2, 8), (2, 7, 2, 8)),
        ((2, 1, 2, 8), (2, 2, 2, 8)),
        ((2, 1, 2, 8), (2, 7, 2, 8)),
    ]


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda r: Transformer(9, 7, features=30, num_heads=4, rngs=r), "features=30 must be"),
        (lambda r: Transformer(9, 7, positional="alibi", rngs=r), "positional must be one of"),
        (lambda r: Transformer(9, 7, activation="swish", rngs=r), "activation must be one of"),
        (lambda r: Transformer(9, 7, share_embeddings=True, rngs=r), "share_embeddings needs"),
        (lambda r: Transformer(9, 7, num_layers=0, rngs=r), "num_layers must be a positive"),
        (lambda r: Transformer(0, 7, rngs=r), "vocab_size must be a positive int"),
        (lambda r: DecoderLM(9, max_len=0, rngs=r), "max_len must be a positive int"),
        (
            lambda r: DecoderLM(9, features=9, num_heads=3, rngs=r),
            "sinusoidal encoding needs an even",
        ),
        (lambda r: EncoderClassifier(9, 2, pooling="max", rngs=r), "pooling must be"),
        (lambda r: EncoderClassifier(9, 0, rngs=r), "num_classes must be a positive int"),
        # 0 is a value, not "the default"
        (lambda r: Transformer(9, 7, num_encoder_layers=0, rngs=r), "num_encoder_layers must"),
        (lambda r: Transformer(9, 7, num_decoder_layers=0, rngs=r), "num_decoder_layers must"),
        (lambda r: Transformer(9, 7, mlp_features=0, rngs=r), "mlp_features must be a positive"),
        (lambda r: Transformer(9, 7, eos_id=7, rngs=r), r"eos_id=7 is outside the target"),
        (lambda r: Transformer(9, 7, pad_id=-1, rngs=r), r"pad_id=-1 is outside the target"),
        (lambda r: DecoderLM(9, bos_id=9, rngs=r), r"bos_id=9 is outside the vocabulary \[0, 9\)"),
        (lambda r: EncoderClassifier(9, 2, pad_id=9, rngs=r), r"pad_id=9 is outside"),
    ],
)
def test_config_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make(nnx.Rngs(0))


def test_input_errors(model):
    with pytest.raises(ValueError, match=r"src must be integer tokens \[B, L\]"):
        model(SRC[0], TGT)
    with pytest.raises(ValueError, match="tgt_in length 17 exceeds max_len=16"):
        model(SRC, jnp.ones((2, 17), jnp.int32))
    # ids beyond the table would gather NaN, negative ones wrap around: both refused
    with pytest.raises(ValueError, match=r"tgt_in holds token ids outside the vocabulary"):
        model(SRC, TGT.at[0, 1].set(99))
    with pytest.raises(ValueError, match=r"src holds .*\[0, 9\): min -1"):
        model(SRC.at[1, 0].set(-1), TGT)
