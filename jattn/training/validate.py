"""Config checks that run before any training: each error names the field and the reason."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any

from jattn.training.sharding import STRATEGIES

__all__ = ["DEFAULTS", "check_fields", "check_heads_divide", "check_sizes", "unknown_field"]

_POS_INT = "a positive int"
_NONNEG_INT = "an int >= 0"
_POS_FLOAT = "a finite number > 0"
_NONNEG_FLOAT = "a finite number >= 0"
_UNIT = "a number in [0, 1)"
_MESH_SHAPE = "a tuple of positive ints (one of them may be -1)"


def _ok(kind: str, value: Any) -> bool:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_num = is_int or (isinstance(value, float) and math.isfinite(value))
    if kind == _POS_INT:
        return is_int and value > 0
    if kind == _NONNEG_INT:
        return is_int and value >= 0
    if kind == _POS_FLOAT:
        return is_num and value > 0
    if kind == _NONNEG_FLOAT:
        return is_num and value >= 0
    if kind == _UNIT:
        return is_num and 0 <= value < 1
    if kind == _MESH_SHAPE:  # a list once saved in config.json
        return isinstance(value, tuple | list) and all(
            isinstance(n, int) and not isinstance(n, bool) and (n > 0 or n == -1) for n in value
        )
    if isinstance(kind, tuple):  # one of the allowed strings
        return value in kind
    if kind is str:
        return isinstance(value, str)
    raise AssertionError(kind)


def unknown_field(path: str, known: Iterable[str], *, where: str = "") -> ValueError:
    """The error for a config field ``path`` (``'config.train.num_stepz'``) that is not
    one of ``known``: the known fields, and the closest of them if one is close."""
    known = sorted(known)
    key = path.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(
        f"unknown field {path}{where}{hint}; known fields: {', '.join(known) or '(none)'}"
    )


def check_fields(section: str, values: dict, schema: dict) -> None:
    """Every key of ``values`` is known to ``schema`` and every value has its kind
    (fields with a default in :data:`DEFAULTS` may be left out)."""
    for key in values:
        if key not in schema:
            raise unknown_field(f"config.{section}.{key}", schema)
    for key, kind in schema.items():
        if key not in values:
            if key in DEFAULTS.get(section, {}):
                continue
            raise ValueError(f"config.{section}.{key} is missing")
        value = values[key]
        if not _ok(kind, value):
            want = f"one of {list(kind)}" if isinstance(kind, tuple) else kind
            if kind is str:
                want = "a string"
            raise ValueError(
                f"config.{section}.{key} must be {want}, got {value!r} ({type(value).__name__})"
            )


SCHEMAS = {
    "train": {
        "num_steps": _POS_INT,
        "batch_size": _POS_INT,
        "learning_rate": _POS_FLOAT,
        "warmup_steps": _NONNEG_INT,
        "decay": ("cosine", "linear"),
        "end_lr_factor": _NONNEG_FLOAT,
        "weight_decay": _NONNEG_FLOAT,
        "clip_norm": _POS_FLOAT,
        "label_smoothing": _UNIT,
        "log_every": _POS_INT,
        "checkpoint_every": _POS_INT,
        "max_to_keep": _POS_INT,
        "eval_every": _NONNEG_INT,
        "stop_after_steps": _NONNEG_INT,
        "num_devices": _NONNEG_INT,
        "parallelism": STRATEGIES,
        "mesh_shape": _MESH_SHAPE,
    },
    "eval": {
        "batch_size": _POS_INT,
        "beam_size": _POS_INT,
        "length_penalty": _NONNEG_FLOAT,
        "num_samples": _NONNEG_INT,
        "num_heatmaps": _NONNEG_INT,
        "bleu_tokenize": ("char", "13a", "none"),
    },
}

#: Optional fields and their values when a config leaves them out.
DEFAULTS = {
    "eval": {  # what a classification config may leave out
        "beam_size": 1,
        "length_penalty": 0.6,
        "bleu_tokenize": "char",
    },
    "train": {
        "num_devices": 0,  # train over this many devices; 0: all
        "parallelism": "data",  # a strategy of jattn.training.sharding
        "mesh_shape": (),  # the sizes of its mesh axes; (): all devices on one axis
    },
}

# Model options whose value is a size: they must be positive ints.
_SIZE_SUFFIXES = (
    "features",
    "layers",
    "heads",
    "dim",
    "size",
    "_len",
    "hidden",
    "hiddens",
    "digits",
    "symbols",
)


def check_sizes(section: str, options: dict) -> None:
    """Size-like options (``*features``, ``num_*``, ``*_dim`` ...) are positive ints
    (``*window``, such as ``local_window``: a positive int or None)."""
    for key, value in options.items():
        if key == "name":
            continue
        if key.startswith("num_") or key.endswith(_SIZE_SUFFIXES):
            if not _ok(_POS_INT, value):
                raise ValueError(
                    f"config.{section}.{key} must be a positive int, got {value!r} "
                    f"({type(value).__name__})"
                )
        if "dropout" in key and not _ok(_UNIT, value):
            raise ValueError(f"config.{section}.{key} must be a number in [0, 1), got {value!r}")
        if key.endswith("eps") and not _ok(_POS_FLOAT, value):
            raise ValueError(f"config.{section}.{key} must be {_POS_FLOAT}, got {value!r}")
        if key.endswith("window") and value is not None and not _ok(_POS_INT, value):
            raise ValueError(
                f"config.{section}.{key} must be a positive int (or None), got {value!r} "
                f"({type(value).__name__})"
            )


def check_heads_divide(model: dict, *, features_keys: tuple[str, ...], heads_key: str) -> None:
    """Each feature width in ``model`` is divisible by its number of heads."""
    if heads_key not in model:
        return
    heads = model[heads_key]
    for key in features_keys:
        if key in model and model[key] % heads:
            raise ValueError(
                f"config.model.{key}={model[key]} must be divisible by "
                f"config.model.{heads_key}={heads}"
            )
