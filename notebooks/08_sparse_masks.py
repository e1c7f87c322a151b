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
# # 08 Sparse attention: masks and score modifiers as functions
#
# A boolean mask `[B, N, T, S]` says which keys each query sees, but at T = S = 16384 it takes
# 256 MiB per example and head, and it tells a blocked kernel nothing about which tiles it can
# skip without reading them. jattn (after FlexAttention) takes the pattern as a **function**:
#
# ```python
# mask_mod(b, n, q_idx, kv_idx) -> bool        # True = attend
# score_mod(score, b, n, q_idx, kv_idx) -> score  # rewrites one scaled logit
# ```
#
# `b` is the (flattened) example, `n` the query head, `q_idx` and `kv_idx` positions; all are
# int32 arrays that broadcast against each other, so a mod is written as for scalars with
# `jnp` operations. They are keyword arguments of `jattn.dot_product_attention(q, k, v,
# mask_mod=..., score_mod=..., block_mask=...)`, and `jattn.block_mask(mask_mod, q_len, kv_len,
# block_sizes)` evaluates a mask_mod once into the table of tiles the blocked path visits
# (0 empty: skipped, 1 partial: the mask is evaluated on the tile, 2 full: no mask at all).
# `jattn.mods` has the usual patterns (`full`, `causal`, `sliding_window`, `lengths`,
# `prefix_lm`, `segments`, `strided`, `dilated`, `fixed`, `global_tokens`, `longformer`,
# `bigbird`, `per_head`), combinators (`and_masks`, `or_masks`, `not_mask`, `offset`,
# `chain_scores`), score mods (`alibi`, `relative_position_bias`, `softcap`) and `mask_grid`,
# which materialises a mask_mod for plots and references.
#
# This notebook writes a mod by hand, draws every pattern's mask next to its block map, checks
# the results against `jax.nn.dot_product_attention` with the mask materialised, measures time
# against block density, and gives each head of a multi-head layer its own pattern.

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/jattn/jattn/blob/main/notebooks/08_sparse_masks.ipynb)

# %% tags=["skip-execution"]
# %pip install -q "jattn @ git+https://github.com/jattn/jattn"

# %%
import functools
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from matplotlib.colors import ListedColormap

import jattn
from jattn import mods
from jattn.layers import MultiHeadAttention

SMALL = os.environ.get("JATTN_SMALL") == "1"  # the test suite runs the small sizes
print(f"jattn {jattn.__version__}, jax {jax.__version__}, backend {jax.default_backend()}")

# The library's mods and block masks are pytrees: under jit they are arguments, so a new
# pattern of the same structure (another window width, new segment ids) does not recompile.
attend = jax.jit(jattn.dot_product_attention, static_argnames=("implementation", "is_causal"))


def qkv(t, s=None, *, b=1, n=8, h=64, seed=0):
    """Unit-normal ``[B, T, N, H]`` queries and ``[B, S, N, H]`` keys and values."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    s = t if s is None else s
    return (
        jax.random.normal(kq, (b, t, n, h)),
        jax.random.normal(kk, (b, s, n, h)),
        jax.random.normal(kv, (b, s, n, h)),
    )


# %% [markdown]
# ## A mod is a function
#
# A causal window of 8 keys, written by hand, is the same mask as the library's
# `and_masks(causal(), sliding_window((7, 0)))`. `mods.mask_grid(mod, B, N, T, S)` evaluates a
# mask_mod on every position (`[B|1, N|1, T, S]`: size 1 where it depends on neither the example
# nor the head). A score_mod that subtracts 0.1 per position of distance is ALiBi with slope 0.1
# on every head, in its bidirectional form.


# %%
def causal_window_8(b, n, q_idx, kv_idx):
    return (kv_idx <= q_idx) & (q_idx - kv_idx < 8)


def distance_penalty(score, b, n, q_idx, kv_idx):
    return score - 0.1 * jnp.abs(q_idx - kv_idx)


mine = mods.mask_grid(causal_window_8, 1, 1, 12, 12)[0, 0]
library = mods.mask_grid(mods.and_masks(mods.causal(), mods.sliding_window((7, 0))), 1, 1, 12, 12)
i, j = np.arange(12)[:, None], np.arange(12)[None, :]
print(np.asarray(mine).astype(int))
assert np.array_equal(mine, library[0, 0]) and np.array_equal(mine, (j <= i) & (i - j < 8))


@jax.jit  # a plain function is not a pytree: close over it
def with_my_mods(q, k, v):
    return jattn.dot_product_attention(
        q, k, v, mask_mod=causal_window_8, score_mod=distance_penalty
    )


q, k, v = qkv(12, n=4, h=16)
out = with_my_mods(q, k, v)
want = attend(
    q,
    k,
    v,
    mask_mod=mods.and_masks(mods.causal(), mods.sliding_window((7, 0))),
    score_mod=mods.alibi(jnp.full((4,), 0.1), bidirectional=True),
)
print(
    f"hand-written mods vs library mods: max difference {float(jnp.max(jnp.abs(out - want))):.1e}"
)
assert jnp.allclose(out, want, atol=1e-6)

# %% [markdown]
# ## Every pattern: its mask and its block map
#
# T = S = 256 in tiles of 32 x 32. Left of each pair, the mask (black: attend); right, the block
# map `BlockMask.block_map`: white tiles are skipped, orange ones are computed with the mask
# evaluated on the tile, blue ones are computed without a mask. The block density (the fraction
# of tiles visited) is what the blocked path's time follows, and it is not the fraction of
# attended entries: the strided and fixed patterns attend to 1/16 and about 1/4 of the entries,
# but every tile holds some of them, so their block density is 1 (block-aligned patterns such as
# BigBird with its block equal to the tile have only full tiles). Each block map is checked
# against its mask here.

# %%
T, BLOCKS = 256, (32, 32)
ids = jnp.array([0] * 80 + [1] * 48 + [2] * 128)  # three packed documents
patterns = {
    "full": mods.full(),
    "causal": mods.causal(),
    "sliding_window(24)": mods.sliding_window(24),
    "lengths(200, 160)": mods.lengths(200, 160),
    "prefix_lm(64)": mods.prefix_lm(64),
    "causal & segments": mods.and_masks(mods.causal(), mods.segments(ids)),
    "strided(16)": mods.strided(16),
    "dilated(8, 4)": mods.dilated(8, 4),
    "fixed(32, 4)": mods.fixed(32, 4),
    "global_tokens([0, 128])": mods.global_tokens([0, 128], T),
    "longformer(16, [0, 1])": mods.longformer(16, [0, 1], T),
    "bigbird(block 32)": mods.bigbird(jax.random.key(0), T, 32, num_random_blocks=1),
}
KINDS_CMAP = ListedColormap(["white", "tab:orange", "tab:blue"])


def block_kinds(mask, blocks):
    """0 empty, 1 partial, 2 full per tile of a ``[T, S]`` mask (an independent reference)."""
    t, s = mask.shape
    tiles = np.asarray(mask).reshape(t // blocks[0], blocks[0], s // blocks[1], blocks[1])
    return np.where(tiles.all(axis=(1, 3)), 2, np.where(tiles.any(axis=(1, 3)), 1, 0))


block_masks = {name: jattn.block_mask(mod, T, T, BLOCKS) for name, mod in patterns.items()}
fig, axes = plt.subplots(4, 6, figsize=(15, 10.5), layout="constrained")
for (name, mod), (ax_mask, ax_blocks) in zip(patterns.items(), axes.reshape(-1, 2), strict=True):
    mask = mods.mask_grid(mod, 1, 1, T, T)[0, 0]
    bm = block_masks[name]
    kinds = np.asarray(bm.block_map[0, 0])
    assert np.array_equal(kinds, block_kinds(mask, BLOCKS)), name
    assert np.isclose(float(bm.density()), np.mean(kinds > 0)), name
    print(
        f"{name:24s} attends {float(jnp.mean(mask)):5.3f} of the entries, "
        f"block density {float(bm.density()):5.3f} "
        f"({np.sum(kinds == 1)} partial + {np.sum(kinds == 2)} full tiles of {kinds.size})"
    )
    ax_mask.imshow(mask, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax_mask.set_title(name, fontsize=9)
    ax_blocks.imshow(kinds, cmap=KINDS_CMAP, vmin=0, vmax=2, interpolation="nearest")
    ax_blocks.set_title(f"blocks: density {float(bm.density()):.2f}", fontsize=9)
    for ax in (ax_mask, ax_blocks):
        ax.set_xticks([])
        ax.set_yticks([])
plt.show()
assert all(float(block_masks[name].density()) == 1 for name in ("strided(16)", "fixed(32, 4)"))
assert not np.any(np.asarray(block_masks["bigbird(block 32)"].block_map) == 1)  # no partial

# %% [markdown]
# ## The same results as a materialised mask
#
# The dense path evaluates the mask_mod on the whole `[B, N, T, S]` grid; the blocked path
# evaluates it tile by tile, only on the partial tiles of the block mask. Both agree with
# `jax.nn.dot_product_attention` given the mask as an array. A score_mod (here ALiBi followed by
# tanh soft-capping of the logits at 5, as Gemma 2 caps its logits) agrees with the same
# computation written out in `jnp`.

# %%
q, k, v = qkv(T, b=2, n=4)
jax_nn = jax.jit(jax.nn.dot_product_attention)
for name in ("longformer(16, [0, 1])", "bigbird(block 32)"):
    mod = patterns[name]
    want = jax_nn(q, k, v, mask=mods.mask_grid(mod, 1, 1, T, T))
    dense = attend(q, k, v, mask_mod=mod, implementation="dense")
    blocked = attend(q, k, v, block_mask=block_masks[name], implementation="blocked")
    err_d, err_b = (float(jnp.max(jnp.abs(x - want))) for x in (dense, blocked))
    print(f"{name:24s} vs jax.nn: dense {err_d:.1e}, blocked {err_b:.1e}")
    assert jnp.allclose(dense, want, atol=1e-5) and jnp.allclose(blocked, want, atol=1e-5)

slopes = jattn.alibi_slopes(4)
score_mod = mods.chain_scores(mods.alibi(slopes), mods.softcap(5.0))
logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
pos_q, pos_k = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
logits = 5.0 * jnp.tanh((logits + slopes[:, None, None] * (pos_k - pos_q)) / 5.0)
logits = jnp.where(pos_k <= pos_q, logits, -jnp.inf)
want = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)
for impl in ("dense", "blocked"):
    out = attend(q, k, v, is_causal=True, score_mod=score_mod, implementation=impl)
    print(f"causal + ALiBi + softcap, {impl:7s} vs jnp: {float(jnp.max(jnp.abs(out - want))):.1e}")
    assert jnp.allclose(out, want, atol=1e-5)

# %% [markdown]
# ## Time against block density
#
# The blocked path's work is proportional to the number of tiles it visits, so the time of a
# sparse pattern should be about its block density times the time of full attention (the dashed
# line). Here: sliding windows of several widths (a window narrower than a tile still visits a
# band of three tiles per row, so the narrowest ones have the same density) and BigBird with
# several window sizes, each as a block mask built once outside `jit` (a BlockMask is a pytree:
# all the windows share one compilation, all the BigBirds another), against full blocked
# attention with the same tiles. Times are medians on this page's machine (a CPU in the test
# suite, which runs the small sizes and does not check the times: they move with the machine's
# load). Skipped tiles cost nothing; a window's tiles along the band are partial (the mask is
# evaluated on them) and cost more than full ones, so narrow windows tend to sit above the line,
# while BigBird with its block equal to the tile visits only full tiles. `BENCHMARKS.md` has the
# curve measured at T = 8192 with `benchmarks/bench_sparse.py`: 1.2-1.5x the line down to
# density 1/16.


# %%
def median_ms(fn, *args, repeats=3 if SMALL else 7):
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


t_curve, blocks = (512, (64, 64)) if SMALL else (2048, (128, 128))
q, k, v = qkv(t_curve, n=4 if SMALL else 8)


def sparse(q, k, v, bm):
    return attend(q, k, v, block_mask=bm, implementation="blocked")


plain = jax.jit(lambda q, k, v: jattn.blocked_attention(q, k, v, block_sizes=blocks))
full_ms = median_ms(plain, q, k, v)
print(f"T=S={t_curve}, tiles {blocks}: full blocked attention {full_ms:.1f} ms")
curve, narrow = {}, []
for w in (t_curve // 2, t_curve // 4, t_curve // 8, t_curve // 16, t_curve // 32):
    curve[f"window ±{w}"] = mods.sliding_window(w)
    if w < blocks[0]:
        narrow.append(f"window ±{w}")  # narrower than a tile
for wb in (7, 5, 3, 1):
    curve[f"bigbird window {wb}"] = mods.bigbird(
        jax.random.key(1), t_curve, blocks[1], window_blocks=wb, num_random_blocks=1
    )
points = []
for name, mod in curve.items():
    bm = jattn.block_mask(mod, t_curve, t_curve, blocks)
    density, ms = float(bm.density()), median_ms(sparse, q, k, v, bm)
    points.append((name, density, ms))
    print(
        f"{name:18s} density {density:5.3f} {ms:8.1f} ms, {ms / (density * full_ms):4.2f}x the line"
    )
    if name.startswith("bigbird"):
        assert int(jnp.sum(bm.kv_num_partial)) == 0, name  # only full tiles
    if name in narrow:  # still a band of three tiles per row (two in the first and last)
        nb = t_curve // blocks[0]
        assert np.isclose(density, (3 * nb - 2) / nb**2), name

fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
ax.plot([0, 1], [0, full_ms], "k--", label="density x full")
for kind, marker in (("window", "o"), ("bigbird", "s")):
    pts = [(d, ms) for name, d, ms in points if name.startswith(kind)]
    ax.plot(*zip(*pts, strict=True), marker, label=kind)
ax.plot([1], [full_ms], "k*", markersize=10, label="full")
ax.set_xlabel("block density (fraction of tiles visited)")
ax.set_ylabel("forward time (ms)")
ax.set_title(f"T=S={t_curve}, tiles {blocks}")
ax.set_xlim(0, 1.05)
ax.set_ylim(0, None)
ax.legend()
plt.show()

# %% [markdown]
# ## A pattern per head
#
# `mods.per_head([m0, m1, ...])` gives head `n` the mask `m[n % len(m)]`: here a decoder whose
# four heads are causal, a causal window of 32, causal strided (Sparse Transformer), and a
# causal window of 16 with four global "sink" tokens at the start. The block mask is built with
# `heads=4`; its `block_map` has one map per head, and the blocked path visits the union of
# their tiles (it computes all heads of a tile together), while each head still sees exactly
# its own mask.

# %%
N = 4
head_mods = [
    mods.causal(),
    mods.and_masks(mods.causal(), mods.sliding_window((31, 0))),
    mods.and_masks(mods.causal(), mods.strided(16)),
    mods.and_masks(mods.causal(), mods.longformer((15, 0), [0, 1, 2, 3], T)),
]
heads_mod = mods.per_head(head_mods)
heads_bm = jattn.block_mask(heads_mod, T, T, BLOCKS, heads=N)
masks = mods.mask_grid(heads_mod, 1, N, T, T)[0]  # [N, T, S]
titles = ["causal", "causal window 32", "causal strided 16", "window 16 + 4 sinks"]

fig, axes = plt.subplots(2, N, figsize=(12, 6), layout="constrained")
for n in range(N):
    assert np.array_equal(masks[n], mods.mask_grid(head_mods[n], 1, 1, T, T)[0, 0])
    kinds = np.asarray(heads_bm.block_map[0, n])
    assert np.array_equal(kinds, block_kinds(masks[n], BLOCKS))
    print(f"head {n} ({titles[n]:20s}): block density {np.mean(kinds > 0):5.3f}")
    axes[0, n].imshow(masks[n], cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    axes[0, n].set_title(f"head {n}: {titles[n]}", fontsize=9)
    axes[1, n].imshow(kinds, cmap=KINDS_CMAP, vmin=0, vmax=2, interpolation="nearest")
    axes[1, n].set_title(f"blocks: density {np.mean(kinds > 0):.2f}", fontsize=9)
    for ax in axes[:, n]:
        ax.set_xticks([])
        ax.set_yticks([])
plt.show()
union = np.any(np.asarray(heads_bm.block_map[0]) > 0, axis=0)
print(f"tiles visited for all heads together: density {float(heads_bm.density()):.3f}")
assert np.isclose(float(heads_bm.density()), union.mean())

# %% [markdown]
# A `jattn.MultiHeadAttention` layer passes `mask_mod=`, `score_mod=` and `block_mask=` to its
# attention function, so a model can mix patterns per layer and per head. With ALiBi as the
# score_mod (one slope per head), the layer's output on the dense path (mask_mod) and on the
# blocked path (the block mask) equals the output computed one head at a time with
# `jax.nn.dot_product_attention`, that head's own mask and its ALiBi bias as arrays, through
# the same projections.


# %%
def mha(implementation):
    fn = functools.partial(jattn.dot_product_attention, implementation=implementation)
    return MultiHeadAttention(N, 64, attention_fn=fn, rngs=nnx.Rngs(0))  # same seed, same weights


layer, blocked_layer = mha("dense"), mha("blocked")
x = jax.random.normal(jax.random.key(2), (2, T, 64))
alibi = mods.alibi(jattn.alibi_slopes(N))
forward = nnx.jit(lambda layer, x, **mods_: layer(x, score_mod=alibi, **mods_))
out_dense = forward(layer, x, mask_mod=heads_mod)
out_blocked = forward(blocked_layer, x, block_mask=heads_bm)

q, k, v = layer.query(x), layer.key(x), layer.value(x)  # [B, T, N, H]
heads = []
for n in range(N):
    bias = jattn.alibi_slopes(N)[n] * (pos_k - pos_q).astype(jnp.float32)
    mask = mods.mask_grid(head_mods[n], 1, 1, T, T)
    sl = slice(n, n + 1)
    heads.append(jax_nn(q[:, :, sl], k[:, :, sl], v[:, :, sl], bias=bias, mask=mask))
want = layer.out(jnp.concatenate(heads, axis=2))
for name, out in (("dense", out_dense), ("blocked", out_blocked)):
    print(f"per-head layer, {name:7s} vs head by head: {float(jnp.max(jnp.abs(out - want))):.1e}")
    assert jnp.allclose(out, want, atol=1e-5)
