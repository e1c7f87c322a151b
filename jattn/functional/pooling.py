"""Attention pooling: the weighted average of values."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn.functional import _checks

__all__ = ["attention_pooling"]


def attention_pooling(weights: jax.Array, values: jax.Array) -> jax.Array:
    """``weights @ values`` for one head, accumulated in float32.

    Args:
      weights: ``[T, S]`` attention weights (rows usually sum to 1 or 0).
      values: ``[S, Hv]``; Hv is independent of the query/key head dim.

    Returns:
      ``[T, Hv]`` in the dtype of ``values`` (float32 for integer values: the
      average of integers is not an integer).
    """
    weights = _checks.check_real("weights", weights, allow_bool=True)
    values = _checks.check_real("values", values)
    if not jnp.issubdtype(values.dtype, jnp.floating):
        values = values.astype(jnp.float32)
    if weights.ndim != 2 or values.ndim != 2 or weights.shape[1] != values.shape[0]:
        raise ValueError(
            f"attention_pooling expects weights [T, S] and values [S, Hv], got weights "
            f"{list(weights.shape)} and values {list(values.shape)}"
        )
    out = jnp.einsum(
        "ts,sh->th", weights.astype(values.dtype), values, preferred_element_type=jnp.float32
    )
    return out.astype(values.dtype)
