# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 Long sequences: blocked (flash-style) exact attention
#
# Dense attention builds the `[B, N, T, S]` score matrix: at T = S = 16384 and 8 heads that
# is 8 GiB of float32 before the backward pass keeps its own copy. jattn's blocked path
# computes the same softmax attention block by block with an online softmax (Rabe & Staats
# 2021; FlashAttention) and recomputes the blocks in the backward pass, so memory grows
# with T, not T * S. This notebook shows which path a call takes, that the results are the
# same, what the memory is, how causal and windowed attention skip work, and how the
# log-sum-exp lets you combine attention computed over separate chunks of keys.

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/jattn/jattn/blob/main/notebooks/07_long_sequences.ipynb)

# %% tags=["skip-execution"]
# %pip install -q "jattn @ git+https://github.com/jattn/jattn"

# %%
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jattn
from jattn.functional import dispatch

SMALL = os.environ.get("JATTN_SMALL") == "1"  # the test suite runs the small sizes
print(f"jattn {jattn.__version__}, jax {jax.__version__}, backend {jax.default_backend()}")


def qkv(t, s=None, *, b=1, n=8, k=8, h=64, seed=0, dtype=jnp.float32):
    """Unit-normal ``[B, T, N, H]`` queries and ``[B, S, K, H]`` keys and values."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    s = t if s is None else s
    return (
        jax.random.normal(kq, (b, t, n, h), dtype),
        jax.random.normal(kk, (b, s, k, h), dtype),
        jax.random.normal(kv, (b, s, k, h), dtype),
    )


# %% [markdown]
# ## Which path does a call take?
#
# `implementation=None` (the default) asks `dispatch.select`, which you can call yourself with
# the same arguments (shapes are enough): the dense path for short sequences and for a decoding
# step (a few queries against a long KV cache), the blocked path for long ones, cuDNN on an
# NVIDIA GPU and the Pallas flash kernel on a TPU where they support the inputs. An explicit
# `implementation=` that cannot honour the inputs raises an error that says why.

# %%
for t in (128, 256, 512, 4096):
    q = jax.ShapeDtypeStruct((1, t, 8, 64), jnp.float32)
    print(f"T=S={t:5d}: {dispatch.select(None, q, q, q, is_causal=True)}")
step = jax.ShapeDtypeStruct((1, 1, 8, 64), jnp.float32)  # one new token per sequence
cache = jax.ShapeDtypeStruct((1, 32768, 8, 64), jnp.float32)
print(f"T=1, S=32768 (decoding): {dispatch.select(None, step, cache, cache)}")
print(
    "default block sizes (block_q, block_kv) at T=S=4096:",
    dispatch.default_block_sizes(4096, 4096, 64),
)

try:
    q, k, v = qkv(256)
    jattn.dot_product_attention(q, k, v, implementation="cudnn")
except ValueError as err:
    print("ValueError:", err)

# %% [markdown]
# ## The same results
#
# The blocked path supports every feature of the dense one (bias, boolean masks, causal,
# windows, sequence lengths, grouped heads, dropout with the same masks, a value head dim of
# its own, the log-sum-exp). Here both run with causal masking, a sliding window, per-example
# key lengths and grouped heads, with small blocks so that many of them are involved; outputs
# and gradients agree to float32 rounding (relative to their largest entries).

# %%
t = 200 if SMALL else 1000
q, k, v = qkv(t, b=2, n=8, k=2)
opts = dict(is_causal=True, local_window_size=(64, 0), key_value_seq_lengths=jnp.array([t, t // 2]))


# The options are closed over: window sizes and block sizes set the shapes, so under jax.jit
# they must be static Python values, not traced arguments.
dense = jax.jit(
    lambda q, k, v: jattn.dot_product_attention(q, k, v, implementation="dense", **opts)
)
blocked = jax.jit(lambda q, k, v: jattn.blocked_attention(q, k, v, block_sizes=(64, 128), **opts))
out_d, out_b = dense(q, k, v), blocked(q, k, v)
grads_d = jax.grad(lambda q, k, v: jnp.sum(dense(q, k, v) ** 2), argnums=(0, 1, 2))(q, k, v)
grads_b = jax.grad(lambda q, k, v: jnp.sum(blocked(q, k, v) ** 2), argnums=(0, 1, 2))(q, k, v)


def rel(a, b):
    """Largest difference, relative to the largest magnitude."""
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


print(f"output: relative difference {rel(out_b, out_d):.1e}")
for name, gd, gb in zip("qkv", grads_d, grads_b, strict=True):
    print(f"d{name}:     relative difference {rel(gb, gd):.1e}")
assert rel(out_b, out_d) < 1e-5 and all(
    rel(gb, gd) < 1e-5 for gd, gb in zip(grads_d, grads_b, strict=True)
)

# %% [markdown]
# ## Memory
#
# XLA reports how much temporary memory a compiled program needs, without running it. For the
# forward and backward pass of causal attention at T = S (8 heads of 64), `jax.nn` keeps score
# matrices; jattn keeps a few tiles.

# %%
t = 1024 if SMALL else 4096
spec = jax.ShapeDtypeStruct((1, t, 8, 64), jnp.float32)
for name, fn in (("jax.nn", jax.nn.dot_product_attention), ("jattn", jattn.dot_product_attention)):
    grad = jax.jit(
        jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v, is_causal=True)), argnums=(0, 1, 2))
    )
    temp = grad.lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes
    print(f"{name:7s} forward+backward at T=S={t}: {temp / 2**20:8.1f} MiB of temporaries")

# %% [markdown]
# ## Causal and windowed attention skip work
#
# Tiles above the causal diagonal, or outside a sliding window, are never computed: causal
# attention costs about half of full attention, and a window costs O(T * window) instead of
# O(T * S). (On this page's CPU; times are medians, and the first call compiles.)


# %%
def median_ms(fn, *args, repeats=3 if SMALL else 7):
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


t = 512 if SMALL else 4096
q, k, v = qkv(t)
cases = {
    "full": lambda q, k, v: jattn.dot_product_attention(q, k, v),
    "causal": lambda q, k, v: jattn.dot_product_attention(q, k, v, is_causal=True),
    "window 256": lambda q, k, v: jattn.dot_product_attention(
        q, k, v, local_window_size=(128, 127)
    ),
    "jax.nn window 256": lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, local_window_size=(128, 127)
    ),
}
for name, fn in cases.items():
    print(f"T=S={t} {name:18s} {median_ms(jax.jit(fn), q, k, v):8.1f} ms")

# %% [markdown]
# ## Combining chunks with the log-sum-exp
#
# `return_residual=True` also returns each row's log-sum-exp of the logits, `lse [B, T, N]`.
# Attention over keys split into chunks, computed separately (on different devices, or one
# chunk at a time to bound memory), combines exactly: weight each chunk's output by
# `exp(lse_chunk - lse_all)`, where `lse_all` is the `logaddexp` of the chunks' values. This is
# the step that ring attention and sequence-parallel decoding are built on.

# %%
t = 256 if SMALL else 2048
q, k, v = qkv(t, 2 * t)
halves = [
    jattn.dot_product_attention(q, k[:, sl], v[:, sl], return_residual=True)
    for sl in (slice(0, t), slice(t, 2 * t))
]
(out1, lse1), (out2, lse2) = halves
lse = jnp.logaddexp(lse1, lse2)
combined = jnp.exp(lse1 - lse)[..., None] * out1 + jnp.exp(lse2 - lse)[..., None] * out2
full, lse_full = jattn.dot_product_attention(q, k, v, return_residual=True)
print(f"max |combined - full| = {float(jnp.max(jnp.abs(combined - full))):.1e}")
print(f"max |lse - lse_full|  = {float(jnp.max(jnp.abs(lse - lse_full))):.1e}")
assert jnp.allclose(combined, full, atol=1e-5) and jnp.allclose(lse, lse_full, atol=1e-4)
