"""Explicit sharding (``jax.make_mesh``'s default axis type) at jattn's boundaries."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def explicit_mesh(arrays):
    """The mesh of the first array sharded over *explicit* mesh axes, else None."""
    for x in arrays:
        if not isinstance(x, jax.Array):  # None, Python and NumPy values: unsharded
            continue
        sharding = getattr(jax.typeof(x), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if mesh is None or mesh.empty or not mesh.explicit_axes:
            continue
        if any(p is not None for p in sharding.spec):
            return mesh
    return None


def sequence_axis(query, key) -> str | None:
    """The one explicit mesh axis that shards ``key``'s S axis (``[..., S, K, H]``) when
    ``query``'s T axis is sharded over it too or not at all (cross-attention from an
    unsharded query to a sharded memory), else None: inputs for context parallelism."""
    mesh = explicit_mesh([query, key])
    if mesh is None:
        return None
    t_entry, s_entry = spec(query)[-3], spec(key)[-3]
    if s_entry is None or t_entry not in (None, s_entry):
        return None
    names = (s_entry,) if isinstance(s_entry, str) else tuple(s_entry)
    return names[0] if len(names) == 1 else None


def spec(x) -> tuple:
    """``x``'s partition spec with one entry per axis."""
    entries = tuple(jax.typeof(x).sharding.spec)
    return entries + (None,) * (x.ndim - len(entries))


def sharding(mesh, *entries) -> NamedSharding:
    return NamedSharding(mesh, P(*entries))


def like(x) -> NamedSharding | None:
    """``x``'s sharding when it is sharded over explicit mesh axes, else None: the
    ``out_sharding`` of a gather indexed by ``x`` (``nnx.Embed``), which explicit
    sharding needs spelled out."""
    mesh = explicit_mesh([x])
    return None if mesh is None else sharding(mesh, *spec(x))


def batch_like(x) -> NamedSharding | None:
    """The sharding of ``x``'s leading (batch) axis alone, when ``x`` is sharded over
    explicit mesh axes, else None: the ``out_sharding`` of a new ``[B, ...]`` array (a
    scan's initial carry must have the sharding type of its updates)."""
    mesh = explicit_mesh([x])
    return None if mesh is None else sharding(mesh, spec(x)[0])


def attention_in_auto_axes(fn, mesh, arrays, *, return_residual: bool):
    """``fn(*arrays)`` for an attention path whose layout a sharding type cannot
    express (batch and heads merged into one axis, a kernel that takes whole arrays),
    with ``mesh``'s explicit axes auto inside (``jax.sharding.auto_axes``), so XLA
    places the work as it does without explicit sharding. The output gets the query's
    (``arrays[0]``) sharding, and the log-sum-exp its ``[..., T, N]`` part."""
    qspec = spec(arrays[0])
    out = sharding(mesh, *qspec[:-1], None)
    if return_residual:
        out = (out, sharding(mesh, *qspec[:-1]))
    arrays = [_to_arrays(a) for a in arrays]  # e.g. lengths given as lists
    return jax.sharding.auto_axes(fn, axes=mesh.explicit_axes, out_sharding=out)(*arrays)


def path_in_auto_axes(path, spec, mesh):
    """``path(spec) -> (out, lse)`` for a checked call whose arrays are sharded over
    ``mesh``'s explicit axes in a way the path's layout cannot express (its ``[B*K, ...]``
    blocks, or ``[T, S]`` scores over a sharded sequence): run in auto axes
    (:func:`attention_in_auto_axes`), the lengths carried in the batch shape."""
    batch = spec.batch_shape

    def run(query, key, value, bias, mask, q_len, kv_len, rng):
        lens = [None if x is None else x.reshape(-1) for x in (q_len, kv_len)]
        inner = spec._replace(
            query=query, key=key, value=value, bias=bias, mask=mask,
            query_seq_lengths=lens[0], key_value_seq_lengths=lens[1], dropout_rng=rng,
        )  # fmt: skip
        out, lse = path(inner)
        return (out, lse) if spec.return_residual else out

    lens = [
        None if x is None else x.reshape(batch)
        for x in (spec.query_seq_lengths, spec.key_value_seq_lengths)
    ]
    arrays = (spec.query, spec.key, spec.value, spec.bias, spec.mask, *lens, spec.dropout_rng)
    result = attention_in_auto_axes(run, mesh, arrays, return_residual=spec.return_residual)
    return result if spec.return_residual else (result, None)


def _to_arrays(x):
    """``x`` as a JAX array unless it is None, an array already, or a dict of them."""
    if x is None or isinstance(x, jax.Array):
        return x
    if isinstance(x, dict):
        return {k: _to_arrays(v) for k, v in x.items()}
    return jnp.asarray(x)


def attention_per_device(fn, mesh, query, key, value):
    """``fn(query, key, value)`` on each device's shard (``jax.shard_map``, no
    communication) when only batch and head axes are sharded, and alike in the three:
    attention is independent per example and head. A kernel that XLA cannot partition
    (Pallas) then runs once per shard instead of on gathered inputs. Returns None when
    T, S or H is sharded, or the specs differ."""
    nb = query.ndim - 3
    specs = [spec(x) for x in (query, key, value)]
    if any(x[nb] is not None or x[nb + 2] is not None for x in specs):
        return None
    qs, ks, vs = specs
    if not (qs[:nb] == ks[:nb] == vs[:nb] and qs[nb + 1] == ks[nb + 1] == vs[nb + 1]):
        return None
    # check_vma=False: a pallas_call's outputs carry no per-axis variance annotation
    run = jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(P(*qs), P(*ks), P(*vs)),
        out_specs=P(*qs[:-1], None),
        check_vma=False,
    )
    return run(query, key, value)
