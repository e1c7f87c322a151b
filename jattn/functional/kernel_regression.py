"""Nadaraya-Watson kernel regression as attention pooling (d2l 11.2).

A prediction at a query ``q`` is a weighted average of the training targets
``y_i``, weighted by how close ``q`` is to each training input ``x_i``::

    f(q) = sum_i  K(q - x_i) / sum_j K(q - x_j)  *  y_i

This is attention: the queries are the points to predict, the keys are the
training inputs, the values are the training targets, and the weights are a
softmax over ``log K``. Kernels are therefore written in log space: each kernel
returns the logits ``log K(d)`` (``-inf`` where ``K(d) = 0``), so a narrow
Gaussian does not underflow to an all-zero row (as long as ``(d / width)^2`` stays
below float32's 3.4e38, i.e. d / width < 1.8e19), and the Gaussian kernel is exactly
the softmax of ``-d^2 / 2``. ``jnp.exp(kernel(d))`` gives the kernel itself.

Shapes: queries ``[T]`` (or ``[T, F]`` for F input features), keys ``[S]``
(or ``[S, F]``), values ``[S]`` or ``[S, Hv]``, weights ``[T, S]``.
A query whose kernel is zero on every key (a boxcar, triangular or Epanechnikov window
with no training point inside) gets all-zero weights and a zero prediction.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jattn.functional import _checks, _eager, _finite
from jattn.functional.pooling import attention_pooling
from jattn.functional.softmax import masked_softmax

__all__ = [
    "KERNELS",
    "Kernel",
    "boxcar_kernel",
    "constant_kernel",
    "epanechikov_kernel",
    "epanechnikov_kernel",
    "triangular_kernel",
    "gaussian_kernel",
    "leave_one_out_mask",
    "nadaraya_watson",
    "nadaraya_watson_weights",
    "parametric_nadaraya_watson",
    "parametric_nadaraya_watson_weights",
]

#: ``kernel(distances, width) -> log K(distances / width)``, float32, ``-inf`` where K = 0.
Kernel = Callable[[jax.Array, float], jax.Array]

_NEG_INF = float("-inf")


def gaussian_kernel(distances: jax.Array, width: float = 1.0) -> jax.Array:
    """Log of the Gaussian kernel ``exp(-d^2 / (2 width^2))``: ``-d^2 / (2 width^2)``."""
    d, width = _kernel_inputs(distances, width)
    return -jnp.square(d / width) / 2


def boxcar_kernel(distances: jax.Array, width: float = 1.0) -> jax.Array:
    """Log of the boxcar kernel ``1[|d| < width]``: 0 inside the window, ``-inf`` outside."""
    d, width = _kernel_inputs(distances, width)
    return jnp.where(jnp.abs(d) < width, jnp.float32(0.0), jnp.float32(_NEG_INF))


def constant_kernel(distances: jax.Array, width: float = 1.0) -> jax.Array:
    """Log of the constant kernel ``1``: every key gets the same weight (plain averaging)."""
    d, _ = _kernel_inputs(distances, width)
    return jnp.zeros(d.shape, jnp.float32)


def _kernel_inputs(distances, width) -> tuple[jax.Array, jax.Array | float]:
    """A kernel's ``distances`` as float32 and its checked ``width`` (a positive
    finite scalar; a traced one, as :func:`nadaraya_watson` passes, as it is)."""
    d = _checks.check_real("distances", distances).astype(jnp.float32)
    return d, _check_width(width)


def _log_positive_part(k):
    """``log(max(k, 0))`` with ``-inf`` outside, and no NaN reaching a gradient."""
    inside = k > 0
    return jnp.where(inside, jnp.log(jnp.where(inside, k, 1.0)), jnp.float32(_NEG_INF))


def triangular_kernel(distances: jax.Array, width: float = 1.0) -> jax.Array:
    """Log of the triangular kernel ``max(0, 1 - |d| / width)``; ``-inf`` outside the window.

    (d2l calls this kernel "Epanechikov"; the Epanechnikov kernel is
    :func:`epanechnikov_kernel`.)"""
    d, width = _kernel_inputs(distances, width)
    return _log_positive_part(1.0 - jnp.abs(d) / width)


def epanechnikov_kernel(distances: jax.Array, width: float = 1.0) -> jax.Array:
    """Log of the Epanechnikov kernel ``3/4 (1 - (d / width)^2)`` for ``|d| < width``;
    ``-inf`` outside the window."""
    d, width = _kernel_inputs(distances, width)
    d = d / width
    return _log_positive_part(0.75 * (1.0 - jnp.square(d)))


def epanechikov_kernel(distances: jax.Array, width: float = 1.0) -> jax.Array:
    """d2l's "Epanechikov" kernel, which is the triangular kernel: deprecated, use
    :func:`triangular_kernel` (the same values) or :func:`epanechnikov_kernel`."""
    warnings.warn(
        "epanechikov_kernel is d2l's name for the triangular kernel max(0, 1 - |d|/width): "
        "use triangular_kernel (the same values), or epanechnikov_kernel for "
        "3/4 (1 - (d/width)^2)",
        DeprecationWarning,
        stacklevel=2,
    )
    return triangular_kernel(distances, width)


#: The built-in kernels by name: ``kernel="gaussian"`` is ``kernel=gaussian_kernel``.
#: ``"epanechikov"`` (d2l's spelling) is d2l's kernel, the triangular one.
KERNELS: dict[str, Kernel] = {
    "gaussian": gaussian_kernel,
    "boxcar": boxcar_kernel,
    "constant": constant_kernel,
    "triangular": triangular_kernel,
    "epanechnikov": epanechnikov_kernel,
    "epanechikov": triangular_kernel,
}


def _points(name: str, x, letters: str) -> jax.Array:
    x = _checks.as_array(name, x)
    if x.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape {letters}, got {_checks.fmt(x.shape)}")
    _checks.check_float(name, x)
    return x


_NO_VALUES = object()  # the weights' functions: no values to check


def _check_inputs(queries, keys, values=_NO_VALUES, mask=None):
    queries = _points("queries", queries, "[T] or [T, F]")
    keys = _points("keys", keys, "[S] or [S, F]")
    if queries.ndim != keys.ndim or queries.shape[1:] != keys.shape[1:]:
        raise ValueError(
            f"queries {_checks.fmt(queries.shape)} and keys {_checks.fmt(keys.shape)} must both "
            "be [T], [S] (scalar inputs) or [T, F], [S, F] with the same F"
        )
    t, s = queries.shape[0], keys.shape[0]
    if values is _NO_VALUES:
        values = None
    elif values is None:
        raise TypeError(
            "values must be an array [S] or [S, Hv], got None; for the weights alone use "
            "nadaraya_watson_weights or parametric_nadaraya_watson_weights"
        )
    else:
        values = _points("values", values, "[S] or [S, Hv]")
        if values.shape[0] != s:
            raise ValueError(
                f"keys {_checks.fmt(keys.shape)} and values {_checks.fmt(values.shape)} must "
                "have the same length S"
            )
    if mask is not None:
        mask = _checks.check_bool_mask("mask", mask, hint="e.g. leave_one_out_mask(S)")
        _checks.check_broadcast("mask", mask, (t, s), "[T, S]")
    return queries, keys, values, mask


def _differences(queries: jax.Array, keys: jax.Array) -> jax.Array:
    """``q - k`` for every pair: ``[T, S]`` for scalar inputs, ``[T, S, F]`` otherwise."""
    q = queries.astype(jnp.float32)
    k = keys.astype(jnp.float32)
    if q.ndim == 1:
        return q[:, None] - k[None, :]
    return q[:, None, :] - k[None, :, :]


def _pool(weights: jax.Array, values: jax.Array) -> jax.Array:
    if values.ndim == 1:
        return attention_pooling(weights, values[:, None])[:, 0]
    return attention_pooling(weights, values)


def _norm(diff: jax.Array) -> jax.Array:
    """Euclidean norm over the last axis, with a finite gradient (0) at 0, where a
    query sits on a key (the derivative of sqrt is infinite there)."""
    sq = jnp.sum(jnp.square(diff), axis=-1)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), jnp.float32(0.0))


def nadaraya_watson_weights(
    queries: jax.Array,
    keys: jax.Array,
    *,
    kernel: Kernel | str = gaussian_kernel,
    width: float = 1.0,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Non-parametric attention weights ``K(q - k) / sum K``.

    Args:
      queries: ``[T]`` or ``[T, F]``.
      keys: ``[S]`` or ``[S, F]``; with F features the distance is the Euclidean norm.
      kernel: a log-kernel (:func:`gaussian_kernel`, :func:`boxcar_kernel`,
        :func:`constant_kernel`, :func:`triangular_kernel`, :func:`epanechnikov_kernel` or
        your own), or the
        name of a built-in one (:data:`KERNELS`: ``"gaussian"``, ...).
      width: the kernel width (bandwidth), a positive scalar. Under ``jax.jit`` a
        traced width cannot be checked: a width <= 0 gives NaN weights.
      mask: optional boolean ``[T, S]`` (True = attend), e.g. :func:`leave_one_out_mask`.

    Returns:
      float32 ``[T, S]`` weights; each row sums to 1, or is all zero when no key
      lies inside the kernel's support.
    """
    queries, keys, _, mask = _check_inputs(queries, keys, mask=mask)
    kernel, width, traced = _kernel_and_width(kernel, width)
    return _eager.run(_nadaraya_watson, (queries, keys, None, mask, width), kernel, traced)


def _clean(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Points ``[N]`` or ``[N, F]`` with the non-finite ones zeroed, and which ``[N]``."""
    clean, bad = _finite.hide_nonfinite(x if x.ndim == 2 else x[:, None])
    return (clean if x.ndim == 2 else clean[:, 0]), bad


def _clean_differences(queries, keys):
    """:func:`_differences` of the points with the non-finite ones zeroed, and which
    queries ``[T]`` and keys ``[S]`` were non-finite."""
    queries, bad_q = _clean(queries)
    keys, bad_k = _clean(keys)
    return _differences(queries, keys), bad_q, bad_k


def _softmax_hiding(logits, mask, bad_q, bad_k, bad_values) -> jax.Array:
    """The masked softmax of logits from cleaned points, with NaN for the pairs that
    the mask does not hide of a non-finite query or key (its distances are unknown) and
    of a non-finite value that the kernel's support (``log K = -inf``) does not hide
    either: hidden ones reach nothing, seen ones make their row NaN
    (:mod:`jattn.functional._finite`)."""
    bad = bad_q[:, None] | bad_k[None, :]
    if bad_values is not None:
        bad = bad | (bad_values[None, :] & (logits > -jnp.inf))
    return masked_softmax(jnp.where(bad, jnp.float32(jnp.nan), logits), mask)


def _kernel_and_width(kernel, width):
    """``(kernel function, width as a float32 array, whether it is traced)``, checked:
    the width is an argument of the computation (a sweep over widths reuses one
    program), and a traced one, which cannot be checked, shows a width <= 0 as NaN."""
    kernel = _as_kernel(kernel)
    width = _check_width(width)
    traced = isinstance(width, jax.core.Tracer)
    return kernel, jnp.asarray(width, jnp.float32), traced


def _nadaraya_watson(queries, keys, values, mask, width, kernel, traced):
    """The weights ``[T, S]`` of checked inputs, or ``(predictions, weights)`` when
    ``values`` is given."""
    bad_values = None
    if values is not None:
        values, bad_values = _clean(values)
    diff, bad_q, bad_k = _clean_differences(queries, keys)
    dist = diff if diff.ndim == 2 else _norm(diff)  # [T, S]
    logits = kernel(dist, width)
    if logits.shape != dist.shape:
        raise ValueError(
            f"kernel returned shape {_checks.fmt(logits.shape)} for distances "
            f"{_checks.fmt(dist.shape)}; a kernel must act elementwise"
        )
    weights = _softmax_hiding(logits, mask, bad_q, bad_k, bad_values)
    if traced:  # cannot be checked: a bad width shows as NaN
        weights = jnp.where(width > 0, weights, jnp.float32(jnp.nan))
    return weights if values is None else (_pool(weights, values), weights)


def _as_kernel(kernel) -> Kernel:
    """A kernel function, or the name of a built-in one."""
    if isinstance(kernel, str):
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; expected one of {sorted(KERNELS)}")
        return KERNELS[kernel]
    if not callable(kernel):
        raise TypeError(
            f"kernel must be a function kernel(distances, width) -> log K or one of "
            f"{sorted(KERNELS)}, got {type(kernel).__name__}"
        )
    return kernel


def _check_width(width):
    """A positive scalar width: a number, or a 0-d float array (traced is allowed, for a
    width learned or swept under jit; its value is then checked as NaN weights)."""
    if isinstance(width, bool | np.bool_) or not (
        isinstance(width, numbers.Real) or isinstance(width, jax.Array | np.ndarray)
    ):
        raise TypeError(f"width must be a positive number, got {type(width).__name__}")
    if jnp.ndim(width) != 0:
        raise ValueError(
            f"width must be a scalar, got shape {list(jnp.shape(width))}; for one width "
            "per feature use parametric_nadaraya_watson's w, for one per head jax.vmap"
        )
    checked = _checks.check_finite_scalar("width", width, positive=True, allow_traced=True)
    return width if isinstance(width, jax.core.Tracer) else checked


def nadaraya_watson(
    queries: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    *,
    kernel: Kernel | str = gaussian_kernel,
    width: float = 1.0,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Non-parametric Nadaraya-Watson regression: attention pooling with a fixed kernel.

    >>> import jax.numpy as jnp
    >>> x, y = jnp.array([0.0, 1.0, 2.0]), jnp.array([0.0, 1.0, 4.0])
    >>> nadaraya_watson(jnp.array([1.0]), x, y, kernel=constant_kernel)[0]
    Array([1.6666667], dtype=float32)

    Args:
      queries: ``[T]`` or ``[T, F]`` points to predict at.
      keys: ``[S]`` or ``[S, F]`` training inputs.
      values: ``[S]`` or ``[S, Hv]`` training targets.
      kernel, width, mask: see :func:`nadaraya_watson_weights`.

    Returns:
      ``(predictions, weights)``: ``[T]`` (or ``[T, Hv]``) in the values' dtype,
      and the float32 weights ``[T, S]``.
    """
    queries, keys, values, mask = _check_inputs(queries, keys, values, mask)
    kernel, width, traced = _kernel_and_width(kernel, width)
    return _eager.run(_nadaraya_watson, (queries, keys, values, mask, width), kernel, traced)


def _check_w(w, queries: jax.Array) -> jax.Array:
    w = _checks.as_array("w", w)
    _checks.check_float("w", w)
    n_features = 1 if queries.ndim == 1 else queries.shape[1]
    if w.ndim > 1 or (w.ndim == 1 and w.shape[0] not in (1, n_features)):
        raise ValueError(
            f"w must be a scalar [] or one width per feature [F] = [{n_features}], got "
            f"{_checks.fmt(w.shape)}; for several heads jax.vmap over w's head axis"
        )
    values = _checks.concrete(w)  # a traced (learned) w cannot be checked here
    if values is not None and not np.isfinite(values).all():
        raise ValueError(f"w must be finite, got {values.tolist()}")
    return w


def parametric_nadaraya_watson_weights(
    queries: jax.Array,
    keys: jax.Array,
    w: jax.Array,
    *,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Weights of parametric (learnable-width) kernel regression: ``softmax(-((q - k) w)^2 / 2)``.

    This is d2l's ``NWKernelRegression``: a Gaussian kernel of width ``1 / w``.

    Args:
      queries: ``[T]`` or ``[T, F]``.
      keys: ``[S]`` or ``[S, F]``.
      w: ``[]`` (one width) or ``[F]`` (one per feature: ``-sum_f ((q_f - k_f) w_f)^2 / 2``).
        For one width per head, ``jax.vmap`` over a leading head axis of ``w``.
      mask: optional boolean ``[T, S]`` (True = attend).

    Returns:
      float32 ``[T, S]`` weights.
    """
    queries, keys, _, mask = _check_inputs(queries, keys, mask=mask)
    w = _check_w(w, queries).astype(jnp.float32)
    return _eager.run(_parametric, (queries, keys, None, mask, w))


def _parametric(queries, keys, values, mask, w):
    """As :func:`_nadaraya_watson` for a checked float32 ``w``."""
    bad_values = None
    if values is not None:
        values, bad_values = _clean(values)
    diff, bad_q, bad_k = _clean_differences(queries, keys)  # [T, S] or [T, S, F]
    if diff.ndim == 2:
        logits = -jnp.square(diff * w.reshape(())) / 2
    else:
        scaled = diff * w.reshape((1, 1, -1))  # [T, S, F]
        logits = -jnp.sum(jnp.square(scaled), axis=-1) / 2
    weights = _softmax_hiding(logits, mask, bad_q, bad_k, bad_values)
    return weights if values is None else (_pool(weights, values), weights)


def parametric_nadaraya_watson(
    queries: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    w: jax.Array,
    *,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Parametric Nadaraya-Watson regression with a learnable width ``w`` (differentiable in w).

    Args:
      queries: ``[T]`` or ``[T, F]``.
      keys: ``[S]`` or ``[S, F]``.
      values: ``[S]`` or ``[S, Hv]``.
      w: ``[]`` or ``[F]``; see :func:`parametric_nadaraya_watson_weights`.
      mask: optional boolean ``[T, S]``, e.g. :func:`leave_one_out_mask` for training.

    Returns:
      ``(predictions [T] or [T, Hv], weights [T, S])``.
    """
    queries, keys, values, mask = _check_inputs(queries, keys, values, mask)
    w = _check_w(w, queries).astype(jnp.float32)
    return _eager.run(_parametric, (queries, keys, values, mask, w))


def leave_one_out_mask(num_points: int) -> jax.Array:
    """``[S, S]`` boolean mask that hides each training point from itself (False on the diagonal).

    Training a kernel's width on the training set with queries = keys would
    let every point attend to itself (and learn ``w -> inf``); with this mask each
    point is predicted from all the others, as d2l's leave-one-out keys do.
    """
    _checks.check_static("num_points", num_points, "int")
    if not _checks.is_int(num_points) or num_points < 2:
        raise ValueError(
            f"leave_one_out_mask needs an int num_points >= 2, got "
            f"{num_points!r}{_checks.type_note(num_points)}"
        )
    return ~jnp.eye(int(num_points), dtype=bool)
