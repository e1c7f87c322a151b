"""Blocked (flash-style) attention equals the dense path, feature by feature.

Tiny shapes with blocks of 8/16 so that every case has several query and key
blocks, padding of T and S, and (for causal/windowed cases) skipped tiles.
Tolerances (fixed): outputs and log-sum-exp 1e-6, gradients 1e-5.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.functional import blocked
from jattn.functional.attention import dot_product_attention, single_head_attention
from jattn.functional.blocked import blocked_attention

OUT_TOL, GRAD_TOL = 1e-6, 1e-5
BLOCKS = (8, 16)


def _normal(seed, shape, dtype=jnp.float32):
    """Unit-normal inputs from NumPy (no per-shape compilation of a JAX sampler)."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return jnp.asarray(x, dtype)


def _rows_masked(seed, shape, p=0.7, dead_rows=(1, 5)):
    """A random boolean mask [..., T, S] with some rows entirely False."""
    m = np.random.default_rng(seed).random(shape) < p
    for r in dead_rows:
        m[..., r, :] = False
    return jnp.asarray(m)


# (name, B, T, S, N, K, H, Hv, options); bias/mask given as shapes [.., N|1, T, S].
CASES = [
    ("plain-gqa-hv-bias", 2, 37, 29, 4, 2, 8, 6, dict(bias=(1, 4, 37, 29))),
    (
        "causal-mask-bias",
        2,
        40,
        40,
        4,
        4,
        8,
        8,
        dict(is_causal=True, mask=(2, 1, 40, 40), bias=(2, 1, 1, 40)),
    ),
    (
        "window-lengths",
        2,
        33,
        45,
        2,
        1,
        8,
        8,
        dict(local_window_size=(3, 2), query_seq_lengths=(30, 5), key_value_seq_lengths=(0, 20)),
    ),
    ("causal-window-t>s", 1, 50, 20, 2, 2, 8, 4, dict(is_causal=True, local_window_size=(5, 0))),
    ("dead-rows-mask-bias", 2, 24, 35, 4, 1, 8, 8, dict(mask=(1, 4, 24, 35), bias=(2, 4, 24, 35))),
    ("window-right-only", 1, 48, 48, 2, 2, 8, 8, dict(local_window_size=(0, 9), bias=(48, 48))),
]


def _make(case, policy):
    name, b, t, s, n, k, h, hv, opts = case
    q = _normal(1, (b, t, n, h))
    key = _normal(2, (b, s, k, h))
    v = _normal(3, (b, s, k, hv))
    opts = dict(opts)
    bias = _normal(4, opts.pop("bias")) if "bias" in opts else None
    mask = _rows_masked(5, opts.pop("mask")) if "mask" in opts else None
    for lk in ("query_seq_lengths", "key_value_seq_lengths"):
        if lk in opts:
            opts[lk] = jnp.asarray(opts[lk], jnp.int32)
    opts["fully_masked"] = policy
    return (q, key, v, bias), mask, opts


def _outputs_and_grads(fn, args, mask, opts):
    """(out, lse, grads wrt q, k, v[, bias]) of fn under one jit."""
    nargs = 4 if args[3] is not None else 3
    cot = _normal(9, args[0].shape[:-1] + args[2].shape[-1:])

    def run(q, k, v, bias):
        return fn(q, k, v, bias, mask, return_residual=True, **opts)

    def loss(*a):
        out, _ = run(*a, *((None,) * (4 - nargs)))
        return jnp.sum(out * cot)

    @jax.jit
    def everything(*a):
        out, lse = run(*a, *((None,) * (4 - nargs)))
        return out, lse, jax.grad(loss, argnums=tuple(range(nargs)))(*a)

    return everything(*args[:nargs])


def _with_policies(
    cases,
    dead_rows=("causal-mask-bias", "window-lengths", "causal-window-t>s", "dead-rows-mask-bias"),
):
    """Both fully-masked policies where a case has fully masked rows, else the default."""
    out = []
    for c in cases:
        for policy in ("zeros", "uniform") if c[0] in dead_rows else ("zeros",):
            out.append(pytest.param(c, policy, id=f"{c[0]}-{policy}"))
    return out


@pytest.mark.parametrize("case, policy", _with_policies(CASES))
def test_blocked_equals_dense(case, policy):
    args, mask, opts = _make(case, policy)

    def blocked_fn(*a, **kw):
        return blocked_attention(*a, block_sizes=BLOCKS, **kw)

    out_b, lse_b, grads_b = _outputs_and_grads(blocked_fn, args, mask, opts)
    out_d, lse_d, grads_d = _outputs_and_grads(dot_product_attention, args, mask, opts)
    assert out_b.shape == out_d.shape and out_b.dtype == out_d.dtype
    np.testing.assert_allclose(out_b, out_d, rtol=0, atol=OUT_TOL)
    np.testing.assert_allclose(lse_b, lse_d, rtol=0, atol=OUT_TOL)
    for gb, gd in zip(grads_b, grads_d, strict=True):
        assert np.all(np.isfinite(gb))
        np.testing.assert_allclose(gb, gd, rtol=0, atol=GRAD_TOL)


@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=[CASES[0][0], CASES[1][0]])
def test_hessian_vector_products_equal_dense(case):
    """Forward-over-reverse (jax.jvp of jax.grad) through the custom VJP equals dense.

    Random tangents for q, k, v and the bias, grouped heads, padding of T and S; the
    second case adds causal masking and a mask with dead rows. This once gave NaN: the
    running max's JVP compared logits that XLA had rounded differently in two fusions.
    """
    args, mask, opts = _make(case, "zeros")
    tangents = tuple(_normal(20 + i, a.shape) for i, a in enumerate(args))
    cot = _normal(9, args[0].shape[:-1] + args[2].shape[-1:])

    def hvp(fn):
        def loss(q, k, v, bias):
            return jnp.sum(fn(q, k, v, bias, mask, **opts) * cot)

        grad = jax.grad(loss, argnums=(0, 1, 2, 3))
        return jax.jit(lambda *a: jax.jvp(grad, a, tangents)[1])(*args)

    def blocked_fn(*a, **kw):
        return blocked_attention(*a, block_sizes=BLOCKS, **kw)

    for hb, hd in zip(hvp(blocked_fn), hvp(dot_product_attention), strict=True):
        assert np.all(np.isfinite(hb))
        np.testing.assert_allclose(hb, hd, rtol=0, atol=GRAD_TOL)


def test_bias_used_as_a_mask_gives_dense_gradients():
    """A large negative bias as a mask (-1e9, as many codebases write it), some rows
    masked entirely that way, and -inf entries. Weights recomputed from a log-sum-exp
    near -1e9 lose log(l) in float32; the blocked backward must agree with dense."""
    q, k, v = (_normal(i, (2, 24, 2, 8)) for i in (1, 2, 3))
    rng = np.random.default_rng(4)
    b = np.where(rng.random((2, 2, 24, 24)) < 0.4, -1e9, 0.0).astype(np.float32)
    b[0, 1, 5] = -1e9  # every key of these rows
    b[1, 0, 17] = -1e9
    b[1, 1, 3, ::2] = -np.inf
    bias = jnp.asarray(b)
    cot = _normal(9, (2, 24, 2, 8))

    def grads(fn):
        loss = lambda *a: jnp.sum(fn(*a) * cot)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)

    blocked_grads = grads(lambda *a: blocked_attention(*a, block_sizes=BLOCKS))
    for gb, gd in zip(blocked_grads, grads(dot_product_attention), strict=True):
        assert np.all(np.isfinite(gb))
        np.testing.assert_allclose(gb, gd, rtol=0, atol=GRAD_TOL)


def test_x64_mode_runs_and_equals_dense():
    """Under jax_enable_x64 Python ints become int64: tile offsets must stay one type."""
    args, mask, opts = _make(CASES[1], "zeros")  # bias, mask, causal, padding of T and S
    with jax.enable_x64(True):
        out_b, lse_b, grads_b = _outputs_and_grads(
            lambda *a, **kw: blocked_attention(*a, block_sizes=BLOCKS, **kw), args, mask, opts
        )
        out_d, lse_d, grads_d = _outputs_and_grads(dot_product_attention, args, mask, opts)
    np.testing.assert_allclose(out_b, out_d, rtol=0, atol=OUT_TOL)
    for gb, gd in zip(grads_b, grads_d, strict=True):
        np.testing.assert_allclose(gb, gd, rtol=0, atol=GRAD_TOL)


def test_fully_masked_rows_policies():
    """Dead rows: zeros gives 0, uniform gives the mean of every value (as dense/jax.nn)."""
    args, mask, opts = _make(CASES[4], "uniform")
    q, k, v, _ = args
    out_u = blocked_attention(q, k, v, None, mask, fully_masked="uniform", block_sizes=BLOCKS)
    out_z = blocked_attention(q, k, v, None, mask, fully_masked="zeros", block_sizes=BLOCKS)
    dead = ~np.asarray(jnp.broadcast_to(mask, (2, 4, 24, 35))).any(-1)  # [B, N, T]
    assert dead.any()
    b, n, t = np.nonzero(dead)
    np.testing.assert_array_equal(np.asarray(out_z)[b, t, n], 0.0)
    mean_v = np.asarray(v).mean(axis=1)[:, 0]  # K = 1: [B, Hv]
    np.testing.assert_allclose(np.asarray(out_u)[b, t, n], mean_v[b], atol=OUT_TOL)


def _minus_inf_row_case(policy, which):
    """Inputs and options of the -inf row test: row 1 of the query sees keys, all
    with a -inf bias; ``which`` 0: a window, 1: a mask."""
    q, k = _normal(1, (1, 2, 1, 4)), _normal(2, (1, 8, 1, 4))
    v = jnp.arange(1.0, 9.0).reshape(1, 8, 1, 1)
    bias = jnp.zeros((2, 8)).at[1].set(-jnp.inf)
    mask = jnp.ones((2, 8), bool).at[1, 0].set(False)
    mask_i, opts = ((None, dict(local_window_size=1)), (mask, {}))[which]
    return (q, k, v, bias), mask_i, dict(opts, fully_masked=policy)


@functools.cache
def _minus_inf_row_dense(policy, which):
    """The dense path's results on that case, once per process (not per block size)."""
    return _outputs_and_grads(dot_product_attention, *_minus_inf_row_case(policy, which))


@pytest.mark.parametrize("block_sizes", [(1, 1), (1, 2), (2, 3), (2, 8)])
@pytest.mark.parametrize("policy", ["zeros", "uniform"])
def test_a_row_of_minus_inf_logits_does_not_depend_on_the_blocks(block_sizes, policy):
    """Row 1 sees keys, all with a -inf bias: zeros and lse 0 as dense, whichever tiles
    (with or without masked entries) the row visits; row 0 is an ordinary row."""
    for which in (0, 1):
        dense = _minus_inf_row_dense(policy, which)
        blocked_fn = functools.partial(blocked_attention, block_sizes=block_sizes)
        got = _outputs_and_grads(blocked_fn, *_minus_inf_row_case(policy, which))
        np.testing.assert_array_equal(got[0][0, 1], 0.0)
        np.testing.assert_array_equal(got[1][0, 1], 0.0)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(dense), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_lengths_given_as_lists():
    q, k, v = (_normal(i, (2, 20, 2, 8)) for i in (1, 2, 3))
    lengths = dict(query_seq_lengths=[20, 3], key_value_seq_lengths=[9, 20])
    lists = blocked_attention(q, k, v, block_sizes=BLOCKS, **lengths)
    arrays = {name: jnp.array(x) for name, x in lengths.items()}
    np.testing.assert_array_equal(lists, blocked_attention(q, k, v, block_sizes=BLOCKS, **arrays))


def test_no_batch_dims_and_two_batch_dims():
    q, k, v = (
        _normal(1, (2, 3, 19, 2, 8)),
        _normal(2, (2, 3, 21, 1, 8)),
        _normal(3, (2, 3, 21, 1, 8)),
    )
    mask = _rows_masked(4, (3, 1, 19, 21))

    @jax.jit
    def both(q, k, v):
        two = blocked_attention(q, k, v, mask=mask, block_sizes=BLOCKS)
        two_ref = dot_product_attention(q, k, v, mask=mask)
        q0, k0, v0 = q[0, 0], k[0, 0], v[0, 0]
        none = blocked_attention(q0, k0, v0, is_causal=True, block_sizes=BLOCKS)
        none_ref = dot_product_attention(q0, k0, v0, is_causal=True)
        return two, two_ref, none, none_ref

    two, two_ref, none, none_ref = both(q, k, v)
    assert two.shape == (2, 3, 19, 2, 8) and none.shape == (19, 2, 8)
    np.testing.assert_allclose(two, two_ref, rtol=0, atol=OUT_TOL)
    np.testing.assert_allclose(none, none_ref, rtol=0, atol=OUT_TOL)


def _np_reference(q, k, v, cot, scale, causal):
    """Float64 attention and its gradients (by hand) for q [T, N, H], k/v [S, N, H]."""
    logits = np.einsum("tnh,snh->nts", q, k) * scale
    if causal:
        logits = np.where(np.tril(np.ones(logits.shape[1:], bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = np.einsum("nts,snh->tnh", w, v)
    dw = np.einsum("tnh,snh->nts", cot, v)
    dl = w * (dw - np.sum(dw * w, -1, keepdims=True))
    dq = np.einsum("nts,snh->tnh", dl, k) * scale
    dk = np.einsum("nts,tnh->snh", dl, q) * scale
    dv = np.einsum("nts,tnh->snh", w, cot)
    return out, (dq, dk, dv)


@pytest.mark.parametrize("causal", [False, True])
def test_float64_reference(causal):
    q, k, v = _normal(1, (45, 2, 16)), _normal(2, (45, 2, 16)), _normal(3, (45, 2, 16))
    cot = _normal(4, (45, 2, 16))

    def f(q, k, v):
        out = blocked_attention(q, k, v, is_causal=causal, block_sizes=(16, 8))
        return jnp.sum(out * cot), out

    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    f64 = [np.asarray(x, np.float64) for x in (q, k, v, cot)]
    out_ref, grads_ref = _np_reference(*f64, 0.25, causal)
    np.testing.assert_allclose(out, out_ref, rtol=0, atol=OUT_TOL)
    for g, r in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=0, atol=GRAD_TOL)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_finite_and_close(dtype):
    q, k, v = (_normal(i, (1, 40, 2, 8), dtype) for i in (1, 2, 3))
    mask = _rows_masked(4, (1, 1, 40, 40))

    def f(q, k, v):
        out = blocked_attention(q, k, v, mask=mask, is_causal=True, block_sizes=BLOCKS)
        return jnp.sum(out.astype(jnp.float32)), out

    @jax.jit
    def run(q, k, v):
        (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads, dot_product_attention(q, k, v, mask=mask, is_causal=True)

    out, grads, ref = run(q, k, v)
    assert out.dtype == dtype
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    for x in grads:
        assert x.dtype == dtype and np.all(np.isfinite(np.asarray(x, np.float32)))
    # Both round a float32 result to 16 bits: a few ulps of values of size ~1.
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=3e-2)


def test_dropout_rate_zero_is_exact():
    q, k, v = (_normal(i, (1, 30, 2, 8)) for i in (1, 2, 3))
    rng = jax.random.PRNGKey(0)

    @jax.jit
    def run(q, k, v):
        out = blocked_attention(q, k, v, dropout_rate=0.0, dropout_rng=rng, block_sizes=BLOCKS)
        return out, dot_product_attention(q, k, v)

    out, ref = run(q, k, v)
    np.testing.assert_allclose(out, ref, rtol=0, atol=OUT_TOL)


def test_dropout_is_inverted_dropout_with_a_consistent_backward():
    """With v = identity the output is the dropped weight matrix itself; the kept
    entries are weights / (1 - rate), about `rate` of them are zero, and gradients
    equal those of the dense single-head math run with that same keep-mask."""
    t, s, rate = 40, 48, 0.3
    q, k = _normal(1, (t, 1, 8)), _normal(2, (s, 1, 8))
    v, cot = _normal(3, (s, 1, s)), _normal(4, (t, 1, s))
    eye = jnp.eye(s)[:, None, :]
    causal = jnp.tril(jnp.ones((t, s), bool))

    def f(q, k, v):
        return blocked_attention(
            q,
            k,
            v,
            dropout_rate=rate,
            dropout_rng=jax.random.PRNGKey(7),
            is_causal=True,
            block_sizes=BLOCKS,
        )

    def ref(q, k, v, keep):
        out, weights, _ = single_head_attention(
            q[:, 0], k[:, 0], v[:, 0], mask=causal, dropout_keep=keep, dropout_rate=rate
        )
        return out[:, None, :], weights

    def loss(fn, *a):
        return jnp.sum(fn(*a)[0] * cot) if fn is ref else jnp.sum(fn(*a) * cot)

    @jax.jit
    def run(q, k, v):
        dropped = f(q, k, eye)[:, 0, :]  # [T, S]
        keep = dropped != 0
        _, weights = ref(q, k, v, keep)
        g_b = jax.grad(lambda *a: loss(f, *a), argnums=(0, 1, 2))(q, k, v)
        g_r = jax.grad(lambda *a: loss(ref, *a, keep), argnums=(0, 1, 2))(q, k, v)
        return dropped, weights, f(q, k, v), ref(q, k, v, keep)[0], g_b, g_r

    dropped, weights, out, out_ref, g_b, g_r = (jax.tree.map(np.asarray, x) for x in run(q, k, v))
    visible, keep = weights > 0, dropped != 0
    assert not keep[~visible].any()
    frac, n = 1 - keep[visible].mean(), visible.sum()
    assert abs(frac - rate) < 4 * np.sqrt(rate * (1 - rate) / n), (frac, n)
    np.testing.assert_allclose(dropped[keep], weights[keep] / (1 - rate), rtol=1e-5)
    np.testing.assert_allclose(out, out_ref, rtol=0, atol=OUT_TOL)
    for gb, gr in zip(g_b, g_r, strict=True):
        np.testing.assert_allclose(gb, gr, rtol=0, atol=GRAD_TOL)


@pytest.mark.parametrize(
    "b, t, s, n, kh, options",
    [
        (2, 37, 29, 4, 2, dict()),
        (1, 40, 40, 2, 1, dict(is_causal=True)),
        (2, 33, 33, 2, 2, dict(local_window_size=(5, 3), key_value_seq_lengths=[33, 20])),
    ],
)
def test_dropout_equals_dense(b, t, s, n, kh, options):
    """Both paths hash the same global (row, column) coordinates: same mask, same
    output and gradients."""
    q, k, v = _normal(1, (b, t, n, 8)), _normal(2, (b, s, kh, 8)), _normal(3, (b, s, kh, 6))
    cot = _normal(4, (b, t, n, 6))
    opts = dict(options, dropout_rate=0.3, dropout_rng=jax.random.key(11))
    if "key_value_seq_lengths" in opts:
        opts["key_value_seq_lengths"] = jnp.asarray(opts["key_value_seq_lengths"])

    def loss(fn, *a):
        return jnp.sum(fn(*a) * cot)

    def f_blocked(q, k, v):
        return blocked_attention(q, k, v, block_sizes=BLOCKS, **opts)

    def f_dense(q, k, v):
        return dot_product_attention(q, k, v, implementation="dense", **opts)

    @jax.jit
    def run(q, k, v):
        grad = jax.grad(loss, argnums=(1, 2, 3))
        return [(fn(q, k, v), grad(fn, q, k, v)) for fn in (f_blocked, f_dense)]

    (out_b, g_b), (out_d, g_d) = run(q, k, v)
    np.testing.assert_allclose(out_b, out_d, rtol=0, atol=OUT_TOL)
    for gb, gd in zip(g_b, g_d, strict=True):
        np.testing.assert_allclose(gb, gd, rtol=0, atol=GRAD_TOL)
    # and dropout did something: without it the output differs
    plain = dot_product_attention(q, k, v, **{**opts, "dropout_rate": 0.0})
    assert np.max(np.abs(np.asarray(plain) - np.asarray(out_d))) > 1e-2


def _count_tiles(monkeypatch, fn, *args):
    """Number of (query block, key block) tiles whose logits are computed at run time."""
    calls = []
    original = blocked._logits

    def counting(*a, **kw):
        jax.debug.callback(lambda: calls.append(1))
        return original(*a, **kw)

    monkeypatch.setattr(blocked, "_logits", counting)
    jax.block_until_ready(fn(*args))
    return len(calls)


@pytest.mark.parametrize(
    "options, tiles",
    [
        (dict(is_causal=True), 10),  # 4 + 3 + 2 + 1 of the 4 x 4 tiles
        (dict(local_window_size=(8, 8)), 10),  # the band: 2 + 3 + 3 + 2 tiles
        (dict(key_value_seq_lengths=jnp.array([16, 20], jnp.int32)), 8),  # 2 key blocks of 4
    ],
    ids=["causal", "window", "kv-lengths"],
)
def test_fully_masked_tiles_are_skipped(monkeypatch, options, tiles):
    """Forward and backward each compute the logits of only the visible tiles."""
    q, k, v = (_normal(i, (2, 64, 1, 8)) for i in (1, 2, 3))

    def loss(q, k, v):
        return jnp.sum(blocked_attention(q, k, v, block_sizes=(16, 16), **options))

    assert _count_tiles(monkeypatch, jax.jit(jax.grad(loss)), q, k, v) == 2 * tiles


def test_errors():
    q = k = v = jnp.ones((1, 8, 2, 4))
    with pytest.raises(ValueError, match="block_sizes must be a pair of positive ints"):
        blocked_attention(q, k, v, block_sizes=(0, 8))
    with pytest.raises(TypeError, match="mask must be boolean"):
        blocked_attention(q, k, v, mask=jnp.ones((8, 8)))
    with pytest.raises(ValueError, match=r"bias of shape \[3, 8\] does not broadcast"):
        blocked_attention(q, k, v, bias=jnp.ones((3, 8)))
    with pytest.raises(ValueError, match="needs a dropout_rng"):
        blocked_attention(q, k, v, dropout_rate=0.5)
    with pytest.raises(ValueError, match="fully_masked must be one of"):
        blocked_attention(q, k, v, fully_masked="nan")
    with pytest.raises(ValueError, match="query and key head dims differ"):
        blocked_attention(q, jnp.ones((1, 8, 2, 5)), v)
    with pytest.raises(ValueError, match="window must be a non-negative int"):
        blocked_attention(q, k, v, local_window_size=(-1, 2))


@pytest.mark.parametrize(
    "t, s, bt, bs, causal, window, q_len, kv_len",
    [
        (64, 64, 16, 8, True, None, None, None),
        (60, 50, 16, 16, True, None, None, None),
        (64, 48, 8, 16, False, (5, 3), None, None),
        (64, 64, 16, 16, True, (20, 0), None, None),
        (50, 70, 16, 16, False, None, [50, 33], [70, 41]),
        (64, 64, 16, 8, True, (9, 9), [64, 20], [40, 64]),
        (64, 64, 8, 8, False, (24, 17), None, None),  # windows with plain tiles inside
        (72, 64, 8, 16, True, (40, 0), None, [64, 60]),
    ],
)
def test_plain_block_ranges_are_the_tiles_without_structure(
    t, s, bt, bs, causal, window, q_len, kv_len
):
    """The loops run the unmasked step exactly on the tiles where the structural mask
    that the masked step would apply (`_visible`, and real keys) is all True."""
    geo = blocked._Geometry(
        b=2, k=1, g=1, t=t, s=s, bt=bt, bs=bs, causal=causal, window=window,
        dropout_rate=0.0, fully_masked="zeros",
    )  # fmt: skip
    ql = None if q_len is None else jnp.asarray(q_len)
    kl = None if kv_len is None else jnp.asarray(kv_len)
    nq, nk = -(-t // bt), -(-s // bs)

    def needs(i, j):
        vis, real = blocked._visible(geo, jnp.int32(i), jnp.int32(j), ql, kl)
        return not bool(jnp.all(vis & real))

    needs = np.array([[needs(i, j) for j in range(nk)] for i in range(nq)])
    for i in range(nq):
        a, b = (int(x) for x in blocked._plain_kv_blocks(geo, i, ql, kl))
        assert [a <= j < b for j in range(nk)] == list(~needs[i]), (i, a, b)
    for j in range(nk):
        a, b = (int(x) for x in blocked._plain_q_blocks(geo, j, ql, kl))
        assert [a <= i < b for i in range(nq)] == list(~needs[:, j]), (j, a, b)
