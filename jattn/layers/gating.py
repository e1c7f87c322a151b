"""Fused composite attention: gates and routing over the heads of one multi-head layer.

- :class:`GatedAttention`: output gating of the heads before the output projection
  (elementwise or per head) and value gating.
- :class:`MixtureOfHeads`: a router sends each token to its top-k heads, with the
  Switch Transformer's load-balancing loss (:func:`load_balancing_loss`, sown for
  :func:`sown_aux_loss`).

Both take a :class:`jattn.layers.MultiHeadAttention` (or ``LinearAttention``), work on a
copy of it, and decode through the protocol of :mod:`jattn.layers.composite`
(``init_cache``, ``step``). The routing math is in pure functions
(:func:`top_k_routing`, :func:`load_balancing_loss`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.functional import _finite
from jattn.functional._checks import check_bool_mask, check_flag, check_positive_int, check_real
from jattn.functional._finite import zero_padding
from jattn.layers.axes import names
from jattn.layers.composite import _forms_weights, _init_cache, _step
from jattn.layers.multihead import MultiHeadAttention

__all__ = [
    "GatedAttention",
    "MixtureOfHeads",
    "load_balancing_loss",
    "sown_aux_loss",
    "top_k_routing",
]

_AUX_NAME = "load_balancing_loss"


def top_k_routing(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """A router's choice of ``k`` of its E experts (heads) per token.

    Args:
      logits: ``[..., E]`` router logits.
      k: experts per token, ``1 <= k <= E`` (ties go to the lower index).

    Returns:
      ``(probs [..., E] float32, selected [..., E] bool)``: the softmax of the logits
      and the top-k mask (exactly k True per token).
    """
    logits = check_real("logits", logits)
    if logits.ndim < 1:
        raise ValueError("logits must be [..., E] (one per expert), got a scalar")
    e = logits.shape[-1]
    k = check_positive_int("k", k)
    if k > e:
        raise ValueError(f"k={k} experts per token, but the logits have E={e} experts")
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    _, top = jax.lax.top_k(probs, k)  # [..., k]
    selected = jnp.any(jax.nn.one_hot(top, probs.shape[-1], dtype=jnp.bool_), axis=-2)
    return probs, selected


def _check_token_mask(name: str, mask, shape: tuple[int, ...], what: str) -> jax.Array:
    """``mask`` as a bool array of ``shape`` (one entry per token of ``what``), else a
    TypeError / ValueError naming ``name``."""
    mask = check_bool_mask(name, mask, hint="True marks a real token")
    if mask.shape != shape:
        raise ValueError(
            f"{name} must mark the tokens of {what}: shape {list(shape)}, got {list(mask.shape)}"
        )
    return mask


def load_balancing_loss(probs: jax.Array, selected: jax.Array, where: jax.Array | None = None
                        ) -> jax.Array:  # fmt: skip
    """Switch Transformer's auxiliary loss ``E * sum_i f_i * P_i`` (Fedus et al. 2021).

    ``f_i`` is the fraction of the routing slots (tokens times k) that go to expert i,
    ``P_i`` the mean router probability of expert i, both over the tokens of
    ``probs [..., E]`` / ``selected [..., E]`` (:func:`top_k_routing`) that ``where
    [...]`` (bool, default every token) marks real: padding does not count, whatever it
    holds (NaN or inf included). A uniform router gives 1.0, the minimum; a router that
    sends everything to one expert with probability 1 gives ``E / k``; no real token
    gives 0. Only ``P`` carries a gradient (zero at the padding).
    """
    if where is not None:
        where = _check_token_mask("where", where, probs.shape[:-1], f"probs {list(probs.shape)}")
    return _load_balancing_loss(probs, selected, where)


def _load_balancing_loss(probs: jax.Array, selected: jax.Array, where: jax.Array | None
                         ) -> jax.Array:  # fmt: skip
    """:func:`load_balancing_loss` of a checked ``where``."""
    num = probs.shape[-1]
    probs = probs.reshape(-1, num).astype(jnp.float32)  # [tokens, E]
    sel = selected.reshape(-1, num).astype(jnp.float32)
    if where is None:
        count = jnp.float32(probs.shape[0])
    else:
        real = where.reshape(-1, 1)  # [tokens, 1]
        # jnp.where, not a product: 0 * NaN is NaN (a padded token's router may read NaN)
        sel = jnp.where(real, sel, 0.0)
        probs = jnp.where(real, probs, 0.0)
        count = jnp.sum(real.astype(jnp.float32))
    frac = jnp.sum(sel, axis=0) / jnp.maximum(jnp.sum(sel), 1.0)  # [E]
    mean_prob = jnp.sum(probs, axis=0) / jnp.maximum(count, 1.0)  # [E]
    return num * jnp.sum(frac * mean_prob)


def sown_aux_loss(intermediates) -> jax.Array:
    """The sum of every ``load_balancing_loss`` sown by :class:`MixtureOfHeads` layers
    (built with ``sow_aux_loss=True``) in ``intermediates``, the ``nnx.Intermediate``
    state of an ``nnx.capture`` call; 0.0 when there is none. A training loop adds it
    to its task loss::

        def loss_fn(model, x, y):
            logits, sown = nnx.capture(model, nnx.Intermediate)(x)
            return task_loss(logits, y) + 0.01 * sown_aux_loss(sown)
    """
    total = jnp.zeros((), jnp.float32)
    for path, var in nnx.to_flat_state(intermediates):
        if path and path[-1] == _AUX_NAME:
            values = var.get_value()
            for value in values if isinstance(values, tuple) else (values,):
                total = total + value
    return total


class _Heads(nnx.Module):
    """Stands in for a layer's output projection: returns the heads ``[..., T, N, Hv]``."""

    def __call__(self, heads: jax.Array) -> jax.Array:
        return heads


class _GatedProjection(nnx.Module):
    """``proj(x) * sigmoid(gate(x))``: a value projection with a value gate."""

    def __init__(self, proj: nnx.LinearGeneral, gate: nnx.LinearGeneral):
        self.proj, self.gate = proj, gate
        self.in_features = proj.in_features

    def __call__(self, x: jax.Array) -> jax.Array:
        def gated(x):  # [..., S, K, Hv]
            v = self.proj(x)
            return (v * jax.nn.sigmoid(self.gate(x).astype(jnp.float32))).astype(v.dtype)

        return _finite.by_row(gated, x)


def _heads_of(attention, what: str) -> MultiHeadAttention:
    """A copy of ``attention`` whose ``out`` returns the heads (the argument unchanged)."""
    if not isinstance(attention, MultiHeadAttention):
        raise TypeError(
            f"{what} works on the heads of a jattn.layers.MultiHeadAttention (or "
            f"LinearAttention), got {type(attention).__name__}"
        )
    return nnx.clone(attention)


class GatedAttention(nnx.Module):
    """Gated multi-head attention: sigmoid gates, computed from the input, on the heads.

    ``out = W_O(heads * sigmoid(x W_g + b_g))``, the output gate on each head's output
    before the output projection (Qiu et al. 2025, "Gated Attention for Large Language
    Models"), and/or value gating ``v = (x W_v) * sigmoid(x W_gv + b_gv)``.

    Args:
      attention: a ``MultiHeadAttention`` (any mask, score or attention function) or
        ``LinearAttention``; the layer holds a copy as ``attention`` (the argument is
        left unchanged) whose output projection moves to ``out``.
      output_gate: ``'elementwise'`` (a gate per head feature, ``gate`` maps D to
        ``[N, Hv]``), ``'headwise'`` (one per head, ``[N, 1]``) or None.
      value_gate: gate the value projection (per key/value head and feature,
        ``attention.value.gate``), from the value input.
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Gate biases start at 0 (gates 0.5). A bias of +30 opens a gate fully (the layer
    then equals ``attention``), -30 shuts it. Calls take what ``attention`` takes
    (``return_weights``, ``sow_weights`` included); decoding follows the composite
    protocol (``init_cache`` / ``step``).
    """

    def __init__(self, attention: MultiHeadAttention, *, output_gate: str | None = "elementwise",
                 value_gate: bool = False, rngs: nnx.Rngs):  # fmt: skip
        if output_gate not in ("elementwise", "headwise", None):
            raise ValueError(
                f"output_gate must be 'elementwise', 'headwise' or None, got {output_gate!r}"
            )
        if not isinstance(value_gate, bool):
            raise TypeError(f"value_gate must be True or False, got {value_gate!r}")
        if output_gate is None and not value_gate:
            raise ValueError("GatedAttention needs a gate: output_gate or value_gate=True")
        attention = _heads_of(attention, "GatedAttention")
        self.out = attention.out
        attention.out = _Heads()
        n, hv = attention.num_heads, attention.v_head_dim
        gate = None
        if output_gate is not None:
            width = hv if output_gate == "elementwise" else 1
            gate = nnx.LinearGeneral(
                attention.in_features, (n, width), kernel_metadata=names("embed", "heads", None),
                bias_metadata=names("heads", None), rngs=rngs,
            )  # fmt: skip
        if value_gate:
            value = attention.value
            value_gate_proj = nnx.LinearGeneral(
                value.in_features[0], (attention.num_kv_heads, hv),
                kernel_metadata=names("embed", "heads", "head_dim"),
                bias_metadata=names("heads", "head_dim"), rngs=rngs,
            )  # fmt: skip
            attention.value = _GatedProjection(value, value_gate_proj)
        self.gate = gate
        self.attention = attention
        self.output_gate, self.value_gate = output_gate, value_gate
        self.in_features, self.out_features = attention.in_features, attention.out_features

    @property
    def forms_weights(self) -> bool:
        return _forms_weights(self.attention)

    def _finish(self, x: jax.Array, heads: jax.Array) -> jax.Array:
        if self.gate is not None:
            gates = _finite.by_row(self.gate, x).astype(jnp.float32)  # [..., T, N, Hv|1]
            gates = jax.nn.sigmoid(gates)

            # by row, as MixtureOfHeads: a NaN row meets no gate's or weight's gradient
            def gated(h, g):
                return self.out((h * g).astype(h.dtype))

            return _finite.by_row(gated, heads, gates, vector_ndim=2)
        return _finite.by_row(self.out, heads, vector_ndim=2)

    def __call__(self, inputs_q: jax.Array, *args, return_weights: bool = False, **kwargs):
        """As ``attention(inputs_q, *args, **kwargs)``, gated: ``[..., T, D_out]``."""
        if return_weights:
            heads, weights = self.attention(inputs_q, *args, return_weights=True, **kwargs)
            return self._finish(inputs_q, heads), weights
        return self._finish(inputs_q, self.attention(inputs_q, *args, **kwargs))

    def init_cache(self, batch_size: int, max_len: int | None = None, dtype=jnp.float32):
        """The cache of ``attention``."""
        return _init_cache(self.attention, batch_size, max_len, dtype)

    def step(self, x: jax.Array, cache):
        """Causal cached forward of new tokens ``x [B, T, D]`` -> ``(out, cache)``."""
        heads, cache = _step(self.attention, x, cache)
        return self._finish(x, heads), cache


class MixtureOfHeads(nnx.Module):
    """A routed mixture of attention heads (after Jin et al. 2024, "MoH").

    A router ``nnx.Linear(D, N)`` scores the N heads of ``attention`` for each token;
    the token keeps its top ``k`` heads, weighted ``g_n = N * p_n`` (``p`` the router's
    softmax; the factor N makes a uniform router weigh every kept head 1, so with
    ``k = N`` it is the plain layer), and the other heads' outputs are not used:
    ``out = W_O(heads * g)``. Compute is dense (every head is computed, the unselected
    ones are zeroed), which is exact and simple, not faster.

    The router's balance is kept by Switch's auxiliary loss
    (:func:`load_balancing_loss`, ``N * sum_i f_i * P_i``, 1.0 when balanced), over
    every token of the call, or those a call's ``token_mask`` marks real (padding
    kept out). A call returns it with ``return_aux_loss=True`` (``(out,
    loss)``), and sows it as ``nnx.Intermediate`` ``load_balancing_loss`` with
    ``sow_aux_loss`` (call argument, default the constructor's): inside a model, call
    the model under ``nnx.capture(model, nnx.Intermediate)`` and add
    ``weight * sown_aux_loss(intermediates)`` (:func:`sown_aux_loss`) to the task loss.

    Args:
      attention: a ``MultiHeadAttention`` (per-head mask_mods, scores, GQA, ...) or
        ``LinearAttention``; held as a copy, ``attention``, whose output projection
        moves to ``out``.
      k: heads per token, ``1 <= k <= N``.
      sow_aux_loss: the default of a call's ``sow_aux_loss``.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(self, attention: MultiHeadAttention, *, k: int, sow_aux_loss: bool = False,
                 rngs: nnx.Rngs):  # fmt: skip
        attention = _heads_of(attention, "MixtureOfHeads")
        n = attention.num_heads
        k = check_positive_int("k", k)
        if k > n:
            raise ValueError(f"k must be in [1, {n}] (the layer's num_heads), got {k}")
        if not isinstance(sow_aux_loss, bool):
            raise TypeError(f"sow_aux_loss must be True or False, got {sow_aux_loss!r}")
        self.out = attention.out
        attention.out = _Heads()
        self.attention = attention
        self.router = nnx.Linear(attention.in_features, n, kernel_metadata=names("embed", "heads"),
                                 bias_metadata=names("heads"), rngs=rngs)  # fmt: skip
        self.k, self.num_heads, self.sow_aux_loss = k, n, sow_aux_loss
        self.in_features, self.out_features = attention.in_features, attention.out_features

    @property
    def forms_weights(self) -> bool:
        return _forms_weights(self.attention)

    def route(self, x: jax.Array, token_mask: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
        """``(weights [..., T, N], selected [..., T, N] bool, aux_loss)`` for ``x [..., T,
        D]``; the loss counts the tokens ``token_mask [..., T]`` marks (default all),
        whatever the others hold (NaN or inf included: they get zero gradients)."""
        if token_mask is not None:
            token_mask = _check_token_mask(
                "token_mask", token_mask, x.shape[:-1], f"x {list(x.shape)} ([..., T, D])"
            )
            # padded tokens are routed from zeros, so a NaN there reaches no router
            # gradient (the loss's own where is not enough); real tokens as they are
            x = zero_padding(x, token_mask)
        probs, selected = top_k_routing(_finite.by_row(self.router, x), self.k)
        weights = jnp.where(selected, self.num_heads * probs, 0.0)
        return weights, selected, _load_balancing_loss(probs, selected, token_mask)

    def _finish(self, x, heads, token_mask=None):
        weights, _, loss = self.route(x, token_mask)

        # by row: a padded query's NaN heads meet neither the routing weights' gradient
        # nor the output projection's (0 * NaN)
        def mix(h):  # [..., T, N, Hv]
            return self.out((h * weights[..., None]).astype(h.dtype))

        return _finite.by_row(mix, heads, vector_ndim=2), loss

    def __call__(self, inputs_q: jax.Array, *args, return_weights: bool = False,
                 return_aux_loss: bool = False, sow_aux_loss: bool | None = None,
                 token_mask: jax.Array | None = None, **kwargs):  # fmt: skip
        """As ``attention(inputs_q, *args, **kwargs)`` with routed heads -> ``out``, then
        ``weights`` (``return_weights``, the attention weights of all heads) and
        ``aux_loss`` (``return_aux_loss``) appended as a tuple. ``token_mask [..., T]``
        (bool, True = a real token) keeps padding out of the aux loss."""
        check_flag("return_aux_loss", return_aux_loss)
        sow = self.sow_aux_loss
        if sow_aux_loss is not None:
            sow = check_flag("sow_aux_loss", sow_aux_loss)
        if return_weights:
            heads, weights = self.attention(inputs_q, *args, return_weights=True, **kwargs)
        else:
            heads, weights = self.attention(inputs_q, *args, **kwargs), None
        out, loss = self._finish(inputs_q, heads, token_mask)
        if sow:
            self.sow(nnx.Intermediate, _AUX_NAME, loss)
        extra = ((weights,) if return_weights else ()) + ((loss,) if return_aux_loss else ())
        return (out, *extra) if extra else out

    def init_cache(self, batch_size: int, max_len: int | None = None, dtype=jnp.float32):
        """The cache of ``attention``."""
        return _init_cache(self.attention, batch_size, max_len, dtype)

    def step(self, x: jax.Array, cache):
        """Causal cached forward of new tokens ``x [B, T, D]`` -> ``(out, cache)``."""
        heads, cache = _step(self.attention, x, cache)
        return self._finish(x, heads)[0], cache
