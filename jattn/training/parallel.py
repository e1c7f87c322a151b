"""Data parallelism for the training program: one mesh axis ``'data'`` over local devices.

The train state is replicated on every device and each batch is split along its first
axis; XLA's SPMD partitioner turns the gradient sum into an all-reduce. On a Colab
TPU (8 cores) the same command then uses all 8; on a one-device CPU nothing changes.
Emulate devices on a CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(set before jax is imported). Other strategies (fully sharded, tensor, sequence
parallel) are in :mod:`jattn.training.sharding`.

A run of several processes (hosts) calls :func:`initialize_distributed` before anything
touches a device; its meshes then span the devices of every process.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["batch_sharding", "data_parallel_mesh", "initialize_distributed", "replicated"]

# Environment variables read by initialize_distributed (JAX itself reads the first).
DISTRIBUTED_ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Calls ``jax.distributed.initialize`` for a run of several processes, with the
    arguments given or else the environment variables ``JAX_COORDINATOR_ADDRESS``
    (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.

    Returns whether it initialised: not when none of the three is set (one process),
    nor when ``jax.distributed`` is initialised already. Call it before anything
    touches a device. On CPUs the processes' collectives run over TCP (gloo, JAX's
    default ``jax_cpu_collectives_implementation``).
    """
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    for key, env in DISTRIBUTED_ENV.items():
        if given[key] is None and os.environ.get(env):
            given[key] = os.environ[env]
    if all(v is None for v in given.values()) or jax.distributed.is_initialized():
        return False
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(
            f"a run of several processes needs coordinator_address, num_processes and "
            f"process_id (or {', '.join(DISTRIBUTED_ENV.values())}); missing: "
            f"{', '.join(missing)}"
        )
    for key in ("num_processes", "process_id"):
        try:
            given[key] = int(given[key])
        except ValueError:
            raise ValueError(f"{key} must be an int, got {given[key]!r}") from None
    if not 0 <= given["process_id"] < given["num_processes"]:
        raise ValueError(
            f"process_id={given['process_id']} must be in [0, num_processes="
            f"{given['num_processes']})"
        )
    jax.distributed.initialize(**given)
    return True


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
