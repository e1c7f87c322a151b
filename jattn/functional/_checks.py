"""Trace-time validation at the public boundary: errors name the shapes and what was expected."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jattn.functional.masks import _as_window, broadcasts_to, check_bool_mask, is_int
from jattn.functional.softmax import check_fully_masked


def check_positive_int(name: str, value) -> int:
    """``value`` as an int; a ValueError naming ``name`` unless it is a positive int."""
    if not is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def fmt(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def as_array(name: str, x) -> jax.Array:
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:  # e.g. a str, a dict, or None
        raise TypeError(f"{name} must be an array, got {type(x).__name__}") from e


def concrete(x) -> np.ndarray | None:
    """``x``'s values when they are known (outside ``jax.jit``), else None: values can
    only be checked on concrete inputs."""
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def check_scale(scale):
    """``scale`` as a static Python float (or None). A 0-d array is accepted when its
    value is known, as ``jax.nn.dot_product_attention`` accepts one; the blocked and
    kernel paths need the value at trace time, so a traced scale is a TypeError."""
    if scale is None or (isinstance(scale, numbers.Real) and not isinstance(scale, bool)):
        return scale
    if isinstance(scale, jax.Array | np.ndarray) and scale.ndim == 0:
        value = concrete(scale)
        if value is None:
            raise TypeError(
                "scale must be known at trace time, got a traced array; scale the query "
                "instead (dot_product_attention(query * s, ..., scale=1.0))"
            )
        if jnp.issubdtype(value.dtype, np.floating) or jnp.issubdtype(value.dtype, np.integer):
            return float(value)
    raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")


def check_float(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")


def check_broadcast(name: str, x: jax.Array, target: Sequence[int], letters: str) -> None:
    if not broadcasts_to(x.shape, target):
        raise ValueError(
            f"{name} of shape {fmt(x.shape)} does not broadcast to {letters} = {fmt(target)}"
        )


def check_qkv(query: jax.Array, key: jax.Array, value: jax.Array, *, same_head_dim: bool):
    """Checks ``query [..., T, N, H]``, ``key [..., S, K, H']``, ``value [..., S, K, Hv]``."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim < 3:
            letters = "[..., T, N, H]" if name == "query" else "[..., S, K, H]"
            raise ValueError(f"{name} must have shape {letters} (rank >= 3), got {fmt(x.shape)}")
        check_float(name, x)
    if not (query.ndim == key.ndim == value.ndim):
        raise ValueError(
            "query, key and value must have the same rank, got query "
            f"{fmt(query.shape)}, key {fmt(key.shape)}, value {fmt(value.shape)}"
        )
    if not (query.shape[:-3] == key.shape[:-3] == value.shape[:-3]):
        raise ValueError(
            "query, key and value batch dimensions differ: query "
            f"{fmt(query.shape)}, key {fmt(key.shape)}, value {fmt(value.shape)}"
        )
    if key.shape[-3] != value.shape[-3]:
        raise ValueError(
            f"key and value lengths differ: key {fmt(key.shape)}, value {fmt(value.shape)}"
        )
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(
            f"key and value head counts differ: key {fmt(key.shape)}, value {fmt(value.shape)}"
        )
    n, k = query.shape[-2], key.shape[-2]
    if n == 0 or k == 0 or n % k != 0:
        raise ValueError(
            f"the number of query heads N={n} must be a multiple of the number of key/value "
            f"heads K={k}: query {fmt(query.shape)}, key {fmt(key.shape)}"
        )
    if query.shape[-1] == 0:
        raise ValueError(f"the head dim H of query {fmt(query.shape)} must be > 0")
    if same_head_dim and query.shape[-1] != key.shape[-1]:
        raise ValueError(
            "query and key head dims differ: query "
            f"{fmt(query.shape)}, key {fmt(key.shape)} (the last axis H must match)"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(
            f"query, key and value dtypes differ: {query.dtype}, {key.dtype}, {value.dtype}"
        )


def check_seq_lengths(name: str, x, batch_shape: tuple[int, ...]) -> jax.Array | None:
    if x is None:
        return None
    x = as_array(name, x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")
    if not batch_shape and x.shape == (1,):  # jax.nn's [B] = [1] for unbatched [T, N, H] inputs
        x = x.reshape(())
    if not broadcasts_to(x.shape, batch_shape) or (x.ndim == 1 and not batch_shape):
        raise ValueError(
            f"{name} of shape {fmt(x.shape)} must have (or broadcast to) the batch shape of "
            f"query {fmt(batch_shape)} (one length per example)"
        )
    return x


def check_dropout(rate, rng) -> float:
    # A static Python or NumPy number (np.float32 is not a float subclass); not a bool.
    if isinstance(rate, jax.core.Tracer):
        raise TypeError(
            "dropout_rate must be a static Python float (it decides whether dropout runs), "
            "got a traced value; under jax.jit close over it or mark it static"
        )
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate must be a float in [0, 1), got {rate!r}")
    if rate > 0.0 and rng is None:
        raise ValueError(f"dropout_rate={rate} needs a dropout_rng (a PRNG key)")
    return float(rate)


def check_flags(**flags) -> None:
    """:func:`check_flag` on each keyword argument."""
    for name, value in flags.items():
        check_flag(name, value)


def check_flag(name: str, value) -> bool:
    """A static bool option (``is_causal``): a TypeError for anything else, traced included."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a static Python bool (it sets the shape of the computation), got "
            "a traced value; under jax.jit close over it or mark it static"
        )
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


#: The keyword options of ``dot_product_attention`` (its defaults; tests check they
#: match its signature). :func:`jattn.functional.dispatch.select` and the kernels'
#: runners fill in the ones left out from here.
OPTION_DEFAULTS = {
    "scale": None,
    "is_causal": False,
    "query_seq_lengths": None,
    "key_value_seq_lengths": None,
    "local_window_size": None,
    "dropout_rate": 0.0,
    "dropout_rng": None,
    "fully_masked": "zeros",
    "return_weights": False,
    "return_residual": False,
    "mask_mod": None,
    "score_mod": None,
    "block_mask": None,
}


class AttentionSpec(NamedTuple):
    """One validated batched attention call: what every path (dense, blocked, cuDNN,
    Pallas) takes. Built once at the public boundary by :func:`check_attention_inputs`;
    lengths are flattened to ``[B]`` int32 (clipped to ``[0, T]`` / ``[0, S]``)."""

    query: jax.Array
    key: jax.Array
    value: jax.Array
    bias: jax.Array | None
    mask: jax.Array | None
    batch_shape: tuple[int, ...]
    query_seq_lengths: jax.Array | None
    key_value_seq_lengths: jax.Array | None
    window: tuple[int, int] | None
    dropout_rate: float
    dropout_rng: jax.Array | None = None
    is_causal: bool = False
    scale: float | None = None
    fully_masked: str = "zeros"
    return_residual: bool = False
    mask_mod: Any = None
    score_mod: Any = None
    block_mask: Any = None

    def options(self) -> dict:
        """The keyword options of ``dot_product_attention`` this spec stands for, with
        the lengths in the batch shape (as the kernels' runners take them)."""
        lengths = {
            name: None if x is None else x.reshape(self.batch_shape)
            for name, x in (
                ("query_seq_lengths", self.query_seq_lengths),
                ("key_value_seq_lengths", self.key_value_seq_lengths),
            )
        }
        return dict(
            scale=self.scale,
            is_causal=self.is_causal,
            local_window_size=self.window,
            dropout_rate=self.dropout_rate,
            dropout_rng=self.dropout_rng,
            fully_masked=self.fully_masked,
            return_residual=self.return_residual,
            **lengths,
        )


def check_attention_inputs(
    query,
    key,
    value,
    bias,
    mask,
    *,
    same_head_dim: bool,
    query_seq_lengths,
    key_value_seq_lengths,
    local_window_size,
    dropout_rate,
    dropout_rng,
    fully_masked: str,
    is_causal: bool = False,
    scale=None,
    return_residual: bool = False,
    mask_mod=None,
    score_mod=None,
    block_mask=None,
) -> AttentionSpec:
    """The checks every batched attention call makes once, at its public boundary, and
    the :class:`AttentionSpec` that every path takes. Each rule is written here once."""
    check_flags(is_causal=is_causal, return_residual=return_residual)
    scale = check_scale(scale)
    query, key, value = (
        as_array(n, x) for n, x in (("query", query), ("key", key), ("value", value))
    )
    check_qkv(query, key, value, same_head_dim=same_head_dim)
    check_fully_masked(fully_masked)
    dropout_rate = check_dropout(dropout_rate, dropout_rng)
    window = None if local_window_size is None else _as_window(local_window_size)
    batch_shape = tuple(query.shape[:-3])
    target = batch_shape + (query.shape[-2], query.shape[-3], key.shape[-3])
    letters = "[..., N, T, S]"
    if mask is not None:
        hint = "pass additive float masks as bias"
        mask = check_bool_mask("mask", as_array("mask", mask), hint=hint)
        check_broadcast("mask", mask, target, letters)
    if bias is not None:
        bias = as_array("bias", bias)
        check_float("bias", bias)
        check_broadcast("bias", bias, target, letters)
    lengths = []
    for name, x in (
        ("query_seq_lengths", query_seq_lengths),
        ("key_value_seq_lengths", key_value_seq_lengths),
    ):
        x = check_seq_lengths(name, x, batch_shape)
        if x is not None:
            # clipped to [0, T or S] before int32, so no length (uint32, int64) wraps around
            bound = query.shape[-3] if name == "query_seq_lengths" else key.shape[-3]
            x = jnp.clip(x, 0, min(bound, int(jnp.iinfo(x.dtype).max))).astype(jnp.int32)
            x = jnp.broadcast_to(x, batch_shape).reshape(-1)  # [B]
        lengths.append(x)
    mask_mod = check_mods(mask_mod, score_mod, block_mask, query, key)
    return AttentionSpec(
        query,
        key,
        value,
        bias,
        mask,
        batch_shape,
        *lengths,
        window,
        dropout_rate,
        dropout_rng if dropout_rate > 0.0 else None,
        bool(is_causal),
        scale,
        fully_masked,
        bool(return_residual),
        mask_mod,
        score_mod,
        block_mask,
    )


def check_mods(mask_mod, score_mod, block_mask, query, key):
    """Checks ``mask_mod``, ``score_mod`` and ``block_mask`` against the call; returns
    the mask_mod to apply (the block mask's own when only the block mask is given)."""
    for name, fn, args in (
        ("mask_mod", mask_mod, "b, n, q_idx, kv_idx"),
        ("score_mod", score_mod, "score, b, n, q_idx, kv_idx"),
    ):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be a function {name}({args}), got {type(fn).__name__}")
    if block_mask is None:
        return mask_mod
    if not all(hasattr(block_mask, a) for a in ("mask_mod", "seq_lengths", "block_map")):
        raise TypeError(
            f"block_mask must be a jattn.BlockMask (from jattn.block_mask), got "
            f"{type(block_mask).__name__}"
        )
    t, s = query.shape[-3], key.shape[-3]
    if tuple(block_mask.seq_lengths) != (t, s):
        raise ValueError(
            f"block_mask was built for (T, S) = {tuple(block_mask.seq_lengths)}, but query "
            f"{fmt(query.shape)} and key {fmt(key.shape)} have (T, S) = ({t}, {s})"
        )
    b, n = math.prod(query.shape[:-3]), query.shape[-2]
    mb, mn = block_mask.block_map.shape[:2]
    if mb not in (1, b) or mn not in (1, n):
        raise ValueError(
            f"block_mask was built for batch={mb}, heads={mn}, but the call has B={b} "
            f"(flattened) and N={n}"
        )
    if mask_mod is not None and not _same_mod(mask_mod, block_mask.mask_mod):
        raise ValueError(
            "mask_mod and block_mask.mask_mod differ: pass the block mask alone (it carries "
            "its mask_mod), or rebuild it from this mask_mod"
        )
    return block_mask.mask_mod


def _same_mod(a, b) -> bool:
    """The same function: the same object, or pytrees of one structure (a mod passed
    through ``jit`` comes back as a new object with traced leaves)."""
    if a is b or (getattr(b, "fn", None) is a and not getattr(b, "params", ())):
        return True  # a plain function, and the block mask's wrapping of it
    sa, sb = jax.tree.structure(a), jax.tree.structure(b)
    leaf = jax.tree_util.treedef_is_leaf
    return not (leaf(sa) or leaf(sb)) and sa == sb


def grouped_5d(x, batch_shape, n, k, t_pad, s_pad):
    """A bias/mask broadcasting to ``[..., N, T, S]`` as ``[B|1, K|1, G|1, Tp|1, Sp|1]``."""
    nb = len(batch_shape)
    x = x.reshape((1,) * (nb + 3 - x.ndim) + x.shape)
    if any(d != 1 for d in x.shape[:nb]):
        x = jnp.broadcast_to(x, batch_shape + x.shape[nb:])
        x = x.reshape((math.prod(batch_shape),) + x.shape[nb:])
    else:
        x = x.reshape((1,) + x.shape[nb:])
    heads = (k, n // k) if x.shape[1] != 1 else (1, 1)
    x = x.reshape((x.shape[0],) + heads + x.shape[2:])
    pads = [(0, 0)] * 3
    pads += [(0, t_pad - x.shape[3] if x.shape[3] > 1 else 0)]
    pads += [(0, s_pad - x.shape[4] if x.shape[4] > 1 else 0)]
    return jnp.pad(x, pads)
