"""Parametric Nadaraya-Watson kernel regression as an NNX layer (d2l's ``NWKernelRegression``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.functional import _checks
from jattn.functional.kernel_regression import parametric_nadaraya_watson
from jattn.layers.axes import names

__all__ = ["NWKernelRegression"]

_UNIFORM_0_1 = nnx.initializers.uniform(scale=1.0)  # d2l's torch.rand


class NWKernelRegression(nnx.Module):
    """Kernel regression with a learnable width: ``softmax(-((q - k) w)^2 / 2) @ values``.

    The parameter ``w`` has shape ``[]`` (one width, as d2l), ``[F]`` (one per
    input feature), ``[N]`` (one per head) or ``[N, F]``. With heads, every head
    pools the same values with its own width. The last weights are kept in
    ``layer.attention_weights`` (``[T, S]``, or ``[N, T, S]`` with heads) for plotting.

    Args:
      num_heads: N, or ``None`` for a single head.
      num_features: F, or ``None`` for one width shared by all features.
      w_init: initializer of ``w``; default ``U[0, 1)`` as d2l's ``torch.rand``.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        num_heads: int | None = None,
        num_features: int | None = None,
        *,
        w_init=_UNIFORM_0_1,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.num_heads = _checks.check_optional_size("num_heads", num_heads)
        self.num_features = _checks.check_optional_size("num_features", num_features)
        _checks.check_dtype("param_dtype", param_dtype)
        shape = tuple(d for d in (self.num_heads, self.num_features) if d is not None)
        axes = ("heads",) * (self.num_heads is not None) + (None,) * (self.num_features is not None)
        self.w = nnx.Param(w_init(rngs.params(), shape, param_dtype), **names(*axes))
        self.attention_weights = nnx.Intermediate(jnp.zeros((0, 0), jnp.float32))

    def __call__(
        self,
        queries: jax.Array,
        keys: jax.Array,
        values: jax.Array,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Predicts at ``queries``.

        Args:
          queries: ``[T]`` or ``[T, F]``.
          keys: ``[S]`` or ``[S, F]`` (training inputs).
          values: ``[S]`` or ``[S, Hv]`` (training targets).
          mask: optional boolean ``[T, S]``; use :func:`jattn.leave_one_out_mask`
            when training on the training set itself.

        Returns:
          ``[T]`` or ``[T, Hv]``; with heads ``[T, N]`` or ``[T, N, Hv]``.
        """
        f = self.num_features
        if f is not None and (jnp.ndim(queries) != 2 or jnp.shape(queries)[1] != f):
            raise ValueError(
                f"this layer has one width per feature (num_features={f}); queries must be "
                f"[T, {f}], got {list(jnp.shape(queries))}"
            )
        w = self.w[...]
        if self.num_heads is None:
            out, weights = parametric_nadaraya_watson(queries, keys, values, w, mask=mask)
        else:
            per_head = jax.vmap(
                lambda wh: parametric_nadaraya_watson(queries, keys, values, wh, mask=mask)
            )
            out, weights = per_head(w)  # [N, T(, Hv)], [N, T, S]
            out = jnp.moveaxis(out, 0, 1)  # [T, N(, Hv)]
        self.attention_weights = nnx.Intermediate(weights)
        return out
