"""Transformer blocks: feed-forward, encoder and decoder blocks, and their stacks.

Residual order follows ``torch.nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer``:
post-norm (Vaswani et al., d2l) ``x = norm(x + drop(sublayer(x)))`` or, with
``pre_norm=True`` (torch's ``norm_first``), ``x = x + drop(sublayer(norm(x)))``.

Every attention layer is a :class:`jattn.layers.MultiHeadAttention`; ``attention_fn``
and ``score`` reach all of them. ``score`` is either one shared
:class:`jattn.layers.Score` module or a factory ``score(num_heads, head_dim, *, rngs)``
called once per attention layer.

``mask_mod`` and ``score_mod`` (:mod:`jattn.mods`, or config data:
:mod:`jattn.layers.patterns`) are the self-attention pattern of a block; a stack takes
one for every layer or a list with one per layer, so a model mixes patterns per layer
(and per head, with :func:`jattn.mods.per_head`). They hold in cached decoding too,
seen from the cache positions. Cross-attention takes none.

``attention`` picks the self-attention mechanism: ``"softmax"`` (the default), or a
:class:`jattn.layers.LinearAttention` kind (``"linear"``, ``"performer"``,
``"retention"``, ``"gla"``), which decodes with a constant-size state through the same
``init_cache``/``step`` protocol. Cross-attention stays softmax. A tuple of kinds
(with ``mask_mod`` a tuple of the same length) makes the self-attention a
:class:`jattn.layers.ParallelAttention` of those branches, combined by learned,
input-dependent sigmoid gates per feature (``combine="gate"``).

``layer_pattern`` gives a stack's layers types in a pattern, as a config field can:
``"local, local, global"`` (or a list of names), repeated over the layers (layer i
takes entry ``i % len(pattern)``). The types (:data:`LAYER_TYPES`): ``"global"``
(softmax attention over every position the block allows), ``"local"`` (softmax in a
sliding window: keys at most ``local_window`` positions from the query; causal
blocks see only the earlier side) and the :class:`jattn.layers.LinearAttention` kinds.
A type may join several with ``+``: ``"global+local"`` is one layer of parallel
branches, gated as above (a composite, :mod:`jattn.layers.composite`). A layer's own
``mask_mod`` still applies (with the window, by logical and); the pattern replaces
``attention``, so a stack takes one or the other.

Cached decoding (``init_cache`` / ``step``) goes through
:func:`jattn.models.init_cache` and :func:`jattn.models.cached_self_attention`, so a
block decodes with any self-attention layer of the ``init_cache`` / ``step`` protocol:
softmax, linear and the composites.

Training mode follows Flax's convention: every block and stack has a ``deterministic``
attribute (True, eval, when built) that ``module.train()`` / ``module.eval()`` switch
with those of all its sublayers; a call's ``deterministic=None`` (the default) uses it,
an explicit ``deterministic=`` wins, and the resolved value is passed down to every
dropout site. Without ``rngs`` each site draws from its own stream.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.functional import _checks, mods
from jattn.functional._checks import check_positive_int
from jattn.functional.attention import attention as score_attention
from jattn.functional.attention import dot_product_attention
from jattn.layers.axes import names
from jattn.layers.composite import ParallelAttention, pattern_names
from jattn.layers.dropout import Dropout, TrainEval, per_site_rngs
from jattn.layers.linear import KINDS as LINEAR_KINDS
from jattn.layers.linear import LinearAttention
from jattn.layers.multihead import MultiHeadAttention
from jattn.layers.patterns import mask_pattern, per_layer
from jattn.layers.scores import Score
from jattn.models.decoding import (
    KVCache,
    RotaryAttention,
    cache_index,
    cached_cross_attention,
    cached_self_attention,
    cross_attention_kv,
    init_cache,
)

__all__ = [
    "LAYER_TYPES",
    "FeedForward",
    "EncoderBlock",
    "DecoderBlock",
    "TransformerEncoder",
    "TransformerDecoder",
    "RotaryAttention",
]

#: The layer types of a ``layer_pattern``.
LAYER_TYPES = ("global", "local", *LINEAR_KINDS)

_ACTIVATIONS = {"relu": jax.nn.relu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


def _check_config(features, num_heads, mlp_features, dropout_rate, activation,
                  layer_norm_eps=1e-5, pre_norm=False):  # fmt: skip
    for name, value in (
        ("features", features),
        ("num_heads", num_heads),
        ("mlp_features", mlp_features),
    ):
        check_positive_int(name, value)
    if features % num_heads:
        raise ValueError(f"features={features} must be divisible by num_heads={num_heads}")
    _checks.check_rate("dropout_rate", dropout_rate)
    _checks.check_finite_scalar("layer_norm_eps", layer_norm_eps, positive=True)
    _checks.check_flag("pre_norm", pre_norm)
    if not isinstance(activation, str) or activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")


def layer_norm(features: int, epsilon: float, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """``nnx.LayerNorm`` whose scale and bias name their axis ``'norm'``."""
    axes = names("norm")
    return nnx.LayerNorm(
        features, epsilon=epsilon, scale_metadata=axes, bias_metadata=axes, rngs=rngs
    )


def _attention_layer(features, num_heads, dropout_rate, attention_fn, score, rotary, rngs,
                     mask_mod=None, score_mod=None, attention="softmax"):  # fmt: skip
    if isinstance(attention, tuple):  # parallel branches, mask_mod a tuple of theirs
        branches = [
            _attention_layer(features, num_heads, dropout_rate, attention_fn, score, rotary,
                             rngs, m, score_mod, a)
            for a, m in zip(attention, mask_mod, strict=True)
        ]  # fmt: skip
        return ParallelAttention(branches, combine="gate", rngs=rngs)
    if attention != "softmax":
        if attention not in LINEAR_KINDS:
            raise ValueError(
                f"attention must be 'softmax' or one of {LINEAR_KINDS}, got {attention!r}"
            )
        given = dict(attention_fn=attention_fn, score=score, rotary=rotary or None,
                     mask_mod=mask_mod, score_mod=score_mod)  # fmt: skip
        for name, value in given.items():
            if value is not None:
                raise ValueError(f"attention={attention!r} takes no {name}")
        return LinearAttention(num_heads, features, kind=attention, rngs=rngs)
    if score is not None and not isinstance(score, Score):
        if not callable(score):
            raise TypeError(
                "score must be a jattn.layers.Score, a factory score(num_heads, head_dim, *, "
                f"rngs) or None, got {score!r}{_checks.type_note(score)}"
            )
        score = score(num_heads, features // num_heads, rngs=rngs)
    if rotary:
        inner = attention_fn or (score_attention if score is not None else dot_product_attention)
        attention_fn = RotaryAttention(inner)
    return MultiHeadAttention(
        num_heads,
        features,
        dropout_rate=dropout_rate,
        score=score,
        attention_fn=attention_fn,
        mask_mod=mask_mod,
        score_mod=score_mod,
        rngs=rngs,
    )


def _layer_plan(num_layers: int, *, layer_pattern=None, local_window=None, attention="softmax",
                mask_mod=None, score_mod=None) -> list[tuple[str, object, object]]:  # fmt: skip
    """``(attention, mask_mod, score_mod)`` of each of a stack's ``num_layers`` layers,
    from one value or a list per layer (``mask_mod``, ``score_mod``) and a
    ``layer_pattern`` (module docstring) with the window of its ``"local"`` layers."""
    masks = per_layer(mask_mod, num_layers, "mask_mod")
    scores = per_layer(score_mod, num_layers, "score_mod")
    if layer_pattern is None:
        if local_window is not None:
            raise ValueError(
                "local_window is the window of a layer_pattern's 'local' layers, and there "
                "is no layer_pattern"
            )
        return [(attention, m, sm) for m, sm in zip(masks, scores, strict=True)]
    if attention != "softmax":
        raise ValueError(
            f"give either attention={attention!r} (every layer) or layer_pattern (per "
            "layer), not both"
        )
    types = pattern_names(layer_pattern, LAYER_TYPES, num_layers=num_layers,
                          name="layer_pattern", parallel=True)  # fmt: skip
    window = None
    if any("local" in t.split("+") for t in types):
        if local_window is None:
            raise ValueError(
                f"layer_pattern {layer_pattern!r} has 'local' layers: set local_window, "
                "the most positions a query of theirs looks back (a positive int)"
            )
        window = mods.sliding_window(check_positive_int("local_window", local_window))

    def part(kind, m):
        if kind == "local":
            own = mask_pattern(m)
            m = window if own is None else mods.and_masks(window, own)
        return ("softmax" if kind in ("global", "local") else kind), m

    plan = []
    for kind, m, sm in zip(types, masks, scores, strict=True):
        if "+" in kind:
            parts = [part(k, m) for k in kind.split("+")]
            plan.append((tuple(a for a, _ in parts), tuple(pm for _, pm in parts), sm))
        else:
            plan.append((*part(kind, m), sm))
    return plan


class FeedForward(TrainEval, nnx.Module):
    """Position-wise feed-forward network ``linear2(drop(act(linear1(x))))``.

    Args:
      features: D (input and output width).
      mlp_features: F, the hidden width.
      activation: ``'relu'`` or ``'gelu'`` (exact, as torch's default gelu).
      dropout_rate: dropout after the activation (as torch).
    """

    def __init__(
        self,
        features: int,
        mlp_features: int,
        *,
        activation: str = "relu",
        dropout_rate: float = 0.0,
        rngs: nnx.Rngs,
    ):
        _check_config(features, 1, mlp_features, dropout_rate, activation)
        self.activation = activation
        self.linear1 = nnx.Linear(
            features,
            mlp_features,
            kernel_metadata=names("embed", "mlp"),
            bias_metadata=names("mlp"),
            rngs=rngs,
        )
        self.linear2 = nnx.Linear(
            mlp_features,
            features,
            kernel_metadata=names("mlp", "embed"),
            bias_metadata=names("embed"),
            rngs=rngs,
        )
        self.dropout = Dropout(dropout_rate, deterministic=True, rngs=rngs)
        self.deterministic = True

    def __call__(self, x: jax.Array, *, deterministic: bool | None = None, rngs=None) -> jax.Array:
        """``x: [..., D] -> [..., D]``; ``deterministic=None`` uses the module's mode."""
        deterministic = self._deterministic(deterministic)
        h = _ACTIVATIONS[self.activation](self.linear1(x))
        h = self.dropout(h, deterministic=deterministic, rngs=rngs)
        return self.linear2(h)


class _Block(TrainEval, nnx.Module):
    """Shared residual wiring of the encoder and decoder blocks."""

    def _init_common(self, features, num_heads, mlp_features, num_norms, *, dropout_rate,
                     pre_norm, activation, layer_norm_eps, rngs):  # fmt: skip
        _check_config(features, num_heads, mlp_features, dropout_rate, activation,
                      layer_norm_eps, pre_norm)  # fmt: skip
        self.features = features
        self.pre_norm = pre_norm
        for i in range(1, num_norms + 1):
            setattr(self, f"norm{i}", layer_norm(features, layer_norm_eps, rngs=rngs))
        self.mlp = FeedForward(
            features, mlp_features, activation=activation, dropout_rate=dropout_rate, rngs=rngs
        )
        self.dropout = Dropout(dropout_rate, deterministic=True, rngs=rngs)
        self.deterministic = True

    def _residual(self, x, norm, sublayer, deterministic, rngs):
        if self.pre_norm:
            return x + self.dropout(sublayer(norm(x)), deterministic=deterministic, rngs=rngs)
        return norm(x + self.dropout(sublayer(x), deterministic=deterministic, rngs=rngs))

    def _mlp(self, x, norm, deterministic, rngs):
        return self._residual(
            x, norm, lambda h: self.mlp(h, deterministic=deterministic, rngs=rngs),
            deterministic, rngs,
        )  # fmt: skip


class EncoderBlock(_Block):
    """Self-attention + feed-forward block (``torch.nn.TransformerEncoderLayer``).

    Submodules: ``self_attention`` (MultiHeadAttention), ``norm1``, ``norm2``
    (LayerNorm), ``mlp`` (FeedForward). With ``rotary=True`` the self-attention
    applies RoPE to queries and keys. Used causally it is a decoder-only (GPT) block.
    """

    def __init__(
        self,
        features: int,
        num_heads: int,
        mlp_features: int,
        *,
        dropout_rate: float = 0.1,
        pre_norm: bool = False,
        activation: str = "relu",
        layer_norm_eps: float = 1e-5,
        attention_fn: Callable | None = None,
        score=None,
        rotary: bool = False,
        mask_mod=None,
        score_mod=None,
        attention: str = "softmax",
        rngs: nnx.Rngs,
    ):
        self._init_common(
            features, num_heads, mlp_features, 2, dropout_rate=dropout_rate,
            pre_norm=pre_norm, activation=activation, layer_norm_eps=layer_norm_eps, rngs=rngs,
        )  # fmt: skip
        self.self_attention = _attention_layer(
            features, num_heads, dropout_rate, attention_fn, score, rotary, rngs,
            mask_mod, score_mod, attention,
        )  # fmt: skip

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        is_causal: bool = False,
        deterministic: bool | None = None,
        rngs=None,
        sow_weights: bool = False,
    ) -> jax.Array:
        """``x: [B, S, D] -> [B, S, D]``.

        ``mask`` (True = attend) and ``bias`` (e.g. ALiBi or a T5 relative position bias)
        broadcast to ``[B, N, S, S]``. ``deterministic=None`` uses the block's mode.
        """
        deterministic = self._deterministic(deterministic)
        rngs = per_site_rngs(rngs)

        def attend(h):
            return self.self_attention(
                h, mask=mask, bias=bias, is_causal=is_causal, deterministic=deterministic,
                rngs=rngs, sow_weights=sow_weights,
            )  # fmt: skip

        x = self._residual(x, self.norm1, attend, deterministic, rngs)
        return self._mlp(x, self.norm2, deterministic, rngs)

    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> KVCache:
        """An empty self-attention :class:`KVCache` of ``max_len`` positions."""
        return init_cache(self.self_attention, batch_size, max_len, dtype)

    def step(self, x: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Causal, cached forward of new tokens ``x [B, T, D]`` (deterministic)."""
        new_cache = cache

        def attend(h):
            nonlocal new_cache
            out, new_cache = cached_self_attention(self.self_attention, h, cache)
            return out

        x = self._residual(x, self.norm1, attend, True, None)
        return self._mlp(x, self.norm2, True, None), new_cache


class DecoderBlock(_Block):
    """Causal self-attention, cross-attention, feed-forward (``torch.nn.TransformerDecoderLayer``).

    Submodules: ``self_attention``, ``cross_attention`` (MultiHeadAttention),
    ``norm1``, ``norm2``, ``norm3`` (LayerNorm), ``mlp`` (FeedForward).
    ``rotary=True`` applies RoPE in the self-attention only.
    """

    def __init__(
        self,
        features: int,
        num_heads: int,
        mlp_features: int,
        *,
        dropout_rate: float = 0.1,
        pre_norm: bool = False,
        activation: str = "relu",
        layer_norm_eps: float = 1e-5,
        attention_fn: Callable | None = None,
        score=None,
        rotary: bool = False,
        mask_mod=None,
        score_mod=None,
        attention: str = "softmax",
        rngs: nnx.Rngs,
    ):
        self._init_common(
            features, num_heads, mlp_features, 3, dropout_rate=dropout_rate,
            pre_norm=pre_norm, activation=activation, layer_norm_eps=layer_norm_eps, rngs=rngs,
        )  # fmt: skip
        self.self_attention = _attention_layer(
            features, num_heads, dropout_rate, attention_fn, score, rotary, rngs,
            mask_mod, score_mod, attention,
        )  # fmt: skip
        self.cross_attention = _attention_layer(
            features, num_heads, dropout_rate, attention_fn, score, False, rngs
        )

    def __call__(
        self,
        y: jax.Array,
        memory: jax.Array,
        *,
        self_mask: jax.Array | None = None,
        cross_mask: jax.Array | None = None,
        self_bias: jax.Array | None = None,
        is_causal: bool = True,
        deterministic: bool | None = None,
        rngs=None,
        sow_weights: bool = False,
    ) -> jax.Array:
        """``y: [B, T, D]``, ``memory: [B, S, D]`` -> ``[B, T, D]``.

        ``self_mask`` broadcasts to ``[B, N, T, T]`` (combined with the causal mask when
        ``is_causal``), ``cross_mask`` to ``[B, N, T, S]``; True = attend. ``self_bias``
        is an additive bias of the self-attention (e.g. causal ALiBi), ``[B, N, T, T]``.
        ``deterministic=None`` uses the block's mode.
        """
        deterministic = self._deterministic(deterministic)
        rngs = per_site_rngs(rngs)
        kw = dict(deterministic=deterministic, rngs=rngs, sow_weights=sow_weights)

        def self_attend(h):
            return self.self_attention(h, mask=self_mask, bias=self_bias, is_causal=is_causal, **kw)

        def cross_attend(h):
            return self.cross_attention(h, memory, mask=cross_mask, **kw)

        y = self._residual(y, self.norm1, self_attend, deterministic, rngs)
        y = self._residual(y, self.norm2, cross_attend, deterministic, rngs)
        return self._mlp(y, self.norm3, deterministic, rngs)

    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> KVCache:
        """An empty self-attention :class:`KVCache` of ``max_len`` positions."""
        return init_cache(self.self_attention, batch_size, max_len, dtype)

    def cross_kv(self, memory: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The cross-attention keys/values of ``memory [B, S, D]``, computed once per source."""
        return cross_attention_kv(self.cross_attention, memory)

    def step(self, y, cache: KVCache, cross_kv, cross_mask=None) -> tuple[jax.Array, KVCache]:
        """Cached forward of new tokens ``y [B, T, D]`` (deterministic)."""
        new_cache = cache

        def self_attend(h):
            nonlocal new_cache
            out, new_cache = cached_self_attention(self.self_attention, h, cache)
            return out

        positions = cache_index(cache)[:, None] + jnp.arange(y.shape[-2], dtype=jnp.int32)[None, :]

        def cross_attend(h):
            return cached_cross_attention(
                self.cross_attention, h, cross_kv, cross_mask, positions=positions
            )

        y = self._residual(y, self.norm1, self_attend, True, None)
        y = self._residual(y, self.norm2, cross_attend, True, None)
        return self._mlp(y, self.norm3, True, None), new_cache


def _stack_kwargs(kw):
    return {k: kw[k] for k in ("dropout_rate", "pre_norm", "activation", "layer_norm_eps",
                               "attention_fn", "score", "rotary", "rngs")}  # fmt: skip


def _plan(kw):
    return _layer_plan(kw["num_layers"], layer_pattern=kw["layer_pattern"],
                       local_window=kw["local_window"], attention=kw["attention"],
                       mask_mod=kw["mask_mod"], score_mod=kw["score_mod"])  # fmt: skip


class TransformerEncoder(TrainEval, nnx.Module):
    """A stack of :class:`EncoderBlock` (``layers``) and an optional final ``norm``.

    ``layer_pattern`` (with ``local_window``) gives each layer a type, e.g. ``"local,
    local, global"`` (see the module docstring).

    ``final_norm=True`` adds a LayerNorm after the last block (needed with pre-norm;
    ``torch.nn.Transformer`` has one in both orders); ``norm`` is ``None`` otherwise.
    """

    def __init__(
        self,
        num_layers: int,
        features: int,
        num_heads: int,
        mlp_features: int,
        *,
        dropout_rate: float = 0.1,
        pre_norm: bool = False,
        activation: str = "relu",
        layer_norm_eps: float = 1e-5,
        final_norm: bool = False,
        attention_fn: Callable | None = None,
        score=None,
        rotary: bool = False,
        mask_mod=None,
        score_mod=None,
        attention: str = "softmax",
        layer_pattern=None,
        local_window: int | None = None,
        rngs: nnx.Rngs,
    ):
        check_positive_int("num_layers", num_layers)
        kw, plan = _stack_kwargs(locals()), _plan(locals())
        self.layers = nnx.List(
            [EncoderBlock(features, num_heads, mlp_features, attention=a, mask_mod=m, score_mod=sm,
                   **kw) for a, m, sm in plan]
        )  # fmt: skip
        self.norm = layer_norm(features, layer_norm_eps, rngs=rngs) if final_norm else None
        self.deterministic = True

    def __call__(self, x, *, mask=None, bias=None, is_causal=False, deterministic=None,
                 rngs=None, sow_weights=False):  # fmt: skip
        """``x: [B, S, D] -> [B, S, D]``; ``mask``/``bias`` as :class:`EncoderBlock`;
        ``deterministic=None`` uses the stack's mode."""
        deterministic = self._deterministic(deterministic)
        rngs = per_site_rngs(rngs)
        for layer in self.layers:
            x = layer(x, mask=mask, bias=bias, is_causal=is_causal, deterministic=deterministic,
                      rngs=rngs, sow_weights=sow_weights)  # fmt: skip
        return x if self.norm is None else self.norm(x)

    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> list[KVCache]:
        """One empty :class:`KVCache` per layer."""
        return [layer.init_cache(batch_size, max_len, dtype) for layer in self.layers]

    def step(self, x, caches: list[KVCache]) -> tuple[jax.Array, list[KVCache]]:
        """Causal cached forward (decoder-only use): ``x [B, T, D]``, one cache per layer."""
        new = []
        for layer, cache in zip(self.layers, caches, strict=True):
            x, cache = layer.step(x, cache)
            new.append(cache)
        return (x if self.norm is None else self.norm(x)), new


class TransformerDecoder(TrainEval, nnx.Module):
    """A stack of :class:`DecoderBlock` (``layers``) and an optional final ``norm``;
    ``layer_pattern`` and ``local_window`` type its self-attention layers as
    :class:`TransformerEncoder`'s."""

    def __init__(
        self,
        num_layers: int,
        features: int,
        num_heads: int,
        mlp_features: int,
        *,
        dropout_rate: float = 0.1,
        pre_norm: bool = False,
        activation: str = "relu",
        layer_norm_eps: float = 1e-5,
        final_norm: bool = False,
        attention_fn: Callable | None = None,
        score=None,
        rotary: bool = False,
        mask_mod=None,
        score_mod=None,
        attention: str = "softmax",
        layer_pattern=None,
        local_window: int | None = None,
        rngs: nnx.Rngs,
    ):
        check_positive_int("num_layers", num_layers)
        kw, plan = _stack_kwargs(locals()), _plan(locals())
        self.layers = nnx.List(
            [DecoderBlock(features, num_heads, mlp_features, attention=a, mask_mod=m, score_mod=sm,
                   **kw) for a, m, sm in plan]
        )  # fmt: skip
        self.norm = layer_norm(features, layer_norm_eps, rngs=rngs) if final_norm else None
        self.deterministic = True

    def __call__(self, y, memory, *, self_mask=None, cross_mask=None, self_bias=None,
                 is_causal=True, deterministic=None, rngs=None, sow_weights=False):  # fmt: skip
        """``y: [B, T, D]``, ``memory: [B, S, D]`` -> ``[B, T, D]`` (as :class:`DecoderBlock`)."""
        deterministic = self._deterministic(deterministic)
        rngs = per_site_rngs(rngs)
        for layer in self.layers:
            y = layer(y, memory, self_mask=self_mask, cross_mask=cross_mask, self_bias=self_bias,
                      is_causal=is_causal, deterministic=deterministic, rngs=rngs,
                      sow_weights=sow_weights)  # fmt: skip
        return y if self.norm is None else self.norm(y)

    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> list[KVCache]:
        """One empty :class:`KVCache` per layer."""
        return [layer.init_cache(batch_size, max_len, dtype) for layer in self.layers]

    def cross_kv(self, memory: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
        """Per layer, the cross-attention keys/values of ``memory [B, S, D]``."""
        return [layer.cross_kv(memory) for layer in self.layers]

    def step(self, y, caches, cross_kvs, cross_mask=None):
        """Cached forward of new tokens ``y [B, T, D]``; returns ``(y, caches)``."""
        new = []
        for layer, cache, kv in zip(self.layers, caches, cross_kvs, strict=True):
            y, cache = layer.step(y, cache, kv, cross_mask)
            new.append(cache)
        return (y if self.norm is None else self.norm(y)), new
