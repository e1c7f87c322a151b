"""What the layers' projections by row cost (issue 19): ``MultiHeadAttention``
forward and forward+backward as it runs (each projection by
``jattn.functional._finite.by_row``: a non-finite input row zeroed before, its output
NaN after) against the same layer with plain projections, interleaved in one process.

    cd benchmarks && python bench_layer_rows.py [repeats]
"""

import json
import sys

import jax
import jax.numpy as jnp
from bench_sparse import interleave
from flax import nnx

from jattn.layers import MultiHeadAttention


class Plain(MultiHeadAttention):
    """The layer with its projections applied as they are."""

    def _project(self, q, k, v):
        return self.query(q), self.key(k), self.value(v)

    def _output(self, x):
        return self.out(x)


def run(b, t, d, n, repeats, causal):
    x = jax.random.normal(jax.random.key(0), (b, t, d))
    fns = {}
    for name, cls in (("cleaned", MultiHeadAttention), ("plain", Plain)):
        layer = cls(n, d, rngs=nnx.Rngs(0))
        g, st = nnx.split(layer)
        fwd = jax.jit(lambda st, x, g=g: nnx.merge(g, st)(x, is_causal=causal))
        bwd = jax.jit(
            jax.grad(
                lambda st, x, g=g: jnp.sum(nnx.merge(g, st)(x, is_causal=causal) ** 2),
                argnums=(0, 1),
            )
        )
        fns[f"{name} fwd"] = lambda f=fwd, st=st: jax.block_until_ready(f(st, x))
        fns[f"{name} fwd+bwd"] = lambda f=bwd, st=st: jax.block_until_ready(f(st, x))
    med = interleave(fns, repeats)
    ms = {k: round(1e3 * v, 2) for k, v in med.items()}
    row = dict(B=b, T=t, D=d, N=n, causal=causal, ms=ms)
    for m in ("fwd", "fwd+bwd"):
        row[f"ratio {m}"] = round(med[f"cleaned {m}"] / med[f"plain {m}"], 3)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    r = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    run(8, 256, 256, 8, r, True)
    run(64, 1, 256, 8, r * 3, False)  # a decoding-sized call: one token
    run(2, 1024, 512, 8, r, True)
