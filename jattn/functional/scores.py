"""Compatibility (score) functions between one head's queries and keys.

Every score function has the same signature, so any of them plugs into
:func:`jattn.attention` or a layer::

    score_fn(query: [T, H], key: [S, H'], params) -> logits: [T, S]  (float32)

``params`` is a pytree of parameters (``None`` for the parameter-free scores).
Options such as ``scale`` are keyword-only and bound with ``functools.partial``.
Logits are accumulated and returned in float32 whatever the input dtype.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jattn.functional import _checks

__all__ = [
    "ScoreFn",
    "AdditiveParams",
    "MLPParams",
    "dot_product_scores",
    "scaled_dot_product_scores",
    "additive_scores",
    "bilinear_scores",
    "mlp_scores",
]

#: A score function: ``score_fn(query [T, H], key [S, H'], params) -> [T, S]`` logits.
ScoreFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def _f32_dot(a: jax.Array, b: jax.Array, spec: str) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _check_shapes(fn: str, query, key, *, same_dim: bool, params=None):
    """query ``[T, H]`` and key ``[S, H']`` (H' == H if ``same_dim``); ``params(H, H')``
    gives ``{name: (array, expected shape)}`` to check too. A ValueError naming them.
    Returns query and key as arrays."""
    query, key = _checks.as_array("query", query), _checks.as_array("key", key)
    for name, x in (("query", query), ("key", key)):
        _checks.check_real(f"{fn}: {name}", x)
    problems = []
    if jnp.ndim(query) != 2 or jnp.ndim(key) != 2:
        problems.append("query must be [T, H] and key [S, H'] (one head; vmap over heads)")
    elif same_dim and query.shape[-1] != key.shape[-1]:
        problems.append("query and key need the same head dim H")
    elif params is not None:
        for name, (array, want) in params(query.shape[-1], key.shape[-1]).items():
            if jnp.shape(array) != want:
                problems.append(f"{name} must be {list(want)}, got {list(jnp.shape(array))}")
    if problems:
        raise ValueError(
            f"{fn}: query {list(jnp.shape(query))}, key {list(jnp.shape(key))}: "
            + "; ".join(problems)
        )
    return query, key


def _check_params(fn: str, params, cls):
    """``params`` as a ``cls`` of real arrays (a list leaf becomes an array: einsum
    refused it without naming it); a TypeError naming the expected parameter type
    unless ``params`` has its fields (``None`` or a dict would otherwise fail with an
    AttributeError)."""
    if not all(hasattr(params, f) for f in cls._fields):
        raise TypeError(
            f"{fn}: params must be {cls.__name__}({', '.join(cls._fields)}) (from "
            f"jattn.{cls.__name__}), got {type(params).__name__}"
        )
    return cls(*(_checks.check_real(f"{fn}: params.{f}", getattr(params, f)) for f in cls._fields))


def _hidden_size(*candidates) -> tuple[int, ...]:
    """The hidden size A most of ``(array, ndim, axis)`` agree on, as ``(A,)`` (``()``
    when none has the expected rank), so a wrong parameter is the one named."""
    sizes = [jnp.shape(x)[axis] for x, ndim, axis in candidates if jnp.ndim(x) == ndim]
    return (collections.Counter(sizes).most_common(1)[0][0],) if sizes else ()


def dot_product_scores(query: jax.Array, key: jax.Array, params: None = None) -> jax.Array:
    """Plain dot product ``q . k``.

    Args:
      query: ``[T, H]``.
      key: ``[S, H]``.
      params: unused (``None``).

    Returns:
      ``[T, S]`` float32 logits.
    """
    del params
    query, key = _check_shapes("dot_product_scores", query, key, same_dim=True)
    return _f32_dot(query, key, "th,sh->ts")


def scaled_dot_product_scores(
    query: jax.Array, key: jax.Array, params: None = None, *, scale: float | None = None
) -> jax.Array:
    """Scaled dot product ``q . k * scale`` (Vaswani et al.).

    Args:
      query: ``[T, H]``.
      key: ``[S, H]``.
      params: unused (``None``).
      scale: multiplies the dot product; ``None`` means ``1 / sqrt(H)``.

    Returns:
      ``[T, S]`` float32 logits.
    """
    del params
    query, key = _check_shapes("scaled_dot_product_scores", query, key, same_dim=True)
    if scale is None:
        if query.shape[-1] == 0:
            raise ValueError("scaled_dot_product_scores: the default scale 1/sqrt(H) needs H > 0")
        scale = 1.0 / math.sqrt(query.shape[-1])
    elif isinstance(scale, bool) or jnp.ndim(scale) != 0:
        raise ValueError(
            "scaled_dot_product_scores: scale must be a scalar (a number or a 0-d array), got "
            + (f"shape {list(jnp.shape(scale))}" if jnp.ndim(scale) else repr(scale))
        )
    else:  # finite; a traced scale (learned, or swept under jit) cannot be checked
        scale = _checks.check_finite_scalar("scale", scale, allow_traced=True)
    return _f32_dot(query, key, "th,sh->ts") * jnp.float32(scale)


class AdditiveParams(NamedTuple):
    """Parameters of the additive (Bahdanau) score ``w_v^T tanh(W_q q + W_k k)``.

    Attributes:
      w_query: ``[H, A]`` projects queries to the hidden size A.
      w_key: ``[H', A]`` projects keys; H' may differ from H.
      w_value: ``[A]`` reduces the hidden tanh activation to a scalar score.
    """

    w_query: jax.Array
    w_key: jax.Array
    w_value: jax.Array


def additive_scores(query: jax.Array, key: jax.Array, params: AdditiveParams) -> jax.Array:
    """Additive attention (Bahdanau et al. 2015): ``w_v^T tanh(W_q q + W_k k)``.

    Works when the query and key sizes differ. Memory is ``O(T * S * A)``.

    Args:
      query: ``[T, H]``.
      key: ``[S, H']``.
      params: :class:`AdditiveParams`.

    Returns:
      ``[T, S]`` float32 logits.
    """
    params = _check_params("additive_scores", params, AdditiveParams)
    a = _hidden_size((params.w_query, 2, 1), (params.w_key, 2, 1), (params.w_value, 1, 0))
    query, key = _check_shapes(
        "additive_scores",
        query,
        key,
        same_dim=False,
        params=lambda h, h2: {
            "w_query": (params.w_query, (h, *a)),
            "w_key": (params.w_key, (h2, *a)),
            "w_value": (params.w_value, a),
        },
    )
    q = _f32_dot(query, params.w_query, "th,ha->ta")  # [T, A]
    k = _f32_dot(key, params.w_key, "sh,ha->sa")  # [S, A]
    hidden = jnp.tanh(q[:, None, :] + k[None, :, :])  # [T, S, A]
    return jnp.einsum("tsa,a->ts", hidden, params.w_value.astype(jnp.float32))


def bilinear_scores(query: jax.Array, key: jax.Array, params: jax.Array) -> jax.Array:
    """General / bilinear score (Luong et al. 2015): ``q^T W k``.

    Args:
      query: ``[T, H]``.
      key: ``[S, H']``.
      params: ``W`` of shape ``[H, H']``.

    Returns:
      ``[T, S]`` float32 logits.
    """
    if params is None or isinstance(params, str | dict | tuple):  # tuple: another score's params
        raise TypeError(
            "bilinear_scores: params must be the matrix W [H, H'] (an array), got "
            f"{type(params).__name__}"
        )
    params = _checks.check_real("bilinear_scores: params", params)
    query, key = _check_shapes(
        "bilinear_scores", query, key, same_dim=False, params=lambda h, h2: {"W": (params, (h, h2))}
    )
    qw = _f32_dot(query, params, "th,hk->tk")  # [T, H']
    return _f32_dot(qw, key.astype(jnp.float32), "tk,sk->ts")


class MLPParams(NamedTuple):
    """Parameters of the higher-order MLP score over ``[q, k, q * k]`` features.

    Attributes:
      w_query: ``[H, A]``.
      w_key: ``[H, A]``.
      w_product: ``[H, A]``, applied to the elementwise product ``q * k``
        (this term makes the score a nonlinear function of bilinear features).
      bias: ``[A]``.
      w_out: ``[A]``.
    """

    w_query: jax.Array
    w_key: jax.Array
    w_product: jax.Array
    bias: jax.Array
    w_out: jax.Array


def mlp_scores(query: jax.Array, key: jax.Array, params: MLPParams) -> jax.Array:
    """Higher-order score: a one-hidden-layer GELU network of ``q``, ``k`` and ``q * k``
    (``jax.nn.gelu``'s default tanh approximation).

    ``score(q, k) = w_out^T gelu(W_q q + W_k k + W_p (q * k) + b)``. It generalises
    the additive score (``W_p = 0``) and can represent bilinear interactions.
    Memory is ``O(T * S * max(A, H))``.

    Args:
      query: ``[T, H]``.
      key: ``[S, H]``.
      params: :class:`MLPParams`.

    Returns:
      ``[T, S]`` float32 logits.
    """
    params = _check_params("mlp_scores", params, MLPParams)
    a = _hidden_size(
        *((w, 2, 1) for w in (params.w_query, params.w_key, params.w_product)),
        (params.bias, 1, 0),
        (params.w_out, 1, 0),
    )
    query, key = _check_shapes(
        "mlp_scores",
        query,
        key,
        same_dim=True,
        params=lambda h, _: {
            "w_query": (params.w_query, (h, *a)),
            "w_key": (params.w_key, (h, *a)),
            "w_product": (params.w_product, (h, *a)),
            "bias": (params.bias, a),
            "w_out": (params.w_out, a),
        },
    )
    q32 = query.astype(jnp.float32)
    k32 = key.astype(jnp.float32)
    q = _f32_dot(q32, params.w_query, "th,ha->ta")  # [T, A]
    k = _f32_dot(k32, params.w_key, "sh,ha->sa")  # [S, A]
    prod = q32[:, None, :] * k32[None, :, :]  # [T, S, H]
    p = _f32_dot(prod, params.w_product, "tsh,ha->tsa")  # [T, S, A]
    bias = params.bias.astype(jnp.float32)[None, None, :]  # [1, 1, A]
    hidden = jax.nn.gelu(q[:, None, :] + k[None, :, :] + p + bias)
    return jnp.einsum("tsa,a->ts", hidden, params.w_out.astype(jnp.float32))
