"""Issue 19, the numerics: values at hidden positions never reach a result, no inf is
made, and the blocked path is as robust as the dense one at extreme logits.

The generated cases put NaN or inf into query, key and value vectors at random
positions under random masks, lengths and causal/window patterns, and check every
(example, head, query) row against what it can see: a row that sees a non-finite
input is NaN, a row that does not is exactly the row of a clean run; when no row
sees one (all of them hidden), the gradients are finite, equal to the clean run's,
and zero at the non-finite vectors.
"""

import functools

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jattn
from jattn.functional import dispatch
from jattn.functional.blocked import blocked_attention
from jattn.functional.dense import _dense_in_layout, attention

B, T, S, N, K, H = 2, 5, 7, 4, 2, 4
G = N // K
PATTERNS = [(True, None), (False, (2, 1))]  # (is_causal, window): the static options
SETTINGS = settings(max_examples=25, deadline=None)


def _in_layout(q, k, v, *, mask, **options):
    spec = dispatch.unchecked_spec(q, k, v, None, mask, **options)
    return _dense_in_layout(spec)[0]


PATHS = {
    "dense": attention,
    "default": jattn.dot_product_attention,
    "blocked": functools.partial(blocked_attention, block_sizes=(2, 3)),
    "in-layout": _in_layout,
}


@functools.cache
def _compiled(path, is_causal, window):
    fn = PATHS[path]

    def out(q, k, v, mask, q_len, kv_len):
        return fn(
            q, k, v, mask=mask, is_causal=is_causal, local_window_size=window,
            query_seq_lengths=q_len, key_value_seq_lengths=kv_len,
        )  # fmt: skip

    def loss(q, k, v, mask, q_len, kv_len, keep, w):
        o = out(q, k, v, mask, q_len, kv_len)
        return jnp.sum(jnp.where(keep, o, 0.0) * w)

    grad = jax.grad(loss, argnums=(0, 1, 2))
    return jax.jit(out), jax.jit(grad)


def _visible(mask, q_len, kv_len, is_causal, window):
    """[B, N, T, S] pairs the call shows, from NumPy."""
    vis = mask & ref.structural_mask(T, S, is_causal=is_causal, window=window)[None, None]
    vis = vis & (np.arange(T)[:, None] < q_len[:, None, None, None])
    return vis & (np.arange(S)[None, :] < kv_len[:, None, None, None])


@st.composite
def cases(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    q, k, v = (
        rng.standard_normal(shape).astype(np.float32)
        for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H))
    )
    mask = rng.random((B, N, T, S)) < draw(st.sampled_from([0.5, 0.8, 1.0]))
    q_len = rng.integers(0, T + 1, B).astype(np.int32)
    kv_len = rng.integers(0, S + 1, B).astype(np.int32)
    bad = {"q": np.zeros((B, T, N), bool), "k": np.zeros((B, S, K), bool)}
    bad["v"] = np.zeros((B, S, K), bool)
    values = [np.nan, np.inf, -np.inf]
    for name, x in (("q", q), ("k", k), ("v", v)):
        for _ in range(draw(st.integers(0, 3))):
            idx = tuple(int(rng.integers(0, d)) for d in x.shape[:-1])
            x[idx + (int(rng.integers(0, H)),)] = values[int(rng.integers(0, 3))]
            bad[name][idx] = True
    pattern = draw(st.sampled_from(PATTERNS))
    path = draw(st.sampled_from(sorted(PATHS)))
    return path, pattern, q, k, v, mask, q_len, kv_len, bad


@SETTINGS
@given(cases())
def test_non_finite_inputs_reach_only_the_rows_that_see_them(case):
    path, (is_causal, window), q, k, v, mask, q_len, kv_len, bad = case
    out_fn, grad_fn = _compiled(path, is_causal, window)
    vis = _visible(mask, q_len, kv_len, is_causal, window)  # [B, N, T, S]
    bad_kv = np.repeat(bad["k"] | bad["v"], G, axis=2).transpose(0, 2, 1)  # [B, N, S]
    sees_bad = np.any(vis & bad_kv[:, :, None, :], axis=-1)  # [B, N, T]
    sees_bad |= bad["q"].transpose(0, 2, 1) & np.any(vis, axis=-1)
    nan_rows = sees_bad.transpose(0, 2, 1)  # [B, T, N]

    def clean(x, flags):
        return np.where(flags[..., None], np.float32(0.0), x)

    clean_args = (clean(q, bad["q"]), clean(k, bad["k"] | bad["v"]), clean(v, bad["k"] | bad["v"]))
    args = (mask, q_len, kv_len)
    out = np.asarray(out_fn(q, k, v, *args))
    ref_out = np.asarray(out_fn(*clean_args, *args))
    assert np.isfinite(ref_out).all()
    assert np.isnan(out[nan_rows]).all(), path
    np.testing.assert_array_equal(out[~nan_rows], ref_out[~nan_rows])

    # A loss that leaves the NaN rows out (a causal decoder's padding at the end, say)
    # has the clean run's gradients: the NaN rows' weights were NaN, and their zero
    # cotangent made NaN the gradients of every key they see (0 * NaN)
    keep = np.broadcast_to(~nan_rows[..., None], out.shape)
    w = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32)
    grads = grad_fn(q, k, v, *args, keep, w)
    ref_grads = grad_fn(*clean_args, *args, keep, w)
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        g = np.asarray(g)
        assert np.isfinite(g).all(), (path, name)
        np.testing.assert_allclose(g, np.asarray(rg), rtol=1e-5, atol=1e-6)
        flags = bad["q"] if name == "q" else bad["k"] | bad["v"]
        assert (g[flags] == 0).all(), (path, name)


def test_layer_padding_does_not_leak():
    """The layer's padding mask hides uninitialised
    (NaN) padding from the outputs and the gradients."""
    from flax import nnx

    layer = jattn.layers.MultiHeadAttention(num_heads=2, in_features=8, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((2, 6, 8)).astype(np.float32)
    x_bad = x.copy()
    x_bad[0, 4:] = np.nan
    valid = np.arange(6)[None, :] < np.array([4, 6])[:, None]
    mask = jattn.functional.masks.key_padding_mask(jnp.asarray(valid))
    # the padded key positions hold NaN; the real queries see only real keys
    kv = jnp.asarray(x_bad)
    got = np.asarray(layer(x, kv, mask=mask))
    np.testing.assert_allclose(got, np.asarray(layer(x, jnp.asarray(x), mask=mask)), atol=1e-6)
    assert np.isfinite(got).all()
    grad = jax.grad(lambda kv: jnp.sum(layer(x, kv, mask=mask) ** 2))(kv)
    assert np.isfinite(np.asarray(grad)).all()
    assert (np.asarray(grad)[0, 4:] == 0).all()


@pytest.mark.parametrize("path", ["dense", "blocked", "default"])
def test_no_inf_is_made_under_debug_infs(path):
    """jax.nn stays quiet under jax.debug_infs; so do masked and causal calls here,
    op by op, forward and backward (the -inf fill used to raise)."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 6, 2, 4)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 5, 2, 4)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 2, 6, 5)) < 0.5)
    fn = {"dense": attention, "default": jattn.dot_product_attention}.get(
        path, functools.partial(blocked_attention, block_sizes=(4, 2))
    )
    # op by op (an eager call of an attention function is otherwise one compiled
    # program, jattn.functional._eager, and jax.debug_infs then sees its outputs only)
    with jax.debug_infs(True), jax.disable_jit():
        for opts in (dict(is_causal=True), dict(mask=mask), dict(key_value_seq_lengths=[2, 0])):
            fn(q, k, k, **opts)
            jax.grad(lambda q, opts=opts: jnp.sum(fn(q, k, k, **opts) ** 2))(q)


@pytest.mark.parametrize("scale", [1e4, 1e10, 1e15, 1e30])
def test_blocked_equals_float64_at_extreme_logits(scale):
    """Finite logits up to about 1e30: the blocked path gives the float64 result (the
    dense path did; the blocked path gave NaN or zero rows from about 1e10)."""
    rng = np.random.default_rng(0)
    amp = np.float32(np.sqrt(scale))
    q = (rng.standard_normal((1, 24, 2, 8)) * amp).astype(np.float32)
    k = (rng.standard_normal((1, 24, 2, 8)) * amp).astype(np.float32)
    v = rng.standard_normal((1, 24, 2, 8)).astype(np.float32)
    want = ref.attention(q, k, v, is_causal=True)[0]
    for fn in (attention, functools.partial(blocked_attention, block_sizes=(8, 8))):
        got = np.asarray(fn(q, k, v, is_causal=True))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        grads = jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v, is_causal=True)), (0, 1, 2))(
            q, k, v
        )
        assert all(np.isfinite(np.asarray(g)).all() for g in grads)


LINEAR = {
    "linear parallel": lambda q, k, v, seg: jattn.linear_attention(
        q, k, v, is_causal=True, segment_ids=seg, implementation="parallel"),
    "linear chunked": lambda q, k, v, seg: jattn.linear_attention(
        q, k, v, is_causal=True, segment_ids=seg, chunk_size=3, implementation="chunked"),
    "linear recurrent": lambda q, k, v, seg: jattn.linear_attention(
        q, k, v, is_causal=True, segment_ids=seg, implementation="recurrent"),
    "linear non-causal": lambda q, k, v, seg: jattn.linear_attention(q, k, v, segment_ids=seg),
    "retention": lambda q, k, v, seg: jattn.retention(
        q, k, v, jattn.retnet_decays(2), segment_ids=seg),
    "gla": lambda q, k, v, seg: jattn.gated_linear_attention(
        q, k, v, jnp.full(q.shape, -0.1), segment_ids=seg),
    "performer": lambda q, k, v, seg: jattn.performer_attention(
        q, k, v, PERFORMER_FEATURES, is_causal=True, segment_ids=seg),
}  # fmt: skip
PERFORMER_FEATURES = jattn.orthogonal_random_features(jax.random.key(0), 16, 4)


@functools.cache
def _linear_grads(name):
    def loss(q, k, v, seg, keep, w):
        return jnp.sum(jnp.where(keep, LINEAR[name](q, k, v, seg), 0.0) * w)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


@settings(max_examples=24, deadline=None)
@given(
    name=st.sampled_from(sorted(LINEAR)),
    which=st.sampled_from([0, 1, 2]),
    pos=st.integers(1, 7),
    split=st.integers(1, 7),
    fill=st.sampled_from([np.nan, np.inf, -np.inf]),
    seed=st.integers(0, 2**31 - 1),
)
def test_linear_attention_hidden_non_finite_inputs_reach_no_row(
    name, which, pos, split, fill, seed
):
    """A NaN/inf at a future position or in another segment reached earlier rows (the
    parallel and chunked forms; every row for the performer, whose keys shared one
    stabiliser) and every gradient (0 * NaN); now it reaches exactly the
    rows that see it, and nothing else: the other rows and their gradients are the clean
    run's."""
    causal = name != "linear non-causal"
    rng = np.random.default_rng(seed)
    qkv = [rng.standard_normal((1, 8, 2, 4)).astype(np.float32) for _ in range(3)]
    seg = jnp.asarray((np.arange(8) >= split).astype(np.int32)[None])  # two segments
    bad = [x.copy() for x in qkv]
    bad[which][0, pos, 0, 1] = fill
    t = np.arange(8)
    same = (t >= split) == (pos >= split)  # rows in the bad position's segment
    sees = same & ((t >= pos) if causal else True)
    if which == 0:
        sees = t == pos  # a bad query spoils its own row only
    out = np.asarray(LINEAR[name](*bad, seg))
    want = np.asarray(LINEAR[name](*qkv, seg))
    np.testing.assert_allclose(out[0, ~sees], want[0, ~sees], rtol=1e-5, atol=1e-6)
    assert np.isnan(out[0, sees, 0]).all()
    keep = jnp.asarray(np.broadcast_to(~sees[None, :, None, None], (1, 8, 2, 4)))
    w = jnp.asarray(rng.standard_normal((1, 8, 2, 4)), jnp.float32)
    grads = _linear_grads(name)(*bad, seg, keep, w)
    clean = _linear_grads(name)(*qkv, seg, keep, w)
    for i, (g, c) in enumerate(zip(grads, clean, strict=True)):
        g, c = np.array(g), np.array(c)  # writable copies
        assert np.isfinite(g).all()
        if i == which:  # exactly zero at the bad vector
            assert (g[0, pos, 0] == 0).all()
            g[0, pos, 0], c[0, pos, 0] = 0, 0
        np.testing.assert_allclose(g, c, rtol=1e-5, atol=1e-6)


@settings(max_examples=10, deadline=None)
@given(
    form=st.sampled_from(["parallel", "chunked", "recurrent"]),
    cut=st.integers(2, 6),
    scale=st.sampled_from([1.0, 10.0, 16.0]),
    large_first=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_performer_rows_see_only_their_keys_scale(form, cut, scale, large_first, seed):
    """The performer's keys were stabilised by one max over the whole sequence: keys of
    a large norm (logits far below a typical key's) had their features underflow to 0
    when a typical key came later (causal) or sat in another segment, and their rows
    read 0/eps (errors as large as the outputs). Now each row's keys are stabilised by
    the max over the keys it sees: a causal row equals its prefix's, and a segment's
    rows equal that segment's alone, at any key scale."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, 8, 2, 4)).astype(np.float32) for _ in range(3))
    k[:, :cut] *= scale if large_first else 1.0
    k[:, cut:] *= 1.0 if large_first else scale
    w = PERFORMER_FEATURES
    opts = dict(implementation=form, chunk_size=3)
    full = np.asarray(jattn.performer_attention(q, k, v, w, is_causal=True, **opts))
    pre = np.asarray(jattn.performer_attention(q[:, :cut], k[:, :cut], v[:, :cut], w,
                                               is_causal=True, **opts))  # fmt: skip
    assert np.isfinite(pre).all() and np.abs(pre).max() > 0.1
    np.testing.assert_allclose(full[:, :cut], pre, rtol=1e-5, atol=1e-6)
    seg = jnp.asarray((np.arange(8) >= cut).astype(np.int32)[None])
    parts = (slice(0, cut), slice(cut, 8))
    for causal in (False, True):
        got = np.asarray(jattn.performer_attention(q, k, v, w, is_causal=causal,
                                                   segment_ids=seg, **opts))  # fmt: skip
        for p in parts:
            alone = jattn.performer_attention(q[:, p], k[:, p], v[:, p], w, is_causal=causal,
                                              **opts)  # fmt: skip
            np.testing.assert_allclose(got[:, p], np.asarray(alone), rtol=1e-5, atol=1e-6)


@functools.cache
def _gla_grads(form):
    def loss(q, k, v, log_gates, seg, keep):
        out = jattn.gated_linear_attention(q, k, v, log_gates, segment_ids=seg,
                                           implementation=form, chunk_size=3)  # fmt: skip
        return jnp.sum(jnp.where(keep, out, 0.0) ** 2), out

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


@settings(max_examples=10, deadline=None)
@given(
    form=st.sampled_from(["parallel", "chunked", "recurrent"]),
    pos=st.integers(1, 7),
    split=st.integers(1, 7),
    fill=st.sampled_from([np.nan, np.inf]),
    seed=st.integers(0, 2**31 - 1),
)
def test_a_bad_gate_reaches_only_the_rows_that_see_it(form, pos, split, fill, seed):
    """A NaN (or +inf) log gate reached the gradients of every earlier row (0 * NaN in
    the decays' prefix sums); now only the rows of its segment from it on are NaN, and
    the other rows and every gradient equal a clean run's."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, 8, 2, 4)).astype(np.float32) for _ in range(3))
    gates = -np.abs(rng.standard_normal((1, 8, 2, 4))).astype(np.float32)
    bad = gates.copy()
    bad[0, pos, 0, 1] = fill
    t = np.arange(8)
    sees = ((t >= split) == (pos >= split)) & (t >= pos)
    seg = jnp.asarray((t >= split).astype(np.int32)[None])
    keep = jnp.asarray(~sees[None, :, None, None])
    grads, out = _gla_grads(form)(q, k, v, bad, seg, keep)
    want_grads, want = _gla_grads(form)(q, k, v, gates, seg, keep)
    np.testing.assert_allclose(out[0, ~sees], want[0, ~sees], rtol=1e-5, atol=1e-6)
    assert np.isnan(np.asarray(out)[0, sees, 0]).all()
    assert not np.isnan(np.asarray(out)[0, :, 1]).any()  # the other head
    for g, c in zip(grads, want_grads, strict=True):
        assert np.isfinite(np.asarray(g)).all()
        # the hidden gate changes the decays' prefix sums after it (not their differences
        # the visible rows read): rounding relative to the gradient's scale
        np.testing.assert_allclose(g, c, rtol=1e-5, atol=1e-6 * (1 + np.abs(c).max()))


@pytest.mark.parametrize("start", [10, 40])
def test_blocked_rows_far_past_a_nan_key_are_nan(start):
    """In one 64-wide tile the blocked path gave 0, not NaN, to the rows 16 or more
    keys past a NaN key (XLA's vectorised max on CPU does not keep a NaN), and a loss
    without those rows got NaN gradients. The rows that see a bad key are now flagged
    apart from the logits: NaN exactly where dense is, and the gradients of a loss
    without them are dense's."""
    rng = np.random.default_rng(start)
    q = jnp.asarray(rng.standard_normal((1, 64, 2, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, 64, 2, 8)), jnp.float32).at[:, start:].set(
        jnp.nan) for _ in range(2))  # fmt: skip
    keep = jnp.asarray((np.arange(64) < start)[None, :, None, None])
    fns = {"blocked": functools.partial(blocked_attention, block_sizes=(64, 64)),
           "dense": attention}  # fmt: skip
    outs, grads = {}, {}
    for name, fn in fns.items():
        outs[name] = np.asarray(fn(q, k, v, is_causal=True))

        def loss(q, k, v, fn=fn):
            return jnp.sum(jnp.where(keep, fn(q, k, v, is_causal=True), 0.0))

        grads[name] = jax.grad(loss, (0, 1, 2))(q, k, v)
    rows = np.isnan(outs["blocked"]).any(-1)
    np.testing.assert_array_equal(rows, np.broadcast_to(~np.asarray(keep)[..., 0], rows.shape))
    np.testing.assert_allclose(outs["blocked"], outs["dense"], rtol=1e-5, atol=1e-6)
    for got, want in zip(grads["blocked"], grads["dense"], strict=True):
        assert np.isfinite(np.asarray(got)).all()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_single_head_attention_with_no_flags_is_as_without():
    """``nonfinite=(None, None)`` (either flag may be None) was a TypeError."""
    from jattn.functional.dense import single_head_attention

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((3, 4)), jnp.float32) for _ in range(3))
    mask = jnp.tril(jnp.ones((3, 3), bool))
    want = single_head_attention(q, k, v, None, mask)
    got = single_head_attention(q, k, v, None, mask, nonfinite=(None, None))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


@functools.cache
def _flax_fn_grads(broadcast_dropout):
    def loss(q, k, v, mask):
        out = jattn.flax_attention_fn(
            q, k, v, mask=mask, dropout_rng=jax.random.key(0), dropout_rate=0.3,
            broadcast_dropout=broadcast_dropout, deterministic=False,
        )  # fmt: skip
        return jnp.sum(jnp.sin(out)), out

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    lengths=st.lists(st.integers(1, 4), min_size=2, max_size=2),
    fill=st.sampled_from([np.nan, np.inf, -np.inf]),
    broadcast_dropout=st.booleans(),
)
def test_flax_attention_fn_dropout_hides_masked_values(seed, lengths, fill, broadcast_dropout):
    """Flax's default broadcast dropout recomputed the output from the raw values: a NaN
    value at a masked key made every output and dq, dk NaN (0 * NaN)."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((2, 4, 2, 4)), jnp.float32)
    k, v = (rng.standard_normal((2, 5, 2, 4)).astype(np.float32) for _ in range(2))
    real = np.arange(5)[None, :] < np.array(lengths)[:, None]  # [B, S]
    mask = jnp.asarray(np.broadcast_to(real[:, None, None, :], (2, 1, 4, 5)))
    bad_k, bad_v = k.copy(), v.copy()
    bad_k[~real], bad_v[~real] = fill, fill
    grads, out = _flax_fn_grads(broadcast_dropout)(q, bad_k, bad_v, mask)
    want_grads, want = _flax_fn_grads(broadcast_dropout)(q, k, v, mask)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    for g, w in zip(grads, want_grads, strict=True):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    for g in grads[1:]:  # exactly zero at the masked keys and values
        assert (np.asarray(g)[~real] == 0).all()


@functools.cache
def _f16_grads(path):
    def loss(q, k, v):
        return jnp.sum(PATHS[path](q, k, v, mask=None, is_causal=True).astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


@settings(max_examples=16, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    offset=st.floats(4200.0, 8000.0),  # 16 of them sum past float16's 65504
    sign=st.sampled_from([1.0, -1.0]),
    path=st.sampled_from(["dense", "in-layout", "default", "blocked"]),
    dtype=st.sampled_from(["float16", "bfloat16"]),
)
def test_low_precision_gradients_are_finite_and_right(seed, offset, sign, path, dtype):
    """float16 values near 5000 (16 of them sum past 65504): the weights' derivative,
    computed in float16 as in jax.nn, overflowed to inf and the softmax's backward made
    every dq and dk NaN from finite inputs. Now it is float32: the float32 gradient of the
    same (float16) numbers, to float16's precision. The blocked path's dq and dk were
    10-100% off (bfloat16 too): its output came from weights rounded to the values'
    dtype, its backward from float32 weights, and ds takes the difference of the two."""
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(3 * rng.standard_normal((2, 8, 2, 16)), dtype) for _ in range(2))
    v = jnp.asarray(sign * offset + 10 * rng.standard_normal((2, 8, 2, 16)), dtype)
    grads = _f16_grads(path)(q, k, v)
    want = _f16_grads(path)(*(x.astype(jnp.float32) for x in (q, k, v)))
    for got, expected in zip(grads, want, strict=True):
        got, expected = np.asarray(got, np.float32), np.asarray(expected)
        assert np.isfinite(got).all()
        tol = 1e-2 if dtype == "float16" else 4e-2  # 8 bits of mantissa
        np.testing.assert_allclose(got, expected, atol=tol * np.abs(expected).max(), rtol=0)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.sampled_from(["boxcar", "gaussian", "parametric"]))
def test_nadaraya_watson_hidden_points_reach_nothing(seed, kernel):
    """Training points hidden by the mask or (values) outside the kernel's support hold
    NaN/inf: the rows that do not see them equal a clean run, with finite gradients;
    the rows that do are NaN (a NaN key has no distance: only the mask hides it)."""
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(0, 5, 12)).astype(np.float32)
    y = rng.standard_normal((12, 2)).astype(np.float32)
    xq = rng.uniform(0, 5, 6).astype(np.float32)
    mask = rng.random((6, 12)) < 0.6
    bad = rng.random(12) < 0.25
    x_bad, y_bad = x.copy(), y.copy()
    y_bad[bad, int(rng.integers(0, 2))] = rng.choice([np.nan, np.inf])
    bad_x = bad & (rng.random(12) < 0.5)
    x_bad[bad_x] = np.nan

    def run(x, y):
        if kernel == "parametric":
            return jattn.functional.parametric_nadaraya_watson(xq, x, y, 1.3, mask=mask)[0]
        return jattn.functional.nadaraya_watson(xq, x, y, kernel=kernel, width=0.8, mask=mask)[0]

    seen = np.broadcast_to(bad, mask.shape).copy()
    if kernel == "boxcar":  # the support hides |q - k| >= width, where k is known
        seen &= bad_x[None, :] | (np.abs(xq[:, None] - x[None, :]) < 0.8)
    seen &= mask
    rows = seen.any(axis=1)
    clean = np.asarray(run(x, np.where(bad[:, None], 0.0, y).astype(np.float32)))
    got = np.asarray(run(x_bad, y_bad))
    assert np.isnan(got[rows]).all()
    np.testing.assert_array_equal(got[~rows], clean[~rows])
    if not rows.any():
        g = jax.grad(lambda y: jnp.sum(run(x_bad, y) ** 2))(jnp.asarray(y_bad))
        assert np.isfinite(np.asarray(g)).all() and (np.asarray(g)[bad] == 0).all()


def _np_decayed(q, k, v, log_a):
    """float64 ``o_t = q_t S_t``, ``S_t = diag(exp(log_a_t)) S_{t-1} + k_t^T v_t`` for
    one example and head: ``q, k [T, F]``, ``v [T, Hv]``, ``log_a [T, F|1]``."""
    s, out = np.zeros((q.shape[1], v.shape[1])), []
    for t in range(q.shape[0]):
        s = np.exp(log_a[t].astype(np.float64))[:, None] * s + np.outer(k[t], v[t])
        out.append(q[t] @ s)
    return np.stack(out)


_LINEAR_FORMS = {
    form: jax.jit(
        lambda q, k, v, g, d, form=form: (
            jattn.gated_linear_attention(q, k, v, g, implementation=form, chunk_size=4),
            jattn.retention(q, k, v, d, implementation=form, chunk_size=4),
        )
    )
    for form in ("chunked", "parallel", "recurrent")
}


@settings(max_examples=15, deadline=None)
@given(
    where=st.integers(0, 9),
    gate=st.sampled_from([-1e3, -1e6, -1e12, -1e30, -3e38, -np.inf]),
    decay=st.sampled_from([1e-45, 1e-40, 1e-38, 1.2e-38, 1e-30, 0.5]),
)
def test_decays_near_zero_give_the_recurrence_in_every_form(where, gate, decay):
    """Were wrong or NaN in the chunked and parallel forms: a gate of exp(-1e6) made the
    prefix sums of the log gates -1e6, whose differences lose the other gates' -0.05
    (0.23 off at -1e6, 1.07 at -1e8); a gate of 0 (-inf) and a retention decay that
    float32 flushes to 0 (1e-38) made them NaN (-inf - -inf). Each form now equals a
    float64 recurrence, finite, with finite gradients."""
    rng = np.random.default_rng(where)
    q, k, v = (rng.standard_normal((1, 10, 1, 4)).astype(np.float32) for _ in range(3))
    gates = np.full((1, 10, 1, 4), -0.05, np.float32)
    gates[0, where, 0, ::2] = gate
    decays = np.array([decay], np.float32)
    want_gla = _np_decayed(q[0, :, 0], k[0, :, 0], v[0, :, 0], gates[0, :, 0])
    want_ret = _np_decayed(
        q[0, :, 0], k[0, :, 0], v[0, :, 0], np.log(np.full((10, 1), decays[0], np.float64))
    )
    for form, fn in _LINEAR_FORMS.items():
        gla, ret = fn(q, k, v, gates, decays)
        np.testing.assert_allclose(gla[0, :, 0], want_gla, rtol=1e-4, atol=1e-4, err_msg=form)
        np.testing.assert_allclose(ret[0, :, 0], want_ret, rtol=1e-4, atol=1e-4, err_msg=form)
    grads = jax.grad(
        lambda q, k, v: sum(jnp.sum(x) for x in _LINEAR_FORMS["chunked"](q, k, v, gates, decays)),
        argnums=(0, 1, 2),
    )(q, k, v)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)


def test_positive_log_gates_are_an_error():
    q = jnp.ones((1, 4, 1, 2))
    with pytest.raises(ValueError, match=r"log_gates must be <= 0 .* maximum of 5.0"):
        jattn.gated_linear_attention(q, q, q, jnp.zeros((1, 4, 1, 2)).at[0, 2, 0, 1].set(5.0))
