"""Linformer, Nystromformer and Performer: exact reductions, unbiasedness, forms, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.functional import lowrank as LR


def _normal(seed, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


B, T, N, K, H = 2, 12, 4, 2, 8
Q, KEY, V = _normal(0, (B, T, N, H)), _normal(1, (B, T, K, H)), _normal(2, (B, T, K, 5))


def test_linformer_identity_projection_is_softmax_and_shorter_sequences_are_padding():
    v8 = _normal(11, (B, T, K, H))  # jax.nn needs Hv == H
    want = jax.nn.dot_product_attention(Q, jnp.repeat(KEY, 2, 2), jnp.repeat(v8, 2, 2))
    eye = jnp.eye(T)
    np.testing.assert_allclose(LR.linformer_attention(Q, KEY, v8, eye), want, atol=1e-6)
    per_head = jnp.stack([eye, eye])  # [K, k, S]
    np.testing.assert_allclose(LR.linformer_attention(Q, KEY, v8, per_head), want, atol=1e-6)
    # E learned for S_max = 16: S = 12 uses its first 12 columns; padding inside S is
    # zeroed before projecting, as if the sequence were that much shorter
    e = _normal(3, (6, 16), 0.3)
    lengths = jnp.array([12, 7])
    got = LR.linformer_attention(Q, KEY, V, e, key_value_seq_lengths=lengths)
    short = LR.linformer_attention(Q[1:], KEY[1:, :7], V[1:, :7], e)
    np.testing.assert_allclose(got[1], short[0], atol=1e-6)
    full = LR.linformer_attention(Q[:1], KEY[:1], V[:1], e[:, :12])
    np.testing.assert_allclose(got[0], full[0], atol=1e-6)


def test_nystrom_with_every_token_a_landmark_is_softmax():
    q = _normal(4, (1, 10, 2, 8), 2.0)  # peaked attention: a well-conditioned kernel
    k = _normal(5, (1, 10, 2, 8), 2.0)
    v = _normal(6, (1, 10, 2, 8))
    want = jax.nn.dot_product_attention(q, k, v)
    got = LR.nystrom_attention(q, k, v, 10, pinv_iterations=40)
    np.testing.assert_allclose(got, want, atol=2e-4)
    # fewer landmarks approximate it; the error grows as they get fewer
    err = float(jnp.abs(got - want).max())
    assert err < float(jnp.abs(LR.nystrom_attention(q, k, v, 2) - want).max())


def test_eager_calls_are_one_cached_program_equal_to_op_by_op():
    """Eagerly, Nystromformer (its pseudo-inverse a loop) and Linformer each run as one
    compiled program: a repeat compiles nothing, new lengths neither, and the results
    equal the op-by-op run (jax.disable_jit)."""
    from jattn.functional._eager import _jitted as run

    q, k, v = Q[:, :11, :, :7], KEY[:, :11, :, :7], V[:, :11]  # shapes no other test uses
    e = _normal(7, (5, 11), 0.3)
    calls = {
        "nystrom": lambda lens: LR.nystrom_attention(q, k, v, 3),
        "linformer": lambda lens: LR.linformer_attention(q, k, v, e, key_value_seq_lengths=lens),
    }
    for name, call in calls.items():
        before = run._cache_size()
        got = call(jnp.array([11, 4]))
        call(jnp.array([6, 9]))
        assert run._cache_size() == before + 1, name
        with jax.disable_jit():
            want = call(jnp.array([11, 4]))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=name)


def test_favor_features_are_unbiased_at_the_papers_rate():
    """The mean of phi(q).phi(k) over independent orthogonal draws is exp(q.k/sqrt(H))
    within 4 standard errors, and the error variance falls as 1/M."""
    h = 8
    q, k = _normal(7, (3, h), 0.5), _normal(8, (3, h), 0.5)
    want = np.exp(np.sum(np.asarray(q, np.float64) * np.asarray(k), -1) / np.sqrt(h))

    def estimates(m, draws):
        keys = jax.random.split(jax.random.key(9), draws)

        def one(key):
            w = LR.orthogonal_random_features(key, m, h)
            return jnp.sum(LR.favor_features(q, w) * LR.favor_features(k, w), -1)

        return np.asarray(jax.vmap(one)(keys), np.float64)  # [draws, 3]

    est = estimates(16, 1000)
    se = est.std(0) / np.sqrt(est.shape[0])
    assert np.all(np.abs(est.mean(0) - want) < 4 * se), (est.mean(0), want, se)
    mse_small = ((estimates(8, 300) - want) ** 2).mean()
    mse_large = ((estimates(128, 300) - want) ** 2).mean()
    assert 16 / 3 < mse_small / mse_large, (mse_small, mse_large)  # >= 1/M, orthogonal helps


@pytest.mark.parametrize("kind", ["softmax", "relu"])
def test_performer_is_normalised_feature_attention_in_every_form(kind):
    w = LR.orthogonal_random_features(jax.random.key(10), 32, H)
    fq = LR.favor_features(Q, w, kind=kind, stabilizer=None if kind == "relu" else "row")
    fq = np.asarray(fq, np.float64)
    if kind == "relu":
        fk, log_fk = np.asarray(LR.favor_features(KEY, w, kind=kind), np.float64), None
    else:  # float64 logs of the features, stabilised below by the max each row sees
        x = np.asarray(KEY, np.float64) * H**-0.25
        log_fk = x @ np.asarray(w, np.float64).T - 0.5 * (x * x).sum(-1, keepdims=True)
        fk = np.exp(log_fk) / np.sqrt(w.shape[0])
    fk = np.repeat(fk, 2, 2)
    v = np.repeat(np.asarray(V, np.float64), 2, 2)
    s = np.einsum("btnf,bsnf->bnts", fq, fk)
    for causal in (False, True):
        sc = s * np.tril(np.ones((T, T))) if causal else s
        if log_fk is not None:  # keys: the max over the keys a row sees (causal: up to it)
            top = np.repeat(log_fk.max(-1), 2, 2).transpose(0, 2, 1)  # [B, N, S]
            top = np.maximum.accumulate(top, -1) if causal else top.max(-1, keepdims=True)
            sc = sc * np.exp(-top)[..., None]
        den = sc.sum(-1).transpose(0, 2, 1)[..., None] + 1e-6
        want = np.einsum("bnts,bsnh->btnh", sc, v) / den
        # float32 sums of T terms: error relative to sum |s v| / den, not to the result
        cond = np.einsum("bnts,bsnh->btnh", sc, np.abs(v)) / den
        forms = ("parallel", "chunked", "recurrent") if causal else (None,)
        for form in forms:
            got = LR.performer_attention(
                Q, KEY, V, w, kind=kind, is_causal=causal, implementation=form, chunk_size=5
            )
            assert np.all(np.abs(np.asarray(got, np.float64) - want) <= 1e-5 * (1 + cond))


def test_errors():
    w = LR.orthogonal_random_features(jax.random.key(0), 16, H)
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        LR.orthogonal_random_features(jax.random.key(0), 0, H)
    with pytest.raises(ValueError, match=r"projection must be \[M, H\] = \[M, 8\]"):
        LR.performer_attention(Q, KEY, V, w[:, :4])
    with pytest.raises(ValueError, match="kind must be 'softmax' or 'relu'"):
        LR.performer_attention(Q, KEY, V, w, kind="exp")
    with pytest.raises(ValueError, match="up to S_max=8 keys, got S=12"):
        LR.linformer_attention(Q, KEY, V, jnp.ones((4, 8)))
    with pytest.raises(ValueError, match=r"must be \[k, S_max\] or \[K=2, k, S_max\]"):
        LR.linformer_attention(Q, KEY, V, jnp.ones((3, 4, 12)))
    with pytest.raises(ValueError, match="num_landmarks=13 must be at most"):
        LR.nystrom_attention(Q, KEY, V, 13)
    with pytest.raises(ValueError, match="query heads are not a multiple"):
        LR.nystrom_attention(Q[:, :, :3], KEY, V, 4)
