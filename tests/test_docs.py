"""The documentation: the site builds with warnings as errors, its API reference covers
every public symbol, and the examples in the docstrings run (doctest).

The build here renders the notebooks without running them (``JATTN_DOCS_NOTEBOOKS=off``:
the notebook tests run them); ``.ci/run`` then builds the site again with the outputs of
those runs, figures included.
"""

from __future__ import annotations

import doctest
import importlib
import os
import pathlib
import pkgutil
import posixpath
import subprocess
import sys
import types

import pytest

import jattn

ROOT = pathlib.Path(__file__).resolve().parents[1]


def public_modules() -> list[str]:
    """Every module of the package whose dotted name has no part starting with ``_``."""
    found = [m.name for m in pkgutil.walk_packages(jattn.__path__, "jattn.")]
    return ["jattn"] + sorted(m for m in found if not any(p.startswith("_") for p in m.split(".")))


def resolve(dotted: str):
    """The object a documented name stands for (None if it names nothing)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for part in parts[i:]:
                obj = getattr(obj, part)
        except AttributeError:
            return None
        return obj
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("sphinx")
    out = tmp_path_factory.mktemp("html")
    env = dict(os.environ, JATTN_DOCS_NOTEBOOKS="off")
    env.pop("JATTN_EXECUTED_NOTEBOOKS", None)
    run = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(ROOT / "docs"), str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, f"the docs build failed:\n{run.stdout[-3000:]}{run.stderr[-6000:]}"
    return out


def test_the_site_builds_with_guides_notebooks_and_api(site):
    pages = {p.relative_to(site).as_posix() for p in site.rglob("*.html")}
    for page in ("index.html", "getting_started.html", "guides/masks.html",
                 "guides/seeing_attention.html", "api/index.html", "api/jattn.html"):  # fmt: skip
        assert page in pages
    for nb in sorted((ROOT / "notebooks").glob("*.py")):
        assert f"notebooks/{nb.stem}.html" in pages, nb.stem
    index = (site / "index.html").read_text(encoding="utf-8")
    assert "guides/linear.html" in index and "api/index.html" in index


def test_the_api_reference_covers_every_public_symbol(site):
    """Every name in every public module's ``__all__`` is documented somewhere (under its
    own module or a module that re-exports it), as the site's inventory says."""
    from sphinx.util.inventory import InventoryFile

    with open(site / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", posixpath.join)
    documented = {name for kind, entries in inventory.items() if kind.startswith("py:")
                  for name in entries}  # fmt: skip
    objects = {}
    for name in documented:
        objects.setdefault(name.rsplit(".", 1)[-1], []).append(resolve(name))
    missing = []
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType):
                found = obj.__name__ in documented
            else:
                found = any(o is obj for o in objects.get(name, []))
            if not found:
                missing.append(f"{module_name}.{name}")
    assert not missing, f"public but missing from the API reference: {missing}"
    assert len(documented) > 400


def test_the_docstring_examples_run():
    """doctest over every public module (the examples a reader copies must work)."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    runner = doctest.DocTestRunner(optionflags=flags)
    seen = set()
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        for test in finder.find(module, module_name):
            if test.examples and test.name not in seen:
                seen.add(test.name)
                runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} docstring examples failed (output above)"
    assert results.attempted >= 20, results  # the examples are found at all
