"""Sharded training: a rules table from logical axis names to mesh axes, per strategy.

jattn's parameters name their axes in NNX sharding metadata (``'embed'``, ``'heads'``,
``'mlp'``, ...: :mod:`jattn.layers.axes`); batches name theirs ``('batch', 'length')``.
A strategy is a mesh (:data:`MESH_AXES`) and rules in Flax's ``LogicalRules`` form,
``(logical name, mesh axis)`` pairs (:data:`RULES`):

- ``'data'``: mesh ``('data',)``; the state replicated, each batch split (the default,
  and the behaviour of jattn before strategies existed).
- ``'fsdp'``: mesh ``('data',)``; batches split as ``'data'``, and each parameter (with
  its optimizer state) split over ``'data'`` along its largest axis that the axis size
  divides. LayerNorm scales and biases (``'norm'``) stay whole.
- ``'tensor'``: mesh ``('data', 'model')``; heads, MLP features and vocabularies split
  over ``'model'``, batches over ``'data'``.
- ``'sequence'``: mesh ``('data', 'seq')``; batches split over ``'data'`` and along
  their sequence axis over ``'seq'``; the state replicated. The attention itself then
  gathers the keys and values.

An axis is split only where the mesh axis size divides it (jit needs even shards), and
a mesh axis splits at most one axis of an array: where the rules give it several, the
largest one (the first on ties). Flax's own resolution does not see shapes:
``nnx.get_partition_spec`` under ``nnx.logical_axis_rules`` renames each axis (an fsdp
kernel would get ``P('data', 'data')``), ``flax.linen.logical_to_mesh_axes`` gives a
mesh axis to the first rule that names an array axis, and both would split an axis of
14 over 8 devices. :func:`mesh_spec` is that resolution with the shape.

>>> mesh = make_mesh("tensor", (4, 2))  # doctest: +SKIP
>>> state = jax.device_put(state, state_shardings(state, mesh, RULES["tensor"]))  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jattn.functional import _checks
from jattn.training.state import make_eval_step, make_train_step

__all__ = [
    "MESH_AXES",
    "RULES",
    "STRATEGIES",
    "batch_shardings",
    "local_copy",
    "make_mesh",
    "mesh_spec",
    "put",
    "resolve_mesh_shape",
    "sharded_eval_step",
    "sharded_train_step",
    "state_shardings",
]

#: The parallelism strategies, the values of ``config.train.parallelism``.
STRATEGIES = ("data", "fsdp", "tensor", "sequence")

#: The mesh axes of each strategy; ``config.train.mesh_shape`` gives their sizes.
MESH_AXES = {
    "data": ("data",),
    "fsdp": ("data",),
    "tensor": ("data", "model"),
    "sequence": ("data", "seq"),
}

#: ``(logical axis name, mesh axis)`` pairs of each strategy (Flax's ``LogicalRules``);
#: a name without a pair is never split.
RULES = {
    "data": (("batch", "data"),),
    "fsdp": (
        ("batch", "data"),
        ("embed", "data"),
        ("vocab", "data"),
        ("heads", "data"),
        ("head_dim", "data"),
        ("mlp", "data"),
        ("position", "data"),
    ),
    "tensor": (("batch", "data"), ("heads", "model"), ("mlp", "model"), ("vocab", "model")),
    "sequence": (("batch", "data"), ("length", "seq")),
}


def _devices(num_devices: int) -> list:
    """The first ``num_devices`` devices of all processes (0: all)."""
    devices = jax.devices()
    if not _checks.is_int(num_devices) or num_devices < 0:  # True is not 1 device
        raise ValueError(
            f"num_devices must be an int >= 0, got {num_devices!r}{_checks.type_note(num_devices)}"
        )
    num_devices = int(num_devices)
    platform = devices[0].platform
    if jax.process_count() == 1 and num_devices > len(devices):
        raise ValueError(
            f"num_devices={num_devices}, but this process has only {len(devices)} "
            f"local {platform} device(s)"
        )
    if jax.process_count() > 1 and num_devices not in (0, len(devices)):
        raise ValueError(
            f"num_devices={num_devices}, but a run of {jax.process_count()} processes uses "
            f"all their {len(devices)} {platform} devices: set it to 0"
        )
    return devices[: num_devices or len(devices)]


def resolve_mesh_shape(parallelism: str, mesh_shape: Sequence[int], num_devices: int) -> tuple:
    """The sizes of the axes of ``parallelism``'s mesh (:data:`MESH_AXES`) over
    ``num_devices`` devices: ``mesh_shape`` with its one ``-1`` (if any) filled in, or,
    for ``()``, every device on the strategy's own axis (``'data'``, ``'model'`` or
    ``'seq'``). Raises ``ValueError`` naming the field that is wrong."""
    if parallelism not in STRATEGIES:
        raise ValueError(
            f"parallelism: unknown strategy {parallelism!r}; expected one of {list(STRATEGIES)}"
        )
    axes = MESH_AXES[parallelism]
    if not isinstance(mesh_shape, tuple | list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and (n > 0 or n == -1) for n in mesh_shape
    ):
        raise ValueError(
            f"mesh_shape must be a tuple of positive ints (one of them may be -1), got "
            f"{mesh_shape!r}"
        )
    shape = tuple(mesh_shape) or (1,) * (len(axes) - 1) + (-1,)
    if len(shape) != len(axes):
        raise ValueError(
            f"mesh_shape={tuple(mesh_shape)} has {len(shape)} sizes, but parallelism "
            f"{parallelism!r} has the mesh axes {axes}: give one size each"
        )
    if shape.count(-1) > 1:
        raise ValueError(f"mesh_shape={tuple(mesh_shape)} has more than one -1")
    known = math.prod(n for n in shape if n != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"mesh_shape={tuple(mesh_shape)}: its other sizes make {known} devices, "
                f"which do not divide the run's {num_devices}"
            )
        shape = tuple(num_devices // known if n == -1 else n for n in shape)
    elif known != num_devices:
        raise ValueError(
            f"mesh_shape={tuple(mesh_shape)} has {known} devices, but the run has "
            f"{num_devices}: make their product {num_devices}, use -1 for one size, or "
            "set num_devices"
        )
    return shape


def make_mesh(parallelism: str = "data", mesh_shape: Sequence[int] = (), num_devices: int = 0):
    """The mesh of ``parallelism`` (:data:`MESH_AXES`) with sizes ``mesh_shape`` (see
    :func:`resolve_mesh_shape`) over the first ``num_devices`` devices (0: all, of
    every process). Its axes are ``Auto``: the train step's shardings come from the
    rules, and XLA lays out what lies between; for ``'sequence'`` they are ``Explicit``,
    so the attention layers see their inputs sharded along the sequence and run ring
    attention (:func:`jattn.ring_attention`; calls with dropout, which the ring does not
    take, are laid out by XLA)."""
    devices = _devices(num_devices)
    shape = resolve_mesh_shape(parallelism, mesh_shape, len(devices))
    names = MESH_AXES[parallelism]
    kind = AxisType.Explicit if parallelism == "sequence" else AxisType.Auto
    return Mesh(np.asarray(devices).reshape(shape), names, axis_types=(kind,) * len(names))


def _check_rules(rules, mesh: Mesh) -> frozenset:
    """``rules`` as a set of ``(logical name, mesh axis)`` pairs: a sequence of pairs of
    strings (Flax's ``LogicalRules``, as :data:`RULES` holds them) whose mesh axes are
    axes of ``mesh`` (or None: never split). A TypeError for anything else (a dict, a
    string, None), a ValueError naming a mesh axis the mesh lacks: either would
    otherwise leave the arrays unsplit without a word."""
    if not hasattr(mesh, "shape") or not hasattr(mesh, "axis_names"):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh (make_mesh()), got {type(mesh).__name__}"
        )
    if isinstance(rules, str | bytes | Mapping) or not isinstance(rules, Sequence):
        raise TypeError(
            "rules must be a sequence of (logical axis name, mesh axis) pairs such as "
            f"RULES['data'] = {RULES['data']!r}, got {rules!r} ({type(rules).__name__})"
        )
    axes = tuple(mesh.axis_names)
    for i, rule in enumerate(rules):
        if (
            not isinstance(rule, tuple | list)
            or len(rule) != 2
            or not isinstance(rule[0], str)
            or not (rule[1] is None or isinstance(rule[1], str))
        ):
            raise TypeError(
                f"rules[{i}] must be a pair (logical axis name, mesh axis) of strings "
                f"(the mesh axis may be None), got {rule!r}"
            )
        if rule[1] is not None and rule[1] not in axes:
            raise ValueError(
                f"rules[{i}] = {tuple(rule)!r} names the mesh axis {rule[1]!r}, but the mesh "
                f"has the axes {axes}"
            )
    return frozenset((name, axis) for name, axis in rules if axis is not None)


def mesh_spec(
    names: Sequence[str | None], shape: Sequence[int], rules, mesh: Mesh
) -> PartitionSpec:
    """The ``PartitionSpec`` of an array of ``shape`` whose axes are named ``names``.

    Each mesh axis splits at most one array axis: of those whose names ``rules`` pair
    with it and whose size it divides, the largest (the first on ties). Names without
    a pair, and ``None``, are not split. Trailing unsplit axes are left out of the spec
    (``P('data')``, not ``P('data', None)``). ``rules`` must be pairs of strings whose
    mesh axes the mesh has (a TypeError or ValueError otherwise, never a silent ``P()``).
    """
    return _mesh_spec(names, shape, _check_rules(rules, mesh), mesh)


def _mesh_spec(names, shape, rules: frozenset, mesh: Mesh) -> PartitionSpec:
    """:func:`mesh_spec` with ``rules`` checked already."""
    if len(names) != len(shape):
        raise ValueError(
            f"{len(names)} axis names {tuple(names)} for an array of shape {list(shape)}"
        )
    axes: list[str | None] = [None] * len(shape)
    for mesh_axis, size in mesh.shape.items():
        fits = [
            i
            for i, name in enumerate(names)
            if axes[i] is None and (name, mesh_axis) in rules and shape[i] % size == 0
        ]
        if fits:
            axes[max(fits, key=lambda i: shape[i])] = mesh_axis
    while axes and axes[-1] is None:
        axes.pop()
    return PartitionSpec(*axes)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: Mesh, rules):
    """``NamedSharding``s for every array of ``state`` (a pytree of ``nnx.Variable``s
    and arrays, such as a :class:`~jattn.training.state.TrainState`, whose optimizer
    state holds copies of the parameters' Variables): a Variable's from the axis names
    of its ``out_sharding`` metadata (:func:`mesh_spec`), anything else replicated.
    The result has the structure of ``state`` (the Variables hold the shardings, as
    ``nnx.get_named_sharding`` returns them), so it serves ``jax.device_put`` and
    ``jax.lax.with_sharding_constraint``; it works on abstract and traced states too."""

    checked = _check_rules(rules, mesh)

    def one(x):
        if not _is_variable(x):
            return NamedSharding(mesh, PartitionSpec())
        shape = x.get_value().shape
        names = x.get_metadata().get("out_sharding") or (None,) * len(shape)
        return x.replace(NamedSharding(mesh, _mesh_spec(tuple(names), shape, checked, mesh)))

    return jax.tree.map(one, state, is_leaf=_is_variable)


def batch_shardings(batch, mesh: Mesh, rules):
    """``NamedSharding``s for a batch (a pytree of arrays ``[B, L, ...]``, axes named
    ``('batch', 'length')``)."""

    checked = _check_rules(rules, mesh)

    def one(x):
        ndim = len(np.shape(x))
        names = ("batch", "length")[:ndim] + (None,) * max(ndim - 2, 0)
        return NamedSharding(mesh, _mesh_spec(names, np.shape(x), checked, mesh))

    return jax.tree.map(one, batch)


def put(tree, shardings):
    """``jax.device_put(tree, shardings)`` that also makes global arrays in a run of
    several processes, from the same host values on each (a typed PRNG key goes
    through its key data, which ``device_put`` cannot send to other processes'
    devices)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.device_put(jax.random.key_data(x), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.device_put(x, sharding)

    return jax.tree.map(one, tree, shardings)


def local_copy(tree):
    """``tree`` with each array that spans other processes' devices replaced by a copy
    of its whole value on this process (a collective: every process calls it)."""

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = multihost_utils.process_allgather(jax.random.key_data(x), tiled=True)
            return jax.random.wrap_key_data(jnp.asarray(data), impl=jax.random.key_impl(x))
        return jnp.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def _constrain(tree, shardings, mesh: Mesh):
    """``tree`` laid out as ``shardings``: a constraint on an Auto mesh, a ``reshard`` on
    an Explicit one (where layouts are part of the types)."""
    if mesh.axis_types and all(t == AxisType.Explicit for t in mesh.axis_types):
        return jax.sharding.reshard(tree, shardings)
    return jax.lax.with_sharding_constraint(tree, shardings)


@functools.lru_cache(maxsize=16)
def sharded_train_step(
    graphdef, tx, *, label_smoothing: float, pad_id: int = 0, mesh, rules, kind: str = "seq2seq"
):
    """:func:`~jattn.training.state.make_train_step` on ``mesh``: the state laid out by
    ``rules`` (:func:`state_shardings`: the parameters and their optimizer state as
    their axis names say, the rest replicated), the batch by :func:`batch_shardings`,
    the metrics replicated. Pass the state and batch placed so (:func:`put`): the step
    then compiles once, its outputs laid out as its inputs. ``state`` is donated.
    Cached on its arguments, as ``make_train_step``.

    The layout is a function of the state (its Variables' metadata), so it is set by
    constraints inside the step rather than ``jit``'s ``in_shardings`` (which would
    have to be built from a state before the cache lookup); ``make_train_step``'s
    unplaced step runs between them, traced inline.
    """
    step = make_train_step(graphdef, tx, label_smoothing=label_smoothing, pad_id=pad_id, kind=kind)
    replicated = NamedSharding(mesh, PartitionSpec())

    def train_step(state, batch, learning_rate):
        state = _constrain(state, state_shardings(state, mesh, rules), mesh)
        batch = _constrain(batch, batch_shardings(batch, mesh, rules), mesh)
        state, metrics = step(state, batch, learning_rate)  # traced inline
        state = _constrain(state, state_shardings(state, mesh, rules), mesh)
        return state, _constrain(metrics, replicated, mesh)

    return jax.jit(train_step, donate_argnums=0)


@functools.lru_cache(maxsize=16)
def sharded_eval_step(
    graphdef,
    *,
    max_len: int,
    beam_size: int,
    length_penalty: float,
    pad_id: int = 0,
    mesh,
    rules,
    kind: str = "seq2seq",
):
    """:func:`~jattn.training.state.make_eval_step` on ``mesh``: parameters and batch
    laid out as by :func:`sharded_train_step`, the outputs replicated (every process
    reads them whole)."""
    step = make_eval_step(
        graphdef,
        max_len=max_len,
        beam_size=beam_size,
        length_penalty=length_penalty,
        pad_id=pad_id,
        kind=kind,
    )
    replicated = NamedSharding(mesh, PartitionSpec())

    def eval_step(params, rest, batch):
        params = _constrain(params, state_shardings(params, mesh, rules), mesh)
        rest = _constrain(rest, state_shardings(rest, mesh, rules), mesh)
        batch = _constrain(batch, batch_shardings(batch, mesh, rules), mesh)
        return _constrain(step(params, rest, batch), replicated, mesh)

    return jax.jit(eval_step)
