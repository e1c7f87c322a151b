"""Sphinx configuration of jattn's documentation (Sphinx + MyST-NB, as JAX, Flax and Optax).

Build: ``pip install -e ".[docs]" && sphinx-build -W -b html docs docs/_build/html``.

The notebooks (``notebooks/*.py``, jupytext pairs) are rendered with their outputs. They are
executed at the small sizes (``JATTN_SMALL=1``) by the build, or taken already executed from
the folder ``JATTN_EXECUTED_NOTEBOOKS`` names (CI: the test suite's runs of them), so CI runs
each notebook once. ``JATTN_DOCS_NOTEBOOKS=off`` renders them without running them (the
API-coverage test, which needs only the reference).
"""

from __future__ import annotations

import functools
import os
import pathlib
import shutil
import types

import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]
HERE = pathlib.Path(__file__).resolve().parent

project = "jattn"
author = "the jattn authors"
copyright = "2026, the jattn authors"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
]

html_theme = "sphinx_book_theme"
html_title = "jattn"
html_theme_options = {"show_toc_level": 2}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
myst_enable_extensions = ["dollarmath", "colon_fence"]
suppress_warnings = ["mystnb.unknown_mime_type"]

autodoc_default_options = {"show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the docstrings give shapes and types in words
napoleon_google_docstring = True
napoleon_numpy_docstring = False
intersphinx_mapping = {}  # offline: no inventories are fetched

# ------------------------------------------------------------------ the notebooks

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))
OUT = HERE / "notebooks"  # generated, git-ignored
mode = os.environ.get("JATTN_DOCS_NOTEBOOKS", "execute")
executed = os.environ.get("JATTN_EXECUTED_NOTEBOOKS")


def _copy_notebooks() -> str:
    """Fills docs/notebooks/ and returns MyST-NB's execution mode."""
    import jupytext

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    given = pathlib.Path(executed) if executed else None
    if given is not None:
        missing = [p.stem for p in NOTEBOOKS if not (given / f"{p.stem}.ipynb").exists()]
        if missing:
            raise RuntimeError(
                f"JATTN_EXECUTED_NOTEBOOKS={executed} lacks {missing}: run the notebook tests "
                "with it set first, or unset it to execute the notebooks here"
            )
    for path in NOTEBOOKS:
        if given is not None:
            nb = nbformat.read(given / f"{path.stem}.ipynb", as_version=4)
        else:
            nb = jupytext.read(path)
        # IPython's lexer: the Colab cells' "!git clone" and "%pip" are not Python
        nb.metadata["language_info"] = {"name": "python", "pygments_lexer": "ipython3"}
        nbformat.write(nb, OUT / f"{path.stem}.ipynb")
    if given is not None or mode == "off":
        return "off"
    os.environ.setdefault("JATTN_SMALL", "1")
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return "force"


nb_execution_mode = _copy_notebooks()
nb_execution_raise_on_error = True
nb_execution_timeout = 600
nb_execution_excludepatterns = []
napoleon_use_ivar = True

# ------------------------------------------------------------- the API reference
#
# One page per public module, written here at build time (docs/api/, git-ignored): the
# front modules users import (their whole __all__), then every other public module with
# what its __all__ adds (names not already on a front page). tests/test_docs.py checks the
# built inventory against every public module's __all__.

FRONT = {
    "jattn": "The functional core: scores, masks, softmax, attention, positions, linear and "
    "low-rank attention, context parallelism, Nadaraya-Watson pooling.",
    "jattn.functional.mods": "Masks and score modifiers as functions (``jattn.mods``).",
    "jattn.functional.dispatch": "Which path a call takes, and the selection rule.",
    "jattn.layers": "Flax NNX layers over the core.",
    "jattn.models": "Models built from the layers, and decoding.",
    "jattn.data": "The offline tasks' data.",
    "jattn.train": "The training program.",
    "jattn.training": "The training program's parts: state, steps, checkpoints, sharding.",
    "jattn.viz": "Heatmaps and collecting a model's attention weights.",
    "jattn.explorer": "The interactive attention explorer.",
    "jattn.diagnostics": "What attention attends to: entropy, rollout, head importance.",
    "jattn.interop.torch": "Weights from PyTorch.",
}
API = HERE / "api"


def public_modules() -> list[str]:
    """Every module of the package whose dotted name has no part starting with ``_``."""
    import pkgutil

    import jattn

    found = [m.name for m in pkgutil.walk_packages(jattn.__path__, "jattn.")]
    return ["jattn"] + sorted(m for m in found if not any(p.startswith("_") for p in m.split(".")))


def _is_code(obj) -> bool:
    import inspect

    return inspect.isclass(obj) or inspect.isroutine(obj) or hasattr(obj, "__wrapped__")


def _attr_doc(module: str, name: str, obj) -> list[str]:
    """The doc comment (``#:``) of constant ``name`` where it is defined (any module of
    the package); a constant without one stops the build."""
    import importlib

    for m, docs in _all_attr_docs():
        if ("", name) in docs and getattr(importlib.import_module(m), name, None) is obj:
            return [line for line in docs[("", name)] if line.strip()]
    raise RuntimeError(f"{module}.{name} is public but has no doc comment (#:) where defined")


@functools.cache
def _all_attr_docs() -> list:
    """``(module, its doc comments)`` of every module of the package, read once."""
    import pkgutil

    from sphinx.pycode import ModuleAnalyzer

    import jattn

    names = ["jattn", *(i.name for i in pkgutil.walk_packages(jattn.__path__, "jattn."))]
    return [(m, ModuleAnalyzer.for_module(m).find_attr_docs()) for m in names]


def _write_api() -> None:
    import importlib

    if API.exists():
        shutil.rmtree(API)
    API.mkdir()
    on_front = set()  # (name, object id): constants such as 1 share their ids
    for name in FRONT:
        module = importlib.import_module(name)
        on_front.update((n, id(getattr(module, n))) for n in module.__all__)
    pages = []
    for name in [*FRONT, *(m for m in public_modules() if m not in FRONT)]:
        module = importlib.import_module(name)
        names = list(getattr(module, "__all__", []))
        names = [n for n in names if not isinstance(getattr(module, n), types.ModuleType)]
        if name not in FRONT:
            names = [n for n in names if (n, id(getattr(module, n))) not in on_front]
            if not names:
                continue
        # classes and functions by automodule; constants (imported ones too) by autodata
        from sphinx.pycode import ModuleAnalyzer

        own = {attr for (_, attr) in ModuleAnalyzer.for_module(name).find_attr_docs()}
        code = [n for n in names if _is_code(getattr(module, n)) or n in own]
        data = [n for n in names if n not in code]  # imported constants, or no doc comment
        body = f".. automodule:: {name}\n   :members: {', '.join(code)}\n   :undoc-members:\n"
        for n in data:
            doc = "\n".join("   " + line for line in _attr_doc(name, n, getattr(module, n)))
            body += f"\n.. py:data:: {n}\n   :module: {name}\n\n{doc}\n"
        intro = f"{FRONT[name]}\n\n" if name in FRONT else ""
        (API / f"{name}.md").write_text(f"# `{name}`\n\n{intro}```{{eval-rst}}\n{body}```\n")
        pages.append(name)
    listing = "\n".join(pages)
    (API / "index.md").write_text(
        "# API reference\n\nEvery public function, class and constant, by module. "
        "`import jattn` gives the functional core; the other modules are reachable as "
        "attributes (`jattn.layers`, `jattn.models`, ...) and imported on first use.\n\n"
        f"```{{toctree}}\n:maxdepth: 1\n\n{listing}\n```\n"
    )


_write_api()
