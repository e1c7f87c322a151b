"""jattn's attention as the ``attention_fn`` of ``flax.nnx.MultiHeadAttention``.

``nnx.MultiHeadAttention(..., attention_fn=jattn.layers.flax_attention_fn)`` runs
:func:`jattn.dot_product_attention` in place of Flax's ``dot_product_attention``,
with Flax's call (``mask``, ``dropout_rng``, ``dropout_rate``, ``broadcast_dropout``,
``deterministic``, ``dtype``, ``precision``, ``module``, ``is_causal``) and Flax's
results: the same outputs in eval mode and in Flax's decode mode (``init_cache``,
``decode=True``, whose cache mask is a float array), the attention weights sown into
``module`` as Flax sows them, and dropout with Flax's keep rate and mask shape.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes

from jattn.functional import _checks, _finite
from jattn.functional.attention import dot_product_attention
from jattn.functional.stochastic import keep_mask

__all__ = ["flax_attention_fn"]

_PRECISIONS = {
    jax.lax.Precision.DEFAULT: "default",
    jax.lax.Precision.HIGH: "high",
    jax.lax.Precision.HIGHEST: "highest",
}


def _precision_name(precision) -> str | None:
    """``precision`` (``jax.lax.Precision``, its name, or a pair of equal ones) as a
    ``jax.default_matmul_precision`` name, or None."""
    if precision is None:
        return None
    if isinstance(precision, tuple | list) and len(precision) == 2:
        if precision[0] != precision[1]:
            raise ValueError(
                f"flax_attention_fn: precision must be one jax.lax.Precision for both "
                f"operands, got {precision!r}"
            )
        precision = precision[0]
    if isinstance(precision, str):
        precision = jax.lax.Precision(precision)
    if precision not in _PRECISIONS:
        raise ValueError(
            f"flax_attention_fn: precision must be None or a jax.lax.Precision, got {precision!r}"
        )
    return _PRECISIONS[precision]


def _weighted_values(probs, value, precision):
    """``probs [..., N, T, S] @ value [..., S, K, Hv] -> [..., T, N, Hv]`` (K divides N)."""
    n, k = probs.shape[-3], value.shape[-2]
    grouped = probs.reshape(probs.shape[:-3] + (k, n // k) + probs.shape[-2:])
    out = jnp.einsum("...kgts,...skd->...tkgd", grouped, value, precision=precision)
    return out.reshape(out.shape[:-3] + (n, out.shape[-1]))


def flax_attention_fn(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype=None,
    precision=None,
    module: nnx.Module | None = None,
    promote_dtype=dtypes.promote_dtype,
    is_causal: bool = False,
) -> jax.Array:
    """Flax's ``nnx.dot_product_attention``, computed by :func:`jattn.dot_product_attention`.

    Pass it as ``attention_fn`` of ``flax.nnx.MultiHeadAttention``; the arguments and
    their meaning are those of ``flax.nnx.dot_product_attention``:

    Args:
      query: ``[batch..., T, N, H]``.
      key: ``[batch..., S, K, H]`` (K divides N: grouped-query attention).
      value: ``[batch..., S, K, Hv]``.
      bias: added to the scaled logits; broadcasts to ``[batch..., N, T, S]``.
      mask: True / nonzero = attend; broadcasts to ``[batch..., N, T, S]``. A float
        mask (Flax's decode mode makes one) counts its nonzero entries; its values must
        be 0 or 1 (other values, an additive mask's -inf, are a ValueError where the mask
        is concrete). A query that sees no key gets uniform weights, as in Flax.
      broadcast_dropout: one dropout mask ``[T, S]`` shared by the batch and the heads
        (Flax's default), else one per ``[batch..., N, T, S]`` entry.
      dropout_rng: the dropout key; needed when dropout runs.
      dropout_rate: the probability of dropping a weight, in ``[0, 1)``; kept weights
        are scaled by ``1 / (1 - dropout_rate)``.
      deterministic: no dropout when True. Flax's function defaults to False, and so
        does this one: dropout runs when ``dropout_rate > 0`` unless this is True.
      dtype: computation dtype; q, k, v are promoted to it (``promote_dtype``), and the
        output has it.
      precision: ``jax.lax.Precision`` of the matmuls (None: JAX's default).
      module: when given, the softmax weights ``[batch..., N, T, S]`` (before dropout,
        in the computation dtype) are sown into it as ``nnx.Intermediate``
        ``attention_weights`` (what ``sow_weights=True`` does in Flax).
      promote_dtype: Flax's dtype promotion of ``(query, key, value)``.
      is_causal: top-left aligned causal mask (query i sees keys ``j <= i``), as Flax.

    Returns:
      ``[batch..., T, N, Hv]``.

    The dropout masks are jattn's (:func:`jattn.keep_mask`, a hash of the key and the
    coordinates), not Flax's ``jax.random.bernoulli`` draws: the same distribution,
    other samples.
    """
    query, key, value = promote_dtype((query, key, value), dtype=dtype)
    dtype = query.dtype
    if mask is not None:
        mask = _checks.as_array("mask", mask)
        if mask.dtype != jnp.bool_:
            _checks.check_real("mask", mask)
            values = _checks.concrete(mask)  # traced masks cannot be checked
            if values is not None and not np.isin(values, (0, 1)).all():
                raise ValueError(
                    "flax_attention_fn: mask must be boolean or Flax's 0/1 mask (nonzero = "
                    f"attend), got {mask.dtype} values outside {{0, 1}} (e.g. "
                    f"{values[~np.isin(values, (0, 1))].flat[0]}): an additive mask, whose "
                    "0 entries would be read as masked and -inf as visible; pass it as bias"
                )
            mask = mask.astype(jnp.bool_)  # Flax: nonzero = attend
    if not isinstance(broadcast_dropout, bool):
        raise TypeError(
            f"flax_attention_fn: broadcast_dropout must be a bool, got {broadcast_dropout!r}"
        )
    rate = _checks.check_rate("flax_attention_fn: dropout_rate", dropout_rate)
    if deterministic or rate == 0.0:
        rate = 0.0
    elif dropout_rng is None:
        raise ValueError(
            f"flax_attention_fn: dropout_rate={dropout_rate} with deterministic=False needs "
            "dropout_rng (a PRNG key); nnx.MultiHeadAttention passes one from its rngs"
        )
    per_entry = rate > 0.0 and not broadcast_dropout
    want_weights = module is not None or (rate > 0.0 and broadcast_dropout)
    matmul = _precision_name(precision)
    with jax.default_matmul_precision(matmul) if matmul else contextlib.nullcontext():
        result = dot_product_attention(
            query,
            key,
            value,
            bias,
            mask,
            is_causal=is_causal,
            fully_masked="uniform",
            dropout_rate=rate if per_entry else 0.0,
            dropout_rng=dropout_rng if per_entry else None,
            return_weights=want_weights,
        )
    out, weights = result if want_weights else (result, None)
    if module is not None:
        module.sow(nnx.Intermediate, "attention_weights", weights.astype(dtype))
    if rate > 0.0 and broadcast_dropout:
        # Flax: one [T, S] mask for every batch entry and head.
        keep = keep_mask(dropout_rng, 1.0 - rate, weights.shape[-2:])
        probs = jnp.where(keep, weights / jnp.float32(1.0 - rate), 0.0).astype(dtype)
        # the values again, so their non-finite vectors zeroed as the attention did: a
        # hidden one has weight 0 (0 * NaN would be NaN, in the output and the gradients),
        # a visible one made its rows' weights NaN already
        out = _weighted_values(probs, _finite.hide_nonfinite(value)[0], precision)
    return out.astype(dtype)
