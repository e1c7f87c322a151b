"""Bad calls at the public boundary that used to fail deep inside JAX, or not at all:
masks that do not broadcast together, complex inputs cast to real by the low-rank
attentions, a token batch that is not the cache's, an empty prompt batch, and a
``decode`` flag that LinearAttention would ignore. Each is now one clear error that
names the caller's argument, and the good calls next to them still work.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _hardening import generated
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jattn
from jattn import layers, models
from jattn.functional import lowrank

SETTINGS = generated(10)

Q = jnp.ones((1, 4, 2, 4), jnp.float32)  # [B, T, N, H]
X = jnp.zeros((1, 4, 8), jnp.float32)  # [B, T, D]
C64 = jnp.complex64


def _fmt(shape):
    return re.escape("[" + ", ".join(str(d) for d in shape) + "]")


# ------------------------------------------------------------------- combine_masks


def test_combine_masks_that_do_not_broadcast_name_positions_and_shapes():
    with pytest.raises(ValueError, match=r"masks\[0\] \[2, 3\] and masks\[1\] \[3, 2\] do not "
                                         r"broadcast together"):  # fmt: skip
        jattn.combine_masks(jnp.ones((2, 3), bool), jnp.ones((3, 2), bool))
    # positions are the caller's, None entries included; the clash may be with any earlier mask
    with pytest.raises(ValueError, match=r"masks\[1\] \[4, 1\] and masks\[3\] \[2, 5\]"):
        jattn.combine_masks(
            None, jnp.ones((4, 1), bool), jnp.ones((1, 5), bool), jnp.ones((2, 5), bool)
        )


@st.composite
def clashing_shapes(draw):
    """Two shapes (ranks 1 to 3) that do not broadcast together: one axis, aligned on
    the right, differs and is 1 in neither."""
    a = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4))
    b = list(draw(hnp.broadcastable_shapes(a, min_dims=1, max_dims=3, min_side=1, max_side=4)))
    axis = draw(st.integers(1, min(len(a), len(b))))  # from the right
    size = draw(st.integers(2, 4))
    other = draw(st.integers(2, 5).filter(lambda d: d != size))
    a = list(a)
    a[-axis], b[-axis] = size, other
    return tuple(a), tuple(b)


@SETTINGS
@given(clashing_shapes(), st.integers(0, 2))
def test_combine_masks_generated_clashes(shapes, nones):
    a, b = shapes
    args = [None] * nones + [np.ones(a, bool), None, np.ones(b, bool)]
    want = rf"masks\[{nones}\] {_fmt(a)} and masks\[{nones + 2}\] {_fmt(b)} do not broadcast"
    with pytest.raises(ValueError, match=want):
        jattn.combine_masks(*args)


@SETTINGS
@given(hnp.mutually_broadcastable_shapes(num_shapes=3, min_dims=0, max_dims=3, max_side=3),
       st.data())  # fmt: skip
def test_combine_masks_of_broadcastable_shapes_still_work(shapes, data):
    masks = [data.draw(hnp.arrays(np.bool_, s)) for s in shapes.input_shapes]
    got = jattn.combine_masks(masks[0], None, *masks[1:])
    want = np.logical_and(np.logical_and(masks[0], masks[1]), masks[2])
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------- low-rank, complex


def _w(m=8, h=4):
    return lowrank.orthogonal_random_features(jax.random.key(0), m, h)


E = jnp.ones((3, 4), jnp.float32)  # Linformer [k, S_max]

COMPLEX_CALLS = [
    ("x", lambda: lowrank.favor_features(Q.astype(C64), _w())),
    ("x", lambda: lowrank.favor_features(Q.astype(C64), _w(), kind="relu")),
    ("projection", lambda: lowrank.favor_features(Q, _w().astype(C64))),
    (
        "performer_attention: projection",
        lambda: lowrank.performer_attention(Q, Q, Q, _w().astype(C64)),
    ),
    (
        "linformer_attention: projection",
        lambda: lowrank.linformer_attention(Q, Q, Q, E.astype(C64)),
    ),
    (
        "linformer_attention: value_projection",
        lambda: lowrank.linformer_attention(Q, Q, Q, E, E.astype(C64)),
    ),
    ("performer_attention: query", lambda: lowrank.performer_attention(Q.astype(C64), Q, Q, _w())),
    ("nystrom_attention: key", lambda: lowrank.nystrom_attention(Q, Q.astype(C64), Q, 2)),
]


@pytest.mark.parametrize("name, call", COMPLEX_CALLS)
def test_lowrank_refuses_complex_inputs_and_projections(name, call):
    with pytest.raises(TypeError, match=rf"^{re.escape(name)} must .*complex"):
        call()


def test_orthogonal_random_features_names_a_bad_key():
    for key in (jnp.ones(2, C64), jnp.ones(2, jnp.float32), 0):
        with pytest.raises(TypeError, match="key must be one PRNG key"):
            lowrank.orthogonal_random_features(key, 8, 4)
    raw = lowrank.orthogonal_random_features(jax.random.PRNGKey(0), 8, 4)
    typed = lowrank.orthogonal_random_features(jax.random.key(0), 8, 4)
    assert raw.shape == typed.shape == (8, 4) and raw.dtype == jnp.float32


def test_favor_features_checks_the_rank_its_stabilizer_needs():
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., L, heads, H\] .* \[3, 4\]"):
        lowrank.favor_features(jnp.ones((3, 4)), _w(), stabilizer="all")
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., H\] .* \[\]"):
        lowrank.favor_features(jnp.ones(()), _w())


def test_lowrank_real_inputs_still_work():
    w = _w()
    assert lowrank.favor_features(jnp.ones((3, 4)), w).shape == (3, 8)
    ints = lowrank.favor_features(jnp.ones((3, 4), jnp.int32), w, stabilizer="row")
    np.testing.assert_allclose(ints, lowrank.favor_features(jnp.ones((3, 4)), w, stabilizer="row"))
    for out in (
        lowrank.performer_attention(Q, Q, Q, w),
        lowrank.linformer_attention(Q, Q, Q, E, E.astype(jnp.bfloat16)),
        lowrank.nystrom_attention(Q, Q, Q, 2),
    ):
        assert out.shape == Q.shape and out.dtype == jnp.float32
        assert np.all(np.isfinite(out))


# ------------------------------------------------------------------ models, decoding


@pytest.fixture(scope="module")
def lm():
    return models.DecoderLM(11, num_layers=1, features=8, num_heads=2, max_len=8,
                            dropout_rate=0.0, rngs=nnx.Rngs(0))  # fmt: skip


@pytest.fixture(scope="module")
def linear_lm():
    return models.DecoderLM(11, num_layers=1, features=8, num_heads=2, max_len=8,
                            dropout_rate=0.0, attention="linear", rngs=nnx.Rngs(0))  # fmt: skip


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 2), st.booleans())
def test_step_names_a_token_batch_that_is_not_the_caches(lm, linear_lm, b_tokens, b_cache, t,
                                                         linear):  # fmt: skip
    if b_tokens == b_cache:
        b_tokens += 1
    model = linear_lm if linear else lm
    caches = model.init_cache(b_cache, 4)
    tokens = jnp.ones((b_tokens, t), jnp.int32)
    want = (
        rf"tokens \[{b_tokens}, {t}\] hold B={b_tokens} sequences, but the caches hold "
        rf"B={b_cache}"
    )
    with pytest.raises(ValueError, match=want):
        model.step(tokens, caches)


def test_step_checks_token_rank_and_dtype_and_good_steps_work(lm):
    caches = lm.init_cache(3, 4)
    with pytest.raises(ValueError, match=r"tokens must be integer tokens \[B, L\], got int32\[3\]"):
        lm.step(jnp.ones((3,), jnp.int32), caches)
    with pytest.raises(ValueError, match=r"tokens must be integer tokens .* float32\[3, 1\]"):
        lm.step(jnp.ones((3, 1)), caches)
    logits, caches = lm.step(np.ones((3, 2), np.int64), caches)
    assert logits.shape == (3, 2, 11)
    np.testing.assert_array_equal(models.decoding.cache_index(caches), [2, 2, 2])


def test_generate_names_an_empty_prompt_batch(lm):
    for shape, what in (((0, 3), "one sequence"), ((2, 0), "one token")):
        prompt = jnp.ones(shape, jnp.int32)
        lengths = jnp.ones(shape[:1], jnp.int32)
        with pytest.raises(ValueError, match=rf"prompt_tokens must hold at least {what} .*"
                                             rf"shape {_fmt(shape)}") as info:  # fmt: skip
            lm.generate(prompt, lengths, max_new_tokens=2)
        assert "batch_size" not in str(info.value)
        assert "prompt_lengths" not in str(info.value)
    out = lm.generate(jnp.array([[3, 4]]), jnp.array([2]), max_new_tokens=2)
    assert out.shape == (1, 2) and out.dtype == jnp.int32


_GENERATE = nnx.jit(lambda lm, prompt, lengths: lm.generate(prompt, lengths, max_new_tokens=3))


@SETTINGS
@given(lengths=st.lists(st.integers(-(2**31), 2**31 - 1) | st.integers(-2, 6), min_size=3,
                        max_size=3))  # fmt: skip
def test_traced_prompt_lengths_outside_the_prompts_mark_their_examples(lm, lengths):
    """Under jax.jit the lengths cannot be checked: an example whose length is outside
    [1, P] gets -1 tokens (never a token id) instead of continuing a clipped prompt; the
    others equal an eager call with their lengths (which raises for the bad ones)."""
    prompt = jnp.asarray([[3, 4, 5, 6], [7, 8, 9, 10], [4, 4, 9, 3]], jnp.int32)
    lengths = np.asarray(lengths, np.int32)
    got = np.asarray(_GENERATE(lm, prompt, jnp.asarray(lengths)))
    bad = (lengths < 1) | (lengths > 4)
    if bad.any():
        with pytest.raises(ValueError, match=r"prompt_lengths must be in \[1, 4\]"):
            lm.generate(prompt, lengths, max_new_tokens=3)
    np.testing.assert_array_equal(got[bad], -1)
    want = np.asarray(lm.generate(prompt, np.where(bad, 1, lengths), max_new_tokens=3))
    np.testing.assert_array_equal(got[~bad], want[~bad])
    assert (want >= 0).all()


_FORWARD = nnx.jit(lambda model, *tokens: model(*tokens, deterministic=True))


@pytest.fixture(scope="module")
def seq2seq():
    return models.BahdanauSeq2Seq(11, 11, embed_dim=8, hidden=8, rngs=nnx.Rngs(0))


@SETTINGS
@given(token=st.integers(-(2**31), 2**31 - 1) | st.integers(-2, 12), where=st.integers(0, 3))
def test_traced_token_ids_outside_the_vocabulary_give_nan(lm, seq2seq, token, where):
    """Under jax.jit token ids cannot be checked: an id outside [0, 11) gives NaN from
    its position on (a decoder) or everywhere (a source every output attends to). A
    negative id read the table from its end before (a -1 used as padding, silently);
    an in-range one equals the eager call, which raises for the others."""
    tokens = np.asarray([[3, 4, 5, 6]], np.int32)
    tokens[0, where] = token
    bad = not 0 <= token < 11
    if bad:
        with pytest.raises(ValueError, match=r"tokens holds token ids outside the vocabulary"):
            lm(tokens, deterministic=True)
    clean = tokens.copy()
    clean[0, where] = 1 if bad else token
    got = np.asarray(_FORWARD(lm, jnp.asarray(tokens)))
    assert np.isnan(got[0, where:]).all() == bad
    want = np.asarray(lm(clean, deterministic=True))
    np.testing.assert_allclose(got[0, :where], want[0, :where], rtol=1e-5, atol=1e-6)
    if not bad:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    target = jnp.asarray([[1, 5, 6]], jnp.int32)
    got = np.asarray(_FORWARD(seq2seq, jnp.asarray(tokens), target))
    assert np.isnan(got).all() if bad else np.isfinite(got).all()


_STEP = nnx.jit(lambda lm, tokens, caches: lm.step(tokens, caches)[0])


@SETTINGS
@given(index=st.lists(st.integers(0, 4), min_size=3, max_size=3), num_new=st.integers(1, 2))
def test_a_traced_cache_overflow_makes_only_its_examples_nan(lm, index, num_new):
    """Under jax.jit a cache index that leaves no room cannot raise: the overflowing
    examples' logits are NaN (no clamped write that overwrites the last slots); the
    others equal an eager step, which raises for the overflowing ones."""
    tokens = jnp.asarray([[3, 4], [5, 6], [7, 8]], jnp.int32)[:, :num_new]
    _, full = lm.step(jnp.full((3, 4), 2, jnp.int32), lm.init_cache(3, 4))
    index = np.asarray(index, np.int32)
    got = np.asarray(_STEP(lm, tokens, models.decoding.rewind_cache(full, jnp.asarray(index))))
    over = index + num_new > 4
    if over.any():
        with pytest.raises(ValueError, match="the cache is full"):
            lm.step(tokens, models.decoding.rewind_cache(full, index))
    assert np.isnan(got[over]).all()
    fits = models.decoding.rewind_cache(full, np.where(over, 0, index))
    want = np.asarray(lm.step(tokens, fits)[0])
    assert np.isfinite(want).all()
    np.testing.assert_allclose(got[~over], want[~over], rtol=1e-5, atol=1e-6)


def test_seq2seq_generate_names_an_empty_source_batch():
    model = models.Transformer(11, 11, num_layers=1, features=8, num_heads=2, max_len=8,
                               dropout_rate=0.0, rngs=nnx.Rngs(0))  # fmt: skip
    with pytest.raises(ValueError, match=r"src must hold at least one sequence .*\[0, 3\]") as info:
        model.generate(jnp.ones((0, 3), jnp.int32), max_len=2)
    assert "batch_size" not in str(info.value)


# ------------------------------------------------------------- LinearAttention decode


@pytest.mark.parametrize("decode", [True, np.bool_(True), 1])
@pytest.mark.parametrize("kind", ["linear", "performer"])
def test_linear_attention_refuses_decode(kind, decode):
    with pytest.raises(ValueError, match=r"takes no decode=.*init_cache\(batch_size\) and "
                                         r"step\(x, cache\).*jattn\.models"):  # fmt: skip
        layers.LinearAttention(2, 8, kind=kind, decode=decode, rngs=nnx.Rngs(0))
    layer = layers.LinearAttention(2, 8, kind=kind, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"nnx.view of LinearAttention.*takes no decode=True"):
        nnx.view(layer, decode=True)
    assert layer.decode is False and nnx.view(layer, deterministic=False).deterministic is False


def test_linear_attention_without_decode_still_works():
    for decode in ({}, {"decode": False}, {"decode": np.bool_(False)}):
        layer = layers.LinearAttention(2, 8, rngs=nnx.Rngs(0), **decode)
        assert layer(X).shape == X.shape
    assert layers.MultiHeadAttention(2, 8, decode=True, rngs=nnx.Rngs(0)).decode


def test_lowrank_attentions_name_a_list_given_for_an_array():
    """Was an AttributeError ('list' object has no attribute 'shape')."""
    x = [[[[1.0, 2.0]]]]
    for name, call in (
        ("nystrom_attention", lambda: lowrank.nystrom_attention(x, x, x, 1)),
        ("linformer_attention", lambda: lowrank.linformer_attention(x, x, x, jnp.eye(1))),
        ("performer_attention", lambda: lowrank.performer_attention(x, x, x, jnp.ones((2, 2)))),
    ):
        with pytest.raises(TypeError, match=f"{name}: query must be an array, got list"):
            call()
