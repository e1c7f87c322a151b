"""Masks and score modifiers as functions (FlexAttention's idea, in pure JAX).

A **mask_mod** says whether query position ``q_idx`` of head ``n`` in example ``b``
may attend to key position ``kv_idx``; a **score_mod** rewrites one scaled logit::

    mask_mod(b, n, q_idx, kv_idx) -> bool                 # True = attend
    score_mod(score, b, n, q_idx, kv_idx) -> score        # float32 in, float32 out

The arguments are int32 arrays that broadcast against each other (``b [B, 1, 1, 1]``,
``n [1, N, 1, 1]``, ``q_idx [1, 1, T, 1]``, ``kv_idx [1, 1, 1, S]`` on the dense path,
one tile at a time on the blocked path), so a mod is written as for scalars with
``jnp`` operations and is vmappable. ``b`` is the index into the flattened batch,
``n`` the query head (``0 <= n < N``), ``q_idx``/``kv_idx`` positions from 0.

Every pattern here is a :class:`Mod`: a pytree whose leaves are its arrays (segment
ids, lengths, a T5 table, ALiBi slopes), so a mask built from new data each step does
not recompile a jitted step, and a score_mod's parameters get gradients on every path.
Plain Python functions work too (their closed-over arrays are constants of the trace).

They are keyword arguments of :func:`jattn.dot_product_attention` (``mask_mod=``,
``score_mod=``, ``block_mask=``), combined with ``mask``/``is_causal``/the window/the
lengths by logical and, and with ``bias`` by addition (``score_mod`` runs first).
:func:`block_mask` evaluates a mask_mod once into the block table the blocked path
walks: it visits only the key blocks a query block can see and skips the mask on
full ones.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jattn.functional import _checks
from jattn.functional.masks import is_int
from jattn.functional.positional import relative_position_buckets

__all__ = [
    "BlockMask",
    "MaskMod",
    "Mod",
    "ScoreMod",
    "alibi",
    "and_masks",
    "as_mod",
    "bigbird",
    "block_mask",
    "causal",
    "chain_scores",
    "dilated",
    "fixed",
    "full",
    "global_tokens",
    "lengths",
    "longformer",
    "mask_grid",
    "not_mask",
    "offset",
    "or_masks",
    "per_head",
    "prefix_lm",
    "relative_position_bias",
    "segments",
    "shortcut_mask_mod",
    "sliding_window",
    "softcap",
    "strided",
]

#: ``mask_mod(b, n, q_idx, kv_idx) -> bool`` (True = attend).
MaskMod = Callable[..., jax.Array]
#: ``score_mod(score, b, n, q_idx, kv_idx) -> score``.
ScoreMod = Callable[..., jax.Array]


@jax.tree_util.register_pytree_node_class
class Mod:
    """A mask_mod or score_mod: ``fn(*params, *args)``, a pytree whose leaves are ``params``.

    ``fn`` is static (it must be a module-level function, so that equal mods hash
    alike); ``params`` are arrays, numbers or other mods. ``Mod(fn, *params)`` is how
    the patterns below are built; any function with the mod signature works as well.
    """

    def __init__(self, fn: Callable, *params: Any, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"Mod's fn must be a function, got {fn!r}{_checks.type_note(fn)}")
        self.fn = fn
        self.params = params
        self.name = name or fn.__name__.lstrip("_")

    def __call__(self, *args):
        return self.fn(*self.params, *args)

    def tree_flatten(self):
        return self.params, (self.fn, self.name)

    @classmethod
    def tree_unflatten(cls, aux, params):
        fn, name = aux
        return cls(fn, *params, name=name)

    def __repr__(self) -> str:
        return f"{self.name}(...)"


_INT32_MAX = int(np.iinfo(np.int32).max)


def _describe(x) -> str:
    """``x`` in an error message: an array's dtype and shape, else its repr and type."""
    if hasattr(x, "dtype") and hasattr(x, "shape"):
        return f"dtype {x.dtype} shape {list(x.shape)}"
    return f"{x!r}{_checks.type_note(x)}"


def _int_array(name: str, x, expected: str, *, clip=None) -> jax.Array:
    """``x`` as int32 (:func:`_checks.check_int_array`: floats are refused, not
    truncated; values beyond int32 are an error, or clipped with ``clip``), with a
    TypeError that says what ``name`` should be."""
    try:
        return _checks.check_int_array(name, x, clip=clip)
    except TypeError as e:
        dtype = getattr(x, "dtype", None)
        floating = isinstance(x, float) or (
            dtype is not None and jnp.issubdtype(dtype, np.floating)
        )
        hint = " (floats are not rounded)" if floating else ""
        raise TypeError(f"{name} must be {expected}, got {_describe(x)}{hint}") from e


def _as_index_param(name: str, x, *, lengths: bool = False):
    """An int offset/length: a Python int, or an int array of shape [] or [B].

    Checked by :func:`_checks.check_int_array`: a float is refused (never truncated) and
    a value beyond int32 is an error (not wrapped around), except for ``lengths``, which
    are clipped to ``[0, 2**31 - 1]`` (a negative length is 0, a length beyond every
    position is the whole sequence: the same mask)."""
    expected = "an int or an int array of shape [] or [B]"
    clip = (0, _INT32_MAX) if lengths else None
    if is_int(x):  # stays a Python int (an int32 array would be traced under jit)
        value = min(max(int(x), clip[0]), clip[1]) if clip else int(x)
        _checks.check_int_array(name, value)  # a ValueError beyond int32
        return value
    out = _int_array(name, x, expected, clip=clip)
    if out.ndim > 1:
        raise TypeError(f"{name} must be {expected}, got {_describe(x)}")
    return out


def _int_option(name: str, value, *, minimum: int = 1) -> int:
    """A static int option (a stride, a block size, a count): :func:`_checks.check_size`
    (never a float, str or bool) that fits int32, the dtype of the positions it is
    compared with."""
    value = _checks.check_size(name, value, minimum=minimum)
    _checks.check_int_array(name, value)  # a ValueError beyond int32
    return value


_MOD_ARGS = {4: "b, n, q_idx, kv_idx", 5: "score, b, n, q_idx, kv_idx"}


def _arity_error(name: str, fn, nargs: tuple[int, ...]) -> TypeError | None:
    """A TypeError when ``fn`` cannot be called as a mod with one of ``nargs`` positional
    arguments (4: a mask_mod, 5: a score_mod), else None (also when its signature cannot
    be read)."""
    what = " or ".join(
        f"{'a mask_mod' if k == 4 else 'a score_mod'} function ({_MOD_ARGS[k]})" for k in nargs
    )
    if not callable(fn):
        return TypeError(f"{name} must be {what}, got {_describe(fn)}")
    target, bound = (fn.fn, fn.params) if isinstance(fn, Mod) else (fn, ())
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin or C function: nothing to tell
        return None

    def binds(k):
        try:
            sig.bind(*bound, *range(k))
        except TypeError:
            return False
        return True

    if any(binds(k) for k in nargs):
        return None
    label = repr(fn) if isinstance(fn, Mod) else getattr(fn, "__name__", type(fn).__name__)
    hint = ""
    if nargs == (4,) and binds(5):
        hint = " (a score_mod, not a mask_mod?)"
    elif nargs == (5,) and binds(4):
        hint = " (a mask_mod, not a score_mod?)"
    return TypeError(
        f"{name} must be {what}, but {label} cannot be called so: its signature is "
        f"{sig}{' after its parameters' if bound else ''}{hint}"
    )


def _check_mod(name: str, fn, nargs: tuple[int, ...]) -> None:
    """A TypeError naming ``name`` unless ``fn`` is a function with the mod signature."""
    error = _arity_error(name, fn, nargs)
    if error is not None:
        raise error


def _check_finite_array(name: str, x) -> None:
    """A ValueError naming ``name`` when ``x`` is concrete and holds NaN or inf (a NaN
    parameter would turn every output into NaN without a word); traced values (learned
    parameters inside ``jit``) pass."""
    values = _checks.concrete(x)
    if values is not None and not np.isfinite(values).all():
        bad = np.argwhere(~np.isfinite(values))[0]
        where = tuple(int(i) for i in bad)
        raise ValueError(
            f"{name} must be finite, got {values[where]} at index {list(where)} "
            f"({int((~np.isfinite(values)).sum())} of {values.size} entries are NaN or inf)"
        )


def _per_b(x, b):
    """A scalar, or a ``[B]`` array read at the example index ``b``."""
    if isinstance(x, int):
        return x
    return x if x.ndim == 0 else x[b]


# ---------------------------------------------------------------------------- combinators


def _and(*args):
    mods, idx = args[:-4], args[-4:]
    out = mods[0](*idx)
    for m in mods[1:]:
        out = out & m(*idx)
    return out


def _or(*args):
    mods, idx = args[:-4], args[-4:]
    out = mods[0](*idx)
    for m in mods[1:]:
        out = out | m(*idx)
    return out


def and_masks(*mods: MaskMod) -> Mod:
    """Attend where every mask_mod says so (logical and)."""
    if not mods:
        raise ValueError("and_masks needs at least one mask_mod")
    for i, m in enumerate(mods):
        _check_mod(f"mods[{i}] of and_masks", m, (4,))
    return Mod(_and, *mods)


def or_masks(*mods: MaskMod) -> Mod:
    """Attend where any mask_mod says so (logical or)."""
    if not mods:
        raise ValueError("or_masks needs at least one mask_mod")
    for i, m in enumerate(mods):
        _check_mod(f"mods[{i}] of or_masks", m, (4,))
    return Mod(_or, *mods)


def _not(mod, b, n, q, kv):
    return ~mod(b, n, q, kv)


def not_mask(mod: MaskMod) -> Mod:
    """Attend where ``mod`` does not."""
    _check_mod("mod", mod, (4,))
    return Mod(_not, mod)


def _offset(mod, q_off, kv_off, *args):
    *score, b, n, q, kv = args  # a mask_mod's (b, n, q, kv) or a score_mod's (score, ...)
    return mod(*score, b, n, q + _per_b(q_off, b), kv + _per_b(kv_off, b))


def offset(mod: MaskMod | ScoreMod, q_offset=0, kv_offset=0) -> Mod:
    """``mod`` seen from shifted positions: ``mod(b, n, q_idx + q_offset, kv_idx + kv_offset)``
    for a mask_mod, ``mod(score, b, n, q_idx + q_offset, kv_idx + kv_offset)`` for a
    score_mod.

    For a key/value cache (queries are the last T of S positions: ``q_offset=S - T``,
    or a ``[B]`` array of cache indices) or a sequence shard (its global start).
    """
    _check_mod("mod", mod, (4, 5))
    return Mod(
        _offset, mod, _as_index_param("q_offset", q_offset), _as_index_param("kv_offset", kv_offset)
    )


def _chain(*args):
    mods, (score, b, n, q, kv) = args[:-5], args[-5:]
    for m in mods:
        score = m(score, b, n, q, kv)
    return score


def chain_scores(*mods: ScoreMod) -> Mod:
    """Score mods applied in order (the first one sees the scaled logits)."""
    if not mods:
        raise ValueError("chain_scores needs at least one score_mod")
    for i, m in enumerate(mods):
        _check_mod(f"mods[{i}] of chain_scores", m, (5,))
    return Mod(_chain, *mods)


def _per_head(*args):
    mods, (b, n, q, kv) = args[:-4], args[-4:]
    out = mods[-1](b, n, q, kv)
    for i in range(len(mods) - 2, -1, -1):  # head n uses mods[n % len(mods)]
        out = jnp.where(n % len(mods) == i, mods[i](b, n, q, kv), out)
    return out


def per_head(mods: Sequence[MaskMod]) -> Mod:
    """A different mask per head: head ``n`` uses ``mods[n % len(mods)]``.

    The blocked path computes all heads of a tile together, so it visits the union of
    the heads' blocks (each head still sees exactly its own mask).
    """
    if callable(mods) or isinstance(mods, str) or not isinstance(mods, Sequence):
        raise TypeError(
            f"mods must be a sequence of mask_mods (one per head: per_head([m0, m1])), "
            f"got {_describe(mods)}"
        )
    mods = tuple(mods)
    if not mods:
        raise ValueError("per_head needs at least one mask_mod")
    for i, m in enumerate(mods):
        _check_mod(f"mods[{i}] of per_head", m, (4,))
    return Mod(_per_head, *mods)


# ---------------------------------------------------------------------------- masks


def _full(b, n, q, kv):
    return jnp.ones(jnp.broadcast_shapes(jnp.shape(q), jnp.shape(kv)), bool)


def full() -> Mod:
    """Attend everywhere."""
    return Mod(_full)


def _causal(off, b, n, q, kv):
    return kv - q <= _per_b(off, b)  # not kv <= q + off, which overflows for a large offset


def causal(offset: int | jax.Array = 0) -> Mod:
    """Query ``q_idx`` sees keys ``kv_idx <= q_idx + offset`` (top-left aligned for 0, as
    ``is_causal=True``; ``offset=S - T`` aligns the last query with the last key;
    an ``[B]`` array: one offset per example)."""
    return Mod(_causal, _as_index_param("offset", offset))


def _window(left, right, b, n, q, kv):
    return (q - kv <= left) & (kv - q <= right)  # differences of positions never overflow


def sliding_window(window: int | tuple[int, int]) -> Mod:
    """Keys ``q_idx - left <= kv_idx <= q_idx + right`` (``local_window_size``'s rule; an
    int ``w`` means ``(w, w)``; ``(w, 0)`` is a causal local window).

    >>> import numpy as np
    >>> from jattn import mods
    >>> print(np.asarray(mods.mask_grid(mods.sliding_window((1, 0)), 1, 1, 4, 4)[0, 0]) * 1)
    [[1 0 0 0]
     [1 1 0 0]
     [0 1 1 0]
     [0 0 1 1]]
    """
    from jattn.functional.masks import _as_window

    left, right = _as_window(window)
    _checks.check_int_array("window", max(left, right))  # a ValueError beyond int32
    return Mod(_window, left, right)


def _lengths(q_len, kv_len, b, n, q, kv):
    out = True
    if q_len is not None:
        out = q < _per_b(q_len, b)
    if kv_len is not None:
        out = out & (kv < _per_b(kv_len, b))
    return out


def lengths(q_lengths=None, kv_lengths=None) -> Mod:
    """Queries ``q_idx < q_lengths[b]`` see keys ``kv_idx < kv_lengths[b]`` (either may be
    None); an int or ``[B]`` int array each."""
    q_len = None if q_lengths is None else _as_index_param("q_lengths", q_lengths, lengths=True)
    kv_len = None if kv_lengths is None else _as_index_param("kv_lengths", kv_lengths, lengths=True)
    return Mod(_lengths, q_len, kv_len)


def _prefix(prefix, b, n, q, kv):
    return (kv <= q) | (kv < _per_b(prefix, b))


def prefix_lm(prefix_lengths) -> Mod:
    """Prefix-LM: every query sees the whole prefix (``kv_idx < prefix_lengths[b]``) and
    the keys up to itself; an int or ``[B]`` int array."""
    return Mod(_prefix, _as_index_param("prefix_lengths", prefix_lengths, lengths=True))


def segments(q_segment_ids: jax.Array, kv_segment_ids: jax.Array | None = None) -> Mod:
    """Document masking for packed sequences: attend within the same segment id.

    Args:
      q_segment_ids: int ``[B, T]`` (or ``[T]`` for every example).
      kv_segment_ids: int ``[B, S]``; the query ids when None (self-attention).

    Combine with :func:`causal` for packed decoder batches
    (``and_masks(causal(), segments(ids))``). Padding can be a segment id of its own.
    """
    ids = []
    if q_segment_ids is None:  # was an IndexError
        raise TypeError("q_segment_ids must be an int array [B, T] or [T], got None")
    for name, x in (("q_segment_ids", q_segment_ids), ("kv_segment_ids", kv_segment_ids)):
        if x is None:
            ids.append(ids[0])
            continue
        expected = "an int array [B, T] or [T]"
        x = _int_array(name, x, expected)  # int64 ids beyond int32 are an error, not wrapped
        if x.ndim not in (1, 2):
            raise TypeError(f"{name} must be {expected}, got dtype {x.dtype} shape {list(x.shape)}")
        ids.append(x.reshape((1,) * (2 - x.ndim) + x.shape))
    if ids[0].shape[0] != ids[1].shape[0] and 1 not in (ids[0].shape[0], ids[1].shape[0]):
        raise ValueError(
            f"q_segment_ids {list(ids[0].shape)} and kv_segment_ids {list(ids[1].shape)} "
            "have different batch sizes"
        )
    return Mod(_segments, ids[0], ids[1])


def _segments(q_ids, kv_ids, b, n, q, kv):
    qb = 0 if q_ids.shape[0] == 1 else b
    kb = 0 if kv_ids.shape[0] == 1 else b
    return q_ids[qb, q] == kv_ids[kb, kv]


def _strided(stride, b, n, q, kv):
    return (q - kv) % stride == 0


def strided(stride: int) -> Mod:
    """Sparse Transformer's strided head: keys a multiple of ``stride`` away
    (``(q_idx - kv_idx) % stride == 0``); combine with :func:`causal` for a decoder."""
    return Mod(_strided, _int_option("stride", stride))


def _dilated(left, right, dilation, b, n, q, kv):
    d = q - kv
    steps = d // dilation  # exact where d % dilation == 0; left * dilation could overflow
    return (d % dilation == 0) & (steps <= left) & (-steps <= right)


def dilated(window: int | tuple[int, int], dilation: int) -> Mod:
    """A dilated sliding window: ``left`` keys before and ``right`` after the query, every
    ``dilation``-th position (``dilation=1`` is :func:`sliding_window`)."""
    from jattn.functional.masks import _as_window

    dilation = _int_option("dilation", dilation)
    left, right = _as_window(window)
    _checks.check_int_array("window", max(left, right))  # a ValueError beyond int32
    return Mod(_dilated, left, right, dilation)


def _fixed(block, summary, b, n, q, kv):
    return (q // block == kv // block) | (kv % block >= block - summary)


def fixed(block: int, summary: int = 1) -> Mod:
    """Sparse Transformer's fixed pattern: keys in the query's own block of ``block``
    positions, and the last ``summary`` positions of every block (combine with
    :func:`causal` for a decoder)."""
    block = _int_option("block", block)
    summary = _int_option("summary", summary)
    if summary > block:
        raise ValueError(f"summary must be <= block, got summary={summary}, block={block}")
    return Mod(_fixed, block, summary)


def _global(is_global, b, n, q, kv):
    size = is_global.shape[0]
    gq = jnp.where(q < size, is_global[jnp.minimum(q, size - 1)], False)
    gk = jnp.where(kv < size, is_global[jnp.minimum(kv, size - 1)], False)
    return gq | gk


def global_tokens(positions: Sequence[int] | jax.Array, length: int | None = None) -> Mod:
    """Global tokens: the chosen positions attend everywhere and are attended by every
    query. ``positions``: ints (with ``length``, the longest of T and S) or a boolean
    ``[length]`` array."""
    if length is not None:
        length = _int_option("length", length)
    if not isinstance(positions, jax.Array | np.ndarray):
        try:  # a list of bools is a boolean array, not the positions 0 and 1
            as_np = np.asarray(positions)
        except (TypeError, ValueError):
            as_np = None
        if as_np is not None and as_np.dtype == bool and as_np.size:
            positions = as_np
    if isinstance(positions, jax.Array | np.ndarray) and positions.dtype == bool:
        is_global = jnp.asarray(positions)
        if is_global.ndim != 1:
            raise ValueError(f"a boolean positions array must be [L], got {list(is_global.shape)}")
        if length is not None and length != is_global.shape[0]:
            raise ValueError(
                f"a boolean positions array of length {is_global.shape[0]} does not match "
                f"length={length}"
            )
    else:
        if length is None:
            raise ValueError("global_tokens needs length with integer positions")
        pos = _int_array("positions", positions, "ints or a boolean [length] array")
        pos = pos.reshape(-1)
        values = _checks.concrete(pos)
        if values is not None and values.size and (values.min() < 0 or values.max() >= length):
            raise ValueError(f"global positions must lie in [0, {length}), got {values.tolist()}")
        pos = jnp.where(pos < 0, length, pos)  # traced: out-of-range positions are dropped
        is_global = jnp.zeros((length,), bool).at[pos].set(True, mode="drop")
    return Mod(_global, is_global)


def longformer(window: int | tuple[int, int], positions, length: int | None = None) -> Mod:
    """Longformer's global + local pattern: a sliding window, plus :func:`global_tokens`."""
    return or_masks(sliding_window(window), global_tokens(positions, length))


def _bigbird(block, left, right, num_global, random_blocks, b, n, q, kv):
    qb, kb = q // block, kv // block
    local = (kb >= qb - left) & (kb <= qb + right)
    glob = (qb < num_global) | (kb < num_global)
    nq = random_blocks.shape[0]
    rows = random_blocks[jnp.minimum(qb, nq - 1)]  # [..., R]
    rand = jnp.any(rows == kb[..., None], axis=-1) & (qb < nq)
    return local | glob | rand


def bigbird(
    key: jax.Array,
    length: int,
    block: int,
    *,
    window_blocks: int = 3,
    num_global_blocks: int = 1,
    num_random_blocks: int = 2,
) -> Mod:
    """BigBird (Zaheer et al. 2020): at the granularity of ``block`` positions, each query
    block sees ``window_blocks`` blocks around itself, the first ``num_global_blocks``
    blocks (which also see everything), and ``num_random_blocks`` key blocks drawn per
    query block from ``key`` (the randomness is an argument: same key, same pattern).

    ``length``: the longest of T and S. Use ``block`` equal to the block mask's block
    size (or a multiple) so that the pattern's blocks are the kernel's tiles.
    """
    block = _int_option("block", block)
    length = _int_option("length", length)
    window_blocks = _int_option("window_blocks", window_blocks)
    if window_blocks % 2 == 0:
        raise ValueError(f"window_blocks must be odd and >= 1, got {window_blocks}")
    num_global_blocks = _int_option("num_global_blocks", num_global_blocks, minimum=0)
    num_random_blocks = _int_option("num_random_blocks", num_random_blocks, minimum=0)
    _checks.check_prng_key("key", key)
    nb = -(-length // block)
    r = int(min(num_random_blocks, nb))
    if r > 0:
        keys = jax.random.split(key, nb)
        draw = jax.vmap(lambda k: jax.random.choice(k, nb, (r,), replace=False))(keys)
    else:
        draw = jnp.full((nb, 1), -1)
    half = window_blocks // 2
    return Mod(_bigbird, block, half, half, num_global_blocks, draw.astype(jnp.int32))


# ---------------------------------------------------------------------------- score mods


def _alibi(slopes, bidirectional, score, b, n, q, kv):
    d = (kv - q).astype(jnp.float32)
    if bidirectional:
        d = -jnp.abs(d)
    return score + slopes[n] * d


def alibi(slopes: jax.Array, *, bidirectional: bool = False) -> Mod:
    """ALiBi (Press et al. 2022): ``score + slopes[n] * (kv_idx - q_idx)``, or
    ``- slopes[n] * |kv_idx - q_idx|`` when ``bidirectional`` (as
    :func:`jattn.alibi_bias`, without its ``[N, T, S]`` array). ``slopes``: ``[N]``,
    e.g. :func:`jattn.alibi_slopes`; learnable (it gets gradients)."""
    slopes = _checks.as_array("slopes", slopes)
    if slopes.ndim != 1 or not jnp.issubdtype(slopes.dtype, jnp.floating):
        raise ValueError(
            f"slopes must be a float [N] array, got {slopes.dtype} {list(slopes.shape)}"
        )
    _check_finite_array("slopes", slopes)
    bidirectional = _checks.check_flag("bidirectional", bidirectional)
    return Mod(_alibi, slopes, _Static(bidirectional))


@jax.tree_util.register_pytree_node_class
class _Static:
    """A static option stored among a mod's params (a pytree with no leaves)."""

    def __init__(self, value):
        self.value = value

    def __bool__(self):
        return bool(self.value)

    def tree_flatten(self):
        return (), self.value

    @classmethod
    def tree_unflatten(cls, value, _):
        return cls(value)


def _t5(table, cfg, score, b, n, q, kv):
    bidirectional, num_buckets, max_distance = cfg.value
    buckets = relative_position_buckets(
        kv - q, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    return score + table[buckets, n].astype(jnp.float32)


def relative_position_bias(
    table: jax.Array,
    *,
    bidirectional: bool = True,
    num_buckets: int | None = None,
    max_distance: int = 128,
) -> Mod:
    """T5's learned relative position bias: ``score + table[bucket(kv_idx - q_idx), n]``.

    ``table``: float ``[num_buckets, N]`` (the learnable parameter; it gets gradients
    through every path); buckets as :func:`jattn.relative_position_buckets`.
    """
    table = _checks.as_array("table", table)
    if table.ndim != 2 or not jnp.issubdtype(table.dtype, jnp.floating):
        raise ValueError(
            f"table must be a float [num_buckets, N] array, got {table.dtype} {list(table.shape)}"
        )
    _check_finite_array("table", table)
    if num_buckets is None:
        num_buckets = table.shape[0]
    num_buckets = _checks.check_size("num_buckets", num_buckets)
    if num_buckets != table.shape[0]:
        raise ValueError(f"table has {table.shape[0]} buckets, num_buckets={num_buckets}")
    relative_position_buckets(  # checks the bucket configuration now, not at trace time
        jnp.zeros((), jnp.int32), bidirectional=bidirectional, num_buckets=num_buckets,
        max_distance=max_distance,
    )  # fmt: skip
    return Mod(_t5, table, _Static((bool(bidirectional), int(num_buckets), int(max_distance))))


def _indexed_arrays(mod) -> list[tuple[str, str, int]]:
    """``(what, axis, count)`` of each array axis inside ``mod`` (a :class:`Mod`, through
    its combinators) that is read at an index of the call: ``"heads"`` at the query head
    ``n`` (ALiBi slopes, a T5 table's columns), ``"batch"`` at the example ``b`` (``[B]``
    offsets and lengths, segment ids' rows), ``"queries"``/``"keys"`` at ``q_idx`` and
    ``kv_idx`` (segment ids' columns; not under :func:`offset`, whose shifted positions
    the call's T and S do not bound). A mod that maps ``n`` to other heads (a sequence
    shard's global heads) is not looked into."""
    found = []

    def per_example(what, x):
        if getattr(x, "ndim", 0) == 1:
            found.append((what, "batch", x.shape[0]))

    def walk(m, positions=True):
        if not isinstance(m, Mod) or getattr(m.fn, "remaps_heads", False):
            return
        params = m.params
        if m.fn is _alibi:
            found.append(("alibi's slopes", "heads", params[0].shape[0]))
        elif m.fn is _t5:
            found.append(
                ("relative_position_bias's table (its columns)", "heads", params[0].shape[1])
            )
        elif m.fn is _causal:
            per_example("causal's offset", params[0])
        elif m.fn is _lengths:
            per_example("lengths' q_lengths", params[0])
            per_example("lengths' kv_lengths", params[1])
        elif m.fn is _prefix:
            per_example("prefix_lm's prefix_lengths", params[0])
        elif m.fn is _offset:
            per_example("offset's q_offset", params[1])
            per_example("offset's kv_offset", params[2])
            positions = False
        elif m.fn is _segments:
            for ids, side, axis in ((params[0], "q", "queries"), (params[1], "kv", "keys")):
                if ids.shape[0] != 1:
                    found.append(
                        (f"segments' {side}_segment_ids (its rows)", "batch", ids.shape[0])
                    )
                if positions:
                    found.append(
                        (f"segments' {side}_segment_ids (its columns)", axis, ids.shape[1])
                    )
        elif (  # built for length: past it, no random blocks (block traced under jit: unknown)
            m.fn is _bigbird and positions and not isinstance(params[0], jax.core.Tracer)
        ):
            covered = params[4].shape[0] * int(params[0])  # query blocks drawn x block
            what = f"bigbird's random blocks (built with length <= {covered})"
            found.extend([(what, "queries", covered), (what, "keys", covered)])
        for p in params:
            walk(p, positions)

    walk(mod)
    return found


def check_shapes(
    name: str, mod, batch: int, num_heads: int, t: int, s: int, *, positions_only: bool = False
) -> None:
    """A ValueError when an array of ``mod`` read at an index of the call (see
    :func:`_indexed_arrays`) does not fit it: one entry per query head (exactly N), per
    example (B, or 1 for all), or per position (at least T or S). JAX clamps an index
    past the end of an array, so a short one would silently reuse its last entry (and
    a longer per-head or per-example one leave entries unused)."""
    sizes = {"heads": num_heads, "batch": batch, "queries": t, "keys": s}
    for what, axis, count in _indexed_arrays(mod):
        if positions_only and axis not in ("queries", "keys"):
            continue
        size = sizes[axis]
        if axis == "heads" and count != size:
            raise ValueError(
                f"{name}: {what} has {count} entries, one per query head, but the call has "
                f"N={size} query heads"
            )
        if axis == "batch" and count not in (1, size):
            raise ValueError(
                f"{name}: {what} has {count} entries, one per example, but the call has "
                f"B={size} examples (flattened); give B entries, or 1 (or a scalar) for all"
            )
        if axis in ("queries", "keys") and count < size:
            letter = "T" if axis == "queries" else "S"
            raise ValueError(
                f"{name}: {what} has {count} positions, but the call has {letter}={size} "
                f"{axis}: give one per position"
            )


def _softcap(cap, score, b, n, q, kv):
    return cap * jnp.tanh(score / cap)


def softcap(cap: float) -> Mod:
    """tanh soft-capping of the logits (Gemma 2, Grok): ``cap * tanh(score / cap)``."""
    cap = _checks.check_finite_scalar("cap", cap)  # NaN and inf: every logit NaN
    if not cap > 0:
        raise ValueError(f"cap must be a positive number, got {cap!r}")
    return Mod(_softcap, cap)


def as_mod(fn: Callable, example: Sequence | None = None) -> Mod:
    """A mask_mod or score_mod as a :class:`Mod`: a pytree that ``jit`` and the blocked
    path's custom VJP take as an argument (a plain function, also one among a Mod's
    parameters, is not). Without ``example`` a plain function becomes a static ``Mod``;
    with ``example`` (arguments of the shapes it will be called with) its closed-over
    float arrays are hoisted into its parameters (:func:`jax.closure_convert`), so
    they get gradients."""
    if isinstance(fn, Mod):  # a plain function among its parameters: converted
        return jax.tree.map(
            lambda x: as_mod(x, example) if callable(x) and not hasattr(x, "dtype") else x, fn
        )
    if not callable(fn):
        raise TypeError(f"fn must be a mask_mod or score_mod function, got {_describe(fn)}")
    if example is None:
        return Mod(fn, name=getattr(fn, "__name__", "mask_mod"))
    try:
        converted, consts = jax.closure_convert(fn, *example)
    except TypeError:
        name = {4: "mask_mod", 5: "score_mod"}.get(len(example), "fn")
        error = _arity_error(name, fn, (len(example),))
        if error is not None:  # the call failed for its signature: say so
            raise error from None
        raise
    return Mod(functools.partial(_converted, converted, len(consts)), *consts,
                    name=getattr(fn, "__name__", "mod"))  # fmt: skip


def _converted(fn, nconsts, *args):
    consts, args = args[:nconsts], args[nconsts:]
    return fn(*args, *consts)


# ---------------------------------------------------------------------------- evaluation


def grid(batch: int, heads: int | tuple[int, ...], t: int, s: int, q0=0, kv0=0):
    """The int32 index arrays a mod is called with, broadcasting to ``[B, *heads, T, S]``:
    ``b [B, 1.., 1, 1]``, ``n [1, *heads, 1, 1]`` (the query head, ``heads`` = N or
    ``(K, G)`` for grouped heads: ``n = k * G + g``), ``q_idx [1, 1.., T, 1]`` from ``q0``
    and ``kv_idx [1, 1.., 1, S]`` from ``kv0`` (a tile's offsets)."""
    i32 = jnp.int32
    heads = (heads,) if isinstance(heads, int) else tuple(heads)
    ones = (1,) * len(heads)
    return (
        jnp.arange(batch, dtype=i32).reshape((batch,) + ones + (1, 1)),
        jnp.arange(math.prod(heads), dtype=i32).reshape((1,) + heads + (1, 1)),
        (q0 + jnp.arange(t, dtype=i32)).reshape((1,) + ones + (t, 1)),
        (kv0 + jnp.arange(s, dtype=i32)).reshape((1,) + ones + (1, s)),
    )


def _call(name: str, fn, *args) -> jax.Array:
    """``fn(*args)`` as an array; a TypeError naming ``name`` when ``fn`` cannot be called
    with the mod signature, or returns something that is not an array."""
    try:
        out = fn(*args)
    except TypeError:
        error = _arity_error(name, fn, (len(args),))
        if error is not None:  # the call failed for its signature: say so
            raise error from None
        raise  # a TypeError of the function's own
    try:
        return jnp.asarray(out)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must return an array, got {_describe(out)}") from None


def call_mask(mask_mod: MaskMod, b, n, q, kv) -> jax.Array:
    """``mask_mod(b, n, q, kv)`` checked: boolean, broadcasting to the indices' shape."""
    out = _call("mask_mod", mask_mod, b, n, q, kv)
    target = jnp.broadcast_shapes(*(jnp.shape(x) for x in (b, n, q, kv)))
    if out.dtype != jnp.bool_:
        raise TypeError(f"mask_mod must return booleans (True = attend), got dtype {out.dtype}")
    try:
        if jnp.broadcast_shapes(out.shape, target) != target:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"mask_mod returned shape {list(out.shape)}, which does not broadcast to the "
            f"index shape {list(target)}: it must be elementwise in (b, n, q_idx, kv_idx)"
        ) from None
    return out


def call_score(score_mod: ScoreMod, score, b, n, q, kv) -> jax.Array:
    """``score_mod(score, b, n, q, kv)`` checked: float32 of the score's shape."""
    out = _call("score_mod", score_mod, score, b, n, q, kv)
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"score_mod must return floats, got dtype {out.dtype}")
    try:
        same = jnp.broadcast_shapes(out.shape, score.shape) == score.shape
    except ValueError:  # shapes that do not broadcast at all
        same = False
    if not same:
        raise ValueError(
            f"score_mod returned shape {list(out.shape)} for scores of shape "
            f"{list(score.shape)}: it must be elementwise"
        )
    return jnp.broadcast_to(out.astype(jnp.float32), score.shape)


def mask_grid(mask_mod: MaskMod, batch: int, heads: int, t: int, s: int) -> jax.Array:
    """The dense boolean mask ``[B|1, N|1, T, S]`` of a mask_mod (for references and
    plots; size-1 axes where the mod does not depend on ``b`` or ``n``)."""
    _check_mod("mask_mod", mask_mod, (4,))
    batch, heads, t, s = (
        _int_option(name, x) for name, x in (("batch", batch), ("heads", heads), ("t", t), ("s", s))
    )
    from jattn.functional import _eager  # it imports this module

    # eager: one cached program (op by op, a five-pattern per_head mod took 2.2 s)
    return _eager.run(_mask_grid, (mask_mod,), batch, heads, t, s)


def _mask_grid(mask_mod, batch, heads, t, s):
    out = call_mask(mask_mod, *grid(batch, heads, t, s))
    return out.reshape((1,) * (4 - out.ndim) + out.shape)


# ---------------------------------------------------------------------------- block masks


@jax.tree_util.register_pytree_node_class
class BlockMask:
    """Which key blocks each query block visits, for one mask_mod and one geometry.

    Built by :func:`block_mask`. For query block ``i`` the blocked path visits
    ``kv_indices[i, :kv_num_partial[i]]`` (partial blocks: the mask is evaluated on
    the tile) and then ``kv_indices[i, kv_num_partial[i]:kv_num_partial[i] +
    kv_num_full[i]]`` (full blocks: no mask); empty blocks are never visited. The
    backward pass walks the transposed table (``q_indices``, ...). ``block_map``
    ``[B|1, N|1, nq, nk]`` int8 holds 0 (empty), 1 (partial), 2 (full) per example and
    head; the tables are the union over them (the kernel computes all heads of a tile
    together). Metadata grows with ``(T / block) ** 2``, never ``T * S``. ``varies``:
    whether the mask_mod depends on the example ``b`` and on the head ``n``; a block
    mask built for one example (or head) of a mask that varies is refused for more.

    A pytree (the arrays and the mask_mod's arrays are leaves): build it once outside
    ``jit`` and pass it to every layer and step.
    """

    def __init__(self, mask_mod, seq_lengths, block_sizes, kv_indices, kv_num_partial,
                 kv_num_full, q_indices, q_num_partial, q_num_full, block_map,
                 varies=(False, False)):  # fmt: skip
        self.mask_mod = mask_mod
        self.varies = tuple(varies)
        self.seq_lengths = tuple(seq_lengths)
        self.block_sizes = tuple(block_sizes)
        self.kv_indices = kv_indices
        self.kv_num_partial = kv_num_partial
        self.kv_num_full = kv_num_full
        self.q_indices = q_indices
        self.q_num_partial = q_num_partial
        self.q_num_full = q_num_full
        self.block_map = block_map

    _ARRAYS = ("kv_indices", "kv_num_partial", "kv_num_full", "q_indices", "q_num_partial",
               "q_num_full", "block_map")  # fmt: skip

    def tree_flatten(self):
        return (self.mask_mod, *(getattr(self, a) for a in self._ARRAYS)), (
            self.seq_lengths,
            self.block_sizes,
            self.varies,
        )

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux[:2], *children[1:], varies=aux[2])

    @property
    def shape(self) -> tuple[int, int]:
        """``(T, S)``: the lengths this block mask was built for."""
        return self.seq_lengths

    def density(self) -> jax.Array:
        """The fraction of ``(query block, key block)`` tiles visited."""
        nq, nk = self.kv_indices.shape
        return jnp.sum(self.kv_num_partial + self.kv_num_full) / (nq * nk)

    def __repr__(self) -> str:
        (t, s), (bq, bk) = self.seq_lengths, self.block_sizes
        return f"BlockMask(mask_mod={self.mask_mod!r}, T={t}, S={s}, blocks=({bq}, {bk}))"


def _table(kind):
    """From ``kind [rows, cols]`` (0 empty, 1 partial, 2 full): indices ``[rows, cols]``
    (partial columns first, then full ones, then the rest), and the two counts."""
    cols = kind.shape[1]
    order = jnp.where(kind == 1, 0, jnp.where(kind == 2, 1, 2))  # partial, full, empty
    idx = jnp.argsort(order * cols + jnp.arange(cols)[None, :], axis=1).astype(jnp.int32)
    return (
        idx,
        jnp.sum(kind == 1, axis=1, dtype=jnp.int32),
        jnp.sum(kind == 2, axis=1, dtype=jnp.int32),
    )


def _kinds(mask_mod, batch, heads, t, s, bq, bk):
    """``[B|1, N|1, nq, nk]`` int8: 0 empty, 1 partial, 2 full, one query block row at a
    time (``[B, N, bq, S]`` of mask in memory, never ``[T, S]``)."""
    nq, nk = -(-t // bq), -(-s // bk)
    b, n, _, kv = grid(batch, heads, 1, nk * bk)
    real_k = kv < s

    def row(i):
        q = i * bq + jnp.arange(bq, dtype=jnp.int32).reshape(1, 1, bq, 1)
        m = call_mask(mask_mod, b, n, q, kv) & real_k
        m = jnp.broadcast_to(m, m.shape[:-2] + (bq, nk * bk))
        m = m.reshape(m.shape[:-2] + (bq, nk, bk))
        real_q = (q < t).reshape(1, 1, bq, 1, 1)
        any_ = jnp.any(m & real_q, axis=(-3, -1))
        all_ = jnp.all(m | ~real_q, axis=(-3, -1))  # padding keys are False: never full
        return jnp.where(all_, 2, jnp.where(any_, 1, 0)).astype(jnp.int8)  # [B|1, N|1, nk]

    kinds = jax.lax.map(row, jnp.arange(nq, dtype=jnp.int32))  # [nq, B|1, N|1, nk]
    return jnp.moveaxis(kinds, 0, -2)


def block_mask(
    mask_mod: MaskMod,
    q_len: int,
    kv_len: int,
    block_sizes: tuple[int, int] | str | None = None,
    *,
    batch: int = 1,
    heads: int = 1,
) -> BlockMask:
    """Evaluates ``mask_mod`` once into a :class:`BlockMask` for T = ``q_len`` queries and
    S = ``kv_len`` keys in tiles of ``block_sizes = (block_q, block_kv)``.

    ``block_sizes=None`` chooses them from the pattern when T and S are at least 1024
    and the mask_mod holds no arrays (a pattern of positions only: causal, windows,
    strided, ...): the mask is evaluated in 32 x 32 tiles and the candidate sizes
    (:data:`jattn.functional.tiles.CANDIDATES`) are scored by the scores their tiles
    would visit times their measured cost per score, so a narrow window gets small
    tiles and a dense pattern large ones. The choice is the same under ``jit``. A
    mask_mod with arrays (segment ids, lengths, BigBird's random blocks) gets
    ``(512, 256)``, as do shorter sequences, so a compiled step does not change with
    the data; ``block_sizes="auto"`` chooses for it too, from its values when they are
    known (for data fixed per model, such as BigBird's random blocks: the tile sizes
    are static, so a choice that changes between batches recompiles the step).

    ``batch`` and ``heads``: B (flattened) and N, needed when the mask_mod depends on
    ``b`` or ``n`` (segment ids or lengths per example, :func:`per_head`): a call with
    more examples or heads than the block mask was built for is then refused. Works
    eagerly or under ``jit`` (a traced mask_mod, e.g. segment ids of this batch, gives a
    traced table). The cost is one evaluation of the mask_mod per (query, key) pair, a query
    block at a time; the result is ``O((T / block_q) * (S / block_kv))``.

    A causal mask in 4 x 4 tiles: on the diagonal the tiles are partial (1), below it
    full (2), above it empty (0, never visited):

    >>> import numpy as np
    >>> from jattn import mods
    >>> bm = block_mask(mods.causal(), 12, 12, (4, 4))
    >>> print(np.asarray(bm.block_map[0, 0]))
    [[1 0 0]
     [2 1 0]
     [2 2 1]]
    """
    sizes = (("q_len", q_len), ("kv_len", kv_len), ("batch", batch), ("heads", heads))
    q_len, kv_len, batch, heads = (_int_option(name, x) for name, x in sizes)
    _check_mod("mask_mod", mask_mod, (4,))
    if block_sizes not in (None, "auto") and (
        not isinstance(block_sizes, tuple | list)
        or len(block_sizes) != 2
        or not all(is_int(x) and x > 0 for x in block_sizes)
    ):
        raise ValueError(
            f"block_sizes must be a pair of positive ints, None or 'auto', got {block_sizes!r}"
        )
    mask_mod = as_mod(mask_mod)  # a pytree all the way down (a BlockMask goes through jit)
    # its per-position arrays fit T and S now, not at the first call (batch and heads
    # may legitimately be left at 1: a pattern the same for all)
    check_shapes("mask_mod", mask_mod, batch, heads, q_len, kv_len, positions_only=True)
    kinds = None
    if block_sizes in (None, "auto"):
        with_data = block_sizes == "auto"
        block_sizes, kinds = _auto_blocks(mask_mod, batch, heads, q_len, kv_len, None, with_data)
    return _block_mask(mask_mod, q_len, kv_len, block_sizes or (512, 256), batch, heads, kinds)


def _block_mask(mask_mod, q_len, kv_len, block_sizes, batch, heads, kinds=None):
    """:func:`block_mask` after its checks, from the block ``kinds`` when known."""
    bq, bk = min(int(block_sizes[0]), q_len), min(int(block_sizes[1]), kv_len)
    if kinds is None:
        kinds = _kinds_jit(mask_mod, int(batch), int(heads), int(q_len), int(kv_len), bq, bk)
    varies = _varies(mask_mod)
    return BlockMask(mask_mod, (q_len, kv_len), (bq, bk), *_tables(kinds), kinds, varies)


def _varies(mask_mod) -> tuple[bool, bool]:
    """Whether ``mask_mod`` depends on the example index ``b`` and on the head ``n``:
    whether its result on two examples and two heads keeps those axes (traced only)."""
    shape = jax.eval_shape(lambda m: call_mask(m, *grid(2, 2, 1, 1)), mask_mod).shape
    shape = (1,) * (4 - len(shape)) + tuple(shape)
    return shape[0] > 1, shape[1] > 1


@jax.jit  # one program: eagerly, op by op, a new shape compiled 17 (about 0.7 s)
def _tables(kinds):
    """The tables of :class:`BlockMask` from ``kinds [B|1, N|1, nq, nk]``: the union over
    examples and heads (visit if any visits, full only if all are full), by rows
    (``kv_indices``, ``kv_num_partial``, ``kv_num_full``) and by columns (``q_...``)."""
    visit, full_ = jnp.any(kinds > 0, axis=(0, 1)), jnp.all(kinds == 2, axis=(0, 1))
    union = jnp.where(full_, 2, jnp.where(visit, 1, 0))
    return (*_table(union), *_table(union.T))


#: A Mod is a pytree: its arrays are arguments, so new data (segment ids) does not recompile.
_kinds_jit = jax.jit(_kinds, static_argnums=(1, 2, 3, 4, 5, 6))


def _pool(kinds: np.ndarray, rq: int, rk: int) -> np.ndarray:
    """Block kinds for tiles ``rq x rk`` times larger, from ``kinds [B|1, N|1, nq, nk]``
    (NumPy): visited if any part is, full if every part is (padding queries past the
    last block keep a tile full, padding keys never do)."""
    nq, nk = kinds.shape[-2:]
    pq, pk = -nq % rq, -nk % rk
    pad = ((0, 0), (0, 0), (0, pq), (0, 0))
    visit = np.pad(kinds > 0, pad, constant_values=False)
    full_ = np.pad(kinds == 2, pad, constant_values=True)
    pad = ((0, 0), (0, 0), (0, 0), (0, pk))
    visit, full_ = (np.pad(x, pad, constant_values=False) for x in (visit, full_))
    shape = kinds.shape[:2] + ((nq + pq) // rq, rq, (nk + pk) // rk, rk)
    visit = visit.reshape(shape).any(axis=(3, 5))
    full_ = full_.reshape(shape).all(axis=(3, 5))
    return np.where(full_, 2, np.where(visit, 1, 0)).astype(np.int8)


def _auto_blocks(mask_mod, batch, heads, t, s, max_tile=None, with_data=False):
    """``(block_sizes, kinds)`` of the cheapest candidate for this mask
    (:func:`jattn.functional.tiles.cheapest`), or ``(None, None)`` for T or S under
    1024 or a traced mask (not known until the call runs). ``max_tile``: the largest
    ``block_q * block_kv`` allowed."""
    from jattn.functional import tiles

    has_data = any(hasattr(x, "shape") for x in jax.tree.leaves(mask_mod))
    if min(t, s) < 1024 or (has_data and not with_data):
        return None, None  # short, or data in the mask: a choice must not vary with data
    with jax.ensure_compile_time_eval():
        fine = _kinds_jit(mask_mod, int(batch), int(heads), int(t), int(s), tiles.FINE, tiles.FINE)
    if isinstance(fine, jax.core.Tracer):
        return None, None
    fine = np.asarray(fine)
    pooled, visited = {}, {}
    for bq, bk in tiles.CANDIDATES:
        if bq > t or bk > s or (max_tile is not None and bq * bk > max_tile):
            continue
        kinds = _pool(fine, bq // tiles.FINE, bk // tiles.FINE)
        pooled[bq, bk] = kinds
        visited[bq, bk] = int(kinds.any(axis=(0, 1)).sum()) * bq * bk
    if not visited:
        return None, None
    best = tiles.cheapest(visited)
    return best, jnp.asarray(pooled[best])


def spec_mask_mod(spec) -> MaskMod | None:
    """The mask_mod of a checked call (:class:`jattn.functional._checks.AttentionSpec`):
    :func:`shortcut_mask_mod` of its ``is_causal``, window and lengths, and its
    ``mask_mod``; None when there is none of them."""
    return shortcut_mask_mod(
        spec.is_causal,
        spec.window,
        spec.query_seq_lengths,
        spec.key_value_seq_lengths,
        spec.mask_mod,
    )


def shortcut_mask_mod(is_causal, window, q_lengths, kv_lengths, mask_mod=None):
    """The jax.nn-compatible shortcuts as mask_mods: ``is_causal`` is :func:`causal`, a
    window :func:`sliding_window`, the lengths :func:`lengths`; with ``mask_mod``, all
    combined by logical and. None when there is none of them. Every path evaluates the
    shortcuts through this one rule."""
    parts = []
    if is_causal:
        parts.append(causal())
    if window is not None:
        parts.append(sliding_window(window))
    if q_lengths is not None or kv_lengths is not None:
        parts.append(lengths(q_lengths, kv_lengths))
    if mask_mod is not None:
        parts.append(mask_mod)
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else and_masks(*parts)
