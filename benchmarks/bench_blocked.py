"""Blocked exact attention against jax.nn.dot_product_attention on CPU (issue 4 targets).

Every comparison is interleaved in one process (A, B, GEMM, A, B, GEMM, ...) and
reports medians, so that a machine shared with other jobs hurts both sides alike;
the float32 GEMM rate is measured in the same rounds. Memory is measured in a
fresh subprocess per case (peak RSS from /proc/self/status VmHWM).

    python benchmarks/bench_blocked.py                 # everything but T=65536
    python benchmarks/bench_blocked.py --only fwd      # fwd | fwdbwd | short | causal | window
                                                       # | memory | accuracy | huge | ceiling
                                                       # | decode
    python benchmarks/bench_blocked.py --only fwd --lengths 1024 4096 --repeats 3
    python benchmarks/bench_blocked.py --block-sizes 256 512

Shapes: B=1, N=8, H=64, float32, unit-normal inputs; FLOPs counted as 4*B*N*T*S*H.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jattn
from jattn.functional import dispatch
from jattn.functional.blocked import blocked_attention

B, N, H = 1, 8, 64


def inputs(t, s=None, n=N, seed=0):
    s = t if s is None else s
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (B, t, n, H), jnp.float32)
    k = jax.random.normal(ks[1], (B, s, n, H), jnp.float32)
    v = jax.random.normal(ks[2], (B, s, n, H), jnp.float32)
    return q, k, v


def gemm_fn():
    a = jnp.asarray(np.random.default_rng(0).standard_normal((2048, 2048)), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    return (lambda: f(a).block_until_ready()), 2 * 2048**3


def interleave(fns: dict, repeats: int, pool=None):
    """Runs every function (after a warm-up) in rounds; returns median seconds and GEMM GF/s.

    ``pool``: two names that compile to one program (checked by the caller); their
    samples are also pooled as "pooled".
    """
    gemm, gemm_flops = gemm_fn()
    for f in fns.values():
        f()
    runs = dict(fns, gemm=gemm)
    times = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):  # rotate the order, so no function always follows the GEMM
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    if pool:
        times["pooled"] = times[pool[0]] + times[pool[1]]
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return med, gemm_flops / med.pop("gemm") / 1e9


def ready(f, *args):
    return lambda: jax.block_until_ready(f(*args))


def attn_fns(t, block_sizes, *, grad=False, jaxnn=True, **kw):
    q, k, v = inputs(t)
    fns = {
        "jattn": lambda q, k, v: jattn.dot_product_attention(q, k, v, **kw),
        "blocked": lambda q, k, v: blocked_attention(q, k, v, block_sizes=block_sizes, **kw),
    }
    if jaxnn:
        fns["jax.nn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, **kw)
    if grad:
        fns = {
            name: jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * v), argnums=(0, 1, 2))
            for name, f in fns.items()
        }
    # The default path at these lengths is usually the blocked program itself: then the
    # two sample the same computation and are also pooled.
    pool = ("jattn", "blocked") if _same_program(fns["jattn"], fns["blocked"], q, k, v) else None
    return {name: ready(jax.jit(f), q, k, v) for name, f in fns.items()}, pool


def _same_program(f, g, *args) -> bool:
    """Whether two functions compile to the same program (their samples can be pooled).

    Compares the lowered StableHLO without the module's name (which is the function's)."""

    def text(fn):
        return re.sub(r"^module @\S+", "module", jax.jit(fn).lower(*args).as_text())

    return text(f) == text(g)


def row(**kw):
    print(json.dumps(kw), flush=True)
    return kw


def bench_forward(lengths, repeats, block_sizes):
    print("## forward, non-causal")
    for t in lengths:
        big = t >= 16384
        # jax.nn materialises [B, N, T, S] float32 scores (and their exponentials): at
        # T=16384 that is 18 GiB peak, so it runs there only with enough free memory.
        scores_gib = 2 * B * N * t * t * 4 / 2**30
        fits = not big or _available_gib() > scores_gib + 3
        fns, pool = attn_fns(t, block_sizes, jaxnn=fits)
        if big:  # also jax.nn head by head (N=1 per call), its cheaper way at this size
            q1, k1, v1 = inputs(t, n=1)
            f1 = jax.jit(jax.nn.dot_product_attention)
            one = ready(f1, q1, k1, v1)
            fns["jax.nn per head"] = lambda one=one: [one() for _ in range(N)]
            if not fits:
                fns["jax.nn"] = fns.pop("jax.nn per head")
        med, gemm = interleave(fns, repeats, pool=pool)
        best = med.get("pooled", med["blocked"])
        flops = 4 * B * N * t * t * H
        row(
            case="fwd",
            T=t,
            ms={k: round(v * 1e3, 1) for k, v in med.items()},
            speedup_default=round(med["jax.nn"] / med["jattn"], 2),
            speedup_blocked=round(med["jax.nn"] / med["blocked"], 2),
            speedup_pooled=round(med["jax.nn"] / best, 2),
            gflops_blocked=round(flops / best / 1e9, 1),
            gemm_gflops=round(gemm, 1),
            gemm_fraction=round(flops / best / 1e9 / gemm, 2),
            jaxnn_note="" if fits else "8 single-head calls (not enough memory for one call)",
            **(
                {"speedup_over_jaxnn_per_head": round(med["jax.nn per head"] / best, 2)}
                if "jax.nn per head" in med
                else {}
            ),
        )


def bench_fwdbwd(lengths, repeats, block_sizes):
    print("## forward + backward, non-causal")
    for t in lengths:
        fns, pool = attn_fns(t, block_sizes, grad=True)
        med, gemm = interleave(fns, repeats, pool=pool)
        row(
            case="fwd+bwd",
            T=t,
            ms={k: round(v * 1e3, 1) for k, v in med.items()},
            speedup_default=round(med["jax.nn"] / med["jattn"], 2),
            speedup_blocked=round(med["jax.nn"] / med["blocked"], 2),
            speedup_pooled=round(med["jax.nn"] / med.get("pooled", med["blocked"]), 2),
            gemm_gflops=round(gemm, 1),
        )


def bench_short(lengths, repeats, block_sizes):
    print("## short sequences: jattn default vs best of dense and jax.nn")
    for t in lengths:
        q, k, v = inputs(t)
        fns, _ = attn_fns(t, block_sizes)

        def dense(q, k, v):
            return jattn.dot_product_attention(q, k, v, implementation="dense")

        fns["dense"] = ready(jax.jit(dense), q, k, v)
        # When the default path is the dense program itself, their samples are pooled:
        # two compilations of one HLO differ here by up to 30% at T=128 (sub-ms calls),
        # in either direction from run to run.
        same = _same_program(lambda q, k, v: jattn.dot_product_attention(q, k, v), dense, q, k, v)
        med, _ = interleave(fns, repeats, pool=("jattn", "dense") if same else None)
        dense_ms = med["pooled"] if same else med["dense"]
        best = min(dense_ms, med["jax.nn"])
        row(
            case="short",
            T=t,
            ms={k: round(v * 1e3, 3) for k, v in med.items()},
            default_is_dense_program=same,
            default_over_best=round(med["pooled" if same else "jattn"] / best, 2),
        )


def _tile_loop(q, k, v, block, softmax: bool):
    """The matrix products of the blocked forward at ``block x block`` tiles, nothing else
    (``softmax=False``), or with the least softmax work any exact kernel needs
    (``softmax=True``: one ``exp`` pass and a row sum per tile; the row maximum is
    replaced by a fixed bound, ``|q||k|max * scale``, so no max pass and no rescaling).

    A ceiling for a blocked kernel built from XLA's batched matrix products, used to
    read the GEMM fraction; not exact attention for arbitrary inputs.
    """
    b, t, n, h = q.shape
    nb, scale = t // block, np.float32(1 / np.sqrt(h))

    def blocks(x):  # [B, T, N, H] -> [T/block, B*N, block, H]
        return x.reshape(b, nb, block, n, h).transpose(1, 0, 3, 2, 4).reshape(nb, b * n, block, h)

    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    dims = (((2,), (2,)), ((0,), (0,)))
    k_max = jnp.max(jnp.linalg.norm(kb, axis=-1), axis=(0, 2))[:, None]  # [B*N, 1]

    def query_block(qi):
        bound = scale * jnp.linalg.norm(qi, axis=-1) * k_max  # [B*N, block]

        def step(j, carry):
            acc, den = carry
            s = jax.lax.dot_general(qi, kb[j], dims)
            if softmax:
                s = jnp.exp(s * scale - bound[..., None])
                den = den + jnp.sum(s, axis=-1)
            acc = acc + jax.lax.dot_general(s, vb[j], (((2,), (1,)), ((0,), (0,))))
            return acc, den

        den0 = jnp.zeros if softmax else jnp.ones  # products only: nothing to divide by
        init = (jnp.zeros(qi.shape, jnp.float32), den0(qi.shape[:2], jnp.float32))
        acc, den = jax.lax.fori_loop(0, nb, step, init)
        return acc / den[..., None]

    out = jax.lax.map(query_block, qb)  # [T/block, B*N, block, H]
    return out.reshape(nb, b, n, block, h).transpose(1, 0, 3, 2, 4).reshape(b, t, n, h)


def bench_ceiling(lengths, repeats, block=512):
    print(f"## GEMM-fraction ceiling: the products alone at {block}x{block} tiles")
    for t in lengths:
        q, k, v = inputs(t)
        fns = {
            "blocked": ready(
                jax.jit(lambda q, k, v: blocked_attention(q, k, v, block_sizes=(block, block))),
                q,
                k,
                v,
            ),
            "products only": ready(
                jax.jit(lambda q, k, v: _tile_loop(q, k, v, block, softmax=False)), q, k, v
            ),
            "products + exp + sum": ready(
                jax.jit(lambda q, k, v: _tile_loop(q, k, v, block, softmax=True)), q, k, v
            ),
        }
        # The softmax variant does the real work: it equals attention on these inputs.
        ref = jax.jit(lambda q, k, v: blocked_attention(q, k, v, block_sizes=(block, block)))
        floor = jax.jit(lambda q, k, v: _tile_loop(q, k, v, block, softmax=True))
        err = float(jnp.max(jnp.abs(floor(q, k, v) - ref(q, k, v))))
        med, gemm = interleave(fns, repeats)
        flops = 4 * B * N * t * t * H
        row(
            case="ceiling",
            softmax_variant_max_abs_diff=float(f"{err:.1e}"),
            T=t,
            ms={name: round(m * 1e3, 1) for name, m in med.items()},
            gemm_gflops=round(gemm, 1),
            gemm_fraction={name: round(flops / m / 1e9 / gemm, 2) for name, m in med.items()},
        )


def bench_causal(t, repeats, block_sizes):
    print("## causal vs non-causal (blocked, default path)")
    q, k, v = inputs(t)
    fns = {}
    for causal in (False, True):
        f = jax.jit(lambda q, k, v, c=causal: jattn.dot_product_attention(q, k, v, is_causal=c))
        fns["causal" if causal else "full"] = ready(f, q, k, v)
    f = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
    fns["jax.nn causal"] = ready(f, q, k, v)
    med, _ = interleave(fns, repeats)
    row(
        case="causal",
        T=t,
        ms={k: round(v * 1e3, 1) for k, v in med.items()},
        full_over_causal=round(med["full"] / med["causal"], 2),
    )


def bench_window(t, window, repeats, block_sizes):
    print(f"## sliding window {window} (left = right = {window // 2}) vs jax.nn local_window_size")
    q, k, v = inputs(t)
    w = (window // 2, window // 2)
    f1 = jax.jit(lambda q, k, v: jattn.dot_product_attention(q, k, v, local_window_size=w))
    f2 = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, local_window_size=w))
    med, _ = interleave({"jattn": ready(f1, q, k, v), "jax.nn": ready(f2, q, k, v)}, repeats)
    row(
        case="window",
        T=t,
        window=w,
        ms={k: round(v * 1e3, 1) for k, v in med.items()},
        speedup=round(med["jax.nn"] / med["jattn"], 2),
    )


def _memory_child(t, grad):
    """Runs in a subprocess: one jattn (blocked) call at length t; prints time and peak RSS."""
    q, k, v = inputs(t)

    def f(q, k, v):
        return jattn.dot_product_attention(q, k, v, implementation="blocked")

    if grad:
        f = jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * v), argnums=(0, 1, 2))
    f = jax.jit(f)
    compiled = f.lower(q, k, v).compile()
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v))
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_rss_gib": _peak_rss_gib()}))


def _proc_kib_as_gib(path: str, field: str) -> float | None:
    """A ``field: N kB`` line of a /proc file, in GiB (None where there is no /proc)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _available_gib() -> float:
    return _proc_kib_as_gib("/proc/meminfo", "MemAvailable") or 0.0


def _peak_rss_gib() -> float:
    """This process's peak RSS: VmHWM, which (unlike ``ru_maxrss``) does not inherit
    the parent's high-water mark through fork + exec on Linux."""
    peak = _proc_kib_as_gib("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_memory(t, grad=True):
    kind = "fwd+bwd" if grad else "fwd"
    print(f"## memory: jattn blocked {kind} at T={t} (subprocess, peak RSS)")
    cmd = [sys.executable, __file__, "--child", str(t), "--child-grad", str(int(grad))]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        row(case="memory", T=t, kind=kind, error=result.stderr[-2000:])
        return
    data = json.loads(result.stdout.strip().splitlines()[-1])
    row(
        case="memory",
        T=t,
        kind=kind,
        seconds=round(data["seconds"], 1),
        peak_rss_gib=round(data["peak_rss_gib"], 3),
    )


def bench_accuracy(t=256, s=384):
    print("## accuracy vs a float64 NumPy reference (unit-normal inputs)")
    q, k, v = inputs(t, s)
    qd, kd, vd = (np.asarray(x, np.float64) for x in (q, k, v))
    cot = np.asarray(jax.random.normal(jax.random.PRNGKey(9), (B, t, N, H)), np.float64)
    scale = 1.0 / np.sqrt(H)

    def ref(qd, kd, vd):
        logits = np.einsum("btnh,bsnh->bnts", qd, kd) * scale
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out = np.einsum("bnts,bsnh->btnh", w, vd)
        # backward by hand: d out -> dw -> dlogits
        dw = np.einsum("btnh,bsnh->bnts", cot, vd)
        dl = w * (dw - np.sum(dw * w, -1, keepdims=True))
        dq = np.einsum("bnts,bsnh->btnh", dl, kd) * scale
        dk = np.einsum("bnts,btnh->bsnh", dl, qd) * scale
        dv = np.einsum("bnts,btnh->bsnh", w, cot)
        return out, (dq, dk, dv)

    out_ref, grads_ref = ref(qd, kd, vd)
    for impl in ("blocked", "dense"):

        def f(q, k, v, impl=impl):
            return jattn.dot_product_attention(q, k, v, implementation=impl)

        out = jax.jit(f)(q, k, v)
        grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * cot), argnums=(0, 1, 2)))(
            q, k, v
        )
        row(
            case="accuracy",
            implementation=impl,
            T=t,
            S=s,
            out_max_abs=float(np.abs(np.asarray(out, np.float64) - out_ref).max()),
            grad_max_abs=max(
                float(np.abs(np.asarray(g, np.float64) - r).max())
                for g, r in zip(grads, grads_ref, strict=True)
            ),
        )


def bench_decode(repeats):
    """Few queries against many keys (a decoding step against a KV cache), B=2: the
    default path (dense, products in the keys' own layout on CPU) against the per-head
    dense products, the blocked path and jax.nn, with XLA's temporary memory per
    program; then 64 steps of a compiled decoding loop (the cache written in place, then
    attended to) with either product layout, at B=1 and B=2."""
    from jattn.functional.attention import attention

    batch = 2
    print(f"## decoding: T queries against S keys, B={batch} (dense in the keys' layout)")
    for n, k in ((8, 8), (8, 2)):
        for s in (4096, 32768, 65536):
            for t in (1, 2, 4, 8):
                if t * (n // k) > 8:
                    continue
                ks = jax.random.split(jax.random.PRNGKey(0), 3)
                q = jax.random.normal(ks[0], (batch, t, n, H), jnp.float32)
                key = jax.random.normal(ks[1], (batch, s, k, H), jnp.float32)
                v = jax.random.normal(ks[2], (batch, s, k, H), jnp.float32)
                fns = {
                    "jattn": lambda q, k, v: jattn.dot_product_attention(q, k, v),
                    "per-head dense": lambda q, k, v: attention(q, k, v),
                    "blocked": lambda q, k, v: blocked_attention(q, k, v),
                    "jax.nn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v),
                }
                temp = {}
                for name, f in fns.items():
                    m = jax.jit(f).lower(q, key, v).compile().memory_analysis()
                    temp[name] = None if m is None else round(m.temp_size_in_bytes / 2**20, 1)
                want = fns["jax.nn"](q, key, v)
                err = float(jnp.max(jnp.abs(fns["jattn"](q, key, v) - want)))
                jitted = {name: ready(jax.jit(f), q, key, v) for name, f in fns.items()}
                med, gemm = interleave(jitted, repeats)
                row(
                    case="decode",
                    B=batch,
                    N=n,
                    K=k,
                    S=s,
                    T=t,
                    path=dispatch.select(None, q, key, v),
                    ms={name: round(m * 1e3, 2) for name, m in med.items()},
                    speedup_vs={
                        name: round(m / med["jattn"], 2)
                        for name, m in med.items()
                        if name != "jattn"
                    },
                    temp_mib=temp,
                    max_abs_diff_vs_jax_nn=float(f"{err:.1e}"),
                )

    print("## compiled decoding loop: 64 steps of cache write + attention, ms per step")
    from jattn.models.decoding import _write

    steps, rule = 64, dispatch.dense_in_layout
    for b, s in ((1, 4096), (1, 16384), (2, 4096), (2, 16384)):
        q = jnp.full((b, 1, N, H), 0.01, jnp.float32)
        cache = jnp.zeros((b, s, N, H), jnp.float32)

        def make(in_layout: bool, b=b, q=q, cache=cache):
            dispatch.dense_in_layout = lambda *a: in_layout  # fixed for this trace

            @jax.jit
            def loop(kc, vc):
                def body(i, carry):
                    kc, vc, acc = carry
                    idx = jnp.full((b,), i, jnp.int32)
                    kc, vc = _write(kc, q, idx), _write(vc, q, idx)
                    out = jattn.dot_product_attention(q, kc, vc, key_value_seq_lengths=idx + 1)
                    return kc, vc, acc + jnp.sum(out)

                return jax.lax.fori_loop(0, steps, body, (kc, vc, jnp.float32(0)))

            try:  # compile now, under the patched rule
                jax.block_until_ready(loop(cache, cache))
            finally:
                dispatch.dense_in_layout = rule
            return ready(loop, cache, cache)

        med, _ = interleave({"in layout": make(True), "per-head": make(False)}, repeats)
        row(
            case="decode_loop",
            B=b,
            S=s,
            ms_per_step={name: round(m / steps * 1e3, 2) for name, m in med.items()},
            default="in layout" if rule(q, cache) else "per-head",
        )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--lengths", nargs="*", type=int, default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--short-lengths", nargs="*", type=int, default=[128, 256, 512])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--block-sizes", nargs=2, type=int, default=None)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-grad", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        _memory_child(a.child, bool(a.child_grad))
        return
    bsz = None if a.block_sizes is None else tuple(a.block_sizes)
    only = set(
        a.only or ["fwd", "fwdbwd", "short", "causal", "window", "memory", "accuracy", "decode"]
    )
    print(f"# jax {jax.__version__}, {jax.devices()[0].device_kind}, block_sizes={bsz}")
    if "accuracy" in only:
        bench_accuracy()
    if "short" in only:
        bench_short(a.short_lengths, max(a.repeats, 20), bsz)
    if "fwd" in only:
        bench_forward(a.lengths, a.repeats, bsz)
    if "fwdbwd" in only:
        bench_fwdbwd([4096], a.repeats, bsz)
    if "causal" in only:
        bench_causal(4096, a.repeats, bsz)
    if "window" in only:
        bench_window(4096, 256, a.repeats, bsz)
    if "memory" in only:
        bench_memory(16384)
    if "huge" in only:
        bench_memory(65536)
    if "decode" in only:
        bench_decode(a.repeats)
    if "ceiling" in only:
        bench_ceiling([t for t in a.lengths if t <= 4096], a.repeats)


if __name__ == "__main__":
    main()
