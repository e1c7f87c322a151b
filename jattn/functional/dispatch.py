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

An explicit implementation that cannot honour the inputs raises a ``ValueError``
naming the unsupported feature, dtype or device.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jattn.functional import _sharding
from jattn.functional.masks import causal_mask
from jattn.functional.softmax import MASK_FILL

__all__ = [
    "IMPLEMENTATIONS",
    "ACCELERATOR_DENSE_MAX_BYTES",
    "DENSE_MAX_ELEMENTS",
    "IN_LAYOUT_MAX_ROWS",
    "IN_LAYOUT_MAX_WORK",
    "IN_LAYOUT_MIN_KEYS",
    "MAX_TILE_ELEMENTS",
    "OPTION_DEFAULTS",
    "default_block_sizes",
    "dense_in_layout",
    "select",
]

IMPLEMENTATIONS = (None, "dense", "xla", "blocked", "cudnn", "pallas")

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
IN_LAYOUT_MAX_ROWS = 8
IN_LAYOUT_MAX_WORK = 64


#: On GPU and TPU, when neither cuDNN nor Pallas takes the inputs, the dense path runs
#: while its float32 score tensor ``[B, N, T, S]`` stays within this many bytes, and the
#: blocked path beyond (for memory). There XLA's dense program is one set of large
#: fused kernels (jax.nn's own default), while the plain-JAX blocked path runs its tiles
#: as a sequential loop of small kernels. Not yet measured on a GPU (no GPU has been
#: lent to this project): ``benchmarks/bench_gpu.py`` is the measurement to make.
ACCELERATOR_DENSE_MAX_BYTES = 1 << 30


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


def _cudnn_problems(query, key, value, bias, mask, o) -> list[str]:
    """Why ``jax.nn.dot_product_attention(implementation='cudnn')`` cannot give our results."""
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
    if o["dropout_rate"] > 0.0:
        problems.append("dropout")
    if o["return_residual"]:
        problems.append("return_residual (cuDNN returns it in the input dtype, not float32)")
    if mask is not None:
        # cuDNN turns a boolean mask into a finite bias, so a fully masked row gets
        # softmax(logits) instead of fully_masked's zeros/uniform weights.
        problems.append("boolean masks (fully masked rows differ from fully_masked)")
    if o["local_window_size"] is not None:
        problems.append("local_window_size (cuDNN windows differ: left only, exclusive)")
    if o["key_value_seq_lengths"] is not None:
        # a key length of 0 leaves rows fully masked, which cuDNN does not give as
        # fully_masked's zeros/uniform weights
        problems.append("key_value_seq_lengths (fully masked rows differ from fully_masked)")
    if o["is_causal"] and query.shape[-3] > key.shape[-3]:
        problems.append("is_causal with T > S")
    return problems


def _pallas_block(n: int) -> int | None:
    for b in (512, 256, 128):
        if n % b == 0:
            return b
    return None


def _pallas_problems(query, key, value, bias, mask, o, *, interpret: bool = False) -> list[str]:
    """Why the TPU Pallas flash-attention kernel cannot give our results."""
    problems = []
    if _platform() != "tpu" and not interpret:
        problems.append(f"device {_platform()!r} (the Pallas flash-attention kernel needs a TPU)")
    h, hv = query.shape[-1], value.shape[-1]
    if h != hv:
        problems.append(f"value head dim Hv={hv} != H={h}")
    t, s = query.shape[-3], key.shape[-3]
    if _pallas_block(t) is None or _pallas_block(s) is None:
        problems.append(f"lengths T={t}, S={s} (the kernel needs multiples of 128)")
    for name in ("query_seq_lengths", "key_value_seq_lengths", "local_window_size"):
        if o[name] is not None:
            problems.append(name)
    if mask is not None:
        problems.append("boolean masks")
    if o["dropout_rate"] > 0.0:
        problems.append("dropout")
    if o["return_residual"]:
        problems.append("return_residual")
    if o["is_causal"] and t > s:
        problems.append("is_causal with T > S")
    if bias is not None and o["scale"] == 0:
        problems.append("scale=0 with a bias (the kernel divides the bias by the scale)")
    if o["is_causal"] and jax.config.jax_enable_x64:  # its causal mask mixes int64, int32
        problems.append("is_causal with jax_enable_x64 (the kernel's causal mask fails to trace)")
    return problems


#: The keyword options of ``dot_product_attention`` that :func:`select` reads, with the
#: function's defaults (tests check they match its signature).
OPTION_DEFAULTS = {
    "scale": None,
    "is_causal": False,
    "query_seq_lengths": None,
    "key_value_seq_lengths": None,
    "local_window_size": None,
    "dropout_rate": 0.0,
    "dropout_rng": None,
    "fully_masked": "zeros",
    "return_weights": False,
    "return_residual": False,
}


def select(implementation, query, key, value, bias=None, mask=None, **options) -> str:
    """The implementation ``'dense' | 'blocked' | 'cudnn' | 'pallas'`` to run.

    ``implementation=None`` picks the fastest path that gives the library's results:
    cuDNN on GPU and Pallas on TPU where they support the inputs; otherwise on CPU
    the dense path for short sequences (``T * S <= DENSE_MAX_ELEMENTS``) and for a
    few queries against many keys (:func:`dense_in_layout`: a decoding step), the
    blocked path for other long ones, and on GPU/TPU the dense path while its float32 scores
    fit in :data:`ACCELERATOR_DENSE_MAX_BYTES` and the blocked path beyond.
    The choice does not depend on ``return_weights``: asking for the weights never
    changes the output (:func:`jattn.dot_product_attention` computes them apart).
    An explicit choice that cannot honour the inputs raises a ``ValueError`` that
    lists what it does not support.

    ``options`` are keyword arguments of ``dot_product_attention`` (the ones left out
    take its defaults, :data:`OPTION_DEFAULTS`); arrays may be ``jax.ShapeDtypeStruct``,
    e.g. ``select(None, q, k, v, is_causal=True)`` to see which path a call takes.
    """
    unknown = sorted(set(options) - set(OPTION_DEFAULTS))
    if unknown:
        raise TypeError(
            f"select() got unknown options {unknown}; expected keyword arguments of "
            f"dot_product_attention: {sorted(OPTION_DEFAULTS)}"
        )
    options = {**OPTION_DEFAULTS, **options}
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation {implementation!r}; expected one of {IMPLEMENTATIONS}"
        )
    if implementation in ("dense", "xla"):
        return "dense"
    if implementation == "blocked":
        return "blocked"
    checks = {"cudnn": _cudnn_problems, "pallas": _pallas_problems}
    if implementation is not None:
        problems = checks[implementation](query, key, value, bias, mask, options)
        if problems:
            raise ValueError(
                f"implementation={implementation!r} does not support: " + "; ".join(problems)
            )
        return implementation
    platform = _platform()
    if platform == "gpu" and not _cudnn_problems(query, key, value, bias, mask, options):
        return "cudnn"
    if platform == "tpu" and not _pallas_problems(query, key, value, bias, mask, options):
        return "pallas"
    t, s = query.shape[-3], key.shape[-3]
    if platform in ("gpu", "tpu"):
        score_bytes = 4 * math.prod(query.shape[:-3]) * query.shape[-2] * t * s
        return "dense" if score_bytes <= ACCELERATOR_DENSE_MAX_BYTES else "blocked"
    if t * s <= DENSE_MAX_ELEMENTS or dense_in_layout(query, key, value, bias, mask):
        return "dense"
    return "blocked"


def _flatten(x, nb):
    return x.reshape((-1,) + x.shape[nb:])


def cudnn_attention(query, key, value, bias=None, mask=None, **o):
    """``jax.nn.dot_product_attention(implementation='cudnn')`` with jattn's argument set
    (``o``: options of ``dot_product_attention``, defaults :data:`OPTION_DEFAULTS`)."""
    o = {**OPTION_DEFAULTS, **o}
    nb = query.ndim - 3
    batch = query.shape[:nb]
    q, k, v = (_flatten(x, nb) if nb != 1 else x for x in (query, key, value))
    if nb == 0:
        q, k, v = q[None], k[None], v[None]
    dead = None
    if bias is not None:
        bias = jnp.asarray(bias)
        bias = bias.reshape((1,) * (nb + 3 - bias.ndim) + bias.shape)
        bias = jnp.broadcast_to(bias, batch + bias.shape[nb:]).reshape((-1,) + bias.shape[nb:])
        # A row whose biases are all -inf gives zeros (as the dense path). cuDNN gets a
        # finite floor instead of -inf, so such a row is a finite softmax (zeroed below)
        # and its gradients are zero, not the NaN of exp(-inf - -inf).
        hidden = bias == -jnp.inf
        if o["is_causal"]:
            hidden = hidden | ~causal_mask(query.shape[-3], key.shape[-3])[None, None]
        dead = jnp.all(hidden, axis=-1)  # [B|1, N|1, T|1]
        bias = jnp.maximum(bias, jnp.asarray(jnp.finfo(bias.dtype).min / 2, bias.dtype))
    lens = []
    for name in ("query_seq_lengths", "key_value_seq_lengths"):
        x = o[name]
        lens.append(None if x is None else jnp.broadcast_to(x, batch).reshape(-1).astype(jnp.int32))
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        bias,
        scale=o["scale"],
        is_causal=o["is_causal"],
        query_seq_lengths=lens[0],
        key_value_seq_lengths=lens[1],
        implementation="cudnn",
    )  # [B, T, N, Hv]
    if dead is not None:
        out = jnp.where(jnp.swapaxes(dead, 1, 2)[..., None], jnp.zeros((), out.dtype), out)
    if lens[0] is not None:  # padded queries give zeros whatever cuDNN writes there (as dense)
        valid = jnp.arange(out.shape[1])[None, :] < lens[0][:, None]  # [B, T]
        out = jnp.where(valid[..., None, None], out, jnp.zeros((), out.dtype))
    return out.reshape(query.shape[:-1] + value.shape[-1:])


def pallas_attention(query, key, value, bias=None, mask=None, *, interpret=False, **o):
    """The TPU Pallas flash-attention kernel with jattn's ``[..., T, N, H]`` layout.

    Grouped heads are repeated to N (the kernel takes N == K). ``interpret=True``
    runs the kernel in the Pallas TPU interpreter (for tests on CPU). The interpreter
    runs Python callbacks that dispatch JAX operations, and other work dispatched while
    they run can deadlock the CPU runtime: called eagerly, an interpreted kernel returns
    its result ready; a caller that jits it should block on the result likewise.
    """
    o = {**OPTION_DEFAULTS, **o}
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    nb = query.ndim - 3
    batch = query.shape[:nb]
    t, n, h = query.shape[-3:]
    s, kh = key.shape[-3], key.shape[-2]

    def bnth(x):  # [..., T, N, H] -> [B, N, T, H]
        return jnp.swapaxes(x.reshape((-1,) + x.shape[nb:]), 1, 2)

    q = bnth(query)
    k, v = (jnp.repeat(bnth(x), n // kh, axis=1) for x in (key, value))
    ab = None
    if bias is not None:
        ab = jnp.asarray(bias)
        ab = ab.reshape((1,) * (nb + 3 - ab.ndim) + ab.shape)
        ab = jnp.broadcast_to(ab, batch + (n, t, s)).reshape(-1, n, t, s).astype(jnp.float32)
    scale = o["scale"]
    scale = 1.0 / (h**0.5) if scale is None else float(scale)
    dead = None
    if ab is not None:  # the kernel computes (q.k + ab) * scale; ours is q.k * scale + bias
        # A row whose visible biases are all -inf gives zeros (as the dense path). The
        # kernel gets finite biases, bounded so that (q.k + ab) * scale stays finite:
        # a -inf row would otherwise give inf - inf = NaN in its softmax.
        hidden = ab == -jnp.inf
        if o["is_causal"]:
            hidden = hidden | ~causal_mask(t, s)[None, None]
        dead = jnp.all(hidden, axis=-1)  # [B, N, T]
        bound = MASK_FILL / max(1.0, abs(scale))
        ab = jnp.clip(ab / jnp.float32(scale), bound, -bound)
    bq, bk = _pallas_block(t), _pallas_block(s)
    sizes = fa.BlockSizes(
        block_q=bq,
        block_k_major=bk,
        block_k=bk,
        block_b=1,
        block_q_major_dkv=bq,
        block_k_major_dkv=bk,
        block_k_dkv=bk,
        block_q_dkv=bq,
        block_k_major_dq=bk,
        block_k_dq=bk,
        block_q_dq=bq,
    )

    def call(q, k, v, ab):
        return fa.flash_attention(
            q, k, v, ab, causal=o["is_causal"], sm_scale=scale, block_sizes=sizes
        )

    out = _interpreted(call, q, k, v, ab) if interpret else call(q, k, v, ab)
    if dead is not None:
        out = jnp.where(dead[..., None], jnp.zeros((), out.dtype), out)
    out = jnp.swapaxes(out, 1, 2).reshape(query.shape[:-1] + value.shape[-1:])
    if interpret and not isinstance(out, jax.core.Tracer):
        out = jax.block_until_ready(out)
    return out


def _interpreted(f, *args):
    """``f(*args)`` with its Pallas kernels run by the TPU interpreter, in the forward
    and in the backward pass (the interpret-mode context only covers what is traced
    inside it, and JAX traces the backward kernels when it differentiates)."""
    from jax.experimental.pallas import tpu as pltpu

    @jax.custom_vjp
    def g(*a):
        with pltpu.force_tpu_interpret_mode():
            return f(*a)

    def g_fwd(*a):
        with pltpu.force_tpu_interpret_mode():
            return jax.vjp(f, *a)  # the VJP function is a pytree of residuals

    def g_bwd(vjp, cotangent):
        with pltpu.force_tpu_interpret_mode():
            return vjp(cotangent)

    g.defvjp(g_fwd, g_bwd)
    return g(*args)


def run(implementation: str, query, key, value, bias=None, mask=None, **options):
    """Runs a non-dense implementation chosen by :func:`select`."""
    from jattn.functional.blocked import blocked_attention

    options = dict(options)
    del options["return_weights"]  # the caller computes the weights apart
    if implementation == "blocked":
        return blocked_attention(query, key, value, bias, mask, **options)
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
