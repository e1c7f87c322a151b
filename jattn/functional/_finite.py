"""Non-finite queries, keys and values reach only the rows that see them.

Padding in real batches is often uninitialised memory. A key or value hidden by a
mask, a length, the causal mask or a window gets weight 0, but ``0 * NaN`` is NaN:
without care a NaN at a hidden position reaches the output and the gradients (it
does in ``jax.nn.dot_product_attention``). The dense and blocked paths therefore

1. zero every query, key and value vector that holds a NaN or inf (one select on
   ``[..., H]``; gradients there are exactly zero), and
2. give a NaN logit to every (query, key) pair in which either is such a vector,
   before the masks: a hidden pair is filled as usual and contributes nothing, a
   visible one makes its row NaN, as it should.

So a non-finite input changes exactly the rows that see it, and the rows that do
not see it are the same as with the vector replaced by anything finite. This runs
only on calls that can hide something (a mask, bias, lengths, causal mask, window
or mods): without any, every pair is visible and NaN spreads as it always did.

The dense path always does it (two selects on inputs a fraction of the size of its
``[T, S]`` work). The blocked and in-layout paths run it behind :func:`guarded`, a
``lax.cond`` on whether any input is non-finite: their products read keys and values
as they are, and a cleaned copy of a long KV cache would cost a decoding step several
times its attention (``benchmarks/bench_hardening.py``); the check reads them once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["guarded", "hide_nonfinite", "hide_qkv", "may_hide", "nan_pairs"]


def may_hide(spec) -> bool:
    """Whether a checked call (:class:`jattn.functional._checks.AttentionSpec`) can hide
    a (query, key) pair, or a query from every key."""
    return any(
        x is not None
        for x in (
            spec.bias, spec.mask, spec.query_seq_lengths, spec.key_value_seq_lengths,
            spec.window, spec.mask_mod, spec.score_mod, spec.block_mask,
        )
    ) or bool(spec.is_causal)  # fmt: skip


def hide_nonfinite(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x with its non-finite vectors zeroed, bad)``: ``bad`` is ``x.shape[:-1]``,
    True where the vector along the last axis holds a NaN or inf."""
    bad = jnp.logical_not(jnp.all(jnp.isfinite(x), axis=-1))
    return jnp.where(bad[..., None], jnp.zeros((), x.dtype), x), bad


def hide_qkv(query, key, value):
    """:func:`hide_nonfinite` on ``query [..., T, N, H]``, ``key [..., S, K, H']`` and
    ``value [..., S, K, Hv]``: ``(query, key, value, bad_queries [..., T, N],
    bad_keys [..., S, K])``, a key position bad when its key or its value is."""
    query, bad_q = hide_nonfinite(query)
    key, bad_k = hide_nonfinite(key)
    value, bad_v = hide_nonfinite(value)
    return query, key, value, bad_q, bad_k | bad_v


def nan_pairs(logits: jax.Array, bad_rows: jax.Array | None, bad_cols: jax.Array | None):
    """``logits [..., T, S]`` with NaN where ``bad_rows [..., T]`` or ``bad_cols [..., S]``
    (either may be None)."""
    bad = None
    if bad_rows is not None:
        bad = bad_rows[..., :, None]
    if bad_cols is not None:
        cols = bad_cols[..., None, :]
        bad = cols if bad is None else bad | cols
    return logits if bad is None else jnp.where(bad, jnp.float32(jnp.nan), logits)


def guarded(run, spec, *inputs):
    """``run(hide)`` for a checked call: ``run(False)`` when the call hides nothing, else
    ``lax.cond`` on whether any of ``inputs`` holds a NaN or inf, between ``run(True)``
    (hides them) and ``run(False)`` (reads the inputs as they are)."""
    if not may_hide(spec):
        return run(False)
    # A float32 sum is NaN or inf when any entry is (and, rarely, when finite entries
    # overflow it: then the hiding branch runs, which is right anyway). It reads each
    # input once, three times faster on CPU than all(isfinite(x)).
    total = sum(jnp.sum(x, dtype=jnp.float32) for x in inputs)
    return jax.lax.cond(jnp.isfinite(total), lambda: run(False), lambda: run(True))
