"""jattn: attention mechanisms for JAX and Flax NNX.

The functional core (``jattn.functional``, re-exported here) imports only jax;
the Flax NNX layers live in ``jattn.layers``.
"""

from jattn.functional import *  # noqa: F403
from jattn.functional import __all__ as _functional_all

__version__ = "0.1.0"

__all__ = list(_functional_all)
