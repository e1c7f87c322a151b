"""Bad inputs at the public boundary, generated (hypothesis): each class of bad input is
one clear error that names the argument, raised by one shared check
(:mod:`jattn.functional._checks`) before any computation, never a silent wrong answer,
a NaN, or an error from deep inside JAX (issue 19, sections 2b, 3 and 4).

Every error here is raised before a parameter is created or a function compiled, so the
generated cases stay cheap; the good inputs next to them (NumPy ints, in-range int64
values, boolean masks) must still be accepted.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _hardening import beyond_int32, generated, raises, too_big
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jattn
from jattn import diagnostics, layers, models, viz
from jattn.data import dates_task, eval_batches
from jattn.functional import _checks
from jattn.interop import torch as torch_interop
from jattn.layers import gating, vision
from jattn.training.losses import masked_cross_entropy
from jattn.training.metrics import token_accuracy_counts
from jattn.training.optim import learning_rate_schedule

SETTINGS = generated(40)

Q = jnp.zeros((1, 4, 2, 8), jnp.float32)  # [B, T, N, H]
X = jnp.zeros((1, 4, 8), jnp.float32)  # [B, T, D]


def _rngs():
    return nnx.Rngs(0)


# ------------------------------------------------------------------ sizes (section 4)

# Values that are not a size: zero and negative ints, floats (integral ones too: 2.0 is
# not silently 2), bools (True is not 1), strings and NumPy floats.
bad_sizes = st.one_of(
    st.integers(-(2**40), 0),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(1, 64).map(float),
    st.booleans(),
    st.integers(1, 64).map(str),
    st.integers(1, 64).map(np.float32),
    st.just(np.bool_(True)),
)

VIT = dict(patch=4, in_channels=1, num_classes=2, features=8, num_heads=2, num_layers=1,
           mlp_features=8, rngs=nnx.Rngs(0))  # fmt: skip

# The composites' and ViT's sizes, also checked one by one below (0 was taken or named
# another argument)
COMPOSITE_SIZE_TARGETS = [
    ("media_features", lambda v: layers.GatedCrossAttentionBlock(8, v, 2, rngs=_rngs())),
    ("mlp_features", lambda v: layers.AttentionPoolingHead(8, 2, mlp_features=v, rngs=_rngs())),
    ("image_size", lambda v: layers.ViT(image_size=v, **VIT)),
    ("stem_layers", lambda v: layers.ViT(image_size=8, stem_layers=v, **VIT)),
]

# (argument name, a call that passes the value as that argument)
SIZE_TARGETS = [
    ("num_queries", lambda v: jattn.causal_mask(v, 4)),
    ("num_keys", lambda v: jattn.causal_mask(4, v)),
    ("num_queries", lambda v: jattn.sliding_window_mask(v, 4, 1)),
    ("length", lambda v: jattn.sequence_mask(jnp.array([1, 2]), v)),
    ("num_keys", lambda v: jattn.valid_lens_mask(jnp.array([1, 2]), 3, v)),
    ("num_queries", lambda v: jattn.alibi_bias(jattn.alibi_slopes(2), v, 3)),
    ("num_heads", lambda v: jattn.alibi_slopes(v)),
    ("features", lambda v: jattn.sinusoidal_encoding(jnp.arange(3), v)),
    ("num_buckets", lambda v: jattn.relative_position_buckets(jnp.arange(3), num_buckets=v)),
    ("max_distance", lambda v: jattn.relative_position_buckets(jnp.arange(3), max_distance=v)),
    ("chunk_size", lambda v: jattn.linear_attention(Q, Q, Q, chunk_size=v)),
    ("num_heads", lambda v: layers.MultiHeadAttention(v, 8, rngs=_rngs())),
    ("in_features", lambda v: layers.MultiHeadAttention(2, v, rngs=_rngs())),
    ("num_features", lambda v: layers.LinearAttention(2, 8, num_features=v, rngs=_rngs())),
    ("max_len", lambda v: layers.SinusoidalEncoding(4, max_len=v)),
    ("max_len", lambda v: layers.LearnedPositionalEmbedding(v, 4, rngs=_rngs())),
    ("num_buckets", lambda v: layers.RelativePositionBias(2, num_buckets=v, rngs=_rngs())),
    ("hidden", lambda v: layers.AdditiveScore(2, 4, 4, v, rngs=_rngs())),
    ("query_head_dim", lambda v: layers.BilinearScore(2, v, 4, rngs=_rngs())),
    ("head_dim", lambda v: layers.MLPScore(2, v, 4, rngs=_rngs())),
    ("num_hiddens", lambda v: layers.AdditiveAttention(4, 4, v, rngs=_rngs())),
    ("num_heads", lambda v: layers.NWKernelRegression(v, rngs=_rngs())),
    ("hidden", lambda v: models.GRUCell(4, v, rngs=_rngs())),
    ("features", lambda v: models.FeedForward(v, 8, rngs=_rngs())),
    ("num_heads", lambda v: models.DecoderLM(9, features=8, num_heads=v, rngs=_rngs())),
    ("max_len", lambda v: models.DecoderLM(9, features=8, num_heads=2, max_len=v, rngs=_rngs())),
    ("src_vocab_size", lambda v: models.Transformer(v, 9, features=8, rngs=_rngs())),
    ("hidden", lambda v: models.BahdanauSeq2Seq(9, 9, hidden=v, rngs=_rngs())),
    (
        "max_len",
        lambda v: models.greedy_search(
            None, None, jnp.ones(2, jnp.int32), max_len=v, eos_id=2, pad_id=0
        ),
    ),  # fmt: skip
    (
        "num_heads",
        lambda v: torch_interop.torch_masks_to_jattn(
            attn_mask=np.zeros((4, 3, 3), bool), num_heads=v
        ),
    ),  # fmt: skip
    ("dpi", lambda v: viz.save_figure(None, "/nonexistent/x.png", dpi=v)),
    *COMPOSITE_SIZE_TARGETS,
    ("head_mask_shape[0]", lambda v: diagnostics.head_importance(jnp.sum, (v, 2))),
    ("channels", lambda v: vision.eca_kernel_size(v)),  # 0: "math domain error"
    ("k", lambda v: gating.top_k_routing(jnp.ones((2, 4)), v)),  # 0: no expert chosen
    ("num_steps", lambda v: learning_rate_schedule(1e-3, num_steps=v, warmup_steps=0)),
    ("batch_size", lambda v: next(eval_batches(_dates(), v, "tgt", 0))),  # -1: no batch
]


@functools.cache
def _dates():
    return dates_task(num_train=4, num_test=4)[1]


@SETTINGS
@given(target=st.sampled_from(SIZE_TARGETS), value=bad_sizes)
def test_bad_sizes_name_the_argument_and_value(target, value):
    name, call = target
    message = raises(ValueError, lambda: call(value), name)
    assert repr(value) in message, message  # the value, as the user wrote it


def test_zero_sizes_of_composites_and_vit_are_named():
    """Each drawn above too; here always: 0 was taken (mlp_features=0 as the default, a
    ViT of 0 x 0 images, stem_layers without a stem) or named another argument
    (media_features as in_kv_features)."""
    for name, call in COMPOSITE_SIZE_TARGETS:
        raises(ValueError, lambda call=call: call(0), name)
    raises(ValueError, lambda: layers.ViT(image_size=8, stem_layers=2, **VIT), "stem_features")


# Bool options: a str, an int or None was taken for its truth value (use_bias=None: no
# biases; final_norm="no": a final norm)
FLAG_TARGETS = [
    ("use_bias", lambda v: layers.MultiHeadAttention(2, 8, use_bias=v, rngs=_rngs())),
    ("use_bias", lambda v: layers.CoAttention(8, 8, 2, use_bias=v, rngs=_rngs())),
    ("final_norm", lambda v: models.DecoderLM(9, features=8, num_heads=2, final_norm=v,
                                              rngs=_rngs())),
    ("share_embeddings", lambda v: models.Transformer(9, 9, features=8, num_heads=2,
                                                      share_embeddings=v, rngs=_rngs())),
    ("tie_embeddings", lambda v: models.DecoderLM(9, features=8, num_heads=2, tie_embeddings=v,
                                                  rngs=_rngs())),
    # a call's flags as its constructor's (both were read for their truth value)
    ("return_aux_loss", lambda v: _moh()(X, return_aux_loss=v)),
    ("sow_aux_loss", lambda v: _moh()(X, sow_aux_loss=v)),
]  # fmt: skip


@functools.cache
def _moh():
    return layers.MixtureOfHeads(layers.MultiHeadAttention(2, 8, rngs=_rngs()), k=1, rngs=_rngs())


@SETTINGS
@given(target=st.sampled_from(FLAG_TARGETS),
       value=st.sampled_from(["no", "yes", 0, 1, 2, 0.0]) | st.text(max_size=3))  # fmt: skip
def test_bool_options_are_bools(target, value):
    name, call = target
    message = raises(TypeError, lambda: call(value), name)
    assert message.startswith(f"{name} must be a bool, got ")


@SETTINGS
@given(target=st.sampled_from(SIZE_TARGETS[:11]), value=st.integers(1, 8))
def test_numpy_int_sizes_are_sizes(target, value):
    """np.int64 (not an ``int`` subclass) and a 0-d int array are sizes as good as an int:
    whatever they give, it is what the Python int gives."""
    name, call = target
    if name == "features":
        value *= 2  # sinusoidal features are even
    if name == "num_buckets":
        value = 2 * value + 4  # bidirectional: even and >= 4
    if name == "max_distance":
        value += 32  # beyond the exact range of the default 32 buckets
    want = call(value)
    for like in (np.int64(value), np.array(value, np.int32)):
        got = call(like)
        jax.tree.map(np.testing.assert_array_equal, got, want)


def test_size_errors_read_well():
    assert str(raises(ValueError, lambda: jattn.causal_mask(2.0, 4))) == (
        "num_queries must be a positive int, got 2.0 (a float)"
    )
    raises(ValueError, lambda: layers.MultiHeadAttention("4", 8, rngs=_rngs()), "got '4' (a str)")
    raises(ValueError, lambda: layers.AdditiveScore(0, 4, 4, 4, rngs=_rngs()),
            "num_heads must be a positive int, got 0")  # fmt: skip  # was a ZeroDivisionError
    raises(ValueError, lambda: models.GRUCell(4, True, rngs=_rngs()), "got True (a bool)")
    raises(ValueError, lambda: jattn.relative_position_buckets(jnp.arange(3), num_buckets=8.5),
            "num_buckets must be a positive int, got 8.5")  # fmt: skip  # was float buckets
    raises(ValueError, lambda: models.DecoderLM(9, features=8, num_heads=2, rngs=_rngs())
            .init_cache(-1, 4), "batch_size must be a positive int, got -1")  # fmt: skip


def test_traced_sizes_are_type_errors():
    for fn, name in (
        (lambda n: jattn.causal_mask(n, 4), "num_queries"),
        (lambda n: jattn.sequence_mask(jnp.array([1]), n), "length"),
        (lambda n: jattn.relative_position_buckets(jnp.arange(3), num_buckets=n), "num_buckets"),
        (lambda r: jattn.dot_product_attention(Q, Q, Q, dropout_rate=r), "dropout_rate"),
    ):
        message = raises(TypeError, lambda fn=fn: jax.jit(fn)(8), name)
        assert "static" in message


# ------------------------------------------------------------------ rates (section 4)

bad_rates = st.one_of(
    st.floats(1.0, 1e6, exclude_min=True),
    st.floats(max_value=0.0, exclude_max=True),
    st.just(float("nan")),
    st.floats(0.0, 0.99).map(str),  # "0.1" from a config file
    st.booleans(),
    st.none(),
)

RATE_TARGETS = [
    (
        "dropout_rate",
        lambda r: jattn.dot_product_attention(
            Q, Q, Q, dropout_rate=r, dropout_rng=jax.random.key(0)
        ),
    ),  # fmt: skip
    ("dropout_rate", lambda r: layers.MultiHeadAttention(2, 8, dropout_rate=r, rngs=_rngs())),
    ("dropout_rate", lambda r: layers.DotProductAttention(r, rngs=_rngs())),
    ("dropout_rate", lambda r: models.EncoderBlock(8, 2, 16, dropout_rate=r, rngs=_rngs())),
    ("dropout_rate", lambda r: models.BahdanauSeq2Seq(9, 9, dropout_rate=r, rngs=_rngs())),
    ("dropout_rate", lambda r: models.GRUEncoder(4, 4, dropout_rate=r, rngs=_rngs())),
]


@SETTINGS
@given(target=st.sampled_from(RATE_TARGETS), rate=bad_rates)
def test_bad_rates_name_the_argument(target, rate):
    name, call = target
    raises(ValueError, lambda: call(rate), name, "[0, 1)")


@SETTINGS
@given(rate=bad_rates.filter(lambda r: r != 1.0))
def test_dropout_layer_rate(rate):
    """``jattn.layers.Dropout`` (rate 1 allowed, as nnx.Dropout) refuses the rest."""
    raises(ValueError, lambda: layers.Dropout(rate), "rate", "[0, 1]")


def test_good_rates_are_accepted():
    for rate in (0.0, 0.5, np.float32(0.25), np.float64(0.1), 0):
        assert layers.MultiHeadAttention(2, 8, dropout_rate=rate, rngs=_rngs()).dropout_rate == rate


# ---------------------------------------------- non-finite parameters (section 2b)

non_finite = st.sampled_from([float("nan"), float("inf"), -float("inf")])
non_finite_like = st.one_of(
    non_finite,
    non_finite.map(np.float32),
    non_finite.map(lambda x: jnp.asarray(x, jnp.float32)),
)
not_positive = st.one_of(st.floats(max_value=0.0), non_finite)

SCALAR_TARGETS = [
    ("scale", non_finite_like, lambda s: jattn.dot_product_attention(Q, Q, Q, scale=s)),
    (
        "scale",
        non_finite_like,
        lambda s: jattn.scaled_dot_product_scores(Q[0, :, 0], Q[0, :, 0], scale=s),
    ),  # fmt: skip
    ("scale", non_finite_like, lambda s: jattn.nystrom_attention(Q, Q, Q, 2, scale=s)),
    (
        "max_wavelength",
        not_positive,
        lambda w: jattn.rotary_embedding(Q, jnp.arange(4), max_wavelength=w),
    ),  # fmt: skip
    ("max_wavelength", not_positive, lambda w: layers.RotaryEmbedding(max_wavelength=w)),
    (
        "max_wavelength",
        not_positive,
        lambda w: models.RotaryAttention(jattn.dot_product_attention, max_wavelength=w),
    ),  # fmt: skip
    (
        "layer_norm_eps",
        not_positive,
        lambda e: models.EncoderBlock(8, 2, 16, layer_norm_eps=e, rngs=_rngs()),
    ),  # fmt: skip
    (
        "width",
        not_positive,
        lambda w: jattn.nadaraya_watson(jnp.ones(3), jnp.ones(3), jnp.ones(3), width=w),
    ),  # fmt: skip
    *[
        (
            "width",
            not_positive,
            lambda w, kernel=kernel: kernel(jnp.ones((2, 3)), w),
        )  # a kernel called directly: was NaN (width 0) or a silently wrong sign (< 0)
        for kernel in (
            jattn.gaussian_kernel,
            jattn.boxcar_kernel,
            jattn.constant_kernel,
            jattn.triangular_kernel,
            jattn.epanechnikov_kernel,
        )
    ],  # fmt: skip
    (
        "cell_size",
        not_positive,
        lambda c: viz.plot_attention_grid(np.ones((1, 1, 2, 2)) / 2, cell_size=c),
    ),  # fmt: skip
    # the schedule of the training loop, public: a NaN or negative rate, gradient ascent
    ("peak", not_positive, lambda p: learning_rate_schedule(p, num_steps=9, warmup_steps=2)),
    (
        "end_factor",
        st.one_of(non_finite, st.floats(max_value=-1e-6)),
        lambda f: learning_rate_schedule(1e-3, num_steps=9, warmup_steps=2, end_factor=f),
    ),  # fmt: skip
]


@SETTINGS
@given(data=st.data(), target=st.sampled_from(SCALAR_TARGETS))
def test_non_finite_parameters_are_errors(data, target):
    name, values, call = target
    value = data.draw(values)
    raises(ValueError, lambda: call(value), name)


def test_non_finite_scale_is_an_error_not_nan():
    # was: every output NaN, silently
    raises(ValueError, lambda: jattn.dot_product_attention(Q, Q, Q, scale=float("nan")),
            "scale must be finite, got nan")  # fmt: skip
    raises(ValueError, lambda: jattn.rotary_embedding(Q, jnp.arange(4), max_wavelength=0),
            "max_wavelength must be finite and > 0, got 0.0")  # fmt: skip
    raises(TypeError, lambda: jattn.scaled_dot_product_scores(Q[0, :, 0], Q[0, :, 0],
                                                               scale=1 + 2j), "scale")  # fmt: skip
    # zero and negative scales are numbers (uniform / reversed attention), not errors
    assert jnp.all(jnp.isfinite(jattn.dot_product_attention(Q, Q, Q, scale=0.0)))


# ------------------------------------------------ boolean masks (section 3)


@st.composite
def float_masks(draw, shape):
    """An additive mask (0 where visible, -inf or a large negative where not), or 0/1
    ints: any of them read as validity would invert or blur the mask."""
    kind = draw(st.sampled_from(["additive", "large", "int"]))
    hidden = draw(hnp.arrays(np.bool_, shape))
    if kind == "int":
        return (~hidden).astype(draw(st.sampled_from([np.int32, np.int8, np.uint8])))
    fill = -np.inf if kind == "additive" else -1e4
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    return np.where(hidden, fill, 0.0).astype(dtype)


MASK_TARGETS = [
    ("key_valid", (2, 3), lambda m: jattn.key_padding_mask(m)),
    ("mask", (1, 1, 4, 4), lambda m: jattn.dot_product_attention(Q, Q, Q, mask=m)),
    ("mask", (1, 1, 4, 4), lambda m: jattn.attention(Q, Q, Q, mask=m)),
    ("mask", (4, 4), lambda m: jattn.combine_masks(jattn.causal_mask(4, 4), m)),
    ("mask", (4, 4), lambda m: jattn.masked_softmax(jnp.zeros((4, 4)), m)),
    ("mask", (1, 1, 4, 4), lambda m: layers.MultiHeadAttention(2, 8, rngs=_rngs())(X, mask=m)),
    (
        "mask",
        (1, 1, 4, 4),
        lambda m: models.TransformerEncoder(1, 8, 2, 16, rngs=_rngs())(X, mask=m),
    ),
    ("mask", (1, 1, 1, 4), lambda m: layers.LinearAttention(2, 8, rngs=_rngs())(X, mask=m)),
    ("valid", (1, 4), lambda m: models.GRUEncoder(8, 4, rngs=_rngs())(X, m)),
    (
        "mask",
        (3, 3),
        lambda m: jattn.nadaraya_watson(jnp.ones(3), jnp.ones(3), jnp.ones(3), mask=m),
    ),
    ("mask", (2, 3, 3), lambda m: diagnostics.attention_entropy(jnp.ones((2, 3, 3)) / 3, m)),
    ("mask", (3, 3), lambda m: viz.plot_attention(np.ones((3, 3)) / 3, mask=m)),
]


@SETTINGS
@given(data=st.data(), target=st.sampled_from(MASK_TARGETS))
def test_float_masks_are_refused_everywhere(data, target):
    name, shape, call = target
    mask = data.draw(float_masks(shape))
    raises(TypeError, lambda: call(mask), name, "boolean")


def test_mha_decode_mask_must_be_boolean():
    layer = layers.MultiHeadAttention(2, 8, rngs=_rngs())
    layer.init_cache((1, 4, 8))
    additive = jnp.array([0.0, 0.0, -jnp.inf, -jnp.inf])  # was read as "attend to 2 and 3"
    raises(TypeError, lambda: layer(X[:, :1], mask=additive, decode=True), "mask", "boolean")


def test_additive_key_padding_mask_is_not_read_inverted():
    # was: [[True, True, True]] (-inf is nonzero): the padded key attended to
    message = raises(TypeError, lambda: jattn.key_padding_mask(jnp.array([[0.0, 0.0, -jnp.inf]])))
    assert message.startswith("key_valid must be boolean (True = attend), got dtype float32")
    valid = jnp.array([[True, True, False]])
    np.testing.assert_array_equal(jattn.key_padding_mask(valid), valid[:, None, None, :])


# A rank-3 mask or bias reads as [N, T, S], one per head, as broadcasting reads it. Keras
# and PyTorch users pass [B, T, S], one per example: where the batch has N examples too,
# the two are the same shape, and it was read per head without a word.
@SETTINGS
@given(
    b=st.integers(1, 3), n=st.integers(1, 3), kind=st.sampled_from(["mask", "bias"]),
    data=st.data(),
)  # fmt: skip
def test_a_rank_3_mask_is_per_head_and_refused_where_it_could_be_per_example(b, n, kind, data):
    t, s = 3, 4
    rng = np.random.default_rng(10 * b + n)
    q = rng.standard_normal((b, t, n, 2)).astype(np.float32)
    k = rng.standard_normal((b, s, n, 2)).astype(np.float32)
    lead = data.draw(st.sampled_from([b, n]), label="leading axis")
    if kind == "mask":
        x = data.draw(hnp.arrays(np.bool_, (lead, t, s)), label="mask")
    else:
        x = rng.standard_normal((lead, t, s)).astype(np.float32)

    def call(x):
        return jattn.dot_product_attention(q, k, k, **{kind: x})

    if lead == n == b > 1:
        message = raises(ValueError, lambda: call(x), kind, "ambiguous", f"[{b}, 1, T, S]")
        assert f"[1, {n}, T, S] per head" in message
    elif lead == n or lead == 1:  # per head (or one for all): as the rank-4 [1, N, T, S]
        np.testing.assert_array_equal(call(x), call(x[None]))
    else:  # [B, T, S] against N heads: the heads axis is missing
        raises(ValueError, lambda: call(x), kind, "does not broadcast")
    if lead == b:  # with its heads axis, the same array is a mask per example
        per_example = call(x[:, None])
        want = jattn.dot_product_attention(
            q, k, k, **{kind: np.broadcast_to(x[:, None], (b, n, t, s))}, implementation="dense"
        )
        np.testing.assert_allclose(per_example, want, rtol=1e-6, atol=1e-6)


def test_ambiguous_rank_3_masks_of_layers_and_diagnostics():
    layer = layers.MultiHeadAttention(2, 8, rngs=_rngs())
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 8)), jnp.float32)
    causal = np.tril(np.ones((4, 4), bool))
    mask = jnp.asarray(np.stack([causal, causal.T]))  # [B, T, S]: one per example
    raises(ValueError, lambda: layer(x, mask=mask), "mask of shape [2, 4, 4] is ambiguous")
    # the rank-4 form the message names is a mask per example
    per_example = layer(x, mask=mask[..., None, :, :])
    for b in range(2):
        np.testing.assert_allclose(
            per_example[b], layer(x[b : b + 1], mask=mask[b][None, None])[0], rtol=1e-6, atol=1e-6
        )
    layer.init_cache((2, 4, 8))
    step = jnp.ones((2, 1, 4), bool)
    raises(ValueError, lambda: layer(x[:, :1], mask=step, decode=True), "ambiguous")
    weights = jnp.ones((2, 2, 4, 4)) / 4
    raises(ValueError, lambda: diagnostics.attention_entropy(weights, mask), "ambiguous")


# ------------------------------------- integers: offsets, positions, lengths (section 3)

non_integral = st.one_of(
    st.floats(-100, 100, allow_nan=False),  # 1.5 was truncated to 1, 2.0 read as 2
    st.floats(-100, 100, allow_nan=False).map(lambda x: np.array([x], np.float32)),
    st.just("1"),  # was parsed by jnp.asarray
    st.complex_numbers(max_magnitude=10, allow_nan=False, allow_infinity=False),
    st.booleans(),
)

OFFSET_TARGETS = [
    ("offset", lambda o: jattn.causal_mask(3, 4, offset=o)),
    ("offset", lambda o: jattn.sliding_window_mask(3, 4, 1, offset=o)),
    ("offset", lambda o: jattn.alibi_bias(jattn.alibi_slopes(2), 3, 4, offset=o)),
    ("offset", lambda o: layers.ALiBi(2)(3, 4, offset=o)),
    ("offset", lambda o: layers.RelativePositionBias(2, rngs=_rngs())(3, 4, offset=o)),
]
INT_ARRAY_TARGETS = OFFSET_TARGETS + [
    ("relative_position", lambda r: jattn.relative_position_buckets(r)),
    ("positions", lambda p: layers.LearnedPositionalEmbedding(8, 4, rngs=_rngs())(p)),
    ("valid_lens", lambda v: jattn.valid_lens_mask(v, 2, 4)),
    ("lengths", lambda v: jattn.sequence_mask(v, 4)),
    # a float label one-hot encoded to zeros: a loss of log 2 for log 4, a miss counted
    ("labels", lambda v: masked_cross_entropy(jnp.zeros((1, 1, 4)), v)),
    ("labels", lambda v: token_accuracy_counts(jnp.zeros((1, 1, 4)), v)),
]


@SETTINGS
@given(target=st.sampled_from(INT_ARRAY_TARGETS), value=non_integral)
def test_non_integers_are_not_truncated(target, value):
    name, call = target
    raises(TypeError, lambda: call(value), name, "integers")


@SETTINGS
@given(target=st.sampled_from(OFFSET_TARGETS), value=beyond_int32)
def test_offsets_beyond_int32_do_not_wrap(target, value):
    name, call = target
    raises(ValueError, lambda: call(value), name, "int32")


@SETTINGS
@given(value=beyond_int32)
def test_positions_beyond_int32_do_not_wrap(value):
    positions = np.broadcast_to(np.asarray(value), (2,)) if np.ndim(value) else [0, value]
    x = jnp.zeros((2, 1, 4))
    raises(ValueError, lambda: jattn.rotary_embedding(x, np.asarray(positions)), "positions")
    raises(ValueError, lambda: jattn.sinusoidal_encoding(np.asarray(positions), 4), "positions")


@SETTINGS
@given(big=st.integers(5, 2**62))
def test_lengths_beyond_the_sequence_mean_all_of_it(big):
    """A length past the sequence (even past int32) is the whole sequence, not wrapped."""
    got = jattn.sequence_mask(np.array([big, 2], np.int64), 4)
    np.testing.assert_array_equal(got, [[True] * 4, [True, True, False, False]])


QL = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 2, 4)), jnp.float32)
KL = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 2, 4)), jnp.float32)
PROJ = jnp.asarray(np.random.default_rng(2).standard_normal((3, 6)), jnp.float32)


@SETTINGS
@given(
    big=too_big,
    form=st.sampled_from([list, lambda x: np.asarray(x, np.int64)]),
    target=st.sampled_from([None, "dense", "blocked", "linformer"]),
    which=st.sampled_from(["query_seq_lengths", "key_value_seq_lengths"]),
)
def test_attention_lengths_beyond_int32_are_clipped_not_wrapped(big, form, target, which):
    """An int64 length past int32 is clipped to [0, T or S] like any other, on every
    path: it was converted to int32 first, so 2**32 + 1 read as 1 and -(2**32) + 2 as 2."""
    if target == "linformer":
        which = "key_value_seq_lengths"
    bound = 0 if big < 0 else (QL if which == "query_seq_lengths" else KL).shape[1]

    def call(lengths):
        if target == "linformer":
            return jattn.linformer_attention(QL, KL, KL, PROJ, key_value_seq_lengths=lengths)
        return jattn.dot_product_attention(QL, KL, KL, implementation=target, **{which: lengths})

    got = call(form([big, 3]))
    np.testing.assert_array_equal(got, call(np.asarray([bound, 3], np.int32)))


# Integer arrays that are not lengths: a value past int32 is an error naming the argument
WRAP_TARGETS = [
    ("index", lambda i: models.rewind_cache(_kv_cache(), np.asarray([0, i]))),
    ("index", lambda i: models.rewind_cache(_kv_cache(), i)),  # was a bare OverflowError
    ("segment_ids", lambda i: jattn.linear_attention(Q, Q, Q, segment_ids=[[0, 0, i, i]])),
]


@functools.cache
def _kv_cache():
    return models.init_cache(layers.MultiHeadAttention(2, 8, rngs=_rngs()), 2, 6)


@SETTINGS
@given(target=st.sampled_from(WRAP_TARGETS), value=too_big)
def test_integer_arrays_beyond_int32_are_errors(target, value):
    name, call = target
    raises(ValueError, lambda: call(value), name, "int32")


@SETTINGS
@given(offset=st.integers(-(2**20), 2**20))
def test_in_range_int64_offsets_equal_ints(offset):
    want = jattn.causal_mask(3, 4, offset=offset)
    np.testing.assert_array_equal(jattn.causal_mask(3, 4, offset=np.int64(offset)), want)
    np.testing.assert_array_equal(
        jattn.causal_mask(3, 4, offset=np.array([offset], np.int64)), want[None]
    )


def test_float_offset_message():
    message = raises(TypeError, lambda: jattn.causal_mask(3, 4, offset=1.5))
    assert message.startswith("offset must be integers, got 1.5 (a float)")
    message = raises(ValueError, lambda: jattn.causal_mask(3, 4, offset=2**40))
    assert message == f"offset={2**40} does not fit int32 [-2147483648, 2147483647]"


# -------------------------------------------- arguments that are not arrays (section 4)

# Each was an error from inside jnp (``None is not a valid value for jnp.array``), an
# AttributeError (``'NoneType' object has no attribute 'shape'``) or, for
# nadaraya_watson's values, the weights alone returned in place of (predictions, weights).
NOT_ARRAY_TARGETS = [
    ("query", lambda x: jattn.single_head_attention(x, jnp.ones((3, 8)), jnp.ones((3, 8)))),
    ("key", lambda x: jattn.single_head_attention(jnp.ones((2, 8)), x, jnp.ones((3, 8)))),
    ("value", lambda x: jattn.single_head_attention(jnp.ones((2, 8)), jnp.ones((3, 8)), x)),
    ("decay", lambda x: jattn.retention(Q, Q, Q, x)),
    ("log_gates", lambda x: jattn.gated_linear_attention(Q, Q, Q, x)),
    ("x", lambda x: jattn.to_zigzag(x, 2)),
    ("x", lambda x: jattn.from_zigzag(x, 2)),
    ("distances", lambda x: jattn.gaussian_kernel(x)),
    ("values", lambda x: jattn.nadaraya_watson(jnp.ones(2), jnp.ones(3), x)),
    ("values", lambda x: jattn.parametric_nadaraya_watson(jnp.ones(2), jnp.ones(3), x, 1.0)),
    ("images", lambda x: _stem()(x)),
]


@functools.cache
def _stem():
    return layers.ConvStem(2, 4, rngs=_rngs())


def test_conv_stem_checks_its_images_and_patches_take_an_empty_batch():
    """ConvStem's images were unchecked (an AttributeError for None, XLA's convolution
    error for the wrong channels, complex images taken); PatchEmbedding failed on an
    empty batch (a ZeroDivisionError from its reshape)."""
    message = raises(ValueError, lambda: _stem()(jnp.ones((1, 4, 4, 3))))
    assert message == (
        "images must have shape [B, H, W, C] (channels last) with C=2, got [1, 4, 4, 3]"
    )
    raises(TypeError, lambda: _stem()(jnp.ones((1, 4, 4, 2), jnp.complex64)), "images")
    patches = layers.PatchEmbedding(2, 2, 4, rngs=_rngs())
    assert patches(jnp.ones((0, 4, 4, 2))).shape == (0, 4, 4)


not_arrays = st.one_of(
    st.none(), st.text(max_size=3), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1)
)


def test_keep_mask_shape_is_a_sequence():
    key = jax.random.key(0)
    for shape in (jnp.asarray(3), 3, "3"):  # a 0-d array was "iteration over a 0-d array"
        message = raises(TypeError, lambda shape=shape: jattn.keep_mask(key, 0.5, shape))
        assert message.startswith("shape must be a sequence of ints, got ")
    assert jattn.keep_mask(key, 0.5, jnp.asarray([2, 3])).shape == (2, 3)


@SETTINGS
@given(target=st.sampled_from(NOT_ARRAY_TARGETS), value=not_arrays)
def test_arguments_that_are_not_arrays_are_named(target, value):
    name, call = target
    raises(TypeError, lambda: call(value), name)


def test_one_head_takes_one_head():
    """single_head_attention is the per-head math: [B, T, N, H] inputs, mismatched key and
    value lengths and a bias of another rank (which would broadcast over the rows) are
    errors, not a wrong result."""
    q, k = jnp.ones((2, 8)), jnp.ones((3, 8))
    message = raises(ValueError, lambda: jattn.single_head_attention(Q, Q, Q))
    assert message == (
        "single_head_attention takes one head: query [T, H], key [S, H'] and value [S, Hv], "
        "got [1, 4, 2, 8], [1, 4, 2, 8] and [1, 4, 2, 8]; for [B, T, N, H] inputs use attention"
    )
    raises(ValueError, lambda: jattn.single_head_attention(q, k, jnp.ones((4, 8))), "[4, 8]")
    message = raises(ValueError, lambda: jattn.single_head_attention(q, k, k, jnp.ones(3)))
    assert message == "bias must have rank 2 and broadcast to [T, S] = [2, 3], got [3]"
    raises(ValueError, lambda: jattn.single_head_attention(q, k, k, jnp.ones((2, 4))), "bias")
    # the good forms: a bias broadcasting along either axis
    for bias in (jnp.ones((1, 3)), jnp.ones((2, 1)), jnp.ones((2, 3))):
        out, weights, _ = jattn.single_head_attention(q, k, k, bias)
        np.testing.assert_allclose(weights, np.full((2, 3), 1 / 3), rtol=1e-6)


# ------------------------------------------------------ complex inputs (section 3)


def _complex(shape):
    parts = hnp.arrays(np.float32, shape, elements=st.floats(-2, 2, width=32))
    return st.tuples(parts, parts).map(lambda ab: (ab[0] + 1j * ab[1]).astype(np.complex64))


COMPLEX_TARGETS = [
    ("query", (1, 4, 2, 8), lambda z: jattn.dot_product_attention(z, z, z)),
    ("query", (1, 4, 2, 8), lambda z: jattn.attention(z, z, z)),
    ("query", (1, 4, 2, 8), lambda z: jattn.linear_attention(z, z, z)),
    ("query", (1, 4, 2, 8), lambda z: jattn.performer_attention(z, z, z, jnp.ones((4, 8)))),
    ("query", (1, 4, 2, 8), lambda z: jattn.nystrom_attention(z, z, z, 2)),
    ("query", (4, 8), lambda z: jattn.dot_product_scores(z, z)),
    ("values", (3, 4), lambda z: jattn.attention_pooling(jnp.ones((2, 3)) / 3, z)),
    ("weights", (2, 3), lambda z: jattn.attention_pooling(z, jnp.ones((3, 4)))),
    ("x", (4, 2, 8), lambda z: jattn.rotary_embedding(z, jnp.arange(4))),
    ("positions", (4,), lambda z: jattn.rotary_embedding(jnp.ones((4, 2, 8)), z)),
    ("positions", (4,), lambda z: jattn.sinusoidal_encoding(z, 4)),
    ("slopes", (2,), lambda z: jattn.alibi_bias(z, 3, 3)),
    ("queries", (3,), lambda z: jattn.nadaraya_watson(z, jnp.ones(3), jnp.ones(3))),
    ("distances", (2, 3), lambda z: jattn.gaussian_kernel(z)),
    ("value", (3, 8), lambda z: jattn.single_head_attention(jnp.ones((2, 8)), z.real, z)),
    ("inputs_q", (1, 4, 8), lambda z: layers.MultiHeadAttention(2, 8, rngs=_rngs())(z)),
    ("weights", (3, 3), lambda z: viz.plot_attention(z)),
    ("weights", (1, 3, 3), lambda z: diagnostics.attention_entropy(z)),
    ("head_mask", (2,), lambda z: diagnostics.head_masked(z)),
]


@SETTINGS
@given(data=st.data(), target=st.sampled_from(COMPLEX_TARGETS))
def test_complex_inputs_are_refused(data, target):
    name, shape, call = target
    z = data.draw(_complex(shape))
    raises(TypeError, lambda: call(z), name)


def test_complex_message():
    z = jnp.ones((1, 4, 2, 8), jnp.complex64)  # was: the imaginary part dropped, silently
    message = raises(TypeError, lambda: jattn.linear_attention(z, z, z))
    assert message == (
        "linear_attention: query must have a floating dtype, got complex64 (complex inputs "
        "are not supported)"
    )


# --------------------------------------------------------------- dtypes (section 4)

bad_dtypes = st.one_of(
    st.sampled_from(["float32x", "floot", "fp32", "", "complex64", "int32", "bool", 5, 3.5]),
    st.sampled_from([jnp.int32, jnp.complex64, np.uint8]),
)
DTYPE_TARGETS = [
    ("param_dtype", lambda d: layers.MultiHeadAttention(2, 8, param_dtype=d, rngs=_rngs())),
    ("dtype", lambda d: layers.MultiHeadAttention(2, 8, dtype=d, rngs=_rngs())),
    (
        "param_dtype",
        lambda d: layers.LearnedPositionalEmbedding(4, 4, param_dtype=d, rngs=_rngs()),
    ),  # fmt: skip
    ("param_dtype", lambda d: layers.AdditiveScore(2, 4, 4, 4, param_dtype=d, rngs=_rngs())),
    ("param_dtype", lambda d: layers.NWKernelRegression(param_dtype=d, rngs=_rngs())),
    ("dtype", lambda d: layers.MultiHeadAttention(2, 8, rngs=_rngs()).init_cache((1, 4, 8), d)),
    ("dtype", lambda d: models.init_cache(layers.MultiHeadAttention(2, 8, rngs=_rngs()), 1, 4, d)),
]


@SETTINGS
@given(target=st.sampled_from(DTYPE_TARGETS), dtype=bad_dtypes)
def test_bad_dtypes_name_the_argument(target, dtype):
    name, call = target
    raises(TypeError, lambda: call(dtype), name, "dtype")


def test_good_dtypes_are_accepted():
    for dtype in ("bfloat16", jnp.float16, np.float32, "float32"):
        layer = layers.MultiHeadAttention(2, 8, dtype=dtype, param_dtype=dtype, rngs=_rngs())
        assert layer.query.kernel.dtype == jnp.dtype(dtype)
    assert str(raises(TypeError, lambda: layers.MultiHeadAttention(2, 8, dtype="float32x",
                                                                    rngs=_rngs()))) == (
        "dtype must be a floating dtype such as jnp.float32 or 'bfloat16', got 'float32x'"
    )  # fmt: skip


# ------------------------------------------------- score parameters (section 4)

wrong_params = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(["w_query", "w_key", "w_value", "W"]), st.just(1.0)),
    st.lists(st.just(jnp.ones((8, 4))), max_size=3).map(tuple),
    st.just(jnp.ones((8, 8))),
    st.text(max_size=3),
)


@SETTINGS
@given(params=wrong_params, which=st.sampled_from(["additive", "mlp", "bilinear"]))
def test_score_params_of_the_wrong_kind_name_the_type(params, which):
    q = jnp.ones((4, 8))
    fn, expected = {
        "additive": (jattn.additive_scores, "AdditiveParams"),
        "mlp": (jattn.mlp_scores, "MLPParams"),
        "bilinear": (jattn.bilinear_scores, "W [H, H']"),
    }[which]
    if which == "bilinear" and isinstance(params, jax.Array):
        with pytest.raises(ValueError, match=re.escape("W must be [8, 8]")):  # a wrong-size W
            fn(q, q, params[:, :3] if params.shape == (8, 8) else params)
        return
    raises(TypeError, lambda: fn(q, q, params), expected, type(params).__name__)


def test_score_params_message():
    q = jnp.ones((4, 8))  # was: AttributeError: 'NoneType' object has no attribute 'w_query'
    assert str(raises(TypeError, lambda: jattn.additive_scores(q, q, None))) == (
        "additive_scores: params must be AdditiveParams(w_query, w_key, w_value) (from "
        "jattn.AdditiveParams), got NoneType"
    )
    raises(TypeError, lambda: jattn.mlp_scores(q, q, {"w_query": q}), "MLPParams", "got dict")
    # list leaves are arrays (einsum refused them without naming the parameter)
    rng = np.random.default_rng(0)
    wq, wk, wv = rng.standard_normal((8, 7)), rng.standard_normal((8, 7)), rng.standard_normal(7)
    as_lists = jattn.AdditiveParams(wq.tolist(), wk.tolist(), wv.tolist())
    as_arrays = jattn.AdditiveParams(*(jnp.asarray(w, jnp.float32) for w in (wq, wk, wv)))
    np.testing.assert_array_equal(
        jattn.additive_scores(q, q, as_lists), jattn.additive_scores(q, q, as_arrays)
    )


# -------------------------------------------------- viz and torch odd arguments


def test_viz_and_diagnostics_arguments():
    w = np.ones((1, 2, 2, 3, 3)) / 3
    raises(ValueError, lambda: viz.plot_attention_grid(w, batch_index=1.5), "batch_index", "1.5")
    raises(ValueError, lambda: viz.plot_attention(np.ones((2, 2)), cmap="nope"), "cmap", "nope")
    raises(TypeError, lambda: viz.plot_attention("abc"), "weights")
    raises(ValueError, lambda: diagnostics.head_importance(jnp.sum, (2.5, 2)), "2.5")
    raises(TypeError, lambda: torch_interop.torch_masks_to_jattn(key_padding_mask="ab"),
            "key_padding_mask")  # fmt: skip
    state = {"in_proj_weight": np.ones((24, 8), np.float32), "in_proj_bias": np.ones(24),
             "out_proj.weight": np.ones((8, 8)), "out_proj.bias": np.ones(8)}  # fmt: skip
    state = {k: np.asarray(v, np.float32) for k, v in state.items()}
    layer = torch_interop.load_multihead_attention(state, num_heads=np.int64(2))  # a good size
    assert layer.num_heads == 2


def test_more_viz_and_diagnostics_arguments():
    """Each was accepted or failed from inside: a str weights (JAX's dtype error), a
    truthy str residual, a NaN head mask (NaN outputs), a non-scalar loss (jax.grad's
    error), a NaN attention map (a NaN colour scale) and no figure (AttributeError)."""
    w = np.ones((2, 1, 2, 3, 3), np.float32) / 3
    raises(TypeError, lambda: diagnostics.attention_rollout("abc"), "weights")
    raises(TypeError, lambda: diagnostics.attention_rollout(w, residual="no"), "residual")
    raises(ValueError, lambda: diagnostics.head_masked(jnp.asarray([1.0, jnp.nan])), "head_mask")
    for importance in (diagnostics.head_importance, diagnostics.head_importance_gradient):
        message = raises(ValueError, lambda f=importance: f(lambda m: m * 2, (2, 2)))
        assert message == "loss_fn must return a scalar, got shape [2, 2]"
    image, amap = np.ones((8, 8, 3)), np.ones((2, 2))
    nan_map = np.where(np.eye(2, dtype=bool), np.nan, amap)
    message = raises(ValueError, lambda: viz.plot_attention_on_image(image, nan_map))
    assert message.startswith("attn_map has 2 non-finite value(s) outside the mask (first: nan")
    raises(TypeError, lambda: viz.save_figure(None, "unused.png"), "fig", "NoneType")
    import matplotlib.pyplot as plt

    plt.close(viz.plot_attention_on_image(image, amap))


def test_check_helpers_directly():
    """The shared checks: what each accepts and refuses."""
    assert _checks.check_size("n", np.int64(3)) == 3
    assert _checks.check_size("n", 0, minimum=0) == 0
    assert _checks.check_rate("r", np.float32(0.5)) == 0.5
    assert _checks.check_finite_scalar("s", np.float32(2.0), positive=True) == 2.0
    assert _checks.check_finite_scalar("s", jnp.float32(-1.0)) == -1.0
    assert _checks.check_dtype("d", "bfloat16") == jnp.bfloat16
    assert _checks.check_dtype("d", None, allow_none=True) is None
    ints = _checks.check_int_array("o", np.array([1, -2], np.int64))
    assert ints.dtype == jnp.int32 and ints.tolist() == [1, -2]
    assert _checks.check_int_array("o", np.array([2**40]), clip=(0, 9)).tolist() == [9]
    for bad, kind in ((None, "NoneType"), ({"a": 1}, "dict"), ([1, [2, 3]], "list")):
        raises(TypeError, lambda b=bad: _checks.as_array("x", b), f"x must be an array, got {kind}")
    raises(ValueError, lambda: _checks.as_array("x", 2**70), "x holds integers beyond int64")
    raises(ValueError, lambda: _checks.as_array("x", [2**63 + 5]), "do not fit uint32")
    param = nnx.Param(jnp.ones(3))  # converts itself (__jax_array__)
    np.testing.assert_array_equal(_checks.as_array("bias", param), jnp.ones(3))


def test_special_ids_must_be_tokens_of_the_vocabulary():
    """With pad_id >= V a finished beam could continue only with a -1e9 token, so it lost
    to live ones and beam search returned a worse sequence without a word; an eos_id
    >= V never stopped a search early."""
    table = jnp.log(jnp.full((5, 5), 0.2))
    step = lambda tokens, state: (table[tokens[:, 0]], state)  # noqa: E731
    first, state = jnp.array([0, 0]), jnp.zeros((2, 1))
    search = functools.partial(models.beam_search, step, state, first, beam_size=2, max_len=4)
    message = raises(ValueError, lambda: search(eos_id=3, pad_id=7))
    assert message == (
        "pad_id=7 is not a token of step_fn's vocabulary: its log_probs have V=5 entries "
        "per row (ids 0 to 4)"
    )
    raises(ValueError, lambda: search(eos_id=5, pad_id=4), "eos_id=5", "V=5")
    greedy = functools.partial(models.greedy_search, step, state, first, max_len=4)
    raises(ValueError, lambda: greedy(eos_id=9, pad_id=0), "eos_id=9", "V=5")
    assert search(eos_id=4, pad_id=4)[0].shape == (2, 4)  # the last id is a token


def test_options_found_unchecked():
    """Each was accepted and ignored, or failed inside Python or JAX."""
    mha = layers.MultiHeadAttention(2, 8, rngs=_rngs())
    cache = models.init_cache(mha, 1, 6, jnp.bfloat16)  # a float32 layer
    message = raises(ValueError, lambda: models.cached_self_attention(mha, X[:, :2], cache))
    assert message.startswith("the cache holds bfloat16 keys and bfloat16 values, but this "
                              "layer makes float32 keys and float32 values")  # fmt: skip
    assert "init_cache(layer, batch_size, max_len, dtype=jnp.float32)" in message
    x, proj = jnp.ones((2, 3, 4)), jnp.ones((5, 4))
    for kind in ("softmax", "relu"):  # relu returned before looking at it
        raises(ValueError, lambda k=kind: jattn.favor_features(x, proj, kind=k, stabilizer="x"),
               "stabilizer must be None, 'row' or 'all', got 'x'")  # fmt: skip
    want = ((5.0 + 3.0) / 6.0) ** 0.6  # an int length was an AttributeError ('astype')
    np.testing.assert_allclose(models.length_penalty_fn(3, 0.6), want, rtol=1e-6)
    raises(ValueError, lambda: models.length_penalty_fn(3, float("nan")), "alpha")
    raises(ValueError, lambda: vision.eca_kernel_size(8, gamma=0), "gamma")  # ZeroDivisionError
    raises(ValueError, lambda: gating.top_k_routing(jnp.ones((2, 4)), 5), "k=5", "E=4")
    dropout = layers.Dropout(0.5, rngs=_rngs())
    for flag in ("no", 1):  # "no" was read as True: no dropout in training, silently
        raises(TypeError, lambda f=flag: dropout(jnp.ones(4), deterministic=f), "deterministic")
    for metric in (masked_cross_entropy, token_accuracy_counts):  # 1.5 matched no label
        raises(TypeError, lambda f=metric: f(jnp.zeros((1, 1, 4)), [[1]], pad_id=1.5), "pad_id")
    weights = jnp.ones((1, 2, 5, 5)) / 5
    for count in (True, 1.0):  # both were read as 1
        raises(ValueError, lambda c=count: vision.rollout_map(weights, (2, 2), num_prefix_tokens=c),
               "num_prefix_tokens must be 0 or 1")  # fmt: skip


def test_training_helpers_refuse_what_they_would_misread(tmp_path):
    """A lone string was scored character by character (exact_match('abc', 'abd') was
    2/3), an unknown tokenizer a KeyError; a metrics record with a float step was written
    and the whole file refused on reading, a NumPy float a JSON TypeError."""
    from jattn.training import MetricsLog, read_metrics
    from jattn.training.metrics import bleu, exact_match

    for metric in (exact_match, bleu):
        raises(TypeError, lambda f=metric: f("abc", "abd"), "predictions must be a sequence")
        raises(TypeError, lambda f=metric: f(["abc"], "abd"), "references must be a sequence")
    raises(ValueError, lambda: bleu(["ab"], ["ab"], tokenize="foo"), "tokenize='foo'")
    assert exact_match(np.array(["a", "b"]), ["a", "c"]) == 0.5  # an array of strings is fine
    log = MetricsLog(tmp_path / "metrics.jsonl", resume_step=None)
    for record in ({"step": 2.0, "split": "train"}, {"step": 3}, ["step", 1]):
        raises(ValueError, lambda r=record: log.write(r), "needs an int 'step' and a str 'split'")
    raises(TypeError, lambda: log.write({"step": 1, "split": "x", "v": object()}), "object")
    log.write({"step": 1, "split": "train", "loss": np.float32(0.5), "n": jnp.int32(3)})
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 1, "split": "train", "loss": 0.5, "n": 3}
    ]
