"""Attention patterns for layers and models, from code or from config data.

A layer's ``mask_mod`` / ``score_mod`` (:mod:`jattn.mods`) can be given as a function,
a :class:`jattn.mods.Mod`, or as data a config file can hold:

- a pattern name: ``"causal"``, ``"full"``;
- a dict ``{"name": ..., **arguments}`` naming a :mod:`jattn.mods` pattern and its
  arguments, e.g. ``{"name": "sliding_window", "window": [64, 0]}``,
  ``{"name": "bigbird", "seed": 0, "length": 4096, "block": 64}`` (``seed`` stands
  for the ``key``), ``{"name": "per_head", "mods": ["causal", {...}]}``,
  ``{"name": "and", "mods": [...]}`` (also ``"or"``, and ``"not"`` with ``"mod"``);
- score_mods: ``{"name": "alibi"}`` (the paper's slopes for the layer's heads;
  ``bidirectional``), ``{"name": "relative_position_bias", "num_buckets": 32,
  "max_distance": 128, "bidirectional": True}`` (T5: a learned table per layer, a
  :class:`jattn.layers.RelativePositionBias`), ``{"name": "softcap", "cap": 50.0}``,
  ``{"name": "chain", "mods": [...]}``.

Models take either one pattern (every layer) or a list with one entry per layer
(``None`` for none), so a model mixes patterns per layer; :func:`jattn.mods.per_head`
mixes them per head.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx

from jattn.functional import _checks, mods
from jattn.functional.positional import alibi_slopes
from jattn.layers.positional import RelativePositionBias

__all__ = [
    "ScoreChain",
    "holdable",
    "mask_pattern",
    "per_layer",
    "resolve_score_mod",
    "score_pattern",
]

_MASKS: dict[str, Callable] = {
    "full": mods.full,
    "causal": mods.causal,
    "sliding_window": mods.sliding_window,
    "prefix_lm": mods.prefix_lm,
    "strided": mods.strided,
    "dilated": mods.dilated,
    "fixed": mods.fixed,
    "global_tokens": mods.global_tokens,
    "longformer": mods.longformer,
    "bigbird": mods.bigbird,
}
_SCORES = ("alibi", "relative_position_bias", "softcap", "chain")


def _as_dict(spec) -> dict | None:
    if hasattr(spec, "to_dict"):  # an ml_collections.ConfigDict
        spec = spec.to_dict()
    return dict(spec) if isinstance(spec, Mapping) else None


def _name_and_args(spec, kind: str, known) -> tuple[str, dict]:
    if isinstance(spec, str):
        name, args = spec, {}
    else:
        args = _as_dict(spec)
        if args is None or "name" not in args:
            raise TypeError(
                f"a {kind} is a function, a jattn.mods.Mod, a name or a dict with a 'name', "
                f"got {spec!r}"
            )
        name = args.pop("name")
    if not isinstance(name, str):  # a list was "unhashable type"
        raise TypeError(f"a {kind}'s name must be a str, got {name!r}")
    if name not in known:
        raise ValueError(f"unknown {kind} {name!r}; known: {sorted(known)}")
    return name, args


def _parts(parts, name: str) -> list:
    """The ``mods`` of a combining pattern: a non-empty list (a str was read letter by
    letter as patterns, an empty list failed at the first call)."""
    if isinstance(parts, str | Mapping) or not isinstance(parts, Sequence) or not parts:
        raise TypeError(f"'mods' must be a non-empty list of patterns, got {parts!r}")
    return list(parts)


def _lists(args: dict) -> dict:
    """Config lists back to the tuples the patterns take (``window=[64, 0]``)."""
    return {k: tuple(v) if isinstance(v, list) and k == "window" else v for k, v in args.items()}


def mask_pattern(spec) -> mods.MaskMod | None:
    """The mask_mod ``spec`` names (see the module docstring); functions and mods pass
    through, ``None`` is no mask."""
    if spec is None or callable(spec):
        return spec
    known = set(_MASKS) | {"per_head", "and", "or", "not"}
    name, args = _name_and_args(spec, "mask_mod pattern", known)
    try:
        if name in ("per_head", "and", "or"):
            parts = [mask_pattern(m) for m in _parts(args.pop("mods"), name)]
            if args:
                raise TypeError(f"unexpected arguments {sorted(args)}")
            if name == "per_head":
                return mods.per_head(parts)
            return (mods.and_masks if name == "and" else mods.or_masks)(*parts)
        if name == "not":
            inner = mask_pattern(args.pop("mod"))
            if args:
                raise TypeError(f"unexpected arguments {sorted(args)}")
            return mods.not_mask(inner)
        if name == "bigbird" and "seed" in args:  # 1.7 was truncated to 1, "abc" a bare error
            seed = args.pop("seed")
            if not _checks.is_int(seed) or not 0 <= seed < 2**32:
                raise TypeError(f"seed must be an int in [0, 2**32), got {seed!r}")
            args["key"] = jax.random.key(int(seed))
        return _MASKS[name](**_lists(args))
    except KeyError as e:
        raise ValueError(f"mask_mod pattern {name!r} needs {e}") from None
    except TypeError as e:
        raise ValueError(f"mask_mod pattern {name!r}: {e}") from None


class ScoreChain(nnx.Module):
    """Score mods applied in order, some of them layers with parameters."""

    def __init__(self, parts: Sequence[Any]):
        self.parts = nnx.List([holdable(p) for p in parts])

    def score_mod(self) -> mods.Mod:
        return mods.chain_scores(*(resolve_score_mod(p) for p in self.parts))


def holdable(x):
    """A value an ``nnx.Module`` can hold as an attribute: mods with arrays as data."""
    if x is None or isinstance(x, nnx.Module):
        return x
    return nnx.data(mods.as_mod(x))


def score_pattern(spec, *, num_heads: int, rngs: nnx.Rngs | None = None):
    """The score_mod ``spec`` names (see the module docstring) for a layer of
    ``num_heads`` heads: a function or :class:`jattn.mods.Mod`, or a module with a
    ``score_mod()`` method (its parameters train with the layer); ``None`` is none."""
    if spec is None or callable(spec) or isinstance(spec, nnx.Module):
        return spec
    name, args = _name_and_args(spec, "score_mod pattern", set(_SCORES))
    try:
        if name == "alibi":
            return mods.alibi(alibi_slopes(num_heads), **args)
        if name == "relative_position_bias":
            if rngs is None:
                raise TypeError("a learned table needs rngs")
            return RelativePositionBias(num_heads, **args, rngs=rngs)
        if name == "softcap":
            return mods.softcap(**args)
        parts = [
            score_pattern(m, num_heads=num_heads, rngs=rngs) for m in _parts(args.pop("mods"), name)
        ]
        if args:
            raise TypeError(f"unexpected arguments {sorted(args)}")
        return ScoreChain(parts)
    except KeyError as e:
        raise ValueError(f"score_mod pattern {name!r} needs {e}") from None
    except TypeError as e:
        raise ValueError(f"score_mod pattern {name!r}: {e}") from None


def resolve_score_mod(score_mod):
    """The score_mod to call now: a module's ``score_mod()`` (built from its current
    parameters), else ``score_mod`` itself."""
    if isinstance(score_mod, nnx.Module):
        if not callable(getattr(score_mod, "score_mod", None)):
            raise TypeError(
                f"a score_mod module needs a score_mod() method, got {type(score_mod).__name__}"
            )
        return score_mod.score_mod()
    return score_mod


def per_layer(spec, num_layers: int, name: str) -> list:
    """``spec`` for each of ``num_layers`` layers: a list or tuple gives one entry per
    layer (its length must be ``num_layers``), anything else is shared by all."""
    if isinstance(spec, list | tuple):
        if len(spec) != num_layers:
            raise ValueError(
                f"{name} has {len(spec)} entries, one per layer; the stack has {num_layers} layers"
            )
        return list(spec)
    return [spec] * num_layers
