"""Choosing an attention implementation from the shape, dtype and device.

``dot_product_attention(..., implementation=None)`` asks :func:`select` for the
fastest path that gives the library's results for the inputs:

* ``'dense'`` (alias ``'xla'``): materialises ``[B, N, T, S]``; fastest for short
  sequences and for a few queries against many keys (decoding; on CPU, for B >= 2,
  its products then read keys and values in their own layout,
  :func:`dense_in_layout`), and the only path that returns the weights.
* ``'blocked'``: :func:`jattn.functional.blocked.blocked_attention`, exact online
  softmax in O(T * H) memory; the default for long sequences on CPU, and on GPU/TPU
  for inputs cuDNN/Pallas do not take once the dense scores would be large.
* ``'cudnn'``: ``jax.nn.dot_product_attention(implementation='cudnn')`` on NVIDIA
  GPUs, for float16/bfloat16 inputs that it supports.
* ``'pallas'``: the TPU flash-attention Pallas kernel shipped in
  ``jax.experimental.pallas.ops.tpu.flash_attention``.

* ``'ring'``, ``'all_gather'``, ``'ulysses'``: context parallelism
  (:mod:`jattn.functional.context`) for a query and key sharded along the sequence
  over one explicit mesh axis; the ring is the default for such inputs.

An explicit implementation that cannot honour the inputs raises a ``ValueError``
naming the unsupported feature, dtype or device.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jattn.functional import _finite, _sharding, blocked, dense, kernels, mods
from jattn.functional._checks import OPTION_DEFAULTS, AttentionSpec
from jattn.functional.blocked import MAX_TILE_ELEMENTS, blocked_attention, default_block_sizes
from jattn.functional.kernels import cudnn_attention, pallas_attention, pallas_block
from jattn.functional.scores import scaled_dot_product_scores

__all__ = [
    "IMPLEMENTATIONS",
    "ACCELERATOR_DENSE_MAX_BYTES",
    "DENSE_MAX_ELEMENTS",
    "IN_LAYOUT_MAX_ROWS",
    "IN_LAYOUT_MAX_WORK",
    "IN_LAYOUT_MIN_KEYS",
    "MAX_TILE_ELEMENTS",
    "OPTION_DEFAULTS",
    "PATHS",
    "default_block_sizes",
    "dense_in_layout",
    "dense_path",
    "run",
    "select",
    "unchecked_spec",
]

#: The names ``implementation=`` takes (``None``: chosen by :func:`select`).
IMPLEMENTATIONS = (
    None, "dense", "xla", "blocked", "cudnn", "pallas", "splash", "ring", "all_gather", "ulysses",
)  # fmt: skip

#: The context-parallel paths (:mod:`jattn.functional.context`): for inputs sharded along
#: the sequence over an explicit mesh axis.
CONTEXT_PARALLEL = ("ring", "all_gather", "ulysses")

#: Up to this many score elements per head (T * S) the dense path wins on CPU (measured:
#: T=S=128 dense is 3x faster than blocked, T=S=512 blocked is 1.3-2x faster; 256 is a tie).
DENSE_MAX_ELEMENTS = 256 * 256


#: On CPU, few queries against many keys (a decoding step against a KV cache) run the
#: dense path with its two products on keys and values in their ``[B, S, K, H]``
#: layout (no transposes; see ``jattn.functional.attention._dense_in_layout``) when
#: ``S >= IN_LAYOUT_MIN_KEYS``, ``T * G <= IN_LAYOUT_MAX_ROWS`` (query rows per
#: key/value head), ``T * G * K <= IN_LAYOUT_MAX_WORK`` (those products do K times
#: the per-head work) and the batch B >= 2. Measured (BENCHMARKS.md): 1.5-5x faster
#: than the per-head products inside that range; slower beyond it (e.g. K=16, T=8;
#: K=1, T=4). With B = 1, in a compiled decoding loop that writes the cache in place
#: (``dynamic_update_slice``), XLA fuses the write into the reshape the products need
#: (the unit batch axis is squeezed) and copies the cache several times per step:
#: 1.65x slower than the per-head products there, so B = 1 keeps them.
IN_LAYOUT_MIN_KEYS = 1024
#: The in-layout products' range: at most this many queries per key/value head (see
#: ``IN_LAYOUT_MIN_KEYS``).
IN_LAYOUT_MAX_ROWS = 8
#: The in-layout products' range: at most this much per-head work (see
#: ``IN_LAYOUT_MIN_KEYS``).
IN_LAYOUT_MAX_WORK = 64


#: On GPU and TPU, when neither cuDNN nor Pallas takes the inputs, the dense path runs
#: while its float32 score tensor ``[B, N, T, S]`` stays within this many bytes, and the
#: blocked path beyond (for memory). There XLA's dense program is one set of large
#: fused kernels (jax.nn's own default), while the plain-JAX blocked path runs its tiles
#: as a sequential loop of small kernels. Not yet measured on a GPU (no GPU has been
#: lent to this project): ``benchmarks/bench_gpu.py`` is the measurement to make.
ACCELERATOR_DENSE_MAX_BYTES = 1 << 30


def _platform() -> str:
    return jax.default_backend()


def dense_in_layout(query, key, *arrays) -> bool:
    """Whether the dense path runs its products in the keys' own layout (CPU only; see
    :data:`IN_LAYOUT_MIN_KEYS`). Arrays may be ``jax.ShapeDtypeStruct``; ``arrays``
    are the other inputs, checked for explicit sharding (which keeps the per-head
    products: they reshape no sharded axis)."""
    t, n = query.shape[-3], query.shape[-2]
    s, k = key.shape[-3], key.shape[-2]
    return (
        _platform() == "cpu"
        and math.prod(query.shape[:-3]) >= 2
        and s >= IN_LAYOUT_MIN_KEYS
        and t * (n // k) <= IN_LAYOUT_MAX_ROWS
        and t * n <= IN_LAYOUT_MAX_WORK
        and _sharding.explicit_mesh((query, key, *arrays)) is None
    )


def _cudnn_problems(spec: AttentionSpec) -> list[str]:
    """Why ``jax.nn.dot_product_attention(implementation='cudnn')`` cannot give our results."""
    query, key, value = spec.query, spec.key, spec.value
    problems = []
    if _platform() != "gpu":
        problems.append(f"device {_platform()!r} (cuDNN needs an NVIDIA GPU)")
    if query.dtype not in (jnp.float16, jnp.bfloat16):
        problems.append(f"dtype {query.dtype} (cuDNN takes float16 or bfloat16)")
    h, hv = query.shape[-1], value.shape[-1]
    if h != hv:
        problems.append(f"value head dim Hv={hv} != H={h}")
    if h > 128 or h % 8:
        problems.append(f"head dim H={h} (cuDNN needs a multiple of 8, at most 128)")
    if spec.dropout_rate > 0.0:
        problems.append("dropout")
    if spec.return_residual:
        problems.append("return_residual (cuDNN returns it in the input dtype, not float32)")
    if spec.mask is not None:
        # cuDNN turns a boolean mask into a finite bias, so a fully masked row gets
        # softmax(logits) instead of fully_masked's zeros/uniform weights.
        problems.append("boolean masks (fully masked rows differ from fully_masked)")
    if spec.window is not None:
        problems.append("local_window_size (cuDNN windows differ: left only, exclusive)")
    if spec.key_value_seq_lengths is not None:
        # a key length of 0 leaves rows fully masked, which cuDNN does not give as
        # fully_masked's zeros/uniform weights
        problems.append("key_value_seq_lengths (fully masked rows differ from fully_masked)")
    if spec.is_causal and query.shape[-3] > key.shape[-3]:
        problems.append("is_causal with T > S")
    problems += _mod_problems(spec, "cuDNN")
    return problems


def _mod_problems(spec: AttentionSpec, kernel: str) -> list[str]:
    """The mask and score functions a kernel cannot evaluate (it takes its own causal
    mask only; a block mask needs the blocked or dense path)."""
    return [
        f"{name} (the {kernel} kernel cannot evaluate jattn's mask and score functions)"
        for name in ("mask_mod", "score_mod", "block_mask")
        if getattr(spec, name) is not None
    ]


def _tpu_kernel_problems(spec: AttentionSpec, kernel: str, unsupported, interpret: bool):
    """What the TPU Pallas kernels (flash attention, splash) share: a TPU (or the
    interpreter), Hv == H, lengths in multiples of 128, none of the ``unsupported``
    ``(name, value)`` inputs, no dropout, no residual."""
    query, key, value = spec.query, spec.key, spec.value
    problems = []
    if _platform() != "tpu" and not interpret:
        problems.append(f"device {_platform()!r} (the {kernel} kernel needs a TPU)")
    h, hv = query.shape[-1], value.shape[-1]
    if h != hv:
        problems.append(f"value head dim Hv={hv} != H={h}")
    t, s = query.shape[-3], key.shape[-3]
    if pallas_block(t) is None or pallas_block(s) is None:
        problems.append(f"lengths T={t}, S={s} (the kernel needs multiples of 128)")
    problems += [name for name, x in unsupported if x is not None]
    if spec.dropout_rate > 0.0:
        problems.append("dropout")
    if spec.return_residual:
        problems.append("return_residual")
    return problems


def _pallas_problems(spec: AttentionSpec, *, interpret: bool = False) -> list[str]:
    """Why the TPU Pallas flash-attention kernel cannot give our results."""
    unsupported = (
        ("query_seq_lengths", spec.query_seq_lengths),
        ("key_value_seq_lengths", spec.key_value_seq_lengths),
        ("local_window_size", spec.window),
        ("boolean masks", spec.mask),
    )
    problems = _tpu_kernel_problems(spec, "Pallas flash-attention", unsupported, interpret)
    t, s = spec.query.shape[-3], spec.key.shape[-3]
    if spec.is_causal and t > s:
        problems.append("is_causal with T > S")
    if spec.bias is not None and spec.scale == 0:
        problems.append("scale=0 with a bias (the kernel divides the bias by the scale)")
    if spec.is_causal and jax.config.jax_enable_x64:  # its causal mask mixes int64, int32
        problems.append("is_causal with jax_enable_x64 (the kernel's causal mask fails to trace)")
    problems += _mod_problems(spec, "Pallas flash-attention")
    return problems


def _splash_problems(spec: AttentionSpec, *, interpret: bool = False) -> list[str]:
    """Why the TPU Pallas splash kernel cannot give our results for a call with mask
    functions (it evaluates the mask_mod on the host per head, skips empty blocks)."""
    unsupported = (
        ("bias", spec.bias),
        ("boolean masks", spec.mask),
        ("query_seq_lengths", spec.query_seq_lengths),
        ("key_value_seq_lengths", spec.key_value_seq_lengths),
    )
    problems = _tpu_kernel_problems(spec, "splash", unsupported, interpret)
    sm = spec.score_mod
    if sm is not None and not (isinstance(sm, mods.Mod) and sm.fn is mods._softcap):
        problems.append("score_mod other than jattn.mods.softcap (the kernel has only a soft-cap)")
    mm = kernels.splash_mask_mod(spec)
    if mm is not None:
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(mm)):
            problems.append("a mask_mod holding traced arrays (splash evaluates it when traced)")
        elif kernels.depends_on_example(mm):
            problems.append("a mask_mod that depends on the example (segment ids, lengths)")
    return problems


def unchecked_spec(query, key, value, bias=None, mask=None, **options) -> AttentionSpec:
    """An :class:`AttentionSpec` from ``dot_product_attention``'s arguments, without the
    checks (for :func:`select` on shapes: arrays may be ``jax.ShapeDtypeStruct``).
    ``options`` left out take :data:`OPTION_DEFAULTS`; a misspelt one is a TypeError."""
    unknown = sorted(set(options) - set(OPTION_DEFAULTS))
    if unknown:
        raise TypeError(
            f"select() got unknown options {unknown}; expected keyword arguments of "
            f"dot_product_attention: {sorted(OPTION_DEFAULTS)}"
        )
    o = {**OPTION_DEFAULTS, **options}
    return AttentionSpec(
        query=query,
        key=key,
        value=value,
        bias=bias,
        mask=mask,
        batch_shape=tuple(query.shape[:-3]),
        query_seq_lengths=o["query_seq_lengths"],
        key_value_seq_lengths=o["key_value_seq_lengths"],
        window=o["local_window_size"],
        dropout_rate=o["dropout_rate"],
        dropout_rng=o["dropout_rng"],
        is_causal=o["is_causal"],
        scale=o["scale"],
        fully_masked=o["fully_masked"],
        return_residual=o["return_residual"],
        mask_mod=o["mask_mod"],
        score_mod=o["score_mod"],
        block_mask=o["block_mask"],
    )


def select(implementation, spec, *args, **options) -> str:
    """The implementation ``'dense' | 'blocked' | 'cudnn' | 'pallas' | 'splash' | 'ring' |
    'all_gather' | 'ulysses'`` to run.

    ``spec`` is the :class:`~jattn.functional._checks.AttentionSpec` of a checked call
    (what :func:`jattn.dot_product_attention` builds), or, to ask about shapes,
    ``select(implementation, query, key, value, bias=None, mask=None, **options)``
    with the arguments of ``dot_product_attention`` (arrays may be
    ``jax.ShapeDtypeStruct``; options left out take :data:`OPTION_DEFAULTS`), e.g.
    ``select(None, q, k, v, is_causal=True)`` to see which path a call takes.

    ``implementation=None`` picks the fastest path that gives the library's results:
    cuDNN on GPU and Pallas on TPU where they support the inputs (on TPU, a call with
    mask functions runs the splash kernel where it can: :func:`_splash_problems`);
    otherwise on CPU
    the dense path for short sequences (``T * S <= DENSE_MAX_ELEMENTS``) and for a
    few queries against many keys (:func:`dense_in_layout`: a decoding step), the
    blocked path for other long ones, and on GPU/TPU the dense path while its float32 scores
    fit in :data:`ACCELERATOR_DENSE_MAX_BYTES` and the blocked path beyond.
    The choice does not depend on ``return_weights``: asking for the weights never
    changes the output (:func:`jattn.dot_product_attention` computes them apart).
    A query and key sharded along the sequence over one explicit mesh axis run the
    ring (:func:`jattn.functional.context.ring_attention`) unless the call has what it
    does not take (a bias or mask array, dropout, a block mask, uniform fully-masked
    rows): those run as before, XLA gathering the shards.
    An explicit choice that cannot honour the inputs raises a ``ValueError`` that
    lists what it does not support.
    """
    if not isinstance(spec, AttentionSpec):
        spec = unchecked_spec(spec, *args, **options)
    elif args or options:
        raise TypeError("select(implementation, spec) takes no other arguments with a spec")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation {implementation!r}; expected one of {IMPLEMENTATIONS}"
        )
    if implementation in ("dense", "xla"):
        return "dense"
    if implementation in ("blocked", *CONTEXT_PARALLEL):
        return implementation  # the context-parallel paths check what they take
    if _sharding.sequence_axis(spec.query, spec.key) is not None:
        from jattn.functional import context  # it runs single-device paths from here

        if not context.problems("ring", spec):
            return "ring"
    checks = {"cudnn": _cudnn_problems, "pallas": _pallas_problems, "splash": _splash_problems}
    if implementation is not None:
        problems = checks[implementation](spec)
        if problems:
            raise ValueError(
                f"implementation={implementation!r} does not support: " + "; ".join(problems)
            )
        return implementation
    platform = _platform()
    if platform == "gpu" and not _cudnn_problems(spec):
        return "cudnn"
    if platform == "tpu" and not _pallas_problems(spec):
        return "pallas"
    with_mods = any(x is not None for x in (spec.mask_mod, spec.score_mod, spec.block_mask))
    if platform == "tpu" and with_mods and not _splash_problems(spec):
        return "splash"
    query, key = spec.query, spec.key
    t, s = query.shape[-3], key.shape[-3]
    if platform in ("gpu", "tpu"):
        score_bytes = 4 * math.prod(query.shape[:-3]) * query.shape[-2] * t * s
        return "dense" if score_bytes <= ACCELERATOR_DENSE_MAX_BYTES else "blocked"
    if t * s <= DENSE_MAX_ELEMENTS or dense_in_layout(query, key, spec.value, spec.bias, spec.mask):
        return "dense"
    return "blocked"


def dense_path(spec: AttentionSpec, *, return_weights: bool = False, forward_mode: bool = True):
    """The dense path: ``(out, lse)``, or ``(out, lse, weights)`` with ``return_weights``
    (lse is None unless ``spec.return_residual``). On CPU a few queries against many
    keys run its products in the keys' own layout (:func:`dense_in_layout`), which
    with ``forward_mode=False`` is differentiable in reverse mode only, and leaner
    there (``jattn.functional.dense._dense_in_layout``)."""
    q, k = spec.query, spec.key
    mesh = _sharding.explicit_mesh([q, k, spec.value])
    if mesh is not None and not return_weights and _sequence_sharded(q, k, spec.value):
        # T or S sharded over explicit axes (calls the ring does not take): [T, S]
        # scores have no sharding type, so XLA places the work
        path = functools.partial(dense_path, forward_mode=forward_mode)
        return _sharding.path_in_auto_axes(path, spec, mesh)
    if dense_in_layout(q, k, spec.value, spec.bias, spec.mask):
        out, weights, lse = dense._dense_in_layout(
            spec, return_weights=return_weights, forward_mode=forward_mode
        )
    else:
        score_fn = functools.partial(scaled_dot_product_scores, scale=spec.scale)
        out, weights, lse = dense.attend(spec, score_fn=score_fn, return_weights=return_weights)
    return (out, lse, weights) if return_weights else (out, lse)


def _sequence_sharded(query, key, value) -> bool:
    """Whether the T axis of ``query`` or the S axis of ``key`` / ``value`` is sharded."""
    return any(_sharding.spec(x)[-3] is not None for x in (query, key, value))


def _kernel_path(name):
    def path(spec: AttentionSpec, **kw):
        o = {**spec.options(), **kw}
        return _run_kernel(name, spec.query, spec.key, spec.value, spec.bias, spec.mask, **o), None

    path.__name__ = path.__qualname__ = f"{name}_path"
    path.__doc__ = f"The {name} kernel: ``(out, None)`` (it gives no log-sum-exp)."
    return path


def _hiding(path):
    """A kernel path behind :func:`jattn.functional._finite.guarded`.

    The kernels read keys and values as they are: a NaN or inf value at a masked
    position reaches every row of its tile (``0 * NaN``). So a call that can hide a
    pair checks its inputs first (one float32 sum of each, next to the kernel's
    ``[T, S]`` work) and, only when one holds a NaN or inf, runs the blocked path
    instead, which hides them (:mod:`jattn.functional._finite`): the results are the
    library's on every path. ``**kw`` (e.g. ``interpret=True``) go to the kernel."""

    def guarded(spec: AttentionSpec, **kw):
        def run(hide: bool):
            return blocked.attend(spec) if hide else path(spec, **kw)

        return _finite.guarded(run, spec, spec.query, spec.key, spec.value)

    guarded.__name__ = guarded.__qualname__ = path.__name__
    guarded.__doc__ = f"{path.__doc__} Non-finite inputs: see ``_hiding``."
    return guarded


def _context_path(name):
    def path(spec: AttentionSpec):
        from jattn.functional import context  # it runs single-device paths from here

        return context.run_spec(name, spec)

    path.__name__ = path.__qualname__ = f"{name}_path"
    path.__doc__ = f"Context parallelism, {name} (:mod:`jattn.functional.context`)."
    return path


#: Every path by name: ``PATHS[select(implementation, spec)](spec) -> (out, lse)``.
PATHS = {
    "dense": dense_path,
    "blocked": blocked.attend,
    "cudnn": _hiding(_kernel_path("cudnn")),
    "pallas": _hiding(_kernel_path("pallas")),
    "splash": _hiding(kernels.splash_attention),
    **{name: _context_path(name) for name in CONTEXT_PARALLEL},
}


def run(implementation: str, spec, *args, **options):
    """Runs a path: ``run(name, spec) -> (out, lse)`` on a checked
    :class:`AttentionSpec` (``lse`` is None unless ``spec.return_residual``).

    ``run(name, query, key, value, bias=None, mask=None, **options)`` with the
    arguments of ``dot_product_attention`` runs a non-dense path on inputs that are
    not yet checked and returns what ``dot_product_attention`` returns (without the
    weights)."""
    if isinstance(spec, AttentionSpec):
        if args or options:
            raise TypeError("run(implementation, spec) takes no other arguments with a spec")
        if implementation not in PATHS:
            raise ValueError(f"no path {implementation!r}; expected one of {sorted(PATHS)}")
        return PATHS[implementation](spec)
    return _run_kernel(implementation, spec, *args, **options)


def _run_kernel(implementation: str, query, key, value, bias=None, mask=None, **options):
    """A non-dense path on ``dot_product_attention``'s arguments (the kernels' runners
    under explicit sharding go through ``auto_axes`` here)."""
    options = dict(options)
    options.pop("return_weights", None)  # the caller computes the weights apart
    if implementation == "blocked":
        return blocked_attention(query, key, value, bias, mask, **options)
    for name in ("mask_mod", "score_mod", "block_mask"):  # select refused them
        if options.pop(name, None) is not None:
            raise ValueError(f"implementation={implementation!r} does not take {name}")
    runners = {"cudnn": cudnn_attention, "pallas": pallas_attention}
    if implementation not in runners:
        raise ValueError(f"no runner for implementation {implementation!r}")
    runner = runners[implementation]
    arrays = {k: options.pop(k, None) for k in _ARRAY_OPTIONS}
    mesh = _sharding.explicit_mesh((query, key, value, bias, mask, *arrays.values()))
    if mesh is None:
        return runner(query, key, value, bias, mask, **options, **arrays)
    if implementation == "pallas" and bias is None:  # (masks, lengths: not for Pallas)
        out = _sharding.attention_per_device(
            lambda q, k, v: runner(q, k, v, None, None, **options, **arrays),
            mesh, query, key, value,
        )  # fmt: skip
        if out is not None:
            return out

    def call(query, key, value, bias, mask, arrays):
        return runner(query, key, value, bias, mask, **options, **arrays)

    return _sharding.attention_in_auto_axes(
        call,
        mesh,
        (query, key, value, bias, mask, arrays),
        return_residual=options.get("return_residual", False),
    )


#: Options of :func:`run` that hold arrays (passed through ``auto_axes`` as arguments).
_ARRAY_OPTIONS = ("query_seq_lengths", "key_value_seq_lengths", "dropout_rng")
