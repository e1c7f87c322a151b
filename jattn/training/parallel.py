"""Data parallelism for the training program: one mesh axis ``'data'`` over local devices.

The train state is replicated on every device and each batch is split along its first
axis; XLA's SPMD partitioner turns the gradient sum into an all-reduce. On a Colab
TPU (8 cores) the same command then uses all 8; on a one-device CPU nothing changes.
Emulate devices on a CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(set before jax is imported).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["batch_sharding", "data_parallel_mesh", "replicated"]


def data_parallel_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D mesh ``('data',)`` over the first ``num_devices`` local devices (0: all)."""
    devices = jax.local_devices()
    if not isinstance(num_devices, int) or num_devices < 0:
        raise ValueError(f"num_devices must be an int >= 0, got {num_devices!r}")
    if num_devices > len(devices):
        raise ValueError(
            f"num_devices={num_devices}, but this process has only {len(devices)} "
            f"local {devices[0].platform} device(s)"
        )
    return Mesh(np.asarray(devices[: num_devices or len(devices)]), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (the train state)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays split along their first (batch) axis over ``'data'``."""
    return NamedSharding(mesh, PartitionSpec("data"))
