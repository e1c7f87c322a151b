"""Blocked exact attention: online softmax over key blocks, O(T * H) memory both ways.

The algorithm of Rabe & Staats (2021, "Self-attention Does Not Need O(n^2)
Memory") and FlashAttention-2: queries are cut into blocks of ``bt`` rows, keys and
values into blocks of ``bs``; for one query block a loop over key blocks keeps the
running row max ``m``, the running denominator ``l`` and the unnormalised output
``acc`` in float32, so no ``[T, S]`` matrix ever exists. The backward pass (a
``jax.custom_vjp``) recomputes each block's probabilities from the saved row
max and ``log(l)`` (kept apart, not summed into one log-sum-exp, whose float32
cannot hold ``log(l)`` when the logits are near -1e9) instead of storing them.

Layout (what makes it fast on CPU): all heads of a block go through one batched
matrix product. Grouped query heads become rows: a query block is
``[B*K, G*bt, H]`` against a key block ``[B*K, bs, H]``, so keys and values are
never copied per query head. Causal and windowed attention only visit the key
blocks a query block can see (``fori_loop`` bounds computed per block), and only
blocks that cross a mask boundary pay for building the structural mask: the range
of blocks that need no mask is solved from the geometry, and each row of tiles runs
as three loops (masked, plain, masked) rather than one loop with a ``lax.cond``.

Semantics are those of :func:`jattn.functional.attention.dot_product_attention`
(masked logits get :data:`MASK_FILL`, ``fully_masked`` decides a row without any
visible key, the returned log-sum-exp is that of the filled logits and carries no
gradient), with two documented differences:

* with ``fully_masked='uniform'`` the uniform weights of a fully masked row are
  not dropped out. Otherwise dropout draws the dense path's keep-mask
  (:mod:`jattn.functional.stochastic` hashes global coordinates), so the two paths
  drop the same weights.
* a row whose visible logits are all at or below ``MASK_FILL`` (about
  ``-2.4e38``) gives zeros and lse 0. For ``-inf`` (e.g. a ``-inf`` bias on every
  visible key) that is the dense result too; dense still takes the softmax of
  finite logits below the fill.

Whether a row is fully masked (has no visible key) is tracked from the mask and the
structure, never from the logits, so it does not depend on the block sizes.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jattn.functional import _checks, _eager, _finite, _sharding, mods, tiles
from jattn.functional.softmax import MASK_FILL, FullyMasked
from jattn.functional.stochastic import keep_bits

__all__ = ["MAX_TILE_ELEMENTS", "attend", "blocked_attention", "default_block_sizes"]

_FILL = np.float32(MASK_FILL)
# Padding keys and the running max's start: the lowest finite float, below the fill.
# No -inf is made on any path (``jax.debug_infs`` stays quiet).
_LOWEST = np.float32(np.finfo(np.float32).min)


#: Largest tile ``[B*N, block_q, block_kv]`` (elements) the default block sizes allow.
MAX_TILE_ELEMENTS = 1 << 23


def default_block_sizes(
    t: int,
    s: int,
    h: int,
    dtype=jnp.float32,
    *,
    masked_band: bool = False,
    batch_heads: int = 1,
    window: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """``(block_q, block_kv)`` for the blocked path.

    On CPU the tiles ``[B*K, G*block_q, block_kv]`` keep each matrix product large:
    for H=64 and B*N=8, ``(512, 512)`` beat ``(256, 512)`` by 5-10% at every T from
    1024 to 8192 in an interleaved sweep on an idle 2-core machine
    (BENCHMARKS.md); with a causal mask or a window (``masked_band``)
    ``(512, 256)`` visits few wasted tiles on the diagonal and ran causal T=4096
    1.54-1.72x faster than non-causal across runs, against 1.2x for ``(256, 256)``,
    whose products are too small (256x256 tiles cost 1.6x more per element). Tiles
    are halved (query block first, down to 128) while
    ``batch_heads * block_q * block_kv`` (``batch_heads`` = B*N) exceeds
    :data:`MAX_TILE_ELEMENTS` (32 MiB of float32), so many heads or a big batch do
    not blow up the working set. The same sizes serve GPU and TPU, where the blocked
    path runs (for inputs cuDNN/Pallas do not take, once dense scores are large) as a
    sequential loop over tiles in XLA: large tiles mean few iterations (not yet
    measured on a GPU; ``benchmarks/bench_gpu.py``).
    """
    del dtype
    if window is not None and h <= 128 and min(t, s) >= 1024:
        sizes = _window_blocks(t, s, window, MAX_TILE_ELEMENTS // batch_heads)
        if sizes is not None:
            return sizes
    if h > 128:
        bq, bk = 128, 256
    else:
        bq, bk = (512, 256) if masked_band else (512, 512)
    while batch_heads * bq * bk > MAX_TILE_ELEMENTS and max(bq, bk) > 128:
        if bq >= bk:
            bq //= 2
        else:
            bk //= 2
    return min(bq, t), min(bk, s)


def _window_blocks(t: int, s: int, window: tuple[int, int], max_tile: int):
    """The cheapest candidate tiles (:func:`jattn.functional.tiles.cheapest`) for a
    ``(left, right)`` window: each query block visits the key blocks its band touches."""
    left, right = window
    visited = {}
    for bq, bk in tiles.CANDIDATES:
        if bq > t or bk > s or bq * bk > max_tile:
            continue
        q_min = np.arange(0, t, bq)
        q_max = np.minimum(q_min + bq, t) - 1
        lo = np.clip((q_min - left) // bk, 0, None)
        hi = np.minimum((q_max + right) // bk + 1, -(-s // bk))
        visited[bq, bk] = int(np.maximum(hi - lo, 1).sum()) * bq * bk
    return tiles.cheapest(visited) if visited else None


class _Geometry(NamedTuple):
    """Static description of one blocked call (hashable: a ``nondiff_argnum``)."""

    b: int  # flattened batch
    k: int  # key/value heads
    g: int  # query heads per key/value head
    t: int  # real query length
    s: int  # real key length
    bt: int  # query block
    bs: int  # key block
    causal: bool
    window: tuple[int, int] | None
    dropout_rate: float
    fully_masked: str
    table: bool = False  # a block table (from a mask_mod or a BlockMask) drives the loops
    score_def: object = None  # the score_mod's (treedef, float-leaf positions), if any
    # ``(fn, static)`` when the tiles are a shard of a longer sequence (the ring): the
    # dropout rng is then ``(key, coords)`` and ``fn(static, geo, coords, i, j)`` gives
    # tile (i, j)'s global keep-mask rows and columns
    keep_coords: object = None


class _Table(NamedTuple):
    """A :class:`jattn.BlockMask`'s tables: for each query block, the key blocks to visit
    (partial first, then full), and the transposed tables for the backward pass."""

    kv_indices: jax.Array  # [nq, nk]
    kv_num_partial: jax.Array  # [nq]
    kv_num_full: jax.Array  # [nq]
    q_indices: jax.Array  # [nk, nq]
    q_num_partial: jax.Array  # [nk]
    q_num_full: jax.Array  # [nk]

    @classmethod
    def of(cls, bm, *, all_partial: bool) -> _Table:
        """``bm``'s tables; with ``all_partial`` its full blocks are masked too (another
        mask applies on top of the one it was built for)."""
        kv = (bm.kv_num_partial, bm.kv_num_full)
        q = (bm.q_num_partial, bm.q_num_full)
        if all_partial:
            kv, q = ((p + f, jnp.zeros_like(f)) for p, f in (kv, q))
        return cls(bm.kv_indices, *kv, bm.q_indices, *q)


def _nblocks(n: int, block: int) -> int:
    return -(-n // block)


def _dot(a, b, contract):
    """Batched matmul over axis 0, float32 accumulation."""
    return lax.dot_general(a, b, (contract, ((0,), (0,))), preferred_element_type=jnp.float32)


def _tile_starts(shape, geo: _Geometry, i, j):
    """Where tile (i, j) starts in a ``[B|1, K|1, G|1, Tp|1, Sp|1]`` bias or mask, as
    int32 (Python ints would be int64 under x64, and the slice needs one type)."""
    starts = (0, 0, 0, i * geo.bt if shape[3] > 1 else 0, j * geo.bs if shape[4] > 1 else 0)
    return tuple(jnp.asarray(s, jnp.int32) for s in starts)


def _block(x, geo: _Geometry, i, j):
    """The ``[B|1, K|1, G|1, bt|1, bs|1]`` tile (i, j) of a broadcastable bias or mask."""
    sizes = x.shape[:3] + (geo.bt if x.shape[3] > 1 else 1, geo.bs if x.shape[4] > 1 else 1)
    return lax.dynamic_slice(x, _tile_starts(x.shape, geo, i, j), sizes)


def _visible(geo: _Geometry, i, j, q_len, kv_len, mm=None):
    """Visibility of tile (i, j): the mask_mod of the causal mask, the window and the
    lengths (:func:`jattn.mods.shortcut_mask_mod`), or with a block table the call's
    whole mask_mod ``mm``; and which keys are real (not padding).

    Returns ``(visible, real_key)``: booleans that broadcast to ``[B, K, G, bt, bs]``.
    """
    if not geo.table:
        mm = mods.shortcut_mask_mod(geo.causal, geo.window, q_len, kv_len)
    index = _mod_index(geo, i, j)
    vis = jnp.ones((1,) * 5, bool) if mm is None else mods.call_mask(mm, *index)
    return vis, index[3] < geo.s


def _has_structure(geo: _Geometry, q_len, kv_len) -> bool:
    return (
        geo.causal
        or geo.window is not None
        or q_len is not None
        or kv_len is not None
        or geo.s % geo.bs != 0
    )


def _kv_range(geo: _Geometry, i, kv_len):
    """Key blocks ``[lo, hi)`` that query block i can see (at least one)."""
    nk = _nblocks(geo.s, geo.bs)
    q_min = i * geo.bt
    q_max = jnp.minimum((i + 1) * geo.bt, geo.t) - 1
    lo, hi = jnp.int32(0), jnp.int32(nk)
    if geo.causal:
        hi = jnp.minimum(hi, q_max // geo.bs + 1)
    if geo.window is not None:
        left, right = geo.window
        lo = jnp.maximum(lo, (q_min - left) // geo.bs)
        hi = jnp.minimum(hi, (q_max + right) // geo.bs + 1)
    if kv_len is not None:
        hi = jnp.minimum(hi, _nblocks_traced(jnp.max(kv_len), geo.bs))
    # At least one visited block: a fully masked row gets its fill (and lse) from it.
    lo = jnp.clip(lo, 0, nk - 1)
    return lo, jnp.maximum(hi, lo + 1)


def _q_range(geo: _Geometry, j, q_len, kv_len):
    """Query blocks ``[lo, hi)`` that see some key of key block j (may be empty)."""
    nq = _nblocks(geo.t, geo.bt)
    k_min = j * geo.bs
    k_max = jnp.minimum((j + 1) * geo.bs, geo.s) - 1
    lo, hi = jnp.int32(0), jnp.int32(nq)
    if geo.causal:
        lo = jnp.maximum(lo, k_min // geo.bt)
    if geo.window is not None:
        left, right = geo.window
        lo = jnp.maximum(lo, (k_min - right) // geo.bt)
        hi = jnp.minimum(hi, (k_max + left) // geo.bt + 1)
    if q_len is not None:
        hi = jnp.minimum(hi, _nblocks_traced(jnp.max(q_len), geo.bt))
    if kv_len is not None:
        hi = jnp.where(k_min >= jnp.max(kv_len), lo, hi)
    return lo, jnp.maximum(hi, lo)


def _nblocks_traced(n, block: int):
    return (n + block - 1) // block


def _mod_index(geo: _Geometry, i, j):
    """``b, n, q_idx, kv_idx`` of tile (i, j), broadcasting to ``[B, K, G, bt, bs]``."""
    return mods.grid(geo.b, (geo.k, geo.g), geo.bt, geo.bs, i * geo.bt, j * geo.bs)


def _score_mod(geo: _Geometry, smf, smo):
    """The score_mod rebuilt from its float leaves ``smf`` and other leaves ``smo``."""
    treedef, is_float = geo.score_def
    fl, ot = iter(smf), iter(smo)
    return jax.tree.unflatten(treedef, [next(fl) if f else next(ot) for f in is_float])


def _split_score_mod(sm):
    """``(float leaves, other leaves, (treedef, which leaves are float))`` of a score_mod:
    the float leaves are the custom VJP's differentiable argument."""
    leaves, treedef = jax.tree.flatten(sm)
    is_float = tuple(
        isinstance(x, float) or jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in leaves
    )
    smf = tuple(x for x, f in zip(leaves, is_float, strict=True) if f)
    smo = tuple(x for x, f in zip(leaves, is_float, strict=True) if not f)
    return smf, smo, (treedef, is_float)


def _logits(
    geo: _Geometry, qi, kj, bias, mask, q_len, kv_len, i, j, structured: bool, mods_=None,
    vjp: bool = False,
):  # fmt: skip
    """Logits ``[B*K, G*bt, bs]`` of tile (i, j) (the query is scaled already).

    Masked entries are filled with :data:`MASK_FILL`, padding keys with ``-inf``. ``mods_``:
    ``(mask_mod, score_mod)`` of a call with a block table or a score_mod. With
    ``vjp`` (and a score_mod) the result ``(s,)`` has a second entry, the score_mod's VJP
    at this tile: ``d logits -> (d scaled logits, d float leaves)``. Non-finite inputs
    are cleaned before; the rows that see one are flagged apart (:func:`_sees_bad`).
    """
    mm, sm = (None, None) if mods_ is None else mods_
    s = _dot(qi, kj, ((2,), (2,)))
    if bias is None and mask is None and not structured and sm is None:
        return (s,)
    s = s.reshape(geo.b, geo.k, geo.g, geo.bt, geo.bs)
    index = _mod_index(geo, i, j)
    if sm is not None and vjp:
        smf, smo, _ = _split_score_mod(sm)
        s, vjp_fn = jax.vjp(
            lambda r, fl: mods.call_score(_score_mod(geo, fl, smo), r, *index), s, smf
        )
        s = _finish(geo, s, bias, mask, q_len, kv_len, i, j, structured, mm)
        return s, vjp_fn
    if sm is not None:
        s = mods.call_score(sm, s, *index)
    return (_finish(geo, s, bias, mask, q_len, kv_len, i, j, structured, mm),)


def _finish(geo: _Geometry, s, bias, mask, q_len, kv_len, i, j, structured: bool, mm):
    """The ``[B, K, G, bt, bs]`` logits of tile (i, j) with the bias added and the
    masks applied, as ``[B*K, G*bt, bs]``."""
    if bias is not None:
        s = s + _block(bias, geo, i, j).astype(jnp.float32)
    if mask is not None:
        s = jnp.where(_block(mask, geo, i, j), s, _FILL)
    if structured:
        vis, real = _visible(geo, i, j, q_len, kv_len, mm)
        s = jnp.where(vis, s, _FILL)
        if geo.s % geo.bs:
            s = jnp.where(real, s, _LOWEST)  # padding keys count for nothing
    return s.reshape(geo.b * geo.k, geo.g * geo.bt, geo.bs)


def _tile_visible(geo: _Geometry, mask, q_len, kv_len, i, j, structured: bool, mm=None):
    """The pairs of tile (i, j) that the mask and the structure show, a boolean that
    broadcasts to ``[B, K, G, bt, bs]``, or None when nothing hides any."""
    visible = None if mask is None else _block(mask, geo, i, j)
    if structured:
        vis, real = _visible(geo, i, j, q_len, kv_len, mm)
        visible = vis & real if visible is None else visible & vis & real
    return visible


def _tile_rows(geo: _Geometry, rows):
    """Row flags ``[B|1, K|1, G|1, bt]`` as ``[B*K, G*bt]``."""
    return jnp.broadcast_to(rows, (geo.b, geo.k, geo.g, geo.bt)).reshape(
        geo.b * geo.k, geo.g * geo.bt
    )


def _seen(geo: _Geometry, visible):
    """Which rows ``[B*K, G*bt]`` of a tile see a real key through ``visible`` (of
    :func:`_tile_visible`, not None). Reduced before it is broadcast to the heads."""
    return _tile_rows(geo, jnp.any(visible, axis=-1))


def _sees_bad(geo: _Geometry, visible, bad):
    """Which rows ``[B*K, G*bt]`` of a tile see a non-finite input: a bad key of
    ``bad[1] [B*K, bs]`` through ``visible`` (of :func:`_tile_visible`), or a bad query
    of ``bad[0] [B*K, G*bt]`` that sees any key. Flags, not NaN logits: a NaN in a row's
    max is not kept by XLA's vectorised reductions on CPU (a row 16 or more keys past
    the NaN one came out 0, not NaN)."""
    rows = bad[0].reshape(geo.b, geo.k, geo.g, geo.bt)
    cols = bad[1].reshape(geo.b, geo.k, 1, geo.bs)
    return _tile_rows(geo, _finite.nan_rows(visible, rows, cols))


def _seen_by_structure(geo: _Geometry, i, q_len, kv_len):
    """Which rows ``[B*K, G*bt]`` of query block i see a real key through the causal
    mask, the window and the lengths (no boolean mask): those whose visible key range
    ``[lo, hi]`` is not empty. Closed form, so the tiles need not reduce anything."""
    q = i * geo.bt + jnp.arange(geo.bt, dtype=jnp.int32)  # [bt]
    lo = jnp.zeros_like(q)
    hi = jnp.full_like(q, geo.s - 1)
    if geo.causal:
        hi = jnp.minimum(hi, q)
    if geo.window is not None:
        left, right = geo.window
        lo = jnp.maximum(lo, q - left)
        hi = jnp.minimum(hi, q + right)
    hi = hi[None, :]  # [B|1, bt]
    if kv_len is not None:
        hi = jnp.minimum(hi, kv_len[:, None] - 1)
    seen = lo[None, :] <= hi
    if q_len is not None:
        seen = seen & (q[None, :] < q_len[:, None])
    return _tile_rows(geo, seen[:, None, None, :])


def _cdiv(a, b: int):
    return -((-a) // b)


def _plain_kv_blocks(geo: _Geometry, i, q_len, kv_len):
    """Key blocks ``[a, b)`` whose tile with query block i needs no structural mask
    (exactly the tiles on which :func:`_visible` is all True; may be empty)."""
    nk = _nblocks(geo.s, geo.bs)
    q_min, q_max = i * geo.bt, (i + 1) * geo.bt - 1
    a, b = jnp.int32(0), jnp.int32(nk - 1 if geo.s % geo.bs else nk)
    if geo.causal:  # k_max <= q_min
        b = jnp.minimum(b, (q_min + 1) // geo.bs)
    if geo.window is not None:  # q_max - left <= k_min and k_max <= q_min + right
        left, right = geo.window
        a = jnp.maximum(a, _cdiv(q_max - left, geo.bs))
        b = jnp.minimum(b, (q_min + right + 1) // geo.bs)
    if kv_len is not None:  # k_max < min(kv_len)
        b = jnp.minimum(b, jnp.min(kv_len) // geo.bs)
    if q_len is not None:  # q_max < min(q_len), else no tile of this row is plain
        b = jnp.where(q_max >= jnp.min(q_len), a, b)
    return a, b


def _plain_q_blocks(geo: _Geometry, j, q_len, kv_len):
    """Query blocks ``[a, b)`` whose tile with key block j needs no structural mask."""
    nq = _nblocks(geo.t, geo.bt)
    k_min, k_max = j * geo.bs, (j + 1) * geo.bs - 1
    a, b = jnp.int32(0), jnp.int32(nq)
    if geo.s % geo.bs:  # the last key block holds padding
        b = jnp.where(k_max >= geo.s, a, b)
    if geo.causal:  # q_min >= k_max
        a = jnp.maximum(a, _cdiv(k_max, geo.bt))
    if geo.window is not None:  # q_min >= k_max - right and q_max <= k_min + left
        left, right = geo.window
        a = jnp.maximum(a, _cdiv(k_max - right, geo.bt))
        b = jnp.minimum(b, (k_min + left + 1) // geo.bt)
    if q_len is not None:  # q_max < min(q_len)
        b = jnp.minimum(b, jnp.min(q_len) // geo.bt)
    if kv_len is not None:  # k_max < min(kv_len)
        b = jnp.where(k_max >= jnp.min(kv_len), a, b)
    return a, b


def _tiles(geo: _Geometry, lo, hi, plain, step, carry):
    """``carry = step(structured, idx, carry)`` for idx in ``[lo, hi)``, in order.

    ``plain = (a, b)``: the indices whose tile needs no structural mask, or None when
    no tile does (no causal mask, window, lengths or key padding). Three loops
    (structured, plain, structured) instead of a ``lax.cond`` per tile: on CPU a
    conditional per tile cost as much as masking every tile.
    """
    if plain is None:
        return lax.fori_loop(lo, hi, functools.partial(step, False), carry)
    a = jnp.clip(plain[0], lo, hi)
    b = jnp.clip(plain[1], a, hi)
    carry = lax.fori_loop(lo, a, functools.partial(step, True), carry)
    carry = lax.fori_loop(a, b, functools.partial(step, False), carry)
    return lax.fori_loop(b, hi, functools.partial(step, True), carry)


def _keep(geo: _Geometry, rng, i, j):
    """The dense path's keep-mask on tile (i, j): rows ``[B, N, T]``, columns ``S``."""
    if geo.keep_coords is not None:  # global coordinates of a shard's tile
        fn, static = geo.keep_coords
        key, coords = rng
        row, col = fn(static, geo, coords, i, j)
        keep = keep_bits(key, 1.0 - geo.dropout_rate, row, col)
        return keep.reshape(geo.b * geo.k, geo.g * geo.bt, geo.bs)
    shape = (geo.b * geo.k, geo.g, geo.bt, 1)
    bk, g, tl = (lax.broadcasted_iota(jnp.uint32, shape, d) for d in range(3))
    t0 = jnp.asarray(i * geo.bt).astype(jnp.uint32)
    row = (bk * jnp.uint32(geo.g) + g) * jnp.uint32(geo.t) + t0 + tl
    col = jnp.asarray(j * geo.bs).astype(jnp.uint32) + lax.broadcasted_iota(
        jnp.uint32, (1, 1, 1, geo.bs), 3
    )
    keep = keep_bits(rng, 1.0 - geo.dropout_rate, row, col)
    return keep.reshape(geo.b * geo.k, geo.g * geo.bt, geo.bs)


def _forward(
    geo: _Geometry, qb, kb, vb, bias, mask, q_len, kv_len, rng, tab, mm, smf, smo, bad,
    f32: bool = False,
):  # fmt: skip
    """Returns ``out [nq, B*K, G*bt, Hv]`` (in the value dtype, or float32 with ``f32``)
    and, each ``[nq, B*K, G*bt]``, ``fully`` (no visible key), ``skip`` (rows the
    backward leaves out: fully masked, or all visible logits -inf), the row max ``m``
    and ``log(l)``; the log-sum-exp is ``m + log(l)``. The backward recomputes weights
    as ``exp((s - m) - log(l))``, not ``exp(s - lse)``: with logits near, say, -1e9 (a
    bias used as a mask) ``lse`` cannot hold ``log(l)`` in float32."""
    rows, hv = qb.shape[2], vb.shape[-1]
    inv_keep = jnp.float32(1.0 / (1.0 - geo.dropout_rate))
    sm = None if geo.score_def is None else _score_mod(geo, smf, smo)
    mods_ = None if mm is None and sm is None else (mm, sm)

    def query_block(args):
        i, qi = args

        def step(structured, j, carry):
            m, l, acc, seen, *flag = carry
            (s,) = _logits(geo, qi, kb[j], bias, mask, q_len, kv_len, i, j, structured, mods_)
            track = mask is not None or (geo.table and structured)  # else seen is known
            if track or bad is not None:
                visible = _tile_visible(geo, mask, q_len, kv_len, i, j, structured, mm)
            if track:
                seen = seen | _seen(geo, visible)
            if bad is not None:  # rows that see a non-finite input: NaN at the end
                flag = [flag[0] | _sees_bad(geo, visible, (bad[0][i], bad[1][j]))]
            # The running max only stabilises exp; the results do not depend on it, so it
            # carries no derivative (as in the dense softmax). Differentiating through
            # it (e.g. a Hessian-vector product, jax.jvp of jax.grad) also breaks on CPU:
            # the max's JVP finds the maximum by equality with the logits, which XLA
            # can recompute in another fusion with different rounding, giving 0 / 0.
            # From the lowest float, the max is finite and exp(s - max) <= 1: a row of
            # -inf logits gives exp(-inf) = 0; padding counts in l only while the row
            # has seen nothing above it, and the first real key's corr = 0 clears it.
            m_new = lax.stop_gradient(jnp.maximum(m, jnp.max(s, axis=-1)))
            corr = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])
            l = l * corr + jnp.sum(p, axis=-1)
            if geo.dropout_rate > 0.0:
                p = jnp.where(_keep(geo, rng, i, j), p * inv_keep, jnp.float32(0.0))
            acc = acc * corr[..., None] + _pv(p, vb[j])
            return m_new, l, acc, seen, *flag

        if geo.table:  # a full block: every row sees all of it, unless the mask hides it
            seen0 = jnp.full((qi.shape[0], rows), (tab.kv_num_full[i] > 0) & (mask is None))
        elif mask is not None:
            seen0 = jnp.zeros((qi.shape[0], rows), bool)
        else:
            seen0 = _seen_by_structure(geo, i, q_len, kv_len)
        init = (
            jnp.full((qi.shape[0], rows), _LOWEST),
            jnp.zeros((qi.shape[0], rows), jnp.float32),
            jnp.zeros((qi.shape[0], rows, hv), jnp.float32),
            seen0,
        ) + (() if bad is None else (jnp.zeros((qi.shape[0], rows), bool),))
        if geo.table:
            m, l, acc, seen, *flag = _table_tiles(
                tab.kv_indices[i], tab.kv_num_partial[i], tab.kv_num_full[i], step, init
            )
        else:
            lo, hi = _kv_range(geo, i, kv_len)
            plain = None
            if _has_structure(geo, q_len, kv_len):
                plain = _plain_kv_blocks(geo, i, q_len, kv_len)
            m, l, acc, seen, *flag = _tiles(geo, lo, hi, plain, step, init)
        fully = ~seen  # no visible key: the fully_masked policy
        empty = m == _LOWEST  # no tile, or only padding and -inf logits: lse 0
        if geo.table:  # a row that visited no block: the lse of the fill, as dense
            m = jnp.where(fully & empty, _FILL, m)
        # Visible keys whose logits are all -inf (at or below the fill): zeros and lse 0,
        # as the dense softmax gives a row of -inf.
        dead = seen & (m <= _FILL)
        l_safe = jnp.where(l > 0, l, jnp.float32(1.0))
        out = jnp.where(dead[..., None], jnp.float32(0.0), acc / l_safe[..., None])
        log_l = jnp.where(dead | empty, jnp.float32(0.0), jnp.log(l_safe))
        m = jnp.where((m == _LOWEST) | dead, jnp.float32(0.0), m)
        if flag:  # NaN rows (a NaN m: the backward skips them, _backward)
            out, m = _finite.nan_where(flag[0][..., None], out), _finite.nan_where(flag[0], m)
        return out, fully, fully | dead, m, log_l

    nq = qb.shape[0]
    out, fully, skip, m, log_l = lax.map(query_block, (jnp.arange(nq, dtype=jnp.int32), qb))
    if geo.fully_masked == "uniform":
        v_mean = jnp.sum(vb.astype(jnp.float32), axis=(0, 2)) / jnp.float32(geo.s)  # [B*K, Hv]
        out = jnp.where(fully[..., None], v_mean[None, :, None, :], out)
    else:
        out = jnp.where(fully[..., None], jnp.float32(0.0), out)
    return out if f32 else out.astype(vb.dtype), fully, skip, m, log_l


def _pv(p, v):
    """``p [.., rows, bs]`` (float32) @ ``v [.., bs, Hv]``, accumulated in float32. For
    bfloat16 and float16 values the weights stay float32 (the values are widened): the
    backward's ds = p * (dp - delta) takes the difference of two large sums, so an output
    from weights rounded to the values' dtype put dq and dk 10-100% off when the values
    share a large offset (2000 + noise), where the dense path is exact."""
    if jnp.dtype(v.dtype).itemsize < 4:
        return _dot(p, v.astype(jnp.float32), ((2,), (1,)))
    return _dot(p.astype(v.dtype), v, ((2,), (1,)))


def _table_tiles(indices, num_partial, num_full, step, carry):
    """``carry = step(structured, indices[p], carry)`` over the partial blocks
    (``p < num_partial``, masked) and then the full ones (no mask)."""

    def visit(structured, p, c):
        return step(structured, indices[p], c)

    carry = lax.fori_loop(0, num_partial, functools.partial(visit, True), carry)
    end = num_partial + num_full
    return lax.fori_loop(num_partial, end, functools.partial(visit, False), carry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(geo, qb, kb, vb, bias, mask, q_len, kv_len, rng, tab, mm, smf, smo, bad):
    args = (qb, kb, vb, bias, mask, q_len, kv_len, rng, tab, mm, smf, smo, bad)
    out, _, _, m, log_l = _forward(geo, *args)
    return out, m + log_l


def _flash_fwd(geo, qb, kb, vb, bias, mask, q_len, kv_len, rng, tab, mm, smf, smo, bad):
    args = (qb, kb, vb, bias, mask, q_len, kv_len, rng, tab, mm, smf, smo, bad)
    # the residual output stays float32: the backward's delta = sum(dout * out) must be
    # the sum over the float32 weights its ds uses (see _pv)
    out, fully, skip, m, log_l = _forward(geo, *args, f32=True)
    return (out.astype(vb.dtype), m + log_l), (*args, out, fully, skip, m, log_l)


def _flash_bwd(geo, res, cotangents):
    qb, kb, vb, bias, smf = res[0], res[1], res[2], res[3], res[10]
    # the lse is a residual: no gradient (as dense)
    dq, dk, dv, dbias, dsm = _backward(geo, res, cotangents[0])
    dbias = None if bias is None else dbias.astype(bias.dtype)
    dsm = tuple(d.astype(jnp.result_type(x)) for d, x in zip(dsm, smf, strict=True))
    none = (None,) * 6
    return (
        dq.astype(qb.dtype),
        dk.astype(kb.dtype),
        dv.astype(vb.dtype),
        dbias,
        *none,
        dsm,
        None,
        None,
    )


def skip_nan_rows(skip, m, log_l, delta):
    """``(skip, m, log_l, delta)`` with the rows that came out NaN (those that saw a
    non-finite input: NaN ``m`` or ``log_l``) skipped in the backward pass, as fully
    masked ones, and their saved values zeroed: their NaN weights would meet a zero
    cotangent (a loss that leaves them out) and make NaN the gradients of every key
    they see. For calls that hid something; a row NaN for another reason there (a NaN
    bias, a score_mod's NaN) gets zero gradients too."""
    nan_row = jnp.isnan(m) | jnp.isnan(log_l)
    zero = jnp.float32(0.0)
    return (skip | nan_row, *(jnp.where(nan_row, zero, x) for x in (m, log_l, delta)))


def _backward(geo, res, dout, delta=None, acc=None):
    """The float32 gradients ``(dq, dk, dv, dbias or None, d score_mod float leaves)``
    of the blocked layout's inputs from the residuals of :func:`_flash_fwd` (``out``,
    ``fully``, ``skip``, ``m``, ``log_l`` may be those of a larger softmax that these
    keys are a part of: the ring's) and ``dout [nq, B*K, G*bt, Hv]``. ``delta``:
    ``sum(dout * out, -1)`` when the caller has it (then ``out`` may be None).
    ``acc``: float32 ``(dq, dk, dv)`` to add these gradients to (the ring's running
    sums): they are updated in place, block by block, instead of summed after."""
    qb, kb, vb, bias, mask, q_len, kv_len, rng, tab, mm, smf, smo, bad, *rest = res
    out, fully, skip, m, log_l = rest
    sm = None if geo.score_def is None else _score_mod(geo, smf, smo)
    dout = dout.astype(jnp.float32)
    if delta is None:
        delta = jnp.sum(dout * out.astype(jnp.float32), axis=-1)  # [nq, B*K, G*bt]
    if bad is not None:
        skip, m, log_l, delta = skip_nan_rows(skip, m, log_l, delta)
    inv_keep = jnp.float32(1.0 / (1.0 - geo.dropout_rate))
    nk = kb.shape[0]
    dbias0 = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
    dsm0 = tuple(jnp.zeros(jnp.shape(x), jnp.float32) for x in smf)

    def key_block(carry, j):
        dq, dk_all, dv_all, dbias, dsm = carry
        kj, vj = kb[j], vb[j]

        def step(structured, i, c):
            dk, dv, dq, dbias, dsm = c
            qi, doi = qb[i], dout[i]
            s, *vjp = _logits(
                geo, qi, kj, bias, mask, q_len, kv_len, i, j, structured, (mm, sm), vjp=True
            )
            # Fully masked rows and rows of -inf logits contribute nothing: exp(fill) = 0
            shifted = (s - m[i][..., None]) - log_l[i][..., None]
            p = jnp.exp(jnp.where(skip[i][..., None], _FILL, shifted))  # [B*K, G*bt, bs]
            dp = _dot(doi.astype(vj.dtype), vj, ((2,), (2,)))
            p_drop = p
            if geo.dropout_rate > 0.0:
                keep = _keep(geo, rng, i, j)
                p_drop = jnp.where(keep, p * inv_keep, jnp.float32(0.0))
                dp = jnp.where(keep, dp * inv_keep, jnp.float32(0.0))
            dv = dv + _dot(p_drop.astype(vj.dtype), doi.astype(vj.dtype), ((1,), (1,)))
            ds = p * (dp - delta[i][..., None])  # d logits, [B*K, G*bt, bs]
            dsc = ds.astype(qi.dtype)
            if vjp:  # through the score_mod: to the scaled logits and its float leaves
                d_raw, d_leaves = vjp[0](ds.reshape(geo.b, geo.k, geo.g, geo.bt, geo.bs))
                dsm = tuple(a + b for a, b in zip(dsm, d_leaves, strict=True))
                dsc = d_raw.reshape(ds.shape).astype(qi.dtype)
            dk = dk + _dot(dsc, qi, ((1,), (1,)))
            dq = dq.at[i].add(_dot(dsc, kj, ((2,), (1,))))
            if dbias is not None:
                blk = ds.reshape(geo.b, geo.k, geo.g, geo.bt, geo.bs)
                axes = tuple(a for a in range(5) if bias.shape[a] == 1)
                blk = jnp.sum(blk, axis=axes, keepdims=True)
                start = _tile_starts(bias.shape, geo, i, j)
                cur = lax.dynamic_slice(dbias, start, blk.shape)
                dbias = lax.dynamic_update_slice(dbias, cur + blk, start)
            return dk, dv, dq, dbias, dsm

        init = (dk_all[j], dv_all[j], dq, dbias, dsm)
        if geo.table:
            col = (tab.q_indices[j], tab.q_num_partial[j], tab.q_num_full[j])
            dk, dv, dq, dbias, dsm = _table_tiles(*col, step, init)
        else:
            lo, hi = _q_range(geo, j, q_len, kv_len)
            plain = None
            if _has_structure(geo, q_len, kv_len):
                plain = _plain_q_blocks(geo, j, q_len, kv_len)
            dk, dv, dq, dbias, dsm = _tiles(geo, lo, hi, plain, step, init)
        dk_all, dv_all = dk_all.at[j].set(dk), dv_all.at[j].set(dv)  # in place
        return (dq, dk_all, dv_all, dbias, dsm), None

    if acc is None:
        acc = tuple(jnp.zeros(x.shape, jnp.float32) for x in (qb, kb, vb))
    (dq, dk, dv, dbias, dsm), _ = lax.scan(
        key_block, (*acc, dbias0, dsm0), jnp.arange(nk, dtype=jnp.int32)
    )
    if geo.fully_masked == "uniform":  # each fully masked row averages every real value
        dsum = jnp.sum(jnp.where(fully[..., None], dout, 0.0), axis=(0, 2))  # [B*K, Hv]
        dv = dv + dsum[None, :, None, :] / jnp.float32(geo.s)
    return dq, dk, dv, dbias, dsm


_flash.defvjp(_flash_fwd, _flash_bwd)


def blocked_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    fully_masked: FullyMasked = "zeros",
    return_residual: bool = False,
    block_sizes: tuple[int, int] | None = None,
    mask_mod=None,
    score_mod=None,
    block_mask=None,
):
    """Exact scaled dot-product attention in blocks (flash-style), O(T * H) memory.

    Same arguments and results as :func:`jattn.dot_product_attention` (see the
    module docstring for the two documented differences), without
    ``return_weights`` (the weights are the ``[T, S]`` matrix this avoids).

    Args:
      query: ``[..., T, N, H]``.
      key: ``[..., S, K, H]``; N must be a multiple of K (no copies are made).
      value: ``[..., S, K, Hv]``.
      bias: optional float, broadcasts to ``[..., N, T, S]``.
      mask: optional boolean (True = attend), broadcasts to ``[..., N, T, S]``.
      scale: as in :func:`jattn.dot_product_attention`, as are ``is_causal``,
        ``query_seq_lengths``, ``key_value_seq_lengths``, ``local_window_size``,
        ``dropout_rate``, ``dropout_rng``, ``fully_masked`` and ``return_residual``.
      block_sizes: ``(block_q, block_kv)``; ``None`` picks them from the shape
        and device (:func:`jattn.functional.dispatch.default_block_sizes`).

    Returns:
      ``output [..., T, N, Hv]`` in the value dtype, or ``(output, lse [..., T, N])``.

    Differentiable in reverse mode (a custom VJP that recomputes the blocks) and
    forward-over-reverse (``jax.jvp`` of ``jax.grad``); not in pure forward mode
    (``jax.jvp``, ``jax.jacfwd``) or reverse-over-reverse (``jax.grad`` of
    ``jax.grad``: its loops have traced bounds), for which
    ``jattn.dot_product_attention(..., implementation='dense')`` is the path.
    """
    spec = _checks.check_attention_inputs(
        query,
        key,
        value,
        bias,
        mask,
        same_head_dim=True,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        fully_masked=fully_masked,
        is_causal=is_causal,
        scale=scale,
        return_residual=return_residual,
        mask_mod=mask_mod,
        score_mod=score_mod,
        block_mask=block_mask,
    )
    if isinstance(block_sizes, list):
        block_sizes = tuple(block_sizes)
    out, lse = _eager.run(attend, (spec,), block_sizes)
    return (out, lse) if return_residual else out


def check_block_sizes(block_sizes) -> tuple[int, int]:
    """``block_sizes`` as a pair of positive ints ``(block_q, block_kv)``, else a
    ValueError (the blocked path and the ring's shard pairs)."""
    if (
        not isinstance(block_sizes, tuple | list)
        or len(block_sizes) != 2
        or not all(_checks.is_int(x) and x > 0 for x in block_sizes)
    ):
        raise ValueError(f"block_sizes must be a pair of positive ints, got {block_sizes!r}")
    return tuple(int(x) for x in block_sizes)


def attend(spec: _checks.AttentionSpec, block_sizes: tuple[int, int] | None = None):
    """The blocked path on a checked call: ``(output, lse or None)``."""
    query, key, value, bias, mask = spec.query, spec.key, spec.value, spec.bias, spec.mask
    batch_shape, window, dropout_rate = spec.batch_shape, spec.window, spec.dropout_rate
    q_len, kv_len = spec.query_seq_lengths, spec.key_value_seq_lengths
    t, n, h = query.shape[-3:]
    s, k, hv = value.shape[-3:]
    if t == 0 or s == 0:
        raise ValueError(f"blocked attention needs T > 0 and S > 0, got T={t}, S={s}")
    bm = spec.block_mask
    if bm is not None:  # its tables fix the tiles
        if block_sizes is not None and tuple(block_sizes) != tuple(bm.block_sizes):
            raise ValueError(
                f"block_sizes={tuple(block_sizes)} differ from the block mask's "
                f"{tuple(bm.block_sizes)}: leave block_sizes out, or rebuild the block mask"
            )
        block_sizes = tuple(bm.block_sizes)
    b = math.prod(batch_shape)
    user = mm = None
    if spec.mask_mod is not None:  # the call's whole mask: its mask_mod and the shortcuts
        user = mods.as_mod(spec.mask_mod)
        mm = mods.spec_mask_mod(spec._replace(mask_mod=user))
    if block_sizes is None and mm is not None:  # chosen from the mask (if known)
        sizes, kinds = mods._auto_blocks(mm, b, n, t, s, MAX_TILE_ELEMENTS // (b * n))
        if sizes is not None:
            bm = mods._block_mask(mm, t, s, sizes, b, n, kinds)
            block_sizes = sizes
    if block_sizes is None:
        band = spec.is_causal or window is not None
        block_sizes = default_block_sizes(
            t, s, h, query.dtype, masked_band=band, batch_heads=b * n, window=window
        )
    block_sizes = check_block_sizes(block_sizes)

    arrays = (query, key, value, bias, mask, q_len, kv_len, spec.dropout_rng)
    mesh = _sharding.explicit_mesh(arrays)
    if mesh is not None:  # explicit sharding cannot express the [B*K, ...] layout
        return _sharding.path_in_auto_axes(lambda inner: attend(inner, block_sizes), spec, mesh)

    bt, bs = min(block_sizes[0], t), min(block_sizes[1], s)
    nq, nk = _nblocks(t, bt), _nblocks(s, bs)
    g = n // k
    geo = _Geometry(
        b=b,
        k=k,
        g=g,
        t=t,
        s=s,
        bt=bt,
        bs=bs,
        causal=spec.is_causal,
        window=window,
        dropout_rate=dropout_rate,
        fully_masked=spec.fully_masked,
    )
    tab = None
    lens = (q_len, kv_len)  # the closed-form loops' structure
    if mm is not None:  # a block table drives the loops
        # the shortcuts (is_causal, window, lengths) join the mask_mod, so a table built
        # here is exact; a given block mask is full only for its own mask_mod
        if bm is None:
            bm = mods.block_mask(mm, t, s, (bt, bs), batch=b, heads=n)
        tab = _Table.of(bm, all_partial=mm is not user and spec.block_mask is not None)
        geo = geo._replace(causal=False, window=None, table=True)
        lens = (None, None)  # in mm
    smf, smo = (), ()
    if spec.score_mod is not None:
        tile = jnp.zeros((b, k, g, bt, bs), jnp.float32)
        sm = mods.as_mod(spec.score_mod, (tile, *_mod_index(geo, jnp.int32(0), jnp.int32(0))))
        smf, smo, score_def = _split_score_mod(sm)
        geo = geo._replace(score_def=score_def)
    scale = 1.0 / math.sqrt(h) if spec.scale is None else spec.scale
    bias5 = None if bias is None else _checks.grouped_5d(bias, batch_shape, n, k, nq * bt, nk * bs)
    mask5 = None if mask is None else _checks.grouped_5d(mask, batch_shape, n, k, nq * bt, nk * bs)
    rng = spec.dropout_rng  # None without dropout

    bad = None
    if _finite.may_hide(spec):  # hidden non-finite inputs reach nothing (_finite)
        # Cleaned as they are copied into blocks (one fusion each), so the tiles and the
        # residuals are one set either way; only the NaN rows' flags on each tile wait
        # on the flags (_finite.guarded_by_flags). A cond between blocking the raw and the
        # cleaned inputs held both sets of copies and residuals (8-17% more scratch).
        query, key, value, bad_q, bad_kv = _finite.hide_qkv(query, key, value)
        bad = (_row_blocks(geo, bad_q), _key_rows(geo, bad_kv))
    qb = _query_blocks(geo, query, scale)
    kb, vb = _kv_blocks(geo, key), _kv_blocks(geo, value)
    args = (bias5, mask5, *lens, rng, tab, mm, smf, smo)
    ob, lse = _finite.guarded_by_flags(lambda b: _flash(geo, qb, kb, vb, *args, b), bad)
    out, lse = _unblock(geo, ob), _unblock_rows(geo, lse)
    if q_len is not None:  # padded queries give zeros, whatever the policy (as dense)
        valid = jnp.arange(t, dtype=jnp.int32).reshape(1, t, 1, 1) < q_len.reshape(b, 1, 1, 1)
        out = jnp.where(valid, out, jnp.zeros((), out.dtype))
    out = out.reshape(batch_shape + (t, n, hv))
    if not spec.return_residual:
        return out, None
    return out, lse.reshape(batch_shape + (t, n))


# The blocked layout: one query block of every head is one slab ``[nq, B*K, G*bt, ...]``
# (grouped query heads as rows), one key block ``[nk, B*K, bs, ...]``.


def _query_blocks(geo: _Geometry, query, scale: float):
    """``query [..., T, N, H]`` scaled and blocked: ``[nq, B*K, G*bt, H]``.

    The query is scaled once here, not each tile's logits: a tile's row max and its
    exp(s - max) must read the same rounded logits, and a scale multiplied in after
    the product can be contracted with the subtraction (s * scale - max as one fused
    multiply-add, rounded once) in one of the two and not the other. With logits
    around 1e10 that made the row's largest weight exp(+-500): NaN or a row of zeros."""
    b, t, k, g, bt = geo.b, geo.t, geo.k, geo.g, geo.bt
    h, nq = query.shape[-1], _nblocks(geo.t, geo.bt)
    q = (query.astype(jnp.float32) * jnp.float32(scale)).astype(query.dtype)
    q = jnp.pad(q.reshape(b, t, k, g, h), ((0, 0), (0, nq * bt - t), (0, 0), (0, 0), (0, 0)))
    return q.reshape(b, nq, bt, k, g, h).transpose(1, 0, 3, 4, 2, 5).reshape(nq, b * k, g * bt, h)


def _kv_blocks(geo: _Geometry, x):
    """Keys or values ``[..., S, K, D]`` blocked: ``[nk, B*K, bs, D]``."""
    b, s, k, bs, d = geo.b, geo.s, geo.k, geo.bs, x.shape[-1]
    nk = _nblocks(s, bs)
    x = jnp.pad(x.reshape(b, s, k, d), ((0, 0), (0, nk * bs - s), (0, 0), (0, 0)))
    return x.reshape(b, nk, bs, k, d).transpose(1, 0, 3, 2, 4).reshape(nk, b * k, bs, d)


def _row_blocks(geo: _Geometry, rows):
    """Per-query flags ``[..., T, N]`` blocked as the query rows: ``[nq, B*K, G*bt]``."""
    b, t, k, g, bt = geo.b, geo.t, geo.k, geo.g, geo.bt
    nq = _nblocks(t, bt)
    x = jnp.pad(rows.reshape(b, t, k, g), ((0, 0), (0, nq * bt - t), (0, 0), (0, 0)))
    return x.reshape(b, nq, bt, k, g).transpose(1, 0, 3, 4, 2).reshape(nq, b * k, g * bt)


def _key_rows(geo: _Geometry, keys):
    """Per-key flags ``[..., S, K]`` blocked as the keys: ``[nk, B*K, bs]``."""
    b, s, k, bs = geo.b, geo.s, geo.k, geo.bs
    nk = _nblocks(s, bs)
    x = jnp.pad(keys.reshape(b, s, k), ((0, 0), (0, nk * bs - s), (0, 0)))
    return x.reshape(b, nk, bs, k).transpose(1, 0, 3, 2).reshape(nk, b * k, bs)


def _unblock(geo: _Geometry, ob):
    """``[nq, B*K, G*bt, Hv]`` back to ``[B, T, N, Hv]``."""
    nq, hv = ob.shape[0], ob.shape[-1]
    b, k, g, bt = geo.b, geo.k, geo.g, geo.bt
    out = ob.reshape(nq, b, k, g, bt, hv).transpose(1, 0, 4, 2, 3, 5)
    return out.reshape(b, nq * bt, k * g, hv)[:, : geo.t]


def _unblock_rows(geo: _Geometry, x):
    """``[nq, B*K, G*bt]`` back to ``[B, T, N]``."""
    nq, b, k, g, bt = x.shape[0], geo.b, geo.k, geo.g, geo.bt
    x = x.reshape(nq, b, k, g, bt).transpose(1, 0, 4, 2, 3)
    return x.reshape(b, nq * bt, k * g)[:, : geo.t]
