"""jattn.dot_product_attention and jattn.attention vs jax.nn and NumPy float64 references.

Float32 tolerance (the issue's acceptance bound): 1e-6 against jax.nn on outputs and
gradients. NumPy float64 references get 1e-5 (float32 accumulation of O(1) terms).
Low precision vs the float32 result on the same (rounded) inputs: a fixed multiple of the
dtype's epsilon, see LOW_PRECISION_TOL.
"""

import functools

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest

import jattn

B, T, S, N, K, H = 2, 4, 5, 4, 2, 8
JAX_NN_TOL = dict(rtol=1e-6, atol=1e-6)
F64_TOL = dict(rtol=1e-5, atol=1e-5)
# bfloat16 has 8 significant bits (eps 2^-7), float16 11 (eps 2^-10). Inputs, probabilities
# and outputs are each rounded once, so we allow 4 eps on O(1) outputs.
LOW_PRECISION_TOL = {jnp.bfloat16: 4 * 2.0**-7, jnp.float16: 4 * 2.0**-10}


def _normal(seed, shape, dtype=jnp.float32):
    """Test data from NumPy: jax.random would compile a kernel for every new shape."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _qkv(t=T, s=S, n=N, k=K, h=H, hv=None, batch=(B,)):
    return (
        _normal(0, batch + (t, n, h)),
        _normal(1, batch + (s, k, h)),
        _normal(2, batch + (s, k, h if hv is None else hv)),
    )


def _random_mask(shape, seed=3, p=0.7, keep_rows_alive=True):
    m = np.random.default_rng(seed).random(shape) < p
    if keep_rows_alive:
        m[..., 0] = True  # every query sees at least key 0
    return jnp.asarray(m)


# ------------------------------------------------------------------ vs jax.nn


@functools.partial(jax.jit, static_argnames=("is_causal", "window", "fully_masked"))
def _ours_and_jax_nn(q, k, v, bias, mask, q_len, kv_len, cot, *, is_causal, window, fully_masked):
    """Outputs and gradients (w.r.t. q, k, v and bias) of jattn and of jax.nn."""

    def run(fn, **extra):
        def loss(q, k, v, bias):
            out = fn(
                q,
                k,
                v,
                bias,
                mask,
                is_causal=is_causal,
                query_seq_lengths=q_len,
                key_value_seq_lengths=kv_len,
                local_window_size=window,
                **extra,
            )
            return jnp.sum(out * cot), out

        argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
        (_, out), grads = jax.value_and_grad(loss, argnums, has_aux=True)(q, k, v, bias)
        return out, grads

    return run(jattn.dot_product_attention, fully_masked=fully_masked), run(
        jax.nn.dot_product_attention
    )


def _check_vs_jax_nn(
    q, k, v, bias=None, mask=None, q_len=None, kv_len=None, *, is_causal=False, window=None,
    fully_masked="zeros",
):  # fmt: skip
    cot = _normal(9, q.shape[:-1] + v.shape[-1:])
    (out, grads), (want, want_grads) = _ours_and_jax_nn(
        q, k, v, bias, mask, q_len, kv_len, cot,
        is_causal=is_causal, window=window, fully_masked=fully_masked,
    )  # fmt: skip
    np.testing.assert_allclose(out, want, **JAX_NN_TOL)
    for name, g, w in zip("qkvb"[: len(grads)], grads, want_grads, strict=True):
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, w, **JAX_NN_TOL, err_msg=f"gradient w.r.t. {name}")
    return out


def test_no_mask():
    _check_vs_jax_nn(*_qkv())


@pytest.mark.parametrize("mask_shape", [(B, 1, T, S), (1, N, T, S), (1, 1, T, S)])
def test_boolean_mask_broadcasts(mask_shape):
    _check_vs_jax_nn(*_qkv(), mask=_random_mask(mask_shape))


@pytest.mark.parametrize("bias_shape", [(B, N, T, S), (B, 1, 1, S)])
def test_bias_and_its_gradient(bias_shape):
    bias = _normal(4, bias_shape)
    _check_vs_jax_nn(*_qkv(), bias=bias, mask=_random_mask((B, 1, T, S)))


@pytest.mark.parametrize("t,s", [(4, 4), (3, 5), (5, 3)])
def test_causal(t, s):
    _check_vs_jax_nn(*_qkv(t=t, s=s), is_causal=True)


@pytest.mark.parametrize("window", [1, (0, 2)])
def test_local_window(window):
    _check_vs_jax_nn(*_qkv(), window=window)


def test_seq_lengths():
    q_len = jnp.array([2, 4], jnp.int32)
    kv_len = jnp.array([5, 1], jnp.int32)
    out = _check_vs_jax_nn(*_qkv(), q_len=q_len, kv_len=kv_len)
    np.testing.assert_array_equal(out[0, 2:], 0.0)  # padded queries give zeros


def test_everything_at_once():
    """Mask, bias, causal, window and sequence lengths together, GQA."""
    _check_vs_jax_nn(
        *_qkv(t=5, s=5),
        bias=_normal(4, (1, N, 5, 5)),
        mask=_random_mask((B, 1, 5, 5)),
        q_len=jnp.array([5, 3], jnp.int32),
        kv_len=jnp.array([4, 5], jnp.int32),
        is_causal=True,
        window=(2, 1),
    )


@pytest.mark.parametrize("num_kv_heads", [1, 4], ids=["mqa", "mha"])  # K=2 everywhere else
def test_grouped_heads(num_kv_heads):
    _check_vs_jax_nn(*_qkv(k=num_kv_heads), mask=_random_mask((1, N, T, S)))


def test_unbatched_inputs():
    q, k, v = _qkv(batch=())
    mask = _random_mask((N, T, S))
    _check_vs_jax_nn(q, k, v, bias=_normal(4, (N, T, S)), mask=mask, is_causal=True)
    # jax.nn takes sequence lengths of shape [B] = [1] for unbatched inputs.
    q_len, kv_len = jnp.array([3], jnp.int32), jnp.array([4], jnp.int32)
    _check_vs_jax_nn(q, k, v, mask=mask, q_len=q_len, kv_len=kv_len)


def test_fully_masked_rows_uniform_matches_jax_nn():
    mask = np.array(_random_mask((B, N, T, S)))
    mask[0, 1, 2] = False
    mask[1, :, 0] = False
    _check_vs_jax_nn(
        *_qkv(), bias=_normal(4, (B, N, T, S)), mask=jnp.asarray(mask), fully_masked="uniform"
    )


def test_eager_matches_jax_nn():
    """Without jit: the jax.nn result (computed under jit, the same math) to 1e-6."""
    q, k, v = _qkv()
    mask = _random_mask((B, 1, T, S))
    got = jattn.dot_product_attention(q, k, v, mask=mask, is_causal=True, scale=0.3)
    want = jax.jit(
        lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m, is_causal=True, scale=0.3)
    )(q, k, v, mask)
    np.testing.assert_allclose(got, want, **JAX_NN_TOL)


def test_an_eager_call_is_one_cached_program_equal_to_op_by_op():
    """Eagerly, the checked call runs as one compiled program (jax.jit of the path,
    the options static): a repeated call compiles nothing, a new shape or option
    compiles once, and the results equal the op-by-op run (jax.disable_jit)."""
    from jattn.functional._eager import _jitted as run

    q, k, v = _qkv(t=7, s=9, h=5)  # shapes no other test uses: no program cached yet
    lens = jnp.asarray([9, 2], jnp.int32)
    options = dict(is_causal=True, key_value_seq_lengths=lens, return_residual=True)
    before = run._cache_size()
    out, lse = jattn.dot_product_attention(q, k, v, **options)
    assert run._cache_size() == before + 1
    jattn.dot_product_attention(q, k, v, **options)
    jattn.dot_product_attention(q, k, v, **dict(options, key_value_seq_lengths=lens[::-1]))
    assert run._cache_size() == before + 1  # same shapes and options: no new program
    jattn.dot_product_attention(q, k, v, **dict(options, scale=0.5))
    assert run._cache_size() == before + 2  # a static option: a new program
    with jax.disable_jit():
        want_out, want_lse = jattn.dot_product_attention(q, k, v, **options)
    np.testing.assert_allclose(out, want_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-6, atol=1e-6)
    # the generic dense function too (its score function static, its params arrays)
    got = jattn.attention(q, k, v, **options)
    assert run._cache_size() == before + 3
    np.testing.assert_allclose(got[0], out, rtol=1e-6, atol=1e-6)
    # the blocked path's public function too (its block sizes, a list here, are static)
    got = jattn.blocked_attention(q, k, v, block_sizes=[2, 3], **options)
    assert run._cache_size() == before + 4
    jattn.blocked_attention(q, k, v, block_sizes=(2, 3), **options)
    assert run._cache_size() == before + 4
    with jax.disable_jit():
        want = jattn.blocked_attention(q, k, v, block_sizes=(2, 3), **options)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_an_eager_lambda_mod_is_compiled_from_its_second_call():
    """A lambda written in the call is a new cache key each time: it runs op by op (no
    program per call); a lambda kept and reused gets one program, from its second call.
    Library mods (jattn.mods) compare by value: a fresh one reuses the program."""
    from jattn import mods
    from jattn.functional._eager import _jitted as run

    q, k, v = _qkv(t=6, s=9, h=5)  # shapes no other test uses
    want = jattn.dot_product_attention(q, k, v, is_causal=True)
    before = run._cache_size()
    for _ in range(2):
        got = jattn.dot_product_attention(q, k, v, mask_mod=lambda b, n, i, j: i >= j)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert run._cache_size() == before
    causal = lambda b, n, i, j: i >= j  # noqa: E731
    sizes = []
    for _ in range(3):
        got = jattn.dot_product_attention(q, k, v, mask_mod=causal)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        sizes.append(run._cache_size() - before)
    assert sizes == [0, 1, 1]
    jattn.dot_product_attention(q, k, v, mask_mod=mods.sliding_window(2))
    jattn.dot_product_attention(q, k, v, mask_mod=mods.sliding_window(2))
    assert run._cache_size() - before == 2
    # mods.mask_grid (references, plots) too: one program, the mod's arrays its arguments
    ids = jnp.asarray([[0, 0, 1, 1, 1, 2]])
    grid = mods.mask_grid(mods.segments(ids), 1, 1, 6, 6)
    mods.mask_grid(mods.segments(ids[:, ::-1]), 1, 1, 6, 6)
    assert run._cache_size() - before == 3
    with jax.disable_jit():
        want_grid = mods.mask_grid(mods.segments(ids), 1, 1, 6, 6)
    np.testing.assert_array_equal(grid, want_grid)
    np.testing.assert_array_equal(grid[0, 0], ids[0][:, None] == ids[0][None, :])


def test_an_eager_call_chooses_its_path_from_concrete_arrays(monkeypatch):
    """The path is chosen before the program is traced (so from the call's values, as
    before), and the splash kernel, which evaluates the mask_mod on the host, gets the
    concrete call; the other paths get it traced in the one program."""
    from jattn.functional import dispatch

    seen = []

    def select(implementation, spec, *args, **options):
        seen.append(("select", isinstance(spec.query, jax.core.Tracer)))
        return implementation

    def run(impl, spec):
        seen.append((impl, isinstance(spec.query, jax.core.Tracer)))
        return spec.query, None

    monkeypatch.setattr(dispatch, "select", select)
    monkeypatch.setattr(dispatch, "run", run)
    q, k, v = _qkv(t=5, s=9, h=5)
    for impl in ("splash", "blocked"):
        np.testing.assert_array_equal(jattn.dot_product_attention(q, k, v, implementation=impl), q)
    assert seen == [("select", False), ("splash", False), ("select", False), ("blocked", True)]


def test_an_eager_call_with_an_unhashable_option_runs_op_by_op():
    """A score_mod whose class defines __eq__ (so no __hash__) cannot key a cache: the
    call runs as before, op by op, with the same result as under jit."""

    class Scaled:
        def __init__(self, c):
            self.c = c

        def __eq__(self, other):
            return isinstance(other, Scaled) and other.c == self.c

        def __call__(self, score, b, n, q_idx, kv_idx):
            return score * self.c

    from jattn.functional._eager import _jitted as run

    q, k, v = _qkv()
    before = run._cache_size()
    got = jattn.dot_product_attention(q, k, v, score_mod=Scaled(0.5), is_causal=True)
    assert run._cache_size() == before
    want = jax.jit(
        lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=0.5 / H**0.5)
    )(q, k, v)
    np.testing.assert_allclose(got, want, **JAX_NN_TOL)


def _peaked_case():
    """Equal queries, keys differing in one entry: a peaked softmax whose gradient cancels."""
    q = np.full((1, 3, 2, 4), 2.0, np.float32)
    k = np.full((1, 2, 1, 4), 2.0, np.float32)
    k[0, 0, 0, 0] = 0.0
    return q, k, np.flip(k, axis=-1).copy()


@functools.partial(jax.jit, static_argnames="fn")
def _grads(q, k, v, fn):
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2))(q, k, v)


def test_peaked_softmax_gradient_matches_default_jax_nn():
    """A peaked softmax whose gradient cancels: jattn differentiates the softmax as jax.nn does."""
    q, k, v = _peaked_case()
    ours = _grads(q, k, v, jattn.dot_product_attention)
    theirs = _grads(q, k, v, jax.nn.dot_product_attention)
    for g, w in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(g, w, **JAX_NN_TOL)


# ------------------------------------------------------------------ vs NumPy float64


@functools.partial(
    jax.jit, static_argnames=("is_causal", "window", "fully_masked", "return_residual")
)
def _dpa_with_weights(q, k, v, bias=None, mask=None, q_len=None, kv_len=None, **kw):
    return jattn.dot_product_attention(
        q, k, v, bias, mask, query_seq_lengths=q_len, key_value_seq_lengths=kv_len,
        return_weights=True, **kw,
    )  # fmt: skip


def _check_vs_numpy(q, k, v, bias=None, mask=None, q_len=None, kv_len=None, **kw):
    out, weights = _dpa_with_weights(q, k, v, bias, mask, q_len, kv_len, **kw)
    want, want_w, _ = ref.attention(
        np.asarray(q), np.asarray(k), np.asarray(v), bias, mask, q_len=q_len, kv_len=kv_len,
        is_causal=kw.get("is_causal", False), window=kw.get("window"),
    )  # fmt: skip
    np.testing.assert_allclose(out, want, **F64_TOL)
    np.testing.assert_allclose(weights, want_w, **F64_TOL)
    return out, weights


def test_value_head_dim_differs():
    q, k, v = _qkv(hv=3)
    out, _ = _check_vs_numpy(q, k, v, mask=_random_mask((B, 1, T, S)), is_causal=True)
    assert out.shape == (B, T, N, 3)


def test_leading_batch_dims():
    q, k, v = _qkv(batch=(2, 3), hv=6)
    mask = _random_mask((3, 1, T, S))  # broadcasts over the first batch dim
    bias = _normal(4, (2, 1, N, T, S))
    q_len = jnp.array([[4, 3, 1], [2, 4, 4]])
    out, weights = jax.jit(
        lambda *a: jattn.dot_product_attention(
            *a[:5], query_seq_lengths=a[5], is_causal=True, return_weights=True
        )
    )(q, k, v, bias, mask, q_len)
    assert out.shape == (2, 3, T, N, 6) and weights.shape == (2, 3, N, T, S)
    flat = lambda x: np.asarray(x).reshape((6,) + x.shape[2:])  # noqa: E731
    want, want_w, _ = ref.attention(
        flat(q), flat(k), flat(v),
        flat(jnp.broadcast_to(bias, (2, 3, N, T, S))),
        flat(jnp.broadcast_to(mask, (2, 3, 1, T, S))),
        q_len=flat(q_len), is_causal=True,
    )  # fmt: skip
    np.testing.assert_allclose(flat(out), want, **F64_TOL)
    np.testing.assert_allclose(flat(weights), want_w, **F64_TOL)


def test_fully_masked_rows_are_zero_like_torch_sdpa():
    """PyTorch SDPA (and our default) returns exactly 0 for a query that sees no key."""
    q, k, v = _qkv()
    mask = np.array(_random_mask((B, N, T, S)))
    mask[0, 1, 2] = False
    mask[1, :, 0] = False
    dead = ~mask.any(-1)  # [B, N, T]
    out, weights = _check_vs_numpy(q, k, v, mask=jnp.asarray(mask))
    out_bnt = np.moveaxis(np.asarray(out), 2, 1)  # [B, N, T, H]
    np.testing.assert_array_equal(out_bnt[dead], 0.0)
    np.testing.assert_array_equal(np.asarray(weights)[dead], 0.0)
    assert np.all(np.abs(out_bnt[~dead]).sum(-1) > 0)
    grads = jax.jit(
        jax.grad(lambda q, k, v: jnp.sum(jattn.dot_product_attention(q, k, v, mask=mask) ** 2),
                 argnums=(0, 1, 2))
    )(q, k, v)  # fmt: skip
    for g in grads:
        assert np.all(np.isfinite(g))
    gq = np.moveaxis(np.asarray(grads[0]), 2, 1)  # [B, N, T, H]
    np.testing.assert_array_equal(gq[dead], 0.0)


# ------------------------------------------------------------------ weights and residual


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
def test_return_weights_and_residual_leave_output_bitwise_unchanged(use_jit):
    q, k, v = _qkv()
    bias = _normal(4, (1, N, T, S))
    mask = np.array(_random_mask((B, 1, T, S)))
    mask[1, 0, 3] = False  # one fully masked row
    kw = dict(is_causal=True, local_window_size=(3, 1))

    def f(q, k, v, bias, mask, rw, rr):
        return jattn.dot_product_attention(
            q, k, v, bias, mask, return_weights=rw, return_residual=rr, **kw
        )

    if use_jit:
        f = jax.jit(f, static_argnums=(5, 6))
    plain = f(q, k, v, bias, mask, False, False)
    out_w, weights = f(q, k, v, bias, mask, True, False)
    out_r, lse = f(q, k, v, bias, mask, False, True)
    out_wr, weights2, lse2 = f(q, k, v, bias, mask, True, True)
    for other in (out_w, out_r, out_wr):
        np.testing.assert_array_equal(other, plain)
    np.testing.assert_array_equal(weights2, weights)
    np.testing.assert_array_equal(lse2, lse)
    assert weights.dtype == lse.dtype == jnp.float32
    assert weights.shape == (B, N, T, S) and lse.shape == (B, T, N)

    # Independent reference: the masked softmax of the float64 scores.
    want, want_w, want_lse = ref.attention(
        np.asarray(q), np.asarray(k), np.asarray(v), bias, mask, is_causal=True, window=(3, 1)
    )
    np.testing.assert_allclose(plain, want, **F64_TOL)
    np.testing.assert_allclose(weights, want_w, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-6, atol=1e-6)

    # And the residual of jax.nn (which defines it), on the same inputs.
    _, nn_lse = jax.nn.dot_product_attention(
        q, k, v, bias, jnp.asarray(mask), return_residual=True, is_causal=True,
        local_window_size=(3, 1),
    )  # fmt: skip
    np.testing.assert_allclose(lse, nn_lse, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ generic attention


def _additive_params(n, h, h2, a):
    return jattn.AdditiveParams(
        _normal(10, (n, h, a)), _normal(11, (n, h2, a)), _normal(12, (n, a))
    )


@pytest.mark.parametrize("score", ["additive", "bilinear"])
def test_generic_attention_per_head_params(score):
    h2, hv = 6, 3  # key head dim and value head dim both differ from H
    q, k, v = _normal(0, (B, T, N, H)), _normal(1, (B, S, K, h2)), _normal(2, (B, S, K, hv))
    if score == "additive":
        fn, np_fn, params = jattn.additive_scores, ref.additive, _additive_params(N, H, h2, 7)
    else:
        fn, np_fn, params = jattn.bilinear_scores, ref.bilinear, 0.3 * _normal(13, (N, H, h2))
    mask = _random_mask((B, 1, T, S))
    out, weights = jax.jit(
        lambda q, k, v, m, p: jattn.attention(
            q, k, v, mask=m, score_fn=fn, score_params=p, per_head_params=True,
            is_causal=True, return_weights=True,
        )
    )(q, k, v, mask, params)  # fmt: skip
    want, want_w, _ = ref.attention(
        np.asarray(q), np.asarray(k), np.asarray(v), mask=mask, score=np_fn, params=params,
        per_head_params=True, is_causal=True,
    )  # fmt: skip
    np.testing.assert_allclose(out, want, **F64_TOL)
    np.testing.assert_allclose(weights, want_w, **F64_TOL)


def test_generic_attention_shared_params_mlp():
    q, k, v = _qkv()
    params = jattn.MLPParams(*(0.5 * _normal(20 + i, (H, 5)) for i in range(3)),
                             _normal(23, (5,)), _normal(24, (5,)))  # fmt: skip
    out = jax.jit(
        lambda q, k, v, p: jattn.attention(q, k, v, score_fn=jattn.mlp_scores, score_params=p)
    )(q, k, v, params)
    want, _, _ = ref.attention(
        np.asarray(q), np.asarray(k), np.asarray(v), score=ref.mlp, params=params
    )
    np.testing.assert_allclose(out, want, **F64_TOL)


# ------------------------------------------------------------------ dropout


@functools.partial(jax.jit, static_argnames="rate")
def _dropout_many(q, k, v, keys, rate):
    """The output and weights for each PRNG key in ``keys`` (one compilation for all)."""

    def one(rng):
        return jattn.dot_product_attention(
            q, k, v, dropout_rate=rate, dropout_rng=rng, return_weights=True
        )

    return jax.vmap(one)(keys)


def _keys(n, seed=0):
    """PRNG keys from NumPy bits (jax.random.split would compile for every new shape)."""
    bits = np.random.default_rng(seed).integers(0, 2**32, (n, 2), dtype=np.uint32)
    return jax.random.wrap_key_data(jnp.asarray(bits))


def test_dropout():
    q, k, _ = _qkv()
    v = jnp.broadcast_to(jnp.eye(S)[None, :, None, :], (B, S, K, S))  # output row = probs row
    rate, draws = 0.5, 2000
    keys = _keys(draws)
    outs, weights = _dropout_many(q, k, v, keys, rate)
    probs = np.moveaxis(np.asarray(outs), 3, 2)  # [draws, B, N, T, S]: dropped-out weights
    weights = np.asarray(weights)
    kept = probs != 0
    # Every entry is either dropped (0) or the softmax weight scaled by 1 / (1 - rate).
    np.testing.assert_allclose(probs[kept], (weights / (1 - rate))[kept], rtol=1e-6, atol=1e-7)
    # The returned weights are the softmax before dropout, the same for every key.
    np.testing.assert_allclose(weights.astype(np.float64).sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(weights, np.broadcast_to(weights[:1], weights.shape))
    # The kept fraction is 1 - rate (320k Bernoulli(0.5) draws: 0.005 is > 5 sigma).
    assert abs(kept.mean() - (1 - rate)) < 0.005
    # Deterministic given the key, different for different keys.
    np.testing.assert_array_equal(_dropout_many(q, k, v, keys, rate)[0], outs)
    assert not np.array_equal(outs[0], outs[1])
    # Unbiased (inverted dropout): the mean over the keys approaches the exact output.
    # Each entry is w * Bernoulli(0.5) / 0.5 with w <= 1: standard error <= 1 / sqrt(2000)
    # = 0.022 per entry, and 0.11 is 5 standard errors.
    exact = np.asarray(jattn.dot_product_attention(q, k, v))
    mean = np.asarray(outs, np.float64).mean(0)
    np.testing.assert_allclose(mean, exact, atol=0.11)
    assert np.abs(mean - exact).mean() < 0.02


def test_dropout_rate_zero_is_no_dropout():
    q, k, v = _qkv()
    keys = _keys(2)
    outs, weights = _dropout_many(q, k, v, keys, 0.0)
    plain, plain_weights = jax.jit(
        lambda q, k, v: jattn.dot_product_attention(q, k, v, return_weights=True)
    )(q, k, v)
    np.testing.assert_allclose(outs[0], plain, rtol=1e-6, atol=1e-6)  # vmapped: not bitwise
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_allclose(weights[1], plain_weights, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ low precision


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
def test_low_precision_close_to_float32(dtype):
    q, k, v = (x.astype(dtype) for x in _qkv())
    mask = np.array(_random_mask((B, 1, T, S)))
    mask[0, 0, 1] = False  # a fully masked row
    bias = _normal(4, (1, N, T, S)).astype(dtype)

    def f(q, k, v, bias):
        return jattn.dot_product_attention(q, k, v, bias, mask, is_causal=True)

    fg = jax.jit(lambda *a: (f(*a), jax.grad(lambda *b: jnp.sum(f(*b)), argnums=(0, 1, 2, 3))(*a)))
    out, grads = fg(q, k, v, bias)
    assert out.dtype == dtype
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    for g in grads:
        assert g.dtype == dtype and np.all(np.isfinite(np.asarray(g, np.float32)))
    # The float32 result on the same rounded inputs.
    want = f(*(x.astype(jnp.float32) for x in (q, k, v, bias)))
    tol = LOW_PRECISION_TOL[dtype]
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=tol, rtol=tol)


def test_return_weights_bitwise_unchanged_on_long_sequences(monkeypatch):
    """Above the dense threshold the output comes from the blocked path either way."""
    from jattn.functional import dispatch

    monkeypatch.setattr(dispatch, "DENSE_MAX_ELEMENTS", 0)  # as if T * S were large
    q, k, v = _qkv()
    f = jax.jit(
        lambda q, k, v, rw: jattn.dot_product_attention(q, k, v, is_causal=True, return_weights=rw),
        static_argnums=3,
    )
    out, _ = f(q, k, v, True)
    np.testing.assert_array_equal(f(q, k, v, False), out)


def test_weights_from_blocked_path_equal_dense_weights():
    """Explicit 'blocked' with weights and residual: output and lse from the blocked path,
    weights from the dense softmax, in the order (output, weights, residual)."""
    q, k, v = _qkv()
    f = jax.jit(
        lambda q, k, v, impl: jattn.dot_product_attention(
            q, k, v, is_causal=True, implementation=impl, return_weights=True,
            return_residual=True,
        ),
        static_argnums=3,
    )  # fmt: skip
    out_b, w_b, lse_b = f(q, k, v, "blocked")
    out_d, w_d, lse_d = f(q, k, v, "dense")
    np.testing.assert_array_equal(w_b, w_d)
    np.testing.assert_allclose(out_b, out_d, atol=1e-6, rtol=0)
    np.testing.assert_allclose(lse_b, lse_d, atol=1e-6, rtol=0)
    only_out = jax.jit(
        lambda q, k, v: jattn.dot_product_attention(
            q, k, v, is_causal=True, implementation="blocked"
        )
    )(q, k, v)
    np.testing.assert_array_equal(only_out, out_b)
