"""A small character-level language model with jattn, start to finish, in one page.

It learns to finish lines such as ``"Saturday, March 3rd 2021 = "`` with ``"2021-03-03"``:
the date task's pairs written as one line of text each, generated in-process (nothing is
downloaded). A jattn ``DecoderLM``, optax's AdamW on a warm-up + cosine schedule, one
jitted train step; then held-out prompts are completed greedily from the KV cache.

    python examples/lm.py               # 1.5 minutes on a 2-core CPU: 200/200 held out
    python examples/lm.py --steps 50    # a quick look
"""

import argparse

import numpy as np
import optax
from flax import nnx

from jattn.data import BOS, CharTokenizer, dates_task
from jattn.models import DecoderLM
from jattn.training.losses import masked_cross_entropy


def lines(ds):
    """``("Saturday, March 3rd 2021 = ", "2021-03-03")`` for each pair of the data set."""
    return [(f"{src} = ", tgt) for src, tgt in zip(ds.src_texts, ds.tgt_texts, strict=True)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    train, test = dates_task(num_train=20000, num_test=200, seed=args.seed)
    pairs = lines(train)
    tok = CharTokenizer(sorted({c for p, a in pairs + lines(test) for c in p + a}))
    length = max(len(p) + len(a) for p, a in pairs) + 2  # BOS ... EOS
    # BOS + text + EOS, right-padded; the model reads tokens[:, :-1], predicts tokens[:, 1:]
    tokens = np.concatenate(
        [np.full((len(pairs), 1), BOS), tok.encode_batch([p + a for p, a in pairs], length - 1)],
        axis=1,
    )

    model = DecoderLM(tok.vocab_size, num_layers=2, features=128, num_heads=4,
                      max_len=length, dropout_rate=0.0, rngs=nnx.Rngs(args.seed))  # fmt: skip
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, args.steps // 10, args.steps)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.01), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, batch):
        def loss_fn(model):
            logits = model(batch[:, :-1])
            return masked_cross_entropy(logits, batch[:, 1:])[0]  # padding left out

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(args.seed)
    for step in range(1, args.steps + 1):
        loss = train_step(model, optimizer, tokens[rng.integers(0, len(tokens), args.batch)])
        if step % max(args.steps // 10, 1) == 0:
            print(f"step {step}: loss {float(loss):.4f}")

    # Complete the held-out prompts: BOS + prompt, right-padded, with their lengths.
    prompts = [p for p, _ in lines(test)]
    width = max(len(p) for p in prompts) + 1
    ids = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p) + 1] = tok.encode(p, add_bos=True, add_eos=False)
    answer_len = max(len(a) for _, a in lines(test)) + 1  # and EOS
    out = model.generate(ids, [len(p) + 1 for p in prompts], max_new_tokens=answer_len)
    answers = [tok.decode(row) for row in np.asarray(out)]
    right = [a == t for a, (_, t) in zip(answers, lines(test), strict=True)]
    for p, a, ok in list(zip(prompts, answers, right, strict=True))[:5]:
        print(f"  {'ok ' if ok else 'BAD'} {p}{a}")
    print(f"held-out exact match: {np.mean(right):.3f} of {len(right)}")
    return float(np.mean(right))


if __name__ == "__main__":
    main()
