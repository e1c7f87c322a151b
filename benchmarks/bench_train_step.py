"""Train-step throughput: jattn's attention vs flax.nnx's, in one encoder-decoder.

    python benchmarks/bench_train_step.py [--batch 16 --src-len 32 --tgt-len 32 --rounds 7]

All models are the same jattn ``Transformer`` (4+4 layers, D=256, 8 heads, F=1024,
dropout 0.1, same initial weights). In two, every ``MultiHeadAttention`` gets an
``attention_fn`` that calls ``flax.nnx.dot_product_attention`` (per-element or
broadcast dropout) instead of jattn's ``dot_product_attention``; in the last, every
attention layer is a ``flax.nnx.MultiHeadAttention`` with the same weights (flax's
defaults: broadcast dropout). The jitted, donated train step of ``jattn.train`` runs for
both, interleaved round by round in one process; tokens/s are ``B * (S + T)`` per
step, medians over rounds. Then the cold compile time of the jattn train step, and
the warm start with JAX's persistent compilation cache (a subprocess run twice).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.functional import causal_mask
from jattn.models import Transformer
from jattn.training import create_train_state, make_optimizer, make_train_step

MODEL = dict(num_layers=4, features=256, num_heads=8, mlp_features=1024, dropout_rate=0.1)
VOCAB = 64


def flax_attention_fn(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    is_causal=False,
    dropout_rate=0.0,
    dropout_rng=None,
    return_weights=False,
    broadcast_dropout=False,
    **unused,
):
    """jattn's ``attention_fn`` calling convention over ``flax.nnx.dot_product_attention``.

    flax's default ``broadcast_dropout=True`` shares one dropout mask across batch and
    heads (less work, different regularizer); jattn draws one per element.
    """
    if is_causal:  # jattn's is_causal (top-left, as jax.nn) as a boolean mask
        causal = causal_mask(query.shape[-3], key.shape[-3])
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    kw = dict(
        bias=bias,
        mask=mask,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        deterministic=dropout_rate == 0.0,
        broadcast_dropout=broadcast_dropout,
    )
    if return_weights:
        weights = nnx.dot_product_attention_weights(query, key, **kw)
        return jnp.einsum("...NTS,...SNH->...TNH", weights, value), weights
    return nnx.dot_product_attention(query, key, value, **kw)


class FlaxMHA(nnx.Module):
    """A ``flax.nnx.MultiHeadAttention`` holding the weights of a jattn
    ``MultiHeadAttention``, called with jattn's keyword arguments (the causal mask is
    built as a boolean mask, the only form flax's layer takes)."""

    def __init__(self, layer, *, broadcast_dropout: bool, rngs: nnx.Rngs):
        n, h = layer.num_heads, layer.head_dim
        self.inner = nnx.MultiHeadAttention(
            n,
            layer.in_features,
            n * h,
            layer.out_features,
            in_kv_features=layer.key.in_features[0],
            dropout_rate=layer.dropout_rate,
            broadcast_dropout=broadcast_dropout,
            decode=False,
            rngs=rngs,
        )
        for name in ("query", "key", "value", "out"):
            src, dst = getattr(layer, name), getattr(self.inner, name)
            dst.kernel[...] = src.kernel[...].reshape(dst.kernel[...].shape)
            dst.bias[...] = src.bias[...].reshape(dst.bias[...].shape)

    def __call__(
        self, x, memory=None, *, mask=None, bias=None, is_causal=False, deterministic=True,
        rngs=None, sow_weights=False,
    ):  # fmt: skip
        if bias is not None or sow_weights:
            raise NotImplementedError("bias/sow_weights are not used by this benchmark")
        if is_causal:
            causal = causal_mask(x.shape[-2], x.shape[-2])
            mask = causal if mask is None else jnp.logical_and(mask, causal)
        return self.inner(x, memory, mask=mask, deterministic=deterministic, rngs=rngs)


def with_flax_layers(model, broadcast_dropout: bool = True):
    """Replaces every attention layer of ``model`` by :class:`FlaxMHA` (same weights)."""
    rngs = nnx.Rngs(params=0, dropout=2)
    for block in list(model.encoder.layers) + list(model.decoder.layers):
        for name in ("self_attention", "cross_attention"):
            if hasattr(block, name):
                layer = getattr(block, name)
                flax_layer = FlaxMHA(layer, broadcast_dropout=broadcast_dropout, rngs=rngs)
                x = jax.random.normal(jax.random.key(0), (2, 5, layer.in_features))
                mem = x if name == "self_attention" else x[:, :3]
                causal = name == "self_attention" and block in model.decoder.layers
                np.testing.assert_allclose(  # same function, same weights
                    flax_layer(x, mem, is_causal=causal),
                    layer(x, mem, is_causal=causal),
                    atol=1e-5,
                )
                setattr(block, name, flax_layer)
    return model


def setup(attention_fn, args, flax_layers=False):
    model = Transformer(
        VOCAB,
        VOCAB,
        **{**MODEL, "dropout_rate": args.dropout},
        max_len=max(args.src_len, args.tgt_len),
        attention_fn=attention_fn,
        rngs=nnx.Rngs(params=0, dropout=1),
    )
    if flax_layers:
        model = with_flax_layers(model)
    tx = make_optimizer(weight_decay=0.01, clip_norm=1.0)
    graphdef, state = create_train_state(model, tx, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    src = rng.integers(3, VOCAB, (args.batch, args.src_len)).astype(np.int32)
    tgt = rng.integers(3, VOCAB, (args.batch, args.tgt_len)).astype(np.int32)
    batch = {
        "src": src,
        "tgt_in": np.concatenate([np.ones_like(tgt[:, :1]), tgt[:, :-1]], 1),
        "tgt": tgt,
    }
    step = make_train_step(graphdef, tx, label_smoothing=0.1)
    return step, jax.device_put(state), batch


def compile_only(args) -> None:
    """Child process: time the first lowering + compile of the jattn train step."""
    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    step, state, batch = setup(None, args)
    t0, c0 = time.perf_counter(), time.process_time()
    lowered = step.lower(state, batch, np.float32(1e-3))
    t1 = time.perf_counter()
    lowered.compile()
    t2, c2 = time.perf_counter(), time.process_time()
    print(
        json.dumps({"trace_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0, "cpu_s": c2 - c0})
    )


def measure(args) -> dict:
    fns = {
        "jattn": setup(None, args),
        "flax.nnx": setup(flax_attention_fn, args),
        "flax.nnx, broadcast dropout": setup(
            functools.partial(flax_attention_fn, broadcast_dropout=True), args
        ),
        "flax.nnx.MultiHeadAttention layers": setup(None, args, flax_layers=True),
    }
    lr = np.float32(1e-3)
    states = {}
    for name, (step, state, batch) in fns.items():  # compile + warm up
        state, m = step(state, batch, lr)
        state, m = step(state, batch, lr)
        jax.block_until_ready(m)
        states[name] = state
    times = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, (step, _, batch) in fns.items():
            state = states[name]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, m = step(state, batch, lr)
            jax.block_until_ready(m)
            times[name].append((time.perf_counter() - t0) / args.steps)
            states[name] = state
    tokens = args.batch * (args.src_len + args.tgt_len)
    return {name: tokens / float(np.median(t)) for name, t in times.items()}


def child_compile(args, cache_dir) -> dict:
    """Runs :func:`compile_only` in a fresh process; adds the process wall time."""
    cmd = [
        sys.executable,
        __file__,
        "--compile-only",
        "--batch",
        str(args.batch),
        "--src-len",
        str(args.src_len),
        "--tgt-len",
        str(args.tgt_len),
    ]
    if cache_dir:
        cmd += ["--cache-dir", cache_dir]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "process_s": time.perf_counter() - t0}


def _fmt(r: dict) -> str:
    return (
        f"trace {r['trace_s']:.2f} s + compile {r['compile_s']:.2f} s = {r['total_s']:.2f} s "
        f"wall ({r['cpu_s']:.2f} s CPU); whole process {r['process_s']:.1f} s"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--src-len", type=int, default=32)
    p.add_argument("--tgt-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3, help="steps per round and model")
    p.add_argument("--dropout", type=float, default=MODEL["dropout_rate"])
    p.add_argument("--skip-compile-times", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.compile_only:
        return compile_only(args)

    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}; load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    print(
        f"model {MODEL} (dropout {args.dropout}), batch {args.batch}, "
        f"S={args.src_len}, T={args.tgt_len}"
    )
    if args.skip_throughput:
        rates = {}
    else:
        rates = measure(args)
    for name, rate in rates.items():
        print(f"train step, {name:36} attention: {rate:8,.0f} tokens/s (median of {args.rounds})")
    for name in list(rates)[1:] if rates else []:
        print(f"jattn / {name}: {rates['jattn'] / rates[name]:.2f}x")
    if args.skip_compile_times:
        return
    print("cold compile of the jattn train step:", _fmt(child_compile(args, "")))
    with tempfile.TemporaryDirectory() as cache:
        first = child_compile(args, cache)
        warm = child_compile(args, cache)
    print("persistent cache, first run: ", _fmt(first))
    print("persistent cache, second run:", _fmt(warm))


if __name__ == "__main__":
    main()
