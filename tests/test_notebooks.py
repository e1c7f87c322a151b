"""Every notebooks/*.py (jupytext py:percent) is converted and executed as a notebook.

One test per notebook, so a new notebook is picked up automatically. The kernel
runs this interpreter (a kernelspec made on the fly points at ``sys.executable``),
in a temporary working directory, with ``JATTN_SMALL=1`` (small sizes) and
matplotlib's inline backend. A failing cell fails the test with the cell's traceback. The
install cell carries the ``skip-execution`` tag, which nbclient honours, so
nothing is installed; Colab ignores the tag and runs it.
"""

import json
import os
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))
KERNEL = "jattn-test-python"
INSTALL = '%pip install -q "jattn @ git+https://github.com/jattn/jattn"'


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "jattn tests",
                "language": "python",
            }
        )
    )
    return root


def test_notebooks_exist():
    names = {p.stem for p in NOTEBOOKS}
    for stem in (
        "01_scores_and_masked_softmax",
        "02_nadaraya_watson",
        "04_multihead_and_positional",
        "06_colab_quickstart",
        "07_long_sequences",
    ):
        assert stem in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_layout(path):
    """Title, Colab badge to the paired .ipynb, a skipped install cell and the size switch."""
    import jupytext

    nb = jupytext.read(path)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), first.source
    badge = f"https://colab.research.google.com/github/jattn/jattn/blob/main/notebooks/{path.stem}.ipynb"
    assert any(c.cell_type == "markdown" and badge in c.source for c in nb.cells), badge
    install = [c for c in nb.cells if c.cell_type == "code" and INSTALL in c.source]
    assert install and "skip-execution" in install[0].metadata.get("tags", []), INSTALL
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert re.search(r'SMALL = os\.environ\.get\("JATTN_SMALL"\) == "1"', code)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path, jupyter_path, monkeypatch):
    import jupytext
    from nbclient import NotebookClient

    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    monkeypatch.setenv("JATTN_SMALL", "1")
    # the kernel's inline backend (no display needed): figures become PNG outputs, which
    # the documentation shows
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = jupytext.read(path)
    client = NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=300,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(cwd=str(tmp_path))  # raises CellExecutionError naming the failing cell
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors
    ran = [c for c in nb.cells if c.cell_type == "code" and c.get("execution_count")]
    assert ran, "no code cell ran"
    keep = os.environ.get("JATTN_EXECUTED_NOTEBOOKS")
    if keep:  # the documentation renders these (docs/conf.py): each notebook runs once in CI
        import nbformat

        os.makedirs(keep, exist_ok=True)
        nbformat.write(nb, os.path.join(keep, f"{path.stem}.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_paired_ipynb_is_in_sync_and_has_no_outputs(path):
    """The committed .ipynb (what the Colab badge opens) has the .py's cells, without outputs.

    Regenerate with ``jupytext --sync notebooks/*.py`` after editing a notebook.
    """
    import jupytext
    import nbformat

    paired = path.with_suffix(".ipynb")
    assert paired.exists(), f"{paired.name} is missing: run jupytext --sync {path}"
    text = jupytext.read(path)
    nb = nbformat.read(paired, as_version=4)
    assert [(c.cell_type, c.source) for c in nb.cells] == [
        (c.cell_type, c.source) for c in text.cells
    ], f"{paired.name} differs from {path.name}: run jupytext --sync {path}"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None
