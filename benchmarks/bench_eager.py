"""Eager calls, as in a notebook: ``jattn.dot_product_attention`` against
``jax.nn.dot_product_attention`` without ``jax.jit``, in one process.

For each shape (each new, so each first call compiles), the first call's time and the
number of XLA programs it compiled, then the median of repeated calls, interleaved.
jattn runs an eager call as one cached program (``jattn.functional._eager``); the
``op by op`` rows run it as it ran before (the path after the checks called directly),
for comparison. Then the linear attentions' and Nadaraya-Watson regression's repeated
calls, one program against op by op. Compilation is a large part of a first call: run
on an idle machine.

    python benchmarks/bench_eager.py [--repeats 30]
"""

import argparse
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_sparse import interleave

import jattn
from jattn.functional import _eager


class _Compiles(logging.Handler):
    """Counts the XLA programs compiled (JAX's own log)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record):
        self.count += "Finished XLA compilation" in record.getMessage()


def op_by_op(fn):
    """``fn`` as jattn ran eager calls before: its path after the checks called directly
    (``_eager.run`` bypassed), so operation by operation."""

    def call(*args, **kwargs):
        one_program = _eager.run
        _eager.run = lambda f, fn_args, *options, **_: f(*fn_args, *options)
        try:
            return fn(*args, **kwargs)
        finally:
            _eager.run = one_program

    return call


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    jax.config.update("jax_log_compiles", True)
    compiles = _Compiles()
    log = logging.getLogger("jax")
    log.addHandler(compiles)
    log.setLevel(logging.WARNING)
    log.propagate = False
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}")
    print(f"{'case':34s} {'call':14s} {'first ms':>9s} {'programs':>8s} {'again ms':>9s}")
    rng = np.random.default_rng(0)

    calls = {
        "jattn": jattn.dot_product_attention,
        "jattn op by op": op_by_op(jattn.dot_product_attention),
        "jax.nn": jax.nn.dot_product_attention,
    }
    for t, causal in ((16, False), (24, True), (128, True), (512, True)):
        q, k, v = (jnp.asarray(rng.standard_normal((2, t, 4, 32)), jnp.float32) for _ in "qkv")
        options = dict(is_causal=causal)
        if causal:
            options["key_value_seq_lengths"] = jnp.asarray([t, t // 2], jnp.int32)
        name = f"B=2 T=S={t} N=4 H=32" + (" causal+lens" if causal else "")
        firsts = {}
        for call, fn in calls.items():
            compiles.count = 0
            t0 = time.perf_counter()
            jax.block_until_ready(fn(q, k, v, **options))
            firsts[call] = (time.perf_counter() - t0) * 1e3, compiles.count
        args_ = (q, k, v)
        again = interleave(
            {
                c: lambda fn=fn, a=args_, o=options: jax.block_until_ready(fn(*a, **o))
                for c, fn in calls.items()
            },
            args.repeats,
        )
        for call in calls:
            ms, programs = firsts[call]
            print(f"{name:34s} {call:14s} {ms:9.1f} {programs:8d} {again[call] * 1e3:9.2f}")
        ratio = again["jattn"] / again["jax.nn"]
        print(f"{name:34s} jattn / jax.nn, again: {ratio:.2f}", flush=True)
    no_peer_section(args.repeats)


def no_peer_section(repeats):
    """Repeated eager calls of the causal linear attention and GLA (chunked scans), of
    Nystromformer (its pseudo-inverse a loop) and of Nadaraya-Watson regression over a
    sweep of widths, as one program against op by op (no jax.nn peer)."""
    from jattn.functional import kernel_regression, linear, lowrank

    rng = np.random.default_rng(1)
    print(f"{'case':34s} {'one program ms':>14s} {'op by op ms':>12s}")
    for t in (64, 256):
        q, k, v, g = (jnp.asarray(rng.standard_normal((2, t, 4, 32)), jnp.float32) for _ in "qkvg")
        g = jax.nn.log_sigmoid(g + 2.0)
        calls = {
            "linear_attention causal": lambda q=q, k=k, v=v: jattn.linear_attention(
                q, k, v, is_causal=True
            ),
            "gated_linear_attention": lambda q=q, k=k, v=v, g=g: linear.gated_linear_attention(
                q, k, v, g
            ),
        }
        calls["nystrom_attention, 8 landmarks"] = lambda q=q, k=k, v=v: lowrank.nystrom_attention(
            q, k, v, 8
        )
        x = jnp.asarray(np.sort(rng.uniform(0, 5, t)), jnp.float32)
        widths = iter(np.linspace(0.1, 2.0, 100_000))  # each call a new width
        calls["nadaraya_watson, new width"] = lambda x=x, q=x[: t // 2], w=widths: (
            kernel_regression.nadaraya_watson(q, x, jnp.sin(x), width=float(next(w)))
        )
        for name, f in calls.items():
            times = interleave(
                {
                    "one": lambda f=f: jax.block_until_ready(f()),
                    "op": lambda f=f: jax.block_until_ready(op_by_op(f)()),
                },
                repeats,
            )
            print(f"{f'T={t} {name}':34s} {times['one'] * 1e3:14.2f} {times['op'] * 1e3:12.2f}")


if __name__ == "__main__":
    main()
