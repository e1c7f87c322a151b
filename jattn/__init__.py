"""jattn: attention mechanisms for JAX and Flax NNX.

Layers of the design, from the inside out:

- ``jattn.functional`` (re-exported here): the framework-free core, pure functions
  that import only jax: scores, masks, masked softmax, pooling, attention (dense and
  blocked), positional encodings, Nadaraya-Watson pooling.
- ``jattn.layers``: Flax NNX layers over the core.
- ``jattn.models``: Transformers, RNN seq2seq, decoding.
- ``jattn.viz``, ``jattn.diagnostics``, ``jattn.explorer``: heatmaps, what attention attends
  to, and an interactive explorer (HTML) of a model's weights.
- ``jattn.train``, ``jattn.data``: the training program and its offline tasks.
- ``jattn.interop``: weights from PyTorch.
"""

from jattn.functional import *  # noqa: F403
from jattn.functional import __all__ as _functional_all

__version__ = "0.1.0"

__all__ = list(_functional_all)

#: Submodules reachable as attributes (``jattn.layers``), imported on first use so that
#: ``import jattn`` stays the functional core (no Flax, optax or matplotlib import).
_SUBMODULES = ("data", "demo", "diagnostics", "explorer", "interop", "layers", "models",
               "train", "training", "viz")  # fmt: skip


def __getattr__(name: str):
    if name == "flax_attention_fn":  # a Flax-layer helper: imports Flax on first use
        from jattn.layers.flax_compat import flax_attention_fn

        return flax_attention_fn
    if name in _SUBMODULES:
        import importlib

        module = importlib.import_module(f"jattn.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'jattn' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES))
