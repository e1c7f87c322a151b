"""jattn.dot_product_attention and MultiHeadAttention against jax.nn and flax.nnx.

Interleaved in one process: every repetition runs each contender once, in turn, so that
machine noise hits all of them alike; we print medians, ratios (peer time / jattn time,
so > 1 means jattn is faster) and the peak memory of each compiled function, from XLA's
buffer assignment (arguments + outputs + temporaries).

    python benchmarks/bench_attention.py                  # T in 512 2048 4096
    python benchmarks/bench_attention.py --lengths 512 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jattn
from jattn.layers import MultiHeadAttention


def peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    if m is None:
        return -1
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each zero-argument function, run round-robin."""
    for fn in fns.values():  # warm up (compile is done by the caller)
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def _compile(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, peak_bytes(compiled)


def bench_functions(t: int, b: int, n: int, h: int, repeats: int) -> list[dict]:
    kq, kk, kv = jax.random.split(jax.random.key(t), 3)
    q = jax.random.normal(kq, (b, t, n, h), jnp.float32)
    k = jax.random.normal(kk, (b, t, n, h), jnp.float32)
    v = jax.random.normal(kv, (b, t, n, h), jnp.float32)
    contenders = {
        "jattn": lambda q, k, v: jattn.dot_product_attention(q, k, v),
        "jattn dense": lambda q, k, v: jattn.dot_product_attention(q, k, v, implementation="dense"),
        "jax.nn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v),
    }
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        fns, mem = {}, {}
        for name, f in contenders.items():
            if mode == "fwd+bwd":
                f = jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v)), argnums=(0, 1, 2))
            compiled, mem[name] = _compile(f, q, k, v)
            fns[name] = lambda c=compiled: c(q, k, v)
        med = interleaved(fns, repeats)
        for name in contenders:
            rows.append(
                dict(
                    what="dot_product_attention",
                    T=t,
                    mode=mode,
                    impl=name,
                    ms=1e3 * med[name],
                    ratio=med["jax.nn"] / med[name],
                    mib=mem[name] / 2**20,
                )
            )
    return rows


def bench_layers(t: int, b: int, n: int, h: int, repeats: int) -> list[dict]:
    d = n * h
    ours = MultiHeadAttention(n, d, rngs=nnx.Rngs(0))
    ref = nnx.MultiHeadAttention(n, d, decode=False, rngs=nnx.Rngs(0))
    for name in ("query", "key", "value", "out"):  # identical weights
        getattr(ref, name).kernel[...] = getattr(ours, name).kernel[...]
        getattr(ref, name).bias[...] = getattr(ours, name).bias[...]
    x = jax.random.normal(jax.random.key(1), (b, t, d), jnp.float32)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        fns, mem = {}, {}
        for name, layer in (("jattn", ours), ("flax.nnx", ref)):
            graphdef, params = nnx.split(layer)

            def fwd(params, x, graphdef=graphdef):
                return nnx.merge(graphdef, params)(x)

            f = fwd
            if mode == "fwd+bwd":
                f = jax.grad(lambda p, x, fwd=fwd: jnp.sum(fwd(p, x)), argnums=(0, 1))
            compiled, mem[name] = _compile(f, params, x)
            fns[name] = lambda c=compiled, p=params: c(p, x)
        med = interleaved(fns, repeats)
        for name in ("jattn", "flax.nnx"):
            rows.append(
                dict(
                    what="MultiHeadAttention",
                    T=t,
                    mode=mode,
                    impl=name,
                    ms=1e3 * med[name],
                    ratio=med["flax.nnx"] / med[name],
                    mib=mem[name] / 2**20,
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--skip-layers", action="store_true")
    args = parser.parse_args()
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, {platform.processor() or ''} "
        f"B={args.batch} N={args.heads} H={args.head_dim} float32, medians of {args.repeats}"
    )
    header = (
        f"{'what':22} {'T':>6} {'mode':8} {'impl':12} {'median ms':>10} {'ratio':>6} {'MiB':>8}"
    )
    print(header)
    print("-" * len(header))
    for t in args.lengths:
        rows = bench_functions(t, args.batch, args.heads, args.head_dim, args.repeats)
        if not args.skip_layers:
            rows += bench_layers(t, args.batch, args.heads, args.head_dim, args.repeats)
        for r in rows:
            print(
                f"{r['what']:22} {r['T']:>6} {r['mode']:8} {r['impl']:12} "
                f"{r['ms']:>10.2f} {r['ratio']:>6.2f} {r['mib']:>8.1f}",
                flush=True,
            )
    print("ratio = peer median / this median (jax.nn for functions, flax.nnx for layers)")


if __name__ == "__main__":
    main()
