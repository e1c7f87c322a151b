"""Diagnostics of attention: per-head entropy, attention rollout and head importance.

Pure jax: these functions take arrays of attention weights (as returned by
``return_weights=True`` or :func:`jattn.viz.collect_attention_weights`) or a
loss function, and return arrays.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jattn.functional import _checks
from jattn.functional.attention import attention, dot_product_attention

__all__ = [
    "attention_entropy",
    "attention_rollout",
    "head_importance",
    "head_importance_gradient",
    "head_masked",
    "masking_heads",
]


def attention_entropy(weights: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean entropy (in nats) of each head's attention distributions.

    For every query row, ``H = -sum_s p_s log p_s`` with ``0 log 0 = 0``; the
    result averages H over the valid queries. A query is valid when its weights
    do not all vanish and (with a mask) at least one key is visible: fully masked
    rows are excluded. A head with no valid query gets 0. Uniform attention over
    S keys has entropy ``log S``; attending to one key has entropy 0. A NaN weight
    (outside the mask) makes its head's entropy NaN, so it is not averaged away.

    Args:
      weights: ``[..., N, T, S]`` attention weights (rows sum to 1 or 0).
      mask: optional boolean broadcasting to ``[..., N, T, S]`` (True = attend);
        masked entries are ignored.

    Returns:
      float32 ``[..., N]``.
    """
    weights = _checks.as_array("weights", weights)
    if weights.ndim < 3:
        raise ValueError(
            f"weights must have shape [..., N, T, S], got {_checks.fmt(weights.shape)}"
        )
    _checks.check_float("weights", weights)
    p = weights.astype(jnp.float32)
    if mask is not None:
        mask = _checks.check_bool_mask("mask", mask, hint="masked entries are ignored")
        _checks.check_heads_mask("mask", mask, p.shape, "[..., N, T, S]")
        mask = jnp.broadcast_to(mask, p.shape)
        p = jnp.where(mask, p, 0.0)
    positive = p > 0
    plogp = jnp.where(positive, p * jnp.log(jnp.where(positive, p, 1.0)), 0.0)
    row_entropy = -jnp.sum(plogp, axis=-1)  # [..., N, T]
    valid = jnp.sum(p, axis=-1) > 0
    if mask is not None:
        valid = valid & jnp.any(mask, axis=-1)
    count = jnp.sum(valid, axis=-1)
    total = jnp.sum(jnp.where(valid, row_entropy, 0.0), axis=-1)
    entropy = jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)
    # A NaN weight would fail `p > 0` and vanish from the average: let it show instead.
    return jnp.where(jnp.any(jnp.isnan(p), axis=(-2, -1)), jnp.float32(jnp.nan), entropy)


def attention_rollout(weights, *, residual: bool = True) -> jax.Array:
    """Attention rollout (Abnar & Zuidema, 2020) through a stack of self-attention layers.

    Each layer's heads are averaged, ``A_l = mean_n weights_l``; with
    ``residual`` the identity is added for the skip connection and the rows are
    renormalized, ``A_l = (A_l + I) / rowsum``; then the layers are multiplied
    from the first up: ``R = A_L ... A_2 A_1``. ``R[t, s]`` is how much output
    position t draws on input token s.

    Args:
      weights: ``[L, ..., N, T, T]`` (e.g. ``[L, B, N, T, T]``), or a sequence of
        L per-layer ``[..., N, T, T]`` arrays, first layer first.
      residual: account for the residual connections (the paper's choice).

    Returns:
      float32 ``[..., T, T]``; with ``residual`` every row sums to 1 (rows of
      padded queries, whose weights are all zero, pass through the identity).
    """
    if isinstance(weights, Sequence) and not isinstance(weights, jax.Array):
        if not weights:
            raise ValueError("attention_rollout needs at least one layer of weights")
        shapes = {tuple(jnp.shape(w)) for w in weights}
        if len(shapes) != 1:
            raise ValueError(f"every layer must have the same shape, got {sorted(shapes)}")
        weights = jnp.stack([_checks.as_array("weights", w) for w in weights])
    weights = _checks.as_array("weights", weights)
    residual = _checks.check_flag("residual", residual)
    if weights.ndim < 4 or weights.shape[-1] != weights.shape[-2]:
        raise ValueError(
            "attention_rollout needs self-attention weights [L, ..., N, T, T] (square in T), "
            f"got {_checks.fmt(weights.shape)}"
        )
    _checks.check_float("weights", weights)
    t = weights.shape[-1]
    layers = jnp.mean(weights.astype(jnp.float32), axis=-3)  # [L, ..., T, T]
    eye = jnp.eye(t, dtype=jnp.float32).reshape((1,) * (layers.ndim - 3) + (t, t))
    if residual:
        layers = layers + eye[None]
        layers = layers / jnp.sum(layers, axis=-1, keepdims=True)

    def step(rollout, a):
        return jnp.einsum("...ts,...sr->...tr", a, rollout), None

    start = jnp.broadcast_to(eye, layers.shape[1:])
    rollout, _ = jax.lax.scan(step, start, layers)
    return rollout


def _head_mask_shape(head_mask_shape) -> tuple[int, ...]:
    """``(L, N)`` (any shape) of positive ints: a float is not truncated, 0 is no head."""
    if isinstance(head_mask_shape, str) or not isinstance(head_mask_shape, Sequence):
        raise ValueError(
            f"head_mask_shape must be a tuple of positive ints such as (L, N), got "
            f"{head_mask_shape!r}"
        )
    return tuple(
        _checks.check_size(f"head_mask_shape[{i}]", d) for i, d in enumerate(head_mask_shape)
    )


def head_importance(loss_fn: Callable[[jax.Array], jax.Array], head_mask_shape) -> jax.Array:
    """Importance of each head: the loss change when that one head is masked out.

    ``importance[l, n] = loss_fn(mask with 0 at [l, n]) - loss_fn(all ones)``; a
    large positive value means the model needs that head. ``loss_fn`` is called
    ``1 + L * N`` times (jit it yourself for speed).

    Args:
      loss_fn: ``head_mask [L, N] float32 (1 keep, 0 drop) -> scalar loss``. The
        caller wires the mask into the model, e.g. with :func:`head_masked` as
        each layer's ``attention_fn``.
      head_mask_shape: ``(L, N)`` (any shape works; the result has that shape).

    Returns:
      float32 array of shape ``head_mask_shape``.
    """
    shape = _head_mask_shape(head_mask_shape)
    ones = jnp.ones(shape, jnp.float32)
    base = _scalar_loss(loss_fn, ones)
    flat = []
    for i in range(ones.size):
        masked = ones.reshape(-1).at[i].set(0.0).reshape(shape)
        flat.append(_scalar_loss(loss_fn, masked) - base)
    return jnp.stack(flat).reshape(shape)


def _scalar_loss(loss_fn, head_mask: jax.Array) -> jax.Array:
    """``loss_fn(head_mask)`` as a float32 scalar, else a ValueError naming its shape."""
    loss = jnp.asarray(loss_fn(head_mask), jnp.float32)
    if loss.shape != ():
        raise ValueError(f"loss_fn must return a scalar, got shape {_checks.fmt(loss.shape)}")
    return loss


def head_importance_gradient(
    loss_fn: Callable[[jax.Array], jax.Array], head_mask_shape
) -> jax.Array:
    """First-order head importance (Michel et al., 2019): ``|d loss / d head_mask|`` at all ones.

    One backward pass instead of ``L * N`` forward passes; ``loss_fn`` must be
    differentiable in the mask (as with :func:`head_masked`).
    """
    ones = jnp.ones(_head_mask_shape(head_mask_shape), jnp.float32)
    return jnp.abs(jax.grad(lambda m: _scalar_loss(loss_fn, m))(ones))


def head_masked(head_mask: jax.Array, attention_fn: Callable = dot_product_attention) -> Callable:
    """An ``attention_fn`` that scales each head's output by ``head_mask``.

    Pass it to :class:`jattn.layers.MultiHeadAttention` (``attention_fn=``, or
    assign ``layer.attention_fn``): head n's output ``[..., T, n, Hv]`` is
    multiplied by ``head_mask[n]`` before the output projection, so a 0 removes
    the head and a 1 keeps it (masking is differentiable in ``head_mask``).
    The attention weights returned or sown are those of the unmasked heads.
    :class:`jattn.layers.LinearAttention`, which calls no attention function, scales
    its heads' outputs by it too. A :class:`jattn.models.decoding.RotaryAttention`
    stays outermost (the mask goes inside it), so cached decoding still finds it and
    applies RoPE at the cache positions.

    Args:
      head_mask: ``[N]`` floats (1 keep, 0 drop).
      attention_fn: the attention function being wrapped (same call signature).
    """
    from jattn.models.decoding import RotaryAttention  # models import this module's users

    head_mask = _checks.check_real("head_mask", head_mask, allow_bool=True)
    if head_mask.ndim != 1:
        raise ValueError(f"head_mask must have shape [N], got {_checks.fmt(head_mask.shape)}")
    values = _checks.concrete(head_mask)  # a traced mask (differentiated) cannot be checked
    if values is not None and not np.isfinite(values).all():
        raise ValueError(f"head_mask must be finite, got {values.tolist()}")
    if isinstance(attention_fn, RotaryAttention):
        return dataclasses.replace(attention_fn, inner=head_masked(head_mask, attention_fn.inner))
    return _HeadMasked(head_mask, attention_fn)


@dataclasses.dataclass(eq=False)
class _HeadMasked:
    """:func:`head_masked`'s attention function."""

    head_mask: jax.Array
    inner: Callable

    def scale_heads(self, out: jax.Array) -> jax.Array:
        """``out [..., T, N, Hv]`` with head n scaled by ``head_mask[n]``."""
        n = out.shape[-2]
        if self.head_mask.shape[0] != n:
            raise ValueError(f"head_mask has {self.head_mask.shape[0]} entries for {n} heads")
        return out * self.head_mask.astype(out.dtype).reshape((1,) * (out.ndim - 2) + (n, 1))

    def __call__(self, query, key, value, bias=None, mask=None, **kwargs):
        result = self.inner(query, key, value, bias, mask, **kwargs)
        out, extras = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
        out = self.scale_heads(out)
        return (out, *extras) if extras else out


@contextlib.contextmanager
def masking_heads(layers: Sequence, head_mask: jax.Array) -> Iterator[None]:
    """Within the block, layer l's heads are scaled by ``head_mask[l]`` (see :func:`head_masked`).

    ``layers`` are L :class:`jattn.layers.MultiHeadAttention` layers (any object
    with ``attention_fn`` and ``score`` attributes); their ``attention_fn`` is
    wrapped on entry and restored on exit. Typical use with :func:`head_importance`::

        def loss_fn(head_mask):
            with masking_heads(attention_layers, head_mask):
                return loss(model(x), y)

    Args:
      layers: L attention layers.
      head_mask: ``[L, N]`` floats (1 keep, 0 drop).
    """
    head_mask = _checks.check_real("head_mask", head_mask, allow_bool=True)
    if head_mask.ndim != 2 or head_mask.shape[0] != len(layers):
        raise ValueError(
            f"head_mask must have shape [L, N] with L = {len(layers)} layers, "
            f"got {_checks.fmt(head_mask.shape)}"
        )
    saved = [layer.attention_fn for layer in layers]
    try:
        for layer, fn, m in zip(layers, saved, head_mask, strict=True):
            default = attention if getattr(layer, "score", None) is not None else None
            layer.attention_fn = head_masked(m, fn or default or dot_product_attention)
        yield
    finally:
        for layer, fn in zip(layers, saved, strict=True):
            layer.attention_fn = fn
