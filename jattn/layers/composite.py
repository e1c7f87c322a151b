"""Composite attention: several attention layers combined in parallel, in series, or fused.

- :class:`ParallelAttention`: the same input through several branches (any attention
  layers with one call signature: ``MultiHeadAttention`` with any mask, score or
  attention function, ``LinearAttention``, another composite), their outputs combined by
  concatenation and a projection, a sum, a mean, learned sigmoid gates or learned
  softmax weights over the branches.
- :class:`SeriesAttention`: layers applied one after another, built from a pattern
  such as ``"local, local, global"`` (:func:`pattern_names`) and a factory per name.
  The models take such a pattern as their ``layer_pattern`` option
  (:mod:`jattn.models.blocks`).
- Fused (:mod:`jattn.layers.gating`): :class:`~jattn.layers.GatedAttention` gates the
  heads of one multi-head layer and :class:`~jattn.layers.MixtureOfHeads` routes each
  token to its top-k heads. Heads of different *kinds* in one layer need no composite:
  give ``MultiHeadAttention`` a per-head ``mask_mod`` (:func:`jattn.mods.per_head`,
  e.g. ``per_head([sliding_window((8, 0)), full()])`` makes the even heads local and
  the odd ones global).

Decoding: every composite has ``init_cache(batch_size, max_len, dtype)`` and
``step(x, cache) -> (out, cache)``, the protocol of :class:`jattn.layers.LinearAttention`;
a ``MultiHeadAttention`` part decodes through a :class:`jattn.models.KVCache`
(:func:`jattn.models.cached_self_attention`, causal), a part with ``step`` through its
own. Prefill and cached steps give the full causal forward pass (``is_causal=True``).

The math (the weighted sums) is in pure functions beside the layers:
:func:`sigmoid_gated_sum`, :func:`softmax_weighted_sum`.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.functional import _finite
from jattn.functional._checks import check_positive_int
from jattn.layers.axes import names
from jattn.layers.dropout import per_site_rngs
from jattn.layers.linear import LinearAttention

__all__ = [
    "COMBINES",
    "ParallelAttention",
    "SeriesAttention",
    "pattern_names",
    "sigmoid_gated_sum",
    "softmax_weighted_sum",
]

#: How :class:`ParallelAttention` combines its branches.
COMBINES = ("concat", "sum", "mean", "gate", "softmax")


# ------------------------------------------------------------------------- pure math


def sigmoid_gated_sum(outputs: jax.Array, logits: jax.Array) -> jax.Array:
    """``sum_i sigmoid(logits_i) * outputs_i`` over the branch axis.

    Args:
      outputs: ``[..., n, D]``, n branch outputs stacked on axis -2.
      logits: ``[..., n, D]`` (a gate per feature) or ``[..., n, 1]`` (one per branch),
        of the same rank as ``outputs``.

    Returns:
      ``[..., D]`` in the dtype of ``outputs`` (the gates run in float32).
    """
    gates = jax.nn.sigmoid(logits.astype(jnp.float32))
    return jnp.sum(gates * outputs.astype(jnp.float32), axis=-2).astype(outputs.dtype)


def softmax_weighted_sum(outputs: jax.Array, logits: jax.Array) -> jax.Array:
    """``sum_i softmax(logits)_i * outputs_i``: weights over the n branches that sum to 1.

    Shapes as :func:`sigmoid_gated_sum` (softmax over axis -2 in float32).
    """
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-2)
    return jnp.sum(weights * outputs.astype(jnp.float32), axis=-2).astype(outputs.dtype)


def pattern_names(
    pattern: str | Sequence[str],
    known: Sequence[str],
    *,
    num_layers: int | None = None,
    name: str = "pattern",
    parallel: bool = False,
) -> tuple[str, ...]:
    """The layer types of a pattern: ``"local, local, global"`` (names separated by
    commas, spaces ignored) or a list of names, each one of ``known``.

    With ``parallel=True`` a type may also join known names with ``+``
    (``"global+local"``: branches of one parallel layer), returned with its spaces
    removed.

    With ``num_layers`` the pattern repeats to that many layers (layer i takes entry
    ``i % len(pattern)``, as Gemma's local/global cycle); it may not be longer.

    Raises:
      ValueError: an empty pattern or name, an unknown name (the message lists the
        known ones), a pattern longer than ``num_layers``.
      TypeError: a pattern that is neither a string nor a list of strings.
    """
    if isinstance(pattern, str):
        types = tuple(part.strip() for part in pattern.split(","))
    elif isinstance(pattern, Sequence) and all(isinstance(p, str) for p in pattern):
        types = tuple(p.strip() for p in pattern)
    else:
        raise TypeError(
            f'{name} must be a string such as "local, local, global" or a list of layer '
            f"types, got {pattern!r}"
        )
    if not types or any(not t for t in types):
        raise ValueError(f"{name} {pattern!r} has an empty layer type; known: {sorted(known)}")
    if parallel:
        types = tuple("+".join(p.strip() for p in t.split("+")) for t in types)
    for t in types:
        for part in t.split("+") if parallel else (t,):
            if part not in known:
                joined = " (or several joined by '+')" if parallel else ""
                raise ValueError(
                    f"{name}: unknown layer type {part!r}; known: {sorted(known)}{joined}"
                )
    if num_layers is None:
        return types
    if len(types) > num_layers:
        raise ValueError(
            f"{name} {pattern!r} has {len(types)} layer types, more than the "
            f"{num_layers} layers of the stack"
        )
    return tuple(types[i % len(types)] for i in range(num_layers))


# ------------------------------------------------------------- parts and decoding


def _widths(layers: Sequence[Any], what: str) -> tuple[list[int], list[int]]:
    """The ``in_features`` and ``out_features`` of each layer (TypeError for a part that
    is not an attention layer with those widths)."""
    if isinstance(layers, nnx.Module) or not isinstance(layers, Sequence):
        raise TypeError(f"{what} must be a list of attention layers, got {type(layers).__name__}")
    if not layers:
        raise ValueError(f"{what} is empty: give at least one attention layer")
    ins, outs = [], []
    for i, layer in enumerate(layers):
        if not isinstance(layer, nnx.Module):
            raise TypeError(
                f"{what}[{i}] must be an nnx.Module attention layer, got {type(layer).__name__}"
            )
        d_in, d_out = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
        if not isinstance(d_in, int) or not isinstance(d_out, int):
            raise TypeError(
                f"{what}[{i}] ({type(layer).__name__}) has no int in_features/out_features "
                "attributes (the widths of its input and output), which a composite needs"
            )
        ins.append(d_in)
        outs.append(d_out)
    return ins, outs


def _forms_weights(layer) -> bool:
    """Whether ``layer`` can return / sow attention weights (linear attention never forms
    them; composites say so themselves)."""
    own = getattr(layer, "forms_weights", None)
    if own is not None:
        return bool(own)
    return not isinstance(layer, LinearAttention)


def _call(layer, inputs_q, args, kwargs, return_weights, sow_weights):
    """``(output, weights or None)`` of one part; the weight options only reach parts
    that form weights."""
    if sow_weights and _forms_weights(layer):
        kwargs = dict(kwargs, sow_weights=True)
    if return_weights and _forms_weights(layer):
        return layer(inputs_q, *args, return_weights=True, **kwargs)
    return layer(inputs_q, *args, **kwargs), None


def _init_cache(layer, batch_size: int, max_len: int | None, dtype):
    """The decoding cache of one part (:func:`jattn.models.init_cache`: its own, or a
    :class:`jattn.models.KVCache` for a ``MultiHeadAttention``, which needs ``max_len``)."""
    from jattn.models.decoding import init_cache  # models import layers: lazily

    return init_cache(layer, batch_size, max_len, dtype)


def _step(layer, x: jax.Array, cache):
    """``(output, cache)``: the causal, cached forward of new tokens ``x [B, T, D]``."""
    from jattn.models.decoding import cached_self_attention

    return cached_self_attention(layer, x, cache)


def _check_cache(cache, parts, what: str) -> None:
    """A TypeError unless ``cache`` is the tuple of one cache per part that
    ``init_cache`` makes (None, or a part's own cache, would fail deep inside)."""
    if not isinstance(cache, tuple | list) or len(cache) != len(parts):
        got = f"{len(cache)} caches" if isinstance(cache, tuple | list) else type(cache).__name__
        raise TypeError(
            f"cache must be the tuple of {len(parts)} caches (one per {what}) that "
            f"init_cache(batch_size, max_len) returns, got {got}"
        )


def _with_site_rngs(kwargs: dict) -> dict:
    """A bare dropout key becomes a stream, so the parts draw different masks."""
    if kwargs.get("rngs") is not None:
        kwargs = dict(kwargs, rngs=per_site_rngs(kwargs["rngs"]))
    return kwargs


# ------------------------------------------------------------------------- parallel


class ParallelAttention(nnx.Module):
    """The same input through several attention branches, their outputs combined.

    Args:
      branches: attention layers with one call signature, ``branch(inputs_q, *args,
        **kwargs) -> [..., T, D_i]`` (self-attention ``branch(x)``; cross attention
        ``branch(x, context)``; ``mask``, ``is_causal``, ``mask_mod``, ... pass through
        to every branch), each with int ``in_features`` (all equal) and
        ``out_features``. Held as given (a layer in two composites is shared).
      combine: ``'concat'`` (concatenate, then ``proj``, an ``nnx.Linear`` from the
        summed widths to ``out_features``; branch widths may differ), ``'sum'``,
        ``'mean'``, ``'gate'`` (``sum_i sigmoid(l_i) * y_i``, :func:`sigmoid_gated_sum`)
        or ``'softmax'`` (``sum_i softmax(l)_i * y_i``, :func:`softmax_weighted_sum`).
        All but ``'concat'`` need branches of one output width.
      per_feature: ``'gate'``/``'softmax'`` only: one logit per branch and output
        feature (True, the default) or one per branch (False).
      input_dependent: ``'gate'``/``'softmax'`` only: logits ``l = x W + b`` from the
        query input, per token (True, the default; ``logits`` is an
        ``nnx.LinearGeneral`` to ``[n, D|1]``), or learned constants (False; ``logits``
        is an ``nnx.Param [n, D|1]``, zeros: equal weights at first).
      out_features: ``'concat'`` only: the output width (default: branch 0's).
      rngs: ``nnx.Rngs`` with a ``params`` stream, for ``'concat'``, ``'gate'``,
        ``'softmax'``.

    A call returns ``[..., T, D_out]``, or with ``return_weights=True`` ``(out,
    [w_0, ...])``, each branch's weights (None for one that forms none, such as
    linear attention). ``sow_weights=True`` reaches every branch that forms weights,
    so :func:`jattn.viz.collect_attention_weights` keys them ``'branches/0'``, ...
    """

    def __init__(
        self,
        branches: Sequence[nnx.Module],
        *,
        combine: str = "concat",
        per_feature: bool | None = None,
        input_dependent: bool | None = None,
        out_features: int | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        if not isinstance(combine, str) or combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        ins, outs = _widths(branches, "branches")
        if len(set(ins)) > 1:
            raise ValueError(f"the branches take inputs of different widths: in_features {ins}")
        weighted = combine in ("gate", "softmax")
        for opt, value in (("per_feature", per_feature), ("input_dependent", input_dependent)):
            if value is not None and not weighted:
                raise ValueError(
                    f"{opt} is an option of combine='gate' or 'softmax', not {combine!r}"
                )
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{opt} must be True or False, got {value!r}")
        if out_features is not None and combine != "concat":
            raise ValueError(
                f"out_features is an option of combine='concat'; {combine!r} keeps the "
                "branches' width"
            )
        if combine != "concat" and len(set(outs)) > 1:
            raise ValueError(
                f"combine={combine!r} needs branches of one output width, got out_features "
                f"{outs}; combine='concat' projects different widths"
            )
        if combine in ("concat", "gate", "softmax") and not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"combine={combine!r} has parameters: pass rngs=nnx.Rngs(...)")
        self.branches = nnx.List(list(branches))
        self.combine = combine
        self.in_features = ins[0]
        proj = logits = None
        if combine == "concat":
            out_features = check_positive_int(
                "out_features", outs[0] if out_features is None else out_features
            )
            proj = nnx.Linear(sum(outs), out_features, kernel_metadata=names(None, "embed"),
                              bias_metadata=names("embed"), rngs=rngs)  # fmt: skip
        elif weighted:
            shape = (len(outs), outs[0] if per_feature in (None, True) else 1)  # [n, D|1]
            if input_dependent in (None, True):
                logits = nnx.LinearGeneral(
                    ins[0], shape, kernel_metadata=names("embed", None, None),
                    bias_metadata=names(None, None), rngs=rngs,
                )  # fmt: skip
            else:
                logits = nnx.Param(jnp.zeros(shape, jnp.float32), **names(None, None))
        self.proj, self.logits = proj, logits
        self.out_features = out_features if combine == "concat" else outs[0]

    @property
    def forms_weights(self) -> bool:
        return any(_forms_weights(b) for b in self.branches)

    def _combine(self, x: jax.Array, outs: list[jax.Array]) -> jax.Array:
        """``[..., T, D_out]`` from the branch outputs ``[..., T, D_i]`` and the input x."""
        if self.combine == "concat":  # by row: a padded NaN row reaches no weight gradient
            return _finite.by_row(self.proj, jnp.concatenate(outs, axis=-1))
        if self.combine in ("sum", "mean"):
            total = functools.reduce(operator.add, outs)
            return total if self.combine == "sum" else total / len(outs)
        stacked = jnp.stack(outs, axis=-2)  # [..., T, n, D]
        if isinstance(self.logits, nnx.Param):
            logits = self.logits[...].reshape((1,) * (stacked.ndim - 2) + self.logits.shape)
        else:
            logits = _finite.by_row(self.logits, x)  # [..., T, n, D|1]
        fn = sigmoid_gated_sum if self.combine == "gate" else softmax_weighted_sum
        return fn(stacked, logits)

    def __call__(self, inputs_q: jax.Array, *args, return_weights: bool = False,
                 sow_weights: bool = False, **kwargs):  # fmt: skip
        """``inputs_q [..., T, D]`` (and whatever the branches take) -> ``[..., T, D_out]``,
        or ``(out, weights per branch)`` with ``return_weights``."""
        kwargs = _with_site_rngs(kwargs)
        results = [_call(b, inputs_q, args, kwargs, return_weights, sow_weights)
                   for b in self.branches]  # fmt: skip
        out = self._combine(inputs_q, [y for y, _ in results])
        return (out, [w for _, w in results]) if return_weights else out

    def init_cache(self, batch_size: int, max_len: int | None = None, dtype=jnp.float32):
        """One cache per branch (a tuple)."""
        return tuple(_init_cache(b, batch_size, max_len, dtype) for b in self.branches)

    def step(self, x: jax.Array, cache) -> tuple[jax.Array, tuple]:
        """Causal cached forward of new tokens ``x [B, T, D]`` -> ``(out, cache)``."""
        _check_cache(cache, self.branches, "branch")
        results = [_step(b, x, c) for b, c in zip(self.branches, cache, strict=True)]
        return self._combine(x, [y for y, _ in results]), tuple(c for _, c in results)


# --------------------------------------------------------------------------- series


class SeriesAttention(nnx.Module):
    """Attention layers applied in order: ``x <- layer(x)`` (or ``x <- x + layer(x)``
    with ``residual=True``), each called with the same extra arguments (``is_causal``,
    ``mask``, a cross-attention context, ...).

    Args:
      layers: the layers; each one's ``out_features`` is the next one's
        ``in_features`` (with ``residual``, every layer keeps its width).
      residual: add each layer's input to its output.
      layer_types: names of the layers' types (:meth:`from_pattern` sets them).

    Build one from a pattern with :meth:`from_pattern`. A call with
    ``return_weights=True`` returns ``(out, [w_0, ...])`` per layer; ``sow_weights``
    reaches every layer that forms weights.
    """

    def __init__(self, layers: Sequence[nnx.Module], *, residual: bool = False,
                 layer_types: Sequence[str] | None = None):  # fmt: skip
        ins, outs = _widths(layers, "layers")
        if not isinstance(residual, bool):
            raise TypeError(f"residual must be True or False, got {residual!r}")
        for i in range(len(layers) - 1):
            if outs[i] != ins[i + 1]:
                raise ValueError(
                    f"layers[{i}] gives out_features={outs[i]} but layers[{i + 1}] takes "
                    f"in_features={ins[i + 1]}"
                )
        if residual and any(i != o for i, o in zip(ins, outs, strict=True)):
            raise ValueError(
                f"residual=True needs layers that keep their width, got in_features {ins} "
                f"and out_features {outs}"
            )
        self.layers = nnx.List(list(layers))
        self.residual = residual
        if layer_types is not None:
            if isinstance(layer_types, str) or not (
                isinstance(layer_types, Sequence) and all(isinstance(t, str) for t in layer_types)
            ):
                raise TypeError(
                    f"layer_types must be None or a list of names, one per layer, got "
                    f"{layer_types!r}"
                )
            if len(layer_types) != len(layers):
                raise ValueError(
                    f"layer_types has {len(layer_types)} names {tuple(layer_types)}, but there "
                    f"are {len(layers)} layers: give one name per layer"
                )
        self.layer_types = None if layer_types is None else tuple(layer_types)
        self.in_features, self.out_features = ins[0], outs[-1]

    @classmethod
    def from_pattern(
        cls,
        pattern: str | Sequence[str],
        factories: Mapping[str, Callable[..., nnx.Module]],
        *,
        num_layers: int | None = None,
        residual: bool = False,
        rngs: nnx.Rngs,
    ) -> SeriesAttention:
        """A stack of layers from a pattern such as ``"local, local, global"``.

        Args:
          pattern: layer types (:func:`pattern_names`), repeated to ``num_layers``.
          factories: ``{type: factory}``; ``factory(rngs=rngs)`` builds one layer.
          num_layers: stack depth (default: the pattern's length).

        Example::

            SeriesAttention.from_pattern("local, local, global", {
                "local": lambda rngs: MultiHeadAttention(
                    4, 64, mask_mod=jattn.mods.sliding_window((8, 0)), rngs=rngs),
                "global": lambda rngs: MultiHeadAttention(4, 64, rngs=rngs),
            }, rngs=nnx.Rngs(0))
        """
        if not isinstance(factories, Mapping) or not factories:
            raise TypeError(
                f"factories must be a non-empty dict {{type: factory}}, got {factories!r}"
            )
        if num_layers is not None:
            num_layers = check_positive_int("num_layers", num_layers)
        types = pattern_names(pattern, tuple(factories), num_layers=num_layers)
        return cls([factories[t](rngs=rngs) for t in types], residual=residual, layer_types=types)

    @property
    def forms_weights(self) -> bool:
        return any(_forms_weights(layer) for layer in self.layers)

    def __call__(self, x: jax.Array, *args, return_weights: bool = False,
                 sow_weights: bool = False, **kwargs):  # fmt: skip
        """``x [..., T, D]`` -> ``[..., T, D_out]`` (or ``(out, weights per layer)``)."""
        kwargs = _with_site_rngs(kwargs)
        weights = []
        for layer in self.layers:
            y, w = _call(layer, x, args, kwargs, return_weights, sow_weights)
            x = x + y if self.residual else y
            weights.append(w)
        return (x, weights) if return_weights else x

    def init_cache(self, batch_size: int, max_len: int | None = None, dtype=jnp.float32):
        """One cache per layer (a tuple)."""
        return tuple(_init_cache(layer, batch_size, max_len, dtype) for layer in self.layers)

    def step(self, x: jax.Array, cache) -> tuple[jax.Array, tuple]:
        """Causal cached forward of new tokens ``x [B, T, D]`` -> ``(out, cache)``."""
        _check_cache(cache, self.layers, "layer")
        new = []
        for layer, c in zip(self.layers, cache, strict=True):
            y, c = _step(layer, x, c)
            x = x + y if self.residual else y
            new.append(c)
        return x, tuple(new)


# ---------------------------------------------------------------------------- fused
