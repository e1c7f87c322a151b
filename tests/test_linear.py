"""Linear attention, retention and GLA: each form equals a float64 NumPy recurrence;
parallel == chunked == recurrent for outputs, states and gradients; prefill + steps ==
the whole sequence; clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn.functional import linear as L

B, T, N, K, H, HV = 2, 21, 4, 2, 8, 6
FORMS = ("parallel", "chunked", "recurrent")


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


Q, KEY, V = _normal(0, (B, T, N, H)), _normal(1, (B, T, K, H)), _normal(2, (B, T, K, HV))
SEG = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 3, (B, T)), axis=1), jnp.int32)
LOG_GATES = jax.nn.log_sigmoid(_normal(3, (B, T, N, H)) + 2.0)
DECAY = L.retnet_decays(N)


def _np_recurrence(fq, fk, v, log_a, seg, s0):
    """float64 loop: S_t = a_t S_{t-1} + k_t^T v_t, o_t = q_t S_t (reset where seg
    changes)."""
    fq, fk, v, log_a = (np.asarray(x, np.float64) for x in (fq, fk, v, log_a))
    fk, v = np.repeat(fk, N // K, 2), np.repeat(v, N // K, 2)
    out = np.zeros(fq.shape[:3] + (v.shape[-1],))
    state = np.array(s0, np.float64)
    for t in range(T):
        reset = np.zeros(B, bool) if t == 0 else np.asarray(seg[:, t] != seg[:, t - 1])
        a = np.exp(log_a[:, t])[..., None]  # [B, N, F|1, 1]
        state = np.where(reset[:, None, None, None], 0.0, a * state)
        state = state + fk[:, t, :, :, None] * v[:, t, :, None, :]
        out[:, t] = np.einsum("bnf,bnfh->bnh", fq[:, t], state)
    return out, state


def _close(got, want, tol=1e-5):
    """Max error within ``tol`` of the reference's scale (sums of up to T terms)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.abs(want).max()))
    assert float(np.abs(got - want).max()) <= tol * scale, (np.abs(got - want).max(), scale)


def _run(mech, form, q, k, v, extra, s0, seg=SEG):
    kw = dict(segment_ids=seg, implementation=form, chunk_size=8, return_state=True)
    if mech == "linear":
        return jattn.linear_attention(q, k, v, is_causal=True, initial_state=s0, **kw)
    if mech == "retention":
        return L.retention(q, k, v, extra, initial_state=s0, **kw)
    return L.gated_linear_attention(q, k, v, extra, initial_state=s0, **kw)


@pytest.mark.parametrize("mech", ["linear", "retention", "gla"])
def test_forms_equal_numpy_and_each_other_with_gradients(mech):
    extra = {"linear": None, "retention": DECAY, "gla": LOG_GATES}[mech]
    f = H
    s0 = L.LinearState(0.1 * _normal(4, (B, N, f, HV)))
    if mech == "linear":
        s0 = L.LinearState(jnp.abs(s0.kv), jnp.abs(_normal(5, (B, N, f))))
        fq, fk = L.elu_feature_map(Q), L.elu_feature_map(KEY)
        log_a = np.zeros((B, T, N, 1))
    else:
        fq, fk = Q, KEY
        log_a = (
            np.broadcast_to(np.log(np.asarray(DECAY, np.float64))[:, None], (B, T, N, 1))
            if mech == "retention"
            else LOG_GATES
        )
    if mech == "linear":  # normalised, from the initial (kv, k_sum)
        want, want_s = _np_linear_with_ksum(fq, fk, s0)
    else:
        want, want_s = _np_recurrence(fq, fk, V, log_a, SEG, s0.kv)

    def loss(form, q, k, v, extra, kv0):
        state = s0._replace(kv=kv0)
        out, st = _run(mech, form, q, k, v, extra, state)
        return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.cos(st.kv)), (out, st)

    grads = {}
    argnums = (1, 2, 3, 5) if extra is None else (1, 2, 3, 4, 5)
    grad = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True), static_argnums=0)
    for form in FORMS:
        (_, (out, st)), g = grad(form, Q, KEY, V, extra, s0.kv)
        _close(out, want)
        _close(st.kv, want_s)
        grads[form] = g
    for form in ("chunked", "recurrent"):
        for a, b in zip(grads[form], grads["parallel"], strict=True):
            _close(a, b)
    assert all(float(jnp.abs(g).max()) > 0 for g in grads["parallel"])


def _np_linear_with_ksum(fq, fk, s0):
    """The normalised recurrence with an initial ``(kv, k_sum)``, in float64."""
    fq, fk, v = (np.asarray(x, np.float64) for x in (fq, fk, V))
    fk, v = np.repeat(fk, N // K, 2), np.repeat(v, N // K, 2)
    kv, z = np.array(s0.kv, np.float64), np.array(s0.k_sum, np.float64)
    seg = np.asarray(SEG)
    out = np.zeros((B, T, N, HV))
    for t in range(T):
        reset = np.zeros(B, bool) if t == 0 else seg[:, t] != seg[:, t - 1]
        kv = np.where(reset[:, None, None, None], 0.0, kv) + fk[:, t, ..., None] * v[:, t, :, None]
        z = np.where(reset[:, None, None], 0.0, z) + fk[:, t]
        num = np.einsum("bnf,bnfh->bnh", fq[:, t], kv)
        out[:, t] = num / (np.einsum("bnf,bnf->bn", fq[:, t], z)[..., None] + L.EPS)
    return out, kv


@pytest.mark.parametrize("segments", [False, True])
def test_non_causal_linear_attention_equals_numpy(segments):
    seg = SEG if segments else None
    got = jattn.linear_attention(Q, KEY, V, segment_ids=seg)
    fq = np.asarray(L.elu_feature_map(Q), np.float64)
    fk = np.repeat(np.asarray(L.elu_feature_map(KEY), np.float64), N // K, 2)
    v = np.repeat(np.asarray(V, np.float64), N // K, 2)
    s = np.einsum("btnf,bsnf->bnts", fq, fk)
    if segments:
        s = s * (np.asarray(seg)[:, None, :, None] == np.asarray(seg)[:, None, None, :])
    want = np.einsum("bnts,bsnh->btnh", s, v) / (s.sum(-1).transpose(0, 2, 1)[..., None] + L.EPS)
    _close(got, want, 1e-6)


def test_an_eager_call_is_one_cached_program():
    """Eagerly, each form runs as one compiled program (jattn.functional._eager): a
    repeated call compiles nothing, and the results equal the op-by-op run."""
    from jattn.functional._eager import _jitted as run

    q, k, v, g, seg = (x[:, :19] for x in (Q, KEY, V, LOG_GATES, SEG))  # shapes new here
    before = run._cache_size()
    got = _run("gla", "chunked", q, k, v, g, None, seg)
    _run("gla", "chunked", q, k, v, g, None, seg)
    non_causal = jattn.linear_attention(q, k, v, segment_ids=seg)
    jattn.linear_attention(q, k, v, segment_ids=seg)
    assert run._cache_size() == before + 2
    with jax.disable_jit():
        want = _run("gla", "chunked", q, k, v, g, None, seg)
        want_non_causal = jattn.linear_attention(q, k, v, segment_ids=seg)
    got, want = jax.tree.leaves((got, non_causal)), jax.tree.leaves((want, want_non_causal))
    assert len(got) == len(want) == 3  # output, state.kv; output
    for a, b in zip(got, want, strict=True):
        _close(a, b, 1e-6)


def test_prefill_then_token_steps_equal_the_whole_sequence():
    full, st_full = L.gated_linear_attention(Q, KEY, V, LOG_GATES, return_state=True)
    out, st = L.gated_linear_attention(
        Q[:, :13], KEY[:, :13], V[:, :13], LOG_GATES[:, :13], return_state=True
    )
    step = jax.jit(
        lambda q, k, v, g, st: L.gated_linear_attention(
            q, k, v, g, initial_state=st, return_state=True, implementation="recurrent"
        )
    )
    outs = [out]
    for t in range(13, T):
        o, st = step(*(x[:, t : t + 1] for x in (Q, KEY, V, LOG_GATES)), st)
        outs.append(o)
    _close(jnp.concatenate(outs, axis=1), full)
    _close(st.kv, st_full.kv)


def test_errors():
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        jattn.linear_attention(Q, KEY, V, is_causal=True, chunk_size=0)
    with pytest.raises(ValueError, match="implementation must be one of"):
        jattn.linear_attention(Q, KEY, V, is_causal=True, implementation="scan")
    with pytest.raises(ValueError, match=r"initial_state.kv must be \[2, 4, 8, 6\]"):
        L.retention(Q, KEY, V, DECAY, initial_state=L.LinearState(jnp.zeros((2, 4, 8, 5))))
    with pytest.raises(ValueError, match=r"initial_state.k_sum must be \[2, 4, 8\], got None"):
        jattn.linear_attention(
            Q, KEY, V, is_causal=True, initial_state=L.LinearState(jnp.zeros((2, 4, 8, 6)))
        )
    with pytest.raises(ValueError, match="initial_state and return_state need is_causal"):
        jattn.linear_attention(Q, KEY, V, return_state=True)
    with pytest.raises(ValueError, match=r"decay must be a float \[N\] = \[4\]"):
        L.retention(Q, KEY, V, jnp.ones(3))
    with pytest.raises(ValueError, match=r"log_gates must be a float \[B, T, N, H\]"):
        L.gated_linear_attention(Q, KEY, V, LOG_GATES[..., :4])
    with pytest.raises(ValueError, match="segment_ids must be an int"):
        jattn.linear_attention(Q, KEY, V, segment_ids=jnp.zeros((B, T)))
    with pytest.raises(ValueError, match="query heads are not a multiple"):
        jattn.linear_attention(Q[:, :, :3], KEY, V)
    with pytest.raises(ValueError, match="must agree on B, T"):
        jattn.linear_attention(Q, KEY[:, :5], V[:, :5])
    with pytest.raises(ValueError, match="feature_map must map"):
        jattn.linear_attention(Q, KEY, V, feature_map=lambda x: x.sum(-1))
    with pytest.raises(TypeError, match=r"feature_map must be a function .* got str"):
        jattn.linear_attention(Q, KEY, V, feature_map="elu")  # was "'str' ... not callable"
