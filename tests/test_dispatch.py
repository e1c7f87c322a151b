"""Implementation selection: which path runs for which shape, dtype and device, and the errors."""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.functional import dispatch
from jattn.functional.attention import dot_product_attention


def _spec(b, t, n, h, dtype=jnp.float32):
    return jax.ShapeDtypeStruct((b, t, n, h), dtype)


def _select(
    impl, t=1024, s=None, *, n=8, k=8, h=64, hv=None, dtype=jnp.float32, bias=None, mask=None, **kw
):
    s = t if s is None else s
    q, key = _spec(1, t, n, h, dtype), _spec(1, s, k, h, dtype)
    v = _spec(1, s, k, h if hv is None else hv, dtype)
    return dispatch.select(impl, q, key, v, bias, mask, **kw)


def test_select_options_are_dot_product_attentions():
    """select's defaults are dot_product_attention's (so they cannot drift), left-out
    options take them on every platform, and a misspelt option is an error."""
    signature = {
        name: p.default
        for name, p in inspect.signature(dot_product_attention).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "implementation"
    }
    assert dispatch.OPTION_DEFAULTS == signature
    q = _spec(1, 1024, 8, 64, jnp.bfloat16)
    for name, expected in (("cpu", "blocked"), ("gpu", "cudnn"), ("tpu", "pallas")):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dispatch, "_platform", lambda name=name: name)
            assert dispatch.select(None, q, q, q) == expected
    with pytest.raises(TypeError, match=r"unknown options \['causal'\].*'is_causal'"):
        dispatch.select(None, q, q, q, causal=True)


@pytest.fixture
def platform(monkeypatch):
    def set_platform(name):
        monkeypatch.setattr(dispatch, "_platform", lambda: name)

    return set_platform


def test_cpu_selection():
    assert _select(None, t=64) == "dense"
    assert _select(None, t=4096) == "blocked"
    assert _select(None, t=4096, return_weights=True) == "blocked"  # weights computed apart
    assert _select("xla", t=4096) == "dense"
    assert _select("dense", t=8) == "dense"
    assert _select("blocked", t=8) == "blocked"


def test_gpu_selection(platform):
    platform("gpu")
    assert _select(None, dtype=jnp.bfloat16) == "cudnn"
    assert _select(None, dtype=jnp.float16, is_causal=True, bias=True) == "cudnn"
    # cuDNN takes 16-bit inputs only; float32 runs dense while its float32 scores
    # [B, N, T, S] fit in ACCELERATOR_DENSE_MAX_BYTES (1 GiB), blocked beyond
    assert _select(None, dtype=jnp.float32) == "dense"  # 8 x 1024^2 x 4 B = 32 MiB
    assert _select(None, t=8192, dtype=jnp.float32) == "blocked"  # 2 GiB
    assert _select(None, t=8192, n=2, k=2, dtype=jnp.float32) == "dense"  # 512 MiB
    for kw in (
        dict(mask=True),
        dict(dropout_rate=0.1),
        dict(hv=32),
        dict(h=256),
        dict(local_window_size=(8, 8)),
        dict(key_value_seq_lengths=True),
        dict(return_residual=True),
    ):
        assert _select(None, dtype=jnp.bfloat16, **kw) == "dense", kw
        assert _select(None, t=16384, dtype=jnp.bfloat16, **kw) == "blocked", kw


def test_tpu_selection(platform):
    platform("tpu")
    assert _select(None, t=256) == "pallas"
    assert _select(None, t=256, s=512, n=8, k=2, is_causal=True) == "pallas"
    assert _select(None, t=1000) == "dense"  # not a multiple of 128; scores 32 MiB
    assert _select(None, t=10000) == "blocked"  # scores 3 GiB
    assert _select(None, t=512, mask=True) == "dense"
    assert _select(None, t=16384, mask=True) == "blocked"


def test_explicit_errors(platform):
    with pytest.raises(ValueError, match="unknown implementation 'fast'"):
        _select("fast")
    assert _select("blocked", return_weights=True) == "blocked"
    with pytest.raises(ValueError, match=r"'cudnn' does not support: device 'cpu'.*dtype float32"):
        _select("cudnn")
    with pytest.raises(ValueError, match=r"'pallas' does not support: device 'cpu'"):
        _select("pallas")
    platform("gpu")
    with pytest.raises(ValueError, match=r"'cudnn' does not support: dropout; boolean masks"):
        _select("cudnn", dtype=jnp.bfloat16, mask=True, dropout_rate=0.1)
    with pytest.raises(ValueError, match=r"head dim H=256"):
        _select("cudnn", dtype=jnp.bfloat16, h=256)
    platform("tpu")
    with pytest.raises(ValueError, match=r"'pallas' does not support: lengths T=100, S=100"):
        _select("pallas", t=100)
    with pytest.raises(ValueError, match=r"query_seq_lengths"):
        _select("pallas", t=128, query_seq_lengths=True)
    with pytest.raises(ValueError, match=r"unknown implementation 'fast'"):
        dot_product_attention(
            jnp.ones((1, 4, 1, 8)), *(jnp.ones((1, 4, 1, 8)),) * 2, implementation="fast"
        )


def test_default_block_sizes():
    assert dispatch.default_block_sizes(4096, 4096, 64) == (512, 512)
    assert dispatch.default_block_sizes(4096, 4096, 64, masked_band=True) == (512, 256)
    # Many heads: halved until B*N*bq*bk <= MAX_TILE_ELEMENTS, query block first.
    assert dispatch.default_block_sizes(4096, 4096, 64, batch_heads=64) == (256, 512)
    assert dispatch.default_block_sizes(4096, 4096, 64, batch_heads=4096) == (128, 128)
    assert dispatch.default_block_sizes(100, 300, 64) == (100, 300)


def test_default_path_runs_blocked_and_matches_dense(monkeypatch):
    """implementation=None above the threshold runs the blocked path, with dense results."""
    monkeypatch.setattr(dispatch, "DENSE_MAX_ELEMENTS", 0)
    ran = []
    run = dispatch.run

    def spy(impl, *a, **kw):
        ran.append(impl)
        return run(impl, *a, **kw)

    monkeypatch.setattr(dispatch, "run", spy)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 24, 2, 8)), jnp.float32) for _ in range(3))
    lens = jnp.array([20, 3], jnp.int32)

    @jax.jit
    def both(q, k, v):
        fast = dot_product_attention(
            q, k, v, is_causal=True, key_value_seq_lengths=lens, return_residual=True
        )
        dense = dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            key_value_seq_lengths=lens,
            return_residual=True,
            implementation="dense",
        )
        return fast, dense

    (out, lse), (out_d, lse_d) = both(q, k, v)
    assert ran == ["blocked"]
    np.testing.assert_allclose(out, out_d, rtol=0, atol=1e-6)
    np.testing.assert_allclose(lse, lse_d, rtol=0, atol=1e-6)


def test_pallas_kernel_in_interpret_mode():
    """The TPU flash-attention kernel, run by the Pallas interpreter on CPU, equals dense."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 128, 2, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, 128, 1, 8)), jnp.float32) for _ in range(2))
    bias = jnp.asarray(rng.standard_normal((1, 1, 128, 128)), jnp.float32)
    opts = dict(is_causal=True, scale=0.3)
    out = dispatch.pallas_attention(q, k, v, bias, interpret=True, **opts)
    ref = dot_product_attention(q, k, v, bias, is_causal=True, scale=0.3)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)

    # -inf biases: on some keys (weight 0), on every key a causal row sees (zeros, as
    # dense; the kernel alone gives NaN there), and with a scale above 1
    bias = bias.at[..., 5, :].set(-jnp.inf).at[..., 9, :10].set(-jnp.inf)
    bias = bias.at[..., 20, 7:50].set(-jnp.inf)
    for scale in (0.3, 4.0):
        opts = dict(is_causal=True, scale=scale)
        out = dispatch.pallas_attention(q, k, v, bias, interpret=True, **opts)
        ref = dot_product_attention(q, k, v, bias, is_causal=True, scale=scale)
        np.testing.assert_array_equal(out[0, 5], 0.0)
        np.testing.assert_array_equal(out[0, 9], 0.0)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


def test_pallas_causal_is_not_chosen_with_x64(platform):
    """JAX's TPU flash kernel's causal mask fails to trace under jax_enable_x64 (an
    int64/int32 select); without is_causal it runs."""
    platform("tpu")
    q = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.float32)
    assert dispatch.select(None, q, q, q, is_causal=True) == "pallas"
    with jax.enable_x64(True):
        assert dispatch.select(None, q, q, q) == "pallas"
        assert dispatch.select(None, q, q, q, is_causal=True) == "dense"
        with pytest.raises(ValueError, match="does not support: is_causal with jax_enable_x64"):
            dispatch.select("pallas", q, q, q, is_causal=True)


def test_pallas_is_not_chosen_for_a_zero_scale_with_a_bias(monkeypatch):
    monkeypatch.setattr(dispatch, "_platform", lambda: "tpu")
    q = k = v = jnp.ones((1, 128, 1, 8))
    bias = jnp.ones((128, 128))
    assert dispatch.select(None, q, k, v, bias, **dict(scale=0.5)) == "pallas"
    assert dispatch.select(None, q, k, v, bias, **dict(scale=0.0)) == "dense"
    with pytest.raises(ValueError, match="scale=0 with a bias"):
        dispatch.select("pallas", q, k, v, bias, **dict(scale=0.0))


def test_pallas_interpret_mode_gradients():
    """Interpret mode covers the backward kernels too: gradients equal dense ones."""
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 128, 1, 8)), jnp.float32) for _ in range(3))

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))

    def pallas(q, k, v):
        return dispatch.pallas_attention(q, k, v, interpret=True, is_causal=True)

    def dense(q, k, v):
        return dot_product_attention(q, k, v, is_causal=True, implementation="dense")

    # jitted and blocked on before anything else is dispatched (see pallas_attention)
    grads = jax.block_until_ready(jax.jit(jax.grad(loss(pallas), argnums=(0, 1, 2)))(q, k, v))
    ref = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(grads, ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=0, atol=2e-5)


BAD_INPUTS = [  # (keyword arguments, error) that every path must reject at the boundary
    (dict(fully_masked="bogus"), (ValueError, "fully_masked")),
    (dict(dropout_rate=-0.5), (ValueError, r"dropout_rate must be in \[0, 1\)")),
    (dict(bias=jnp.zeros((1, 1, 256, 256), jnp.int32)), (TypeError, "bias must have a floating")),
    (dict(bias=jnp.zeros((2, 1, 256, 256))), (ValueError, "bias of shape")),
    (dict(query_seq_lengths=jnp.array([2.7])), (TypeError, "must be an integer array")),
    (dict(is_causal="yes"), (TypeError, "is_causal must be a bool, got 'yes'")),
]


@pytest.mark.parametrize("platform_name", ["gpu", "tpu"])
@pytest.mark.parametrize("kwargs, error", BAD_INPUTS)
def test_every_path_checks_inputs_at_the_boundary(platform, platform_name, kwargs, error):
    """The cuDNN and Pallas runners check nothing themselves: a call that raises on CPU
    raises the same error where those paths would be chosen (simulated devices)."""
    platform(platform_name)
    dtype = jnp.bfloat16 if platform_name == "gpu" else jnp.float32
    q = jnp.ones((1, 256, 2, 64), dtype)
    kwargs = dict(kwargs)
    bias = kwargs.pop("bias", None)
    for impl in (None, "cudnn" if platform_name == "gpu" else "pallas"):
        with pytest.raises(error[0], match=error[1]):
            dot_product_attention(q, q, q, bias, implementation=impl, **kwargs)


def test_cudnn_path_hides_non_finite_inputs(platform, monkeypatch):
    """jax.nn's XLA path standing in for cuDNN (no GPU here; it leaks as a kernel does:
    ``0 * NaN`` at masked positions): behind the guard a NaN value hidden by the causal
    mask reaches no row that cannot see it, and the rows that see it are NaN."""
    platform("gpu")
    original = jax.nn.dot_product_attention
    monkeypatch.setattr(
        jax.nn,
        "dot_product_attention",
        lambda *a, implementation=None, **kw: original(*a, implementation="xla", **kw),
    )
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 16, 2, 8)), jnp.bfloat16) for _ in range(3))
    v_nan = v.at[0, 5, 1, 0].set(jnp.nan)
    run = jax.jit(functools.partial(dot_product_attention, implementation="cudnn", is_causal=True))
    out = np.asarray(run(q, k, v_nan), np.float32)
    ref = np.asarray(dot_product_attention(q, k, v, is_causal=True), np.float32)
    nan_rows = np.zeros((1, 16, 2), bool)
    nan_rows[:, 5:, 1] = True
    np.testing.assert_array_equal(np.isnan(out).any(-1), nan_rows)
    np.testing.assert_allclose(out[~nan_rows], ref[~nan_rows], atol=2e-2)


def test_cudnn_runner_gives_the_dense_results(platform, monkeypatch):
    """cuDNN's wrapper, run with jax.nn's XLA path standing in for cuDNN (no GPU here):
    rows whose biases are all -inf give zeros with finite gradients (the kernel alone
    gives NaN), padded queries give zeros, lengths are checked and clipped (as dense)."""
    platform("gpu")
    original = jax.nn.dot_product_attention
    calls = []

    def stand_in(*args, implementation=None, **kwargs):
        calls.append(implementation)
        return original(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 16, 2, 8)), jnp.bfloat16) for _ in range(3))
    bias = jnp.asarray(rng.standard_normal((2, 1, 16, 16)), jnp.bfloat16)
    bias = bias.at[0, :, 3, :].set(-jnp.inf).at[1, :, 5, :6].set(-jnp.inf)
    lengths = jnp.array([16, 2**20])  # clipped to T, as dense does
    opts = dict(is_causal=True, query_seq_lengths=lengths)

    def loss(impl):
        def f(q, k, v):
            out = dot_product_attention(q, k, v, bias, implementation=impl, **opts)
            return jnp.sum(out.astype(jnp.float32) ** 2), out

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

    (_, out), grads = loss("cudnn")(q, k, v)
    assert calls and set(calls) == {"cudnn"}
    (_, ref), ref_grads = loss("dense")(q, k, v)
    np.testing.assert_array_equal(out[0, 3], 0.0)
    np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), atol=2e-2)
    for g, r in zip(grads, ref_grads, strict=True):
        assert np.all(np.isfinite(np.asarray(g, np.float32)))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), atol=5e-2)
    short = dict(opts, query_seq_lengths=jnp.array([4, 16]))
    out = dot_product_attention(q, k, v, bias, implementation="cudnn", **short)
    np.testing.assert_array_equal(out[0, 4:], 0.0)  # padded queries: zeros, as dense
    with pytest.raises(ValueError, match="key_value_seq_lengths"):
        dot_product_attention(q, k, v, implementation="cudnn", key_value_seq_lengths=lengths)
