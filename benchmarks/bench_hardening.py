"""What hiding non-finite inputs costs (issue 19 section 1): jattn's dense, in-layout
(decoding) and blocked paths with a causal mask and key lengths, forward and
forward+backward, against jax.nn.dot_product_attention with the same mask, in one
process, interleaved, with XLA's scratch memory of each program. Run it on the
commit before the change and after: the ratios to jax.nn are what to compare (the
machine is shared and noisy). Then the decoding step's guard on its own, forward and
forward+backward: the in-layout path as it runs (deciding from its logits and output
whether to hide anything, ``_finite.guarded_by_result``), against the same path with
no guard, with the custom JVP that ``implementation='dense'`` keeps for forward mode,
and with the earlier guard (a sum over the inputs), interleaved without
jax.nn (whose 5x longer call disturbs the short ones' timings).

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
    head = f"{'case':22s} {'mode':9s} {'jattn ms':>9s} {'jax.nn ms':>9s} {'ratio':>6s}"
    print(head + f" {'jattn temp':>10s} {'jax.nn temp':>11s} (MiB)")
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
            f1, f2 = (f.lower(q, k, v).compile() for f in (f1, f2))
            m1, m2 = (f.memory_analysis().temp_size_in_bytes / 2**20 for f in (f1, f2))
            times = interleave(
                {
                    "jattn": lambda f=f1, x=(q, k, v): jax.block_until_ready(f(*x)),
                    "jax.nn": lambda f=f2, x=(q, k, v): jax.block_until_ready(f(*x)),
                },
                args.repeats,
            )
            a, b = times["jattn"] * 1e3, times["jax.nn"] * 1e3
            print(
                f"{name:22s} {mode:9s} {a:9.2f} {b:9.2f} {a / b:6.2f} {m1:10.1f} {m2:10.1f}",
                flush=True,
            )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {peak:.2f} GiB (t={t}, s={s})")
    guard_cost(args.repeats)


def guard_cost(repeats):
    """The decoding step (B=4, T=1, S=4096, key lengths) with each guard, forward and
    forward + backward: median time and XLA's scratch memory (``temp``)."""
    from jattn.functional import _finite

    (name, q, k, v, lens, _, _) = list(cases())[1]
    ours = _finite.guarded_by_result
    guards = {  # dot_product_attention's automatic choice runs the custom VJP
        "as it runs (custom VJP)": ours,
        "custom JVP ('dense')": lambda run, spec, **kw: ours(run, spec, forward_mode=True),
        "no guard": lambda run, spec, **kw: run(False, spec)[0],
        "sum over the inputs": lambda run, spec, **kw: _finite.guarded_by_inputs(run, spec),
    }

    def step(q, k, v):
        return jattn.dot_product_attention(q, k, v, key_value_seq_lengths=lens)

    def step_grad(q, k, v):
        return jax.grad(lambda *a: jnp.sum(step(*a) ** 2), (0, 1, 2))(q, k, v)

    for mode, fn in (("forward", step), ("forward+backward", step_grad)):
        fns, temp = {}, {}
        try:
            for label, guard in guards.items():
                _finite.guarded_by_result = guard  # read at trace time
                # a new function for each guard: jax.jit caches traces per function
                f = jax.jit(lambda *a, fn=fn: fn(*a)).lower(q, k, v).compile()
                temp[label] = f.memory_analysis().temp_size_in_bytes / 2**20
                jax.block_until_ready(f(q, k, v))
                fns[label] = lambda f=f: jax.block_until_ready(f(q, k, v))
        finally:
            _finite.guarded_by_result = ours
        times = interleave(fns, 3 * repeats if mode == "forward" else repeats)
        base = times["no guard"]
        print(f"## {name}, {mode}: the guard's cost (in-layout path)")
        for label, sec in times.items():
            print(
                f"{label:26s} {sec * 1e3:7.2f} ms {sec / base:6.2f}x  temp {temp[label]:6.1f} MiB",
                flush=True,
            )


if __name__ == "__main__":
    main()
