"""Masked softmax in float32 with a finite fill and a documented fully-masked-row result."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jattn.functional.masks import broadcasts_to, check_bool_mask

__all__ = ["FullyMasked", "MASK_FILL", "masked_softmax", "masked_softmax_with_lse"]

FullyMasked = Literal["zeros", "uniform"]

#: Finite logit given to masked entries (the same value jax.nn uses for float32).
MASK_FILL = float(-0.7 * np.finfo(np.float32).max)

_POLICIES = ("zeros", "uniform")
_LOWEST = float(np.finfo(np.float32).min)


def check_fully_masked(fully_masked: str) -> None:
    if fully_masked not in _POLICIES:
        raise ValueError(f"fully_masked must be one of {_POLICIES}, got {fully_masked!r}")


def _max_and_denominator(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row max (0 for rows of only -inf) and the sum of ``exp(x - max)`` (1 where it is 0)."""
    row_max = jnp.max(x, axis=-1, keepdims=True, initial=-jnp.inf)  # S = 0: -inf, then 0
    row_max = jnp.where(jnp.isfinite(row_max), row_max, jnp.float32(0.0))
    denom = jnp.sum(jnp.exp(x - row_max), axis=-1, keepdims=True)
    return row_max, jnp.where(denom > 0, denom, jnp.float32(1.0))


def _softmax_last(x: jax.Array) -> jax.Array:
    """Softmax over the last axis; a row of only ``-inf`` gives zeros instead of NaN.

    Differentiated op by op, exactly as ``jax.nn.softmax`` is by default, so gradients
    agree with ``jax.nn.dot_product_attention`` in the common case; the backward pass
    keeps the same residuals as jax.nn's. The guard costs no pass of its own: the row
    max starts from the lowest finite float (so a row of only ``-inf`` has a finite
    max and ``exp`` gives 0 there), and a zero sum divides by 1 instead.
    """
    row_max = jnp.max(x, axis=-1, keepdims=True, initial=_LOWEST)
    unnormalized = jnp.exp(x - jax.lax.stop_gradient(row_max))
    denom = jnp.sum(unnormalized, axis=-1, keepdims=True)
    return unnormalized / jnp.where(denom > 0, denom, jnp.float32(1.0))


def masked_softmax_with_lse(
    logits: jax.Array,
    mask: jax.Array | None = None,
    *,
    fully_masked: FullyMasked = "zeros",
) -> tuple[jax.Array, jax.Array]:
    """Softmax over the last axis, in float32, and the log-sum-exp of the masked logits.

    Args:
      logits: ``[..., S]``, any float dtype; computed in float32.
      mask: optional boolean array that broadcasts to ``logits`` (True = attend).
      fully_masked: result for a row whose keys are all masked: ``'zeros'``
        (default; as PyTorch's ``scaled_dot_product_attention`` and
        ``jax.nn.softmax(where=...)``) or ``'uniform'`` (``1 / S`` everywhere, as
        ``jax.nn.dot_product_attention``).

    Returns:
      ``(weights, lse)``: float32 weights ``[..., S]`` and float32 ``lse``
      ``[...]``, the log-sum-exp of the logits after masked entries were set to
      :data:`MASK_FILL` (the residual of ``jax.nn.dot_product_attention``).
      Entries with ``-inf`` logits get weight 0; a row whose visible logits are
      all ``-inf`` gets zeros (and ``lse`` 0). Masking and fully masked rows give
      no NaN or inf in the weights or their gradients (a ``+inf`` or NaN logit is
      not a softmax input: it gives NaN, as in ``jax.nn.softmax``).
    """
    check_fully_masked(fully_masked)
    try:
        logits = jnp.asarray(logits, jnp.float32)
    except (TypeError, ValueError) as e:
        raise TypeError(f"logits must be a real array, got {type(logits).__name__}") from e
    if mask is not None:
        mask = check_bool_mask("mask", mask)
        if not broadcasts_to(mask.shape, logits.shape):
            raise ValueError(
                f"mask of shape {list(mask.shape)} must broadcast to the logits' shape "
                f"{list(logits.shape)}"
            )
        mask = jnp.broadcast_to(mask, logits.shape)
        any_visible = jnp.any(mask, axis=-1, keepdims=True)
        # Masked keys get -inf, so they get weight 0 even when every visible logit is
        # -inf (a finite fill would then win); a fully masked row gets the finite fill,
        # which gives the 'uniform' 1 / S. Elsewhere both fills give exp(...) = 0.
        fill = jnp.where(any_visible, jnp.float32(-jnp.inf), jnp.float32(MASK_FILL))
        logits = jnp.where(mask, logits, fill)
    weights = _softmax_last(logits)
    if mask is not None and fully_masked == "zeros":
        weights = jnp.where(any_visible, weights, jnp.float32(0.0))
    row_max, denom = _max_and_denominator(jax.lax.stop_gradient(logits))
    lse = (row_max + jnp.log(denom))[..., 0]
    return weights, lse


def masked_softmax(
    logits: jax.Array,
    mask: jax.Array | None = None,
    *,
    fully_masked: FullyMasked = "zeros",
) -> jax.Array:
    """Float32 masked softmax over the last axis; see :func:`masked_softmax_with_lse`.

    >>> import jax.numpy as jnp
    >>> masked_softmax(jnp.array([[0.0, 0.0, 5.0]]), jnp.array([[True, True, False]]))
    Array([[0.5, 0.5, 0. ]], dtype=float32)
    """
    return masked_softmax_with_lse(logits, mask, fully_masked=fully_masked)[0]
