"""Padding and range hardening: NaN or inf at padded positions reaches neither the
outputs nor the gradients (which are exactly zero there), T5's buckets of the extreme
int32 values stay in range, and concrete learned positions out of the table are refused.

Each padded case is compared with a clean run, the same call with the padding replaced
by finite values; the bucketing is compared with a NumPy int64 reference.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _hardening import raises
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jattn
from jattn import layers, models
from jattn.functional.masks import key_padding_mask
from jattn.layers.gating import load_balancing_loss, top_k_routing

SETTINGS = settings(max_examples=12, deadline=None)
B, S, F = 2, 5, 3
NON_FINITE = [np.nan, np.inf, -np.inf]


@st.composite
def padded_inputs(draw, features=F, min_len=0):
    """``(x_bad, x_clean, valid)``: ``x [B, S, features]`` whose padded steps (after a
    drawn length per example) hold NaN/inf in x_bad and finite values in x_clean."""
    lengths = [draw(st.integers(min_len, S)) for _ in range(B)]
    if all(n == S for n in lengths):  # some padding
        lengths[0] = draw(st.integers(min_len, S - 1))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    x = rng.standard_normal((B, S, features)).astype(np.float32)
    valid = np.arange(S)[None, :] < np.array(lengths)[:, None]
    x_bad = x.copy()
    pad = ~valid
    fill = rng.integers(0, len(NON_FINITE), (B, S, features))
    every = np.array(NON_FINITE, np.float32)[fill]
    # NaN/inf in some features of every padded step, the rest finite garbage
    some = rng.random((B, S, features)) < 0.6
    some[..., 0] = True
    x_bad[pad] = np.where(some, every, 1e30)[pad]
    x_clean = x.copy()
    x_clean[pad] = rng.standard_normal((int(pad.sum()), features)).astype(np.float32)
    return x_bad, x_clean, valid


def _check_grads(g_bad, g_clean, pad=None, rtol=1e-5, atol=1e-6):
    """g_bad finite, equal to g_clean (where not ``pad``), and exactly 0 at ``pad``."""
    g_bad, g_clean = np.asarray(g_bad), np.asarray(g_clean)
    assert np.isfinite(g_bad).all()
    if pad is None:
        np.testing.assert_allclose(g_bad, g_clean, rtol=rtol, atol=atol)
        return
    assert (g_bad[pad] == 0).all()
    np.testing.assert_allclose(g_bad[~pad], g_clean[~pad], rtol=rtol, atol=atol)


def _check_param_grads(g_bad, g_clean):
    flat_bad = jax.tree.leaves(g_bad)
    flat_clean = jax.tree.leaves(g_clean)
    assert flat_bad and len(flat_bad) == len(flat_clean)
    for a, b in zip(flat_bad, flat_clean, strict=True):
        _check_grads(a, b)


# ----------------------------------------------------------------- GRU encoder (1)


@functools.cache
def _gru(bidirectional):
    enc = models.GRUEncoder(
        F, 2, num_layers=2 if bidirectional else 1, bidirectional=bidirectional,
        rngs=nnx.Rngs(0),
    )  # fmt: skip

    @nnx.jit
    def run(enc, x, valid):
        def loss(enc, x):
            outs, finals = enc(x, valid)
            return jnp.sum(jnp.sin(outs)) + jnp.sum(finals**2), (outs, finals)

        (_, (outs, finals)), (g_params, g_x) = nnx.value_and_grad(
            loss, argnums=(0, 1), has_aux=True
        )(enc, x)
        return outs, finals, g_x, g_params

    return enc, run


@SETTINGS
@given(case=padded_inputs(), bidirectional=st.booleans())
def test_gru_encoder_padding_reaches_no_gradient(case, bidirectional):
    """NaN/inf in padded steps: outputs and finals equal a clean run, the gradients are
    finite, equal to the clean run's, and exactly 0 at the padded inputs (the input's
    NaN gradient used to reach the real positions of the example)."""
    x_bad, x_clean, valid = case
    enc, run = _gru(bidirectional)
    outs, finals, g_x, g_params = run(enc, jnp.asarray(x_bad), jnp.asarray(valid))
    ref_outs, ref_finals, ref_g_x, ref_g_params = run(enc, jnp.asarray(x_clean), jnp.asarray(valid))
    np.testing.assert_array_equal(np.asarray(outs), np.asarray(ref_outs))
    np.testing.assert_array_equal(np.asarray(finals), np.asarray(ref_finals))
    assert (np.asarray(outs)[~valid] == 0).all()
    _check_grads(g_x, ref_g_x, ~valid)
    _check_param_grads(g_params, ref_g_params)


def test_gru_masked_scan_guards_its_projected_inputs():
    """masked_scan itself never steps a padded input: NaN projections at padded steps
    reach neither the states nor the gradients."""
    from jattn.models.rnn import masked_scan

    cell = models.GRUCell(F, 2, rngs=nnx.Rngs(1))
    valid = np.arange(S)[None, :] < np.array([[3], [S]])
    xp = np.random.default_rng(0).standard_normal((B, S, 6)).astype(np.float32)
    xp_bad = xp.copy()
    xp_bad[0, 3:] = np.nan
    h0 = jnp.zeros((B, 2), jnp.float32)

    def loss(xp, reverse):
        outs, final = masked_scan(cell, xp, jnp.asarray(valid), h0, reverse=reverse)
        return jnp.sum(jnp.sin(outs)) + jnp.sum(final**2)

    for reverse in (False, True):
        grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
        v_bad, g_bad = grad(jnp.asarray(xp_bad), reverse)
        v_clean, g_clean = grad(jnp.asarray(xp), reverse)
        assert float(v_bad) == float(v_clean)
        _check_grads(g_bad, g_clean, ~valid)


# ------------------------------------------------------------- mixture of heads (2)

D_MOH, N_MOH = 8, 4


@functools.cache
def _moh():
    moh = layers.MixtureOfHeads(
        layers.MultiHeadAttention(N_MOH, D_MOH, rngs=nnx.Rngs(0)), k=2, rngs=nnx.Rngs(1)
    )

    @nnx.jit
    def run(moh, x, valid):
        def aux(moh, x):
            out, loss = moh(x, mask=key_padding_mask(valid), token_mask=valid,
                            return_aux_loss=True)  # fmt: skip
            return loss, out

        (loss, out), (g_params, g_x) = nnx.value_and_grad(aux, argnums=(0, 1), has_aux=True)(moh, x)
        return out, loss, g_x, g_params

    return moh, run


@SETTINGS
@given(case=padded_inputs(D_MOH))
def test_mixture_of_heads_padding_stays_out_of_the_aux_loss(case):
    """NaN/inf in padded tokens: the real rows and the aux loss equal a clean run (the
    loss used to be NaN), and the aux loss's gradients are finite, equal to the clean
    run's, exactly 0 at the padded inputs."""
    x_bad, x_clean, valid = case
    moh, run = _moh()
    out, loss, g_x, g_params = run(moh, jnp.asarray(x_bad), jnp.asarray(valid))
    ref_out, ref_loss, ref_g_x, ref_g_params = run(moh, jnp.asarray(x_clean), jnp.asarray(valid))
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref_out)[valid], atol=1e-6)
    _check_grads(g_x, ref_g_x, ~valid)
    router = nnx.state(g_params, nnx.Param)["router"]
    _check_param_grads(router, nnx.state(ref_g_params, nnx.Param)["router"])


def test_load_balancing_loss_ignores_non_finite_padding():
    """Direct calls: probabilities at tokens ``where`` hides may be NaN/inf."""
    probs, selected = top_k_routing(jnp.array([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]]), 1)
    where = jnp.array([True, False])
    for bad in NON_FINITE:
        got = load_balancing_loss(probs.at[1].set(bad), selected, where)
        want = load_balancing_loss(probs.at[1].set(0.25), selected, where)
        assert np.isfinite(float(got)) and float(got) == float(want)


def test_mixture_of_heads_errors_name_token_mask():
    moh, _ = _moh()
    x = jnp.zeros((B, S, D_MOH))
    raises(ValueError, lambda: moh(x, token_mask=jnp.ones((B, S + 1), bool)), "token_mask",
           f"[{B}, {S}]", f"[{B}, {S + 1}]")  # fmt: skip
    message = raises(TypeError, lambda: moh(x, token_mask=jnp.ones((B, S))), "token_mask")
    assert "where" not in message
    message = raises(ValueError, lambda: moh.route(x, jnp.ones((S,), bool)), "token_mask")
    assert "where" not in message
    # load_balancing_loss keeps its own argument's name
    probs, selected = top_k_routing(jnp.zeros((3, 4)), 1)
    raises(ValueError, lambda: load_balancing_loss(probs, selected, jnp.ones(2, bool)), "where")


# ------------------------------------------------------------------- Perceiver (3)


@functools.cache
def _perceiver():
    enc = layers.PerceiverEncoder(3, 8, F, 2, 1, rngs=nnx.Rngs(0))

    @nnx.jit
    def run(enc, x, valid):
        def loss(enc, x):
            z = enc(x, input_mask=valid)
            return jnp.sum(jnp.sin(z)), z

        (_, z), (g_params, g_x) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(enc, x)
        return z, g_x, g_params

    return enc, run


@SETTINGS
@given(case=padded_inputs())
def test_perceiver_padding_reaches_no_gradient(case):
    """NaN/inf in padded inputs: the latents equal a clean run, and the gradients are
    finite, equal to the clean run's, exactly 0 at the padded inputs (the input norm
    used to give them NaN gradients, and NaN gradients to its scale and bias)."""
    x_bad, x_clean, valid = case
    enc, run = _perceiver()
    z, g_x, g_params = run(enc, jnp.asarray(x_bad), jnp.asarray(valid))
    ref_z, ref_g_x, ref_g_params = run(enc, jnp.asarray(x_clean), jnp.asarray(valid))
    np.testing.assert_array_equal(np.asarray(z), np.asarray(ref_z))
    _check_grads(g_x, ref_g_x, ~valid)
    _check_param_grads(g_params, ref_g_params)


@functools.cache
def _attention_layer(kind, call):
    if kind == "mha":
        layer = layers.MultiHeadAttention(2, 4, rngs=nnx.Rngs(0))
    else:
        layer = layers.LinearAttention(2, 4, kind=kind, num_features=8, rngs=nnx.Rngs(0))

    @nnx.jit
    def run(layer, xq, x, valid):
        def loss(layer, xq, x):
            if call == "cross":  # padded keys and values
                out = layer(xq, x, mask=key_padding_mask(valid))
            elif call == "self":  # padded keys and queries; the caller ignores those rows
                out = layer(x, mask=key_padding_mask(valid))
            else:  # causal: the padding at the end is seen by padded rows only
                out = layer(x, is_causal=True)
            if call != "cross":
                out = jnp.where(valid[..., None], out, 0.0)
            return jnp.sum(jnp.sin(out)), out

        grad = nnx.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
        (_, out), grads = grad(layer, xq, x)
        return out, grads

    return layer, run


@SETTINGS
@given(
    case=padded_inputs(4, min_len=1),
    kind=st.sampled_from(["mha", "mha", "linear", "performer"]),
    call=st.sampled_from(["cross", "self", "causal"]),
)
def test_attention_layer_padding_reaches_no_gradient(case, kind, call):
    """NaN/inf padding reached the weights' gradients (``x^T dy`` is ``NaN * 0`` at a
    padded position) and, in self-attention, the valid inputs' gradients (a padded
    query's NaN row met its zero cotangent, 0 * NaN, in every key it sees). Now the
    layers clean non-finite input vectors before their projections and the core keeps
    NaN rows out of the backward pass: outputs at the real rows, the real inputs' and
    every weight's gradients are a clean run's, and 0 at the padding."""
    x_bad, x_clean, valid = case
    layer, run = _attention_layer(kind, call)
    xq = jnp.asarray(np.random.default_rng(1).standard_normal((B, 3, 4)), jnp.float32)
    valid = jnp.asarray(valid)
    out, (g_params, g_q, g_x) = run(layer, xq, jnp.asarray(x_bad), valid)
    ref_out, (ref_params, ref_q, ref_x) = run(layer, xq, jnp.asarray(x_clean), valid)
    rows = np.ones(out.shape[:2], bool) if call == "cross" else np.asarray(valid)
    np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(ref_out)[rows],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    _check_grads(g_x, ref_x, ~np.asarray(valid))
    _check_grads(g_q, ref_q)
    _check_param_grads(g_params, ref_params)


COMPOSITES = {
    "parallel concat": lambda r: layers.ParallelAttention(
        [layers.MultiHeadAttention(2, 4, rngs=r), layers.LinearAttention(2, 4, rngs=r)],
        combine="concat", rngs=r),
    "parallel gate": lambda r: layers.ParallelAttention(
        [layers.MultiHeadAttention(2, 4, rngs=r), layers.MultiHeadAttention(2, 4, rngs=r)],
        combine="gate", rngs=r),
    "gated": lambda r: layers.GatedAttention(
        layers.MultiHeadAttention(2, 4, rngs=r), value_gate=True, rngs=r),
    "mixture of heads": lambda r: layers.MixtureOfHeads(
        layers.MultiHeadAttention(4, 4, rngs=r), k=2, rngs=r),
}  # fmt: skip


@functools.cache
def _composite(name, causal):
    layer = COMPOSITES[name](nnx.Rngs(0))
    extra = {"token_mask": True} if name == "mixture of heads" else {}

    @nnx.jit
    def run(layer, x, valid):
        def loss(layer, x):
            opts = {k: valid for k in extra}
            if causal:
                out = layer(x, is_causal=True, **opts)
            else:
                out = layer(x, mask=key_padding_mask(valid), **opts)
            out = jnp.where(valid[..., None], out, 0.0)  # the caller ignores padded rows
            return jnp.sum(jnp.sin(out)), out

        (_, out), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(layer, x)
        return out, grads

    return layer, run


@SETTINGS
@given(case=padded_inputs(4, min_len=1), name=st.sampled_from(sorted(COMPOSITES)),
       causal=st.booleans())  # fmt: skip
def test_composite_padding_reaches_no_gradient(case, name, causal):
    """The composites' own per-token maps (a concatenation's projection, gates, the
    router's weights) met a padded query's NaN row with its zero cotangent (0 * NaN):
    NaN weight gradients, and NaN input gradients at the padding. Now each such map
    works by row (a non-finite row cleaned before, NaN after): the real rows' outputs,
    the inputs' and every weight's gradients are a clean run's, and 0 at the padding."""
    x_bad, x_clean, valid = case
    layer, run = _composite(name, causal)
    valid = jnp.asarray(valid)
    out, (g_params, g_x) = run(layer, jnp.asarray(x_bad), valid)
    ref_out, (ref_params, ref_x) = run(layer, jnp.asarray(x_clean), valid)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    _check_grads(g_x, ref_x, ~np.asarray(valid))
    _check_param_grads(g_params, ref_params)


@functools.cache
def _co_attention():
    co = layers.CoAttention(4, 4, 2, rngs=nnx.Rngs(0))

    @nnx.jit
    def run(co, text, image, text_valid, image_valid):
        def loss(co, text, image):
            outs = co(text, image, text_mask=text_valid, image_mask=image_valid)
            # the caller ignores the padded query rows, as the docstring says
            real = [
                jnp.where(v[..., None], o, 0.0)
                for o, v in zip(outs, (text_valid, image_valid), strict=True)
            ]
            return sum(jnp.sum(jnp.sin(r)) for r in real), real

        grad = nnx.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
        (_, outs), grads = grad(co, text, image)
        return outs, grads

    return co, run


@SETTINGS
@given(text=padded_inputs(4), image=padded_inputs(4))
def test_co_attention_padding_reaches_no_gradient(text, image):
    """Padding is a key of the other direction and a query of its own: its NaN rows,
    ignored by the caller, gave every projection NaN gradients (0 * NaN)."""
    co, run = _co_attention()
    (t_bad, t_clean, t_valid), (i_bad, i_clean, i_valid) = text, image
    valid = (jnp.asarray(t_valid), jnp.asarray(i_valid))
    outs, (g_params, g_text, g_image) = run(co, jnp.asarray(t_bad), jnp.asarray(i_bad), *valid)
    ref_outs, (ref_params, ref_text, ref_image) = run(
        co, jnp.asarray(t_clean), jnp.asarray(i_clean), *valid
    )
    for out, ref in zip(outs, ref_outs, strict=True):
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    _check_grads(g_text, ref_text, ~t_valid)
    _check_grads(g_image, ref_image, ~i_valid)
    _check_param_grads(g_params, ref_params)


# --------------------------------------------------------- T5 relative buckets (4)

INT32 = np.iinfo(np.int32)
BUCKET_OPTIONS = [(True, 32, 128), (False, 32, 128), (True, 8, 20), (False, 6, 9)]


def _buckets_reference(rel, bidirectional, num_buckets, max_distance):
    """T5's bucketing in NumPy int64 (no overflow), with the float32 logarithm."""
    n = -np.asarray(rel, np.int64)
    ret = np.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0) * num_buckets
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    ratio = np.maximum(n, 1).astype(np.float32) / np.float32(max_exact)
    scaled = np.log(ratio) / np.float32(math.log(max_distance / max_exact))
    large = max_exact + (scaled * np.float32(num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return ret + np.where(n < max_exact, n, large)


def _buckets(rel, options):
    bidirectional, num_buckets, max_distance = options
    return jattn.relative_position_buckets(
        rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )


@pytest.mark.parametrize("options", BUCKET_OPTIONS)
def test_relative_buckets_of_the_extreme_int32_values(options):
    """int32 min used to overflow on negation (-2147483632 for bucket); every int32
    value near the ends and around 0 gets the reference's bucket, in range."""
    _, num_buckets, max_distance = options
    ends = np.array([INT32.min, INT32.min + 1, INT32.min + 2, INT32.max - 1, INT32.max])
    near = np.arange(-3 * max_distance, 3 * max_distance + 1)
    rel = np.concatenate([ends, near]).astype(np.int32)
    for fn in (_buckets, jax.jit(_buckets, static_argnums=1)):
        got = np.asarray(fn(jnp.asarray(rel), options))
        assert got.dtype == np.int32
        assert ((got >= 0) & (got < num_buckets)).all(), got[:5]
        np.testing.assert_array_equal(got, _buckets_reference(rel, *options))
    # int32 min is the farthest key before the query: the last bucket of its direction
    bidirectional = options[0]
    want = num_buckets // 2 - 1 if bidirectional else num_buckets - 1
    assert int(_buckets(jnp.array([INT32.min], jnp.int32), options)[0]) == want


@SETTINGS
@given(
    rel=st.lists(
        st.one_of(
            st.sampled_from([INT32.min, INT32.min + 1, INT32.max]),
            st.integers(INT32.min, INT32.max),
        ),
        min_size=1,
        max_size=16,
    ),
    options=st.sampled_from(BUCKET_OPTIONS),
)
def test_relative_buckets_equal_an_int64_reference(rel, options):
    rel = np.array(rel, np.int32)
    got = np.asarray(_buckets(jnp.asarray(rel), options))
    np.testing.assert_array_equal(got, _buckets_reference(rel, *options))


# -------------------------------------------------- learned positional embedding (5)


@functools.cache
def _learned():
    return layers.LearnedPositionalEmbedding(6, 4, rngs=nnx.Rngs(0))


@SETTINGS
@given(
    positions=st.lists(st.integers(INT32.min, INT32.max), min_size=1, max_size=4),
    as_array=st.sampled_from([np.asarray, jnp.asarray, lambda p: np.asarray(p, np.int64)]),
)
def test_learned_positions_out_of_the_table_are_refused(positions, as_array):
    """Concrete positions outside [0, max_len) are a ValueError naming positions and
    the range (negative ones used to be clipped to 0 silently, past the end to the
    last row); inside, the table's rows."""
    layer = _learned()
    table = np.asarray(layer.embedding.embedding[...])
    p = np.array(positions, np.int64)
    if ((p < 0) | (p >= 6)).any():
        message = raises(ValueError, lambda: layer(as_array(p)), "positions", "[0, 6)")
        assert str(int(p.min())) in message and str(int(p.max())) in message
    else:
        np.testing.assert_array_equal(np.asarray(layer(as_array(p))), table[p])


def test_learned_positions_refuse_python_ints_and_give_traced_ones_outside_nan():
    layer = _learned()
    table = np.asarray(layer.embedding.embedding[...])
    raises(ValueError, lambda: layer(-1), "positions", "-1", "[0, 6)")
    raises(ValueError, lambda: layer(6), "positions", "6", "[0, 6)")
    np.testing.assert_array_equal(np.asarray(layer(5)), table[5])
    # traced positions cannot be checked: outside the table a NaN row (they were clipped
    # to its first and last rows, a row they do not name), as a traced token id
    got = np.asarray(nnx.jit(lambda m, p: m(p))(layer, jnp.array([-3, 0, 5, 9, -1], jnp.int32)))
    np.testing.assert_array_equal(got[[1, 2]], table[[0, 5]])
    assert np.isnan(got[[0, 3, 4]]).all()
