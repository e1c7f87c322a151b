"""Config files, by the name of a shipped one or by path, and command-line overrides.

A config is a Python file with ``get_config(arg=None) -> ml_collections.ConfigDict``.
The ones that ship with jattn live in the repository's top-level ``configs/`` folder,
installed as the package ``jattn.configs``, and are named by their file's stem
(``"dates"``); any other file is given by its path (``"configs/dates.py"``,
``"/abs/my.py"``).

Overrides (``--config.train.num_steps=200``) are parsed here rather than by
``ml_collections.config_flags``: that module raises a bare ``AttributeError``/``KeyError``
for an unknown field before the program can say more, and it can only set fields that
the file lists. Here each override is checked against the config's fields plus
``extra_fields`` (for ``config.model``: every option of the model class, so that
``--config.model.layer_norm_eps=1e-6`` works although the file leaves it out), and an
unknown one is named with the fields it could have been.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from jattn.training.validate import unknown_field

__all__ = ["apply_overrides", "load_config", "shipped_configs", "split_overrides"]

# --config.a.b=value or --config.a.b value (bare --config.a.b: True, for a bool field)
_OVERRIDE = re.compile(r"--config\.([^=]*)(?:=(.*))?", re.DOTALL)
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


#: Shipped modules that task configs extend, not configs to run (``common``: the shared
#: run, train and eval settings).
_NOT_RUNNABLE = ("common",)


def _shipped_dir() -> Path:
    try:
        import jattn.configs
    except ModuleNotFoundError as e:  # an editable install made before configs shipped
        raise ModuleNotFoundError(
            "jattn.configs, the shipped configs, is not installed: reinstall jattn "
            "(pip install -e . in a clone)"
        ) from e
    return Path(jattn.configs.__file__).parent


def shipped_configs() -> dict[str, str]:
    """``{name: the first line of its docstring}`` of the configs that ship with jattn."""
    found = {}
    for path in sorted(_shipped_dir().glob("*.py")):
        if not path.name.startswith("_") and path.stem not in _NOT_RUNNABLE:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
            found[path.stem] = doc.strip().split("\n", 1)[0]
    return found


def _is_path(source: str | os.PathLike) -> bool:
    """A ``Path``, or a string with a directory separator or a ``.py`` suffix."""
    if not isinstance(source, str):
        return True
    return source.endswith(".py") or "/" in source or os.sep in source


def load_config(source: str | os.PathLike, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of a shipped config named ``source`` (``"dates"``) or of the
    config file at ``source`` (a ``Path``, or a string with a ``/`` or ending in
    ``.py``), as ``--config source:arg`` loads it. The config is returned unlocked.

    >>> load_config("dates", "small").train.num_steps  # doctest: +SKIP
    6
    """
    if _is_path(source):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"no config file {path}; the shipped configs are named without a path: "
                f"{', '.join(shipped_configs())} (e.g. --config dates)"
            )
    else:
        names = shipped_configs()
        if source not in names:
            raise ValueError(
                f"unknown config {source!r}; the shipped configs are {', '.join(names)}, "
                "or give the path of a .py file that defines get_config(arg=None)"
            )
        path = _shipped_dir() / f"{source}.py"
    spec = importlib.util.spec_from_file_location(f"jattn_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"config file {path} is not a Python file (expected a .py file)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config file {path} defines no get_config(arg=None) function")
    config = module.get_config(arg)
    if not isinstance(config, ml_collections.ConfigDict):
        raise TypeError(
            f"get_config({arg!r}) of {path} must return an ml_collections.ConfigDict, "
            f"got {type(config).__name__}"
        )
    return config


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str | None]]]:
    """``(other_args, [(field_path, text), ...])``: the ``--config.FIELD=VALUE`` and
    ``--config.FIELD VALUE`` arguments taken out of ``argv`` (``text`` is ``None`` for
    a bare ``--config.FIELD``, which sets a bool field to True)."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        match = _OVERRIDE.fullmatch(argv[i])
        if match is None:
            rest.append(argv[i])
        else:
            path, text = match.groups()
            if text is None and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i, text = i + 1, argv[i + 1]
            overrides.append((path, text))
        i += 1
    return rest, overrides


def _parse_value(name: str, text: str | None, like: Any) -> Any:
    """``text`` as a value of the type of ``like``, the field's current value (or the
    default of an option the config leaves out)."""
    given = f"--{name}" if text is None else f"--{name}={text}"
    if isinstance(like, bool):
        if text is None or text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"{given}: {name} must be True or False, got {text!r}")
    if text is None:
        raise ValueError(f"--{name} needs a value: --{name}=VALUE")
    if isinstance(like, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{given}: {name} must be an int, got {text!r}") from None
    if isinstance(like, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{given}: {name} must be a number, got {text!r}") from None
    if isinstance(like, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = text  # a plain word for an option whose default is None: a string
    if isinstance(like, (tuple, list)):
        if not isinstance(value, (tuple, list)):
            raise ValueError(f"{given}: {name} must be a tuple such as '(1, 2)', got {text!r}")
        return type(like)(value)
    return value


def apply_overrides(
    config: ml_collections.ConfigDict,
    overrides: Sequence[tuple[str, str | None]],
    *,
    extra_fields: Callable[[str, ml_collections.ConfigDict], dict[str, Any]] | None = None,
) -> None:
    """Sets each ``(field_path, text)`` of ``overrides`` in ``config``, in order, the text
    parsed as the type of the field's value.

    ``extra_fields(section_path, section)`` names the fields a section may take although
    the config leaves them out, with their defaults (whose type parses the text): for
    ``"model"``, the options of the model class. Any other field raises ``ValueError``
    naming it and the known fields; so does a value of the wrong type.
    """

    def known_fields(section_path: str, section: ml_collections.ConfigDict) -> dict:
        extras = extra_fields(section_path, section) if extra_fields else {}
        return {**extras, **section}

    for path, text in overrides:
        keys = path.split(".")
        if not all(keys):
            raise ValueError(f"--config.{path}: not a field name (expected --config.a.b=VALUE)")
        section = config
        for depth, key in enumerate(keys):
            name, section_path = ".".join(["config", *keys[: depth + 1]]), ".".join(keys[:depth])
            known = known_fields(section_path, section)
            if key not in known:
                raise unknown_field(name, known, where=f" (in --config.{path})")
            like = known[key]
            last = depth == len(keys) - 1
            if not last and not isinstance(like, ml_collections.ConfigDict):
                raise ValueError(f"--config.{path}: {name} is a value, not a section of fields")
            if not last:
                section = like
        if isinstance(like, ml_collections.ConfigDict):
            raise ValueError(
                f"--config.{path}: {name} is a section, not a value; set its fields, e.g. "
                f"--config.{path}.{next(iter(like), 'FIELD')}=VALUE"
            )
        value = _parse_value(name, text, like)
        with section.unlocked(), section.ignore_type():  # the parse gave the field's type
            section[keys[-1]] = value
