"""The package's shape: the functional core imports only jax, and every export exists."""

import subprocess
import sys

import pytest

import jattn
import jattn.interop
import jattn.layers
import jattn.models


def test_functional_core_imports_only_jax():
    code = (
        "import sys, jattn, jattn.functional, jattn.functional.vision\n"
        "heavy = ('flax', 'optax', 'orbax', 'ml_collections', 'matplotlib', 'scipy', 'torch')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_export_exists():
    for module in (jattn, jattn.layers, jattn.models, jattn.interop):
        missing = [name for name in module.__all__ if not hasattr(module, name)]
        assert not missing, (module.__name__, missing)


def test_submodules_are_attributes_imported_lazily():
    """``jattn.layers`` etc. work after ``import jattn`` alone, which imports no Flax."""
    code = (
        "import sys, jattn; assert 'flax' not in sys.modules; "
        "assert jattn.layers.MultiHeadAttention and jattn.models.DecoderLM and jattn.viz; "
        "assert {'layers', 'models', 'train'} <= set(dir(jattn)); "
        "import pathlib; assert (pathlib.Path(jattn.__file__).parent / 'py.typed').exists()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="module 'jattn' has no attribute 'layer'"):
        jattn.layer  # noqa: B018
