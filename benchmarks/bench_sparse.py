"""Sparse attention from mask_mods and block masks (issue 14 targets), CPU float32.

Time against block density: jattn's blocked path with a precomputed block mask for a
sliding window, BigBird and a block-strided pattern, against full (unmasked) blocked
attention, interleaved in one process (medians); the ratio ``time / (density * full)``
should stay near 1. Also a 64- vs 512-wide window at T=16384, and jattn with a
mask_mod against jax.nn with the same mask materialised (and PyTorch's CPU
``scaled_dot_product_attention`` with the boolean mask when torch is installed: a
benchmark-only peer, never a dependency).

    python benchmarks/bench_sparse.py                      # T=8192 curve, windows, peers
    python benchmarks/bench_sparse.py --t 4096 --repeats 3
    python benchmarks/bench_sparse.py --smoke              # tiny shapes (CI-sized check)
    python benchmarks/bench_sparse.py --only gemm          # XLA's batched products by size

Shapes: B=1, N=8, H=64, float32, forward only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

import jattn
from jattn import mods

B, N, H = 1, 8, 64
BLOCKS = (512, 256)


def inputs(t, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return [jax.random.normal(k, (B, t, N, H), jnp.float32) for k in ks]


def interleave(fns: dict, repeats: int) -> dict:
    for f in fns.values():
        f()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def block_strided(every: int, block: int):
    """Query block i sees key blocks j with (i - j) % every == 0 (and itself)."""
    return lambda b, n, q, kv: ((q // block - kv // block) % every) == 0


def curve(t, repeats, blocks):
    q, k, v = inputs(t)
    attend = jax.jit(lambda q, k, v, bm: jattn.blocked_attention(q, k, v, block_mask=bm))
    plain = jax.jit(lambda q, k, v: jattn.blocked_attention(q, k, v, block_sizes=blocks))
    key = jax.random.key(0)
    patterns = {}
    nb = t // blocks[1]
    for d in (2, 4, 8, 16):  # target densities 1/d
        w = max(1, t // (2 * d))  # a band of about t/d keys
        patterns[f"window 1/{d}"] = mods.sliding_window((w // 2, w // 2))
        patterns[f"bigbird 1/{d}"] = mods.bigbird(
            key, t, blocks[1], window_blocks=max(1, (nb // d - 2) | 1), num_random_blocks=1
        )
        patterns[f"strided 1/{d}"] = block_strided(d, blocks[1])
    masks = {name: jattn.block_mask(m, t, t, blocks) for name, m in patterns.items()}
    fns = {"full": lambda: jax.block_until_ready(plain(q, k, v))}
    for name, bm in masks.items():
        fns[name] = lambda bm=bm: jax.block_until_ready(attend(q, k, v, bm))
    med = interleave(fns, repeats)
    full = med["full"]
    print(f"## time vs block density, T={t}, blocks={blocks}, full = {1e3 * full:.1f} ms")
    for name, bm in masks.items():
        dens = float(bm.density())
        row = dict(case=name, T=t, density=round(dens, 4), ms=round(1e3 * med[name], 1))
        row["time_over_density_x_full"] = round(med[name] / (dens * full), 2)
        print(json.dumps(row))


def tile_costs(t, repeats):
    """Cost per score of masked (partial) tiles of each candidate size, relative to
    (512, 256): the table jattn.functional.tiles.TILE_COST holds."""
    from jattn.functional import tiles

    q, k, v = inputs(t)
    attend = jax.jit(lambda q, k, v, bm: jattn.blocked_attention(q, k, v, block_mask=bm))
    partial = mods.as_mod(lambda b, n, q, kv: (q + kv) % 61 != 0)  # a hole in every tile
    fns = {}
    for bs in tiles.CANDIDATES:
        bm = jattn.block_mask(partial, t, t, bs)
        assert int(bm.kv_num_partial.sum()) == (t // bs[0]) * (t // bs[1])
        fns[bs] = lambda bm=bm: jax.block_until_ready(attend(q, k, v, bm))
    med = interleave(fns, repeats)
    ref = med[(512, 256)]
    print(f"## cost per score of partial tiles, T={t} (every tile visited)")
    for bs, m in med.items():
        ns = 1e9 * m / (t * t * N)
        row = dict(case="tile cost", blocks=bs, ms=round(1e3 * m, 1), ns_per_score=round(ns, 2))
        row["relative"] = round(m / ref, 2)
        row["table"] = tiles.TILE_COST[bs]
        print(json.dumps(row))


def gemm(t, repeats):
    """What one tile's products cost by tile size: the logits of T queries in blocks of
    ``rows`` against ``keys`` keys each, ``[N, T / rows]`` batched products (the shape a
    narrow band's tiles make, looped or gathered), in GFLOP/s. A 64-wide window's best
    tiles give 32 rows x 96 keys; a 512-wide window's 512 x 1024."""
    fns, flops = {}, {}
    for rows, keys in ((32, 96), (64, 128), (64, 192), (128, 256), (256, 512), (512, 1024)):
        nb = t // rows
        q = jax.random.normal(jax.random.key(1), (N, nb, rows, H))
        k = jax.random.normal(jax.random.key(2), (N, nb, keys, H))
        dot = jax.jit(lambda q, k: lax.dot_general(q, k, (((3,), (3,)), ((0, 1), (0, 1)))))
        fns[rows, keys] = lambda f=dot, q=q, k=k: jax.block_until_ready(f(q, k))
        flops[rows, keys] = 2 * N * nb * rows * keys * H
    med = interleave(fns, repeats)
    print(f"## batched logits products, T={t}, N={N}, H={H}")
    for (rows, keys), sec in med.items():
        row = dict(case="batched product", rows=rows, keys=keys, ms=round(1e3 * sec, 1))
        row["gflops"] = round(flops[rows, keys] / sec / 1e9, 1)
        print(json.dumps(row))


def windows(t, repeats, blocks):
    q, k, v = inputs(t)
    attend = jax.jit(lambda q, k, v, bm: jattn.blocked_attention(q, k, v, block_mask=bm))
    fns, masks = {}, {}
    for w in (64, 512):  # each with the tiles block_mask chooses for it, and with `blocks`
        for name, bs in (("auto", None), ("fixed", blocks)):
            bm = masks[w, name] = jattn.block_mask(mods.sliding_window((w // 2, w // 2)), t, t, bs)
            fns[w, name] = lambda bm=bm: jax.block_until_ready(attend(q, k, v, bm))
    med = interleave(fns, repeats)
    print(f"## 64- vs 512-wide window, T={t}: tiles chosen by block_mask, and fixed {blocks}")
    for name in ("auto", "fixed"):
        row = dict(case=f"window 64 vs 512, {name} tiles", T=t)
        row["blocks"] = {w: masks[w, name].block_sizes for w in (64, 512)}
        row["ms"] = {w: round(1e3 * med[w, name], 1) for w in (64, 512)}
        row["speedup"] = round(med[512, name] / med[64, name], 2)
        row["density"] = {w: round(float(masks[w, name].density()), 4) for w in (64, 512)}
        print(json.dumps(row))


def auto_tiles(t, repeats, blocks):
    """Fixed tiles against the ones block_mask(block_sizes="auto") chooses, for patterns
    finer than the fixed tiles: BigBird with the paper's 64-blocks, a 64-wide window."""
    q, k, v = inputs(t)
    attend = jax.jit(lambda q, k, v, bm: jattn.blocked_attention(q, k, v, block_mask=bm))
    patterns = {
        "bigbird block 64": mods.bigbird(jax.random.key(3), t, 64, num_random_blocks=3),
        "window 64": mods.sliding_window((32, 32)),
    }
    fns, masks = {}, {}
    for name, m in patterns.items():
        for how in ("fixed", "auto"):
            bm = masks[name, how] = jattn.block_mask(m, t, t, blocks if how == "fixed" else how)
            fns[name, how] = lambda bm=bm: jax.block_until_ready(attend(q, k, v, bm))
    med = interleave(fns, repeats)
    print(f"## tiles chosen by block_mask('auto') vs fixed {blocks}, T={t}")
    for name in patterns:
        row = dict(case=name, T=t)
        for how in ("fixed", "auto"):
            bm = masks[name, how]
            row[how] = dict(blocks=bm.block_sizes, density=round(float(bm.density()), 4),
                            ms=round(1e3 * med[name, how], 1))  # fmt: skip
        row["speedup"] = round(med[name, "fixed"] / med[name, "auto"], 2)
        print(json.dumps(row))


def peers(t, repeats, blocks):
    q, k, v = inputs(t)
    pattern = mods.bigbird(jax.random.key(1), t, blocks[1], num_random_blocks=2)
    bm = jattn.block_mask(pattern, t, t, blocks)
    dense_mask = mods.mask_grid(pattern, 1, 1, t, t)
    ours = jax.jit(lambda q, k, v, bm: jattn.dot_product_attention(q, k, v, block_mask=bm))
    nn = jax.jit(lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m))
    fns = {
        "jattn block_mask": lambda: jax.block_until_ready(ours(q, k, v, bm)),
        "jax.nn materialised": lambda: jax.block_until_ready(nn(q, k, v, dense_mask)),
    }
    try:
        import numpy as np
        import torch

        tq, tk, tv = (
            torch.from_numpy(np.asarray(x).transpose(0, 2, 1, 3).copy()) for x in (q, k, v)
        )
        tm = torch.from_numpy(np.asarray(dense_mask))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        fns["torch sdpa"] = lambda: sdpa(tq, tk, tv, attn_mask=tm)
    except ImportError:
        print("# torch not installed: the PyTorch peer is left out")
    out, want = ours(q, k, v, bm), nn(q, k, v, dense_mask)
    err = float(jnp.max(jnp.abs(out - want)))
    med = interleave(fns, repeats)
    base = med["jattn block_mask"]
    dens = float(bm.density())
    print(f"## peers, BigBird, T={t}, density {dens:.3f}, max |jattn - jax.nn| {err:.1e}")
    print(json.dumps({name: dict(ms=round(1e3 * m, 1), over_jattn=round(m / base, 2))
                      for name, m in med.items()}))  # fmt: skip


def _memory_child(t, blocks):
    """Runs in a subprocess: BigBird forward+backward at length t with a block mask;
    prints the time and the peak RSS of the process."""
    from bench_blocked import _peak_rss_gib

    q, k, v = inputs(t)
    pattern = mods.bigbird(jax.random.key(2), t, blocks[1], num_random_blocks=2)
    t0 = time.perf_counter()
    bm = jax.block_until_ready(jattn.block_mask(pattern, t, t, blocks))
    build = time.perf_counter() - t0

    def loss(q, k, v, bm):
        out = jattn.dot_product_attention(q, k, v, block_mask=bm, implementation="blocked")
        return jnp.sum(out * v)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v, bm).compile()
    t0 = time.perf_counter()
    jax.block_until_ready(grad(q, k, v, bm))
    seconds = time.perf_counter() - t0
    print(json.dumps(dict(seconds=seconds, block_mask_seconds=build, density=float(bm.density()),
                          peak_rss_gib=_peak_rss_gib())))  # fmt: skip


def memory(t, blocks):
    """BigBird forward+backward at length t in a fresh process: peak RSS (the target is
    under 2 GiB at T=65536)."""
    import subprocess
    import sys

    print(f"## memory: BigBird fwd+bwd at T={t}, blocks={blocks} (subprocess, peak RSS)")
    cmd = [sys.executable, __file__, "--memory-child", str(t), "--memory-blocks", *map(str, blocks)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(json.dumps(dict(case="memory", T=t, error=result.stderr[-2000:])))
        return
    data = json.loads(result.stdout.strip().splitlines()[-1])
    print(json.dumps(dict(case="memory BigBird fwd+bwd", T=t, **{
        k: round(x, 3) for k, x in data.items()})))  # fmt: skip


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--t", type=int, default=8192)
    p.add_argument("--window-t", type=int, default=16384)
    p.add_argument("--peer-t", type=int, default=4096)
    p.add_argument("--tile-t", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true")
    p.add_argument(
        "--only", nargs="*", default=["curve", "tiles", "windows", "auto", "peers", "memory"]
    )
    p.add_argument("--memory-t", type=int, default=65536)
    p.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--memory-blocks", type=int, nargs=2, default=BLOCKS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.memory_child:
        _memory_child(a.memory_child, tuple(a.memory_blocks))
        return
    blocks = BLOCKS
    if a.smoke:
        a.t, a.window_t, a.peer_t, a.tile_t, a.memory_t, a.repeats = 256, 1024, 256, 1024, 1024, 1
        blocks = (64, 32)
    print(f"# jax {jax.__version__}, {jax.devices()[0].device_kind}")
    if "curve" in a.only:
        curve(a.t, a.repeats, blocks)
    if "tiles" in a.only:
        tile_costs(a.tile_t, a.repeats)
    if "windows" in a.only:
        windows(a.window_t, a.repeats, blocks)
    if "gemm" in a.only:
        gemm(a.window_t, a.repeats)
    if "auto" in a.only:
        auto_tiles(a.t, a.repeats, blocks)
    if "peers" in a.only:
        peers(a.peer_t, a.repeats, blocks)
    if "memory" in a.only:
        memory(a.memory_t, blocks)


if __name__ == "__main__":
    main()
