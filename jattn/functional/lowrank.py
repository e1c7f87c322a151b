"""Low-rank and random-feature approximations of softmax attention.

- :func:`performer_attention`: FAVOR+ (Choromanski et al. 2021), positive orthogonal
  random features whose inner products are unbiased estimates of the softmax kernel
  ``exp(q . k / sqrt(H))``; linear in T, causal by prefix sums (the chunked form of
  :mod:`jattn.functional.linear`). The random draw is an argument
  (:func:`orthogonal_random_features`): redraw it when you choose.
- :func:`linformer_attention`: Linformer (Wang et al. 2020), keys and values projected
  along the sequence to ``k`` rows.
- :func:`nystrom_attention`: Nystromformer (Xiong et al. 2021), landmarks by segment
  means and the iterative Moore-Penrose pseudo-inverse of the paper.

Shapes as the rest of jattn: ``query [B, T, N, H]``, ``key [B, S, K, H]``, ``value
[B, S, K, Hv]``, K dividing N.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jattn.functional import _checks, _eager, linear
from jattn.functional._checks import check_positive_int

__all__ = [
    "favor_features",
    "linformer_attention",
    "nystrom_attention",
    "orthogonal_random_features",
    "performer_attention",
]


def _check_qkv(query, key, value, name):
    for arg, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, jax.Array | np.ndarray):
            raise TypeError(f"{name}: {arg} must be an array, got {type(x).__name__}")
        if jnp.ndim(x) != 4:
            raise ValueError(
                f"{name}: {arg} must be [B, L, heads, features], got shape {list(jnp.shape(x))}"
            )
        _checks.check_float(f"{name}: {arg}", _checks.as_array(arg, x))
    (b, t, n, h), (bk, s, k, hk), (bv, sv, kv, _) = query.shape, key.shape, value.shape
    if bk != b or bv != b or hk != h or (sv, kv) != (s, k):
        raise ValueError(
            f"{name}: query {list(query.shape)} [B, T, N, H], key {list(key.shape)} "
            f"[B, S, K, H] and value {list(value.shape)} [B, S, K, Hv] do not agree"
        )
    if n % k:
        raise ValueError(f"{name}: {n} query heads are not a multiple of {k} key/value heads")
    return b, t, s, n, k, h


def _repeat_kv(x, n):
    return x if x.shape[2] == n else jnp.repeat(x, n // x.shape[2], axis=2)


# ------------------------------------------------------------------------------ FAVOR+


def orthogonal_random_features(key: jax.Array, num_features: int, head_dim: int) -> jax.Array:
    """FAVOR+'s projection ``[M, H]``: blocks of H orthogonal rows (QR of a Gaussian
    matrix), each row rescaled to the norm of an independent Gaussian vector, so every
    row is marginally ``N(0, I)`` and rows within a block are orthogonal."""
    _checks.check_prng_key("key", key)
    m = check_positive_int("num_features", num_features)
    h = check_positive_int("head_dim", head_dim)
    nblocks = -(-m // h)
    k_blocks, k_norms = jax.random.split(key)
    gauss = jax.random.normal(k_blocks, (nblocks, h, h), jnp.float32)
    qmat, rmat = jnp.linalg.qr(gauss)  # [nblocks, H, H], orthonormal columns
    # signs fixed by R's diagonal: Q is then Haar-distributed (columns uniform on the sphere)
    qmat = qmat * jnp.sign(jnp.diagonal(rmat, axis1=1, axis2=2))[:, None, :]
    rows = jnp.swapaxes(qmat, 1, 2).reshape(nblocks * h, h)[:m]
    norms = jnp.linalg.norm(jax.random.normal(k_norms, (m, h), jnp.float32), axis=1)
    return rows * norms[:, None]


def favor_features(x: jax.Array, projection: jax.Array, *, kind: str = "softmax",
                   stabilizer=None) -> jax.Array:  # fmt: skip
    """FAVOR+ features ``[..., M]`` of ``x [..., H]``.

    ``kind="softmax"``: ``exp(w . x' - |x'|^2 / 2 - c) / sqrt(M)`` with ``x' = x / H^(1/4)``,
    whose inner products estimate ``exp(q . k / sqrt(H))`` without bias (times
    ``exp(-c_q - c_k)``: a stabiliser ``c`` that the attention's normaliser cancels);
    ``stabilizer``: None (no shift), ``"row"`` (each row's max) or ``"all"`` (the max
    over positions and features, axes -3 and -1 of ``[..., L, heads, M]``).
    ``kind="relu"``: ``relu(w . x) / sqrt(M)``.

    ``x`` and ``projection`` hold real numbers: complex ones are a TypeError (a cast
    would drop their imaginary parts).
    """
    x = _checks.check_real("x", x)
    projection = _checks.check_real("projection", projection)
    if stabilizer not in (None, "row", "all"):
        raise ValueError(f"stabilizer must be None, 'row' or 'all', got {stabilizer!r}")
    if x.ndim < 1 or (stabilizer == "all" and x.ndim < 3):
        need = "[..., L, heads, H]" if stabilizer == "all" else "[..., H]"
        raise ValueError(
            f"x must be {need} (stabilizer={stabilizer!r}), got shape {_checks.fmt(x.shape)}"
        )
    h = x.shape[-1]
    if projection.ndim != 2 or projection.shape[1] != h:
        raise ValueError(f"projection must be [M, H] = [M, {h}], got {list(projection.shape)}")
    m = projection.shape[0]
    x = x.astype(jnp.float32)
    if kind == "relu":
        return jax.nn.relu(x @ projection.T) / math.sqrt(m)
    if kind != "softmax":
        raise ValueError(f"kind must be 'softmax' or 'relu', got {kind!r}")
    logits = _favor_logits(x, projection)
    if stabilizer == "row":
        logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    elif stabilizer == "all":
        logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=(-3, -1), keepdims=True))
    return jnp.exp(logits) / math.sqrt(m)


def _favor_logits(x, projection):
    """``w . x' - |x'|^2 / 2`` with ``x' = x / H^(1/4)``: the logs of the softmax
    features ``[..., M]`` (times ``sqrt(M)``), float32."""
    x = x.astype(jnp.float32) * x.shape[-1] ** -0.25
    return x @ projection.T - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)


def _causal_key_features(key, projection, resets, start=None):
    """Causal FAVOR+ key features ``[B, T, K, M]``, each key's stabilised by the running
    max of the logits of the keys up to it (in its segment), the log decays ``[B, T, K,
    1]`` that carry the sums from one stabiliser to the next (``m_{t-1} - m_t <= 0``; 0
    where a segment starts) and the running max ``m [B, T, K, 1]``. Row t's sums are
    then ``sum_s exp(logit_s - m_t)``: a large later key no longer underflows the earlier
    rows' features to 0, as one max over the sequence did (and the rows before it are
    the prefix's, exactly). ``start [B, K]``: the running max of the tokens before (a
    decoding state's, which the first decay carries on), or None."""
    logits = _favor_logits(key, projection)
    m = linear.segment_cummax(jnp.max(logits, axis=-1, keepdims=True), resets)
    first = m[:, :1]
    if start is not None:  # it reaches the tokens before the first reset
        first = start[:, None, :, None]
        carried = jnp.maximum(m, first)
        if resets is not None:
            carried = jnp.where((jnp.cumsum(resets, axis=1) == 0)[..., None, None], carried, m)
        m = carried
    m = jax.lax.stop_gradient(m)
    log_a = jax.lax.stop_gradient(jnp.concatenate([first, m[:, :-1]], axis=1)) - m
    if resets is not None:
        log_a = jnp.where(resets[:, :, None, None], 0.0, log_a)
    return jnp.exp(logits - m) / math.sqrt(projection.shape[0]), log_a, m


def _key_features(key, projection, sees=None):
    """Non-causal FAVOR+ key features ``[B, S, K, M]``, each stabilised by the max over
    the keys its rows see: all of them (``sees`` None), the valid ones (``sees [B, S]``:
    padding keys get features 0), or its segment's (``sees [B, S, S]``, key s with key
    s'). One max over the sequence let a large key elsewhere underflow every feature."""
    logits = _favor_logits(key, projection)
    top = jnp.max(logits, axis=-1)  # [B, S, K]
    low = jnp.finfo(jnp.float32).min  # an unseen key's: exp gives 0, and no inf is made
    if sees is None:
        m = jnp.max(top, axis=1, keepdims=True)
    elif sees.ndim == 2:  # valid keys; an example with none: any finite shift
        m = jnp.max(jnp.where(sees[..., None], top, low), axis=1, keepdims=True)
        m = jnp.where(jnp.any(sees, axis=1)[:, None, None], m, 0.0)
    else:
        m = jnp.max(jnp.where(sees[..., None], top[:, None], low), axis=2)  # [B, S, K]
    shifted = logits - jax.lax.stop_gradient(m)[..., None]
    if sees is not None and sees.ndim == 2:  # padding: exp(lowest) = 0 (exp(0 - m) = inf)
        shifted = jnp.where(sees[..., None, None], shifted, low)
    return jnp.exp(shifted) / math.sqrt(projection.shape[0])


def performer_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    projection: jax.Array,
    *,
    kind: str = "softmax",
    is_causal: bool = False,
    chunk_size: int | None = None,
    segment_ids: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Performer attention (FAVOR+): softmax attention approximated with M random
    features, O(T M H) time and memory.

    Args:
      query: ``[B, T, N, H]``; key: ``[B, T, K, H]``; value: ``[B, T, K, Hv]``.
      projection: ``[M, H]``, e.g. :func:`orthogonal_random_features` (a fresh key
        redraws it; keep it fixed for a deterministic layer).
      kind: ``"softmax"`` (unbiased for the softmax kernel) or ``"relu"``.
      is_causal, chunk_size, segment_ids, implementation: as
        :func:`jattn.linear_attention` (causal: prefix sums, any of its three forms).

    Queries are stabilised per row, keys by the maximum over the keys each row sees (the
    sequence, the segment, or, causal, the keys up to the row: a running maximum whose
    changes decay the prefix sums, so a large later key cannot underflow the earlier
    rows to 0): both cancel in the normalised result.
    """
    name = "performer_attention"
    _check_qkv(query, key, value, name)
    if query.shape[1] != key.shape[1]:
        raise ValueError(
            f"{name}: T={query.shape[1]} queries and S={key.shape[1]} keys must be equal"
        )
    projection = _checks.check_real(f"{name}: projection", projection)
    if projection.ndim != 2 or projection.shape[1] != query.shape[-1]:
        raise ValueError(
            f"{name}: projection must be [M, H] = [M, {query.shape[-1]}], got "
            f"{list(projection.shape)}"
        )
    is_causal = _checks.check_flag("is_causal", is_causal)
    b, t, n = query.shape[:3]
    resets = linear._resets(segment_ids, b, t, name)  # checked before it is read
    query, key, bad = linear.hide_before_features(query, key, is_causal, segment_ids)
    fq = favor_features(query, projection, kind=kind, stabilizer="row")
    log_a = None
    if kind != "softmax":
        fk = favor_features(key, projection, kind=kind)
    elif is_causal:
        fk, log_a, _ = _causal_key_features(key, projection, resets)
        log_a = _repeat_kv(log_a, n)
    else:  # the keys each row sees: all, or its segment's
        same = None if segment_ids is None else segment_ids[:, :, None] == segment_ids[:, None]
        fk = _key_features(key, projection, same)
    return linear.normalized_attention(
        name, fq, fk, value, is_causal, None, False, chunk_size, segment_ids, implementation, bad,
        log_a,
    )  # fmt: skip


# ---------------------------------------------------------------------------- Linformer


def linformer_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    projection: jax.Array,
    value_projection: jax.Array | None = None,
    *,
    key_value_seq_lengths: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Linformer attention: ``softmax(Q (E K)^T * scale) (F V)`` with E, F projecting
    the S keys and values to k rows (non-causal).

    Args:
      query: ``[B, T, N, H]``; key: ``[B, S, K, H]``; value: ``[B, S, K, Hv]``.
      projection: E, ``[k, S_max]`` (shared by the heads) or ``[K, k, S_max]`` (one per
        key/value head). value_projection: F, the same shape (default E: the paper's
        key-value sharing).
      key_value_seq_lengths: int ``[B]``: keys at or past the length are padding.
      scale: default ``1 / sqrt(H)``.

    Sequence lengths: E was learned for ``S_max`` positions. A shorter sequence is the
    ``S_max`` one with zeros after it (its padding keys project to nothing), which is
    ``E[..., :S]``; a longer one is an error. So is padding inside S: pass
    ``key_value_seq_lengths`` and those keys and values are zeroed before projecting.
    """
    name = "linformer_attention"
    b, _, s, n, k, h = _check_qkv(query, key, value, name)
    fv = projection if value_projection is None else value_projection
    projs = []
    for arg, e in (("projection", projection), ("value_projection", fv)):
        e = _checks.check_real(f"{name}: {arg}", e)  # a cast would drop an imaginary part
        if e.ndim not in (2, 3) or (e.ndim == 3 and e.shape[0] != k):
            raise ValueError(f"{name}: {arg} must be [k, S_max] or [K={k}, k, S_max], got "
                             f"{list(e.shape)}")  # fmt: skip
        if e.shape[-1] < s:
            raise ValueError(
                f"{name}: {arg} projects sequences of up to S_max={e.shape[-1]} keys, got "
                f"S={s}: longer sequences need a projection learned for them"
            )
        projs.append(e[..., :s].astype(jnp.float32))
    if projs[0].shape[:-1] != projs[1].shape[:-1]:
        raise ValueError(f"{name}: projection {list(projs[0].shape)} and value_projection "
                         f"{list(projs[1].shape)} must have the same shape")  # fmt: skip
    lengths = None
    if key_value_seq_lengths is not None:
        lengths = _checks.host_array("key_value_seq_lengths", key_value_seq_lengths)
        integer = jnp.issubdtype(lengths.dtype, jnp.integer) and lengths.dtype != np.bool_
        if lengths.shape != (b,) or not integer:
            raise ValueError(f"{name}: key_value_seq_lengths must be an int [B] = [{b}] array, "
                             f"got {lengths.dtype} {list(lengths.shape)}")  # fmt: skip
        # clipped to [0, S] before int32: an int64 2**32 + 1 is all keys, not 1
        lengths = _checks.check_int_array("key_value_seq_lengths", lengths, clip=(0, s))
    scale = _checks.check_scale(scale)
    return _eager.run(_linformer, (query, key, value, *projs, lengths), scale)


def _linformer(query, key, value, e, f, lengths, scale):
    """:func:`linformer_attention` of checked inputs (projections cut to S, float32)."""
    if lengths is not None:
        real = (jnp.arange(key.shape[1])[None, :] < lengths[:, None])[:, :, None, None]
        key, value = jnp.where(real, key, 0), jnp.where(real, value, 0)

    def project(e, x):  # [k, S] or [K, k, S] with [B, S, K, D] -> [B, k, K, D]
        eq = "ms,bskd->bmkd" if e.ndim == 2 else "kms,bskd->bmkd"
        return jnp.einsum(eq, e, x.astype(jnp.float32)).astype(x.dtype)

    from jattn.functional.attention import dot_product_attention

    return dot_product_attention(
        query, project(e, key), project(f, value), scale=scale, implementation="dense"
    )


# ------------------------------------------------------------------------- Nystromformer


def _segment_means(x, m: int):
    """``x [L, D]`` -> ``[m, D]``: means of m consecutive, near-equal segments."""
    length = x.shape[0]
    seg = (jnp.arange(length) * m) // length
    sums = jax.ops.segment_sum(x, seg, num_segments=m)
    counts = jax.ops.segment_sum(jnp.ones((length, 1), x.dtype), seg, num_segments=m)
    return sums / counts


def _pinv(a, iterations: int):
    """The paper's iterative Moore-Penrose inverse: ``Z0 = A^T / (||A||_1 ||A||_inf)``,
    ``Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4``."""
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    z = a.T / (jnp.max(jnp.sum(jnp.abs(a), axis=0)) * jnp.max(jnp.sum(jnp.abs(a), axis=1)))

    def step(_, z):
        az = a @ z
        return 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))

    return jax.lax.fori_loop(0, iterations, step, z)


def nystrom_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    num_landmarks: int,
    *,
    pinv_iterations: int = 6,
    scale: float | None = None,
) -> jax.Array:
    """Nystromformer attention (non-causal):
    ``softmax(Q Kl^T) pinv(softmax(Ql Kl^T)) softmax(Ql K^T) V`` (scaled logits), with
    landmarks ``Ql``, ``Kl`` the means of ``num_landmarks`` consecutive segments of the
    queries and keys (segments as equal as the lengths allow) and the paper's
    iterative pseudo-inverse (``pinv_iterations``, 6 in the paper). With every token a
    landmark and a converged inverse it is softmax attention.
    """
    name = "nystrom_attention"
    _, t, s, n, _, h = _check_qkv(query, key, value, name)
    m = check_positive_int("num_landmarks", num_landmarks)
    iters = check_positive_int("pinv_iterations", pinv_iterations)
    if m > min(t, s):
        raise ValueError(f"{name}: num_landmarks={m} must be at most min(T, S) = {min(t, s)}")
    scale = _checks.check_scale(scale)
    scale = 1.0 / math.sqrt(h) if scale is None else scale

    return _eager.run(_nystrom, (query, key, value), m, iters, scale)


def _nystrom(query, key, value, m, iters, scale):
    """:func:`nystrom_attention` of checked inputs."""

    def head(q, k, v):  # [T, H], [S, H], [S, Hv]
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
        ql, kl = _segment_means(q, m), _segment_means(k, m)
        k1 = jax.nn.softmax(q @ kl.T * scale, axis=-1)
        k2 = jax.nn.softmax(ql @ kl.T * scale, axis=-1)
        k3 = jax.nn.softmax(ql @ k.T * scale, axis=-1)
        return k1 @ (_pinv(k2, iters) @ (k3 @ v))

    n = query.shape[2]
    key, value = _repeat_kv(key, n), _repeat_kv(value, n)
    per_head = jax.vmap(head, in_axes=(1, 1, 1), out_axes=1)
    return jax.vmap(per_head)(query, key, value).astype(value.dtype)
