"""Attention pooling: the weighted average of values."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jattn.functional import _checks

__all__ = ["attention_pooling"]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def weighted_values(weights: jax.Array, values: jax.Array, dimension_numbers) -> jax.Array:
    """``lax.dot_general(weights, values, dimension_numbers)`` in float32: the weights
    (float32) cast to the values' dtype, accumulated in float32 (the forward product at
    the values' precision, as before).

    Differentiated, the weights' derivative meets the values in float32: JAX's own rule
    would compute ``cotangent @ values^T`` in the dtype of the cast weights, which in
    float16 overflows (64 values of 2000 sum past 65504) to inf, and the softmax's
    backward pass turns that into NaN gradients from finite inputs. The values' derivative
    is computed as JAX would."""
    return lax.dot_general(
        weights.astype(values.dtype), values, dimension_numbers, preferred_element_type=jnp.float32
    )


def _weighted_values_jvp(dimension_numbers, primals, tangents):
    weights, values = primals
    d_weights, d_values = tangents
    out = weighted_values(weights, values, dimension_numbers)
    f32 = functools.partial(lax.dot_general, dimension_numbers=dimension_numbers,
                            preferred_element_type=jnp.float32)  # fmt: skip
    terms = []  # a product with a symbolic zero (an argument not differentiated) is skipped
    if not isinstance(d_weights, jax.custom_derivatives.SymbolicZero):
        terms.append(f32(d_weights, values))
    if not isinstance(d_values, jax.custom_derivatives.SymbolicZero):
        terms.append(f32(weights.astype(values.dtype), d_values))
    return out, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(out)


weighted_values.defjvp(_weighted_values_jvp, symbolic_zeros=True)


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
    weights = weights.astype(jnp.float32)  # its derivative stays float32 (weighted_values)
    return weighted_values(weights, values, (((1,), (0,)), ((), ()))).astype(values.dtype)
