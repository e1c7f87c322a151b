"""Learnable score functions as NNX modules, with one set of parameters per head.

A score module exposes ``score_fn`` (a pure function from :mod:`jattn.functional.scores`)
and ``params()`` (its parameters as a pytree whose leaves have a leading head
axis N), which :class:`jattn.layers.MultiHeadAttention` passes to
:func:`jattn.attention` with ``per_head_params=True``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.functional import _checks
from jattn.functional.scores import (
    AdditiveParams,
    MLPParams,
    additive_scores,
    bilinear_scores,
    mlp_scores,
)
from jattn.layers.axes import names

__all__ = ["Score", "AdditiveScore", "BilinearScore", "MLPScore"]

_init = nnx.initializers.lecun_normal()


def _check_sizes(param_dtype, **sizes) -> None:
    """Each size a positive int (a ValueError naming it, not a ZeroDivisionError from
    the initializer), and a floating ``param_dtype``."""
    for name, value in sizes.items():
        _checks.check_size(name, value)
    _checks.check_dtype("param_dtype", param_dtype)


class Score(nnx.Module):
    """Base class: a learnable score function shared by the attention layers."""

    score_fn = None

    def params(self):
        raise NotImplementedError


class AdditiveScore(Score):
    """Additive (Bahdanau) score per head: ``w_v^T tanh(W_q q + W_k k)``.

    Args:
      num_heads: N.
      query_head_dim: H.
      key_head_dim: H' (may differ from H).
      hidden: A, the width of the tanh layer.
    """

    score_fn = staticmethod(additive_scores)

    def __init__(
        self,
        num_heads: int,
        query_head_dim: int,
        key_head_dim: int,
        hidden: int,
        *,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_sizes(param_dtype, num_heads=num_heads, query_head_dim=query_head_dim,
                     key_head_dim=key_head_dim, hidden=hidden)  # fmt: skip
        axes = names("heads", "head_dim", "mlp")
        self.w_query = nnx.Param(
            _init(rngs.params(), (num_heads, query_head_dim, hidden), param_dtype), **axes
        )
        self.w_key = nnx.Param(
            _init(rngs.params(), (num_heads, key_head_dim, hidden), param_dtype), **axes
        )
        self.w_value = nnx.Param(
            _init(rngs.params(), (num_heads, hidden, 1), param_dtype)[..., 0],
            **names("heads", "mlp"),
        )

    def params(self) -> AdditiveParams:
        return AdditiveParams(self.w_query[...], self.w_key[...], self.w_value[...])


class BilinearScore(Score):
    """General / bilinear (Luong) score per head: ``q^T W k`` with ``W: [N, H, H']``."""

    score_fn = staticmethod(bilinear_scores)

    def __init__(
        self,
        num_heads: int,
        query_head_dim: int,
        key_head_dim: int,
        *,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_sizes(param_dtype, num_heads=num_heads, query_head_dim=query_head_dim,
                     key_head_dim=key_head_dim)  # fmt: skip
        self.w = nnx.Param(
            _init(rngs.params(), (num_heads, query_head_dim, key_head_dim), param_dtype),
            **names("heads", "head_dim", "head_dim"),
        )

    def params(self) -> jax.Array:
        return self.w[...]


class MLPScore(Score):
    """Higher-order score per head: a GELU network over ``q``, ``k`` and ``q * k``."""

    score_fn = staticmethod(mlp_scores)

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        hidden: int,
        *,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_sizes(param_dtype, num_heads=num_heads, head_dim=head_dim, hidden=hidden)
        shape = (num_heads, head_dim, hidden)
        axes = names("heads", "head_dim", "mlp")
        self.w_query = nnx.Param(_init(rngs.params(), shape, param_dtype), **axes)
        self.w_key = nnx.Param(_init(rngs.params(), shape, param_dtype), **axes)
        self.w_product = nnx.Param(_init(rngs.params(), shape, param_dtype), **axes)
        self.bias = nnx.Param(jnp.zeros((num_heads, hidden), param_dtype), **names("heads", "mlp"))
        self.w_out = nnx.Param(
            _init(rngs.params(), (num_heads, hidden, 1), param_dtype)[..., 0],
            **names("heads", "mlp"),
        )

    def params(self) -> MLPParams:
        return MLPParams(
            self.w_query[...], self.w_key[...], self.w_product[...], self.bias[...], self.w_out[...]
        )
