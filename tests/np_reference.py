"""NumPy float64 references for the attention tests (independent of jattn's code).

Shapes use the letters of jattn: B batch, T queries, S keys, N query heads,
K key/value heads (G = N // K), H query/key head dim, Hv value head dim.
"""

from __future__ import annotations

import numpy as np


def f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


# ---------------------------------------------------------------- scores, one head


def dot(q, k, params=None):
    return f64(q) @ f64(k).T


def scaled_dot(q, k, params=None, *, scale=None):
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    return dot(q, k) * scale


def additive(q, k, params):
    w_q, w_k, w_v = (f64(p) for p in params)
    out = np.zeros((q.shape[0], k.shape[0]))
    for i in range(q.shape[0]):
        for j in range(k.shape[0]):
            out[i, j] = w_v @ np.tanh(f64(q[i]) @ w_q + f64(k[j]) @ w_k)
    return out


def bilinear(q, k, w):
    out = np.zeros((q.shape[0], k.shape[0]))
    for i in range(q.shape[0]):
        for j in range(k.shape[0]):
            out[i, j] = f64(q[i]) @ f64(w) @ f64(k[j])
    return out


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def mlp(q, k, params):
    w_q, w_k, w_p, b, w_o = (f64(p) for p in params)
    out = np.zeros((q.shape[0], k.shape[0]))
    for i in range(q.shape[0]):
        for j in range(k.shape[0]):
            qi, kj = f64(q[i]), f64(k[j])
            out[i, j] = w_o @ gelu_tanh(qi @ w_q + kj @ w_k + (qi * kj) @ w_p + b)
    return out


# ---------------------------------------------------------------- softmax

MASK_FILL = -0.7 * float(np.finfo(np.float32).max)


def masked_softmax(logits, mask=None, fully_masked="zeros"):
    """Float64 softmax over the last axis; masked entries get weight 0."""
    logits = f64(logits)
    mask = np.ones(logits.shape, bool) if mask is None else np.broadcast_to(mask, logits.shape)
    out = np.zeros(logits.shape)
    flat_l = logits.reshape(-1, logits.shape[-1])
    flat_m = mask.reshape(-1, logits.shape[-1])
    flat_o = out.reshape(-1, logits.shape[-1])
    for r in range(flat_l.shape[0]):
        m = flat_m[r]
        if not m.any():
            flat_o[r] = 0.0 if fully_masked == "zeros" else 1.0 / logits.shape[-1]
            continue
        z = flat_l[r][m]
        if not np.isfinite(z).any():  # every visible logit is -inf: documented zeros
            continue
        e = np.exp(z - z.max())
        flat_o[r][m] = e / e.sum()
    return out


def masked_lse(logits, mask=None):
    """log-sum-exp of the logits after masked entries were set to MASK_FILL (jax.nn residual)."""
    logits = f64(logits)
    if mask is not None:
        logits = np.where(np.broadcast_to(mask, logits.shape), logits, MASK_FILL)
    m = logits.max(-1, keepdims=True)
    return (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]


# ---------------------------------------------------------------- batched attention


def structural_mask(t, s, *, is_causal=False, window=None):
    i = np.arange(t)[:, None]
    j = np.arange(s)[None, :]
    m = np.ones((t, s), bool)
    if is_causal:
        m &= j <= i
    if window is not None:
        left, right = (window, window) if isinstance(window, int) else window
        m &= (j >= i - left) & (j <= i + right)
    return m


def attention(
    q,
    k,
    v,
    bias=None,
    mask=None,
    *,
    score=scaled_dot,
    params=None,
    per_head_params=False,
    is_causal=False,
    window=None,
    q_len=None,
    kv_len=None,
    fully_masked="zeros",
):
    """A per-example, per-head loop. q [B,T,N,H], k [B,S,K,H'], v [B,S,K,Hv].

    bias/mask broadcast to [B, N, T, S]; q_len/kv_len are [B] or None.
    Returns (out [B,T,N,Hv], weights [B,N,T,S], lse [B,T,N]).
    """
    b, t, n, _ = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    full_mask = np.ones((b, n, t, s), bool)
    if mask is not None:
        full_mask &= np.broadcast_to(np.asarray(mask, bool), (b, n, t, s))
    full_mask &= structural_mask(t, s, is_causal=is_causal, window=window)[None, None]
    if q_len is not None:
        full_mask &= (np.arange(t)[None, :] < np.asarray(q_len)[:, None])[:, None, :, None]
    if kv_len is not None:
        full_mask &= (np.arange(s)[None, :] < np.asarray(kv_len)[:, None])[:, None, None, :]
    full_bias = np.zeros((b, n, t, s))
    if bias is not None:
        full_bias = full_bias + np.broadcast_to(f64(bias), (b, n, t, s))
    out = np.zeros((b, t, n, v.shape[-1]))
    weights = np.zeros((b, n, t, s))
    lse = np.zeros((b, t, n))
    for bi in range(b):
        for h in range(n):
            kv = h // g
            if not per_head_params:
                p = params
            elif hasattr(params, "_fields"):  # a NamedTuple of [N, ...] leaves
                p = type(params)(*(f64(leaf)[h] for leaf in params))
            else:
                p = f64(params)[h]
            logits = score(q[bi, :, h], k[bi, :, kv], p) + full_bias[bi, h]
            w = masked_softmax(logits, full_mask[bi, h], fully_masked)
            weights[bi, h] = w
            lse[bi, :, h] = masked_lse(logits, full_mask[bi, h])
            out[bi, :, h] = w @ f64(v[bi, :, kv])
    if q_len is not None:
        out *= (np.arange(t)[None, :] < np.asarray(q_len)[:, None])[:, :, None, None]
    return out, weights, lse
