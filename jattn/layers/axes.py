"""Logical axis names of jattn's parameters, set as NNX sharding metadata.

Every parameter of jattn's layers and models names what each of its axes is, in the
``out_sharding`` metadata of its ``nnx.Param`` (Flax's sharding annotation, read back
with ``nnx.get_partition_spec``). A name says what an axis *is*; a rules table says
which mesh axis, if any, splits it (:data:`jattn.training.sharding.RULES`, one per
parallelism strategy). The vocabulary:

============  ==============================================================
``embed``     D, the model width: embeddings, projection inputs and outputs
``vocab``     a vocabulary: token embeddings, the output projection
``heads``     attention heads, query (N) or key/value (K)
``head_dim``  the features of one head (H, Hv)
``mlp``       the hidden width of a feed-forward or score network, or of a GRU
``norm``      the features of a LayerNorm's scale and bias
``position``  the rows of a learned position table (positions, relative buckets)
``None``      an axis never split (a classifier's classes, kernel widths)
============  ==============================================================

Batches and activations use ``batch`` and ``length`` (the sequence axis).

The annotations set ``eager_sharding=False``: the names are logical, not mesh axes,
so a model builds with or without a mesh in context, exactly as before (Flax's eager
sharding would place each parameter on mesh axes of these names when it is created).
The training program places the state with the rules
(:func:`jattn.training.sharding.state_shardings`).
"""

from __future__ import annotations

__all__ = ["ACTIVATION_NAMES", "NAMES", "names"]

#: The logical names of parameter axes.
NAMES = ("embed", "vocab", "heads", "head_dim", "mlp", "norm", "position")
#: The logical names of batch and activation axes.
ACTIVATION_NAMES = ("batch", "length")


def names(*axes: str | None) -> dict:
    """NNX metadata naming a parameter's axes, one name (or None) per axis:
    ``nnx.Param(value, **names('embed', 'mlp'))``, or a Flax layer's
    ``kernel_metadata=names('embed', 'mlp')``."""
    for name in axes:
        if name is not None and name not in NAMES:
            raise ValueError(f"unknown logical axis name {name!r}; expected one of {NAMES}")
    return {"out_sharding": axes, "eager_sharding": False}
