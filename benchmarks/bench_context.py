"""Context parallelism on 8 emulated CPU devices (issue 17 section 4).

What the emulation can show: XLA's per-device buffer assignment (the compiled
program's ``memory_analysis``: arguments + outputs + temporaries, per device), which
is what a real device would have to hold; the work each device does (visible
(query, key) pairs and visited tiles, counted from the block tables each device's
ring steps build); the bytes each device sends (counted from the compiled program's
collectives, next to the closed-form count); that the ring completes at T=131072.
What it cannot: speed. The 8 "devices" are threads sharing this machine's 2 cores, so
wall time measures total work plus the emulation's overhead, never a speedup.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_context.py
    ... --only memory,balance,comm          # the compile-time measurements only
    ... --only long                         # the ring at T=131072 (forward)
    ... --only eager --repeats 10           # eager calls: one program against op by op
    ... --smoke                             # tiny shapes

Peers: jax.nn.dot_product_attention on the same sequence-sharded inputs (XLA's SPMD
partitioner gathers keys and values) and jattn's single-device blocked path.
Shapes: B=1, N=8 (K=8), H=64, float32, causal.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jattn  # noqa: E402
from jattn import mods  # noqa: E402

B, N, H = 1, 8, 64
STRATEGIES = {
    "ring": jattn.ring_attention,
    "all_gather": jattn.all_gather_attention,
    "ulysses": jattn.ulysses_attention,
}


def shapes(t, n=N):
    return [jax.ShapeDtypeStruct((B, t, n, H), jnp.float32) for _ in range(3)]


def loss_fn(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2)


def per_device_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def mesh_of(p, auto=False):
    types = (jax.sharding.AxisType.Auto,) if auto else None
    return jax.make_mesh((p,), ("seq",), devices=jax.devices()[:p], axis_types=types)


def peer_grad(p):
    """jax.nn on sequence-sharded inputs. Under explicit sharding it refuses them (its
    [B, N, T, S] logits would be sharded twice over 'seq'), so the peer runs on an
    Auto mesh, where XLA's SPMD partitioner places the work."""
    mesh = mesh_of(p, auto=True)
    sh = NamedSharding(mesh, P(None, "seq"))
    f = loss_fn(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
    return jax.jit(jax.grad(f, argnums=(0, 1, 2)), in_shardings=(sh, sh, sh)), sh


def sharded_shapes(mesh, t, n=N):
    sh = NamedSharding(mesh, P(None, "seq"))
    return [jax.ShapeDtypeStruct((B, t, n, H), jnp.float32, sharding=sh) for _ in range(3)]


def compile_grad(fn, args, mesh=None):
    f = jax.jit(jax.grad(loss_fn(fn), argnums=(0, 1, 2)))
    if mesh is None:
        return f.lower(*args).compile()
    with jax.set_mesh(mesh):
        return f.lower(*args).compile()


def memory(t, p):
    """Per-device bytes of forward + backward, causal, at T = t on p devices."""
    rows = {}
    one = compile_grad(lambda q, k, v: jattn.blocked_attention(q, k, v, is_causal=True), shapes(t))
    rows["blocked, 1 device"] = per_device_bytes(one)
    mesh = mesh_of(p)
    for name, fn in STRATEGIES.items():
        for layout in ("contiguous", "zigzag"):
            f = lambda q, k, v, fn=fn, layout=layout: fn(q, k, v, is_causal=True, layout=layout)  # noqa: E731
            rows[f"{name} ({layout}), {p} devices"] = per_device_bytes(
                compile_grad(f, sharded_shapes(mesh, t), mesh)
            )
    peer, _ = peer_grad(p)
    rows[f"jax.nn on sharded inputs, {p} devices"] = per_device_bytes(
        peer.lower(*shapes(t)).compile()
    )
    base = rows["blocked, 1 device"]
    print(f"\nper-device memory, forward + backward, causal, T={t}, B={B}, N={N}, H={H}")
    print(f"{'program':44s} {'MiB/device':>11s} {'/ 1 device':>11s}")
    for name, b in rows.items():
        print(f"{name:44s} {b / 2**20:11.1f} {b / base:11.3f}")
    return rows


def balance(t, p, block=(512, 512)):
    """Visible pairs and visited tiles per device over a causal ring."""
    out = {}
    for layout in ("contiguous", "zigzag"):
        order = jattn.zigzag_indices(t, p) if layout == "zigzag" else np.arange(t)
        shards = order.reshape(p, t // p)
        pairs, tiles = [], []
        for d in range(p):
            qpos = shards[d]
            pd = td = 0
            for src in range(p):
                kpos = shards[src]
                vis = kpos[None, :] <= qpos[:, None]  # [T/P, S/P]: what the pair's table sees
                pd += int(vis.sum())
                bt, bs = min(block[0], t // p), min(block[1], t // p)
                v = vis.reshape(t // p // bt, bt, t // p // bs, bs).any(axis=(1, 3))
                td += int(v.sum()) * bt * bs
            pairs.append(pd)
            tiles.append(td)
        out[layout] = {
            "pairs_max_over_mean": max(pairs) / statistics.mean(pairs),
            "tiles_max_over_mean": max(tiles) / statistics.mean(tiles),
        }
    # the same counts from the ring's own block tables (jattn's code path, zigzag)
    mesh = mesh_of(p)
    counted = _ring_tables(t, p, mesh, block)
    out["zigzag"]["ring_tables_tiles_max_over_mean"] = max(counted) / statistics.mean(counted)
    print(f"\nload balance, causal, T={t}, {p} devices (max / mean per-device work)")
    for layout, r in out.items():
        print(f"  {layout:10s} " + "  ".join(f"{k}={v:.3f}" for k, v in r.items()))
    return out


def _ring_tables(t, p, mesh, block):
    """Visited tile area per device summed over the ring's steps, from the block tables
    that :func:`jattn.ring_attention` builds (``jattn.functional.context._pair``)."""
    from jattn.functional import context

    place = context._Place(t // p, t // p, p, True, (1,), (1,))
    counts = []
    for d in range(p):
        area = 0
        for src in range(p):
            mm = context._at(mods.causal(), place, d, src, (None,), None)
            bm = mods.block_mask(mm, t // p, t // p, block)
            area += (
                int(jnp.sum(bm.kv_num_partial + bm.kv_num_full))
                * bm.block_sizes[0]
                * bm.block_sizes[1]
            )  # noqa: E501
        counts.append(area)
    return counts


_COLLECTIVES = {"ppermute", "all_gather", "all_to_all", "reduce_scatter", "psum", "psum_scatter"}


def _collective_bytes(jaxpr, p: int, times: int = 1, totals=None) -> dict:
    """Bytes each device sends in each kind of collective of a traced program, counted
    as many times as it runs (a scan's body ``length`` times): a ppermute sends its
    result's size, an all-gather or all-to-all the (P-1)/P of its result that comes
    from the others, a reduce-scatter (P-1)/P of its input. A while loop's trip count
    is not known from the program: counted once, flagged."""
    from jax.extend import core as jcore

    totals = {} if totals is None else totals
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in _COLLECTIVES:
            vs = eqn.invars if name in ("reduce_scatter", "psum_scatter") else eqn.outvars
            size = sum(int(np.prod(v.aval.shape)) * v.aval.dtype.itemsize for v in vs)
            if name != "ppermute":
                size = size * (p - 1) // p
            totals[name] = totals.get(name, 0) + times * size
        inner = times * (eqn.params["length"] if name == "scan" else 1)
        if name == "while":
            totals["while loops (counted once)"] = True
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    _collective_bytes(sub.jaxpr, p, inner, totals)
                elif isinstance(sub, jcore.Jaxpr):
                    _collective_bytes(sub, p, inner, totals)
    return totals


def comm(t, p):
    """Bytes each device sends per forward + backward, closed form next to the
    compiled program's collectives (loops counted once per iteration, see below)."""
    shard = B * (t // p) * N * H * 4  # one [B, T/P, N, H] float32 shard
    closed = {
        # fwd: P-1 shifts of k, v; bwd: P-1 shifts of k, v and P of dk, dv
        "ring": (2 * (p - 1) + 2 * (p - 1) + 2 * p) * shard,
        # fwd: gather k, v ((P-1) shards each; the backward keeps them, O(S) memory);
        # bwd: the reduce-scatter of dk, dv
        "all_gather": (2 * (p - 1) + 2 * (p - 1)) * shard,
        # fwd: q, k, v to heads, out back; bwd: the transposes of those four; each moves
        # (P-1)/P of a shard
        "ulysses": 8 * (p - 1) * shard // p,
    }
    mesh = mesh_of(p)
    print(f"\ncommunication per device, forward + backward, causal, T={t}, {p} devices")
    print(f"{'strategy':12s} {'closed form MiB':>16s}  traced program: sent per collective, MiB")
    rows = {}
    for name, fn in STRATEGIES.items():
        f = loss_fn(lambda q, k, v, fn=fn: fn(q, k, v, is_causal=True))
        with jax.set_mesh(mesh):
            jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(*sharded_shapes(mesh, t))
        ops = _collective_bytes(jaxpr.jaxpr, p)
        rows[name] = {"closed_form_bytes": closed[name], "traced": ops}
        ops_s = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in sorted(ops.items()) if v is not True)
        print(f"{name:12s} {closed[name] / 2**20:16.1f}  {ops_s}")
    return rows


def timing(t, p, repeats):
    """Wall time of forward + backward on the emulated devices (total work, not speed)."""
    import contextlib

    rng = np.random.default_rng(0)
    host = [rng.standard_normal((B, t, N, H)).astype(np.float32) for _ in range(3)]
    mesh = mesh_of(p)
    fns = {}  # name -> (function, arguments, the mesh to set while it runs, or None)
    with jax.set_mesh(mesh):
        args = [jax.device_put(x, NamedSharding(mesh, P(None, "seq"))) for x in host]
    for name, fn in STRATEGIES.items():
        for layout in ("contiguous", "zigzag"):
            f = jax.jit(jax.grad(loss_fn(lambda q, k, v, fn=fn, layout=layout: fn(
                q, k, v, is_causal=True, layout=layout)), argnums=(0, 1, 2)))  # fmt: skip
            fns[f"{name} ({layout})"] = (f, args, mesh)
    peer, sh = peer_grad(p)
    fns["jax.nn (sharded, auto mesh)"] = (peer, [jax.device_put(x, sh) for x in host], None)
    one = jax.jit(jax.grad(loss_fn(lambda q, k, v: jattn.blocked_attention(
        q, k, v, is_causal=True)), argnums=(0, 1, 2)))  # fmt: skip
    fns["blocked, 1 device"] = (one, [jnp.asarray(x) for x in host], None)

    def call(name):
        f, a, m = fns[name]
        with jax.set_mesh(m) if m is not None else contextlib.nullcontext():
            return jax.block_until_ready(f(*a))

    times = {name: [] for name in fns}
    names = list(fns)
    for name in names:
        call(name)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            call(name)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["blocked, 1 device"]
    print(f"\nwall time, forward + backward, causal, T={t}, {p} emulated devices on this CPU")
    for name, secs in med.items():
        print(f"  {name:28s} {secs * 1e3:9.1f} ms  {secs / base:6.2f}x the single-device blocked")
    return med


def eager(t, p, repeats):
    """Eager calls (a notebook's): each strategy's repeated call as jattn runs it (one
    cached program, ``jattn.functional._eager``), op by op (the path after the checks
    called directly, as before) and jitted by the caller, interleaved; causal, forward."""
    from bench_eager import op_by_op

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, t, p, 16)), jnp.float32) for _ in "qkv")
    mesh = mesh_of(p)
    rows = {}
    for name, fn in STRATEGIES.items():
        calls = {
            "jattn": fn,
            "op by op": op_by_op(fn),
            "jitted": jax.jit(lambda q, k, v, fn=fn: fn(q, k, v, mesh=mesh, is_causal=True)),
        }
        runs = {
            c: (lambda f=f, jit=c == "jitted": jax.block_until_ready(
                f(q, k, v) if jit else f(q, k, v, mesh=mesh, is_causal=True)))
            for c, f in calls.items()
        }  # fmt: skip
        times = {c: [] for c in runs}
        for run in runs.values():
            run()
        for _ in range(repeats):
            for c, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[c].append(time.perf_counter() - t0)
        med = {c: statistics.median(ts) for c, ts in times.items()}
        rows[name] = med
        print(
            f"eager {name:11s} T={t}: " + ", ".join(f"{c} {m * 1e3:.2f} ms" for c, m in med.items())
        )
    return rows


def long_ring(t, p):
    """The ring's forward at T = t (causal, zigzag), N=1: completes, and its per-device
    memory next to one device's blocked and dense programs."""
    n = 1
    mesh = mesh_of(p)
    f = jax.jit(lambda q, k, v: jattn.ring_attention(q, k, v, is_causal=True, layout="zigzag"))
    with jax.set_mesh(mesh):
        c = f.lower(*sharded_shapes(mesh, t, n)).compile()
    one = jax.jit(lambda q, k, v: jattn.blocked_attention(q, k, v, is_causal=True))
    c1 = one.lower(*shapes(t, n)).compile()
    dense_scores = B * n * t * t * 4
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh):
        args = [
            jax.device_put(
                rng.standard_normal((B, t, n, H)).astype(np.float32),
                NamedSharding(mesh, P(None, "seq")),
            )
            for _ in range(3)
        ]
        t0 = time.perf_counter()
        out = jax.block_until_ready(c(*args))
        secs = time.perf_counter() - t0
    finite = bool(jnp.all(jnp.isfinite(out)))
    print(f"\nring forward, causal, zigzag, T={t}, N={n}, H={H}, {p} devices: {secs:.1f} s, "
          f"finite={finite}")  # fmt: skip
    print(f"  per-device bytes: ring {per_device_bytes(c) / 2**20:.1f} MiB, one device blocked "
          f"{per_device_bytes(c1) / 2**20:.1f} MiB, one device dense scores alone "
          f"{dense_scores / 2**30:.1f} GiB")  # fmt: skip
    return {"seconds": secs, "finite": finite, "ring_bytes": per_device_bytes(c),
            "blocked_bytes": per_device_bytes(c1), "dense_score_bytes": dense_scores}  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--t", type=int, default=32768)
    ap.add_argument("--long-t", type=int, default=131072)
    ap.add_argument("--time-t", type=int, default=4096)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default="memory,balance,comm,time,long")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    if a.smoke:
        a.t, a.long_t, a.time_t, a.repeats = 256, 512, 256, 1
    p = a.devices
    if jax.device_count() < p:
        raise SystemExit(
            f"needs {p} devices; set XLA_FLAGS=--xla_force_host_platform_device_count={p}"
        )  # noqa: E501
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices")
    only = set(a.only.split(","))
    results = {}
    if "memory" in only:
        results["memory"] = memory(a.t, p)
    if "balance" in only:
        results["balance"] = balance(a.t, p, (min(512, a.t // p // 2),) * 2)
    if "comm" in only:
        results["comm"] = comm(a.t, p)
    if "time" in only:
        results["time"] = timing(a.time_t, p, a.repeats)
    if "long" in only:
        results["long"] = long_ring(a.long_t, p)
    if "eager" in only:
        results["eager"] = eager(min(a.time_t, 64), p, a.repeats)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
