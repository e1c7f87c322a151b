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
# # 10 Context parallelism: one sequence over many devices
#
# A sequence too long for one device is cut along its length and each device holds a shard
# of the queries, keys and values. Attention needs every key for every query, so the shards
# must meet. jattn has three ways, all exact, all built on `jax.shard_map` and JAX's
# collectives:
#
# - **ring** (`jattn.ring_attention`): key/value shards travel around the devices with
#   `ppermute`; each device attends its queries to the shard that is passing and merges the
#   partial results by their log-sum-exp. The backward pass rings again. Memory per device
#   shrinks with the number of devices, in both passes.
# - **all-gather** (`jattn.all_gather_attention`): every device gathers all keys and values.
# - **Ulysses** (`jattn.ulysses_attention`): an all-to-all trades sequence shards for head
#   shards, each device attends over the whole sequence for some of the heads, and trades back.
#
# Under explicit sharding, `jattn.dot_product_attention` runs the ring by itself when the
# query and key are sharded along the sequence. Masks and score modifiers (causal, windows,
# lengths, segment ids, ALiBi, your own `mask_mod`) see *global* positions, whatever the layout.
#
# This notebook emulates 8 devices on the CPU, shards a sequence over them, checks the result
# against one device, draws which device computes which block of the attention matrix (and
# why the zigzag layout balances causal attention), and counts what each strategy sends.

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/jattn/jattn/blob/main/notebooks/10_context_parallel.ipynb)

# %% tags=["skip-execution"]
# %pip install -q "jattn @ git+https://github.com/jattn/jattn"

# %%
import os

# 8 emulated CPU devices: must be set before jax starts (restart the kernel if jax is
# already imported), added to any XLA flags already set. On a TPU or GPU host the real
# devices are used instead.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["XLA_FLAGS"] = flags.strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jattn  # noqa: E402
from jattn import mods  # noqa: E402

SMALL = os.environ.get("JATTN_SMALL") == "1"  # the test suite runs the small sizes
DEVICES = min(8, jax.device_count())
print(f"jattn {jattn.__version__}, jax {jax.__version__}, {jax.device_count()} "
      f"{jax.default_backend()} devices; using {DEVICES}")  # fmt: skip

# %% [markdown]
# ## Shard a sequence, attend, compare with one device
#
# `jax.make_mesh` gives *explicit* mesh axes; `jax.device_put` with `P(None, "seq")` splits the
# sequence axis of `[B, T, N, H]` over the axis `"seq"`. With the mesh set, the call below is
# the ordinary `jattn.dot_product_attention`: seeing the sequence sharded, it runs the ring.

# %%
T = 256 if SMALL else 4096
B, N, H = 1, 8, 32
mesh = jax.make_mesh((DEVICES,), ("seq",), devices=jax.devices()[:DEVICES])
kq, kk, kv = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(key, (B, T, N, H)) for key in (kq, kk, kv))
lengths = jnp.array([T - 7])  # the last 7 positions are padding

with jax.set_mesh(mesh):
    shard = NamedSharding(mesh, P(None, "seq"))
    qs, ks, vs = (jax.device_put(x, shard) for x in (q, k, v))
    print("implementation chosen:", jattn.functional.dispatch.select(None, qs, ks, vs))
    out = jax.jit(
        lambda q, k, v: jattn.dot_product_attention(
            q, k, v, is_causal=True, key_value_seq_lengths=lengths
        )
    )(qs, ks, vs)

reference = jattn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths)
print("output sharding:", out.sharding.spec)
print("max |ring - one device| =", float(jnp.max(jnp.abs(out - reference))))
assert jnp.allclose(out, reference, atol=1e-5)

# %% [markdown]
# Gradients ring too: the backward pass is a custom VJP that passes the shards around again,
# with their gradients travelling along and arriving home at the end.


# %%
def loss(q, k, v):
    return jnp.sum(jattn.dot_product_attention(q, k, v, is_causal=True) ** 2)


with jax.set_mesh(mesh):
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(qs, ks, vs)
ref_grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)  # one device
for name, g, r in zip("qkv", grads, ref_grads, strict=True):
    print(f"d{name}: max error {float(jnp.max(jnp.abs(g - r))):.1e}, sharding {g.sharding.spec}")
    assert jnp.allclose(g, r, atol=1e-4)

# %% [markdown]
# ## Who computes which block, and why zigzag
#
# Device *d* holds the query rows of its shard and, over the ring's steps, meets every key
# shard. Colour each (query, key) pair of a causal mask by the device that computes it: with
# the **contiguous** layout the last device holds the last queries, which see every key, and
# the first device sees almost nothing: the ring waits for the busiest device. The **zigzag**
# layout cuts the sequence into 2P chunks and gives device *d* chunks *d* and 2P-1-*d*: one
# early and one late, so every device does the same work. `jattn.to_zigzag` puts the tokens
# (and the positions the model embeds) in that order once, at the input; `jattn.from_zigzag`
# reads results back. Mask functions see global positions: the segment ids of
# `jattn.mods.segments` stay in the natural order.

# %%
Tp = 64  # a small picture
fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 1, 0.8]})
work = {}
for ax, layout in zip(axes[:2], ("contiguous", "zigzag"), strict=True):
    order = jattn.zigzag_indices(Tp, DEVICES) if layout == "zigzag" else np.arange(Tp)
    owner = np.empty(Tp, int)
    owner[order] = np.repeat(np.arange(DEVICES), Tp // DEVICES)  # position -> device
    causal = np.asarray(mods.mask_grid(mods.causal(), 1, 1, Tp, Tp))[0, 0]
    picture = np.where(causal, owner[:, None], np.nan)
    ax.imshow(picture, cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
    ax.set_title(f"{layout}: the device that computes each pair")
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    work[layout] = [int(causal[owner == d].sum()) for d in range(DEVICES)]
x = np.arange(DEVICES)
axes[2].bar(x - 0.2, work["contiguous"], 0.4, label="contiguous")
axes[2].bar(x + 0.2, work["zigzag"], 0.4, label="zigzag")
axes[2].set_xlabel("device")
axes[2].set_ylabel("visible (query, key) pairs")
axes[2].legend()
fig.tight_layout()
plt.show()
for layout, w in work.items():
    print(f"{layout:10s} max / mean work = {max(w) / np.mean(w):.3f}")

# %% [markdown]
# The zigzag layout in use: the same attention, the sequence permuted once at the input and
# back at the output; the causal mask still sees each token's true position.

# %%
with jax.set_mesh(mesh):
    qz, kz, vz = (jax.device_put(jattn.to_zigzag(x, DEVICES), shard) for x in (q, k, v))
    zig = jax.jit(
        lambda q, k, v: jattn.ring_attention(
            q, k, v, is_causal=True, key_value_seq_lengths=lengths, layout="zigzag"
        )
    )(qz, kz, vz)
back = jattn.from_zigzag(zig, DEVICES)
print("max |zigzag ring - one device| =", float(jnp.max(jnp.abs(back - reference))))
assert jnp.allclose(back, reference, atol=1e-5)

# %% [markdown]
# ## Three strategies, one answer, different traffic
#
# Per forward + backward step, each device sends (shards of `[B, T/P, N, H]` float32):
#
# | strategy | sends per device | memory per device | needs |
# | --- | --- | --- | --- |
# | ring | forward: 2(P-1) shards (k, v); backward: 3(P-1)+1 (q, dout, dq) | O(T/P) | - |
# | all-gather | forward: 2(P-1) shards (k, v); backward: a reduce-scatter of dk, dv | O(T) | - |
# | Ulysses | 4 all-to-alls each way, (P-1)/P of a shard each | O(T/P) | N divisible by P |
#
# (With grouped key/value heads the ring's backward moves keys, values and their gradients
# instead, whichever is fewer bytes; Ulysses gathers key/value heads that P does not divide.)
#
# `benchmarks/bench_context.py` measures these from the traced program, with per-device memory
# from XLA's buffer assignment (results in BENCHMARKS.md).

# %%
segments = jnp.asarray(np.repeat(np.arange(4), T // 4)[None])  # 4 packed documents
packed = mods.and_masks(mods.causal(), mods.segments(segments))
with jax.set_mesh(mesh):
    for name in ("ring", "all_gather", "ulysses"):
        fn = getattr(jattn, f"{name}_attention")
        o = jax.jit(lambda q, k, v, fn=fn: fn(q, k, v, mask_mod=packed))(qs, ks, vs)
        ref = jattn.dot_product_attention(q, k, v, mask_mod=packed)
        err = float(jnp.max(jnp.abs(o - ref)))
        print(f"{name:10s} packed documents: max error {err:.1e}")
        assert err < 1e-5

# %% [markdown]
# ## On a TPU slice, on GPUs, on several hosts
#
# Nothing above is CPU-specific. On a Colab TPU (8 cores) drop the `XLA_FLAGS` line: `jax.devices()`
# are the cores, and the same mesh and calls run there. On a multi-host TPU slice or a GPU
# cluster, every host runs the same program and calls `jax.distributed.initialize()` first
# (on Cloud TPU it finds its peers by itself); the mesh then spans all hosts' devices:
#
# ```python
# jax.distributed.initialize()          # before any other JAX call
# mesh = jax.make_mesh((jax.device_count(),), ("seq",))
# ```
#
# The training program does this for you: `jattn-train --config dates
# --config.train.parallelism=sequence` lays batches out over a `('data', 'seq')` mesh, and
# several hosts run the same command with `--coordinator_address=HOST:PORT
# --num_processes=N --process_id=I` (process 0 writes the metrics and plots).
