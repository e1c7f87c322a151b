"""Context parallelism: exact attention over a sequence sharded across devices.

A sequence too long for one device is cut along T over one mesh axis (the *sequence
axis*, of size P). Three strategies give :func:`jattn.dot_product_attention`'s
results from the shards, each with ``jax.shard_map`` and JAX's collectives:

* :func:`ring_attention`: each device keeps its queries; key/value shards travel
  around the axis with ``ppermute``, and each device runs the blocked path on its
  queries against the visiting shard, merging the partial results by their
  log-sum-exp. The backward pass (a custom VJP) rings again: keys and values travel
  with their accumulating gradients, which arrive home after P steps. Memory per
  device is O(T / P) in both passes; P - 1 key/value shards are sent per pass.
* :func:`all_gather_attention`: keys and values are gathered on every device (its
  backward reduce-scatters their gradients), queries stay sharded. O(S) memory per
  device for keys and values, one collective per pass.
* :func:`ulysses_attention` (DeepSpeed-Ulysses): an all-to-all trades the sequence
  shards for head shards, each device attends over the whole sequence for N / P
  heads, and a second all-to-all trades back. Needs N and K divisible by P.

Masks are written once, over *global* positions: ``is_causal``, the window, the
lengths, a ``mask_mod`` and a ``score_mod`` (:mod:`jattn.mods`, e.g. segment ids
for packed documents) see the position each query and key has in the whole sequence,
the global example index and the global head, whatever the strategy and layout.
The ring builds a block table (:func:`jattn.block_mask`) for each pair of shards, so
shard pairs that the mask hides entirely cost no products.

Layouts (``layout=``): ``'contiguous'`` (device d holds positions ``[d*L, (d+1)*L)``,
L = T / P) and ``'zigzag'`` (the sequence cut into 2P chunks, device d holds chunks d
and 2P-1-d: with a causal mask every device then does the same work). Put a
sequence in the zigzag order once, at the input, with :func:`to_zigzag` (the tokens,
and what the model computes per token from them, e.g. the positions it embeds), and
read results back with :func:`from_zigzag`. What a ``mask_mod`` or ``score_mod``
indexes by position (the segment ids of :func:`jattn.mods.segments`, per-position
arrays) stays in the *natural* order: the mods see global positions, so zigzagged
segment ids would be read at the wrong positions, without an error.

The functions take global arrays: sharded over an *explicit* mesh axis
(``jax.make_mesh``'s default axis type; the sequence axis and the mesh are then read
from the query's sharding, batch and head shardings are kept), or any arrays with
``mesh=`` and ``axis_name=`` (or a mesh set with ``jax.set_mesh``). Under explicit
sharding, :func:`jattn.dot_product_attention` runs :func:`ring_attention` by itself
when its query and key are sharded along the sequence over the same mesh axis
(``implementation='ring' | 'all_gather' | 'ulysses'`` chooses).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jattn.functional import _checks, _eager, _finite, _sharding, blocked, dispatch, mods

__all__ = [
    "LAYOUTS",
    "STRATEGIES",
    "all_gather_attention",
    "from_zigzag",
    "ring_attention",
    "to_zigzag",
    "ulysses_attention",
    "zigzag_indices",
]

#: How a sequence is laid out over the devices (:func:`to_zigzag`).
LAYOUTS = ("contiguous", "zigzag")
#: The context-parallel strategies.
STRATEGIES = ("ring", "all_gather", "ulysses")

_FILL, _LOWEST = blocked._FILL, blocked._LOWEST  # the blocked path's fill and running-max start


# ----------------------------------------------------------------------------- layouts


def zigzag_indices(length: int, num_shards: int) -> np.ndarray:
    """``order [T]`` (int32): ``x[order]`` is the zigzag layout of a length-T sequence
    over ``num_shards`` = P devices. The sequence is cut into 2P chunks of T / 2P;
    device d's shard is chunk d followed by chunk 2P - 1 - d, so that under a causal
    mask every device holds one early and one late chunk and does the same work.

    >>> zigzag_indices(8, 2).tolist()
    [0, 1, 6, 7, 2, 3, 4, 5]
    """
    length = _checks.check_size("length", length)
    num_shards = _checks.check_size("num_shards", num_shards)
    if length % (2 * num_shards):
        raise ValueError(
            f"the zigzag layout cuts the sequence into 2 * num_shards = {2 * num_shards} "
            f"equal chunks, but its length {length} is not a multiple of {2 * num_shards}"
        )
    c = length // (2 * num_shards)
    chunks = [(d, 2 * num_shards - 1 - d) for d in range(num_shards)]
    return np.concatenate([np.arange(i * c, (i + 1) * c) for pair in chunks for i in pair]).astype(
        np.int32
    )


def to_zigzag(x: jax.Array, num_shards: int, axis: int = 1) -> jax.Array:
    """``x`` with its sequence axis ``axis`` (1 for ``[B, T, ...]``) in the zigzag order
    (:func:`zigzag_indices`); shard it over P = ``num_shards`` devices afterwards."""
    x = _checks.as_array("x", x)
    axis = _seq_axis(x, axis)
    return _take(x, zigzag_indices(x.shape[axis], num_shards), axis)


def from_zigzag(x: jax.Array, num_shards: int, axis: int = 1) -> jax.Array:
    """The inverse of :func:`to_zigzag`: the sequence axis back in its natural order."""
    x = _checks.as_array("x", x)
    axis = _seq_axis(x, axis)
    order = zigzag_indices(x.shape[axis], num_shards)
    return _take(x, np.argsort(order).astype(np.int32), axis)


def _take(x, order, axis: int):
    """``x`` reordered along ``axis``, keeping its explicit sharding (if any)."""
    index = (slice(None),) * axis + (jnp.asarray(order),)
    return x.at[index].get(out_sharding=_sharding.like(x))


def _seq_axis(x, axis) -> int:
    if not _checks.is_int(axis) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis must be an int in [-{x.ndim}, {x.ndim}), got {axis!r}")
    return int(axis) % x.ndim


def _positions(i, dev0, shard_len: int, num_shards: int, zigzag: bool):
    """Global positions of the indices ``i`` into consecutive shards of ``shard_len``
    (one, or all of them gathered), the first from device ``dev0``."""
    dev, r = dev0 + i // shard_len, i % shard_len
    if not zigzag:
        return dev * shard_len + r
    c = shard_len // 2
    return jnp.where(r < c, dev * c + r, (2 * num_shards - 1 - dev) * c + (r - c))


class _Place(NamedTuple):
    """Static: where a local index lies in the global sequence."""

    q_len: int  # a query shard's length (T / P)
    kv_len: int  # a key shard's length (S / P)
    num_shards: int
    zigzag: bool
    local_batch: tuple[int, ...]
    global_batch: tuple[int, ...]


def _global_example(b, b_offsets, place: _Place):
    """The flattened global example index of the local one ``b`` (the batch axes offset
    by ``b_offsets``, None where unsharded)."""
    if all(o is None for o in b_offsets):
        return b
    idx = jnp.unravel_index(b, place.local_batch)
    idx = [i if o is None else i + o for i, o in zip(idx, b_offsets, strict=True)]
    return jnp.ravel_multi_index(tuple(idx), place.global_batch, mode="clip").astype(jnp.int32)


def _global(mod, place, q_dev, kv_dev, b_offsets, n_off, *args):
    """``mod`` called with the global example index, head and positions."""
    *score, b, n, q, kv = args
    p = place.value
    b = _global_example(b, b_offsets, p)
    if n_off is not None:
        n = n + n_off
    q = _positions(q, q_dev, p.q_len, p.num_shards, p.zigzag)
    kv = _positions(kv, kv_dev, p.kv_len, p.num_shards, p.zigzag)
    return mod(*score, b, n, q, kv)


_global.remaps_heads = True  # the heads it sees are global: checked at the boundary


def _at(mod, place: _Place, q_dev, kv_dev, b_offsets, n_off):
    """``mod`` (over global indices) as a mod over this device's local indices."""
    if mod is None:
        return None
    return mods.Mod(_global, mod, mods._Static(place), q_dev, kv_dev, b_offsets, n_off)


# ------------------------------------------------------------------------ the calls


class _Call(NamedTuple):
    """A checked context-parallel call (static parts)."""

    strategy: str
    mesh: object
    axis: str
    size: int  # P
    layout: str
    batch_entries: tuple  # the batch axes' mesh axes (kept from the query's sharding)
    head_entry: object  # the heads' mesh axes, or None
    pad_q: int
    pad_kv: int


def problems(strategy: str, spec: _checks.AttentionSpec) -> list[str]:
    """What ``strategy`` does not take of a checked call, each with what to do instead
    (empty: it runs). :func:`jattn.functional.dispatch.select` runs the ring by itself
    only for calls without any."""
    found = []
    if spec.bias is not None:
        found.append("a bias array (use a score_mod over global positions)")
    mask = spec.mask  # a key [B, 1, 1, S] or query [B, 1, T, 1] mask is taken
    if mask is not None and mask.ndim >= 2 and mask.shape[-1] > 1 and mask.shape[-2] > 1:
        found.append(
            f"a mask array that varies along both queries and keys (shape {list(mask.shape)}):"
            " write it as a mask_mod over global positions (jattn.mods), or give a key mask "
            "[B, 1, 1, S] / query mask [B, 1, T, 1]"
        )
    if spec.block_mask is not None:
        found.append("a block_mask (built for the whole T x S; pass its mask_mod)")
    if spec.fully_masked != "zeros":
        found.append(f"fully_masked={spec.fully_masked!r} (fully masked rows give zeros)")
    if spec.dropout_rate > 0.0 and strategy != "ring":
        found.append("dropout (ring_attention takes it)")
    return found


def ring_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mesh=None,
    axis_name: str | None = None,
    layout: str = "contiguous",
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    mask_mod=None,
    score_mod=None,
    return_residual: bool = False,
    block_sizes: tuple[int, int] | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
):
    """Exact attention with the sequence sharded over a mesh axis: a ring of key/value
    shards (see the module docstring).

    Args:
      query: ``[..., T, N, H]``, key ``[..., S, K, H]``, value ``[..., S, K, Hv]``:
        global arrays, T and S split over the sequence axis (T and S multiples of P,
        or of 2P for ``'zigzag'``; with ``'contiguous'`` other lengths are padded).
      mesh, axis_name: the mesh and its sequence axis; by default those of the
        query's explicit sharding, else the mesh set by ``jax.set_mesh`` and its only
        axis.
      layout: ``'contiguous'`` or ``'zigzag'`` (:func:`to_zigzag`): how the sequence
        is laid out over the devices.
      scale: as in :func:`jattn.dot_product_attention`, as are ``is_causal``,
        ``query_seq_lengths``, ``key_value_seq_lengths``, ``local_window_size``,
        ``mask_mod``, ``score_mod`` and ``return_residual``, over global positions.
      block_sizes: the blocked path's ``(block_q, block_kv)`` within a shard pair.
      dropout_rate, dropout_rng: dropout on the attention weights, the keep-mask drawn
        at global coordinates: the same weights as one device's dense and blocked paths
        drop (contiguous layout with T a multiple of the devices, or zigzag).

    Returns:
      ``output [..., T, N, Hv]`` (sharded as the query), or ``(output, lse [..., T, N])``.

    Fully masked rows give zeros. Differentiable in reverse mode (a custom VJP that
    rings again).
    """
    return _context(
        "ring", query, key, value, mesh=mesh, axis_name=axis_name, layout=layout,
        block_sizes=block_sizes, options=dict(
            scale=scale, is_causal=is_causal, query_seq_lengths=query_seq_lengths,
            key_value_seq_lengths=key_value_seq_lengths, local_window_size=local_window_size,
            mask_mod=mask_mod, score_mod=score_mod, return_residual=return_residual,
            dropout_rate=dropout_rate, dropout_rng=dropout_rng,
        ),
    )  # fmt: skip


def all_gather_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mesh=None,
    axis_name: str | None = None,
    layout: str = "contiguous",
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    mask_mod=None,
    score_mod=None,
    return_residual: bool = False,
    implementation: str | None = None,
):
    """Exact attention with the sequence sharded over a mesh axis: keys and values
    gathered on every device, queries sharded. Arguments as :func:`ring_attention`;
    ``implementation``: the path each device runs (``None``: chosen as
    :func:`jattn.dot_product_attention` chooses)."""
    return _context(
        "all_gather", query, key, value, mesh=mesh, axis_name=axis_name, layout=layout,
        implementation=implementation, options=dict(
            scale=scale, is_causal=is_causal, query_seq_lengths=query_seq_lengths,
            key_value_seq_lengths=key_value_seq_lengths, local_window_size=local_window_size,
            mask_mod=mask_mod, score_mod=score_mod, return_residual=return_residual,
        ),
    )  # fmt: skip


def ulysses_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mesh=None,
    axis_name: str | None = None,
    layout: str = "contiguous",
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    mask_mod=None,
    score_mod=None,
    return_residual: bool = False,
    implementation: str | None = None,
):
    """Exact attention with the sequence sharded over a mesh axis: an all-to-all from
    sequence shards to head shards and back (DeepSpeed-Ulysses). The query and
    key/value heads (per device, after any head sharding) must be multiples of P.
    Arguments as :func:`all_gather_attention`."""
    return _context(
        "ulysses", query, key, value, mesh=mesh, axis_name=axis_name, layout=layout,
        implementation=implementation, options=dict(
            scale=scale, is_causal=is_causal, query_seq_lengths=query_seq_lengths,
            key_value_seq_lengths=key_value_seq_lengths, local_window_size=local_window_size,
            mask_mod=mask_mod, score_mod=score_mod, return_residual=return_residual,
        ),
    )  # fmt: skip


def run_spec(strategy: str, spec: _checks.AttentionSpec):
    """The path of :func:`jattn.dot_product_attention` for ``implementation=strategy``
    (or sequence-sharded inputs): ``(out, lse or None)``, contiguous layout, the mesh
    and axis from the query's explicit sharding."""
    where = f"dot_product_attention(implementation={strategy!r})"
    out = _run(strategy, spec, mesh=None, axis_name=None, layout="contiguous", where=where)
    return out if spec.return_residual else (out, None)


def _context(strategy, query, key, value, *, mesh, axis_name, layout, options,
             block_sizes=None, implementation=None):  # fmt: skip
    options = {"dropout_rate": 0.0, "dropout_rng": None, **options}
    spec = _checks.check_attention_inputs(
        query, key, value, None, None, same_head_dim=True, fully_masked="zeros", **options,
    )  # fmt: skip
    out = _run(strategy, spec, mesh=mesh, axis_name=axis_name, layout=layout,
               block_sizes=block_sizes, implementation=implementation)  # fmt: skip
    return out


def _run(strategy, spec, *, mesh, axis_name, layout, block_sizes=None, implementation=None,
         where=None):  # fmt: skip
    """Checks what the strategies add to ``dot_product_attention``'s checks, and runs."""
    where = where or f"{strategy}_attention"
    if layout not in LAYOUTS:
        raise ValueError(f"{where}: layout must be one of {LAYOUTS}, got {layout!r}")
    found = problems(strategy, spec)
    if found:
        raise ValueError(f"{where} does not take " + "; ".join(found))
    single = tuple(x for x in dispatch.IMPLEMENTATIONS if x not in STRATEGIES)
    if implementation not in single:
        raise ValueError(
            f"{where}: implementation must be a single-device path, one of {single}, "
            f"got {implementation!r}"
        )
    if block_sizes is not None:  # was a ZeroDivisionError or an IndexError inside
        try:
            block_sizes = blocked.check_block_sizes(block_sizes)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    call = _plan(strategy, where, spec, mesh, axis_name, layout)
    # eagerly one program: op by op, the shard_map's body runs a few seconds a call
    return _eager.run(_execute, (spec,), call, block_sizes, implementation, compile_first=True)


def _execute(spec, call: _Call, block_sizes, implementation):
    """:func:`_run` after its checks: the strategy's ``shard_map`` over the mesh."""
    mask_mod = _mask_array_mod(spec)
    query, key, value = spec.query, spec.key, spec.value
    nb = query.ndim - 3
    if call.pad_q or call.pad_kv:  # contiguous layout only: pad at the end, hide the padding
        pad = [(0, 0)] * nb
        query = jnp.pad(query, pad + [(0, call.pad_q), (0, 0), (0, 0)])
        key = jnp.pad(key, pad + [(0, call.pad_kv), (0, 0), (0, 0)])
        value = jnp.pad(value, pad + [(0, call.pad_kv), (0, 0), (0, 0)])
    t, s = spec.query.shape[-3], spec.key.shape[-3]
    mm = mods.spec_mask_mod(spec)
    if mask_mod is not None:
        mm = mask_mod if mm is None else mods.and_masks(mm, mask_mod)
    if call.pad_kv:  # padding keys are never seen (padding queries are sliced off)
        real = mods.lengths(None, s)
        mm = real if mm is None else mods.and_masks(mm, real)
    mm = None if mm is None else mods.as_mod(mm)
    sm = None
    if spec.score_mod is not None:  # closed-over float arrays become (differentiable) leaves
        example = (jnp.zeros((1,) * 5, jnp.float32), *mods.grid(1, (1, 1), 1, 1))
        sm = mods.as_mod(spec.score_mod, example)
    body = dict(ring=_ring_body, all_gather=_gather_body, ulysses=_ulysses_body)[call.strategy]
    scale = 1.0 / math.sqrt(query.shape[-1]) if spec.scale is None else spec.scale
    static = (call, scale, block_sizes, implementation, spec.return_residual, spec.batch_shape,
              spec.dropout_rate, spec.query.shape[-3], spec.query.shape[-2])  # fmt: skip
    bsp, hsp, ax = call.batch_entries, call.head_entry, call.axis
    qkv_spec = P(*bsp, ax, hsp, None)
    out_specs = P(*bsp, ax, hsp, None)
    if spec.return_residual:
        out_specs = (out_specs, P(*bsp, ax, hsp))
    args = (query, key, value)
    # Python numbers among the mods' parameters as arrays: shard_map takes arrays
    mm, sm = (None if x is None else jax.tree.map(jnp.asarray, x) for x in (mm, sm))
    if getattr(call.mesh, "explicit_axes", ()):  # shard_map takes them as its specs say
        target = jax.sharding.NamedSharding(call.mesh, qkv_spec)
        args = tuple(jax.sharding.reshard(x, target) for x in args)
        whole = jax.sharding.NamedSharding(call.mesh, P())  # the mods' arrays: replicated
        mm, sm = (None if x is None else jax.tree.map(
            lambda a: jax.sharding.reshard(a, whole), x) for x in (mm, sm))  # fmt: skip
    run = jax.shard_map(
        functools.partial(body, static),
        mesh=call.mesh,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, P(), P(), P()),
        out_specs=out_specs,
        check_vma=False,  # the transpose psums the mods' cotangents over the devices
    )
    rng = spec.dropout_rng if spec.dropout_rate > 0.0 else None
    if rng is not None and getattr(call.mesh, "explicit_axes", ()):
        rng = jax.sharding.reshard(rng, jax.sharding.NamedSharding(call.mesh, P()))
    result = run(*args, mm, sm, rng)
    if not (call.pad_q or call.pad_kv):
        return result
    cut = (slice(None),) * nb + (slice(0, t),)

    def unpad(x):  # an explicit sharding cannot split T unevenly: T is gathered first
        if getattr(call.mesh, "explicit_axes", ()):
            spec = (*bsp, None, hsp, None)[: x.ndim]
            x = jax.sharding.reshard(x, jax.sharding.NamedSharding(call.mesh, P(*spec)))
        return x[cut]

    return tuple(unpad(x) for x in result) if spec.return_residual else unpad(result)


def _mask_entry(arr, b, n, q, kv):
    """``arr [B|1, N|1, T|1, S|1]`` at the (global) indices, its size-1 axes broadcast."""
    idx = tuple(0 if size == 1 else i for size, i in zip(arr.shape, (b, n, q, kv), strict=True))
    return arr[idx]


def _mask_array_mod(spec: _checks.AttentionSpec):
    """A key or query ``mask`` array of a call as a mask_mod (None without one)."""
    if spec.mask is None:
        return None
    mask, nb = spec.mask, len(spec.batch_shape)
    mask = mask.reshape((1,) * (nb + 3 - mask.ndim) + mask.shape)
    if any(d != 1 for d in mask.shape[:nb]):  # the batch axes flattened, as the mods see b
        mask = jnp.broadcast_to(mask, spec.batch_shape + mask.shape[nb:])
        mask = mask.reshape((-1,) + mask.shape[nb:])
    else:
        mask = mask.reshape((1,) + mask.shape[nb:])
    return mods.Mod(_mask_entry, mask)


def _plan(strategy, where, spec, mesh, axis_name, layout) -> _Call:
    query, key = spec.query, spec.key
    nb = query.ndim - 3
    explicit = _sharding.explicit_mesh([spec.query, spec.key, spec.value])
    batch_entries, head_entry = (None,) * nb, None
    if explicit is not None:
        mesh = explicit if mesh is None else mesh
        qspec = _sharding.spec(query)
        if axis_name is None:
            axis_name = _sharding.sequence_axis(query, key)
            if axis_name is None:
                raise ValueError(
                    f"{where}: the query's sequence axis is sharded as {qspec[nb]!r} and the "
                    f"key's as {_sharding.spec(key)[nb]!r}; shard both over one mesh axis, "
                    "or name it with axis_name="
                )
        batch_entries = tuple(qspec[:nb])
        head_entry = qspec[nb + 1]
    elif mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty:
            raise ValueError(
                f"{where} needs a mesh: pass mesh= and axis_name=, set one with "
                "jax.set_mesh, or give inputs sharded over an explicit mesh axis"
            )
    names = tuple(mesh.axis_names)
    if axis_name is None:
        if len(names) != 1:
            raise ValueError(f"{where}: name the sequence axis, axis_name= one of {names}")
        axis_name = names[0]
    if axis_name not in names:
        raise ValueError(f"{where}: axis_name={axis_name!r} is not an axis of the mesh {names}")
    for entry in (*batch_entries, head_entry):
        used = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        if axis_name in used:
            raise ValueError(
                f"{where}: the sequence axis {axis_name!r} also shards the batch or heads "
                f"of the query ({_sharding.spec(query)})"
            )
    sizes = dict(mesh.shape)
    size = int(sizes[axis_name])
    n, k = query.shape[-2], key.shape[-2]
    heads = 1 if head_entry is None else _entry_size(head_entry, sizes)
    if n % heads or k % heads:
        head_entry, heads = None, 1  # the heads cannot be split as the query's are
    t, s = query.shape[-3], key.shape[-3]
    chunk = 2 * size if layout == "zigzag" else size
    pad_q, pad_kv = -t % chunk, -s % chunk
    if layout == "zigzag" and (pad_q or pad_kv):
        raise ValueError(
            f"{where}: the zigzag layout needs T and S multiples of 2 * {size} devices = "
            f"{chunk}, got T={t}, S={s} (use the contiguous layout, or pad the sequence)"
        )
    n_l, k_l = n // heads, k // heads  # heads per device before the exchange
    per, group = n_l // size, n_l // k_l
    if strategy == "ulysses" and n_l % size:
        raise ValueError(
            f"ulysses_attention splits the query heads over the {size} devices of axis "
            f"{axis_name!r}: it needs N={n_l} query heads per device a multiple of {size}; "
            "use ring_attention or all_gather_attention"
        )
    if strategy == "ulysses" and k_l % size and per % group and group % per:
        raise ValueError(
            f"ulysses_attention gives each of the {size} devices {per} query heads: with "
            f"K={k_l} key/value heads (not a multiple of {size}) they must be whole groups "
            f"of G={group} query heads or lie within one; use ring_attention or "
            "all_gather_attention"
        )
    return _Call(strategy, mesh, axis_name, size, layout, batch_entries, head_entry, pad_q, pad_kv)


def _entry_size(entry, sizes) -> int:
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(int(sizes[a]) for a in names)


def _entry_index(entry, sizes):
    """This device's index along the (possibly several) mesh axes of ``entry``."""
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    idx = jnp.int32(0)
    for a in names:
        idx = idx * int(sizes[a]) + lax.axis_index(a)
    return idx


def _offsets(call: _Call, q_local_shape, nb: int):
    """This device's offsets of the batch axes (None where unsharded) and heads."""
    sizes = dict(call.mesh.shape)
    b_offsets = tuple(
        None if e is None else _entry_index(e, sizes) * q_local_shape[i]
        for i, e in enumerate(call.batch_entries)
    )
    n_off = None
    if call.head_entry is not None:
        n_off = _entry_index(call.head_entry, sizes) * q_local_shape[nb + 1]
    return b_offsets, n_off


def _place(call: _Call, query, key, gathered: bool = False) -> _Place:
    nb = query.ndim - 3
    local_batch = tuple(query.shape[:nb])
    sizes = dict(call.mesh.shape)
    global_batch = tuple(
        d if e is None else d * _entry_size(e, sizes)
        for d, e in zip(local_batch, call.batch_entries, strict=True)
    )
    t, s = query.shape[-3], key.shape[-3]
    if gathered:  # the local arrays hold every shard, in device order
        t, s = t // call.size, s // call.size
    return _Place(
        t, s, call.size, call.layout == "zigzag", local_batch or (1,), global_batch or (1,)
    )


# ------------------------------------------------------------------ all-gather, Ulysses


def _inner(static, query, key, value, mm, sm, place, q_dev, kv_dev, b_offsets, n_off):
    """Single-device attention on local arrays with the mods at their global indices."""
    call, scale, _, implementation, return_residual = static[:5]
    inner = _checks.check_attention_inputs(
        query, key, value, None, None, same_head_dim=True, query_seq_lengths=None,
        key_value_seq_lengths=None, local_window_size=None, dropout_rate=0.0,
        dropout_rng=None, fully_masked="zeros", scale=scale, return_residual=return_residual,
        mask_mod=_at(mm, place, q_dev, kv_dev, b_offsets, n_off),
        score_mod=_at(sm, place, q_dev, kv_dev, b_offsets, n_off),
    )  # fmt: skip
    out, lse = dispatch.PATHS[dispatch.select(implementation, inner)](inner)
    return (out, lse) if return_residual else out


def _gather_body(static, query, key, value, mm, sm, rng):
    call = static[0]
    nb = query.ndim - 3
    b_offsets, n_off = _offsets(call, query.shape, nb)
    idx = lax.axis_index(call.axis)
    key, value = (lax.all_gather(x, call.axis, axis=nb, tiled=True) for x in (key, value))
    place = _place(call, query, key)._replace(kv_len=key.shape[-3] // call.size)
    return _inner(static, query, key, value, mm, sm, place, idx, 0, b_offsets, n_off)


def _ulysses_body(static, query, key, value, mm, sm, rng):
    call = static[0]
    nb = query.ndim - 3
    b_offsets, n_off = _offsets(call, query.shape, nb)
    idx = lax.axis_index(call.axis)
    heads_here = query.shape[-2] // call.size  # query heads per device after the exchange
    n_off = idx * heads_here if n_off is None else n_off + idx * heads_here

    def to_heads(x):  # [..., L, N, D] -> [..., P*L, N/P, D]
        return lax.all_to_all(x, call.axis, split_axis=nb + 1, concat_axis=nb, tiled=True)

    def to_sequence(x, heads_axis):  # back: [..., P*L, N/P, ...] -> [..., L, N, ...]
        return lax.all_to_all(x, call.axis, split_axis=nb, concat_axis=heads_axis, tiled=True)

    k_l = key.shape[-2]
    query = to_heads(query)
    if k_l % call.size == 0:
        key, value = to_heads(key), to_heads(value)
    else:  # fewer key/value heads than devices (GQA, MQA): gather, keep this device's
        group = query.shape[-2] * call.size // k_l
        count = max(heads_here // group, 1)
        start = idx * heads_here // group
        key, value = (
            lax.dynamic_slice_in_dim(
                lax.all_gather(x, call.axis, axis=nb, tiled=True), start, count, axis=nb + 1
            )
            for x in (key, value)
        )
    place = _place(call, query, key, gathered=True)
    result = _inner(static, query, key, value, mm, sm, place, 0, 0, b_offsets, n_off)
    if not static[4]:
        return to_sequence(result, nb + 1)
    out, lse = result
    return to_sequence(out, nb + 1), to_sequence(lse, nb + 1)


# ------------------------------------------------------------------------------- ring


class _Ring(NamedTuple):
    """Static description of a ring (hashable: the custom VJP's ``nondiff_argnums``)."""

    axis: str
    size: int
    geo: blocked._Geometry  # of one pair of shards
    place: _Place
    mask_def: object  # the mask_mod's treedef, or None
    score_def: object  # the score_mod's (treedef, which leaves are float), or None
    queries_travel: bool  # in the backward pass (else keys and values do)


def _ring_body(static, query, key, value, mm, sm, rng):
    call, scale, block_sizes, _, return_residual, _, rate, t_real, n_global = static
    nb = query.ndim - 3
    b_offsets, n_off = _offsets(call, query.shape, nb)
    t, n, h = query.shape[-3:]
    s, k = key.shape[-3:-1]
    b = math.prod(query.shape[:nb])
    if block_sizes is None:
        block_sizes = _ring_block_sizes(t, s, h, query.dtype, b * n)
    bt, bs = min(block_sizes[0], t), min(block_sizes[1], s)
    geo = blocked._Geometry(
        b=b, k=k, g=n // k, t=t, s=s, bt=bt, bs=bs, causal=False, window=None,
        dropout_rate=rate, fully_masked="zeros", table=mm is not None,
    )  # fmt: skip
    place = _place(call, query, key)
    bad = ()
    if (
        mm is not None or sm is not None
    ):  # non-finite vectors hidden: they reach only the rows that see them
        query, key, value, bad_q, bad_kv = _finite.hide_qkv(query, key, value)
        bad = (blocked._row_blocks(geo, bad_q), blocked._key_rows(geo, bad_kv))
    qb = blocked._query_blocks(geo, query, scale)
    kb, vb = blocked._kv_blocks(geo, key), blocked._kv_blocks(geo, value)
    mleaves, mdef = jax.tree.flatten(mm) if mm is not None else ((), None)
    smf, smo, score_def = blocked._split_score_mod(sm) if sm is not None else ((), (), None)
    # bytes per backward step: queries, output gradients and dq (float32) against keys,
    # values and their float32 gradients
    hv, itemsize = value.shape[-1], query.dtype.itemsize
    q_bytes = t * n * (h * itemsize + hv * value.dtype.itemsize + 4 * h)
    kv_bytes = s * k * (h * itemsize + hv * value.dtype.itemsize + 4 * (h + hv))
    if rate > 0.0:  # the keep-mask at global coordinates (blocked._keep)
        geo = geo._replace(keep_coords=(_keep_coords, (place, t_real, n_global)))
    ring = _Ring(call.axis, call.size, geo, place, mdef, score_def, q_bytes < kv_bytes)
    offsets = (b_offsets, n_off, rng)
    ob, lse = _ring(ring, qb, kb, vb, bad, tuple(mleaves), smf, smo, offsets)
    out = blocked._unblock(geo, ob).reshape(query.shape[:-1] + (value.shape[-1],))
    if not return_residual:
        return out
    return out, blocked._unblock_rows(geo, lse).reshape(query.shape[:-1])


def _keep_coords(static, geo, coords, i, j):
    """The global keep-mask coordinates of tile (i, j) of a pair of shards (the dense
    path's: rows ``(b * N + n) * T + q`` of the whole call, columns the key positions),
    in uint32 as :func:`jattn.functional.blocked._keep` computes them."""
    place, t_real, n_global = static
    q_dev, kv_dev, b_offsets, n_off = coords
    u32 = jnp.uint32
    shape = (geo.b * geo.k, geo.g, geo.bt, 1)
    bk, g, tl = (lax.broadcasted_iota(jnp.int32, shape, d) for d in range(3))
    b, n = bk // geo.k, (bk % geo.k) * geo.g + g
    if n_off is not None:
        n = n + n_off
    b = _global_example(b, b_offsets, place)
    q = _positions(i * geo.bt + tl, q_dev, place.q_len, place.num_shards, place.zigzag)
    row = (b.astype(u32) * u32(n_global) + n.astype(u32)) * u32(t_real) + q.astype(u32)
    cols = j * geo.bs + lax.broadcasted_iota(jnp.int32, (1, 1, 1, geo.bs), 3)
    kv = _positions(cols, kv_dev, place.kv_len, place.num_shards, place.zigzag)
    return row, kv.astype(u32)


def _ring_block_sizes(t: int, s: int, h: int, dtype, batch_heads: int) -> tuple[int, int]:
    """The blocked path's tiles for a pair of shards, halved (the larger side first, down
    to 128) until one float32 tile ``[B*N, block_q, block_kv]`` is at most a quarter of
    a query shard ``[B, T/P, N, H]``: a handful of tiles is live at once, and memory per
    device should shrink with the shard. At T=32768 on 8 devices (N=8, H=64) that is
    (256, 256): 159 MiB per device for forward + backward instead of 175 MiB with the
    single-device default (512, 512), and 16% faster (``benchmarks/bench_context.py``)."""
    bt, bs = blocked.default_block_sizes(t, s, h, dtype, batch_heads=batch_heads)
    bt, bs = min(bt, t), min(bs, s)
    while bt * bs > t * h // 4 and max(bt, bs) > 128:
        if bs >= bt:
            bs //= 2
        else:
            bt //= 2
    return bt, bs


def _pair(ring: _Ring, mleaves, smf, smo, offsets, q_dev, kv_dev):
    """The geometry, block table, mask_mod and score_mod parts of the queries of device
    ``q_dev`` against the key/value shard of device ``kv_dev``."""
    geo, place = ring.geo, ring.place
    b_offsets, n_off, key = offsets
    rng = None if key is None else (key, (q_dev, kv_dev, b_offsets, n_off))
    mm = tab = None
    if ring.mask_def is not None:
        mm = jax.tree.unflatten(ring.mask_def, mleaves)
        mm = _at(mm, place, q_dev, kv_dev, b_offsets, n_off)
        bm = mods._block_mask(mm, geo.t, geo.s, (geo.bt, geo.bs), geo.b, geo.k * geo.g)
        tab = blocked._Table.of(bm, all_partial=False)
    pf, po = (), ()
    if ring.score_def is not None:
        sm = blocked._score_mod(geo._replace(score_def=ring.score_def), smf, smo)
        sm = _at(sm, place, q_dev, kv_dev, b_offsets, n_off)
        pf, po, score_def = blocked._split_score_mod(sm)
        geo = geo._replace(score_def=score_def)
    return geo, tab, mm, pf, po, rng


def _shift(ring: _Ring, *xs):
    """Each array (None stays None) to the next device of the ring."""
    perm = [(i, (i + 1) % ring.size) for i in range(ring.size)]
    return tuple(None if x is None else lax.ppermute(x, ring.axis, perm) for x in xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(ring, qb, kb, vb, bad, mleaves, smf, smo, offsets):
    return _ring_fwd(ring, qb, kb, vb, bad, mleaves, smf, smo, offsets)[0]


def _ring_forward_pair(ring, qb, kb, vb, bad, mleaves, smf, smo, offsets, idx, src, state):
    """Merges this device's queries against the shard of device ``src`` into ``state``."""
    geo, tab, mm, pf, po, rng = _pair(ring, mleaves, smf, smo, offsets, idx, src)
    args = (qb, kb, vb, None, None, None, None, rng, tab, mm, pf, po)
    out, fully, skip, m, log_l = _finite.guarded_by_flags(
        lambda b: blocked._forward(geo, *args, b, f32=True), bad or None
    )
    big_m, big_l, acc, seen, all_fully = state
    ok = ~skip  # rows with visible, finite logits in this pair
    m_new = jnp.where(ok, jnp.maximum(big_m, m), big_m)
    decay = jnp.where(seen, jnp.exp(big_m - m_new), jnp.float32(0.0))
    w = jnp.where(ok, jnp.exp(jnp.where(ok, m - m_new, 0.0) + log_l), jnp.float32(0.0))
    acc = acc * decay[..., None] + out * w[..., None]
    big_l = big_l * decay + w
    # a row that saw a non-finite input (a NaN m, in this pair or before) stays NaN: an
    # elementwise max need not keep a NaN on CPU
    nan_row = jnp.isnan(big_m) | (ok & jnp.isnan(m))
    m_new, big_l = _finite.nan_where(nan_row, m_new), _finite.nan_where(nan_row, big_l)
    acc = _finite.nan_where(nan_row[..., None], acc)
    return m_new, big_l, acc, seen | ok, all_fully & fully


def _ring_fwd(ring, qb, kb, vb, bad, mleaves, smf, smo, offsets):
    idx = lax.axis_index(ring.axis)
    rows = qb.shape[:3]
    state = (
        jnp.full(rows, _LOWEST),
        jnp.zeros(rows, jnp.float32),
        jnp.zeros(rows + (vb.shape[-1],), jnp.float32),
        jnp.zeros(rows, bool),
        jnp.ones(rows, bool),
    )
    bad_q, bad_kv = bad if bad else (None, None)

    def visit(r, kb_r, vb_r, bad_r, state):
        src = (idx - r) % ring.size
        pair_bad = (bad_q, bad_r) if bad else ()
        return _ring_forward_pair(ring, qb, kb_r, vb_r, pair_bad, mleaves, smf, smo, offsets,
                                  idx, src, state)  # fmt: skip

    def step(r, carry):
        *moving, state = carry
        state = visit(r, *moving, state)
        return (*_shift(ring, *moving), state)

    carry = lax.fori_loop(0, ring.size - 1, step, (kb, vb, bad_kv, state))
    big_m, big_l, acc, seen, all_fully = visit(ring.size - 1, *carry)
    l_safe = jnp.where(seen, big_l, jnp.float32(1.0))
    out = jnp.where(seen[..., None], acc / l_safe[..., None], jnp.float32(0.0)).astype(vb.dtype)
    m = jnp.where(seen, big_m, jnp.float32(0.0))
    log_l = jnp.where(seen, jnp.log(l_safe), jnp.float32(0.0))
    lse = jnp.where(seen, m + log_l, jnp.where(all_fully, _FILL, jnp.float32(0.0)))
    res = (qb, kb, vb, bad, mleaves, smf, smo, offsets, out, all_fully, ~seen, m, log_l)
    return (out, lax.stop_gradient(lse)), res


def _ring_bwd(ring, res, cotangents):
    """The ring again. What travels is the cheaper side: keys, values and their
    gradients (``dk``, ``dv``) past stationary queries, or (when fewer bytes: no
    grouped heads) queries, output gradients and their ``dq`` past stationary keys and
    values. The travelling gradients arrive home after one more shift."""
    qb, kb, vb, bad, mleaves, smf, smo, offsets, out, fully, skip, m, log_l = res
    dout = cotangents[0]  # the lse is a residual: no gradient (as dense)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    if bad:  # a row NaN from another shard's bad key: skipped in every pair, clean too
        skip, m, log_l, delta = blocked.skip_nan_rows(skip, m, log_l, delta)
    idx = lax.axis_index(ring.axis)
    bad_q, bad_kv = bad if bad else (None, None)
    zeros = functools.partial(jnp.zeros, dtype=jnp.float32)
    dsm = tuple(zeros(jnp.shape(x)) for x in smf)

    def grads(q_dev, kv_dev, q_side, kv_side, acc, dsm):
        """``acc`` (dq, dk, dv) plus this pair's gradients, summed in place."""
        qb_, dout_, delta_, skip_, m_, log_l_, bad_q_ = q_side
        kb_, vb_, bad_kv_ = kv_side
        geo, tab, mm, pf, po, rng = _pair(ring, mleaves, smf, smo, offsets, q_dev, kv_dev)
        pair_bad = (bad_q_, bad_kv_) if bad else None
        pair = (qb_, kb_, vb_, None, None, None, None, rng, tab, mm, pf, po)
        dq, dk, dv, _, dsm_p = _finite.guarded_by_flags(
            lambda b: blocked._backward(
                geo, (*pair, b, None, fully, skip_, m_, log_l_), dout_, delta_, acc=acc
            ),
            pair_bad,
        )
        return dq, dk, dv, tuple(a + b for a, b in zip(dsm, dsm_p, strict=True))

    q_side = (qb, dout, delta, skip, m, log_l, bad_q)
    kv_side = (kb, vb, bad_kv)
    if ring.queries_travel:

        def visit(r, moving, dk, dv, dsm):
            *q_r, dq_r = moving
            acc = (dq_r, dk, dv)
            dq_r, dk, dv, dsm = grads((idx - r) % ring.size, idx, q_r, kv_side, acc, dsm)
            return (*q_r, dq_r), dk, dv, dsm

        def step(r, carry):
            moving, dk, dv, dsm = visit(r, *carry)
            return _shift(ring, *moving), dk, dv, dsm

        carry = ((*q_side, zeros(qb.shape)), zeros(kb.shape), zeros(vb.shape), dsm)
        carry = lax.fori_loop(0, ring.size - 1, step, carry)
        moving, dk, dv, dsm = visit(ring.size - 1, *carry)
        (dq,) = _shift(ring, moving[-1])  # home
    else:

        def visit(r, moving, dq, dsm):
            *kv_r, dk_r, dv_r = moving
            acc = (dq, dk_r, dv_r)
            dq, dk_r, dv_r, dsm = grads(idx, (idx - r) % ring.size, q_side, kv_r, acc, dsm)
            return (*kv_r, dk_r, dv_r), dq, dsm

        def step(r, carry):
            moving, dq, dsm = visit(r, *carry)
            return _shift(ring, *moving), dq, dsm

        carry = ((*kv_side, zeros(kb.shape), zeros(vb.shape)), zeros(qb.shape), dsm)
        carry = lax.fori_loop(0, ring.size - 1, step, carry)
        moving, dq, dsm = visit(ring.size - 1, *carry)
        dk, dv = _shift(ring, *moving[-2:])  # home
    dsm = tuple(d.astype(jnp.result_type(x)) for d, x in zip(dsm, smf, strict=True))
    return (
        dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), None,
        None, dsm, None, None,
    )  # fmt: skip


_ring.defvjp(_ring_fwd, _ring_bwd)
