"""Non-finite queries, keys and values reach only the rows that see them.

Padding in real batches is often uninitialised memory. A key or value hidden by a
mask, a length, the causal mask or a window gets weight 0, but ``0 * NaN`` is NaN:
without care a NaN at a hidden position reaches the output and the gradients (it
does in ``jax.nn.dot_product_attention``). The dense and blocked paths therefore

1. zero every query, key and value vector that holds a NaN or inf (one select on
   ``[..., H]``; gradients there are exactly zero), and
2. make NaN the rows that see such a vector (a visible pair in which either is one):
   every path computes on the cleaned inputs, flags those rows apart from the logits
   (:func:`nan_rows`; the blocked path and the ring tile by tile) and sets them at
   the end, and the blocked backward skips them. Not NaN logits: a NaN weight meets
   a left-out row's zero cotangent (NaN gradients), and XLA's vectorised max on CPU
   need not keep a NaN (rows came out 0).

So a non-finite input changes exactly the rows that see it, and the rows that do
not see it are the same as with the vector replaced by anything finite; their
gradients too, when the loss leaves the NaN rows out (a causal decoder's padding at
the end, say): no NaN weight meets those rows' zero cotangent in a backward pass. This runs
only on calls that can hide something (a mask, bias, lengths, causal mask, window
or mods): without any, every pair is visible and NaN spreads as it always did.

The dense path always does it (two selects on inputs a fraction of the size of its
``[T, S]`` work). The blocked path and the ring clean the inputs as they copy them
into blocks (a select fused into a copy they make anyway) and put only the rows'
flags on each tile behind :func:`guarded_by_flags`. The in-layout path (a decoding step: a
few queries against a long KV cache) cannot afford a read of the cache to decide,
nor a cleaned copy of it (either costs a step a large part of its attention,
``benchmarks/bench_hardening.py``); it runs behind :func:`guarded_by_result`, which
looks at the step's own small logits and output instead, and its hiding branch
cleans the cache chunk by chunk (:func:`map_chunks`, :func:`sum_chunks`). The
kernel paths (cuDNN, Pallas) run behind :func:`guarded`, which sums the inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jattn.functional import _checks

__all__ = [
    "guarded",
    "guarded_by_flags",
    "guarded_by_inputs",
    "guarded_by_result",
    "hide_nonfinite",
    "hide_qkv",
    "map_chunks",
    "may_hide",
    "nan_rows",
    "nan_where",
    "by_row",
    "zero_pairs",
    "sum_chunks",
]


def may_hide(spec) -> bool:
    """Whether a checked call (:class:`jattn.functional._checks.AttentionSpec`) can hide
    a (query, key) pair, or a query from every key."""
    return any(
        x is not None
        for x in (
            spec.bias, spec.mask, spec.query_seq_lengths, spec.key_value_seq_lengths,
            spec.window, spec.mask_mod, spec.score_mod, spec.block_mask,
        )
    ) or bool(spec.is_causal)  # fmt: skip


def hide_nonfinite(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x with its non-finite vectors zeroed, bad)``: ``bad`` is ``x.shape[:-1]``,
    True where the vector along the last axis holds a NaN or inf."""
    bad = jnp.logical_not(jnp.all(jnp.isfinite(x), axis=-1))
    return jnp.where(bad[..., None], jnp.zeros((), x.dtype), x), bad


def zero_padding(x: jax.Array, valid: jax.Array) -> jax.Array:
    """``x [..., L, D]`` with the vectors that ``valid [..., L]`` marks False set to 0,
    for a layer to apply before it uses its padded inputs (the double-where rule):
    masking only the result leaves ``0 * NaN`` in the backward pass, so a NaN or inf
    in the padding would reach the gradients of the example and of the weights."""
    return jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))


#: Bytes of one cleaned chunk in :func:`map_chunks` and :func:`sum_chunks`.
CHUNK_BYTES = 1 << 20


def _chunking(xs):
    """``(S, C, number of chunks, chunk(i) -> (start, cleaned chunks, bad))`` for arrays
    ``xs``, each ``[B, S, ...]``, read in chunks of C positions along S, each chunk
    cleaned as it is read (:func:`hide_nonfinite`); the last chunk ends at S, so it
    overlaps the one before it when C does not divide S."""
    s = xs[0].shape[1]
    row = max(1, sum(x.size // s * x.dtype.itemsize for x in xs))
    c = max(1, min(s, CHUNK_BYTES // row))

    def chunk(i):
        start = jnp.minimum(i * c, s - c)
        pairs = [hide_nonfinite(jax.lax.dynamic_slice_in_dim(x, start, c, axis=1)) for x in xs]
        return start, *zip(*pairs, strict=True)

    return s, c, -(-s // c), chunk


def map_chunks(xs: tuple[jax.Array, ...], fn):
    """``fn(chunks, bad)`` over ``xs`` (each ``[B, S, ...]``) in chunks along S, each
    chunk cleaned as it is read, its results (each ``[B, C, ...]``) put together along
    S: as ``fn(cleaned xs, their bad flags)`` for a ``fn`` that works position by
    position, without a cleaned copy of ``xs``.

    A branch that must hide non-finite entries of a large input (a KV cache) so holds
    no cleaned copy of it, nor its ``[B, S, ..., H]`` finiteness: a ``lax.cond``'s
    untaken branch still sizes the program's scratch memory (on CPU a scratch
    allocation over glibc's mmap threshold, 32 MiB, comes fresh, page faults and all,
    on every call). Each chunk is recomputed in the backward pass (``jax.checkpoint``):
    differentiated, the residuals are not cleaned copies either.
    """
    s, c, n, chunk = _chunking(xs)

    @jax.checkpoint
    def one(i):
        _, chunks, bad = chunk(i)
        return fn(chunks, bad)

    ys = jax.lax.map(one, jnp.arange(n))  # each [n, B, C, ...]
    tail = s - (n - 1) * c  # fresh positions of the last chunk, at its end

    def join(y):
        y = jnp.moveaxis(y, 0, 1)  # [B, n, C, ...]
        head = y[:, :-1].reshape((y.shape[0], (n - 1) * c) + y.shape[3:])
        return jnp.concatenate([head, y[:, -1, c - tail :]], axis=1)

    return jax.tree.map(join, ys)


def sum_chunks(xs: tuple[jax.Array, ...], fn, init):
    """``init + sum of fn(start, fresh, chunks)`` over ``xs`` (each ``[B, S, ...]``) in
    chunks along S, each chunk cleaned as it is read (as :func:`map_chunks`): ``chunks``
    ``x[:, start:start + C]`` cleaned, ``fresh [C]`` True at the positions no earlier
    chunk held (the last chunk overlaps the one before it when C does not divide S)."""
    s, c, n, chunk = _chunking(xs)

    @jax.checkpoint
    def step(acc, i):
        start, chunks, _ = chunk(i)
        fresh = start + jnp.arange(c) >= i * c
        return acc + fn(start, fresh, chunks), None

    return jax.lax.scan(step, init, jnp.arange(n))[0]


def hide_qkv(query, key, value):
    """:func:`hide_nonfinite` on ``query [..., T, N, H]``, ``key [..., S, K, H']`` and
    ``value [..., S, K, Hv]``: ``(query, key, value, bad_queries [..., T, N],
    bad_keys [..., S, K])``, a key position bad when its key or its value is."""
    query, bad_q = hide_nonfinite(query)
    key, bad_k = hide_nonfinite(key)
    value, bad_v = hide_nonfinite(value)
    return query, key, value, bad_q, bad_k | bad_v


def zero_pairs(logits: jax.Array, bad_rows: jax.Array | None, bad_cols: jax.Array | None):
    """``logits [..., T, S]`` with 0 where ``bad_rows [..., T]`` or ``bad_cols [..., S]``
    (either may be None): the logits of the zeroed vectors' pairs, finite (the rows
    that see them are made NaN after, :func:`nan_rows`). The select also keeps XLA from
    fusing a score's scaling into both the softmax's max and its exp, where LLVM may
    contract ``x * scale - max`` into a fused multiply-add that skips the rounding the
    max saw (+-512 at logits near 1e10: rows of inf or 0)."""
    bad = None
    if bad_rows is not None:
        bad = bad_rows[..., :, None]
    if bad_cols is not None:
        cols = bad_cols[..., None, :]
        bad = cols if bad is None else bad | cols
    return logits if bad is None else jnp.where(bad, jnp.float32(0.0), logits)


def nan_rows(visible, bad_rows, bad_cols):
    """``[..., T]``: the rows that see a non-finite input, a bad key of ``bad_cols
    [..., S]`` through ``visible [..., T, S]`` (a boolean that broadcasts, or None: every
    pair) or a bad query of ``bad_rows [..., T]`` that sees any key. The dense paths
    compute on cleaned inputs and make these rows NaN at the end (:func:`nan_where`):
    NaN logits would give the softmax's backward NaN weights, which a row's zero
    cotangent (a loss that leaves the row out) turns into NaN gradients for every key
    that row sees."""
    rows = None
    if bad_cols is not None:
        cols = bad_cols[..., None, :]
        rows = jnp.any(cols if visible is None else visible & cols, axis=-1)
    if bad_rows is not None:
        sees = bad_rows if visible is None else bad_rows & jnp.any(visible, axis=-1)
        rows = sees if rows is None else rows | sees
    return rows


def by_row(fn, *xs: jax.Array, vector_ndim: int = 1):
    """``fn(*xs)`` for a per-row map (a projection, a gate, a router: row i of the
    result depends on row i of each ``x`` only, a row being the last ``vector_ndim``
    axes), with the rows that are not finite in some ``x`` zeroed before and NaN in the
    result (an array, or a tuple of them: one check for maps that share an input)
    after. The same values, but a NaN or inf row (padding left uninitialised) that the
    loss leaves out meets its zero cotangent with finite inputs: ``x^T dy`` would
    otherwise make ``NaN * 0`` of the weights' gradients."""
    axes = tuple(range(-vector_ndim, 0))
    bad = functools.reduce(
        jnp.logical_or, [jnp.logical_not(jnp.all(jnp.isfinite(x), axis=axes)) for x in xs]
    )
    cut = bad.reshape(bad.shape + (1,) * vector_ndim)
    ys = fn(*(jnp.where(cut, jnp.zeros((), x.dtype), x) for x in xs))

    def mark(y):
        return nan_where(bad.reshape(bad.shape + (1,) * (y.ndim - bad.ndim)), y)

    return tuple(map(mark, ys)) if isinstance(ys, tuple) else mark(ys)


def nan_where(rows, x):
    """``x`` with NaN where ``rows`` (a boolean that broadcasts to it) is True; ``x`` as
    it is when either is None."""
    if rows is None or x is None:
        return x
    return jnp.where(rows, jnp.asarray(jnp.nan, x.dtype), x)


def guarded(run, spec, *inputs):
    """``run(hide)`` for a checked call: ``run(False)`` when the call hides nothing, else
    ``lax.cond`` on whether any of ``inputs`` holds a NaN or inf, between ``run(True)``
    (hides them) and ``run(False)`` (reads the inputs as they are)."""
    if not may_hide(spec):
        return run(False)
    # A float32 sum is NaN or inf when any entry is (and, rarely, when finite entries
    # overflow it: then the hiding branch runs, which is right anyway). It reads each
    # input once, three times faster on CPU than all(isfinite(x)).
    total = sum(jnp.sum(x, dtype=jnp.float32) for x in inputs)
    return jax.lax.cond(jnp.isfinite(total), lambda: run(False), lambda: run(True))


def guarded_by_flags(fn, bad):
    """``fn(bad)`` when a flag in ``bad`` (``(bad rows, bad keys)`` from
    :func:`hide_qkv`, in any layout, or None) is set, else ``fn(None)``, behind a
    ``lax.cond``: for a call whose inputs are cleaned already, so only the work on the
    flags (the rows that see a bad input, :func:`nan_rows`, tile by tile) waits on
    them (the blocked path's call and the ring's pairs)."""
    if bad is None:
        return fn(None)
    return jax.lax.cond(jnp.any(bad[0]) | jnp.any(bad[1]), lambda: fn(bad), lambda: fn(None))


def guarded_by_inputs(run, spec):
    """:func:`guarded` on the query, key and value of ``spec`` for a ``run(hide, spec)
    -> (results, probe)`` of :func:`guarded_by_result` (the probe is not used)."""
    return guarded(lambda hide: run(hide, spec)[0], spec, spec.query, spec.key, spec.value)


def guarded_by_result(run, spec, *, forward_mode: bool = True):
    """Like :func:`guarded`, deciding from the results instead of the inputs.

    ``run(hide, spec)`` returns ``(results, probe)`` for the checked call ``spec``,
    ``probe`` a float32 scalar that is finite only if every input was: the sum of
    the call's logits and of its output before any row is zeroed. A non-finite query
    or key makes a logit NaN or inf (``q . k`` with an inf or NaN term is never
    finite), and a non-finite value makes an output NaN or inf (``0 * inf`` is NaN),
    masked or not. ``run(False, spec)`` always runs, reading the inputs as they are;
    ``run(True, spec)`` runs in its place, behind a ``lax.cond``, only when the probe
    is not finite (or, rarely, when finite entries overflow the sum: then hiding is
    right anyway). The check reads ``[T, S]`` logits and ``[T, Hv]`` outputs per head,
    not ``[S, H]`` keys and values: ``H`` times less for a decoding step.

    Differentiated, the fast branch's products would carry a NaN input into the
    derivatives of a call that hid it (a zero cotangent times a NaN key is NaN), so
    the derivatives come from a rule:

    * ``forward_mode=True``: a custom JVP (every mode of differentiation) whose rule
      runs ``run(True)``, the hiding branch, alone: its derivatives equal
      ``run(False)``'s on finite inputs. Not :func:`guarded`'s rule: JAX linearises
      that ``lax.cond``, whose primal side then outputs the inputs its tangent side
      reads as residuals (on CPU copies of a decoding step's KV cache: 67.7 MiB of
      scratch against 2.1 unguarded, ``benchmarks/bench_hardening.py``), and under
      ``jax.vmap`` (a batched predicate) that linearisation fails (``stop_gradient``
      has no transpose). The chunked branch is slower than the unguarded step.
    * ``forward_mode=False``: a custom VJP. The forward pass runs as undifferentiated
      and keeps the unguarded program's residuals (``jax.vjp`` of ``run(False)``);
      the backward pass is a ``lax.cond`` on the probe between that pullback and,
      when the forward pass hid something, ``run(True)``'s, recomputed. Reverse mode
      and forward-over-reverse; not pure forward mode (``jax.jvp``): JAX pushes no
      tangent through a custom VJP. Reverse-over-reverse only on finite inputs: it
      differentiates the forward pass, whose unguarded residuals then pass zero
      cotangents through a hidden NaN.

    A ``lax.cond`` keeps what both branches need, so ``run(True, spec)`` should hold
    and leave little (:func:`map_chunks`, :func:`sum_chunks`).
    """
    if not may_hide(spec):
        return run(False, spec)[0]
    arrays, skeleton = _checks.split_arrays(spec)
    static = (bool, int, float, str, type(None))
    if not all(isinstance(x, static) for x in skeleton.others):
        # a mod given as a plain function may close over arrays a custom rule cannot see
        return guarded_by_inputs(run, spec)
    rebuild = functools.partial(_checks.join_arrays, skeleton)

    def choose(arrays, results, finite):
        """``results`` of ``run(False)`` when the probe is finite, else ``run(True)``'s."""
        return jax.lax.cond(finite, lambda: results, lambda: run(True, rebuild(arrays))[0])

    def forward(*arrays):
        results, probe = run(False, rebuild(arrays))
        return choose(arrays, results, jnp.isfinite(probe))

    if forward_mode:
        fast = jax.custom_jvp(forward)

        # no lax.cond in the rule: linearised under jax.vmap, one fails
        fast.defjvp(lambda p, t: jax.jvp(lambda *a: run(True, rebuild(a))[0], p, t))
        return fast(*arrays)
    return _reverse_only(run, rebuild, forward, choose, arrays)


def _reverse_only(run, rebuild, forward, choose, arrays):
    """:func:`guarded_by_result`'s custom VJP on the call's ``arrays`` (``forward`` and
    ``choose`` are its helpers); the integer, boolean and key arrays (lengths, masks, a
    dropout key) get no cotangent."""
    inexact = [jnp.issubdtype(x.dtype, jnp.inexact) for x in arrays]

    def with_floats(fn, arrays):
        """``fn`` of the inexact ``arrays`` alone, the others fixed, and those arrays."""
        others = [x for x, f in zip(arrays, inexact, strict=True) if not f]

        def of_floats(*floats):
            fl, ot = iter(floats), iter(others)
            return fn(rebuild([next(fl) if f else next(ot) for f in inexact]))

        return of_floats, [x for x, f in zip(arrays, inexact, strict=True) if f]

    call = jax.custom_vjp(forward)

    def call_fwd(*arrays):
        unguarded, floats = with_floats(lambda sp: run(False, sp), arrays)
        (results, probe), pullback = jax.vjp(unguarded, *floats)
        finite = jnp.isfinite(probe)
        return choose(arrays, results, finite), (finite, pullback, arrays)

    def call_bwd(residuals, cotangent):
        finite, pullback, arrays = residuals

        def hiding():
            hidden, floats = with_floats(lambda sp: run(True, sp)[0], arrays)
            return jax.vjp(hidden, *floats)[1](cotangent)

        grads = iter(
            jax.lax.cond(finite, lambda: pullback((cotangent, jnp.zeros((), jnp.float32))), hiding)
        )
        return tuple(next(grads) if f else None for f in inexact)

    call.defvjp(call_fwd, call_bwd)
    return call(*arrays)
