"""Masked softmax in float32 with a finite fill and a documented fully-masked-row result."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jattn.functional.masks import broadcasts_to, check_bool_mask

__all__ = ["FullyMasked", "MASK_FILL", "masked_softmax", "masked_softmax_with_lse"]

#: The result of a fully masked row: ``"zeros"`` or ``"uniform"`` (jax.nn's).
FullyMasked = Literal["zeros", "uniform"]

#: Finite logit given to masked entries (the same value jax.nn uses for float32).
MASK_FILL = float(-0.7 * np.finfo(np.float32).max)

_POLICIES = ("zeros", "uniform")
_LOWEST = float(np.finfo(np.float32).min)


def check_fully_masked(fully_masked: str) -> None:
    if fully_masked not in _POLICIES:
        raise ValueError(f"fully_masked must be one of {_POLICIES}, got {fully_masked!r}")


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
      not a softmax input: it gives NaN, as in ``jax.nn.softmax``), and no ``inf``
      is made on the way (``jax.debug_infs`` stays quiet): masked entries never
      enter the row max or an ``exp``, whatever their logits.

    The softmax is differentiated op by op, exactly as ``jax.nn.softmax`` is by
    default, so gradients agree with ``jax.nn.dot_product_attention``; the row max
    carries no derivative.
    """
    check_fully_masked(fully_masked)
    try:
        logits = jnp.asarray(logits)
    except (TypeError, ValueError) as e:
        raise TypeError(f"logits must be a real array, got {type(logits).__name__}") from e
    if jnp.issubdtype(logits.dtype, jnp.complexfloating):  # the cast dropped the imaginary part
        raise TypeError(f"logits must be real, got dtype {logits.dtype}")
    if logits.ndim == 0:  # was JAX's "axis -1 is out of bounds"
        raise ValueError("logits must be [..., S] (a softmax over the last axis), got a scalar")
    logits = logits.astype(jnp.float32)
    visible = logits
    if mask is not None:
        mask = check_bool_mask("mask", mask)
        if not broadcasts_to(mask.shape, logits.shape):
            raise ValueError(
                f"mask of shape {list(mask.shape)} must broadcast to the logits' shape "
                f"{list(logits.shape)}"
            )
        mask = jnp.broadcast_to(mask, logits.shape)
        visible = jnp.where(mask, logits, jnp.float32(_LOWEST))
    # The max of the visible logits, from the lowest finite float (a row of only -inf,
    # or of none, has a finite max and exp gives 0 there, not exp(-inf - -inf) = NaN).
    row_max = jax.lax.stop_gradient(
        jnp.max(visible, axis=-1, keepdims=True, initial=jnp.float32(_LOWEST))
    )
    shifted = logits - row_max
    if mask is not None:
        # Masked entries: exp(MASK_FILL) = 0, and 1 (the uniform weights) in a row
        # with no visible key; their logits, NaN or not, are never read.
        any_visible = jnp.any(mask, axis=-1, keepdims=True)
        fill = jnp.where(any_visible, jnp.float32(MASK_FILL), jnp.float32(0.0))
        shifted = jnp.where(mask, shifted, fill)
    unnormalized = jnp.exp(shifted)
    denom = jnp.sum(unnormalized, axis=-1, keepdims=True)
    safe = jnp.where(denom > 0, denom, jnp.float32(1.0))
    weights = unnormalized / safe
    lse = jnp.where(denom > 0, row_max + jnp.log(safe), 0.0)[..., 0]  # no gradient: below
    if mask is not None:
        if fully_masked == "zeros":
            weights = jnp.where(any_visible, weights, jnp.float32(0.0))
        # a fully masked row: the lse of S logits at the fill, as jax.nn's
        full = jnp.float32(MASK_FILL) + jnp.log(jnp.float32(max(logits.shape[-1], 1)))
        lse = jnp.where(any_visible[..., 0], lse, full)
    return weights, jax.lax.stop_gradient(lse)


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
