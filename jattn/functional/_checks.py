"""Trace-time validation at the public boundary: errors name the argument, its value
(or shape) and what was expected.

Every public function checks its arguments with the helpers here, before any JAX
computation, so that a bad input is the same clear error everywhere, inside
``jax.jit`` too where the value is static:

- :func:`check_size`: sizes (lengths, counts, widths): a static int >= a minimum,
  never a float, str or bool (``2.0`` is not silently a size, ``True`` not 1).
- :func:`check_rate`: probabilities (dropout rates): a static real number in [0, 1).
- :func:`check_finite_scalar`: real parameters such as ``scale`` or
  ``max_wavelength``: finite (and positive where asked), never NaN or inf.
- :func:`check_dtype`: dtype options: one jnp understands, floating.
- :func:`check_int_array`: integer positions, offsets and lengths: integers (a
  float is never truncated) that fit int32 (checked on the NumPy value, before a
  conversion could wrap it).
- :func:`check_bool_mask`: a boolean mask (True = attend); a float (additive) mask
  is never read as validity.
- :func:`check_real`, :func:`check_float`: no complex (or non-numeric) inputs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_INT32 = np.iinfo(np.int32)


def is_int(x) -> bool:
    """A static Python or NumPy integer (``np.int64`` is not an ``int``), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool | np.bool_)


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


class Skeleton(NamedTuple):
    """A pytree with its arrays taken out (:func:`split_arrays`): hashable when its other
    leaves are, so it can key a cache or be a static argument."""

    treedef: Any
    is_array: tuple[bool, ...]  # per leaf
    others: tuple  # the leaves that are not arrays, in order


def split_arrays(tree) -> tuple[list, Skeleton]:
    """``(arrays, skeleton)``: the JAX and NumPy arrays of ``tree`` (traced ones too), and
    the rest; :func:`join_arrays` puts them back together."""
    leaves, treedef = jax.tree.flatten(tree)
    is_array = tuple(isinstance(x, jax.Array | np.ndarray) for x in leaves)
    others = tuple(x for x, a in zip(leaves, is_array, strict=True) if not a)
    arrays = [x for x, a in zip(leaves, is_array, strict=True) if a]
    return arrays, Skeleton(treedef, is_array, others)


def join_arrays(skeleton: Skeleton, arrays):
    """The tree :func:`split_arrays` took apart, with ``arrays`` (the same number, in
    order) in place of its arrays."""
    arrays, others = iter(arrays), iter(skeleton.others)
    return skeleton.treedef.unflatten(
        [next(arrays) if a else next(others) for a in skeleton.is_array]
    )


def type_note(value) -> str:
    """`` (a float)`` etc. after a value whose repr does not show its type."""
    if value is None or is_int(value):
        return ""
    article = "an" if type(value).__name__[0] in "aeiou" else "a"
    return f" ({article} {type(value).__name__})"


def nan_if_overflowing(query: jax.Array, index, num_new: int, max_len: int) -> jax.Array:
    """``query`` with NaN in the examples whose traced cache ``index`` (a scalar, or
    ``[B]`` along the query's first axis) leaves no room for ``num_new`` tokens in
    ``max_len``: under ``jax.jit`` an overflow cannot raise, and a clamped write would
    be a silent wrong answer; a NaN query makes exactly those rows NaN. A concrete
    ``index`` is returned as it is (its overflow is the caller's ValueError)."""
    if concrete(index) is not None:
        return query
    over = jnp.asarray(index) + num_new > max_len
    over = over.reshape(over.shape + (1,) * (query.ndim - over.ndim))
    return jnp.where(over, jnp.asarray(jnp.nan, query.dtype), query)


def check_prng_key(name: str, key) -> None:
    """A TypeError naming ``name`` unless ``key`` is one PRNG key (typed, or raw uint32
    data such as ``jax.random.PRNGKey(0)``)."""
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape == ():
            return
    elif (
        hasattr(key, "dtype")
        and hasattr(key, "shape")
        and key.dtype == np.uint32
        and len(key.shape) == 1
        and key.shape[0] >= 2
    ):
        return
    got = (
        f"dtype {key.dtype} shape {list(key.shape)}"
        if hasattr(key, "dtype") and hasattr(key, "shape")
        else f"{key!r}{type_note(key)}"
    )
    raise TypeError(
        f"{name} must be one PRNG key (jax.random.key(0) or jax.random.PRNGKey(0)), got {got}"
    )


def check_static(name: str, value, what: str) -> None:
    """A TypeError naming ``name`` when ``value`` is traced (a static ``what`` is needed)."""
    if _is_traced(value):
        raise TypeError(
            f"{name} must be a static Python {what} (it is needed at trace time), got a "
            "traced value; under jax.jit close over it or mark it static (static_argnames)"
        )


def check_size(name: str, value, *, minimum: int = 1) -> int:
    """``value`` as an int: a size, count or width (a sequence length, a number of heads,
    a hidden size, ``max_len``). A ValueError naming ``name`` and ``value`` unless it is
    an int (Python or NumPy, or a concrete 0-d integer array) >= ``minimum``; floats
    (even ``2.0``), strings, bools and None are refused, not converted. A TypeError for
    a traced value."""
    check_static(name, value, "int")
    if (
        isinstance(value, np.ndarray | jax.Array)
        and value.ndim == 0
        and jnp.issubdtype(value.dtype, jnp.integer)
    ):
        value = int(value)
    if not is_int(value) or value < minimum:
        expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {expected}, got {value!r}{type_note(value)}")
    return int(value)


def check_positive_int(name: str, value) -> int:
    """``value`` as an int; a ValueError naming ``name`` unless it is a positive int
    (:func:`check_size` with ``minimum=1``)."""
    return check_size(name, value)


def check_optional_size(name: str, value, *, minimum: int = 1) -> int | None:
    """None, or :func:`check_size`."""
    return None if value is None else check_size(name, value, minimum=minimum)


def check_rate(name: str, value, *, allow_one: bool = False) -> float:
    """``value`` as a float: a probability such as a dropout rate, a static real number in
    ``[0, 1)`` (``[0, 1]`` with ``allow_one``). A ValueError naming ``name`` for NaN, a
    str (``"0.1"``), a bool or None; a TypeError for a traced value (a rate decides
    whether dropout runs at all)."""
    check_static(name, value, "float")
    top = "1]" if allow_one else "1)"
    if (
        isinstance(value, bool | np.bool_)
        or not isinstance(value, numbers.Real)
        or not (0.0 <= value <= 1.0 if allow_one else 0.0 <= value < 1.0)
    ):
        real = isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
        hint = "" if real else f" ({type(value).__name__}; a float is expected)"
        raise ValueError(f"{name} must be in [0, {top}, got {value!r}{hint}")
    return float(value)


def check_finite_scalar(name: str, value, *, positive: bool = False, allow_traced: bool = False):
    """A real scalar parameter (``scale``, ``max_wavelength``, ``layer_norm_eps``): a
    Python/NumPy number or a 0-d real array, finite (NaN and inf would turn every
    result into NaN without a word) and > 0 with ``positive``.

    Returns a Python float; a traced 0-d array is returned as is when
    ``allow_traced`` (its value cannot be checked), else a TypeError."""
    if _is_traced(value):
        if not allow_traced:
            check_static(name, value, "float")
        if value.ndim != 0 or not _is_real_dtype(value.dtype):
            raise TypeError(f"{name} must be a real scalar, got {value.dtype}{fmt(value.shape)}")
        return value
    if isinstance(value, np.ndarray | jax.Array):
        if value.ndim != 0 or not _is_real_dtype(value.dtype):
            raise TypeError(
                f"{name} must be a real number (or a 0-d real array), got an array "
                f"{value.dtype}{fmt(value.shape)}"
            )
        value = value.item()
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}{type_note(value)}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        expected = "finite and > 0" if positive else "finite"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def _is_real_dtype(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)


def check_dtype(name: str, dtype, *, allow_none: bool = False):
    """``dtype`` as a NumPy dtype: one jnp understands (``jnp.float32``, ``"bfloat16"``)
    and floating. A TypeError naming ``name`` for a misspelt string (``"float32x"``), a
    number, or a complex or integer dtype. None passes through with ``allow_none``
    (``dtype=None``: inferred from the inputs)."""
    if dtype is None and allow_none:
        return None
    if dtype is None or isinstance(dtype, bool | numbers.Number):
        raise TypeError(f"{name} must be a floating dtype such as jnp.float32, got {dtype!r}")
    try:
        dt = jnp.dtype(dtype)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{name} must be a floating dtype such as jnp.float32 or 'bfloat16', got {dtype!r}"
        ) from e
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{name} must be a floating dtype (float32, bfloat16, ...), got {dt}")
    return dt


def broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Whether ``shape`` broadcasts to ``target`` without changing it."""
    if len(shape) > len(target):
        return False
    return all(a in (1, t) for a, t in zip(shape[::-1], target[::-1], strict=False))


def check_bool_mask(name: str, mask, *, hint: str = "add float masks to the logits") -> jax.Array:
    """``mask`` as a boolean array; a TypeError for other dtypes, whose 0/1 or 0/-inf
    entries would otherwise be read as False/True (an additive mask turned inside out)."""
    mask = as_array(name, mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"{name} must be boolean (True = attend), got dtype {mask.dtype}; {hint}")
    return mask


def _concrete_int(x):
    """A concrete 0-d integer array (NumPy or JAX, not traced) as a Python int; anything
    else as it is."""
    dtype = getattr(x, "dtype", None)
    if getattr(x, "ndim", None) == 0 and dtype is not None and jnp.issubdtype(dtype, jnp.integer):
        return int(x)
    return x


def _as_window(window: int | tuple[int, int]) -> tuple[int, int]:
    parts = window if isinstance(window, tuple | list) else (window,)
    if any(isinstance(w, jax.core.Tracer) for w in parts):
        raise TypeError(
            "window sizes set the shape of the computation, so they must be static Python "
            f"ints, got a traced value {window!r} (under jax.jit, close over the window or "
            "mark it static_argnames)"
        )
    window = _concrete_int(window) if not isinstance(window, tuple | list) else (
        tuple(_concrete_int(w) for w in window))  # fmt: skip
    if is_int(window):
        window = (window, window)
    if (
        not isinstance(window, tuple | list)
        or len(window) != 2
        or not all(is_int(w) and w >= 0 for w in window)
    ):
        raise ValueError(
            f"window must be a non-negative int or a pair (left, right) of non-negative ints, "
            f"got {window!r}"
        )
    return int(window[0]), int(window[1])


def check_real(name: str, x, *, allow_bool: bool = False) -> jax.Array:
    """``x`` as an array of real numbers (integer or floating, and bool with
    ``allow_bool``): a TypeError naming ``name`` for complex values (whose imaginary part
    a cast would drop) and non-numbers."""
    x = as_array(name, x)
    if not (_is_real_dtype(x.dtype) or (allow_bool and x.dtype == jnp.bool_)):
        raise TypeError(f"{name} must hold real numbers (int or float), got dtype {x.dtype}")
    return x


def _int_desc(x) -> str:
    if isinstance(x, np.ndarray | jax.Array):
        return f"dtype {x.dtype}"
    return f"{x!r}{type_note(x)}"


def check_int_array(name: str, x, *, clip: tuple[int, int] | None = None) -> jax.Array:
    """``x`` (an int or an integer array: positions, offsets, lengths) as int32.

    A TypeError naming ``name`` for floats (which would be truncated: ``1.5`` is not a
    position), bools, complex numbers and strings. Values that do not fit int32 are a
    ValueError, checked on the Python/NumPy value before the conversion (which would
    wrap them, as jax without x64 does); with ``clip=(lo, hi)`` they are clipped to
    ``[lo, hi]`` instead (a length beyond the sequence is the whole sequence). Traced
    values are checked for their dtype only.
    """
    if _is_traced(x):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(
                f"{name} must be integers, got dtype {x.dtype} (an int or an integer array)"
            )
        if clip is not None:
            info = jnp.iinfo(x.dtype)
            x = jnp.clip(x, max(clip[0], int(info.min)), min(clip[1], int(info.max)))
        return x.astype(jnp.int32)
    if is_int(x):
        value = int(x)
        if clip is not None:
            value = min(max(value, clip[0]), clip[1])
        if not _INT32.min <= value <= _INT32.max:
            raise ValueError(f"{name}={value} does not fit int32 [{_INT32.min}, {_INT32.max}]")
        return jnp.asarray(value, jnp.int32)
    if isinstance(x, np.ndarray | jax.Array):
        arr = x
    else:
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be integers, got {_int_desc(x)}") from e
    if not jnp.issubdtype(arr.dtype, jnp.integer) or arr.dtype == np.bool_:
        raise TypeError(
            f"{name} must be integers, got {_int_desc(x)} (an int or an integer array; "
            "floats are not rounded)"
        )
    if isinstance(arr, jax.Array) and jnp.can_cast(arr.dtype, jnp.int32):
        if clip is not None:  # no value can overflow: clip on the device
            info = jnp.iinfo(arr.dtype)
            arr = jnp.clip(arr, max(clip[0], int(info.min)), min(clip[1], int(info.max)))
        return arr.astype(jnp.int32)
    values = np.asarray(arr)
    if clip is not None:
        info = np.iinfo(values.dtype)
        values = np.clip(values, max(clip[0], int(info.min)), min(clip[1], int(info.max)))
    elif values.size and (values.min() < _INT32.min or values.max() > _INT32.max):
        raise ValueError(
            f"{name} holds values that do not fit int32 (min {values.min()}, max "
            f"{values.max()}); jattn computes positions in int32"
        )
    return jnp.asarray(values.astype(np.int32))


def fmt(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def host_array(name: str, x):
    """``x`` as it is if it is a jax array or traced, else as a NumPy array of its own
    dtype (an int64 stays int64: jax without x64 would wrap it into int32)."""
    if isinstance(x, str | bytes):  # jnp.asarray may parse one as a dtype ("01": SyntaxError)
        raise TypeError(f"{name} must be an array, got {type(x).__name__} {x!r}")
    if isinstance(x, jax.Array) or _is_traced(x) or hasattr(x, "__jax_array__"):
        return x  # (an nnx.Variable converts itself)
    try:
        array = np.asarray(x)
    except (TypeError, ValueError, OverflowError) as e:  # e.g. a ragged list
        raise TypeError(f"{name} must be an array, got {type(x).__name__}") from e
    if array.dtype == object:  # None, a dict, Python ints beyond int64: jax takes none
        if array.size and all(is_int(v) for v in array.flat):
            raise ValueError(f"{name} holds integers beyond int64 (max {max(array.flat)})")
        what = f"a NumPy array of dtype {x.dtype}" if isinstance(x, np.ndarray) else None
        raise TypeError(f"{name} must be an array, got {what or type(x).__name__}")
    return array


def check_float32_range(name: str, x: np.ndarray) -> None:
    """A ValueError if finite float64 values of ``x`` would overflow float32 (to inf,
    which a later check would call non-finite though the input was not)."""
    if x.dtype.kind != "f" or x.dtype.itemsize <= 4 or not x.size:
        return
    finite = np.abs(x[np.isfinite(x)])
    if finite.size and finite.max() > np.finfo(np.float32).max:
        raise ValueError(
            f"{name} holds finite values beyond float32's range (largest magnitude "
            f"{finite.max():.3g}): as float32 they would be inf"
        )


def as_array(name: str, x) -> jax.Array:
    """``x`` as a jax array; a TypeError naming ``name`` for what is not an array, and a
    ValueError for integers that jax's dtype would wrap (an int64 beyond int32 without
    x64): ``2**32 + 1`` would silently become 1."""
    x = host_array(name, x)
    if isinstance(x, np.ndarray) and x.dtype.kind in "iu" and x.size:
        target = jax.dtypes.canonicalize_dtype(x.dtype)
        info = np.iinfo(target)
        if x.min() < info.min or x.max() > info.max:
            raise ValueError(
                f"{name} holds values that do not fit {target} (min {x.min()}, max "
                f"{x.max()}): jax without x64 would wrap them"
            )
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:  # e.g. a NumPy array of strings
        what = f"a NumPy array of dtype {x.dtype}" if isinstance(x, np.ndarray) else None
        raise TypeError(f"{name} must be an array, got {what or type(x).__name__}") from e


def concrete(x) -> np.ndarray | None:
    """``x``'s values when they are known (outside ``jax.jit``), else None: values can
    only be checked on concrete inputs."""
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def check_scale(scale):
    """``scale`` as a static Python float (or None): finite (a NaN or inf scale makes
    every output NaN). A 0-d array is accepted when its value is known, as
    ``jax.nn.dot_product_attention`` accepts one; the blocked and kernel paths need the
    value at trace time, so a traced scale is a TypeError."""
    if scale is None:
        return None
    if _is_traced(scale):
        raise TypeError(
            "scale must be known at trace time, got a traced array; scale the query "
            "instead (dot_product_attention(query * s, ..., scale=1.0))"
        )
    array = isinstance(scale, np.ndarray | jax.Array) and scale.ndim == 0
    if isinstance(scale, bool | np.bool_) or not (
        isinstance(scale, numbers.Real) or (array and _is_real_dtype(scale.dtype))
    ):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    return check_finite_scalar("scale", scale)


def check_float(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        what = (
            " (complex inputs are not supported)"
            if jnp.issubdtype(x.dtype, jnp.complexfloating)
            else ""
        )
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}{what}")


def check_broadcast(name: str, x: jax.Array, target: Sequence[int], letters: str) -> None:
    if not broadcasts_to(x.shape, target):
        raise ValueError(
            f"{name} of shape {fmt(x.shape)} does not broadcast to {letters} = {fmt(target)}"
        )


def check_heads_mask(name: str, x: jax.Array, target: Sequence[int], letters: str) -> None:
    """:func:`check_broadcast` for a mask or bias of ``target = [..., N, T, S]``, which
    also refuses the one ambiguous rank: ``[B, T, S]`` (a mask per example, as Keras and
    PyTorch take it) and ``[N, T, S]`` (per head, as broadcasting reads it) are the same
    shape when the batch's last axis and N are the same size, and reading one as the
    other is a silent wrong answer."""
    check_broadcast(name, x, target, letters)
    batch, n = tuple(target[:-3]), target[-3]
    if batch and 3 <= x.ndim < len(target) and x.shape[-3] == n == batch[-1] > 1:
        per_example = ", ".join([*map(str, batch), "1", "T", "S"])
        per_head = ", ".join(["1"] * len(batch) + [str(n), "T", "S"])
        raise ValueError(
            f"{name} of shape {fmt(x.shape)} is ambiguous: rank {x.ndim} reads its axis "
            f"{x.ndim - 3} as the heads N={n} (a {name} per head), but the batch "
            f"{fmt(batch)} ends in the same size, so it may be a {name} per example "
            f"without its heads axis; give it rank {len(target)}: [{per_example}] per "
            f"example ({name}[..., None, :, :]) or [{per_head}] per head"
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


def check_seq_lengths(name: str, x, batch_shape: tuple[int, ...], bound: int) -> jax.Array | None:
    """Lengths ``x`` (one per example, broadcasting to ``batch_shape``) as int32 ``[B]``
    clipped to ``[0, bound]``: a length beyond the sequence is the whole sequence. The
    clip comes before int32 (on the NumPy value, or on the device for a traced or jax
    array), so no length wraps around (an int64 ``2**32 + 1``, a uint32)."""
    if x is None:
        return None
    x = host_array(name, x)
    if not jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == np.bool_:
        raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")
    if not batch_shape and x.shape == (1,):  # jax.nn's [B] = [1] for unbatched [T, N, H] inputs
        x = x.reshape(())
    if not broadcasts_to(x.shape, batch_shape) or (x.ndim == 1 and not batch_shape):
        raise ValueError(
            f"{name} of shape {fmt(x.shape)} must have (or broadcast to) the batch shape of "
            f"query {fmt(batch_shape)} (one length per example)"
        )
    x = check_int_array(name, x, clip=(0, bound))
    return jnp.broadcast_to(x, batch_shape).reshape(-1)  # [B]


def check_dropout(rate, rng) -> float:
    """``dropout_rate`` (:func:`check_rate`) and its ``dropout_rng``."""
    rate = check_rate("dropout_rate", rate)
    if rate > 0.0 and rng is None:
        raise ValueError(f"dropout_rate={rate} needs a dropout_rng (a PRNG key)")
    return rate


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
    from jattn.functional.softmax import check_fully_masked  # softmax imports this module

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
        check_heads_mask("mask", mask, target, letters)
    if bias is not None:
        bias = as_array("bias", bias)
        check_float("bias", bias)
        check_heads_mask("bias", bias, target, letters)
    lengths = []
    for name, x in (
        ("query_seq_lengths", query_seq_lengths),
        ("key_value_seq_lengths", key_value_seq_lengths),
    ):
        bound = query.shape[-3] if name == "query_seq_lengths" else key.shape[-3]
        lengths.append(check_seq_lengths(name, x, batch_shape, bound))
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
    from jattn.functional import mods  # mods imports this module

    shape = (math.prod(query.shape[:-3]), query.shape[-2], query.shape[-3], key.shape[-3])
    for name, fn in (("mask_mod", mask_mod), ("score_mod", score_mod)):
        mods.check_shapes(name, fn, *shape)
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
    varies = getattr(block_mask, "varies", (False, False))
    short = [(index, option, size)
             for index, option, size, built, v in (("example b", "batch", b, mb, varies[0]),
                                                   ("head n", "heads", n, mn, varies[1]))
             if v and built < size]  # fmt: skip
    if short:
        raise ValueError(
            f"block_mask was built for batch={mb}, heads={mn}, but its mask_mod depends on the "
            f"{' and '.join(x[0] for x in short)} and the call has B={b} (flattened) and N={n}: "
            "its tables would skip blocks the others see; build it with jattn.block_mask(..., "
            f"{', '.join(f'{x[1]}={x[2]}' for x in short)})"
        )
    mods.check_shapes("block_mask.mask_mod", block_mask.mask_mod, *shape)
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
