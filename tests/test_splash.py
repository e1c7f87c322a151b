"""The TPU splash kernel driven by jattn's mask functions, run by the Pallas TPU
interpreter on CPU: outputs and gradients equal the dense path; selection and refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import mods
from jattn.functional import dispatch, kernels

B, T, N, K, H = 1, 256, 4, 2, 32
Q, KEY, V = (jax.random.normal(jax.random.key(i), (B, T, n, H)) for i, n in enumerate((N, K, K)))
PATTERNS = {
    "causal + window": dict(is_causal=True, local_window_size=(40, 0)),
    "per head, one head fully masked": dict(
        mask_mod=mods.per_head(
            [mods.causal(), mods.sliding_window(20), mods.strided(7), mods.not_mask(mods.full())]
        )
    ),
    "softcap": dict(mask_mod=mods.causal(), score_mod=mods.softcap(2.0)),
}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_splash_equals_dense_with_gradients(name):
    kw = PATTERNS[name]

    def loss(path, q, k, v):
        if path == "splash":
            spec = dispatch.unchecked_spec(q, k, v, **kw)
            out = kernels.splash_attention(spec, interpret=True)[0]
        else:
            out = jattn.dot_product_attention(q, k, v, implementation="dense", **kw)
        return jnp.sum(jnp.sin(out)), out

    spec = dispatch.unchecked_spec(Q, KEY, V, **kw)
    assert dispatch._splash_problems(spec, interpret=True) == []
    # compiled (op by op the interpreter and the gradients are several times slower)
    grad = jax.jit(jax.value_and_grad(loss, (1, 2, 3), has_aux=True), static_argnums=0)
    (_, got), g_got = grad("splash", Q, KEY, V)
    (_, want), g_want = grad("dense", Q, KEY, V)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    for a, b in zip(g_got, g_want, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_selection_and_refusals(monkeypatch):
    monkeypatch.setattr(dispatch, "_platform", lambda: "tpu")
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (Q, KEY, V)]
    assert dispatch.select(None, *shapes, mask_mod=mods.sliding_window(8)) == "splash"
    assert dispatch.select(None, *shapes, is_causal=True) == "pallas"  # no mask functions
    two = [jax.ShapeDtypeStruct((2,) + x.shape[1:], x.dtype) for x in (Q, KEY, V)]
    seg = mods.segments(jnp.zeros((2, T), jnp.int32))
    assert dispatch.select(None, *two, mask_mod=seg) != "splash"  # depends on b
    with pytest.raises(ValueError, match="depends on the example"):
        dispatch.select("splash", *two, mask_mod=seg)
    with pytest.raises(ValueError, match="score_mod other than jattn.mods.softcap"):
        dispatch.select("splash", *shapes, score_mod=mods.alibi(jnp.ones(N)))
    with pytest.raises(ValueError, match=r"bias; .*key_value_seq_lengths"):
        dispatch.select("splash", *shapes, bias=jnp.zeros((T, T)),
                        key_value_seq_lengths=jnp.full((B,), T))  # fmt: skip
    short = [jax.ShapeDtypeStruct((B, 100, n, H), jnp.float32) for n in (N, K, K)]
    with pytest.raises(ValueError, match="multiples of 128"):
        dispatch.select("splash", *short, mask_mod=mods.causal())
    monkeypatch.setattr(dispatch, "_platform", lambda: "cpu")
    with pytest.raises(ValueError, match="the splash kernel needs a TPU"):
        dispatch.select("splash", *shapes, mask_mod=mods.causal())


def test_kernels_hide_non_finite_inputs():
    """The kernels read values at masked positions (``0 * NaN`` in a tile's product);
    behind the guard (``dispatch._hiding``) a NaN or inf that no row sees reaches no
    output or gradient, and one a row sees makes exactly that row NaN, as on the XLA
    paths. Splash: the last 8 keys hidden from every query by the mask_mod; Pallas
    flash attention: a NaN value at position 5 under the causal mask."""
    hide_tail = mods.and_masks(mods.causal(), mods.as_mod(lambda b, n, q, kv: kv < T - 8))
    k_bad = KEY.at[:, T - 8 :].set(jnp.nan)
    v_bad = V.at[:, T - 8 :, 0, 3].set(jnp.inf)

    def splash(q, k, v):
        spec = dispatch.unchecked_spec(q, k, v, mask_mod=hide_tail)
        return dispatch.PATHS["splash"](spec, interpret=True)[0]

    def dense(q, k, v):
        return jattn.dot_product_attention(q, k, v, implementation="dense", mask_mod=hide_tail)

    def value_and_grads(fn):  # one compiled interpreted run for both
        return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), (0, 1, 2)))

    got, got_grads = value_and_grads(splash)(Q, k_bad, v_bad)
    want, want_grads = value_and_grads(dense)(Q, KEY, V)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for name, a, b in zip("qkv", got_grads, want_grads, strict=True):
        assert np.isfinite(a).all(), name
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert (np.asarray(got_grads[1])[:, T - 8 :] == 0).all()

    v_nan = V.at[0, 5, 1, 0].set(jnp.nan)  # key/value head 1: query heads 2 and 3
    spec = dispatch.unchecked_spec(Q, KEY, v_nan, is_causal=True)
    assert dispatch._pallas_problems(spec, interpret=True) == []
    pallas = jax.jit(
        lambda q, k, v: dispatch.PATHS["pallas"](
            dispatch.unchecked_spec(q, k, v, is_causal=True), interpret=True
        )[0]
    )
    out = np.asarray(pallas(Q, KEY, v_nan))
    ref = np.asarray(jattn.dot_product_attention(Q, KEY, V, implementation="dense", is_causal=True))
    nan_rows = np.zeros((B, T, N), bool)
    nan_rows[:, 5:, 2:] = True  # the rows that see position 5 in those heads
    np.testing.assert_array_equal(np.isnan(out).any(-1), nan_rows)
    np.testing.assert_allclose(out[~nan_rows], ref[~nan_rows], rtol=0, atol=1e-6)
