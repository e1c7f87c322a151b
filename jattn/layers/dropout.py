"""``nnx.Dropout`` with jattn's hashed keep-masks."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from jattn.functional import _checks
from jattn.functional.stochastic import dropout, fold_in

__all__ = [
    "Dropout",
    "TrainEval",
    "dropout_key",
    "next_key",
    "per_site_rngs",
    "resolve_deterministic",
]


def resolve_deterministic(module, deterministic) -> bool:
    """The ``deterministic`` a call of ``module`` runs with: the call argument when it is
    given, else the module's ``deterministic`` attribute (which ``module.train()`` and
    ``module.eval()`` set, as ``nnx.Module.train`` sets every ``deterministic`` below
    it). A parent passes the value it resolved down to its sublayers, so an explicit
    call argument reaches every site.

    Raises a TypeError naming ``deterministic`` when the value is not a Python (or
    NumPy) bool: a traced bool cannot decide whether dropout runs.
    """
    value = getattr(module, "deterministic", None) if deterministic is None else deterministic
    if not isinstance(value, bool | np.bool_):
        where = f"{type(module).__name__}.deterministic" if deterministic is None else "the call"
        raise TypeError(
            f"deterministic must be True (no dropout), False (dropout) or None (use the "
            f"module's attribute, set by .train()/.eval()); {where} gave {value!r}"
        )
    return bool(value)


class TrainEval:
    """Mixin for an ``nnx.Module`` with dropout: a ``deterministic`` attribute (set it in
    ``__init__``; ``True``, eval, by default) that ``nnx.Module.train()`` / ``.eval()``
    and ``nnx.view(module, deterministic=...)`` switch, and that a call's
    ``deterministic=None`` falls back to (:func:`resolve_deterministic`)."""

    def set_view(self, deterministic: bool | None = None):
        """Used by ``nnx.view``.

        Args:
          deterministic: True disables dropout (eval), False enables it (training).
        """
        if deterministic is not None:
            self.deterministic = deterministic

    def _deterministic(self, deterministic) -> bool:
        return resolve_deterministic(self, deterministic)


def next_key(stream: nnx.RngStream) -> jax.Array:
    """The stream's next key, ``fold_in(key, count)`` with
    :func:`jattn.functional.stochastic.fold_in` (a cheap integer mix, not Threefry),
    advancing the count as ``stream()`` does."""
    count = stream.count[...]
    stream.count[...] = count + 1
    return fold_in(stream.key[...], count)


def dropout_key(rngs, default=None, collection: str = "dropout") -> jax.Array | None:
    """The dropout key a layer uses for one call.

    Args:
      rngs: the call's ``nnx.Rngs`` (its ``collection`` stream), an ``RngStream``, a
        key (used as is: modules with several sites first turn it into a stream with
        :func:`per_site_rngs`), or None.
      default: the layer's own stream (or None), used when ``rngs`` is None.
      collection: the stream name taken from ``nnx.Rngs``.

    Returns:
      A key, or None when neither ``rngs`` nor ``default`` gives one.
    """
    rngs = default if rngs is None else rngs
    if isinstance(rngs, nnx.Rngs):
        rngs = rngs[collection]
    if isinstance(rngs, nnx.RngStream):
        return next_key(rngs)
    if rngs is None or isinstance(rngs, jax.Array):
        return rngs
    raise TypeError(
        f"rngs must be nnx.Rngs, an nnx.RngStream, a PRNG key or None, got {type(rngs).__name__}"
    )


def per_site_rngs(rngs):
    """``rngs`` for a module with several random sites (blocks, stacks, models): a bare
    key becomes ``nnx.Rngs(dropout=key)``, so each site draws its own key from that
    stream. Passed on as is, one key would drop the same units at every site of the same
    shape. ``nnx.Rngs``, streams and None pass through."""
    if isinstance(rngs, jax.Array):
        return nnx.Rngs(dropout=rngs)
    return rngs


class Dropout(nnx.Dropout):
    """Drop-in ``nnx.Dropout`` (same constructor, call, ``nnx.view`` and ``train()``/
    ``eval()`` behaviour) whose masks come from :func:`jattn.functional.stochastic`: a
    cheap counter-based hash instead of a Threefry draw per element, so a model with
    many dropout sites compiles and runs faster. Keys come from the ``rngs`` stream,
    one per call, folded with its counter by :func:`next_key`.
    """

    def __init__(self, rate: float, *args, **kwargs):
        # in [0, 1] as nnx.Dropout (1 drops everything); a str, NaN or 1.5 is an error here
        super().__init__(_checks.check_rate("rate", rate, allow_one=True), *args, **kwargs)

    def __call__(
        self,
        inputs: jax.Array,
        *,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
    ) -> jax.Array:
        """Applies dropout unless ``deterministic`` (call argument, else the layer's).

        Args:
          inputs: any array.
          deterministic: no dropout when True.
          rngs: ``nnx.Rngs``, an ``RngStream`` or a key; defaults to the layer's stream.
        """
        if (deterministic if deterministic is not None else self.deterministic) is None:
            raise ValueError(
                "Dropout needs deterministic=True/False, in the constructor or the call"
            )
        deterministic = resolve_deterministic(self, deterministic)  # "no" read as True
        if self.rate == 0.0 or deterministic:
            return inputs
        key = dropout_key(rngs, self.rngs, self.rng_collection)
        if key is None:
            raise ValueError(
                "Dropout with deterministic=False needs rngs (nnx.Rngs, an RngStream or a "
                "key) in the constructor or the call"
            )
        return dropout(inputs, float(self.rate), key, broadcast_dims=self.broadcast_dims)
