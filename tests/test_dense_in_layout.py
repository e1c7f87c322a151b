"""The dense path with its products in the keys' own layout (few queries, many keys, CPU).

``_dense_in_layout`` must give the per-head dense path's results (itself tested against
NumPy float64 and jax.nn in test_attention.py) for every feature, gradients included;
the default path must use it exactly where ``dispatch.dense_in_layout`` says.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest

import jattn
from jattn.functional import _checks, _finite, dispatch
from jattn.functional.dense import _dense_in_layout, attention
from jattn.functional.scores import scaled_dot_product_scores

# the module (``jattn.functional.attention`` is also the function's name there)
attention_module = importlib.import_module("jattn.functional.dense")

OPTIONS = dict(
    scale=None,
    is_causal=False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size=None,
    dropout_rate=0.0,
    dropout_rng=None,
    fully_masked="zeros",
)


def _in_layout(
    q, k, v, bias, mask, *, return_weights, return_residual, forward_mode=False, **options
):
    """``_dense_in_layout`` on raw inputs, checked as ``dot_product_attention`` checks them;
    by default as the automatic choice runs it (its guard a custom VJP)."""
    spec = _checks.check_attention_inputs(
        q, k, v, bias, mask, same_head_dim=True, **options, return_residual=return_residual
    )
    out, weights, lse = _dense_in_layout(
        spec, return_weights=return_weights, forward_mode=forward_mode
    )
    extras = [x for x in (weights, lse) if x is not None]
    return (out, *extras) if extras else out


def _normal(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@functools.partial(jax.jit, static_argnames=("fn", "static"))
def _outputs_and_grads(q, k, v, bias, mask, arrays, cot, *, fn, static):
    """Output, weights, lse and the gradients w.r.t. q, k, v (and bias) of one path."""
    options = {**OPTIONS, **dict(static), **arrays}

    def loss(q, k, v, bias):
        if fn == "per_head":
            scale = options.pop("scale")
            result = attention(
                q, k, v, bias, mask,
                score_fn=functools.partial(scaled_dot_product_scores, scale=scale),
                **options, return_weights=True, return_residual=True,
            )  # fmt: skip
        else:
            result = _in_layout(
                q, k, v, bias, mask, **options, return_weights=True, return_residual=True,
                forward_mode=fn == "in_layout_jvp",
            )  # fmt: skip
        return jnp.sum(result[0].astype(jnp.float32) * cot), result

    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    (_, result), grads = jax.value_and_grad(loss, argnums, has_aux=True)(q, k, v, bias)
    return result, grads


# (batch, T, S, N, K, H, Hv, bias shape, mask shape, static options, lengths, dropout)
CASES = {
    "plain": ((2,), 1, 7, 4, 4, 4, 4, None, None, {}, False, 0.0),
    "gqa_bias_mask": ((2,), 2, 9, 4, 2, 4, 5, "full", (2, 1, 2, 9), {}, False, 0.0),
    "mqa_causal_window": ((1,), 3, 8, 3, 1, 4, 4, None, None,
                          dict(is_causal=True, local_window_size=(1, 2)), False, 0.0),
    "lengths_uniform": ((3,), 2, 6, 4, 2, 4, 3, (1, 2, 6), None,
                        dict(fully_masked="uniform"), True, 0.0),
    "lengths_zeros_mask": ((3,), 2, 6, 2, 2, 4, 4, None, (3, 2, 2, 6), {}, True, 0.0),
    "dropout_scale": ((2,), 2, 5, 4, 2, 4, 4, (4, 1, 5), None, dict(scale=0.3), False, 0.4),
    "no_batch": ((), 1, 9, 6, 3, 4, 2, (6, 1, 1), (1, 9), dict(is_causal=True), False, 0.0),
    "two_batch_dims": ((2, 3), 2, 5, 4, 4, 4, 4, None, (2, 1, 1, 2, 5), {}, False, 0.2),
}  # fmt: skip


# the guard as the automatic choice runs it (a custom VJP) on every case, and as
# implementation='dense' does (a custom JVP differentiating the hiding branch) on the
# cases with a bias, a mask, lengths, dropout or two batch dims
JVP_CASES = ("gqa_bias_mask", "lengths_uniform", "dropout_scale", "two_batch_dims")


@pytest.mark.parametrize(
    "name, form",
    [(name, "in_layout") for name in CASES] + [(name, "in_layout_jvp") for name in JVP_CASES],
)
def test_equals_the_per_head_dense_path(name, form):
    batch, t, s, n, k, h, hv, bias_shape, mask_shape, static, lengths, rate = CASES[name]
    q, key, v = (
        _normal(0, batch + (t, n, h)),
        _normal(1, batch + (s, k, h)),
        _normal(2, batch + (s, k, hv)),
    )
    bias = None
    if bias_shape is not None:
        bias = _normal(3, batch + (n, t, s) if bias_shape == "full" else bias_shape)
    mask = None
    if mask_shape is not None:
        mask = jnp.asarray(np.random.default_rng(4).random(mask_shape) < 0.6)
    arrays = {}
    if lengths:
        arrays["query_seq_lengths"] = jnp.asarray([t, 1, 0][: batch[0]])
        arrays["key_value_seq_lengths"] = jnp.asarray([s, 0, 2][: batch[0]])
    if rate:
        arrays["dropout_rng"] = jax.random.PRNGKey(5)
    static = tuple(sorted({**static, "dropout_rate": rate}.items()))
    cot = _normal(6, batch + (t, n, hv))
    want, want_grads = _outputs_and_grads(
        q, key, v, bias, mask, arrays, cot, fn="per_head", static=static
    )
    got, got_grads = _outputs_and_grads(q, key, v, bias, mask, arrays, cot, fn=form, static=static)
    for what, a, b in zip(("output", "weights", "lse"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, what
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=what)
    for what, a, b in zip("qkvb"[: len(want_grads)], got_grads, want_grads, strict=True):
        assert np.all(np.isfinite(a)), what
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=f"d{what}")


def test_matches_numpy_float64():
    q, k, v = _normal(0, (2, 3, 4, 8)), _normal(1, (2, 11, 2, 8)), _normal(2, (2, 11, 2, 6))
    bias = _normal(3, (2, 4, 3, 11))
    mask = jnp.asarray(np.random.default_rng(4).random((2, 1, 3, 11)) < 0.7)
    q_len, kv_len = np.array([3, 2]), np.array([9, 11])
    options = dict(OPTIONS, is_causal=True, local_window_size=(2, 1))
    options.update(query_seq_lengths=q_len, key_value_seq_lengths=kv_len)
    out, weights, lse = _in_layout(
        q, k, v, bias, mask, **options, return_weights=True, return_residual=True
    )
    want = ref.attention(
        np.asarray(q), np.asarray(k), np.asarray(v), np.asarray(bias), np.asarray(mask),
        is_causal=True, window=(2, 1), q_len=q_len, kv_len=kv_len,
    )  # fmt: skip
    for what, a, b in zip(("output", "weights", "lse"), (out, weights, lse), want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=what)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision(dtype):
    q, k, v = (
        _normal(0, (2, 2, 4, 8), dtype),
        _normal(1, (2, 9, 2, 8), dtype),
        _normal(2, (2, 9, 2, 8), dtype),
    )
    got = _in_layout(q, k, v, None, None, **OPTIONS, return_weights=False,
                           return_residual=False)  # fmt: skip
    want = attention(q, k, v)
    assert got.dtype == dtype
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), atol=4 * jnp.finfo(dtype).eps
    )


def test_selection_rule(monkeypatch):
    def spec(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.float32)

    def rule(t, s, n, k, b=2):
        return dispatch.dense_in_layout(spec(b, t, n, 64), spec(b, s, k, 64))

    assert rule(1, 1024, 8, 8) and rule(8, 65536, 8, 8)  # T * N = 64 query rows x heads
    assert not rule(1, 1023, 8, 8)  # too few keys to matter
    assert not rule(1, 4096, 8, 8, b=1)  # B = 1: XLA copies an in-place cache (see dispatch)
    assert not rule(9, 4096, 8, 8)  # T * G > 8
    assert rule(4, 4096, 16, 16) and not rule(8, 4096, 16, 16)  # T * N > 64
    assert rule(1, 4096, 8, 1) and not rule(2, 4096, 8, 1)  # MQA: T * G = 16
    # decoding against a long cache stays dense (its scores are [B, N, 1, S]), not blocked
    step, cache = spec(2, 1, 8, 64), spec(2, 131072, 8, 64)
    assert dispatch.select(None, step, cache, cache) == "dense"
    chunk, cache = spec(2, 16, 8, 64), spec(2, 65536, 8, 64)
    assert dispatch.select(None, chunk, cache, cache) == "blocked"
    monkeypatch.setattr(dispatch, "_platform", lambda: "gpu")
    assert not rule(1, 4096, 8, 8)  # measured on CPU only: GPUs transpose cheaply


def test_default_path_uses_it_and_matches_jax_nn(monkeypatch):
    calls = []
    real = attention_module._dense_in_layout

    def spy(*args, **kwargs):
        calls.append(args[0].query.shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_module, "_dense_in_layout", spy)
    q, k, v = _normal(0, (2, 1, 4, 8)), _normal(1, (2, 1024, 2, 8)), _normal(2, (2, 1024, 2, 8))
    kv_len = jnp.asarray([1024, 300], jnp.int32)  # jax.nn wants int32 (also under x64)

    def loss(fn, q, k, v):
        out = fn(q, k, v, key_value_seq_lengths=kv_len)
        return jnp.sum(out * jnp.arange(8.0).reshape(1, 1, 1, 8)), out

    (_, out), grads = jax.value_and_grad(
        functools.partial(loss, jattn.dot_product_attention), (0, 1, 2), has_aux=True
    )(q, k, v)
    assert calls == [(2, 1, 4, 8)]
    (_, want), want_grads = jax.value_and_grad(
        functools.partial(loss, jax.nn.dot_product_attention), (0, 1, 2), has_aux=True
    )(q, k, v)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # T * G = 16 query rows per key/value head: the per-head products
    jattn.dot_product_attention(_normal(0, (2, 8, 4, 8)), k, v)
    assert len(calls) == 1


def test_masked_non_finite_keys_stay_out():
    """A non-finite key meets the other heads' zeros in the logits product (documented),
    but a position masked for every head (a cache's unwritten tail) never reaches the
    output."""
    q, k, v = _normal(0, (1, 1, 4, 8)), _normal(1, (1, 12, 4, 8)), _normal(2, (1, 12, 4, 8))
    k = k.at[:, 9:].set(jnp.nan).at[:, 8, 0].set(jnp.inf)
    v = v.at[:, 9:].set(0.0)
    options = dict(OPTIONS, key_value_seq_lengths=jnp.asarray([8]))
    out = _in_layout(q, k, v, None, None, **options, return_weights=False, return_residual=False)
    want = attention(q[:, :, :], k[:, :8], v[:, :8])
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("forward_mode", [False, True])
def test_hidden_non_finite_inputs_found_from_the_results(forward_mode, monkeypatch):
    """The in-layout path decides whether to hide non-finite vectors from its own logits
    and output (``_finite.guarded_by_result``), not from a pass over the cache: a NaN or
    inf only in a cache's hidden tail (keys: the logits, values: the output) or in a
    padded query row still reaches nothing. The output, the gradients (also under
    ``jax.vmap``) and the Hessian-vector products (forward over reverse) equal the
    per-head path's on clean inputs, with the guard as the automatic choice runs it (a
    custom VJP) and as ``implementation='dense'`` does (a custom JVP), and so do forward
    mode and reverse over reverse through the custom JVP (the custom VJP: the latter on
    finite inputs). The hiding branch reads the cache in chunks
    (``_finite.map_chunks``, ``sum_chunks``), here 5 positions of the 12 for the logits
    and 10 for the output, so the last chunk overlaps the one before it. Each program is
    compiled once and run on the key, value and query cases."""
    monkeypatch.setattr(_finite, "CHUNK_BYTES", 5 * 2 * (2 * 2 * 8 * 4))  # 5 (key, value) rows
    q, k, v = _normal(0, (2, 1, 4, 8)), _normal(1, (2, 12, 2, 8)), _normal(2, (2, 12, 2, 8))
    lengths = jnp.asarray([11, 5])  # position 10, visible, only in the last logits chunk
    q_len = jnp.asarray([1, 0])  # example 1 has no real query
    options = dict(OPTIONS, key_value_seq_lengths=lengths, query_seq_lengths=q_len)

    def run(q, k, v):
        return _in_layout(q, k, v, None, None, **options, return_weights=False,
                          return_residual=False, forward_mode=forward_mode)  # fmt: skip

    def want(q, k, v):
        return attention(q, k, v, key_value_seq_lengths=lengths, query_seq_lengths=q_len)

    def close(got, want, rtol, atol):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert np.isfinite(a).all()
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)

    def squares_grad(fn):
        return jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), (0, 1, 2))

    w = _normal(3, (2, 1, 4, 8))
    tangents = (_normal(4, q.shape), _normal(5, k.shape), _normal(6, v.shape))
    # under jax.vmap the guard's predicate is batched (its lax.cond runs as a select)
    vmapped = jax.vmap(run)
    programs = dict(
        out=jax.jit(run),
        grads=jax.jit(jax.grad(lambda *a: jnp.sum(run(*a) * w), (0, 1, 2))),
        vmapped=jax.jit(
            jax.grad(lambda *a: jnp.sum(vmapped(*(x[None] for x in a))[0] * w), (0, 1, 2))
        ),
        # forward over reverse
        hvp=jax.jit(lambda *a: jax.jvp(squares_grad(run), a, tangents)[1]),
    )
    want_out = want(q, k, v)
    want_grads = jax.grad(lambda *a: jnp.sum(want(*a) * w), (0, 1, 2))(q, k, v)
    want_hvp = jax.jit(lambda *a: jax.jvp(squares_grad(want), a, tangents)[1])(q, k, v)
    if forward_mode:
        want_jvp = jax.jvp(want, (q, k, v), tangents)[1]
        jvp = jax.jit(lambda *a: jax.jvp(run, a, tangents)[1])

    def grad_of_grad(fn, args):  # reverse over reverse
        grad = squares_grad(fn)
        return jax.jit(jax.grad(lambda *a: sum(jnp.sum(x**2) for x in grad(*a)), (0, 1, 2)))(*args)

    for where in ("key", "value", "query"):
        dirty = {"key": k, "value": v, "query": q}[where]
        if where == "query":
            dirty = dirty.at[1, 0, 2].set(jnp.nan)
        else:
            dirty = dirty.at[0, 11:].set(jnp.nan).at[1, 6, 1, 3].set(jnp.inf)
        args = {"key": (q, dirty, v), "value": (q, k, dirty), "query": (dirty, k, v)}[where]
        close(programs["out"](*args), want_out, 1e-6, 1e-6)
        close(programs["grads"](*args), want_grads, 1e-5, 1e-6)
        close(programs["vmapped"](*args), want_grads, 1e-5, 1e-6)
        close(programs["hvp"](*args), want_hvp, 1e-4, 1e-5)
        if where == "key":  # reverse over reverse, once
            # the custom VJP's forward pass, differentiated, multiplies the fast branch's
            # NaNs by zeros: there only finite inputs (documented)
            inputs = args if forward_mode else (q, k, v)
            close(grad_of_grad(run, inputs), grad_of_grad(want, (q, k, v)), 1e-4, 1e-5)
        if forward_mode:
            close(jvp(*args), want_jvp, 1e-5, 1e-6)


def test_visible_key_of_minus_inf_makes_its_row_nan():
    """A key whose logit is -inf (an -inf entry against a positive query entry) gets
    weight 0 in a plain softmax and leaves its row finite; like every non-finite input
    a row sees, it must make the row NaN (the per-head path's rule). With one key/value
    head (no other heads' zeros to turn it to NaN) only the logits' probe shows it."""
    q = jnp.abs(_normal(0, (2, 1, 4, 8)))
    k, v = _normal(1, (2, 12, 1, 8)), _normal(2, (2, 12, 1, 8))
    k = k.at[0, 3, 0, 0].set(-jnp.inf)  # visible to example 0's queries
    lengths = jnp.asarray([8, 5])
    options = dict(OPTIONS, key_value_seq_lengths=lengths)
    out = jax.jit(
        lambda q, k, v: _in_layout(
            q, k, v, None, None, **options, return_weights=False, return_residual=False
        )
    )(q, k, v)
    want = attention(q, k, v, key_value_seq_lengths=lengths)
    nan_rows = np.zeros((2, 1, 4), bool)
    nan_rows[0] = True
    np.testing.assert_array_equal(np.isnan(want).all(-1), nan_rows)
    np.testing.assert_array_equal(np.isnan(out).all(-1), nan_rows)
    np.testing.assert_allclose(out[~nan_rows], want[~nan_rows], rtol=1e-6, atol=1e-6)
