# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 Quickstart on Colab: CPU, GPU or TPU, same code
#
# jattn is plain JAX: the same code runs on whatever backend JAX finds. On Colab pick
# *Runtime > Change runtime type* (CPU, T4 GPU or TPU), run the install cell, then run all.
# Nothing below mentions a device.

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/jattn/jattn/blob/main/notebooks/06_colab_quickstart.ipynb)

# %% tags=["skip-execution"]
# %pip install -q "jattn @ git+https://github.com/jattn/jattn"

# %%
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jattn
from jattn.layers import MultiHeadAttention
from jattn.viz import collect_attention_weights, plot_attention_grid

SMALL = os.environ.get("JATTN_SMALL") == "1"  # the test suite runs the small sizes
backend = jax.default_backend()  # 'cpu', 'gpu' or 'tpu'
print(f"jattn {jattn.__version__}, jax {jax.__version__}")
print(f"backend: {backend}, devices: {jax.devices()}")

# %% [markdown]
# ## The same attention call everywhere
#
# `jattn.dot_product_attention` takes `[B, T, N, H]` arrays like
# `jax.nn.dot_product_attention` and agrees with it. Accelerators get bfloat16 inputs (the
# softmax still runs in float32); the CPU keeps float32.

# %%
dtype = jnp.float32 if backend == "cpu" else jnp.bfloat16
B, T, N, H = (2, 128, 4, 32) if SMALL else (8, 1024, 8, 64)
kq, kk, kv = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(kq, (B, T, N, H), dtype)
k = jax.random.normal(kk, (B, T, N, H), dtype)
v = jax.random.normal(kv, (B, T, N, H), dtype)

ours = jax.jit(lambda q, k, v: jattn.dot_product_attention(q, k, v, is_causal=True))
reference = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
diff = jnp.max(jnp.abs(ours(q, k, v).astype(jnp.float32) - reference(q, k, v).astype(jnp.float32)))
print(f"max |jattn - jax.nn| = {float(diff):.2e} ({jnp.dtype(dtype).name})")

# %% [markdown]
# ## Timing
#
# Compile once, then time several calls and report the median (JAX dispatches asynchronously:
# `block_until_ready` waits for the result).


# %%
def median_ms(fn, *args, repeats=5 if SMALL else 20):
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


print(f"B={B} T={T} N={N} H={H} on {backend}")
print(f"jattn.dot_product_attention   {median_ms(ours, q, k, v):8.3f} ms")
print(f"jax.nn.dot_product_attention  {median_ms(reference, q, k, v):8.3f} ms")

# %% [markdown]
# ## A layer in a jitted function
#
# Flax NNX layers take their randomness as `nnx.Rngs`; `nnx.jit` compiles a function of the
# layer. The weights of every head come back from `collect_attention_weights` and plot as a grid.

# %%
D = N * H
layer = MultiHeadAttention(N, D, dtype=dtype, rngs=nnx.Rngs(0))
x = jax.random.normal(jax.random.key(1), (B, T, D), dtype)


@nnx.jit
def forward(layer, x):
    return layer(x, is_causal=True)


print("output", forward(layer, x).shape, forward(layer, x).dtype)
print(f"MultiHeadAttention forward  {median_ms(forward, layer, x):8.3f} ms")

# %%
short = x[:1, :12]
weights = collect_attention_weights(layer, short, is_causal=True)
plot_attention_grid(
    {"self-attention": weights["MultiHeadAttention"]},
    batch_index=0,
    title=f"causal self-attention on {backend}",
)

# %% [markdown]
# ## Many devices: a TPU slice, several hosts
#
# A Colab TPU has 8 cores. `jattn-train --config dates --config.train.parallelism=fsdp` (or
# `data`, `tensor`, `sequence`) lays a training run out over all of them. A sequence sharded
# over a mesh axis (`jax.make_mesh((8,), ("seq",))`, `jax.device_put(x, NamedSharding(mesh,
# P(None, "seq")))`) runs ring attention by itself: see notebook 10. On a multi-host TPU slice
# or a GPU cluster every host runs the same command and JAX connects them: call
# `jax.distributed.initialize()` before anything else in your own program, or pass
# `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` to `jattn-train`.

# %%
print(f"{jax.device_count()} devices on {jax.process_count()} process(es): {jax.devices()}")
