"""Linear attention with a recurrent state: kernelized (Katharopoulos et al. 2020),
retention (RetNet, Sun et al. 2023) and gated linear attention (GLA, Yang et al. 2024).

All three are one recurrence per head over a matrix state ``S [F, Hv]``:

    S_t = a_t * S_{t-1} + phi(k_t)^T v_t        o_t = phi(q_t) S_t

with a decay ``a_t`` that is 1 (linear attention), a constant per head (retention) or
data-dependent per key feature (GLA). Linear attention also normalises:
``o_t = phi(q_t) S_t / (phi(q_t) z_t)`` with ``z_t = z_{t-1} + phi(k_t)``. A causal call
runs in one of three forms, each exact to the same definition:

- ``"parallel"``: the ``[T, T]`` masked form (quadratic; the reference);
- ``"chunked"``: blocks of ``chunk_size`` tokens: quadratic inside a block, the state
  carried between blocks (the fast form, the default);
- ``"recurrent"``: one token at a time (``lax.scan``), as in decoding.

Every form takes an initial state and returns the final one, so a prompt can be
prefilled with the chunked form and continued token by token with the recurrent one.
``segment_ids [B, T]`` reset the state where the id changes (packed sequences): no
token sees another segment's keys, and the state carried in applies to the first
segment only.

The math is written once for one head (:func:`_head`) and vmapped over batch and heads.
Shapes: ``query [B, T, N, F]``, ``key [B, T, K, F]``, ``value [B, T, K, Hv]`` (K divides
N: a key/value head serves ``N / K`` query heads), state ``[B, N, F, Hv]``. Features are
accumulated in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jattn.functional import _checks, _eager, _finite
from jattn.functional._checks import check_positive_int

__all__ = [
    "LinearState",
    "elu_feature_map",
    "gated_linear_attention",
    "linear_attention",
    "relu_feature_map",
    "retention",
    "retnet_decays",
]

FORMS = ("parallel", "chunked", "recurrent")
#: Added to the normaliser ``phi(q_t) z_t`` of linear attention (as Katharopoulos et al.).
EPS = 1e-6


class LinearState(NamedTuple):
    """The recurrent state after the last token: ``kv [B, N, F, Hv]`` (sum of
    ``phi(k)^T v``, decayed) and, for normalised linear attention, ``k_sum [B, N, F]``
    (sum of ``phi(k)``; None otherwise). Float32."""

    kv: jax.Array
    k_sum: jax.Array | None = None


def elu_feature_map(x: jax.Array) -> jax.Array:
    """``elu(x) + 1`` (Katharopoulos et al. 2020): positive features, the default."""
    return jax.nn.elu(x) + 1.0


def relu_feature_map(x: jax.Array) -> jax.Array:
    """``relu(x)``: the ReLU kernel (non-negative, may be all zero for a query)."""
    return jax.nn.relu(x)


# ------------------------------------------------------------------------ one head


def _segments(resets, n: int):
    """Segment index of each of ``n`` tokens (a reset starts a new one), from 0."""
    return jnp.cumsum(resets.astype(jnp.int32)) if resets is not None else jnp.zeros(n, jnp.int32)


def _parallel(q, k, v, log_a, resets, s0):
    """The quadratic form: ``o_t = sum_{s<=t, same segment} q_t (prod a) k_s^T v_s``
    plus the initial state for the tokens before the first reset."""
    t = q.shape[0]
    b = jnp.cumsum(log_a, axis=0)  # [T, F|1]: log of the decay from the start
    seg = _segments(resets, t)
    visible = (jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]) & (seg[:, None] == seg[None, :])
    # decay from s to t per feature: exp(b_t - b_s), only where s <= t (bounded by 1)
    diff = jnp.where(visible[..., None], b[:, None, :] - b[None, :, :], -jnp.inf)
    scores = jnp.einsum("tf,sf,tsf->ts", q, k, jnp.exp(diff))
    out = scores @ v
    first = (seg == 0)[:, None]  # the initial state reaches the first segment only
    out = out + jnp.where(first, (q * jnp.exp(b)) @ s0, 0.0)
    total = jnp.exp(b[-1])  # [F|1]
    last = seg == seg[-1]
    kd = jnp.where(last[:, None], k * jnp.exp(b[-1:] - b), 0.0)
    s_end = kd.T @ v + jnp.where(seg[-1] == 0, total.reshape(-1, 1) * s0, 0.0)
    return out, s_end


def _recurrent(q, k, v, log_a, resets, s0):
    """One token at a time: ``S_t = a_t S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``."""
    if resets is None:
        resets = jnp.zeros(q.shape[0], bool)

    def step(s, xs):
        qt, kt, vt, la, r = xs
        s = jnp.where(r, 0.0, jnp.exp(la)[:, None] * s) + kt[:, None] * vt[None, :]
        return s, qt @ s

    s_end, out = lax.scan(step, s0, (q, k, v, log_a, resets.at[0].set(False)))
    return out, s_end


def _chunked(q, k, v, log_a, resets, s0, chunk: int):
    """Blocks of ``chunk`` tokens: the quadratic form inside a block, the state carried
    from block to block (decays within a block are <= 1: no overflow)."""
    t, f = q.shape
    hv = v.shape[-1]
    nc = -(-t // chunk)
    pad = nc * chunk - t
    r = jnp.zeros(t, bool) if resets is None else resets.at[0].set(False)

    def blocks(x, fill=0.0):
        x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1), constant_values=fill)
        return x.reshape((nc, chunk) + x.shape[1:])

    # padding tokens: zero keys (no contribution) and no decay (the state passes through)
    lab = None if log_a is None else blocks(log_a)
    qb, kb, vb, rb = blocks(q), blocks(k), blocks(v), blocks(r, False)
    causal = jnp.arange(chunk)[:, None] >= jnp.arange(chunk)[None, :]

    def step(s, xs):
        qc, kc, vc, la, rc = xs
        seg = jnp.cumsum(rc.astype(jnp.int32))  # 0 until the first reset in this block
        visible = causal & (seg[:, None] == seg[None, :])
        first, last = (seg == 0)[:, None], (seg == seg[-1])[:, None]
        if la is None:  # no decay (linear attention): no exponentials
            out = jnp.where(visible, qc @ kc.T, 0.0) @ vc + jnp.where(first, qc @ s, 0.0)
            carried = jnp.where(seg[-1] == 0, s, 0.0)
            return carried + jnp.where(last, kc, 0.0).T @ vc, out
        b = jnp.cumsum(la, axis=0)  # [C, F|1], <= 0
        if la.shape[-1] == 1:  # one decay per token: [C, C] scores
            diff = jnp.where(visible, b[:, None, 0] - b[None, :, 0], -jnp.inf)
            scores = (qc @ kc.T) * jnp.exp(diff)
        else:  # a decay per feature: [C, C, F]
            diff = jnp.where(visible[..., None], b[:, None, :] - b[None, :, :], -jnp.inf)
            scores = jnp.einsum("tf,sf,tsf->ts", qc, kc, jnp.exp(diff))
        out = scores @ vc + jnp.where(first, (qc * jnp.exp(b)) @ s, 0.0)
        kd = jnp.where(last, kc * jnp.exp(b[-1:] - b), 0.0)
        carried = jnp.where(seg[-1] == 0, jnp.exp(b[-1]).reshape(-1, 1) * s, 0.0)
        return carried + kd.T @ vc, out

    s_end, out = lax.scan(step, s0, (qb, kb, vb, lab, rb))
    return out.reshape(nc * chunk, hv)[:t], s_end.reshape(f, hv)


#: The log decays' floor in the parallel and chunked forms: ``exp(-128)`` is 0 in
#: float32, so a decay below it (a gate of 0, -inf) gives the same products, and the
#: differences of prefix sums the forms take stay finite (``-inf - -inf`` is NaN) and
#: precise (``-1e6 - 0.05`` is ``-1e6`` in float32).
LOG_DECAY_FLOOR = -128.0


def _head(q, k, v, log_a, resets, s0, form: str, chunk: int):
    """One head: ``q, k [T, F]``, ``v [T, Hv]``, ``log_a [T, F|1]`` (<= 0), ``resets
    [T]`` or None, ``s0 [F, Hv]`` -> ``(out [T, Hv], state [F, Hv])``, float32."""
    q, k, v, s0 = (x.astype(jnp.float32) for x in (q, k, v, s0))
    if log_a is None:
        if form == "chunked":
            return _chunked(q, k, v, None, resets, s0, chunk)
        log_a = jnp.zeros((q.shape[0], 1), jnp.float32)
    elif form != "recurrent":
        log_a = jnp.maximum(log_a, LOG_DECAY_FLOOR)
    if form == "parallel":
        return _parallel(q, k, v, log_a, resets, s0)
    if form == "recurrent":
        return _recurrent(q, k, v, log_a, resets, s0)
    return _chunked(q, k, v, log_a, resets, s0, chunk)


# --------------------------------------------------------------------- the batched core


def _check(query, key, value, name: str):
    for arg, x in (("query", query), ("key", key), ("value", value)):
        if jnp.ndim(x) != 4:
            raise ValueError(
                f"{name}: {arg} must be [B, T, heads, features], got shape {list(jnp.shape(x))}"
            )
        _checks.check_float(f"{name}: {arg}", _checks.as_array(arg, x))
    (b, t, n, f), (bk, tk, k, fk), (bv, tv, kv, _) = query.shape, key.shape, value.shape
    if (bk, tk, fk) != (b, t, f) or (bv, tv, kv) != (b, t, k):
        raise ValueError(
            f"{name}: query {list(query.shape)} [B, T, N, F], key {list(key.shape)} "
            f"[B, T, K, F] and value {list(value.shape)} [B, T, K, Hv] must agree on B, T "
            "(and F for query and key)"
        )
    if n % k:
        raise ValueError(f"{name}: {n} query heads are not a multiple of {k} key/value heads")
    return b, t, n, f, k, value.shape[-1]


def _options(name, form, chunk_size, default_chunk):
    if form is None:
        form = "chunked"
    if form not in FORMS:
        raise ValueError(f"{name}: implementation must be one of {FORMS} or None, got {form!r}")
    chunk = default_chunk if chunk_size is None else check_positive_int("chunk_size", chunk_size)
    return form, chunk


def _resets(segment_ids, b: int, t: int, name: str):
    if segment_ids is None:
        return None
    ids = _checks.as_array(f"{name}: segment_ids", segment_ids)  # an int64 id must not wrap
    if ids.shape != (b, t) or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"{name}: segment_ids must be an int [B, T] = {[b, t]} array, got {ids.dtype} "
            f"{list(ids.shape)}"
        )
    return jnp.concatenate([jnp.zeros((b, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)


def _initial(state, b, n, f, hv, normalize: bool, name: str) -> LinearState:
    want = LinearState(jnp.zeros((b, n, f, hv), jnp.float32),
                       jnp.zeros((b, n, f), jnp.float32) if normalize else None)  # fmt: skip
    if state is None:
        return want
    if not isinstance(state, LinearState):
        state = LinearState(*state) if isinstance(state, tuple) else LinearState(state)
    for field, got, exp in zip(("kv", "k_sum"), state, want, strict=True):
        if (got is None) != (exp is None) or (got is not None and jnp.shape(got) != jnp.shape(exp)):
            shape = None if exp is None else list(exp.shape)
            raise ValueError(
                f"{name}: initial_state.{field} must be {shape}, got "
                f"{None if got is None else list(jnp.shape(got))}"
            )
    return LinearState(*(None if x is None else jnp.asarray(x, jnp.float32) for x in state))


def _run(name, q, k, v, log_a, resets, state: LinearState, form, chunk, normalize, bad=None):
    """:func:`_compute`; an eager call as one cached program (:mod:`jattn.functional._eager`)."""
    args = (q, k, v, log_a, resets, state, bad)
    return _eager.run(_compute, args, name, form, chunk, normalize)


def _compute(q, k, v, log_a, resets, state: LinearState, bad, name, form, chunk, normalize):
    """``q [B,T,N,F]``, ``k [B,T,K,F]``, ``v [B,T,K,Hv]``, ``log_a [B,T,N,F|1]`` ->
    ``(out [B,T,N,Hv] float32, LinearState)``; with ``normalize`` the ones column
    that carries ``z`` rides along with the values."""
    n, kh = q.shape[2], k.shape[2]
    # non-finite vectors zeroed, the rows that see one made NaN below (_finite): a NaN at
    # a future position or in another segment reached earlier rows through 0 * NaN
    q, k, v, bad_q, bad_kv = _hide(q, k, v, bad)
    k, v, bad_kv = (jnp.repeat(x, n // kh, axis=2) if kh != n else x for x in (k, v, bad_kv))
    if log_a is not None:  # a NaN (or +inf) decay: the rows from it on see it, no others
        bad_a = jnp.any(jnp.isnan(log_a) | (log_a == jnp.inf), axis=-1)  # [B, T, N]
        log_a, bad_kv = jnp.where(bad_a[..., None], 0.0, log_a), bad_kv | bad_a
    v = v.astype(jnp.float32)
    s0 = state.kv
    if normalize:  # z_t is the state of a value column of ones
        v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1)
        s0 = jnp.concatenate([s0, state.k_sum[..., None]], axis=-1)
    # [B, T, N, D] -> [B, N, T, D]: each head's sequence contiguous for the scans
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    la_axis = None if log_a is None else 0
    if log_a is not None:
        log_a = jnp.swapaxes(log_a, 1, 2)
    head = jax.vmap(_head, in_axes=(0, 0, 0, la_axis, None, 0, None, None))
    r_axis = None if resets is None else 0
    batch = jax.vmap(head, in_axes=(0, 0, 0, la_axis, r_axis, 0, None, None))
    out, s = batch(q, k, v, log_a, resets, s0, form, chunk)
    out = jnp.swapaxes(out, 1, 2)
    seen = _seen_causally(bad_kv, resets)  # [B, T, N]
    nan = jnp.float32(jnp.nan)
    last = seen[:, -1][..., None, None]  # the state holds the last segment's tokens
    s = jnp.where(last, nan, s)
    if normalize:
        num, den = out[..., :-1], out[..., -1:]
        out, state = num / (den + EPS), LinearState(s[..., :-1], s[..., -1])
    else:
        state = LinearState(s)
    return jnp.where((seen | bad_q)[..., None], nan, out), state


def _seen_causally(bad, resets):
    """``[B, T, N]``: whether position t sees a bad position s <= t of its segment."""
    return segment_cummax(bad.astype(jnp.int32), resets) > 0


def segment_cummax(x, resets):
    """``[B, T, ...]``: the max of ``x`` over positions ``s <= t`` of t's segment (a
    reset, ``[B, T]`` bool or None, starts a new one)."""
    if resets is None:
        return lax.cummax(x, axis=1)
    r = jnp.broadcast_to(resets.reshape(resets.shape + (1,) * (x.ndim - 2)), x.shape)

    def combine(a, b):  # (max so far, reset seen) of a prefix, then of the next part
        return jnp.where(b[1], b[0], jnp.maximum(a[0], b[0])), a[1] | b[1]

    return lax.associative_scan(combine, (x, r), axis=1)[0]


def _finish(out, state, dtype, return_state):
    out = out.astype(dtype)
    return (out, state) if return_state else out


# ----------------------------------------------------------------------- the mechanisms


def linear_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    feature_map: Callable[[jax.Array], jax.Array] | None = None,
    is_causal: bool = False,
    initial_state: LinearState | None = None,
    return_state: bool = False,
    chunk_size: int | None = None,
    segment_ids: jax.Array | None = None,
    implementation: str | None = None,
):
    """Kernelized linear attention (Katharopoulos et al. 2020).

    ``o_t = phi(q_t) S_t / (phi(q_t) z_t + eps)`` with ``S_t = sum_s phi(k_s)^T v_s``,
    ``z_t = sum_s phi(k_s)`` over the keys position t may see: all of them, or
    ``s <= t`` with ``is_causal`` (then it is an RNN, see the module docstring).

    Args:
      query: ``[B, T, N, H]``; key: ``[B, T, K, H]``; value: ``[B, T, K, Hv]``.
      feature_map: ``phi``, applied to queries and keys along the feature axis
        (``[..., H] -> [..., F]``); default :func:`elu_feature_map` (``elu(x) + 1``).
        Random features (FAVOR+) are feature maps too.
      is_causal: position t sees keys ``s <= t``.
      initial_state: a :class:`LinearState` (``kv [B, N, F, Hv]``, ``k_sum [B, N, F]``)
        to continue from (causal only), e.g. the state a prompt ended with.
      return_state: also return the final :class:`LinearState` (causal only).
      chunk_size: tokens per block of the chunked form (default 64).
      segment_ids: int ``[B, T]``: the state resets where the id changes (causal), or
        tokens see only their own segment (non-causal).
      implementation: ``"chunked"`` (default), ``"parallel"`` or ``"recurrent"``.

    Returns:
      ``[B, T, N, Hv]`` in the value dtype, and the :class:`LinearState` with
      ``return_state``.

    The prompt's state, then one token at a time, equals the whole sequence at once:

    >>> import jax, jax.numpy as jnp
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 6, 2, 4))  # [B, T, N, H]
    >>> whole = linear_attention(q, k, v, is_causal=True)
    >>> head, state = linear_attention(q[:, :5], k[:, :5], v[:, :5], is_causal=True,
    ...                                return_state=True)
    >>> last = linear_attention(q[:, 5:], k[:, 5:], v[:, 5:], is_causal=True,
    ...                         initial_state=state, implementation="recurrent")
    >>> bool(jnp.allclose(jnp.concatenate([head, last], axis=1), whole, atol=1e-5))
    True
    """
    name = "linear_attention"
    b, t, n, _, _, hv = _check(query, key, value, name)
    phi = elu_feature_map if feature_map is None else feature_map
    if not callable(phi):  # was "'int' object is not callable"
        raise TypeError(
            f"{name}: feature_map must be a function [..., H] -> [..., F] (or None), got "
            f"{type(phi).__name__}"
        )
    is_causal = _checks.check_flag("is_causal", is_causal)
    query, key, bad = hide_before_features(query, key, is_causal, segment_ids)
    fq, fk = phi(query), phi(key)
    if fq.shape[-1] != fk.shape[-1] or fq.shape[:-1] != query.shape[:-1]:
        raise ValueError(
            f"{name}: feature_map must map [..., H] to [..., F] for queries and keys alike, "
            f"got {list(fq.shape)} and {list(fk.shape)}"
        )
    return normalized_attention(
        name, fq, fk, value, is_causal, initial_state, return_state, chunk_size, segment_ids,
        implementation, bad,
    )  # fmt: skip


def hide_before_features(query, key, is_causal: bool, segment_ids):
    """``(query, key, flags)`` for a call that maps them to features: when it hides
    something from some row (causal, or segments), their non-finite vectors zeroed and
    ``flags = (bad_query, bad_key)`` for :func:`normalized_attention`; else as they are,
    and None. Features must come from finite inputs: a feature map's derivative at a NaN
    meets the zero cotangent of a hidden row (NaN), and the Performer's shared key
    stabiliser would make every feature NaN."""
    if not is_causal and segment_ids is None:  # every row sees every key: NaN spreads
        return query, key, None
    query, bad_q = _finite.hide_nonfinite(_checks.as_array("query", query))
    key, bad_k = _finite.hide_nonfinite(_checks.as_array("key", key))
    return query, key, (bad_q, bad_k)


def _hide(q, k, v, flags):
    """:func:`jattn.functional._finite.hide_qkv` of features ``q``, ``k`` and values
    ``v``; with ``flags`` from :func:`hide_before_features` only ``v`` is looked at."""
    if flags is None:
        return _finite.hide_qkv(q, k, v)
    (bad_q, bad_k), (v, bad_v) = flags, _finite.hide_nonfinite(v)
    return q, k, v, bad_q, bad_k | bad_v


def normalized_attention(name, fq, fk, value, is_causal, initial_state, return_state,
                         chunk_size, segment_ids, implementation, bad=None,
                         log_a=None):  # fmt: skip
    """Normalised linear attention of features ``fq [B, T, N, F]``, ``fk [B, T, K, F]``
    (already mapped) and ``value``: the core of :func:`linear_attention` and of the
    random-feature attentions (:mod:`jattn.functional.lowrank`). Causal, ``log_a [B, T,
    N, 1]`` (<= 0) decays the sums (numerator and normaliser alike) before each token."""
    (b, t, n, f), hv = fq.shape, value.shape[-1]
    is_causal = _checks.check_flag("is_causal", is_causal)
    resets = _resets(segment_ids, b, t, name)
    form, chunk = _options(name, implementation, chunk_size, 64)  # checked either way
    if not is_causal:
        if initial_state is not None or return_state:
            raise ValueError(f"{name}: initial_state and return_state need is_causal=True")
        return _eager.run(_non_causal, (fq, fk, value, segment_ids, bad)).astype(value.dtype)
    state = _initial(initial_state, b, n, f, hv, True, name)
    out, state = _run(name, fq, fk, value, log_a, resets, state, form, chunk, True, bad)
    return _finish(out, state, value.dtype, return_state)


def _non_causal(fq, fk, value, segment_ids, flags=None):
    """``phi(q) (phi(k)^T v) / (phi(q) sum phi(k))``, per segment when given."""
    n, kh = fq.shape[2], fk.shape[2]
    bad = None
    if segment_ids is not None:  # other segments are hidden: their NaN reaches no row
        fq, fk, value, bad_q, bad_kv = _hide(fq, fk, value, flags)
        same_b = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, S]
        sees = jnp.einsum("bts,bsk->btk", same_b.astype(jnp.int32), bad_kv.astype(jnp.int32))
        bad = bad_q | (jnp.repeat(sees, n // kh, axis=2) > 0)  # [B, T, N]
    elif flags is not None:  # a caller that hid padding keys: a bad key reaches every row
        fq, fk, value, bad_q, bad_kv = _hide(fq, fk, value, flags)
        bad = bad_q | jnp.repeat(jnp.any(bad_kv, axis=1, keepdims=True), n // kh, axis=2)
    fq = fq.astype(jnp.float32).reshape(fq.shape[:2] + (kh, n // kh, fq.shape[-1]))
    fk, v = fk.astype(jnp.float32), value.astype(jnp.float32)
    if segment_ids is None:
        kv = jnp.einsum("bskf,bskh->bkfh", fk, v)
        num = jnp.einsum("btkgf,bkfh->btkgh", fq, kv)
        den = jnp.einsum("btkgf,bkf->btkg", fq, fk.sum(axis=1))[..., None]
    else:  # tokens of other segments are hidden: the masked quadratic form
        same = (segment_ids[:, :, None] == segment_ids[:, None, :]).astype(jnp.float32)
        scores = jnp.einsum("btkgf,bskf->btkgs", fq, fk) * same[:, :, None, None, :]
        num = jnp.einsum("btkgs,bskh->btkgh", scores, v)
        den = scores.sum(axis=-1, keepdims=True)
    out = num / (den + EPS)
    out = out.reshape(out.shape[:2] + (n, out.shape[-1]))
    return out if bad is None else jnp.where(bad[..., None], jnp.float32(jnp.nan), out)


def retention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    decay: jax.Array,
    *,
    initial_state: LinearState | None = None,
    return_state: bool = False,
    chunk_size: int | None = None,
    segment_ids: jax.Array | None = None,
    implementation: str | None = None,
):
    """Retention (RetNet, Sun et al. 2023): causal, ``S_t = gamma_n S_{t-1} + k_t^T v_t``,
    ``o_t = q_t S_t``, with a decay ``gamma_n`` per head (no softmax, no normaliser:
    RetNet normalises the output per head afterwards, which
    :class:`jattn.layers.LinearAttention` does, an RMS norm over each head's features).

    ``query [B, T, N, H]``, ``key [B, T, K, H]``, ``value [B, T, K, Hv]``; ``decay``:
    ``[N]`` in (0, 1], e.g. :func:`retnet_decays`. Other arguments as
    :func:`linear_attention` (causal, no feature map; scale the queries yourself:
    RetNet uses ``H ** -0.5``).
    """
    name = "retention"
    b, t, n, f, _, hv = _check(query, key, value, name)
    decay = _checks.as_array("decay", decay)
    if decay.shape != (n,) or not jnp.issubdtype(decay.dtype, jnp.floating):
        raise ValueError(f"{name}: decay must be a float [N] = [{n}] array, got {decay.dtype} "
                         f"{list(decay.shape)}")  # fmt: skip
    values = _checks.concrete(decay)  # a traced (learned) decay cannot be checked here
    if values is not None and not ((values > 0) & (values <= 1)).all():
        raise ValueError(f"{name}: decay must be in (0, 1], got {values.tolist()}")
    form, chunk = _options(name, implementation, chunk_size, 64)
    state = _initial(initial_state, b, n, f, hv, False, name)
    log_a = jnp.broadcast_to(jnp.log(decay.astype(jnp.float32))[:, None], (b, t, n, 1))
    resets = _resets(segment_ids, b, t, name)
    out, state = _run(name, query, key, value, log_a, resets, state, form, chunk, False)
    return _finish(out, state, value.dtype, return_state)


def retnet_decays(num_heads: int) -> jax.Array:
    """RetNet's per-head decays ``1 - 2 ** (-5 - arange(N) * 5 / N)`` (float32 ``[N]``)."""
    n = check_positive_int("num_heads", num_heads)
    return 1.0 - 2.0 ** (-5.0 - jnp.arange(n, dtype=jnp.float32) * 5.0 / n)


def gated_linear_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    log_gates: jax.Array,
    *,
    initial_state: LinearState | None = None,
    return_state: bool = False,
    chunk_size: int | None = None,
    segment_ids: jax.Array | None = None,
    implementation: str | None = None,
):
    """Gated linear attention (GLA, Yang et al. 2024): causal,
    ``S_t = diag(a_t) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``, with data-dependent
    decays ``a_t = exp(log_gates_t)`` per key feature.

    ``log_gates``: ``[B, T, N, H]`` (<= 0, -inf for a gate of 0; e.g. ``log_sigmoid`` of
    a projection of the input, as the paper; concrete gates above 0 are an error). Other
    arguments as :func:`retention`; the chunked form defaults to 16-token blocks (its
    block scores are ``[C, C, H]``).
    """
    name = "gated_linear_attention"
    b, t, n, f, _, hv = _check(query, key, value, name)
    log_gates = _checks.as_array("log_gates", log_gates)
    if log_gates.shape != (b, t, n, f) or not jnp.issubdtype(log_gates.dtype, jnp.floating):
        raise ValueError(
            f"{name}: log_gates must be a float [B, T, N, H] = {[b, t, n, f]} array, got "
            f"{log_gates.dtype} {list(log_gates.shape)}"
        )
    if not _checks._is_traced(log_gates):  # a traced (learned) gate cannot be checked here
        top = float(jnp.max(log_gates, initial=-jnp.inf))  # one number to the host
        if top > 0:
            raise ValueError(
                f"{name}: log_gates must be <= 0 (gates exp(log_gates) in [0, 1]), got a "
                f"maximum of {top}; e.g. jax.nn.log_sigmoid of a projection"
            )
    form, chunk = _options(name, implementation, chunk_size, 16)
    state = _initial(initial_state, b, n, f, hv, False, name)
    resets = _resets(segment_ids, b, t, name)
    out, state = _run(name, query, key, value, log_gates, resets, state, form, chunk, False)
    return _finish(out, state, value.dtype, return_state)
