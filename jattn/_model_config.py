"""One config dataclass per model, as Flax's lm1b and wmt examples have (the Configs are
exported by :mod:`jattn.models`).

Each model class ``M`` has ``M.Config`` (exported as ``MConfig``, e.g.
:class:`jattn.models.TransformerConfig`): a frozen, keyword-only dataclass whose fields
are exactly the model's constructor options, with the same defaults (it is made from the
constructor's signature, so the two cannot drift apart), and ``M.from_config(config,
*, rngs)`` builds the model from one (the example is in :mod:`jattn.models`).

A config is data: hashable when its fields are, comparable, ``dataclasses.asdict``-able,
and ``config.replace(**changes)`` gives a changed copy. The keyword constructor stays
(``DecoderLM(100, num_layers=2, ..., rngs=...)``); the field meanings are the model's
docstring's.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

__all__ = ["config_class"]


def _replace(self, **changes):
    """A copy with ``changes`` (``dataclasses.replace``)."""
    return dataclasses.replace(self, **changes)


def _from_config(cls, config, *, rngs):
    """The model built from ``config`` (a ``cls.Config``) and ``rngs``."""
    if not isinstance(config, cls.Config):
        raise TypeError(
            f"{cls.__name__}.from_config takes a {cls.Config.__name__}, got {type(config).__name__}"
        )
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)}, rngs=rngs)


def config_class(model: type) -> type:
    """Makes ``model.Config`` (a frozen dataclass of the constructor's options, named
    ``<Model>Config``) and ``model.from_config``; returns the dataclass."""
    fields: list[tuple[str, Any, Any]] = []
    for p in inspect.signature(model.__init__).parameters.values():
        if p.name in ("self", "rngs") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        annotation = p.annotation if p.annotation is not p.empty else Any
        if p.default is p.empty:
            fields.append((p.name, annotation, dataclasses.field()))
        else:
            fields.append((p.name, annotation, dataclasses.field(default=p.default)))
    name = f"{model.__name__}Config"
    config = dataclasses.make_dataclass(
        name, fields, frozen=True, kw_only=True, namespace={"replace": _replace}
    )
    config.__module__ = model.__module__
    config.__doc__ = (
        f"The options of :class:`{model.__module__}.{model.__name__}` as one frozen "
        f"dataclass (fields and defaults: its constructor's); "
        f"``{model.__name__}.from_config(config, rngs=...)`` builds the model."
    )
    model.Config = config
    model.from_config = classmethod(_from_config)
    return config
