"""An eager call of a public attention function runs as one compiled program.

Outside ``jax.jit`` (a notebook, a quick check) JAX runs each operation on its own,
compiling every new one: a call of :func:`jattn.dot_product_attention` at a new shape
compiled 20-50 small programs, and a repeated one took 10-20 ms on CPU (the blocked
path's loops, 650 ms), against 0.3-7 ms as one program (``benchmarks/bench_eager.py``).
:func:`run` runs a path on a checked call (:class:`~jattn.functional._checks.AttentionSpec`)
under ``jax.jit``, its arrays traced and everything else static, so a repeated call
reuses the program and a new shape or option compiles once. The checks stay outside,
so their errors are raised as before. Under a transformation (an array is traced) the
path runs as it is, traced into the caller's program; so does a call with an option
that cannot key a cache (an unhashable mod). ``jax.disable_jit()`` runs it op by op.

A mod made by a lambda or a nested function is keyed by its identity: one written
inside a loop is a new key on every call, and compiling a program for each would be
slower than running op by op (0.3 s against 20 ms). So such a function runs op by op
the first time it is seen, and as a cached program from its second call on.
"""

from __future__ import annotations

import functools
import weakref

import jax

from jattn.functional import _checks, mods

__all__ = ["run"]


def run(fn, args: tuple, *options, compile_first: bool = False):
    """``fn(*args, *options)``, as one cached program when no array in ``args`` is traced.

    ``args``: pytrees (a checked call, score parameters, ...); their arrays (inputs,
    masks, lengths, keys, a mod's arrays) are the program's arguments, their other
    leaves static. ``fn`` and ``options`` are static: a module-level function, strings,
    ints, functions, tuples. ``compile_first``: compile even for a lambda seen the first
    time (for a path much slower op by op than compiled, such as a ``shard_map``)."""
    arrays, skeleton = _checks.split_arrays(args)
    if any(_checks._is_traced(x) for x in arrays):
        return fn(*args, *options)
    try:
        hash((fn, skeleton, options))
    except TypeError:
        return fn(*args, *options)
    if not _seen_before(args, options) and not compile_first:
        return fn(*args, *options)
    return _jitted(fn, skeleton, options, arrays)


#: The lambdas and nested functions among the mods of earlier eager calls.
_SEEN: weakref.WeakSet = weakref.WeakSet()


def _made_in_place(f) -> bool:
    """Whether ``f`` is a lambda or a function defined inside another (its identity is
    then likely new on each call), or a ``functools.partial`` of one."""
    if isinstance(f, functools.partial):
        return _made_in_place(f.func)
    name = getattr(f, "__qualname__", "")
    return "<lambda>" in name or "<locals>" in name


def _seen_before(args, options) -> bool:
    """False when a mod or function in ``args`` or ``options`` is a lambda or nested
    function not seen in an earlier call (it is remembered now); True otherwise."""
    fresh = []

    def visit(x):
        if isinstance(x, mods.Mod):
            visit(x.fn)
            for p in x.params:
                visit(p)
        elif callable(x) and not hasattr(x, "dtype") and _made_in_place(x) and x not in _SEEN:
            fresh.append(x)

    for x in jax.tree.leaves((args, options), is_leaf=lambda y: isinstance(y, mods.Mod)):
        visit(x)
    for f in fresh:
        _SEEN.add(f)
    return not fresh


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _jitted(fn, skeleton, options, arrays):
    return fn(*_checks.join_arrays(skeleton, arrays), *options)
