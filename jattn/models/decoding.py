"""Fast autoregressive decoding: a fixed-size key/value cache, greedy and beam search.

The cache is an explicit pytree (:class:`KVCache`) threaded through the model's
``step`` methods, so decoding loops are plain ``lax.while_loop`` over arrays and the
whole search compiles once under ``jax.jit``. The cached attention reuses the
projections of a :class:`jattn.layers.MultiHeadAttention` (``query``, ``key``,
``value``, ``out``) and its attention function.

Search functions are model-agnostic: they take a ``step_fn(tokens [B, 1], state) ->
(log_probs [B, V] float32, state)`` where every leaf of ``state`` has a leading
batch axis (beam search reorders it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.functional import _checks, _sharding
from jattn.functional.attention import attention, dot_product_attention
from jattn.functional.masks import causal_mask
from jattn.functional.positional import rotary_embedding
from jattn.layers.linear import LinearDecodeState
from jattn.layers.multihead import MultiHeadAttention

__all__ = [
    "KVCache",
    "RotaryAttention",
    "init_cache",
    "cache_index",
    "rewind_cache",
    "cached_self_attention",
    "cross_attention_kv",
    "cached_cross_attention",
    "length_penalty_fn",
    "greedy_search",
    "beam_search",
]

_NEG = -1.0e9  # finite "impossible" log-probability


class KVCache(NamedTuple):
    """Keys ``[B, S_max, K, H]``, values ``[B, S_max, K, Hv]`` and the next write index ``[B]``.

    ``index[b]`` is the number of positions of example ``b`` already in the cache; the
    next tokens are written there and sit at absolute positions ``index[b] + t``.
    """

    key: jax.Array
    value: jax.Array
    index: jax.Array


def init_cache(mha, batch_size: int, max_len: int | None, dtype=jnp.float32) -> KVCache:
    """An empty cache of ``max_len`` positions for the self-attention layer ``mha``.

    A :class:`jattn.layers.MultiHeadAttention` gets a :class:`KVCache`; any other layer
    that decodes by the ``init_cache(batch_size, max_len, dtype)`` / ``step(x, cache)``
    protocol (:class:`jattn.layers.LinearAttention`'s constant-size state, the
    composites of :mod:`jattn.layers.composite` and :mod:`jattn.layers.gating`, a
    user's own layer) gets its own cache, a pytree that holds :class:`KVCache` or
    :class:`jattn.layers.linear.LinearDecodeState` parts (:func:`cache_index` reads it).
    """
    batch_size = _checks.check_size("batch_size", batch_size)
    _checks.check_dtype("dtype", dtype)
    if _own_step(mha):  # a state of constant size (linear attention) may take max_len=None
        max_len = None if max_len is None else _checks.check_size("max_len", max_len)
        return mha.init_cache(batch_size, max_len, dtype)
    if not isinstance(mha, MultiHeadAttention):
        raise TypeError(
            f"{type(mha).__name__} cannot decode: a self-attention layer needs "
            "init_cache(batch_size, max_len, dtype) and step(x, cache) methods, or to "
            "be a jattn.layers.MultiHeadAttention"
        )
    if max_len is None:
        raise ValueError(f"a {type(mha).__name__} needs max_len for its key/value cache")
    max_len = _checks.check_size("max_len", max_len)
    return KVCache(
        key=jnp.zeros((batch_size, max_len, mha.num_kv_heads, mha.head_dim), dtype),
        value=jnp.zeros((batch_size, max_len, mha.num_kv_heads, mha.v_head_dim), dtype),
        index=jnp.zeros((batch_size,), jnp.int32),
    )


def _own_step(layer) -> bool:
    """Whether ``layer`` decodes by its own ``init_cache`` / ``step`` (a
    ``MultiHeadAttention`` has Flax's ``init_cache`` but decodes through a KVCache)."""
    return callable(getattr(layer, "step", None)) and callable(getattr(layer, "init_cache", None))


def _is_state(x) -> bool:
    return isinstance(x, KVCache | LinearDecodeState)


def cache_index(cache) -> jax.Array:
    """``[B]``: how many positions of each example the cache (any pytree of
    :class:`KVCache` / :class:`jattn.layers.linear.LinearDecodeState` parts, all advanced
    together) holds, i.e. the position of the next token."""
    states = [x for x in jax.tree.leaves(cache, is_leaf=_is_state) if _is_state(x)]
    if not states:
        raise TypeError(
            f"the cache ({type(cache).__name__}) holds no KVCache or LinearDecodeState, "
            "which carry the decoding position"
        )
    return states[0].index


def rewind_cache(cache, index: jax.Array):
    """The cache with every :class:`KVCache` part's next write position set to
    ``index [B]`` (an int, or an int array ``[B]``; the keys beyond it are masked from
    then on), each in ``[0, S_max]`` (checked when concrete). A
    :class:`jattn.layers.linear.LinearDecodeState` cannot be rewound: a TypeError."""
    index = _checks.as_array("index", index)
    if not jnp.issubdtype(index.dtype, jnp.integer) or index.ndim > 1:
        raise TypeError(
            f"index must be an int or an int array [B], got {index.dtype}{_checks.fmt(index.shape)}"
        )
    values = _checks.concrete(index)

    def rewind(x):
        if isinstance(x, LinearDecodeState):
            raise TypeError("a linear-attention state cannot be rewound; feed tokens instead")
        if not isinstance(x, KVCache):
            return x
        b, max_len = x.key.shape[:2]
        if index.ndim == 1 and index.shape != (b,):
            raise ValueError(f"index has shape {_checks.fmt(index.shape)}; the cache holds B={b}")
        if values is not None and values.size and not 0 <= values.min() <= values.max() <= max_len:
            raise ValueError(f"index must be in [0, {max_len}] (the cache's positions), got "
                             f"{values.tolist()}")  # fmt: skip
        return x._replace(index=jnp.broadcast_to(index, (b,)).astype(x.index.dtype))

    return jax.tree.map(rewind, cache, is_leaf=_is_state)


@dataclasses.dataclass(frozen=True)
class RotaryAttention:
    """An ``attention_fn`` that applies RoPE to queries and keys at positions ``0..T-1``.

    Wraps ``inner`` (the attention function otherwise used); for self-attention over a
    whole sequence. Cached decoding (:func:`cached_self_attention`, :func:`cached_cross_attention`)
    applies the same RoPE at the cache positions instead.
    """

    inner: Callable
    max_wavelength: float = 10000.0

    def __post_init__(self):
        if not callable(self.inner):
            raise TypeError(
                f"RotaryAttention needs an attention function, got {type(self.inner).__name__}"
            )
        wavelength = _checks.check_finite_scalar(
            "max_wavelength", self.max_wavelength, positive=True
        )
        object.__setattr__(self, "max_wavelength", wavelength)

    def __call__(self, query, key, value, bias=None, mask=None, **kwargs):
        q_pos = jnp.arange(query.shape[-3], dtype=jnp.int32)
        k_pos = jnp.arange(key.shape[-3], dtype=jnp.int32)
        query = rotary_embedding(query, q_pos, max_wavelength=self.max_wavelength)
        key = rotary_embedding(key, k_pos, max_wavelength=self.max_wavelength)
        return self.inner(query, key, value, bias, mask, **kwargs)


def _unwrap(mha) -> tuple[Callable, tuple[float, ...]]:
    """``(fn, wavelengths)``: the pure attention function ``mha`` calls, and the
    ``max_wavelength`` of each :class:`RotaryAttention` wrapped around it."""
    fn, wavelengths = mha.attention_fn, []
    while isinstance(fn, RotaryAttention):
        wavelengths.append(fn.max_wavelength)
        fn = fn.inner
    return fn or (attention if mha.score is not None else dot_product_attention), tuple(wavelengths)


def _rope(x, positions, wavelengths):
    for w in wavelengths:  # rotations of the same pairs: their order does not matter
        x = rotary_embedding(x, positions, max_wavelength=w)
    return x


def _attend(mha, q, k, v, mask, q_offset=None):
    """The layer's attention of queries at positions ``q_offset + t`` (its mask_mod and
    score_mod seen from there) against cached keys at ``0..S_max-1``."""
    kwargs = dict(is_causal=False, dropout_rate=0.0, dropout_rng=None, return_weights=False)
    mask_mod, score_mod = mha.call_mods(q_offset=q_offset)
    for name, mod in (("mask_mod", mask_mod), ("score_mod", score_mod)):
        if mod is not None:
            kwargs[name] = mod
    if mha.score is not None:
        kwargs.update(
            score_fn=mha.score.score_fn, score_params=mha.score.params(), per_head_params=True
        )
    return mha.out(_unwrap(mha)[0](q, k, v, None, mask, **kwargs))


def _write(buffer: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """Writes ``new [B, T, ...]`` into ``buffer [B, S_max, ...]`` at ``index [B]``."""

    def one(b, n, i):
        return jax.lax.dynamic_update_slice_in_dim(b, n.astype(b.dtype), i, axis=0)

    return jax.vmap(one)(buffer, new, index)


def cached_self_attention(mha, x: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Causal self-attention of new tokens ``x [B, T, D]`` against the cache.

    The T tokens of example b sit at positions ``cache.index[b] + t``: their keys and
    values are written there and each query sees the cache up to its own position
    (``jattn.causal_mask(T, S_max, offset=index)``). Works for a multi-token prefill
    and for single-token steps. ``index + T <= S_max`` is the caller's to keep: a
    concrete index that overflows raises; a traced one (under ``jax.jit``) cannot
    raise, so an example that overflows gets NaN rows, not a clamped write. A layer
    whose ``attention_fn`` is a :class:`RotaryAttention` gets its RoPE at those
    positions.

    Returns:
      ``([B, T, D_out], cache)`` with ``index`` advanced by T.
    """
    if _own_step(mha):  # its own cache: a state (linear attention), composites
        return mha.step(x, cache)
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache (init_cache), got {type(cache).__name__}")
    x = _check_features_in("x", x, mha.query, cache.key.shape[0])
    num_new, max_len = x.shape[-2], cache.key.shape[1]
    _check_room(cache.index, num_new, max_len)
    q, k, v = mha.query(x), mha.key(x), mha.value(x)  # [B, T, N|K, H]
    if (k.dtype, v.dtype) != (cache.key.dtype, cache.value.dtype):  # else a late, vague error
        raise ValueError(
            f"the cache holds {cache.key.dtype} keys and {cache.value.dtype} values, but "
            f"this layer makes {k.dtype} keys and {v.dtype} values from x of dtype "
            f"{x.dtype}: make the cache with init_cache(layer, batch_size, max_len, "
            f"dtype=jnp.{k.dtype})"
        )
    q = _checks.nan_if_overflowing(q, cache.index, num_new, max_len)
    wavelengths = _unwrap(mha)[1]
    if wavelengths:
        positions = cache.index[:, None] + jnp.arange(num_new, dtype=jnp.int32)[None, :]
        q, k = _rope(q, positions, wavelengths), _rope(k, positions, wavelengths)
    keys = _write(cache.key, k, cache.index)
    values = _write(cache.value, v, cache.index)
    mask = causal_mask(num_new, max_len, offset=cache.index)[:, None]  # [B, 1, T, S_max]
    out = _attend(mha, q, keys, values, mask, cache.index)
    return out, KVCache(keys, values, cache.index + num_new)


def _check_features_in(
    name: str, x, projection, batch: int | None, whose: str = "cache"
) -> jax.Array:
    """``x`` as a real ``[B, L, D]`` array with the ``projection``'s D (and the ``batch``
    of the ``whose`` it meets): an error naming ``name`` instead of one from inside vmap
    or a matmul."""
    x = _checks.check_real(name, x)
    width = getattr(projection, "in_features", None)
    width = width[0] if isinstance(width, tuple) else width
    if (
        x.ndim != 3
        or (width is not None and x.shape[-1] != width)
        or (batch is not None and x.shape[0] != batch)
    ):
        where = "" if batch is None else f" (B={batch}, the {whose}'s)"
        raise ValueError(
            f"{name} must have shape [B, L, {width if width is not None else 'D'}]{where}, got "
            f"{_checks.fmt(x.shape)}"
        )
    return x


def _check_room(index, num_new: int, max_len: int) -> None:
    """A clear error instead of a clamped write when T new tokens overflow the cache
    (always checked for T > S_max; for the index only when it is concrete)."""
    if num_new > max_len:
        raise ValueError(f"{num_new} new tokens do not fit a cache of {max_len} positions")
    values = _checks.concrete(index)
    if values is not None and values.size and int(values.max()) + num_new > max_len:
        raise ValueError(
            f"the cache is full: writing {num_new} tokens at index {values.tolist()} needs "
            f"{int(values.max()) + num_new} positions, it has {max_len}"
        )


def cross_attention_kv(mha, memory: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Projects the encoder memory ``[B, S, D]`` once: keys ``[B, S, K, H]``, values
    (keys with the RoPE of a :class:`RotaryAttention` layer at positions ``0..S-1``)."""
    memory = _check_features_in("memory", memory, mha.key, None)
    k = mha.key(memory)
    wavelengths = _unwrap(mha)[1]
    if wavelengths:
        k = _rope(k, jnp.arange(memory.shape[-2], dtype=jnp.int32), wavelengths)
    return k, mha.value(memory)


def cached_cross_attention(
    mha, y: jax.Array, kv, mask: jax.Array | None, *, positions: jax.Array | None = None
) -> jax.Array:
    """Cross-attention of ``y [B, T, D]`` to precomputed memory keys/values ``kv``.

    ``positions [B, T]``: where the T new tokens sit (consecutive), needed (only) when
    the layer's ``attention_fn`` is a :class:`RotaryAttention`, which rotates the
    queries there, or the layer has its own ``mask_mod``/``score_mod``, seen from there.
    """
    y = _check_features_in("y", y, mha.query, kv[0].shape[0], "memory")
    q = mha.query(y)
    wavelengths = _unwrap(mha)[1]
    has_mods = mha.mask_mod is not None or mha.score_mod is not None
    if (wavelengths or has_mods) and positions is None:
        why = "attention_fn is a RotaryAttention" if wavelengths else "has a mask_mod/score_mod"
        raise ValueError(
            f"cached_cross_attention: this layer's {why}; pass positions=[B, T], the "
            "positions of the new tokens"
        )
    if wavelengths:
        q = _rope(q, positions, wavelengths)
    q_offset = positions[:, 0] if has_mods else None
    return _attend(mha, q, kv[0], kv[1], mask, q_offset)


def length_penalty_fn(length: jax.Array, alpha: float) -> jax.Array:
    """GNMT's length penalty ``((5 + length) / 6) ** alpha`` (``length``: an int or an
    array of token counts; ``alpha``: a finite float, traced allowed)."""
    length = _checks.check_real("length", length)
    alpha = _checks.check_finite_scalar("alpha", alpha, allow_traced=True)
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def _check_search(first_tokens, max_len, eos_id, pad_id):
    """The shared arguments of the searches: ``first_tokens [B]`` ids, ``max_len`` a
    positive int, the special ids ints >= 0."""
    first_tokens = _checks.check_int_array("first_tokens", first_tokens)
    if first_tokens.ndim != 1:
        raise ValueError(f"first_tokens must have shape [B], got {_checks.fmt(first_tokens.shape)}")
    max_len = _checks.check_size("max_len", max_len)
    eos_id = _checks.check_size("eos_id", eos_id, minimum=0)
    pad_id = _checks.check_size("pad_id", pad_id, minimum=0)
    return first_tokens, max_len, eos_id, pad_id


def _check_step_output(log_probs, rows: int, **ids: int) -> None:
    """A ValueError (at trace time) unless ``step_fn`` returned ``[rows, V]`` scores and
    each of ``ids`` (``eos_id=3``) is a token of those V."""
    shape = jnp.shape(log_probs)
    if len(shape) != 2 or shape[0] != rows:
        raise ValueError(
            f"step_fn must return (log_probs [B, V], state) for tokens [B, 1] with B={rows}, "
            f"got log_probs of shape {_checks.fmt(shape)}"
        )
    for name, value in ids.items():
        if value >= shape[1]:
            raise ValueError(
                f"{name}={value} is not a token of step_fn's vocabulary: its log_probs "
                f"have V={shape[1]} entries per row (ids 0 to {shape[1] - 1})"
            )


def greedy_search(
    step_fn: Callable[[jax.Array, Any], tuple[jax.Array, Any]],
    state: Any,
    first_tokens: jax.Array,
    *,
    max_len: int,
    eos_id: int,
    pad_id: int,
) -> jax.Array:
    """Greedy decoding as a ``lax.while_loop``.

    Args:
      step_fn: ``(tokens [B, 1], state) -> (log_probs [B, V], state)``.
      state: the decoder state (caches), leaves with a leading batch axis B.
      first_tokens: ``[B]`` the token fed first (BOS, or the last prompt token).
      max_len: number of tokens to generate.
      eos_id, pad_id: ids of tokens of the vocabulary (``0 <= id < V``; checked against
        ``log_probs`` at trace time).

    Returns:
      ``[B, max_len]`` int32: argmax tokens up to and including EOS, then PAD.
    """
    first_tokens, max_len, eos_id, pad_id = _check_search(first_tokens, max_len, eos_id, pad_id)
    batch = first_tokens.shape[0]
    out = jnp.full((batch, max_len), pad_id, jnp.int32)

    def cond(carry):
        i, _, _, _, done = carry
        return (i < max_len) & ~jnp.all(done)

    def body(carry):
        i, tokens, state, out, done = carry
        log_probs, state = step_fn(tokens[:, None], state)
        _check_step_output(log_probs, batch, eos_id=eos_id)  # else it never stops early
        nxt = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, pad_id, nxt)
        out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1)
        return i + 1, nxt, state, out, done | (nxt == eos_id)

    init = (jnp.int32(0), first_tokens.astype(jnp.int32), state, out, jnp.zeros((batch,), bool))
    return jax.lax.while_loop(cond, body, init)[3]


def beam_search(
    step_fn: Callable[[jax.Array, Any], tuple[jax.Array, Any]],
    state: Any,
    first_tokens: jax.Array,
    *,
    beam_size: int,
    max_len: int,
    eos_id: int,
    pad_id: int,
    length_penalty: float = 0.6,
) -> tuple[jax.Array, jax.Array]:
    """Beam search with GNMT's length penalty, as a ``lax.while_loop``.

    Beams are ranked by ``log P(y) / ((5 + |y|) / 6) ** length_penalty`` where ``|y|``
    counts the generated tokens including EOS. A beam that emitted EOS is finished: it
    keeps its score, continues only with PAD at no cost and competes with the live
    beams for the ``beam_size`` slots. The loop stops when every beam is finished or
    after ``max_len`` tokens. With ``beam_size=1`` this is exactly greedy search.

    Args:
      step_fn, state, first_tokens: as :func:`greedy_search` (state has batch B; it is
        repeated to ``B * beam_size`` and reordered along axis 0 as beams move).

    Returns:
      ``(tokens [B, max_len] int32, scores [B] float32)`` of the best beam.
    """
    first_tokens, max_len, eos_id, pad_id = _check_search(first_tokens, max_len, eos_id, pad_id)
    beam_size = _checks.check_size("beam_size", beam_size)
    length_penalty = _checks.check_finite_scalar("length_penalty", length_penalty,
                                                 allow_traced=True)  # fmt: skip
    if isinstance(length_penalty, float) and length_penalty < 0:  # as the models' generate
        raise ValueError(f"length_penalty must be a float >= 0, got {length_penalty!r}")
    batch, width = first_tokens.shape[0], beam_size
    state = jax.tree.map(lambda x: jnp.repeat(x, width, axis=0), state)
    tokens = jnp.repeat(first_tokens.astype(jnp.int32), width)  # [B*W]
    seqs = jnp.full((batch, width, max_len), pad_id, jnp.int32)
    first = jnp.arange(width) == 0
    log_p = jnp.broadcast_to(jnp.where(first, 0.0, _NEG)[None, :], (batch, width))
    finished = jnp.zeros((batch, width), bool)
    lengths = jnp.zeros((batch, width), jnp.int32)

    def cond(carry):
        i, *_, finished, _ = carry
        return (i < max_len) & ~jnp.all(finished)

    def body(carry):
        i, tokens, state, seqs, log_p, finished, lengths = carry
        step_lp, state = step_fn(tokens[:, None], state)
        # a finished beam continues with PAD at no cost: PAD must be a token it can take
        _check_step_output(step_lp, batch * width, eos_id=eos_id, pad_id=pad_id)
        vocab = step_lp.shape[-1]
        step_lp = step_lp.astype(jnp.float32).reshape(batch, width, vocab)
        pad_only = jnp.where(jnp.arange(vocab) == pad_id, 0.0, _NEG)  # [V]
        step_lp = jnp.where(finished[..., None], pad_only[None, None, :], step_lp)
        cand = log_p[..., None] + step_lp  # [B, W, V]
        cand_len = jnp.where(finished, lengths, i + 1)  # [B, W]
        score = cand / length_penalty_fn(cand_len, length_penalty)[..., None]
        _, idx = jax.lax.top_k(score.reshape(batch, width * vocab), width)  # [B, W]
        beam, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
        log_p = jnp.take_along_axis(cand.reshape(batch, -1), idx, axis=1)
        was_finished = jnp.take_along_axis(finished, beam, axis=1)
        lengths = jnp.where(was_finished, jnp.take_along_axis(lengths, beam, axis=1), i + 1)
        tok = jnp.where(was_finished, pad_id, tok)
        seqs = jnp.take_along_axis(seqs, beam[..., None], axis=1)
        seqs = jax.lax.dynamic_update_slice_in_dim(seqs, tok[..., None], i, axis=2)
        flat = (jnp.arange(batch)[:, None] * width + beam).reshape(-1)
        state = jax.tree.map(lambda x: x[flat], state)
        return i + 1, tok.reshape(-1), state, seqs, log_p, was_finished | (tok == eos_id), lengths

    init = (jnp.int32(0), tokens, state, seqs, log_p, finished, lengths)
    i, _, _, seqs, log_p, finished, lengths = jax.lax.while_loop(cond, body, init)
    lengths = jnp.where(finished, lengths, i)
    scores = log_p / length_penalty_fn(lengths, length_penalty)
    best = jnp.argmax(scores, axis=1)  # [B]
    tokens = jnp.take_along_axis(seqs, best[:, None, None], axis=1)[:, 0]
    return tokens, jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0]


def per_example(fn, model: nnx.Module, *arrays):
    """``fn(model, *arrays)`` for decoding, which is independent per example.

    With inputs sharded over explicit mesh axes (``jax.make_mesh``'s default) it runs
    with those axes auto (``jax.sharding.auto_axes``: the searches gather, repeat and
    vmap in ways a sharding type cannot always express) and the model passed in as
    state, the output sharded like the first array's batch axis.
    """
    mesh = _sharding.explicit_mesh(arrays)
    if mesh is None:
        return fn(model, *arrays)
    graphdef, state = nnx.split(model)
    out = _sharding.sharding(mesh, _sharding.spec(arrays[0])[0])

    def run(state, *arrays):
        return fn(nnx.merge(graphdef, state), *arrays)

    return jax.sharding.auto_axes(run, axes=mesh.explicit_axes, out_sharding=out)(state, *arrays)
