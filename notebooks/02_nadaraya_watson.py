# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 Nadaraya-Watson kernel regression: attention pooling before deep learning
#
# Nadaraya (1964) and Watson (1964) predicted `f(q)` as a weighted average of training targets
# `y_i`, weighting each by a kernel of the distance between `q` and the training input `x_i`.
# In attention terms the query is `q`, the keys are the `x_i`, the values are the `y_i`, and the
# weights are a softmax over `log K(q - x_i)`. We reproduce d2l's experiment: fixed kernels,
# then a Gaussian kernel whose width is learned by gradient descent.

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/jattn/jattn/blob/main/notebooks/02_nadaraya_watson.ipynb)

# %% tags=["skip-execution"]
# %pip install -q "jattn @ git+https://github.com/jattn/jattn"

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import optax
from flax import nnx

from jattn.functional import kernel_regression as nw
from jattn.layers.kernel_regression import NWKernelRegression
from jattn.viz import plot_attention

SMALL = os.environ.get("JATTN_SMALL") == "1"  # test-suite switch (this notebook is small anyway)

# %% [markdown]
# ## Data
#
# 50 training points `x ~ U(0, 5)`, sorted, with targets `f(x) = 2 sin(x) + x^0.8` plus
# Gaussian noise of standard deviation 0.5; the test inputs are `0, 0.1, ..., 4.9`.


# %%
def f(x):
    return 2 * jnp.sin(x) + x**0.8


def make_data(key, n=50):
    kx, kn = jax.random.split(key)
    x_train = jnp.sort(jax.random.uniform(kx, (n,)) * 5)
    y_train = f(x_train) + 0.5 * jax.random.normal(kn, (n,))
    return x_train, y_train


data_key, param_key = jax.random.split(jax.random.key(0))
x_train, y_train = make_data(data_key)
x_test = jnp.arange(0, 5, 0.1)
y_truth = f(x_test)

# %% [markdown]
# ## Fixed kernels
#
# jattn's kernels live in log space (`log K(d)`, `-inf` outside a window), so the weights are
# exactly a masked softmax. Plain averaging is the constant kernel.

# %%
kernels = {
    "constant (average)": (nw.constant_kernel, 1.0),
    "boxcar, width 1": (nw.boxcar_kernel, 1.0),
    "triangular (d2l's 'Epanechikov'), width 1": (nw.triangular_kernel, 1.0),
    "Epanechnikov, width 1": (nw.epanechnikov_kernel, 1.0),
    "Gaussian, width 1": (nw.gaussian_kernel, 1.0),
    "Gaussian, width 0.2": (nw.gaussian_kernel, 0.2),
}
d = jnp.linspace(-2.5, 2.5, 201)
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
for name, (kernel, width) in kernels.items():
    ax0.plot(d, jnp.exp(kernel(d, width)), label=name)
    pred, _ = nw.nadaraya_watson(x_test, x_train, y_train, kernel=kernel, width=width)
    ax1.plot(x_test, pred, label=name)
ax0.set_title("kernels K(d)")
ax0.legend()
ax1.plot(x_test, y_truth, "k-", lw=2, label="truth")
ax1.plot(x_train, y_train, "o", alpha=0.4, label="data")
ax1.set_title("predictions")
ax1.legend(fontsize="small")
plt.show()

# %% [markdown]
# Each row of the attention weights is one test input; a narrow kernel concentrates its weight
# on the nearest training points.

# %%
_, w_wide = nw.nadaraya_watson(x_test, x_train, y_train, width=1.0)
_, w_narrow = nw.nadaraya_watson(x_test, x_train, y_train, width=0.2)
fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
plot_attention(w_wide, ax=axes[0], title="Gaussian, width 1")
plot_attention(w_narrow, ax=axes[1], title="Gaussian, width 0.2")
for ax in axes:
    ax.set_xlabel("training point (sorted x)")
    ax.set_ylabel("test point")
plt.show()

# %% [markdown]
# ## Learning the kernel width
#
# d2l's `NWKernelRegression` has one parameter `w`: `softmax(-((q - k) w)^2 / 2)`, a Gaussian of
# width `1 / w`. Trained on the training set itself, every point would attend to itself and `w`
# would grow without bound, so each training point attends to all *other* points
# (`leave_one_out_mask`). As in d2l: `w ~ U(0, 1)`, SGD with learning rate 0.5 on the summed
# squared error, 5 full-batch steps.

# %%
model = NWKernelRegression(rngs=nnx.Rngs(params=param_key))
optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
loo = nw.leave_one_out_mask(x_train.shape[0])


@nnx.jit
def train_step(model, optimizer):
    def loss_fn(model):
        pred = model(x_train, x_train, y_train, mask=loo)
        return jnp.sum(jnp.square(pred - y_train))

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


print(f"w initial {float(model.w[...]):.3f}")
for epoch in range(5):
    loss = train_step(model, optimizer)
    print(f"epoch {epoch + 1}, loss {float(loss):.2f}, w {float(model.w[...]):.3f}")

# %%
y_param = model(x_test, x_train, y_train)
w_param = model.attention_weights[...]
y_gauss, _ = nw.nadaraya_watson(x_test, x_train, y_train, width=1.0)
y_avg, _ = nw.nadaraya_watson(x_test, x_train, y_train, kernel=nw.constant_kernel)


def mse(pred):
    return float(jnp.mean(jnp.square(pred - y_truth)))


fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
axes[0].plot(x_test, y_truth, "k-", lw=2, label="truth")
axes[0].plot(x_train, y_train, "o", alpha=0.4, label="data")
axes[0].plot(x_test, y_avg, "--", label=f"average (MSE {mse(y_avg):.3f})")
axes[0].plot(x_test, y_gauss, label=f"Gaussian, width 1 (MSE {mse(y_gauss):.3f})")
axes[0].plot(
    x_test, y_param, label=f"learned w = {float(model.w[...]):.2f} (MSE {mse(y_param):.3f})"
)
axes[0].legend(fontsize="small")
plot_attention(w_param, ax=axes[1], title="learned kernel: attention weights")
plt.show()

# %% [markdown]
# ## Over many seeds
#
# One seed is an anecdote. `python experiments/nadaraya_watson.py --seeds 20 --out DIR` repeats
# this protocol over 20 seeds (vmapped, one compile) and writes the medians and these figures:
# the learned width beats width 1 on the true curve, and both beat plain averaging.
