"""Single-head attention layers in the d2l style: queries, keys, values, valid lengths -> output.

They keep the last attention weights (``layer.attention_weights``, ``[B, T, S]``)
for plotting, as d2l's ``DotProductAttention`` and ``AdditiveAttention`` do.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jattn.functional import _checks
from jattn.functional.attention import attention
from jattn.functional.masks import valid_lens_mask
from jattn.functional.scores import AdditiveParams, additive_scores, scaled_dot_product_scores
from jattn.layers.axes import names
from jattn.layers.dropout import TrainEval, dropout_key

__all__ = ["DotProductAttention", "AdditiveAttention"]


class _SingleHead(TrainEval, nnx.Module):
    def __init__(self, dropout_rate: float, rngs: nnx.Rngs | None, deterministic: bool):
        dropout_rate = _checks.check_rate("dropout_rate", dropout_rate)
        if dropout_rate > 0.0 and rngs is None:
            raise ValueError("dropout_rate > 0 needs rngs=nnx.Rngs(dropout=...)")
        _checks.check_flags(deterministic=deterministic)
        self.deterministic = bool(deterministic)
        self.dropout_rate = dropout_rate
        self.rngs = rngs.dropout.fork() if dropout_rate > 0 else nnx.data(None)
        self.attention_weights = nnx.Intermediate(jnp.zeros((0, 0, 0), jnp.float32))

    @staticmethod
    def _inputs(queries, keys, values):
        """The three inputs as ``[B, L, F]`` arrays, or a ValueError naming the bad one."""
        out = []
        for name, x in (("queries", queries), ("keys", keys), ("values", values)):
            x = _checks.check_real(name, x)
            if x.ndim != 3:
                raise ValueError(f"{name} must have shape [B, L, F], got {list(x.shape)}")
            out.append(x)
        return out

    def _attend(self, queries, keys, values, valid_lens, deterministic, score_fn, params):
        b, t, _ = queries.shape
        s = keys.shape[1]
        if keys.shape[0] != b or values.shape[0] != b or values.shape[1] != s:
            raise ValueError(
                f"queries {list(queries.shape)}, keys {list(keys.shape)} and values "
                f"{list(values.shape)} must share B, and keys and values must share S"
            )
        mask = None
        if valid_lens is not None:
            valid_lens = _checks.check_int_array("valid_lens", valid_lens, clip=(0, s))
            if valid_lens.shape not in ((b,), (b, t)):
                raise ValueError(
                    f"valid_lens must have shape [B]=[{b}] or [B, T]=[{b}, {t}], "
                    f"got {list(valid_lens.shape)}"
                )
            mask = valid_lens_mask(valid_lens, t, s)[:, None, :, :]  # [B, 1, T, S]
        rate, rng = 0.0, None
        if not self._deterministic(deterministic) and self.dropout_rate > 0.0:
            rate, rng = self.dropout_rate, dropout_key(None, self.rngs)
        out, weights = attention(
            queries[:, :, None, :],
            keys[:, :, None, :],
            values[:, :, None, :],
            mask=mask,
            score_fn=score_fn,
            score_params=params,
            dropout_rate=rate,
            dropout_rng=rng,
            return_weights=True,
        )
        self.attention_weights = nnx.Intermediate(weights[:, 0])
        return out[:, :, 0, :]


class DotProductAttention(_SingleHead):
    """Scaled dot-product attention for one head (d2l 11.3).

    Call with ``queries [B, T, H]``, ``keys [B, S, H]``, ``values [B, S, Hv]`` and
    optional ``valid_lens`` ``[B]`` or ``[B, T]``; returns ``[B, T, Hv]``.
    A query with no valid key gets zero output.

    Dropout on the weights (``dropout_rate``, keys from the layer's own ``rngs``
    stream) runs in training mode: ``layer.train()``, or ``deterministic=False`` at
    the call; ``deterministic`` (constructor) is the mode, True (eval) by default.
    """

    def __init__(
        self,
        dropout_rate: float = 0.0,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ):
        super().__init__(dropout_rate, rngs, deterministic)

    def __call__(
        self, queries, keys, values, valid_lens=None, *, deterministic: bool | None = None
    ):
        queries, keys, values = self._inputs(queries, keys, values)
        if jnp.shape(queries)[-1:] != jnp.shape(keys)[-1:]:
            raise ValueError(
                f"queries {list(jnp.shape(queries))} and keys {list(jnp.shape(keys))} "
                "must have the same feature size for dot-product attention"
            )
        return self._attend(
            queries, keys, values, valid_lens, deterministic, scaled_dot_product_scores, None
        )


class AdditiveAttention(_SingleHead):
    """Additive (Bahdanau) attention for one head (d2l 11.3).

    ``score(q, k) = w_v^T tanh(W_q q + W_k k)``; queries and keys may have different sizes.

    Args:
      key_size: the feature size of the keys.
      query_size: the feature size of the queries.
      num_hiddens: A, the hidden width.
      dropout_rate: dropout on the attention weights (in training mode, as
        :class:`DotProductAttention`).
      deterministic: the mode when a call passes ``deterministic=None``; True (eval)
        by default, switched by ``layer.train()`` / ``layer.eval()``.
    """

    def __init__(
        self,
        key_size: int,
        query_size: int,
        num_hiddens: int,
        dropout_rate: float = 0.0,
        *,
        param_dtype=jnp.float32,
        deterministic: bool = True,
        rngs: nnx.Rngs,
    ):
        for name, size in (
            ("key_size", key_size),
            ("query_size", query_size),
            ("num_hiddens", num_hiddens),
        ):
            _checks.check_size(name, size)
        _checks.check_dtype("param_dtype", param_dtype)
        if rngs is None:
            raise ValueError("AdditiveAttention needs rngs=nnx.Rngs(...) for its parameters")
        super().__init__(dropout_rate, rngs, deterministic)
        init = nnx.initializers.lecun_normal()
        axes = names("embed", "mlp")
        self.w_query = nnx.Param(
            init(rngs.params(), (query_size, num_hiddens), param_dtype), **axes
        )
        self.w_key = nnx.Param(init(rngs.params(), (key_size, num_hiddens), param_dtype), **axes)
        self.w_value = nnx.Param(
            init(rngs.params(), (num_hiddens, 1), param_dtype)[:, 0], **names("mlp")
        )

    def __call__(
        self, queries, keys, values, valid_lens=None, *, deterministic: bool | None = None
    ):
        queries, keys, values = self._inputs(queries, keys, values)
        q_size, k_size = self.w_query.shape[0], self.w_key.shape[0]
        if jnp.shape(queries)[-1] != q_size or jnp.shape(keys)[-1] != k_size:
            raise ValueError(
                f"expected queries [..., {q_size}] and keys [..., {k_size}], got "
                f"{list(jnp.shape(queries))} and {list(jnp.shape(keys))}"
            )
        params = AdditiveParams(self.w_query[...], self.w_key[...], self.w_value[...])
        return self._attend(
            queries, keys, values, valid_lens, deterministic, additive_scores, params
        )
