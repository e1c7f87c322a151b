"""GPU attention table (issue 4): jattn's default path against jax.nn and jattn blocked.

    python benchmarks/bench_gpu.py                       # bfloat16, T = 1024 .. 32768
    python benchmarks/bench_gpu.py --lengths 1024 4096 --repeats 5
    python benchmarks/bench_gpu.py --smoke               # tiny sizes; runs on CPU too

For every T, in one process and interleaved round by round (medians): jattn's default
(``implementation=None``: cuDNN where it supports the inputs), jattn's blocked path,
``jax.nn.dot_product_attention`` with ``implementation='xla'`` and ``'cudnn'``, forward
and forward+backward, causal and not. Each program's temporary memory is XLA's own
figure for the compiled program (``memory_analysis().temp_size_in_bytes``), so it does
not depend on what ran before. A path that cannot run (no cuDNN on this device, out of
memory) is reported with its error instead of a time. Outputs are checked against the
``'xla'`` path (bf16 rounding: max abs difference printed) before timing.

Shapes: B=1, N=8, H=64 (as the CPU targets) unless ``--heads``/``--head-dim`` say
otherwise; one JSON line per case, then a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

import jattn


def _impls(causal: bool) -> dict:
    opts = dict(is_causal=causal)
    return {
        "jattn default": lambda q, k, v: jattn.dot_product_attention(q, k, v, **opts),
        "jattn blocked": lambda q, k, v: jattn.dot_product_attention(
            q, k, v, implementation="blocked", **opts
        ),
        "jax.nn xla": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, implementation="xla", **opts
        ),
        "jax.nn cudnn": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, implementation="cudnn", **opts
        ),
    }


def _with_grad(f):
    def loss(q, k, v):
        return jnp.sum(f(q, k, v).astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def _compile(f, args):
    """The compiled program and its temporary memory in MiB, or the error as a string."""
    try:
        compiled = jax.jit(f).lower(*args).compile()
        analysis = compiled.memory_analysis()
        temp = None if analysis is None else analysis.temp_size_in_bytes / 2**20
        jax.block_until_ready(compiled(*args))  # warm up (and out-of-memory shows here)
        return compiled, temp
    except Exception as e:  # noqa: BLE001 - reported, not hidden: a path that cannot run
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}", None


def run_case(t, *, causal, grad, n, h, dtype, repeats):
    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (1, t, n, h), dtype) for key in ks)
    fns, errors, temps, outs = {}, {}, {}, {}
    for name, f in _impls(causal).items():
        g = _with_grad(f) if grad else f
        compiled, temp = _compile(g, (q, k, v))
        if isinstance(compiled, str):
            errors[name] = compiled
            continue
        fns[name], temps[name] = compiled, temp
        if not grad:
            outs[name] = compiled(q, k, v).astype(jnp.float32)
    diffs = {}
    if "jax.nn xla" in outs:
        ref = outs["jax.nn xla"]
        diffs = {name: float(jnp.max(jnp.abs(o - ref))) for name, o in outs.items()}
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):  # rotate the order each round
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name](q, k, v))
            times[name].append(time.perf_counter() - t0)
    ms = {name: round(1e3 * statistics.median(ts), 3) for name, ts in times.items()}
    row = {
        "T": t,
        "causal": causal,
        "pass": "fwd+bwd" if grad else "fwd",
        "ms": ms,
        "temp_MiB": {name: None if m is None else round(m, 1) for name, m in temps.items()},
        "max_abs_diff_vs_xla": {name: float(f"{d:.2e}") for name, d in diffs.items()},
        "errors": errors,
    }
    if "jattn default" in ms:
        row["speedup_default_over"] = {
            name: round(m / ms["jattn default"], 2) for name, m in ms.items()
        }
    return row


def table(rows) -> str:
    names = ["jattn default", "jattn blocked", "jax.nn xla", "jax.nn cudnn"]
    lines = [
        "| pass | causal | T | " + " | ".join(f"{n} ms (temp MiB)" for n in names) + " |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in names) + " |",
    ]
    for r in rows:
        cells = []
        for n in names:
            if n in r["ms"]:
                temp = r["temp_MiB"].get(n)
                cells.append(f"{r['ms'][n]:.2f} ({'?' if temp is None else f'{temp:.0f}'})")
            else:
                cells.append("n/a" if n not in r["errors"] else "fails")
        lines.append(f"| {r['pass']} | {r['causal']} | {r['T']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--smoke", action="store_true", help="T=256, 2 repeats (a check, not a result)")
    args = p.parse_args()
    lengths, repeats = ([256], 2) if args.smoke else (args.lengths, args.repeats)
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
    )
    rows = []
    for grad in (False, True):
        for causal in (False, True):
            for t in lengths:
                row = run_case(
                    t,
                    causal=causal,
                    grad=grad,
                    n=args.heads,
                    h=args.head_dim,
                    dtype=jnp.dtype(args.dtype),
                    repeats=repeats,
                )
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(table(rows))


if __name__ == "__main__":
    main()
