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

from jattn.functional._checks import OPTION_DEFAULTS
from jattn.functional.masks import causal_mask
from jattn.functional.softmax import MASK_FILL

__all__ = ["cudnn_attention", "pallas_attention", "pallas_block"]


def pallas_block(n: int) -> int | None:
    for b in (512, 256, 128):
        if n % b == 0:
            return b
    return None


def _flatten(x, nb):
    return x.reshape((-1,) + x.shape[nb:])


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
