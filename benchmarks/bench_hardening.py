"""What hiding non-finite inputs costs (issue 19 section 1): jattn's dense, in-layout
(decoding) and blocked paths with a causal mask and key lengths, forward and
forward+backward, against jax.nn.dot_product_attention with the same mask, in one
process, interleaved. Run it on the commit before the change and after: the ratios
to jax.nn are what to compare (the machine is shared and noisy). Then the decoding
step's guard on its own: the in-layout path as it runs (deciding from its logits and
output whether to hide anything, ``_finite.guarded_by_result``), against the same
path with no guard and with the earlier guard (a sum over the inputs), interleaved
without jax.nn (whose 5x longer call disturbs the short ones' timings).

    python benchmarks/bench_hardening.py [--repeats 30]
"""

import argparse
import resource

import jax
import jax.numpy as jnp
import numpy as np
from bench_sparse import interleave

import jattn
from jattn.functional.blocked import blocked_attention


def cases():
    rng = np.random.default_rng(0)

    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    # (name, q, k, v, lengths, jattn fn): batch 4, 8 heads of 64
    b, n, h = 4, 8, 64
    for name, t, s in (("dense T=S=512", 512, 512), ("decode T=1 S=4096", 1, 4096)):
        q, k, v = arr(b, t, n, h), arr(b, s, n, h), arr(b, s, n, h)
        lens = jnp.asarray([s, s // 2, s // 3, 7], jnp.int32)
        yield name, q, k, v, lens, jattn.dot_product_attention, t > 1
    t = 2048
    q, k, v = arr(2, t, n, h), arr(2, t, n, h), arr(2, t, n, h)
    lens = jnp.asarray([t, t // 2], jnp.int32)
    yield "blocked T=S=2048", q, k, v, lens, blocked_attention, True


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}")
    print(f"{'case':22s} {'mode':9s} {'jattn ms':>9s} {'jax.nn ms':>9s} {'ratio':>6s}")
    for name, q, k, v, lens, fn, causal in cases():
        t, s = q.shape[1], k.shape[1]

        def ours(q, k, v, fn=fn, causal=causal, lens=lens):
            return fn(q, k, v, is_causal=causal, key_value_seq_lengths=lens)

        def peer(q, k, v, causal=causal, lens=lens):
            # the same pattern as a mask (jax.nn's is_causal is top-left aligned too)
            return jax.nn.dot_product_attention(
                q, k, v, is_causal=causal, key_value_seq_lengths=lens
            )

        for mode in ("fwd", "fwd+bwd"):
            if mode == "fwd":
                f1, f2 = jax.jit(ours), jax.jit(peer)
            else:
                f1 = jax.jit(jax.grad(lambda q, k, v: jnp.sum(ours(q, k, v) ** 2), (0, 1, 2)))
                f2 = jax.jit(jax.grad(lambda q, k, v: jnp.sum(peer(q, k, v) ** 2), (0, 1, 2)))
            times = interleave(
                {
                    "jattn": lambda f=f1, x=(q, k, v): jax.block_until_ready(f(*x)),
                    "jax.nn": lambda f=f2, x=(q, k, v): jax.block_until_ready(f(*x)),
                },
                args.repeats,
            )
            a, b = times["jattn"] * 1e3, times["jax.nn"] * 1e3
            print(f"{name:22s} {mode:9s} {a:9.2f} {b:9.2f} {a / b:6.2f}", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {peak:.2f} GiB (t={t}, s={s})")
    guard_cost(args.repeats)


def guard_cost(repeats):
    """The decoding step (B=4, T=1, S=4096, key lengths) with each guard, forward."""
    from jattn.functional import _finite

    (name, q, k, v, lens, _, _) = list(cases())[1]
    ours = _finite.guarded_by_result
    guards = {
        "as it runs (from the results)": ours,
        "no guard": lambda run, spec: run(False, spec)[0],
        "sum over the inputs": _finite.guarded_by_inputs,
    }
    fns = {}
    try:
        for label, guard in guards.items():
            _finite.guarded_by_result = guard  # read at trace time
            f = jax.jit(
                lambda q, k, v: jattn.dot_product_attention(q, k, v, key_value_seq_lengths=lens)
            )
            f(q, k, v).block_until_ready()
            fns[label] = lambda f=f: jax.block_until_ready(f(q, k, v))
    finally:
        _finite.guarded_by_result = ours
    times = interleave(fns, 3 * repeats)
    base = times["no guard"]
    print(f"## {name}, forward: the guard's cost (in-layout path)")
    for label, sec in times.items():
        print(f"{label:30s} {sec * 1e3:7.2f} ms {sec / base:6.2f}x")


if __name__ == "__main__":
    main()
