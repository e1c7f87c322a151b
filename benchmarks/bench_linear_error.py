"""How well the approximations match softmax attention (issue 15), on real attention
patterns and on random inputs.

Real patterns: the queries, keys and values of every encoder self-attention layer of
the date-translation Transformer (``configs/dates.py``, trained here for ``--steps``
steps into ``--workdir``, or reused from there), on test sentences grouped by length
(no padding). Random: i.i.d. normal inputs of the same shapes and scale per head.
For each method and size, the error ``||approx - exact|| / ||exact||`` (Frobenius, per
example and head, then the median), next to the trivial baseline: every query gets
the mean of the values.

    python benchmarks/bench_linear_error.py                 # trains 400 steps first
    python benchmarks/bench_linear_error.py --steps 100 --examples 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jattn
from jattn.functional import lowrank

ROOT = Path(__file__).resolve().parents[1]


def trained_qkv(workdir: str, steps: int, examples: int):
    """``[(q, k, v)]`` per (layer, sentence length): ``[B, T, N, H]`` each, no padding."""
    from jattn.train import load_config, make_datasets, restore_model, train_and_evaluate

    config = load_config(ROOT / "configs" / "dates.py")
    config.train.num_steps = steps
    config.train.warmup_steps = min(config.train.warmup_steps, steps // 4)
    config.train.checkpoint_every = steps
    config.eval.num_heatmaps = 0
    if not (Path(workdir) / "checkpoints").is_dir():
        metrics = train_and_evaluate(config, workdir)
        print(json.dumps({"trained": steps, **{k: v for k, v in metrics.items()
                                                if isinstance(v, int | float)}}))  # fmt: skip
    model = restore_model(config, workdir)
    _, test = make_datasets(config)
    src = np.asarray(test.src[:examples])
    lengths = (src != model.pad_id).sum(axis=1)
    groups = []
    for length in np.unique(lengths):
        tokens = jnp.asarray(src[lengths == length][:, :length])
        x = model.src_embed(tokens)
        for layer in model.encoder.layers:
            h = layer.norm1(x) if layer.pre_norm else x
            att = layer.self_attention
            groups.append((att.query(h), att.key(h), att.value(h)))
            x = layer(x)
    return groups


def rel_error(approx, exact):
    """Per example and head: ``||a - e|| / ||e||`` over (T, Hv)."""
    num = jnp.sqrt(jnp.sum((approx - exact) ** 2, axis=(1, 3)))
    return num / jnp.sqrt(jnp.sum(exact**2, axis=(1, 3)))


def methods(key):
    out = {"mean of V (baseline)": lambda q, k, v: jnp.broadcast_to(
        jnp.mean(v, axis=1, keepdims=True), v.shape[:1] + q.shape[1:3] + v.shape[-1:])}  # fmt: skip
    out["linear elu+1"] = lambda q, k, v: jattn.linear_attention(q, k, v)
    for m in (16, 64, 256):

        def perf(q, k, v, m=m):
            w = lowrank.orthogonal_random_features(key, m, q.shape[-1])
            return jattn.performer_attention(q, k, v, w)

        out[f"performer M={m}"] = perf
    for r in (4, 8, 16):

        def lin(q, k, v, r=r):
            s = k.shape[1]
            if r >= s:
                return None
            e = jax.random.normal(key, (r, s)) / np.sqrt(r)
            return jattn.linformer_attention(q, k, v, e)

        out[f"linformer k={r}"] = lin
    for m in (2, 4, 8, 16):

        def nys(q, k, v, m=m):
            return None if m > k.shape[1] else jattn.nystrom_attention(q, k, v, m)

        out[f"nystrom landmarks={m}"] = nys
    return out


def table(groups, name):
    key = jax.random.key(0)
    errs = {}
    for q, k, v in groups:
        exact = jax.nn.dot_product_attention(q, k, v)
        for label, fn in methods(key).items():
            approx = fn(q, k, v)
            if approx is not None:
                errs.setdefault(label, []).append(np.asarray(rel_error(approx, exact)).ravel())
    print(f"## relative error vs softmax attention: {name}")
    for label, e in errs.items():
        e = np.concatenate(e)
        row = dict(inputs=name, method=label, median=round(float(np.median(e)), 4))
        row.update(p90=round(float(np.quantile(e, 0.9)), 4), n=int(e.size))
        print(json.dumps(row))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/jattn_bench_linear_error")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--examples", type=int, default=128)
    a = p.parse_args()
    groups = trained_qkv(a.workdir, a.steps, a.examples)
    table(groups, f"trained date model ({a.steps} steps)")
    rng = np.random.default_rng(0)
    random = []
    for q, k, v in groups:  # the same shapes and per-head scales, no structure

        def like(x):
            return jnp.asarray(rng.standard_normal(x.shape) * np.std(np.asarray(x), axis=(0, 1)))

        random.append((like(q), like(k), like(v)))
    table(random, "random inputs, same shapes and scales")


if __name__ == "__main__":
    main()
