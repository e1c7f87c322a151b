"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology") with softmax,
linear (elu+1), Performer, retention and GLA attention at equal size.

Each sequence lists ``--pairs`` key-value pairs ``k1 v1 k2 v2 ...`` and then asks for
``--queries`` of the keys again (in random order); the model must answer each query
with its value. Data are generated in-process from the seed. Every mechanism trains a
:class:`jattn.models.DecoderLM` of the same size with the same optimiser and data
(``attention=`` is the only difference); accuracy is over the query positions of a
held-out set, reported every ``--eval-every`` steps.

    python experiments/recall.py                                 # all five, defaults
    python experiments/recall.py --kinds softmax gla --steps 500 --out /tmp/recall
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jattn.models import DecoderLM

KINDS = ("softmax", "linear", "performer", "retention", "gla")


def mqar(rng: np.random.Generator, n: int, pairs: int, queries: int, num_keys: int,
         num_values: int):  # fmt: skip
    """``(tokens [n, L], targets [n, L], weights [n, L])``: token 0 is padding/BOS, keys
    are ``1..num_keys``, values ``num_keys+1 .. num_keys+num_values``; targets are the
    next token, weighted only where a query's answer is due."""
    length = 1 + 2 * pairs + 2 * queries
    tokens = np.zeros((n, length), np.int32)
    targets = np.zeros((n, length), np.int32)
    weights = np.zeros((n, length), np.float32)
    for i in range(n):
        keys = rng.choice(num_keys, pairs, replace=False) + 1
        values = rng.integers(0, num_values, pairs) + num_keys + 1
        tokens[i, 1 : 1 + 2 * pairs : 2], tokens[i, 2 : 2 + 2 * pairs : 2] = keys, values
        asked = rng.choice(pairs, queries, replace=False)
        start = 1 + 2 * pairs
        tokens[i, start::2] = keys[asked]
        tokens[i, start + 1 :: 2] = values[asked]  # the answer follows its query (teacher forcing)
        targets[i, :-1] = tokens[i, 1:]
        weights[i, start:length:2] = 1.0  # at a query, predict its value
    return tokens, targets, weights


def train(kind, data, test, args):
    vocab = 1 + args.num_keys + args.num_values
    model = DecoderLM(vocab, num_layers=args.layers, features=args.features,
                      num_heads=args.heads, max_len=data[0].shape[1], dropout_rate=0.0,
                      positional="learned", attention=kind, rngs=nnx.Rngs(args.seed))  # fmt: skip
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
        right = (jnp.argmax(model(tokens), -1) == targets) * weights
        return jnp.sum(right) / jnp.sum(weights)

    rng = np.random.default_rng(args.seed + 1)
    curve, t0 = [], time.perf_counter()
    for i in range(1, args.steps + 1):
        idx = rng.integers(0, data[0].shape[0], args.batch)
        loss = step(model, opt, *(jnp.asarray(x[idx]) for x in data))
        if i % args.eval_every == 0 or i == args.steps:
            acc = float(accuracy(model, *(jnp.asarray(x) for x in test)))
            curve.append(dict(step=i, loss=round(float(loss), 4), accuracy=round(acc, 4)))
            print(json.dumps(dict(kind=kind, **curve[-1])), flush=True)
    return dict(kind=kind, curve=curve, seconds=round(time.perf_counter() - t0, 1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kinds", nargs="*", default=list(KINDS))
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--num-keys", type=int, default=32)
    p.add_argument("--num-values", type=int, default=32)
    p.add_argument("--train", type=int, default=20000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="a directory for results.json")
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    shape = (args.pairs, args.queries, args.num_keys, args.num_values)
    data, test = mqar(rng, args.train, *shape), mqar(rng, args.test, *shape)
    results = [train(kind, data, test, args) for kind in args.kinds]
    for r in results:
        last = r["curve"][-1]
        print(json.dumps(dict(kind=r["kind"], final_accuracy=last["accuracy"],
                              seconds=r["seconds"])))  # fmt: skip
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(dict(args=vars(args), results=results), indent=1))
        tmp.replace(out / "results.json")


if __name__ == "__main__":
    main()
