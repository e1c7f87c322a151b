"""Composite attention against single mechanisms on a task that needs local and global
context (issue 16, section 4: a study, not a test).

The task: a sequence ``m x_1 ... x_L`` of a mode token ``m`` (``+`` or ``-``) and digits;
at every position ``t`` the target is ``(x_{t-1} + x_{t+1}) mod 10`` when ``m`` is ``+``
and ``(x_{t-1} - x_{t+1}) mod 10`` when it is ``-``. The neighbours are local context
(a sliding window of 1 sees them); the mode is global (position 0, out of every window
but the first positions'). Each model is the same bidirectional pre-norm encoder (equal
width, depth and heads, learned absolute positions, the same optimiser, steps and data);
only its attention layer differs:

- ``global``: softmax attention over all positions;
- ``local``: softmax in a window of 1 on each side;
- ``series``: layer 1 local, layer 2 global (``layer_pattern``-style);
- ``parallel``: a :class:`jattn.layers.ParallelAttention` of a global and a local branch,
  combined by learned per-feature sigmoid gates;
- ``fused``: one layer whose even heads are local and odd heads global
  (:func:`jattn.mods.per_head`).

Accuracy is over every target position of a held-out set.

    python experiments/composite_study.py                      # all five, defaults
    python experiments/composite_study.py --kinds global parallel --steps 500
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jattn import mods
from jattn.layers import MultiHeadAttention, ParallelAttention

KINDS = ("global", "local", "series", "parallel", "fused")
PLUS, MINUS = 10, 11  # the mode tokens; digits are 0..9


def make_data(rng: np.random.Generator, n: int, length: int):
    """``(tokens [n, L+1], targets [n, L+1], weights [n, L+1])``."""
    digits = rng.integers(0, 10, (n, length))
    plus = rng.random(n) < 0.5
    tokens = np.concatenate([np.where(plus, PLUS, MINUS)[:, None], digits], axis=1)
    left, right = digits[:, :-2], digits[:, 2:]
    inner = np.where(plus[:, None], left + right, left - right) % 10
    targets = np.zeros_like(tokens)
    targets[:, 2:-1] = inner  # positions with a digit on both sides
    weights = np.zeros(tokens.shape, np.float32)
    weights[:, 2:-1] = 1.0
    return tokens.astype(np.int32), targets.astype(np.int32), weights


def attention(kind: str, layer: int, features: int, heads: int, rngs: nnx.Rngs):
    local, full = mods.sliding_window((1, 1)), mods.full()
    if kind == "series":
        kind = "local" if layer == 0 else "global"

    def mha(mask_mod=None):
        return MultiHeadAttention(heads, features, mask_mod=mask_mod, rngs=rngs)

    if kind == "global":
        return mha()
    if kind == "local":
        return mha(local)
    if kind == "parallel":
        return ParallelAttention([mha(), mha(local)], combine="gate", rngs=rngs)
    if kind == "fused":
        return mha(mods.per_head([local, full] * (heads // 2)))
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


class Encoder(nnx.Module):
    def __init__(self, kind, *, vocab, length, features, heads, layers, rngs):
        self.embed = nnx.Embed(vocab, features, rngs=rngs)
        self.pos = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (length, features)))
        self.norms = nnx.List([nnx.LayerNorm(features, rngs=rngs) for _ in range(2 * layers)])
        self.attn = nnx.List([attention(kind, i, features, heads, rngs) for i in range(layers)])
        self.mlps = nnx.List([
            nnx.Sequential(nnx.Linear(features, 4 * features, rngs=rngs), nnx.gelu,
                           nnx.Linear(4 * features, features, rngs=rngs))
            for _ in range(layers)
        ])  # fmt: skip
        self.out_norm = nnx.LayerNorm(features, rngs=rngs)
        self.head = nnx.Linear(features, 10, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos[...][None]
        for i, (attn, mlp) in enumerate(zip(self.attn, self.mlps, strict=True)):
            x = x + attn(self.norms[2 * i](x))
            x = x + mlp(self.norms[2 * i + 1](x))
        return self.head(self.out_norm(x))


def train(kind, data, test, args):
    length = data[0].shape[1]
    model = Encoder(kind, vocab=12, length=length, features=args.features, heads=args.heads,
                    layers=args.layers, rngs=nnx.Rngs(args.seed))  # fmt: skip
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.steps // 10, args.steps)
    opt = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.01), wrt=nnx.Param)

    def loss_fn(model, tokens, targets, weights):
        logits = model(tokens)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(ce * weights) / jnp.sum(weights)

    @nnx.jit
    def step(model, opt, tokens, targets, weights):
        loss, grads = nnx.value_and_grad(loss_fn)(model, tokens, targets, weights)
        opt.update(model, grads)
        return loss

    @nnx.jit
    def accuracy(model, tokens, targets, weights):
        hit = jnp.argmax(model(tokens), -1) == targets
        return jnp.sum(hit * weights) / jnp.sum(weights)

    tokens, targets, weights = data
    n = len(tokens)
    start, curve = time.perf_counter(), []
    for i in range(args.steps):
        idx = np.random.default_rng([args.seed, i]).integers(0, n, args.batch)
        step(model, opt, tokens[idx], targets[idx], weights[idx])
        if (i + 1) % args.eval_every == 0 or i + 1 == args.steps:
            curve.append((i + 1, float(accuracy(model, *test))))
    return {"kind": kind, "accuracy": curve[-1][1], "curve": curve,
            "seconds": time.perf_counter() - start}  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--train", type=int, default=20000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write results.json here")
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    data = make_data(rng, args.train, args.length)
    test = tuple(jnp.asarray(a) for a in make_data(rng, args.test, args.length))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {vars(args)}")
    rows = []
    for kind in args.kinds:
        r = train(kind, data, test, args)
        rows.append(r)
        curve = " ".join(f"{s}:{a:.3f}" for s, a in r["curve"])
        print(f"{kind:>9}  accuracy {r['accuracy']:.4f}  ({r['seconds']:.0f} s)  curve {curve}")
    best_single = max((r for r in rows if r["kind"] in ("global", "local")),
                      key=lambda r: r["accuracy"], default=None)  # fmt: skip
    if best_single is not None:
        print(f"best single mechanism: {best_single['kind']} {best_single['accuracy']:.4f}")
        for r in rows:
            if r["kind"] not in ("global", "local"):
                ratio = r["accuracy"] - best_single["accuracy"]
                print(f"  {r['kind']:>9} - best single = {ratio:+.4f}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        tmp = args.out / "results.json.tmp"
        tmp.write_text(json.dumps(rows, indent=2))
        tmp.replace(args.out / "results.json")


if __name__ == "__main__":
    main()
