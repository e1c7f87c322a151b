"""Linear attention (issue 15 targets), CPU float32, B=1, N=8, H=64.

- Causal linear attention (chunked) against jattn's exact causal attention at T=16384,
  forward+backward (target: at least 10x faster), interleaved in one process.
- Chunked against the scan (recurrent) form, forward+backward (target: chunked at least
  as fast), at ``--scan-t``.
- Time against T for the chunked form (target: linear), 1k .. 64k.
- The log decays' floor (``linear.LOG_DECAY_FLOOR``, issue 19): GLA and retention
  heads, chunked, with the floor (as they run) against without it, at ``--scan-t``.
- The causal Performer's running key stabiliser (issue 19): ``performer_attention``
  (keys stabilised by the max up to each row, the sums decayed as it grows) against
  one max over the sequence (as before: the same features and core, no decays), M=64,
  chunked, forward and forward+backward, at ``--scan-t``.

    python benchmarks/bench_linear.py
    python benchmarks/bench_linear.py --only exact --t 8192 --repeats 3
    python benchmarks/bench_linear.py --only floor --repeats 15
    python benchmarks/bench_linear.py --only performer --repeats 15
    python benchmarks/bench_linear.py --smoke
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from bench_sparse import B, H, N, inputs, interleave  # same shapes, same interleaving

import jattn


def fwd_bwd(fn):
    """Gradient wrt q, k, v of sum(out * v): a training step's attention."""
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * v), argnums=(0, 1, 2)))
    return grad


def linear_causal(implementation=None):
    def fn(q, k, v):
        return jattn.linear_attention(q, k, v, is_causal=True, implementation=implementation)

    return fn


def exact(t, repeats):
    q, k, v = inputs(t)
    fns = {
        "linear chunked": fwd_bwd(linear_causal()),
        "exact causal (jattn)": fwd_bwd(
            lambda q, k, v: jattn.dot_product_attention(q, k, v, is_causal=True)
        ),
    }
    med = interleave({n: (lambda f=f: jax.block_until_ready(f(q, k, v))) for n, f in fns.items()},
                     repeats)  # fmt: skip
    row = dict(case="causal fwd+bwd: linear chunked vs exact", T=t)
    row["ms"] = {n: round(1e3 * m, 1) for n, m in med.items()}
    row["speedup"] = round(med["exact causal (jattn)"] / med["linear chunked"], 2)
    print(json.dumps(row))


def scan(t, repeats):
    q, k, v = inputs(t)
    fns = {form: fwd_bwd(linear_causal(form)) for form in ("chunked", "recurrent")}
    med = interleave({n: (lambda f=f: jax.block_until_ready(f(q, k, v))) for n, f in fns.items()},
                     repeats)  # fmt: skip
    row = dict(case="causal fwd+bwd: chunked vs scan", T=t)
    row["ms"] = {n: round(1e3 * m, 1) for n, m in med.items()}
    row["chunked_speedup"] = round(med["recurrent"] / med["chunked"], 2)
    print(json.dumps(row))


def scaling(lengths, repeats):
    grad = fwd_bwd(linear_causal())
    prev = None
    for t in lengths:
        q, k, v = inputs(t)
        run = {"c": lambda q=q, k=k, v=v: jax.block_until_ready(grad(q, k, v))}
        med = interleave(run, repeats)["c"]
        row = dict(case="chunked fwd+bwd vs T", T=t, ms=round(1e3 * med, 1))
        row["us_per_token"] = round(1e6 * med / t, 2)
        if prev is not None:
            row["ratio_to_previous"] = round(med / prev, 2)
        prev = med
        print(json.dumps(row))


def floor(t, repeats):
    """One head's chunked form with the log decays floored (``_head``, as it runs)
    against without (``_chunked`` called directly), forward and forward+backward."""
    from jattn.functional import linear

    q, k, v = (x[0, :, 0] * 0.3 for x in inputs(t))  # [T, H]: one head
    s0 = jnp.zeros((H, H), jnp.float32)
    cases = {"GLA (a decay per feature)": (H, 16), "retention (one per token)": (1, 64)}
    for case, (width, chunk) in cases.items():
        log_a = jax.nn.log_sigmoid(jax.random.normal(jax.random.PRNGKey(3), (t, width)) + 3.0)
        runs = {
            "floored": lambda q, k, v, la, c=chunk: linear._head(
                q, k, v, la, None, s0, "chunked", c
            ),
            "no floor": lambda q, k, v, la, c=chunk: linear._chunked(q, k, v, la, None, s0, c),
        }
        fns = {}
        for name, run in runs.items():
            fwd = jax.jit(lambda *a, run=run: run(*a)[0])
            bwd = jax.jit(jax.grad(lambda *a, run=run: jnp.sum(run(*a)[0] * a[2]), (0, 1, 2, 3)))
            args = (q, k, v, log_a)
            fns[f"{name} fwd"] = lambda f=fwd, a=args: jax.block_until_ready(f(*a))
            fns[f"{name} fwd+bwd"] = lambda f=bwd, a=args: jax.block_until_ready(f(*a))
        med = interleave(fns, repeats)
        row = dict(case=f"log decay floor: {case}", T=t)
        row["ms"] = {n: round(1e3 * m, 2) for n, m in med.items()}
        for mode in ("fwd", "fwd+bwd"):
            row[f"ratio {mode}"] = round(med[f"floored {mode}"] / med[f"no floor {mode}"], 3)
        print(json.dumps(row))


def performer(t, repeats):
    from jattn.functional import linear

    q, k, v = inputs(t)
    w = jattn.orthogonal_random_features(jax.random.PRNGKey(4), 64, H)

    def one_max(q, k, v):  # the stabiliser before issue 19: one max over the sequence
        fq = jattn.favor_features(q, w, stabilizer="row")
        fk = jattn.favor_features(k, w, stabilizer="all")
        return linear.normalized_attention("p", fq, fk, v, True, None, False, None, None, None)

    runs = {
        "running max": lambda q, k, v: jattn.performer_attention(q, k, v, w, is_causal=True),
        "one max": one_max,
    }
    fns = {}
    for name, run in runs.items():
        fwd, bwd = jax.jit(run), fwd_bwd(run)
        fns[f"{name} fwd"] = lambda f=fwd: jax.block_until_ready(f(q, k, v))
        fns[f"{name} fwd+bwd"] = lambda f=bwd: jax.block_until_ready(f(q, k, v))
    med = interleave(fns, repeats)
    row = dict(case="causal performer key stabiliser, M=64, chunked", T=t)
    row["ms"] = {n: round(1e3 * m, 2) for n, m in med.items()}
    for mode in ("fwd", "fwd+bwd"):
        row[f"ratio {mode}"] = round(med[f"running max {mode}"] / med[f"one max {mode}"], 3)
    print(json.dumps(row))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--t", type=int, default=16384)
    p.add_argument("--scan-t", type=int, default=4096)
    p.add_argument("--lengths", type=int, nargs="*", default=[1024 * 2**i for i in range(7)])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs="*", default=["exact", "scan", "scaling"])
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    if a.smoke:
        a.t, a.scan_t, a.lengths, a.repeats = 256, 256, [128, 256], 1
    print(f"# jax {jax.__version__}, {jax.devices()[0].device_kind}, B={B} N={N} H={H}")
    if "exact" in a.only:
        exact(a.t, a.repeats)
    if "scan" in a.only:
        scan(a.scan_t, a.repeats)
    if "scaling" in a.only:
        scaling(a.lengths, a.repeats)
    if "floor" in a.only:
        floor(a.scan_t, a.repeats)
    if "performer" in a.only:
        performer(a.scan_t, a.repeats)


if __name__ == "__main__":
    main()
