"""The dense path: the single-head math, vmapped over groups, heads and batch.

Shape letters (as in ``jax.nn``): B batch (any number of leading dims), T query
length, S key/value length, N query heads, K key/value heads, G = N // K groups,
H query/key head dim, Hv value head dim.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jattn.functional import _checks, _eager, _finite, _sharding, mods
from jattn.functional.masks import combine_masks
from jattn.functional.pooling import attention_pooling, weighted_values
from jattn.functional.scores import ScoreFn, scaled_dot_product_scores
from jattn.functional.softmax import FullyMasked, masked_softmax_with_lse
from jattn.functional.stochastic import keep_mask

__all__ = ["attend", "attention", "single_head_attention"]


def single_head_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    score_fn: ScoreFn = scaled_dot_product_scores,
    score_params: Any = None,
    fully_masked: FullyMasked = "zeros",
    dropout_keep: jax.Array | None = None,
    dropout_rate: float = 0.0,
    nonfinite: tuple[jax.Array | None, jax.Array | None] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One head: ``softmax(score_fn(q, k) + bias, mask) @ v``.

    Args:
      query: ``[T, H]``.
      key: ``[S, H']``.
      value: ``[S, Hv]``.
      bias: optional, broadcasts to ``[T, S]`` (same rank).
      mask: optional boolean, broadcasts to ``[T, S]`` (True = attend).
      score_fn: ``(query, key, params) -> [T, S]``.
      score_params: the ``params`` passed to ``score_fn``.
      fully_masked: ``'zeros'`` or ``'uniform'`` weights for a row with no key.
      dropout_keep: optional boolean ``[T, S]``; dropped weights are zeroed and the
        kept ones scaled by ``1 / (1 - dropout_rate)``.
      dropout_rate: the rate that produced ``dropout_keep``.
      nonfinite: optional ``(bad_queries [T], bad_keys [S])`` booleans (either None):
        the rows that see them through the mask come out NaN, the others as computed
        (:mod:`jattn.functional._finite`).

    Returns:
      ``(output [T, Hv], weights [T, S] float32, lse [T] float32)``. The weights are
      the softmax before dropout.
    """
    query, key, value, bias = _check_one_head(query, key, value, bias)
    t, s = query.shape[0], key.shape[0]
    logits = score_fn(query, key, score_params)  # [T, S]
    if logits.shape != (t, s):
        raise ValueError(
            f"score_fn returned logits of shape {_checks.fmt(logits.shape)}, "
            f"expected [T, S] = [{t}, {s}]"
        )
    logits = logits.astype(jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if nonfinite is not None:  # zeroed vectors' pairs: finite, a select XLA keeps
        logits = _finite.zero_pairs(logits, *nonfinite)
    weights, lse = masked_softmax_with_lse(logits, mask, fully_masked=fully_masked)
    probs = weights
    if dropout_keep is not None:
        probs = jnp.where(dropout_keep, weights / jnp.float32(1.0 - dropout_rate), 0.0)
    out = attention_pooling(probs, value)  # float32 probabilities: see weighted_values
    rows = None  # the rows that see a bad vector: NaN (no NaN weights)
    if nonfinite is not None:
        rows = _finite.nan_rows(None if mask is None else jnp.broadcast_to(mask, (t, s)),
                                *nonfinite)  # fmt: skip
    if rows is not None:  # (None when both flags are)
        out = _finite.nan_where(rows[:, None], out)
        weights, lse = _finite.nan_where(rows[:, None], weights), _finite.nan_where(rows, lse)
    return out, weights, lse


_QKV = ("query", "key", "value")


def _check_one_head(query, key, value, bias):
    """:func:`single_head_attention`'s inputs as real arrays of one head each (a
    ``[B, T, N, H]`` array here would be read as rows of a matrix; ``attention`` takes
    those)."""
    query, key, value = (
        _checks.check_real(n, x) for n, x in zip(_QKV, (query, key, value), strict=True)
    )
    if (query.ndim, key.ndim, value.ndim) != (2, 2, 2) or key.shape[0] != value.shape[0]:
        raise ValueError(
            "single_head_attention takes one head: query [T, H], key [S, H'] and value "
            f"[S, Hv], got {_checks.fmt(query.shape)}, {_checks.fmt(key.shape)} and "
            f"{_checks.fmt(value.shape)}; for [B, T, N, H] inputs use attention"
        )
    if bias is not None:
        bias = _checks.check_real("bias", bias)
        target = (query.shape[0], key.shape[0])
        if bias.ndim != 2:
            raise ValueError(
                f"bias must have rank 2 and broadcast to [T, S] = {_checks.fmt(target)}, got "
                f"{_checks.fmt(bias.shape)}"
            )
        _checks.check_broadcast("bias", bias, target, "[T, S]")
    return query, key, value, bias


def _flatten_batch(x: jax.Array, batch_shape: tuple[int, ...]) -> jax.Array:
    return x.reshape((math.prod(batch_shape),) + x.shape[len(batch_shape) :])


def _head_shape(n: int, k: int) -> tuple[int, ...]:
    """Query heads as ``(K, G)``, or ``(K,)`` without grouping (size-1 axes cost copies)."""
    return (k, n // k) if n != k else (k,)


def _grouped(x, batch_shape, n, k):
    """Brings a bias or mask that broadcasts to ``[..., N, T, S]`` to a compact grouped form.

    Returns ``(array, batch_axis, head_axis)``: the array is ``[B?, (K, G?)?, T|1, S|1]``
    where the batch and head dims are present only when the input had them.
    """
    if x is None:
        return None, False, False
    nb = len(batch_shape)
    x = x.reshape((1,) * (nb + 3 - x.ndim) + x.shape)
    has_batch = any(d != 1 for d in x.shape[:nb])
    has_heads = x.shape[nb] != 1
    if has_batch:
        x = jnp.broadcast_to(x, batch_shape + x.shape[nb:])
        x = _flatten_batch(x, batch_shape)  # [B, N|1, T|1, S|1]
    else:
        x = x.reshape(x.shape[nb:])  # [N|1, T|1, S|1]
    lead = x.shape[:-3]
    if has_heads:
        x = x.reshape(lead + _head_shape(n, k) + x.shape[-2:])
    else:
        x = x.reshape(lead + x.shape[-2:])
    return x, has_batch, has_heads


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    score_fn: ScoreFn = scaled_dot_product_scores,
    score_params: Any = None,
    per_head_params: bool = False,
    is_causal: bool = False,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    fully_masked: FullyMasked = "zeros",
    return_weights: bool = False,
    return_residual: bool = False,
    mask_mod=None,
    score_mod=None,
    block_mask=None,
):
    """Multi-head attention with any score function.

    The single-head math (:func:`single_head_attention`) is vmapped over the G
    query heads that share a key/value head, over the K key/value heads and over
    the batch, so grouped-query (``K < N``) and multi-query (``K == 1``) attention
    need no copies of keys and values.

    Args:
      query: ``[..., T, N, H]`` (any number of leading batch dims, or none).
      key: ``[..., S, K, H']``; H' may differ from H when ``score_fn`` allows it.
      value: ``[..., S, K, Hv]``; Hv may differ from H.
      bias: optional float array added to the logits; broadcasts to ``[..., N, T, S]``.
      mask: optional boolean array (True = attend); broadcasts to ``[..., N, T, S]``.
      score_fn: single-head score ``(query [T, H], key [S, H'], params) -> [T, S]``.
      score_params: pytree passed to ``score_fn``; shared by every head, unless
        ``per_head_params`` is True, in which case every leaf has a leading axis N.
      per_head_params: see ``score_params``.
      is_causal: top-left aligned causal mask (query i sees keys j <= i).
      query_seq_lengths: optional int ``[...]`` (batch shape); queries at or past
        the length get zero output.
      key_value_seq_lengths: optional int ``[...]``; keys at or past it are masked.
      local_window_size: ``w`` or ``(left, right)``: query i sees keys
        ``i - left <= j <= i + right``.
      dropout_rate: dropout on the attention weights (needs ``dropout_rng``).
      dropout_rng: PRNG key for dropout. The keep-mask is
        ``keep_mask(dropout_rng, 1 - dropout_rate, [B, N, T, S])`` (a hash of the key and
        the coordinates, :mod:`jattn.functional.stochastic`), the same on every path.
      fully_masked: weights of a query with no visible key: ``'zeros'`` (default,
        output 0, as PyTorch SDPA) or ``'uniform'`` (as ``jax.nn.dot_product_attention``).
      return_weights: also return the float32 softmax weights ``[..., N, T, S]``
        (before dropout). Asking for them does not change the output.
      return_residual: also return the float32 log-sum-exp ``[..., T, N]`` of the
        masked logits.
      mask_mod, score_mod: masks and score modifiers as functions (:mod:`jattn.mods`;
        see :func:`jattn.dot_product_attention`); ``score_mod`` rewrites the output of
        ``score_fn``.
      block_mask: a :class:`jattn.BlockMask`, as in :func:`jattn.dot_product_attention`:
        its ``mask_mod`` applies (this dense path computes every block anyway).

    Returns:
      ``output [..., T, N, Hv]`` in the value dtype, or a tuple
      ``(output, weights?, residual?)`` with the requested extras in that order.
    """
    _checks.check_flags(return_weights=return_weights)
    spec = _checks.check_attention_inputs(
        query,
        key,
        value,
        bias,
        mask,
        same_head_dim=False,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        fully_masked=fully_masked,
        is_causal=is_causal,
        return_residual=return_residual,
        mask_mod=mask_mod,
        score_mod=score_mod,
        block_mask=block_mask,
    )
    options = (score_fn, per_head_params, return_weights)
    out, weights, lse = _eager.run(_attend_positional, (spec, score_params), *options)
    extras = [x for x in (weights, lse) if x is not None]
    return (out, *extras) if extras else out


def _attend_positional(spec, score_params, score_fn, per_head_params, return_weights):
    """:func:`attend` with its options given by position (for :func:`_eager.run`)."""
    return attend(
        spec,
        score_fn=score_fn,
        score_params=score_params,
        per_head_params=per_head_params,
        return_weights=return_weights,
    )


def attend(
    spec: _checks.AttentionSpec,
    *,
    score_fn: ScoreFn = scaled_dot_product_scores,
    score_params: Any = None,
    per_head_params: bool = False,
    return_weights: bool = False,
):
    """The dense path on a checked call: ``(output, weights or None, lse or None)``, the
    log-sum-exp when ``spec.return_residual`` (:func:`attention` documents the rest)."""
    query, key, value, bias, mask = spec.query, spec.key, spec.value, spec.bias, spec.mask
    batch_shape, dropout_rate, q_len = spec.batch_shape, spec.dropout_rate, spec.query_seq_lengths
    fully_masked, dropout_rng = spec.fully_masked, spec.dropout_rng
    t, n, _ = query.shape[-3:]
    s, k, _ = key.shape[-3:]
    g = n // k
    if per_head_params:
        for leaf in jax.tree.leaves(score_params):
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != n:
                raise ValueError(
                    f"per_head_params=True needs every score_params leaf to have a leading "
                    f"axis N={n}, got a leaf of shape {_checks.fmt(jnp.shape(leaf))}"
                )

    nb = math.prod(batch_shape)
    heads = _head_shape(n, k)
    q = _flatten_batch(query, batch_shape).reshape(
        (nb, t) + heads + query.shape[-1:]
    )  # [B,T,K,G?,H]
    kk = _flatten_batch(key, batch_shape)  # [B, S, K, H']
    v = _flatten_batch(value, batch_shape)  # [B, S, K, Hv]
    bad_q = bad_kv = None
    if _finite.may_hide(spec):  # hidden non-finite inputs reach nothing
        q, kk, v, bad_q, bad_kv = _finite.hide_qkv(q, kk, v)  # [B, T, K, G?], [B, S, K]
    bias_g, bias_b, bias_h = _grouped(bias, batch_shape, n, k)
    mask_g, mask_b, mask_h = _grouped(mask, batch_shape, n, k)
    keep = None
    if dropout_rate > 0.0:
        keep = keep_mask(dropout_rng, 1.0 - dropout_rate, (nb, k, g, t, s))  # rows: [B, N, T]
        keep = keep.reshape((nb,) + heads + (t, s))
        batch = _sharding.batch_like(q)  # vmapped beside q: sharded over B as q is
        if batch is not None:
            keep = jax.sharding.reshard(keep, batch)
    params = score_params
    if per_head_params:
        params = jax.tree.map(lambda p: p.reshape(heads + p.shape[1:]), score_params)

    # The shortcuts (is_causal, the window, the lengths) and mask_mod, as one mask_mod;
    # it and score_mod are evaluated per head on [T, S] index grids. The example and
    # head indices are the vmaps' own axis indices (an index array mapped beside sharded
    # inputs would have to be sharded like them), and an index a mod does not read
    # stays unbatched: no per-head copies of a shared mask.
    mask_mod, score_mod = mods.spec_mask_mod(spec), spec.score_mod
    q_idx = jnp.arange(t, dtype=jnp.int32)[:, None]
    kv_idx = jnp.arange(s, dtype=jnp.int32)[None, :]

    def one_head(q1, k1, v1, b1, m1, keep1, p1, bq1, bkv1):
        bi = jax.lax.axis_index("b")
        ni = jax.lax.axis_index("k") * g + (jax.lax.axis_index("g") if g > 1 else 0)
        fn = score_fn
        if score_mod is not None:

            def fn(q, k, p):
                logits = score_fn(q, k, p).astype(jnp.float32)
                return mods.call_score(score_mod, logits, bi, ni, q_idx, kv_idx)

        if mask_mod is not None:
            structural = mods.call_mask(mask_mod, bi, ni, q_idx, kv_idx)
            m1 = structural if m1 is None else m1 & structural
        return single_head_attention(
            q1, k1, v1, b1, m1, score_fn=fn, score_params=p1, fully_masked=fully_masked,
            dropout_keep=keep1, dropout_rate=dropout_rate,
            nonfinite=None if bq1 is None else (bq1, bkv1),
        )  # fmt: skip

    hp = 0 if per_head_params else None
    bh, mh = 0 if bias_h else None, 0 if mask_h else None
    over_g = one_head
    if g > 1:  # Over the G query heads of one key/value head: q [T, G, H].
        over_g = jax.vmap(
            one_head,
            in_axes=(1, None, None, bh, mh, 0, hp, 1, None),
            out_axes=(1, 0, 1),
            axis_name="g",
        )
    # Over the K key/value heads: q [T, K, G?, H], k [S, K, H'], v [S, K, Hv].
    over_k = jax.vmap(
        over_g, in_axes=(1, 1, 1, bh, mh, 0, hp, 1, 1), out_axes=(1, 0, 1), axis_name="k"
    )

    def one_example(q1, k1, v1, b1, m1, keep1, ql, bq1, bkv1):
        out, w, lse = over_k(q1, k1, v1, b1, m1, keep1, params, bq1, bkv1)
        if ql is not None:  # jax.nn zeroes padded queries, whatever the policy
            valid = (jnp.arange(t) < ql).reshape((t,) + (1,) * (out.ndim - 1))
            out = jnp.where(valid, out, 0)
        return out, w, lse

    over_b = jax.vmap(
        one_example,
        in_axes=(
            0, 0, 0, 0 if bias_b else None, 0 if mask_b else None, 0,
            None if q_len is None else 0, 0, 0,
        ),
        axis_name="b",
    )  # fmt: skip
    out, weights, lse = over_b(q, kk, v, bias_g, mask_g, keep, q_len, bad_q, bad_kv)
    # out [B, T, K, G?, Hv], weights [B, K, G?, T, S], lse [B, T, K, G?]
    out = out.reshape(batch_shape + (t, n, value.shape[-1]))
    weights = weights.reshape(batch_shape + (n, t, s)) if return_weights else None
    lse = lse.reshape(batch_shape + (t, n)) if spec.return_residual else None
    return out, weights, lse


def _in_layout_logits(key, q):
    """``key [B, S, K, H]`` . ``q [B, K, H, R]`` -> ``[B, S, R]`` float32."""
    dims = (((2, 3), (1, 2)), ((0,), (0,)))
    return jax.lax.dot_general(key, q, dims, preferred_element_type=jnp.float32)


def _in_layout_output(p, value):
    """``p [B, R, S]`` (float32) @ ``value [B, S, K, Hv]`` -> ``[B, R, K, Hv]`` float32,
    with ``p``'s derivative in float32 (:func:`jattn.functional.pooling.weighted_values`)."""
    return weighted_values(p, value, (((2,), (1,)), ((0,), (0,))))


def _dense_in_layout(
    spec: _checks.AttentionSpec, *, return_weights: bool = False, forward_mode: bool = True
):
    """The dense path with its two products on keys and values in their own layout.

    ``spec``: a checked call; the results are those of :func:`attend`'s
    ``(output, weights or None, lse or None)``; ``forward_mode=False`` gives up pure
    forward-mode differentiation for a leaner reverse mode (the guard's custom VJP,
    :func:`jattn.functional._finite.guarded_by_result`). The
    vmapped single-head math hands XLA products batched over the heads, which on CPU
    first transposes keys and values to ``[B, K, S, H]``: for a few queries against
    many keys (a decoding step against a KV cache) those two copies are most of the
    time. Here both products read ``key [B, S, K, H]`` and ``value [B, S, K, Hv]`` as
    they are:

    * logits ``[B, S, T*K*G]``: key contracted over (K, H) with ``Q [B, K, H, T*K*G]``,
      which holds each query in the rows of its own key/value head and zeros elsewhere;
    * output ``[B, T*K*G, K, Hv] = P [B, T*K*G, S] @ value``, of which the diagonal
      (a query head's own value head) is kept.

    Both products do K times the work of the per-head ones, which is cheap while
    ``T * N`` is small (:func:`jattn.functional.dispatch.dense_in_layout` decides).
    The masks, softmax and dropout are the dense path's, on ``[B, K, G, T, S]``. One
    difference: a non-finite key entry meets the zeros of the other heads' queries, so
    it turns that key position's logits to NaN in every head of the example (the
    per-head path keeps it to its own head), in calls that hide nothing; a call that
    can hide a pair zeroes non-finite vectors first (:mod:`jattn.functional._finite`).
    """
    batch_shape, dropout_rate, fully_masked = spec.batch_shape, spec.dropout_rate, spec.fully_masked
    t, n, h = spec.query.shape[-3:]
    s, k, hv = spec.value.shape[-3:]
    g, nb = n // k, math.prod(batch_shape)
    scale = 1.0 / math.sqrt(h) if spec.scale is None else spec.scale

    def run(hide: bool, spec: _checks.AttentionSpec):  # closes over no array (a custom JVP)
        eye = jnp.eye(k, dtype=bool)
        bias, mask, dropout_rng = spec.bias, spec.mask, spec.dropout_rng
        q = _flatten_batch(spec.query, batch_shape).reshape(nb, t, k, g, h)
        key, value = _flatten_batch(spec.key, batch_shape), _flatten_batch(spec.value, batch_shape)
        bad_q = bad_kv = None
        if hide:  # hidden non-finite inputs reach nothing (jattn.functional._finite)
            q, bad_q = _finite.hide_nonfinite(q)  # [B, T, K, G]
        # Q [B, K', H, T, K, G]: query (t, k, g) in the rows of key head k' == k, zeros elsewhere.
        q = q.transpose(0, 4, 1, 2, 3)
        q = jnp.where(eye[None, :, None, None, :, None], q[:, None], jnp.zeros((), q.dtype))
        q = q.reshape(nb, k, h, t * k * g)
        # The products take key [B, S, K, H] and value [B, S, K, Hv] as given (no reshape in
        # the program: XLA can fuse a reshape with the in-place write of a KV cache in a
        # decoding loop into a copy of the whole cache; see dispatch.IN_LAYOUT_MIN_KEYS).
        if hide:  # cleaned chunk by chunk: no cleaned copy of the cache (_finite.map_chunks)
            logits, bad_kv = _finite.map_chunks(
                (key, value),
                lambda chunks, bad: (_in_layout_logits(chunks[0], q), bad[0] | bad[1]),
            )  # [B, S, T*K*G], [B, S, K]
        else:
            logits = _in_layout_logits(key, q)  # [B, S, T*K*G]
        probe = jnp.sum(logits)  # finite when the queries and keys are (guarded_by_result)
        logits = logits.reshape(nb, s, t, k, g).transpose(0, 3, 4, 2, 1) * jnp.float32(scale)
        index = mods.grid(nb, (k, g), t, s)  # b, n, q_idx, kv_idx over [B, K, G, T, S]
        if spec.score_mod is not None:
            logits = mods.call_score(spec.score_mod, logits, *index)
        if bias is not None:
            logits = logits + _checks.grouped_5d(bias, batch_shape, n, k, t, s).astype(jnp.float32)
        if bad_q is not None:  # [B, T, K, G] -> [B, K, G, T]; [B, S, K] -> [B, K, 1, S]
            bad_rows, bad_cols = bad_q.transpose(0, 2, 3, 1), bad_kv.transpose(0, 2, 1)[:, :, None]
            logits = _finite.zero_pairs(logits, bad_rows, bad_cols)  # as the per-head path
        visible = None if mask is None else _checks.grouped_5d(mask, batch_shape, n, k, t, s)
        mask_mod = mods.spec_mask_mod(spec)  # the shortcuts and mask_mod
        if mask_mod is not None:
            visible = combine_masks(visible, mods.call_mask(mask_mod, *index))
        weights, lse = masked_softmax_with_lse(logits, visible, fully_masked=fully_masked)
        rows = None
        if bad_q is not None:  # the rows that see a bad vector: NaN at the end
            rows = _finite.nan_rows(visible, bad_rows, bad_cols)
            rows = jnp.broadcast_to(rows, (nb, k, g, t))  # [B, K, G, T]
        probs = weights
        if dropout_rate > 0.0:
            keep = keep_mask(dropout_rng, 1.0 - dropout_rate, (nb, k, g, t, s))
            probs = jnp.where(keep, weights / jnp.float32(1.0 - dropout_rate), 0.0)

        p = probs.transpose(0, 3, 1, 2, 4).reshape(nb, t * k * g, s)  # float32
        if hide:

            def weighted(start, fresh, chunks):
                pc = jax.lax.dynamic_slice_in_dim(p, start, fresh.size, axis=2)
                return _in_layout_output(jnp.where(fresh, pc, 0), chunks[0])

            init = jnp.zeros((nb, t * k * g, k, hv), jnp.float32)
            out = _finite.sum_chunks((value,), weighted, init)
        else:  # [B, T*K*G, K, Hv]: each query head's own value head is kept below
            out = _in_layout_output(p, value)
        probe = probe + jnp.sum(out)  # finite when the values are (any head's)
        if rows is not None:  # out [B, T*K*G, K, Hv], weights [B, K, G, T, S], lse [B, K, G, T]
            flat = rows.transpose(0, 3, 1, 2).reshape(nb, t * k * g, 1, 1)
            out, lse = _finite.nan_where(flat, out), _finite.nan_where(rows, lse)
            weights = _finite.nan_where(rows[..., None], weights)
        # only what the caller asked for leaves the guard's lax.cond (its outputs are kept)
        weights = weights if return_weights else None
        lse = lse if spec.return_residual else None
        return (out, weights, lse), probe

    # The diagonal after the guard: XLA fuses it with the final layout into one copy.
    out, weights, lse = _finite.guarded_by_result(run, spec, forward_mode=forward_mode)
    out = jnp.diagonal(out.reshape(nb, t, k, g, k, hv), axis1=2, axis2=4)  # [B, T, G, Hv, K]
    out = out.transpose(0, 1, 4, 2, 3).astype(spec.value.dtype)  # [B, T, K, G, Hv]
    q_len = spec.query_seq_lengths
    if q_len is not None:  # padded queries give zeros, whatever the policy (as jax.nn)
        valid = jnp.arange(t).reshape(1, t, 1, 1, 1) < q_len.reshape(nb, 1, 1, 1, 1)
        out = jnp.where(valid, out, jnp.zeros((), out.dtype))
    out = out.reshape(batch_shape + (t, n, hv))
    weights = weights.reshape(batch_shape + (n, t, s)) if return_weights else None
    if spec.return_residual:
        lse = lse.transpose(0, 3, 1, 2).reshape(batch_shape + (t, n))
    return out, weights, lse if spec.return_residual else None
