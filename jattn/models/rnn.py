"""Gated recurrent units for the RNN encoder-decoder: a GRU cell and a masked, stacked encoder.

The recurrences run with ``jax.lax.scan`` over time. The input projections of a
whole sequence are computed once, outside the scan, so each step only multiplies
the hidden state. Padding is handled by a boolean mask ``[B, S]`` (True = token):
at a padded position the carry is frozen and the output is zero, so a sequence's
states never depend on its padding, whichever direction the scan runs. Padded inputs
are zeroed before they are used, so even a NaN or inf there gets a zero gradient and
leaves every other gradient finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.functional import _checks, _finite, _sharding
from jattn.layers.axes import names
from jattn.layers.dropout import Dropout, TrainEval

__all__ = ["GRUCell", "GRUEncoder"]


def _add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    return y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)


def _has_stream(rngs, name: str) -> bool:
    """Whether ``rngs[name]`` gives a stream: its own, or the default stream's."""
    return not isinstance(rngs, nnx.Rngs) or name in rngs or "default" in rngs


class GRUCell(nnx.Module):
    """A GRU cell (Cho et al. 2014) with the PyTorch gate layout ``r, z, n``.

    ``r = sigmoid(x W_ir + b_ir + h W_hr + b_hr)``,
    ``z = sigmoid(x W_iz + b_iz + h W_hz + b_hz)``,
    ``n = tanh(x W_in + b_in + r * (h W_hn + b_hn))``,
    ``h' = (1 - z) * n + z * h``.

    Args:
      in_features: F, the input size.
      hidden: H, the state size.
      rngs: ``params`` stream for the initializers.

    Attributes:
      w_input: ``[F, 3H]``; ``b_input``: ``[3H]``.
      w_hidden: ``[H, 3H]`` (orthogonal init per gate); ``b_hidden``: ``[3H]``.
    """

    def __init__(self, in_features: int, hidden: int, *, rngs: nnx.Rngs):
        self.in_features = _checks.check_size("in_features", in_features)
        self.hidden = _checks.check_size("hidden", hidden)
        w_in = nnx.initializers.lecun_normal()(rngs.params(), (in_features, 3 * hidden))
        orth = nnx.initializers.orthogonal()
        w_h = jnp.concatenate([orth(rngs.params(), (hidden, hidden)) for _ in range(3)], axis=1)
        gates = names("mlp")  # [3H]: the r, z, n gates
        self.w_input = nnx.Param(w_in, **names("embed", "mlp"))
        self.b_input = nnx.Param(jnp.zeros((3 * hidden,), jnp.float32), **gates)
        self.w_hidden = nnx.Param(w_h, **names("mlp", "mlp"))
        self.b_hidden = nnx.Param(jnp.zeros((3 * hidden,), jnp.float32), **gates)

    def project_inputs(self, x: jax.Array) -> jax.Array:
        """``x [..., F] -> [..., 3H]``: the input half of the gates (no recurrence)."""
        return _add_bias(x @ self.w_input[...], self.b_input[...])

    def step(self, h: jax.Array, x_proj: jax.Array) -> jax.Array:
        """One update from ``h [B, H]`` and projected inputs ``x_proj [B, 3H]``."""
        h_proj = _add_bias(h @ self.w_hidden[...], self.b_hidden[...])  # [B, 3H]
        xr, xz, xn = jnp.split(x_proj, 3, axis=-1)
        hr, hz, hn = jnp.split(h_proj, 3, axis=-1)
        r = jax.nn.sigmoid(xr + hr)
        z = jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
        return (1.0 - z) * n + z * h

    def __call__(self, h: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(h [B, H], x [B, F]) -> (h', h')``, the ``nnx.GRUCell`` calling convention.

        Raises a TypeError for complex (or non-numeric) ``h`` or ``x``, a ValueError for
        widths other than ``hidden`` and ``in_features`` or batch shapes that differ."""
        h, x = _checks.check_real("h", h), _checks.check_real("x", x)
        if (
            h.ndim < 1
            or x.ndim < 1
            or h.shape[-1] != self.hidden
            or x.shape[-1] != self.in_features
            or h.shape[:-1] != x.shape[:-1]
        ):
            raise ValueError(
                f"h must be [B, H] with H = hidden = {self.hidden} and x [B, F] with F = "
                f"in_features = {self.in_features} (one batch shape B), got h "
                f"{_checks.fmt(h.shape)} and x {_checks.fmt(x.shape)}"
            )
        h = self.step(h, self.project_inputs(x))
        return h, h


def masked_scan(
    cell: GRUCell, x_proj: jax.Array, valid: jax.Array, h0: jax.Array, *, reverse: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Runs ``cell`` over time, skipping padded steps.

    Args:
      cell: the GRU cell.
      x_proj: ``[B, S, 3H]`` projected inputs.
      valid: ``[B, S]`` boolean, True where there is a token.
      h0: ``[B, H]`` initial state.
      reverse: scan from the last position to the first.

    Returns:
      ``(outputs [B, S, H], final [B, H])``; outputs are zero at padded positions,
      and ``final`` is the state after the last valid token in scan order. Padded
      ``x_proj`` steps (NaN or inf included) reach neither: their gradient is zero.
    """

    def body(h, inputs):
        xp, ok = inputs  # [B, 3H], [B]
        # a padded step's input never enters the cell: a NaN or inf there would make
        # NaN gradients for the whole example (the outer where drops only the result)
        xp = _finite.zero_padding(xp, ok)
        # the state keeps h0's dtype (float64 inputs under x64 would promote it)
        h_new = jnp.where(ok[:, None], cell.step(h, xp).astype(h.dtype), h)
        return h_new, jnp.where(ok[:, None], h_new, 0.0)

    xs = (jnp.swapaxes(x_proj, 0, 1), jnp.swapaxes(valid, 0, 1))  # time-major
    final, outs = jax.lax.scan(body, h0, xs, reverse=reverse)
    return jnp.swapaxes(outs, 0, 1), final


class GRUEncoder(TrainEval, nnx.Module):
    """A stack of GRU layers, optionally bidirectional, over a padded batch.

    Layer ``l > 0`` reads the (concatenated) outputs of layer ``l - 1``; dropout
    is applied between layers. The backward direction of a bidirectional layer
    starts at each sequence's last token, not at the end of the padding.

    Args:
      in_features: F.
      hidden: H per direction.
      num_layers: L.
      bidirectional: D = 2 directions if True, else 1.
      dropout_rate: dropout between layers.
      rngs: ``params`` (and ``dropout``) streams.
    """

    def __init__(
        self,
        in_features: int,
        hidden: int,
        *,
        num_layers: int = 1,
        bidirectional: bool = True,
        dropout_rate: float = 0.0,
        rngs: nnx.Rngs,
    ):
        in_features = _checks.check_size("in_features", in_features)
        hidden = _checks.check_size("hidden", hidden)
        num_layers = _checks.check_size("num_layers", num_layers)
        bidirectional = _checks.check_flag("bidirectional", bidirectional)
        dropout_rate = _checks.check_rate("dropout_rate", dropout_rate)
        if dropout_rate > 0 and not _has_stream(rngs, "dropout"):  # else flax's KeyError
            raise ValueError(
                f"dropout_rate={dropout_rate} needs a 'dropout' stream in rngs (the masks' "
                f"keys), but rngs has only {sorted(rngs)}: pass nnx.Rngs(params=0, "
                "dropout=1) (or nnx.Rngs(0), whose default stream serves both)"
            )
        self.hidden = hidden
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        directions = 2 if bidirectional else 1
        self.out_features = directions * hidden
        self.forward_cells = nnx.List(
            [
                GRUCell(in_features if i == 0 else self.out_features, hidden, rngs=rngs)
                for i in range(num_layers)
            ]
        )
        self.backward_cells = nnx.List(
            [
                GRUCell(in_features if i == 0 else self.out_features, hidden, rngs=rngs)
                for i in range(num_layers)
            ]
            if bidirectional
            else []
        )
        self.dropout = Dropout(
            dropout_rate, deterministic=True, rngs=rngs if dropout_rate > 0 else None
        )
        self.deterministic = True  # eval; train() / eval() switch it

    def __call__(
        self,
        x: jax.Array,
        valid: jax.Array,
        *,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Encodes ``x [B, S, F]`` with token mask ``valid [B, S]`` (dropout between
        layers unless deterministic; ``deterministic=None`` uses the module's mode).

        Returns:
          ``(outputs [B, S, D*H], finals [L, B, D*H])``: the top layer's states
          (zero at padding) and every layer's final state (forward after the last
          token, backward after the first), directions concatenated.
        """
        deterministic = self._deterministic(deterministic)
        x = _checks.check_real("x", x)
        valid = _checks.check_bool_mask("valid", valid, hint="pass tokens != pad_id")
        if x.ndim != 3 or valid.shape != x.shape[:2]:
            raise ValueError(
                f"x must be [B, S, F] and valid [B, S], got x {_checks.fmt(x.shape)} and "
                f"valid {_checks.fmt(valid.shape)}"
            )
        in_features = self.forward_cells[0].in_features
        if x.shape[-1] != in_features:
            raise ValueError(
                f"x must be [B, S, F] with F = in_features = {in_features}, got "
                f"{_checks.fmt(x.shape)}"
            )
        b = x.shape[0]
        h0 = jnp.zeros((b, self.hidden), jnp.float32, out_sharding=_sharding.batch_like(x))
        finals = []
        # padded steps are zeroed before the input projections (masked_scan drops them
        # too): a NaN or inf there would give the projection weights NaN gradients
        x = _finite.zero_padding(x, valid)
        for i in range(self.num_layers):
            if i > 0:
                x = self.dropout(x, deterministic=deterministic, rngs=rngs)
            fwd = self.forward_cells[i]
            outs, final = masked_scan(fwd, fwd.project_inputs(x), valid, h0)
            if self.bidirectional:
                bwd = self.backward_cells[i]
                outs_b, final_b = masked_scan(bwd, bwd.project_inputs(x), valid, h0, reverse=True)
                outs = jnp.concatenate([outs, outs_b], axis=-1)
                final = jnp.concatenate([final, final_b], axis=-1)
            finals.append(final)
            x = outs
        return x, jnp.stack(finals)
