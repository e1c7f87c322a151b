"""The GPU and TPU kernels as attention paths: cuDNN (through ``jax.nn``) and the TPU
Pallas flash-attention kernel, with jattn's argument set and results.

Which path runs is decided apart, by :func:`jattn.functional.dispatch.select`; these
runners take inputs that :func:`jattn.functional._checks.check_attention_inputs`
already checked, and options of ``dot_product_attention`` (the ones left out take its
defaults, :data:`jattn.functional._checks.OPTION_DEFAULTS`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jattn.functional._checks import OPTION_DEFAULTS
from jattn.functional.softmax import MASK_FILL

__all__ = ["cudnn_attention", "pallas_attention", "pallas_block", "splash_attention"]


def _above_diagonal(t: int, s: int) -> jax.Array:
    """``[T, S]``: the keys a top-left aligned causal mask hides (any T, S, 0 included:
    the runners' own shapes, not a user's sizes, so not ``causal_mask``'s checks)."""
    return jnp.arange(t, dtype=jnp.int32)[:, None] < jnp.arange(s, dtype=jnp.int32)[None, :]


def pallas_block(n: int) -> int | None:
    for b in (512, 256, 128):
        if n % b == 0:
            return b
    return None


def _flatten(x, nb):
    return x.reshape((-1,) + x.shape[nb:])


def _heads_first(query, key, value):
    """``[..., T, N, H]`` inputs as the Pallas kernels take them, ``[B, N, T, H]``, with
    the key/value heads repeated to N (the kernels take N == K)."""
    nb = query.ndim - 3
    n, kh = query.shape[-2], key.shape[-2]

    def bnth(x):
        return jnp.swapaxes(x.reshape((-1,) + x.shape[nb:]), 1, 2)

    return bnth(query), *(jnp.repeat(bnth(x), n // kh, axis=1) for x in (key, value))


def cudnn_attention(query, key, value, bias=None, mask=None, **o):
    """``jax.nn.dot_product_attention(implementation='cudnn')`` with jattn's argument set
    (``o``: options of ``dot_product_attention``, defaults ``OPTION_DEFAULTS``)."""
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
            hidden = hidden | _above_diagonal(query.shape[-3], key.shape[-3])[None, None]
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
    s = key.shape[-3]

    q, k, v = _heads_first(query, key, value)
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
            hidden = hidden | _above_diagonal(t, s)[None, None]
        dead = jnp.all(hidden, axis=-1)  # [B, N, T]
        bound = MASK_FILL / max(1.0, abs(scale))
        ab = jnp.clip(ab / jnp.float32(scale), bound, -bound)
    bq, bk = pallas_block(t), pallas_block(s)
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


# ------------------------------------------------------------------------------ splash


def splash_mask_mod(spec):
    """The one mask_mod a splash call evaluates: the spec's shortcuts (causal, window)
    and its mask_mod (or its block mask's), by logical and; None for none."""
    from jattn.functional import mods

    user = spec.mask_mod
    if user is None and spec.block_mask is not None:
        user = spec.block_mask.mask_mod
    return mods.shortcut_mask_mod(
        spec.is_causal, spec.window, None, None, None if user is None else mods.as_mod(user)
    )


def depends_on_example(mask_mod) -> bool:
    """Whether ``mask_mod``'s result depends on its example index ``b`` (by the data flow
    of its traced program, so exactly); True when that cannot be told."""
    from jax._src.interpreters import partial_eval as pe

    from jattn.functional import mods

    idx = jnp.arange(2, dtype=jnp.int32)

    def f(b):
        return mods.call_mask(mask_mod, b, jnp.int32(0), idx[:, None], idx[None, :])

    try:
        closed = jax.make_jaxpr(f)(jnp.int32(0))
        _, used = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    except Exception:  # noqa: BLE001 - a private API: when in doubt, it depends
        return True
    return bool(used[0])


def _splash_mask_class():
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    class ModMask(sm.Mask):
        """One head of a jattn mask_mod as a splash mask, evaluated on the host a block
        at a time (splash stores only the partial blocks)."""

        def __init__(self, mask_mod, head: int, shape: tuple[int, int]):
            self.mask_mod, self.head, self._shape = mask_mod, head, shape

        @property
        def shape(self):
            return self._shape

        def __getitem__(self, idx):
            q, kv = (np.arange(*s.indices(n)) for s, n in zip(idx, self._shape, strict=True))
            return _host_mask(self.mask_mod, self.head, q, kv)

        def __eq__(self, other):
            return self is other

        def __hash__(self):
            return id(self)

    return ModMask


def splash_attention(spec, *, interpret: bool = False):
    """The TPU Pallas splash kernel (shipped with JAX) on a checked spec whose mask is a
    mask_mod (and the causal/window shortcuts): ``(out, None)``.

    The mask_mod is evaluated on the host per head and block when the call is traced
    (it must not depend on the example, :func:`depends_on_example`); splash skips the
    empty blocks and masks the partial ones. A ``softcap`` score_mod maps to the
    kernel's logit soft-cap. Grouped heads are repeated to N. Rows with no visible key
    get ``fully_masked``'s zeros or mean of the values. ``interpret=True`` runs the
    kernel in the Pallas TPU interpreter (tests on CPU).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    query, key, value = spec.query, spec.key, spec.value
    t, n, h = query.shape[-3:]
    s = key.shape[-3]
    mm = splash_mask_mod(spec)
    if mm is None:
        mask = sm.MultiHeadMask([sm.FullMask((t, s)) for _ in range(n)])
    else:
        cls = _splash_mask_class()
        mask = sm.MultiHeadMask([cls(mm, head, (t, s)) for head in range(n)])
    cap = None if spec.score_mod is None else float(spec.score_mod.params[0])
    bq, bk = pallas_block(t), pallas_block(s)
    sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                          block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                          block_kv_dq=bk)  # fmt: skip
    scale = 1.0 / (h**0.5) if spec.scale is None else float(spec.scale)

    q, k, v = _heads_first(query, key, value)
    q = q * jnp.asarray(scale, query.dtype)

    def call(q, k, v):
        kernel = sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    attn_logits_soft_cap=cap, interpret=interpret)  # fmt: skip
        return jax.vmap(kernel)(q, k, v)

    out = call(q, k, v)  # [B, N, T, Hv]
    if mm is not None:  # rows that see no key: the fully_masked policy, as every path
        seen = np.stack([_rows_seen(mm, head, t, s) for head in range(n)])  # [N, T]
        dead = jnp.asarray(~seen)[None, :, :, None]
        fill = jnp.zeros((), out.dtype)
        if spec.fully_masked == "uniform":
            fill = jnp.mean(v.astype(jnp.float32), axis=2, keepdims=True).astype(out.dtype)
        out = jnp.where(dead, fill, out)
    return jnp.swapaxes(out, 1, 2).reshape(query.shape[:-1] + value.shape[-1:]), None


def _host_mask(mask_mod, head: int, q: np.ndarray, kv: np.ndarray) -> np.ndarray:
    """``[len(q), len(kv)]`` bool: ``mask_mod`` of example 0 and ``head`` at positions
    ``q`` x ``kv``, evaluated now (also while a caller traces)."""
    from jattn.functional import mods

    with jax.ensure_compile_time_eval():
        m = mods.call_mask(mask_mod, 0, head, q[:, None], kv[None, :])
        return np.broadcast_to(np.asarray(m), (q.size, kv.size))


def _rows_seen(mask_mod, head: int, t: int, s: int, rows: int = 512) -> np.ndarray:
    """``[T]``: which queries of ``head`` see some key, a block of rows at a time."""
    kv = np.arange(s)
    return np.concatenate([
        _host_mask(mask_mod, head, np.arange(start, min(start + rows, t)), kv).any(axis=1)
        for start in range(0, t, rows)
    ])  # fmt: skip
