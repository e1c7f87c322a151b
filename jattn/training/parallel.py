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
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from jattn.functional import _checks

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
    # all checked before jax.distributed sees them: int() would truncate 2.5 to 2 and
    # read True as 1, and a bad address fails only inside the coordinator's connect
    given["coordinator_address"] = _check_address(given["coordinator_address"])
    for key in ("num_processes", "process_id"):
        given[key] = _check_count(key, given[key])
    if given["num_processes"] < 1:
        raise ValueError(
            f"num_processes must be >= 1 (the processes in the run), got {given['num_processes']}"
        )
    if not 0 <= given["process_id"] < given["num_processes"]:
        raise ValueError(
            f"process_id={given['process_id']} must be in [0, num_processes="
            f"{given['num_processes']})"
        )
    jax.distributed.initialize(**given)
    return True


def _check_count(key: str, value) -> int:
    """``num_processes`` or ``process_id`` as an int: an int (not a bool), or a string
    of one (``"2"``, as an environment variable or a command line gives it); a float is
    refused, never truncated."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{key} must be an int, got {value!r}") from None
    if not _checks.is_int(value):
        raise TypeError(f"{key} must be an int, got {value!r}{_checks.type_note(value)}")
    return int(value)


def _check_address(address) -> str:
    """``coordinator_address``: a ``"host:port"`` string with a port in [0, 65535]."""
    if not isinstance(address, str):
        raise TypeError(
            f"coordinator_address must be a 'host:port' string (process 0's address), got "
            f"{address!r}{_checks.type_note(address)}"
        )
    host, sep, port = address.rpartition(":")
    if not (sep and host.strip() and port.isdigit() and int(port) <= 65535):
        raise ValueError(
            f"coordinator_address must be 'host:port' (process 0's address, such as "
            f"'10.0.0.1:1234'), got {address!r}"
        )
    return address


def data_parallel_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D mesh ``('data',)`` over the first ``num_devices`` local devices (0: all)."""
    devices = jax.local_devices()
    # an int, not a bool (True is not 1 device), as jattn.training.sharding.make_mesh
    if not _checks.is_int(num_devices) or num_devices < 0:
        raise ValueError(
            f"num_devices must be an int >= 0, got {num_devices!r}{_checks.type_note(num_devices)}"
        )
    num_devices = int(num_devices)
    if num_devices > len(devices):
        raise ValueError(
            f"num_devices={num_devices}, but this process has only {len(devices)} "
            f"local {devices[0].platform} device(s)"
        )
    return Mesh(np.asarray(devices[: num_devices or len(devices)]), ("data",))


def _check_mesh(mesh, *, axis: str | None = None) -> None:
    """A TypeError unless ``mesh`` is a ``jax.sharding.Mesh`` (or ``AbstractMesh``); a
    ValueError unless it has the mesh axis ``axis``."""
    if not isinstance(mesh, Mesh | AbstractMesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh (data_parallel_mesh() or "
            f"jattn.training.sharding.make_mesh()), got {type(mesh).__name__}"
        )
    if axis is not None and axis not in mesh.axis_names:
        raise ValueError(
            f"mesh must have a {axis!r} axis (the batch is split over it), got the axes "
            f"{tuple(mesh.axis_names)}"
        )


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (the train state)."""
    _check_mesh(mesh)
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, *, batch_size: int | None = None) -> NamedSharding:
    """Arrays split along their first (batch) axis over ``'data'``.

    With ``batch_size``, a ValueError unless the ``'data'`` axis size divides it (else
    ``jax.device_put`` with this sharding raises JAX's ``IndivisibleError``)."""
    _check_mesh(mesh, axis="data")
    if batch_size is not None:
        batch_size = _checks.check_size("batch_size", batch_size)
        n = mesh.shape["data"]
        if batch_size % n:
            raise ValueError(
                f"batch_size={batch_size} does not split over the mesh's 'data' axis of {n} "
                f"devices (each takes an equal share): use a multiple of {n}, or a mesh of "
                f"a divisor of {batch_size} devices (data_parallel_mesh(num_devices))"
            )
    return NamedSharding(mesh, PartitionSpec("data"))
