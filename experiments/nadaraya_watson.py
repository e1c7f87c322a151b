"""Reproduces d2l's Nadaraya-Watson experiment over many seeds.

    python experiments/nadaraya_watson.py --seeds 20 --out DIR

Protocol (d2l, "Attention Pooling: Nadaraya-Watson Kernel Regression"): 50
training points x ~ U(0, 5), sorted; y = f(x) + N(0, 0.5^2) noise with
f(x) = 2 sin(x) + x^0.8; test points arange(0, 5, 0.1). Three predictors:
plain averaging (constant kernel), non-parametric Gaussian kernel of width 1,
and the parametric kernel softmax(-((q - k) w)^2 / 2) with one learnable w,
initialised w ~ U(0, 1) as d2l's ``torch.rand``, trained with SGD (learning rate
0.5) for 5 epochs, each one full-batch step on the leave-one-out keys with the
summed squared error (d2l's ``MSELoss(reduction='none')`` then ``.sum()``).
Each predictor is scored by its mean squared error against the noise-free f on
the test points. Writes results.json (per seed and medians), curves.png and
weights.png to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jattn.functional.kernel_regression as nw
from jattn.layers.kernel_regression import NWKernelRegression

NUM_TRAIN = 50
LEARNING_RATE = 0.5
EPOCHS = 5


def true_function(x: jax.Array) -> jax.Array:
    return 2 * jnp.sin(x) + x**0.8


def make_data(key: jax.Array, num_train: int = NUM_TRAIN):
    """``(x_train [S] sorted, y_train [S], x_test [T], y_truth [T])``."""
    kx, kn = jax.random.split(key)
    x_train = jnp.sort(jax.random.uniform(kx, (num_train,)) * 5)
    y_train = true_function(x_train) + 0.5 * jax.random.normal(kn, (num_train,))
    x_test = jnp.arange(0, 5, 0.1, dtype=jnp.float32)
    return x_train, y_train, x_test, true_function(x_test)


def train_parametric(key: jax.Array, x_train, y_train, *, lr=LEARNING_RATE, epochs=EPOCHS):
    """Trains d2l's ``NWKernelRegression`` on leave-one-out keys; returns (model, losses)."""
    model = NWKernelRegression(rngs=nnx.Rngs(params=key))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loo = nw.leave_one_out_mask(x_train.shape[0])
    opt = optax.sgd(lr)

    def loss_fn(p):
        pred = nnx.merge(graphdef, p, rest)(x_train, x_train, y_train, mask=loo)
        return jnp.sum(jnp.square(pred - y_train))

    def step(carry, _):
        p, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, state = opt.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), loss

    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=epochs)
    return nnx.merge(graphdef, params, rest), losses


def run_seed(key: jax.Array) -> dict[str, jax.Array]:
    """One replicate: the data, the three predictors' curves and weights, and their test MSE."""
    data_key, param_key = jax.random.split(key)
    x_train, y_train, x_test, y_truth = make_data(data_key)
    model, losses = train_parametric(param_key, x_train, y_train)
    w_init = NWKernelRegression(rngs=nnx.Rngs(params=param_key)).w[...]
    average, _ = nw.nadaraya_watson(x_test, x_train, y_train, kernel=nw.constant_kernel)
    gaussian, weights_gaussian = nw.nadaraya_watson(x_test, x_train, y_train, width=1.0)
    parametric = model(x_test, x_train, y_train)

    def mse(pred):
        return jnp.mean(jnp.square(pred - y_truth))

    return {
        "mse_average": mse(average),
        "mse_nonparametric": mse(gaussian),
        "mse_parametric": mse(parametric),
        "w_init": w_init,
        "w_final": model.w[...],
        "final_train_loss": losses[-1],
        # arrays for the figures
        "x_train": x_train,
        "y_train": y_train,
        "x_test": x_test,
        "y_truth": y_truth,
        "pred_average": average,
        "pred_nonparametric": gaussian,
        "pred_parametric": parametric,
        "weights_nonparametric": weights_gaussian,
        "weights_parametric": model.attention_weights[...],
    }


SCALARS = ("mse_average", "mse_nonparametric", "mse_parametric", "w_init", "w_final")


def run(num_seeds: int = 20) -> dict:
    """Runs seeds ``0 .. num_seeds - 1`` (vmapped: one compile).

    Returns ``{"num_seeds", "per_seed": {metric: [values]}, "medians": {metric: median},
    "arrays": {name: [num_seeds, ...] NumPy arrays for the figures}}``.
    """
    keys = jax.vmap(jax.random.key)(jnp.arange(num_seeds))
    out = jax.jit(jax.vmap(run_seed))(keys)
    per_seed = {k: np.asarray(out[k], np.float64).tolist() for k in (*SCALARS, "final_train_loss")}
    medians = {k: float(np.median(v)) for k, v in per_seed.items()}
    arrays = {k: np.asarray(v) for k, v in out.items()}
    return {"num_seeds": num_seeds, "per_seed": per_seed, "medians": medians, "arrays": arrays}


def plot(arrays: dict, seed: int = 0):
    """Figures for one seed of :func:`run`'s arrays: the fitted curves and the weights."""
    import matplotlib.pyplot as plt

    from jattn.viz import plot_attention

    a = {k: v[seed] for k, v in arrays.items()}
    curves, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    plt.close(curves)
    ax.plot(a["x_test"], a["y_truth"], "k-", label="truth f(x)")
    ax.plot(a["x_train"], a["y_train"], "o", alpha=0.5, label="training data")
    ax.plot(a["x_test"], a["pred_average"], "--", label="average")
    ax.plot(a["x_test"], a["pred_nonparametric"], label="Gaussian, width 1")
    ax.plot(a["x_test"], a["pred_parametric"], label=f"parametric, w = {a['w_final']:.2f}")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(f"Nadaraya-Watson regression (seed {seed})")
    ax.legend()

    weights, axes = plt.subplots(1, 2, figsize=(11, 5), layout="constrained")
    plt.close(weights)
    rows = [f"{v:.1f}" for v in a["x_test"]]
    cols = [f"{v:.1f}" for v in a["x_train"]]
    for ax, name in zip(axes, ("nonparametric", "parametric"), strict=True):
        title = "Gaussian, width 1" if name == "nonparametric" else "parametric (trained w)"
        plot_attention(a[f"weights_{name}"], row_labels=rows, col_labels=cols, ax=ax, title=title)
        ax.set_xlabel("training x (keys)")
        ax.set_ylabel("test x (queries)")
    return curves, weights


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--out", default=None, help="folder for results.json and the PNGs")
    args = parser.parse_args(argv)
    result = run(args.seeds)
    m = result["medians"]
    print(
        f"medians over {args.seeds} seeds of the test MSE vs the true curve: "
        f"parametric {m['mse_parametric']:.4f}, non-parametric (Gaussian, width 1) "
        f"{m['mse_nonparametric']:.4f}, average {m['mse_average']:.4f}; "
        f"median w {m['w_init']:.2f} -> {m['w_final']:.2f}"
    )
    per_seed = result["per_seed"]
    wins = sum(
        p < n
        for p, n in zip(per_seed["mse_parametric"], per_seed["mse_nonparametric"], strict=True)
    )
    print(f"parametric beats non-parametric on {wins}/{args.seeds} seeds")
    if args.out:
        from jattn.viz import save_figure

        os.makedirs(args.out, exist_ok=True)
        summary = {k: v for k, v in result.items() if k != "arrays"}
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(summary, f, indent=1)
        curves, weights = plot(result["arrays"], seed=0)
        save_figure(curves, os.path.join(args.out, "curves.png"))
        save_figure(weights, os.path.join(args.out, "weights.png"))
        print(f"wrote results.json, curves.png and weights.png to {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
