"""LinearAttention layers in place of MultiHeadAttention, in models, and in decoding
with a constant-size state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jattn
from jattn.functional import lowrank
from jattn.layers import LinearAttention, MultiHeadAttention
from jattn.models import DecoderLM, EncoderClassifier, Transformer

X = jax.random.normal(jax.random.key(0), (2, 9, 16))


def test_layer_is_the_functional_core_with_multihead_projections():
    """Same parameter layout as MultiHeadAttention (GQA too); the output is the pure
    function of the projections; padding keys contribute nothing."""
    lin = LinearAttention(4, 16, num_kv_heads=2, kind="linear", rngs=nnx.Rngs(0))
    mha = MultiHeadAttention(4, 16, num_kv_heads=2, rngs=nnx.Rngs(0))
    shapes = jax.tree.map(jnp.shape, nnx.state(mha, nnx.Param))
    assert jax.tree.map(jnp.shape, nnx.state(lin, nnx.Param)) == shapes
    q, k, v = lin.query(X), lin.key(X), lin.value(X)
    want = lin.out(jattn.linear_attention(q, k, v, is_causal=True))
    np.testing.assert_allclose(lin(X, is_causal=True), want, atol=1e-6)
    valid = jnp.arange(9)[None, :] < jnp.array([9, 5])[:, None]
    got = lin(X, mask=jattn.key_padding_mask(valid))
    short = lin(X[1:, :5])
    np.testing.assert_allclose(got[1, :5], short[0], atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "performer", "retention", "gla"])
def test_decoder_lm_prefill_and_steps_equal_the_forward_pass(kind):
    lm = DecoderLM(11, num_layers=1, features=16, num_heads=4, max_len=16, dropout_rate=0.0,
                   attention=kind, rngs=nnx.Rngs(0))  # fmt: skip
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 3, 11)
    full = lm(tokens)
    step = nnx.jit(lambda lm, tok, caches: lm.step(tok, caches))
    caches = lm.init_cache(2, 16)
    logits, caches = step(lm, tokens[:, :5], caches)  # a chunked prefill
    outs = [logits]
    for t in range(5, 8):  # then recurrent single-token steps
        logits, caches = step(lm, tokens[:, t : t + 1], caches)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5)
    assert caches[0].kv.shape[:2] == (2, 4) and caches[0].index.tolist() == [8, 8]


def test_generation_with_ragged_prompts_equals_one_prompt_at_a_time():
    """The state of each example stops where its prompt does (no padding leaks in)."""
    lm = DecoderLM(11, num_layers=2, features=16, num_heads=4, max_len=16, dropout_rate=0.0,
                   attention="gla", rngs=nnx.Rngs(0))  # fmt: skip
    prompt, lengths = jnp.array([[5, 6, 7, 8], [9, 4, 0, 0]]), jnp.array([4, 2])
    for beam in (1, 2):
        both = lm.generate(prompt, lengths, max_new_tokens=4, beam_size=beam)
        one = lm.generate(prompt[1:, :2], lengths[1:], max_new_tokens=4, beam_size=beam)
        np.testing.assert_array_equal(both[1], one[0])


def test_models_and_errors():
    model = Transformer(11, 11, features=16, num_heads=4, attention="performer",
                        rngs=nnx.Rngs(0))  # fmt: skip
    assert isinstance(model.encoder.layers[0].self_attention, LinearAttention)
    assert isinstance(model.decoder.layers[0].cross_attention, MultiHeadAttention)
    assert not isinstance(model.decoder.layers[0].cross_attention, LinearAttention)
    src = jnp.full((2, 6), 5, jnp.int32)
    assert model(src, src).shape == (2, 6, 11)
    clf = EncoderClassifier(11, 3, features=16, num_heads=4, attention="linear", rngs=nnx.Rngs(0))
    assert clf(jnp.array([[5, 6, 0], [5, 5, 5]])).shape == (2, 3)
    with pytest.raises(ValueError, match="'retention' is causal only"):
        Transformer(11, 11, features=16, num_heads=4, attention="retention", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention must be 'softmax' or one of"):
        DecoderLM(11, features=16, num_heads=4, attention="flash", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention='linear' takes no mask_mod"):
        DecoderLM(11, features=16, num_heads=4, attention="linear", mask_mod="causal",
                  rngs=nnx.Rngs(0))  # fmt: skip
    lin = LinearAttention(4, 16, kind="retention", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="causal only: call it with is_causal=True"):
        lin(X)
    with pytest.raises(ValueError, match="only a boolean key-padding mask"):
        LinearAttention(4, 16, rngs=nnx.Rngs(0))(X, mask=jnp.ones((2, 1, 9, 9), bool))
    with pytest.raises(ValueError, match="never forms the"):
        LinearAttention(4, 16, rngs=nnx.Rngs(0))(X, return_weights=True)


_PADDED = {}


def _padded_layer(kind):
    """A LinearAttention layer and its jitted (output, input gradient, parameter
    gradients) of a key-padded cross call, compiled once per kind."""
    if kind not in _PADDED:
        layer = LinearAttention(2, 8, kind=kind, rngs=nnx.Rngs(0))
        graph, params = nnx.split(layer)

        @jax.jit
        def run(params, x, kv, valid):
            def loss(params, kv):
                out = nnx.merge(graph, params)(x, kv, mask=jattn.key_padding_mask(valid))
                return jnp.sum(out**2), out

            (_, out), (dp, dkv) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, kv)
            return out, dkv, dp

        _PADDED[kind] = lambda *a: run(params, *a)
    return _PADDED[kind]


@settings(max_examples=10, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=2, max_size=2),
    fill=st.sampled_from([np.nan, np.inf, -np.inf]),
    kind=st.sampled_from(["linear", "performer"]),
)
def test_padded_keys_reach_nothing(lengths, fill, kind):
    """Was NaN: the layer masked the keys after the feature map, so a NaN in a padded
    key (uninitialised padding) reached the gradients at the padded positions and the
    parameter gradients. Now padded key inputs are zeroed before the projections: the
    output and the real positions' gradients equal a clean run's, the padded ones are
    exactly 0, and every parameter gradient is finite."""
    rng = np.random.default_rng(lengths[0] * 7 + lengths[1])
    x = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)
    kv = rng.standard_normal((2, 6, 8)).astype(np.float32)
    valid = np.arange(6)[None, :] < np.asarray(lengths)[:, None]
    dirty = np.where(valid[..., None], kv, np.float32(fill))
    run = _padded_layer(kind)
    out, dkv, dp = run(x, jnp.asarray(dirty), jnp.asarray(valid))
    want_out, want_dkv, _ = run(x, jnp.asarray(kv), jnp.asarray(valid))
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(np.where(valid[..., None], dkv, 0.0), want_dkv * valid[..., None])
    assert not np.asarray(dkv)[~valid].any()
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(dp))


_PERFORMER = LinearAttention(4, 16, num_kv_heads=2, kind="performer", num_features=32,
                             chunk_size=3, rngs=nnx.Rngs(3))  # fmt: skip
_PERFORMER_STEP = nnx.jit(lambda layer, x, cache: layer.step(x, cache))


@settings(max_examples=8, deadline=None)
@given(scale=st.sampled_from([1.0, 8.0, 30.0]), prefill=st.integers(1, 8),
       seed=st.integers(0, 2**31 - 1))  # fmt: skip
def test_performer_layer_at_any_input_scale(scale, prefill, seed):
    """The layer's keys had no stabiliser: inputs of a large scale (keys whose feature
    logits are far below 0) underflowed every key feature and the layer returned about
    0. Now it is :func:`jattn.performer_attention` of its projections (stabilised by the
    max of the keys each row sees), its decoding state carries the running max, and
    padding keys do not set it: a prefill and single steps equal the causal forward
    pass, and a padded example equals its unpadded self."""
    layer = _PERFORMER
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((2, 9, 16)) * scale,
                    jnp.float32)  # fmt: skip
    q, k, v = layer.query(x), layer.key(x), layer.value(x)
    w = layer.projection[...]
    # the features are exps of logits that reach |l| ~ 1e4 at scale 30, which float32
    # holds to ~|l| * 6e-8: programs fused differently (a jitted step, the whole
    # sequence) differ by a few of those ulps, relative, in every feature
    top = max(float(jnp.abs(lowrank._favor_logits(a, w)).max()) for a in (q, k))
    tol = dict(rtol=1e-5 + 4 * float(jnp.finfo(jnp.float32).eps) * top, atol=1e-5 * scale)
    for causal in (True, False):
        want = layer.out(jattn.performer_attention(q, k, v, w, is_causal=causal))
        np.testing.assert_allclose(layer(x, is_causal=causal), want, **tol)
    full = layer(x, is_causal=True)
    out, cache = _PERFORMER_STEP(layer, x[:, :prefill], layer.init_cache(2))
    outs = [out]
    for t in range(prefill, 9):
        out, cache = _PERFORMER_STEP(layer, x[:, t : t + 1], cache)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, **tol)
    valid = jnp.arange(9)[None, :] < jnp.array([9, prefill])[:, None]
    padded = layer(x.at[1, prefill:].multiply(0.01), mask=jattn.key_padding_mask(valid))
    np.testing.assert_allclose(padded[1, :prefill], layer(x[1:, :prefill])[0], **tol)
    # the padding keys' features: exp(0 - m) overflowed for a max m far below 0 (large
    # keys), and its derivative met the select's zero: NaN in the key projection's grads
    grads = nnx.grad(lambda m: jnp.sum(m(x, mask=jattn.key_padding_mask(valid))[1, :prefill]))(
        layer
    )
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(nnx.state(grads, nnx.Param)))


@settings(max_examples=8, deadline=None)
@given(kind=st.sampled_from(["retention", "gla"]), scale=st.sampled_from([1.0, 30.0]),
       seed=st.integers(0, 2**31 - 1))  # fmt: skip
def test_retention_and_gla_layers_normalise_each_head(kind, scale, seed):
    """The docs said the layer normalises retention's output per head (as RetNet); it
    did not, and the unnormalised sums grow with the cube of the inputs' scale: float16
    gave inf, then NaN, at inputs of scale 30. Now each head's float32 output is
    RMS-normalised before the output projection: the layer is that of the functional
    core, and float16 stays finite and close to float32."""
    layers = {
        d: LinearAttention(2, 8, kind=kind, chunk_size=3, dtype=d, rngs=nnx.Rngs(1))
        for d in (jnp.float32, jnp.float16)
    }
    layer = layers[jnp.float32]
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((1, 7, 8)) * scale, jnp.float32)
    q, k, v = (p(x).reshape(1, 7, 2, 4) for p in (layer.query, layer.key, layer.value))
    if kind == "retention":
        core = jattn.retention(q * 4**-0.5, k, v, layer.decay)
    else:
        core = jattn.gated_linear_attention(q, k, v, layer._log_gates(x))
    core = np.asarray(core, np.float64)
    normed = core / np.sqrt((core**2).mean(-1, keepdims=True) + 1e-6)
    want = layer.out(jnp.asarray(normed, jnp.float32))
    got = layer(x, is_causal=True)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    half = layers[jnp.float16](x.astype(jnp.float16), is_causal=True)
    assert np.isfinite(np.asarray(half, np.float32)).all()
    np.testing.assert_allclose(np.asarray(half, np.float32), got, rtol=0.05, atol=0.05)


_CAUSAL = {}


def _causal_layer(kind):
    """A causal LinearAttention layer's jitted (output, input gradient) of a loss over
    the rows that ``keep`` marks, compiled once per kind."""
    if kind not in _CAUSAL:
        layer = LinearAttention(2, 8, kind=kind, num_features=16, chunk_size=3,
                                rngs=nnx.Rngs(0))  # fmt: skip
        graph, params = nnx.split(layer)

        @jax.jit
        def run(x, keep):
            def loss(x):
                out = nnx.merge(graph, params)(x, is_causal=True)
                return jnp.sum(jnp.where(keep, out, 0.0) ** 2), out

            (_, out), dx = jax.value_and_grad(loss, has_aux=True)(x)
            return out, dx

        _CAUSAL[kind] = run
    return _CAUSAL[kind]


@settings(max_examples=12, deadline=None)
@given(
    kind=st.sampled_from(["linear", "performer", "retention", "gla"]),
    pos=st.integers(1, 6),
    fill=st.sampled_from([np.nan, np.inf, -np.inf]),
    seed=st.integers(0, 2**31 - 1),
)
def test_causal_layer_bad_token_reaches_only_later_rows(kind, pos, fill, seed):
    """A NaN/inf input token made the input gradient NaN (kinds linear and performer:
    the feature map's derivative at NaN met the zero cotangent; gla: its gate's) and,
    for gla, reached every earlier row's gradient through the NaN decay. Now the rows
    before it and their gradients equal a clean run's, its own gradient is exactly 0,
    and the rows from it on are NaN."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 7, 8)).astype(np.float32)
    bad = x.copy()
    bad[0, pos, rng.integers(8)] = fill
    keep = jnp.asarray((np.arange(7) < pos)[None, :, None])
    out, dx = _causal_layer(kind)(jnp.asarray(bad), keep)
    want, want_dx = _causal_layer(kind)(jnp.asarray(x), keep)
    np.testing.assert_allclose(out[0, :pos], want[0, :pos], rtol=1e-5, atol=1e-6)
    assert np.isnan(np.asarray(out)[0, pos:]).all()
    assert np.isfinite(np.asarray(dx)).all() and not np.asarray(dx)[0, pos:].any()
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_named():
    layer = LinearAttention(2, 8, rngs=nnx.Rngs(0))
    for x in (jnp.ones((3, 8)), jnp.ones((1, 2, 3, 8)), jnp.ones((2, 3, 4))):
        with pytest.raises(ValueError, match=r"inputs_q must have shape \[B, L, 8\]"):
            layer(x)
    with pytest.raises(ValueError, match=r"key-padding mask \[B, 1, 1, S\] = \[2, 1, 1, 6\]"):
        layer(jnp.ones((2, 3, 8)), jnp.ones((2, 6, 8)), mask=jnp.ones((2, 1, 1, 7), bool))
    with pytest.raises(ValueError, match="must have the same batch size B"):
        layer(jnp.ones((2, 3, 8)), jnp.ones((3, 6, 8)))
    with pytest.raises(ValueError, match=r"x must have shape \[B, L, 8\]"):
        layer.step(jnp.ones((1, 8)), layer.init_cache(1))
    with pytest.raises(ValueError, match=r"B=2 sequences, but the cache holds 3"):
        layer.step(jnp.ones((2, 1, 8)), layer.init_cache(3))
