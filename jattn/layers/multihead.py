"""Multi-head attention as a thin NNX layer: project, call one pure function, project back."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.functional import _checks, _finite, mods
from jattn.functional._checks import check_positive_int
from jattn.functional.attention import attention, dot_product_attention
from jattn.functional.masks import causal_mask
from jattn.functional.positional import rotary_embedding
from jattn.layers import patterns
from jattn.layers.axes import names
from jattn.layers.dropout import TrainEval, dropout_key
from jattn.layers.scores import Score

__all__ = ["MultiHeadAttention"]

_DEFAULT_KERNEL_INIT = nnx.initializers.lecun_normal()
_DEFAULT_BIAS_INIT = nnx.initializers.zeros_init()


# Jitted so that the attention of layers with equal shapes is traced once per model
# (12 attention calls, 3 shapes in a 4+4 Transformer: -0.35 s of tracing per step).
_dot_product_attention = jax.jit(
    dot_product_attention, static_argnames=("is_causal", "dropout_rate", "return_weights")
)


def _default(value, default):
    """``value``, or ``default`` when it is None (0 is a value, and is rejected)."""
    return default if value is None else value


def _combine(both, own, call):
    """``both(own, call)``, or whichever of them is given."""
    if own is None or call is None:
        return call if own is None else own
    return both(own, call)


def _rotary_unwrapped(fn):
    """``(inner, wavelengths)``: ``fn`` without the
    :class:`jattn.models.decoding.RotaryAttention` wrappers around it, and their
    ``max_wavelength`` each (a Flax-style decode step applies RoPE at the cache
    positions itself)."""
    from jattn.models.decoding import RotaryAttention  # models import layers: lazily

    wavelengths = []
    while isinstance(fn, RotaryAttention):
        wavelengths.append(fn.max_wavelength)
        fn = fn.inner
    return fn, tuple(wavelengths)


class MultiHeadAttention(TrainEval, nnx.Module):
    """Multi-head attention (self, cross and multi-modal) over :mod:`jattn.functional`.

    Parameters have the layout of ``flax.nnx.MultiHeadAttention``: ``query``,
    ``key``, ``value`` are ``nnx.LinearGeneral`` with kernels ``[D, N|K, H]`` and
    ``out`` has kernel ``[N, Hv, D_out]``, so weights copy across one to one. Their
    axes are named ``('embed', 'heads', 'head_dim')`` and ``('heads', 'head_dim',
    'embed')`` in the sharding metadata (:mod:`jattn.layers.axes`).

    Args:
      num_heads: N, the number of query heads.
      in_features: D, the width of the query input.
      qkv_features: N * H, the total query/key width (default ``in_features``).
      out_features: width of the output (default ``in_features``).
      num_kv_heads: K (default N); N must be a multiple of K (GQA, or MQA with K=1).
      in_kv_features: width of the key input (and of the value input unless
        ``in_value_features`` is given); default ``in_features``.
      in_value_features: width of the value input, for multi-modal attention.
      v_head_dim: Hv, the value head dim (default H).
      dropout_rate: dropout on the attention weights.
      use_bias: biases in the four projections.
      dtype: computation dtype of the projections (default: inferred from inputs).
      param_dtype: dtype of the parameters.
      score: a :class:`jattn.layers.Score` module (additive, bilinear, MLP) or
        ``None`` for scaled dot product.
      attention_fn: the pure attention function; default
        :func:`jattn.dot_product_attention` (or :func:`jattn.attention` with a
        ``score``). It is called as ``attention_fn(q, k, v, bias, mask, *,
        dropout_rate, dropout_rng, return_weights, is_causal[, score_fn,
        score_params, per_head_params][, mask_mod, score_mod, block_mask])``.
      mask_mod: this layer's attention pattern (:mod:`jattn.mods`), applied at every
        call (with a call's own ``mask_mod`` by logical and): a function, a
        :class:`jattn.mods.Mod`, or config data such as ``{"name": "sliding_window",
        "window": [64, 0]}`` (:mod:`jattn.layers.patterns`).
      score_mod: this layer's score modifier, applied before a call's own: a function,
        a Mod, a module with a ``score_mod()`` method (:class:`jattn.layers.ALiBi`,
        :class:`jattn.layers.RelativePositionBias`: its table trains with the layer)
        or config data (``{"name": "alibi"}``, ``{"name": "relative_position_bias"}``).
      deterministic: the layer's mode when a call passes ``deterministic=None``:
        True (the default) is eval, no dropout; ``layer.train()`` / ``layer.eval()``
        (or ``nnx.view(layer, deterministic=...)``) switch it, as for Flax layers.
      decode: the default of a call's ``decode`` (Flax's autoregressive cache, see
        :meth:`init_cache`).
      rngs: ``nnx.Rngs`` with a ``params`` stream (and ``dropout`` when
        ``dropout_rate > 0``: the layer keeps a fork of it, so a training call needs
        no ``rngs``).

    Two key/value caches decode with this layer: Flax's, held by the layer
    (:meth:`init_cache`, then calls with ``decode=True``; ``cached_key``,
    ``cached_value``, ``cache_index`` are ``nnx.Cache`` variables, as in
    ``flax.nnx.MultiHeadAttention``), and jattn's functional one, a pytree threaded
    through :func:`jattn.models.decoding.cached_self_attention`.
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        *,
        num_kv_heads: int | None = None,
        in_kv_features: int | None = None,
        in_value_features: int | None = None,
        v_head_dim: int | None = None,
        dropout_rate: float = 0.0,
        use_bias: bool = True,
        dtype=None,
        param_dtype=jnp.float32,
        kernel_init=_DEFAULT_KERNEL_INIT,
        out_kernel_init=None,
        bias_init=_DEFAULT_BIAS_INIT,
        score: Score | None = None,
        attention_fn: Callable | None = None,
        mask_mod=None,
        score_mod=None,
        deterministic: bool = True,
        decode: bool = False,
        rngs: nnx.Rngs,
    ):
        num_heads = check_positive_int("num_heads", num_heads)
        in_features = check_positive_int("in_features", in_features)
        qkv_features = check_positive_int("qkv_features", _default(qkv_features, in_features))
        out_features = check_positive_int("out_features", _default(out_features, in_features))
        num_kv_heads = check_positive_int("num_kv_heads", _default(num_kv_heads, num_heads))
        in_kv_features = check_positive_int("in_kv_features", _default(in_kv_features, in_features))
        in_value_features = check_positive_int(
            "in_value_features", _default(in_value_features, in_kv_features)
        )
        if qkv_features % num_heads:
            raise ValueError(
                f"qkv_features={qkv_features} must be divisible by num_heads={num_heads}"
            )
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}"
            )
        dropout_rate = _checks.check_rate("dropout_rate", dropout_rate)
        use_bias = _checks.check_flag("use_bias", use_bias)  # None or "yes" was taken
        _checks.check_dtype("dtype", dtype, allow_none=True)
        _checks.check_dtype("param_dtype", param_dtype)
        if score is not None and not isinstance(score, Score):  # else at the first call
            raise TypeError(
                "score must be a jattn.layers.Score module (AdditiveScore, BilinearScore, "
                f"MLPScore) or None, got {score!r}{_checks.type_note(score)}"
            )
        if attention_fn is not None and not callable(attention_fn):
            raise TypeError(
                "attention_fn must be a function attention_fn(q, k, v, bias, mask, **kwargs) "
                f"or None, got {attention_fn!r}{_checks.type_note(attention_fn)}"
            )
        head_dim = qkv_features // num_heads
        v_head_dim = check_positive_int("v_head_dim", _default(v_head_dim, head_dim))

        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.v_head_dim = v_head_dim
        self.in_features = in_features
        self.out_features = out_features
        self.dropout_rate = dropout_rate
        self.score = score
        self.attention_fn = attention_fn

        def proj(din, heads, dim):
            return nnx.LinearGeneral(
                din,
                (heads, dim),
                use_bias=use_bias,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=kernel_init,
                bias_init=bias_init,
                kernel_metadata=names("embed", "heads", "head_dim"),
                bias_metadata=names("heads", "head_dim"),
                rngs=rngs,
            )

        self.query = proj(in_features, num_heads, head_dim)
        self.key = proj(in_kv_features, num_kv_heads, head_dim)
        self.value = proj(in_value_features, num_kv_heads, v_head_dim)
        self.out = nnx.LinearGeneral(
            (num_heads, v_head_dim),
            out_features,
            axis=(-2, -1),
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=out_kernel_init or kernel_init,
            bias_init=bias_init,
            kernel_metadata=names("heads", "head_dim", "embed"),
            bias_metadata=names("embed"),
            rngs=rngs,
        )
        self.rngs = rngs.dropout.fork() if dropout_rate > 0 else nnx.data(None)
        self.mask_mod = patterns.holdable(patterns.mask_pattern(mask_mod))
        self.score_mod = patterns.holdable(
            patterns.score_pattern(score_mod, num_heads=num_heads, rngs=rngs)
        )
        _checks.check_flags(deterministic=deterministic, decode=decode)
        self.deterministic = bool(deterministic)
        self.decode = bool(decode)
        self.cache_dtype = dtype
        # Flax's autoregressive cache (init_cache); None until then, as in Flax.
        self.cached_key: nnx.Cache | None = nnx.data(None)
        self.cached_value: nnx.Cache | None = nnx.data(None)
        self.cache_index: nnx.Cache | None = nnx.data(None)

    def init_cache(self, input_shape, dtype=jnp.float32):
        """Flax's autoregressive cache, as ``flax.nnx.MultiHeadAttention.init_cache``:
        zero ``cached_key [..., L, K, H]``, ``cached_value [..., L, K, Hv]`` and
        ``cache_index`` 0 (``nnx.Cache`` variables) for inputs of ``input_shape
        [..., L, D]`` (batch dims, L = the most positions to decode, D ignored).
        Calls with ``decode=True`` then write their tokens at ``cache_index``.
        """
        if isinstance(input_shape, str) or not hasattr(input_shape, "__len__"):
            raise ValueError(
                "init_cache: input_shape must be [..., max_length, features] with positive "
                f"ints, got {input_shape!r}"
            )
        input_shape = tuple(input_shape)
        try:
            if len(input_shape) < 2:
                raise ValueError(f"it has {len(input_shape)} axes")
            input_shape = tuple(
                _checks.check_size(f"input_shape[{i}]", d) for i, d in enumerate(input_shape)
            )
        except ValueError as e:
            raise ValueError(
                f"init_cache: input_shape must be [..., max_length, features] with positive "
                f"ints, got {input_shape!r} ({e})"
            ) from None
        _checks.check_dtype("dtype", dtype)
        lead = input_shape[:-1]
        self.cached_key = nnx.Cache(jnp.zeros((*lead, self.num_kv_heads, self.head_dim), dtype))
        self.cached_value = nnx.Cache(jnp.zeros((*lead, self.num_kv_heads, self.v_head_dim), dtype))
        self.cache_index = nnx.Cache(jnp.array(0, dtype=jnp.int32))

    def set_view(
        self,
        deterministic: bool | None = None,
        decode: bool | None = None,
        batch_size: int | tuple[int, ...] | None = None,
        max_length: int | None = None,
    ):
        """Used by ``nnx.view`` (as Flax's ``MultiHeadAttention.set_view``).

        Args:
          deterministic: True disables dropout (eval), False enables it (training).
          decode: the default of a call's ``decode``.
          batch_size, max_length: with ``decode=True``, a new cache of that batch shape
            and length (:meth:`init_cache`); both or neither.
        """
        if (batch_size is None) != (max_length is None):  # checked before anything changes
            raise TypeError("set_view: pass both batch_size and max_length (for a new cache)")
        if deterministic is not None:
            self.deterministic = deterministic
        if decode is not None:
            self.decode = decode
        if batch_size is not None:
            batch = (batch_size,) if not isinstance(batch_size, tuple | list) else batch_size
            self.init_cache((*batch, max_length, self.in_features), self.cache_dtype or jnp.float32)

    def call_mods(self, mask_mod=None, score_mod=None, *, q_offset=None):
        """``(mask_mod, score_mod)`` of a call: this layer's own (:func:`jattn.mods.and_masks`
        / :func:`jattn.mods.chain_scores` with the call's ``mask_mod`` / ``score_mod``),
        seen from query positions shifted by ``q_offset`` (an int or ``[B]``, e.g. a
        key/value cache's index) when given. Each is None when there is none."""
        own_mask = self.mask_mod
        own_score = patterns.resolve_score_mod(self.score_mod)
        if q_offset is not None:
            own_mask = None if own_mask is None else mods.offset(own_mask, q_offset)
            own_score = None if own_score is None else mods.offset(own_score, q_offset)
        mask_mod = _combine(mods.and_masks, own_mask, mask_mod)
        return mask_mod, _combine(mods.chain_scores, own_score, score_mod)

    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_k: jax.Array | None = None,
        inputs_v: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        is_causal: bool = False,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | None = None,
        return_weights: bool = False,
        sow_weights: bool = False,
        mask_mod=None,
        score_mod=None,
        block_mask=None,
        decode: bool | None = None,
    ):
        """Attends from ``inputs_q`` to ``inputs_k``/``inputs_v``.

        Args:
          inputs_q: ``[..., T, D]``.
          inputs_k: ``[..., S, Dk]``; defaults to ``inputs_q`` (self-attention).
          inputs_v: ``[..., S, Dv]``; defaults to ``inputs_k``.
          mask: boolean, True = attend, broadcasts to ``[..., N, T, S]``.
          bias: additive float bias, broadcasts to ``[..., N, T, S]``.
          is_causal: causal self-attention mask.
          mask_mod, score_mod, block_mask: masks and score modifiers as functions
            (:mod:`jattn.mods`) for this call, combined with the layer's own
            (:meth:`call_mods`) and passed to the attention function.
          deterministic: disables dropout when True; None (the default) uses the
            layer's ``deterministic`` attribute (True unless ``layer.train()``).
          rngs: dropout randomness for this call: ``nnx.Rngs``, an ``RngStream`` or a key
            (default: the layer's own stream).
          decode: use Flax's autoregressive cache (:meth:`init_cache` first); None uses
            the layer's ``decode`` attribute. The T tokens of ``inputs_q`` (self-
            attention: ``inputs_k``/``inputs_v`` the same T tokens) are written at
            ``cache_index`` and attend causally to the cache up to their own
            positions; ``cache_index`` advances by T. One token per call is Flax's
            use, more (a prefill) work too. The cache mask is causal, so
            ``is_causal`` needs no change; ``mask``/``bias`` broadcast to
            ``[..., N, T, max_length]``, and mask/score mods see the cache positions.
            A cache of another dtype is read in the inputs'. More tokens than the
            cache has room for are an error, or, under ``jax.jit`` (a traced
            ``cache_index``), NaN outputs.
          return_weights: also return the float32 weights ``[..., N, T, S]``.
          sow_weights: sow the weights as ``nnx.Intermediate`` ``attention_weights``;
            call under ``nnx.capture(fn, nnx.Intermediate)`` (or use
            :func:`jattn.viz.collect_attention_weights`) to get them back.

        Returns:
          ``[..., T, out_features]``, or ``(output, weights)`` with ``return_weights``.
        """
        inputs_k, inputs_v = self._check_inputs(inputs_q, inputs_k, inputs_v)
        deterministic = self._deterministic(deterministic)
        decode = self.decode if decode is None else decode
        _checks.check_flags(decode=decode)
        query, key, value = self._project(inputs_q, inputs_k, inputs_v)

        fn = self.attention_fn
        q_offset = None
        if decode:
            if block_mask is not None:
                raise ValueError("decode=True takes no block_mask (it is built for a fixed T, S)")
            query, key, value, mask, q_offset, fn = self._decode_step(query, key, value, mask)
            is_causal = False  # the cache mask is causal at the cache positions
            mask_mod = None if mask_mod is None else mods.offset(mask_mod, q_offset)
            score_mod = None if score_mod is None else mods.offset(score_mod, q_offset)

        dropout_rate, dropout_rng = 0.0, None
        if self.dropout_rate > 0.0 and not deterministic:
            dropout_rng = dropout_key(rngs, self.rngs)
            if dropout_rng is None:
                raise ValueError("dropout needs rngs: pass rngs=nnx.Rngs(dropout=...)")
            dropout_rate = self.dropout_rate

        want_weights = return_weights or sow_weights
        kwargs = dict(
            is_causal=is_causal,
            dropout_rate=dropout_rate,
            dropout_rng=dropout_rng,
            return_weights=want_weights,
        )
        if self.score is not None:
            kwargs.update(
                score_fn=self.score.score_fn, score_params=self.score.params(), per_head_params=True
            )
        mask_mod, score_mod = self.call_mods(mask_mod, score_mod, q_offset=q_offset)
        mods_ = dict(mask_mod=mask_mod, score_mod=score_mod, block_mask=block_mask)
        mods_ = {name: x for name, x in mods_.items() if x is not None}
        kwargs.update(mods_)
        default = _dot_product_attention if not mods_ else dot_product_attention  # (jit: caller)
        fn = fn or (attention if self.score is not None else default)
        result = fn(query, key, value, bias, mask, **kwargs)
        x, weights = result if want_weights else (result, None)
        if sow_weights:
            self.sow(nnx.Intermediate, "attention_weights", weights)
        out = self._output(x)
        return (out, weights) if return_weights else out

    def _project(self, inputs_q, inputs_k, inputs_v):
        """``query [..., T, N, H]``, ``key [..., S, K, H]``, ``value [..., S, K, Hv]``: the
        projections, each by :func:`jattn.functional._finite.by_row` (a non-finite input
        vector zeroed before, its projection NaN after: the same values, and a NaN
        input at a hidden position reaches no weight gradient). Projections of one
        input (self-attention, keys and values of one memory) share its check."""

        def key_value(x):
            return self.key(x), self.value(x)

        if inputs_q is inputs_k is inputs_v:
            return _finite.by_row(lambda x: (self.query(x), *key_value(x)), inputs_q)
        query = _finite.by_row(self.query, inputs_q)
        if inputs_k is inputs_v:
            return (query, *_finite.by_row(key_value, inputs_k))
        return query, _finite.by_row(self.key, inputs_k), _finite.by_row(self.value, inputs_v)

    def _output(self, x):
        """The output projection of the heads ``x [..., T, N, Hv]``, by row as
        :meth:`_project`'s (a padded query's NaN row, which the caller leaves out of
        the loss, reaches no weight gradient)."""
        return _finite.by_row(self.out, x, vector_ndim=2)

    def _check_inputs(self, inputs_q, inputs_k, inputs_v, one_batch_axis: bool = False,
                      q_name: str = "inputs_q"):  # fmt: skip
        """``(inputs_k, inputs_v)``, defaulted to the query's (self-attention), each
        checked: real, ``[..., L, D]`` (``[B, L, D]`` with ``one_batch_axis``) with the
        projection's D, keys and values of one shape but the features (the query named
        ``q_name``)."""
        if inputs_k is None:
            if inputs_v is not None:
                raise ValueError("inputs_v was given without inputs_k")
            inputs_k = inputs_q
        if inputs_v is None:
            inputs_v = inputs_k
        batch, rank = ("B", 3) if one_batch_axis else ("...", None)
        for name, x, width in (
            (q_name, inputs_q, self.query.in_features[0]),
            ("inputs_k", inputs_k, self.key.in_features[0]),
            ("inputs_v", inputs_v, self.value.in_features[0]),
        ):
            x = _checks.check_real(name, x)
            if jnp.ndim(x) < 2 or jnp.shape(x)[-1] != width or rank not in (None, jnp.ndim(x)):
                raise ValueError(
                    f"{name} must have shape [{batch}, L, {width}], got {list(jnp.shape(x))}"
                )
        if jnp.shape(inputs_k)[:-1] != jnp.shape(inputs_v)[:-1]:
            raise ValueError(
                f"inputs_k {list(jnp.shape(inputs_k))} and inputs_v {list(jnp.shape(inputs_v))} "
                "must agree on all but the feature axis"
            )
        return inputs_k, inputs_v

    def _decode_step(self, query, key, value, mask):
        """Flax-style cached step: writes the T new keys/values at ``cache_index`` and
        returns ``(query, keys, values, mask, index, attention_fn)`` against the whole
        cache (RoPE of a ``RotaryAttention`` attention_fn applied at the cache positions,
        the attention_fn returned without it)."""
        if self.cached_key is None or self.cached_value is None or self.cache_index is None:
            raise ValueError(
                "decode=True needs the autoregressive cache: call init_cache(input_shape) "
                "first (input_shape [..., max_length, features]), or "
                "nnx.view(layer, decode=True, batch_size=..., max_length=...)"
            )
        *batch, max_len, num_kv, _ = self.cached_key.shape
        t = query.shape[-3]
        want = (*batch, t, num_kv)
        if tuple(key.shape[:-1]) != want or tuple(query.shape[:-3]) != tuple(batch):
            raise ValueError(
                f"decode=True: the cache holds batch {list(batch)}, {num_kv} key/value heads; "
                f"inputs_q gives {list(query.shape[:-3])} batch dims and {t} tokens, whose "
                f"keys must have shape {list(want)} + [H], got {list(key.shape)} (inputs_k "
                "must be the same new tokens as inputs_q)"
            )
        if t > max_len:
            raise ValueError(f"decode=True: {t} new tokens do not fit a cache of {max_len}")
        if mask is not None:
            mask = _checks.check_bool_mask("mask", mask, hint="pass additive float masks as bias")
            target = (*batch, query.shape[-2], t, max_len)
            _checks.check_heads_mask("mask", mask, target, "[..., N, T, max_length] (the cache)")
        index = self.cache_index[...]
        concrete = _checks.concrete(index)
        if concrete is not None and int(concrete) + t > max_len:
            raise ValueError(
                f"decode=True: the cache is full: writing {t} tokens at cache_index "
                f"{int(concrete)} needs {int(concrete) + t} positions, it has {max_len}"
            )
        query = _checks.nan_if_overflowing(query, index, t, max_len)
        fn, wavelengths = _rotary_unwrapped(self.attention_fn)
        if wavelengths:
            positions = index + jnp.arange(t, dtype=jnp.int32)
            for w in wavelengths:
                query = rotary_embedding(query, positions, max_wavelength=w)
                key = rotary_embedding(key, positions, max_wavelength=w)
        start = (jnp.zeros((), jnp.int32),) * len(batch) + (index, 0, 0)
        keys = jax.lax.dynamic_update_slice(
            self.cached_key[...], key.astype(self.cached_key.dtype), start
        )
        values = jax.lax.dynamic_update_slice(
            self.cached_value[...], value.astype(self.cached_value.dtype), start
        )
        self.cached_key[...] = keys
        self.cached_value[...] = values
        self.cache_index[...] = index + t
        # a cache stored in another dtype (init_cache(dtype=...)) is read in the inputs'
        keys, values = keys.astype(key.dtype), values.astype(value.dtype)
        visible = causal_mask(t, max_len, offset=index)  # [T, L]: up to its own position
        if mask is None:
            return query, keys, values, visible[None], index, fn
        rank = max(mask.ndim, 3)
        mask = mask.reshape((1,) * (rank - mask.ndim) + mask.shape)
        visible = jnp.logical_and(mask, visible.reshape((1,) * (rank - 2) + visible.shape))
        return query, keys, values, visible, index, fn
