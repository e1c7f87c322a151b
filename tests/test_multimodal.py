"""Multi-modal attention (jattn.layers.multimodal and MultiHeadAttention's widths): NumPy
float64 references, MultiHeadAttention with copied weights, exact identities, masks,
permutation invariance, memory linear in the input length, and the error messages."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from _layers import check_axis_names
from _layers import normal as _normal
from _layers import randomize as _randomize
from flax import nnx
from jax.test_util import check_grads

import jattn
from jattn import viz
from jattn.functional.dispatch import dense_in_layout, select
from jattn.layers import (
    AttentionPoolingHead,
    CoAttention,
    GatedCrossAttentionBlock,
    MultiHeadAttention,
    PerceiverEncoder,
)

B, T, S = 2, 3, 5
F64_TOL = dict(rtol=1e-5, atol=1e-5)  # float32 layers against float64 NumPy
SAME_TOL = dict(rtol=1e-6, atol=1e-6)  # one computation, another summation order


def _num_params(module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _padding(seed, shape):
    """A random key padding mask [..., S] with its first token always real."""
    m = np.random.default_rng(seed).random(shape) < 0.6
    m[..., 0] = True
    return jnp.asarray(m)


def _scramble_padding(x, mask, seed):
    """``x [..., S, D]`` with its padded tokens (mask False) set to large random values."""
    noise = _normal(seed, x.shape, 1e3)
    return jnp.where(mask[..., None], x, noise)


def _np_linear(x, lin, spec):
    kernel = np.asarray(lin.kernel[...], np.float64)
    bias = 0.0 if lin.bias is None else np.asarray(lin.bias[...], np.float64)
    return np.einsum(spec, ref.f64(x), kernel) + bias


def _np_mha(layer, xq, xk, xv, mask=None):
    """``layer`` in float64: project, per-head attention (NumPy loop), project back."""
    q = _np_linear(xq, layer.query, "...td,dnh->...tnh")
    k = _np_linear(xk, layer.key, "...sd,dnh->...snh")
    v = _np_linear(xv, layer.value, "...sd,dnh->...snh")
    out, weights, _ = ref.attention(q, k, v, mask=mask)
    return _np_linear(out, layer.out, "btnh,nhd->btd"), weights


# ---------------------------------------------- MultiHeadAttention: every width differs


def _all_widths(rngs=0, **kw):
    """Query, key and value inputs of widths 6, 7, 9; H=3 != Hv=2; N=4 over K=2 groups."""
    return MultiHeadAttention(4, 6, 12, out_features=5, num_kv_heads=2, in_kv_features=7,
                              in_value_features=9, v_head_dim=2, rngs=nnx.Rngs(rngs),
                              **kw)  # fmt: skip


def test_three_widths_qk_dim_and_gqa_together_vs_numpy_on_dense_and_blocked():
    layer = _randomize(_all_widths())
    assert (layer.head_dim, layer.v_head_dim, layer.num_kv_heads) == (3, 2, 2)
    shapes = [(k.kernel.shape) for k in (layer.query, layer.key, layer.value, layer.out)]
    assert shapes == [(6, 4, 3), (7, 2, 3), (9, 2, 2), (4, 2, 5)]
    xq, xk, xv = _normal(1, (B, T, 6)), _normal(2, (B, S, 7)), _normal(3, (B, S, 9))
    mask = _padding(4, (B, 1, T, S))
    out, weights = layer(xq, xk, xv, mask=mask, return_weights=True)
    want, want_w = _np_mha(layer, xq, xk, xv, mask)
    assert out.shape == (B, T, 5) and weights.shape == (B, 4, T, S)
    np.testing.assert_allclose(out, want, **F64_TOL)
    np.testing.assert_allclose(weights, want_w, **F64_TOL)
    blocked = _all_widths(attention_fn=functools.partial(jattn.dot_product_attention,
                                                         implementation="blocked"))  # fmt: skip
    nnx.update(blocked, nnx.state(layer, nnx.Param))
    np.testing.assert_allclose(blocked(xq, xk, xv, mask=mask), want, **F64_TOL)
    # one query against 1024 keys: on CPU the dense path's products in the keys' layout
    xq, xk, xv = _normal(5, (B, 1, 6)), _normal(6, (B, 1024, 7)), _normal(7, (B, 1024, 9))
    if jax.default_backend() == "cpu":
        q = jax.ShapeDtypeStruct((B, 1, 4, 3), jnp.float32)
        k = jax.ShapeDtypeStruct((B, 1024, 2, 3), jnp.float32)
        assert dense_in_layout(q, k)
    np.testing.assert_allclose(layer(xq, xk, xv), _np_mha(layer, xq, xk, xv)[0], **F64_TOL)


def test_three_widths_qk_dim_and_gqa_together_gradients():
    """Reverse-mode gradients of every parameter and input, against finite differences
    (float32: a step of 3e-3, as tests/test_scores.py explains)."""
    layer = _randomize(_all_widths())
    graphdef, params = nnx.split(layer, nnx.Param)

    @jax.jit
    def f(params, xq, xk, xv):
        mask = jnp.array([[[[True, True, False]]]])  # [1, 1, 1, S]
        return nnx.merge(graphdef, params)(xq, xk, xv, mask=mask)

    xq, xk, xv = _normal(1, (1, 2, 6)), _normal(2, (1, 3, 7)), _normal(3, (1, 3, 9))
    check_grads(f, (params, xq, xk, xv), order=1, modes=["rev"], eps=3e-3)


# ------------------------------------------------------------------------ co-attention

DT, DI = 6, 10  # text and image widths


@functools.cache
def _co():
    return _randomize(CoAttention(DT, DI, 2, rngs=nnx.Rngs(0)))


def _text_image(seed=1):
    return _normal(seed, (B, T, DT)), _normal(seed + 1, (B, S, DI))


def test_co_attention_directions_equal_cross_attention_layers_with_the_same_weights():
    co = _co()
    text, image = _text_image()
    text_mask, image_mask = _padding(3, (B, T)), _padding(4, (B, S))
    text_out, image_out, w = co(text, image, text_mask=text_mask, image_mask=image_mask,
                                return_weights=True)  # fmt: skip
    t2i = MultiHeadAttention(2, DT, in_kv_features=DI, rngs=nnx.Rngs(5))
    i2t = MultiHeadAttention(2, DI, in_kv_features=DT, rngs=nnx.Rngs(6))
    nnx.update(t2i, nnx.state(co.text_to_image, nnx.Param))
    nnx.update(i2t, nnx.state(co.image_to_text, nnx.Param))
    # the layers see the padding zeroed (the padded query rows are computed from zeros)
    text_z = jnp.where(text_mask[..., None], text, 0.0)
    image_z = jnp.where(image_mask[..., None], image, 0.0)
    want_t, want_wt = t2i(text_z, image_z, mask=image_mask[:, None, None, :], return_weights=True)
    want_i, want_wi = i2t(image_z, text_z, mask=text_mask[:, None, None, :], return_weights=True)
    assert text_out.shape == (B, T, DT) and image_out.shape == (B, S, DI)
    np.testing.assert_allclose(text_out, want_t, **SAME_TOL)
    np.testing.assert_allclose(image_out, want_i, **SAME_TOL)
    assert w["text_to_image"].shape == (B, 2, T, S) and w["image_to_text"].shape == (B, 2, S, T)
    np.testing.assert_allclose(w["text_to_image"], want_wt, **SAME_TOL)
    np.testing.assert_allclose(w["image_to_text"], want_wi, **SAME_TOL)
    # masked keys get no weight; the unmasked call differs
    wt = np.asarray(w["text_to_image"])
    assert np.all(wt[np.broadcast_to(~np.asarray(image_mask)[:, None, None, :], wt.shape)] == 0)
    assert not np.allclose(co(text, image)[0], text_out)
    # the same weights reach jattn.viz through sow_weights
    sown = viz.collect_attention_weights(co, text, image, text_mask=text_mask,
                                         image_mask=image_mask)  # fmt: skip
    assert sorted(sown) == ["image_to_text", "text_to_image"]
    np.testing.assert_array_equal(sown["text_to_image"], w["text_to_image"])


def test_co_attention_padded_tokens_do_not_change_the_outputs():
    co = _co()
    text, image = _text_image(7)
    text_mask, image_mask = _padding(3, (B, T)), _padding(4, (B, S))
    kw = dict(text_mask=text_mask, image_mask=image_mask)
    text_out, image_out = co(text, image, **kw)
    noisy_text, noisy_image = _scramble_padding(text, text_mask, 8), _scramble_padding(
        image, image_mask, 9)  # fmt: skip
    assert not np.allclose(noisy_image, image)
    np.testing.assert_allclose(co(text, noisy_image, **kw)[0], text_out, **SAME_TOL)
    np.testing.assert_allclose(co(noisy_text, image, **kw)[1], image_out, **SAME_TOL)


def test_shared_co_attention_has_one_parameter_set_used_both_ways():
    shared = _randomize(CoAttention(8, 8, 2, shared=True, rngs=nnx.Rngs(0)))
    separate = CoAttention(8, 8, 2, rngs=nnx.Rngs(0))
    one = MultiHeadAttention(2, 8, rngs=nnx.Rngs(1))
    assert shared.text_to_image is shared.image_to_text
    assert _num_params(shared) == _num_params(one) == 4 * (8 * 8 + 8)
    assert _num_params(separate) == 2 * _num_params(one)
    nnx.update(one, nnx.state(shared.text_to_image, nnx.Param))
    text, image = _normal(1, (B, T, 8)), _normal(2, (B, S, 8))
    text_out, image_out = shared(text, image)
    np.testing.assert_allclose(text_out, one(text, image), **SAME_TOL)
    np.testing.assert_allclose(image_out, one(image, text), **SAME_TOL)


# --------------------------------------------------------------------------- Flamingo

D, DM = 8, 6  # text and media widths


def test_flamingo_block_is_the_identity_at_init_and_not_after_opening_the_gates():
    x, media = _normal(1, (B, T, D)), _normal(2, (B, S, DM))
    fresh = GatedCrossAttentionBlock(D, DM, 2, rngs=nnx.Rngs(0))
    assert float(fresh.alpha_attn[...]) == 0.0 and float(fresh.alpha_ff[...]) == 0.0
    np.testing.assert_array_equal(fresh(x, media), x)
    block = _randomize(GatedCrossAttentionBlock(D, DM, 2, rngs=nnx.Rngs(0)))
    block.alpha_attn[...] = jnp.zeros(())
    block.alpha_ff[...] = jnp.zeros(())
    np.testing.assert_array_equal(block(x, media), x)  # random weights, closed gates

    block.alpha_attn[...] = jnp.array(0.5)
    block.alpha_ff[...] = jnp.array(-0.3)
    # media_mask [B, T, S]: text token 0 of example 0 sees no media
    mask = np.array(_padding(3, (B, T, S)))
    mask[0, 0] = False
    mask = jnp.asarray(mask)
    out = block(x, media, media_mask=mask)
    h = x + np.tanh(0.5) * block.cross_attention(block.attn_norm(x), media, mask=mask[:, None])
    h = h.at[0, 0].set(x[0, 0])  # no media seen: no cross-attention update
    want = h + np.tanh(-0.3) * block.mlp(block.mlp_norm(h))
    assert not np.allclose(out, x)
    np.testing.assert_allclose(out, want, **SAME_TOL)
    noisy = _scramble_padding(media, mask.any(1), 4)  # media no text token sees
    np.testing.assert_allclose(block(x, noisy, media_mask=mask), out, **SAME_TOL)
    # a [B, S] padding mask is the per-token mask repeated over T
    pad = _padding(5, (B, S))
    np.testing.assert_allclose(
        block(x, media, media_mask=pad),
        block(x, media, media_mask=jnp.broadcast_to(pad[:, None], (B, T, S))), **SAME_TOL,
    )  # fmt: skip


# -------------------------------------------------------------------------- Perceiver


def test_perceiver_is_permutation_invariant_and_ignores_padding():
    enc = _randomize(PerceiverEncoder(4, 8, 6, 2, 1, rngs=nnx.Rngs(0)), seed=3)
    run = nnx.jit(lambda m, x, mask: m(x, input_mask=mask))
    x, mask = _normal(1, (B, 11, 6)), _padding(2, (B, 11))
    out = run(enc, x, mask)
    assert out.shape == (B, 4, 8)
    perm = np.random.default_rng(3).permutation(11)
    np.testing.assert_allclose(run(enc, x[:, perm], mask[:, perm]), out, rtol=0, atol=1e-6)
    np.testing.assert_allclose(run(enc, _scramble_padding(x, mask, 4), mask), out, **SAME_TOL)
    assert not np.allclose(run(enc, x[:, perm], mask), out)  # the mask must move with x
    assert not np.allclose(run(enc, _normal(5, x.shape), mask), out)


def test_perceiver_memory_is_linear_in_the_input_length():
    """Compiled temporaries at S and 2S grow at most linearly (a quadratic term would
    multiply them by 4), and stay below the one [N, M, S] float32 score tensor that the
    dense path holds: M=32 latents over S=4096 inputs run the blocked path on CPU
    (M * S > the dense limit). Measured on CPU: 0.43 MB and 0.79 MB against 1 and 2 MB
    of scores (a cross-attention forced dense needs 2.2 MB and 4.5 MB)."""
    m, n, s1 = 32, 2, 4096
    enc = PerceiverEncoder(m, 8, 4, n, 1, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(enc)

    def temp_bytes(s):
        q, kv = (jax.ShapeDtypeStruct((1, length, n, 4), jnp.float32) for length in (m, s))
        assert jax.default_backend() != "cpu" or select(None, q, kv, kv) == "blocked"
        x = jax.ShapeDtypeStruct((1, s, 4), jnp.float32)
        compiled = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x)).lower(state, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(s1), temp_bytes(2 * s1)
    assert large <= 2.2 * small, (small, large)
    assert large < 4 * n * m * (2 * s1), (large, "bytes: no [N, M, S] scores are stored")


# ------------------------------------------------------------------------- MAP head


def _np_layer_norm(x, ln):
    x = ref.f64(x)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    scale, bias = (np.asarray(p[...], np.float64) for p in (ln.scale, ln.bias))
    return (x - mu) / np.sqrt(var + ln.epsilon) * scale + bias


def test_map_head_equals_a_hand_computation_with_its_weights():
    head = _randomize(AttentionPoolingHead(8, 2, rngs=nnx.Rngs(0)))
    x, mask = _normal(1, (B, S, 8)), _padding(2, (B, S))
    out, weights = head(x, mask=mask, return_weights=True)
    att = head.attention
    probe = np.asarray(head.probe[...], np.float64)  # [1, D]
    q = _np_linear(probe, att.query, "pd,dnh->pnh")  # [P, N, H]
    k = _np_linear(x, att.key, "bsd,dnh->bsnh")
    v = _np_linear(x, att.value, "bsd,dnh->bsnh")
    logits = np.einsum("pnh,bsnh->bnps", q, k) / np.sqrt(4)
    logits = np.where(np.asarray(mask)[:, None, None, :], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)  # softmax over the tokens
    y = _np_linear(np.einsum("bnps,bsnh->bpnh", w, v), att.out, "bpnh,nhd->bpd")
    hidden = _np_linear(_np_layer_norm(y, head.norm), head.mlp.linear1, "bpd,df->bpf")
    want = y + _np_linear(ref.gelu_tanh(hidden), head.mlp.linear2, "bpf,fd->bpd")
    assert out.shape == (B, 8) and weights.shape == (B, 2, 1, S)
    np.testing.assert_allclose(weights, w, **F64_TOL)
    np.testing.assert_allclose(out, want[:, 0], **F64_TOL)
    np.testing.assert_allclose(head(_scramble_padding(x, mask, 3), mask=mask), out, **SAME_TOL)


def test_map_head_with_several_probes():
    head = AttentionPoolingHead(8, 2, num_probes=3, rngs=nnx.Rngs(0))
    x = _normal(1, (B, S, 8))
    out, weights = head(x, return_weights=True)
    assert out.shape == (B, 3, 8) and weights.shape == (B, 2, 3, S)
    assert not np.allclose(out[:, 0], out[:, 1])  # the probes differ


# ---------------------------------------------------------------- metadata and errors

LAYERS = {
    "co_attention": lambda r: CoAttention(6, 10, 2, rngs=r),
    "flamingo": lambda r: GatedCrossAttentionBlock(8, 6, 2, rngs=r),
    "perceiver": lambda r: PerceiverEncoder(4, 8, 6, 2, 2, rngs=r),
    "map_head": lambda r: AttentionPoolingHead(8, 2, num_probes=2, rngs=r),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_every_parameter_names_each_of_its_axes(name):
    check_axis_names(LAYERS[name])


def _raises(exc, message, fn, *args, **kwargs):
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    assert message in str(info.value), str(info.value)


def test_bad_inputs_fail_with_clear_messages():
    rngs = nnx.Rngs(0)
    _raises(ValueError, "shared=True uses one projection for both modalities, which needs "
            "text_features == image_features, got 6 and 10", CoAttention, 6, 10, 2,
            shared=True, rngs=rngs)  # fmt: skip
    _raises(ValueError, "num_latents must be a positive int, got 0",
            PerceiverEncoder, 0, 8, 6, 2, rngs=rngs)  # fmt: skip
    _raises(ValueError, "num_latents must be a positive int, got -3",
            PerceiverEncoder, -3, 8, 6, 2, rngs=rngs)  # fmt: skip
    _raises(ValueError, "num_self_layers must be an int >= 0, got -1",
            PerceiverEncoder, 4, 8, 6, 2, -1, rngs=rngs)  # fmt: skip
    _raises(ValueError, "num_probes must be a positive int, got 0",
            AttentionPoolingHead, 8, 2, num_probes=0, rngs=rngs)  # fmt: skip
    _raises(ValueError, "qkv_features=9 must be divisible by num_heads=2",
            AttentionPoolingHead, 9, 2, rngs=rngs)  # fmt: skip

    layer = _all_widths()
    xq, xk, xv = _normal(1, (B, T, 6)), _normal(2, (B, S, 7)), _normal(3, (B, S, 9))
    _raises(ValueError, "inputs_v must have shape [..., L, 9], got [2, 5, 7]", layer, xq, xk, xk)
    _raises(ValueError, "inputs_k [2, 5, 7] and inputs_v [2, 4, 9] must agree on all but the "
            "feature axis", layer, xq, xk, xv[:, :4])  # fmt: skip

    co = _co()
    text, image = _text_image()
    _raises(ValueError, "image must have shape [..., S, D] with D=10, got [2, 5, 6]",
            co, text, image[..., :6])  # fmt: skip
    _raises(ValueError, "text [2, 3, 6] and image [1, 5, 10] must have the same batch dims",
            co, text, image[:1])  # fmt: skip
    _raises(ValueError, "image_mask must have shape [B, S] = [2, 5] (one entry per token, True "
            "= a real token), got [2, 3]", co, text, image,
            image_mask=jnp.ones((B, T), bool))  # fmt: skip
    _raises(TypeError, "text_mask must be boolean (True = attend), got dtype float32",
            co, text, image, text_mask=jnp.ones((B, T)))  # fmt: skip

    block = GatedCrossAttentionBlock(D, DM, 2, rngs=rngs)
    x, media = _normal(1, (B, T, D)), _normal(2, (B, S, DM))
    _raises(ValueError, "media must have shape [..., S, D] with D=6, got [2, 5, 8]",
            block, x, _normal(2, (B, S, D)))  # fmt: skip
    _raises(ValueError, "media_mask must have shape [B, S] = [2, 5] (media padding) or "
            "[B, T, S] = [2, 3, 5] (the media each text token sees), got [2, 5, 3]",
            block, x, media, media_mask=jnp.ones((B, S, T), bool))  # fmt: skip

    enc = PerceiverEncoder(4, 8, 6, 2, 0, rngs=rngs)
    _raises(ValueError, "inputs must have shape [..., S, D_in] with D=6, got [2, 5, 8]",
            enc, _normal(1, (B, S, 8)))  # fmt: skip
    _raises(ValueError, "input_mask must have shape [B, S] = [2, 5]",
            enc, _normal(1, (B, S, 6)), input_mask=jnp.ones((B, S + 1), bool))  # fmt: skip

    head = AttentionPoolingHead(8, 2, rngs=rngs)
    _raises(ValueError, "x must have shape [..., S, D] with D=8, got [2, 5]", head,
            jnp.ones((B, S)))  # fmt: skip
    _raises(ValueError, "mask must have shape [B, S] = [2, 5]", head, _normal(1, (B, S, 8)),
            mask=jnp.ones((B, 1, S), bool))  # fmt: skip
