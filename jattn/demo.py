"""End-to-end tour of the functional core: ``python -m jattn.demo``.

Runs the core on small random inputs, checks it against ``jax.nn.dot_product_attention``,
prints outputs and attention weights, and times both (medians of interleaved runs).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jattn
from jattn.layers import AdditiveAttention, MultiHeadAttention


def _median_ms(fn, *args, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The demo's command line (it takes no options but ``--help``): an unknown flag or
    argument exits with status 2 and the usage, as argparse does, not a silent run."""
    parser = argparse.ArgumentParser(
        prog="python -m jattn.demo",
        description=(
            "A tour of jattn's functional core on small random inputs: masked softmax, "
            "additive attention, grouped causal attention checked and timed against "
            "jax.nn.dot_product_attention, and the MultiHeadAttention layer."
        ),
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the tour; ``argv`` (default ``sys.argv[1:]``) is checked first."""
    parse_args(argv)
    print(f"jattn {jattn.__version__} on {jax.default_backend()} ({jax.devices()[0]})")
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)

    # 1. Masked softmax: a fully masked row gives zeros, never NaN.
    logits = jnp.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    mask = jnp.array([[True, True, False], [False, False, False]])
    print("masked_softmax:\n", np.asarray(jattn.masked_softmax(logits, mask)).round(3))

    # 2. Single-head additive attention, d2l style, with valid lengths.
    queries = jax.random.normal(kq, (2, 1, 20))
    keys = jnp.ones((2, 10, 2))
    values = jnp.tile(jnp.arange(40, dtype=jnp.float32).reshape(1, 10, 4), (2, 1, 1))
    additive = AdditiveAttention(key_size=2, query_size=20, num_hiddens=8, rngs=nnx.Rngs(0))
    out = additive(queries, keys, values, jnp.array([2, 6]))
    print("additive attention output:\n", np.asarray(out).round(3))
    print("its weights:\n", np.asarray(additive.attention_weights[...][:, 0]).round(3))

    # 3. Multi-head attention, grouped heads, causal, against jax.nn.
    b, t, n, k, h = 2, 256, 8, 2, 64
    q = jax.random.normal(kq, (b, t, n, h))
    key = jax.random.normal(kk, (b, t, k, h))
    v = jax.random.normal(kv, (b, t, k, h))
    ours = jax.jit(lambda q, k, v: jattn.dot_product_attention(q, k, v, is_causal=True))
    ref = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
    err = float(jnp.max(jnp.abs(ours(q, key, v) - ref(q, key, v))))
    print(f"GQA causal attention [B,T,N,H]={[b, t, n, h]}, K={k}: max |jattn - jax.nn| = {err:.2e}")
    t_ours, t_ref = [], []
    for _ in range(3):  # interleaved
        t_ours.append(_median_ms(ours, q, key, v))
        t_ref.append(_median_ms(ref, q, key, v))
    mo, mr = float(np.median(t_ours)), float(np.median(t_ref))
    print(f"median time: jattn {mo:.2f} ms, jax.nn {mr:.2f} ms, ratio jax.nn/jattn {mr / mo:.2f}")

    # 4. The NNX layer, with the weights it attended with.
    mha = MultiHeadAttention(num_heads=4, in_features=32, rngs=nnx.Rngs(0))
    x = jax.random.normal(kq, (1, 6, 32))
    y, weights = mha(x, is_causal=True, return_weights=True)
    print(f"MultiHeadAttention: out {y.shape}, weights {weights.shape}; head 0:")
    print(np.asarray(weights[0, 0]).round(2))


if __name__ == "__main__":
    main()
