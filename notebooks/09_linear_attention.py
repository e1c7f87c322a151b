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
# # 09 Linear attention: from the parallel form to the recurrent one
#
# Softmax attention compares every query with every key: O(T^2) time, and a key/value cache
# that grows by one row per generated token. Linear attention replaces the softmax kernel
# `exp(q . k)` by an inner product of features `phi(q) . phi(k)`; associativity then turns
# the `[T, T]` computation into a running sum, which is an RNN with a state of fixed size.
# This notebook derives the three equivalent forms (parallel, recurrent, chunked), writes
# each in a few lines of `jnp` and checks them against `jattn.linear_attention`, adds the
# decays of retention (RetNet) and gated linear attention (GLA), prefills a prompt with
# the chunked form and decodes token by token with the recurrent one (also through a
# `DecoderLM` with `attention="gla"`), times the chunked form against exact causal
# attention, and measures how far the approximations of softmax attention in jattn
# (Performer, Linformer, Nystromformer, elu+1 linear attention) are from the real thing.

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/jattn/jattn/blob/main/notebooks/09_linear_attention.ipynb)

# %% tags=["skip-execution"]
# %pip install -q "jattn @ git+https://github.com/jattn/jattn"

# %%
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from jax import lax

import jattn
from jattn.models import DecoderLM

SMALL = os.environ.get("JATTN_SMALL") == "1"  # the test suite runs the small sizes
print(f"jattn {jattn.__version__}, jax {jax.__version__}, backend {jax.default_backend()}")


def normal(shape, seed):
    """Unit-normal float32 array (NumPy's generator: no compilation, unlike op-by-op jax)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def qkv(t, *, b=1, n=8, h=64, seed=0):
    """Unit-normal ``[B, T, N, H]`` queries, keys and values."""
    return tuple(normal((b, t, n, h), (seed, i)) for i in range(3))


def rel(a, b):
    """Largest difference, relative to the largest magnitude."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# %% [markdown]
# ## From the softmax kernel to a running sum
#
# Softmax attention of query $t$ over the keys $s$ (row vectors $q_t, k_s \in \mathbb{R}^H$,
# $v_s \in \mathbb{R}^{H_v}$):
#
# $$o_t = \frac{\sum_s \exp(q_t k_s^\top / \sqrt{H})\, v_s}{\sum_s \exp(q_t k_s^\top / \sqrt{H})}.$$
#
# The exponential is a similarity kernel. Replace it by an inner product of feature maps,
# $\exp(q k^\top / \sqrt{H}) \to \phi(q)\,\phi(k)^\top$ with $\phi: \mathbb{R}^H \to
# \mathbb{R}^F_{>0}$ (Katharopoulos et al. 2020 take $\phi(x) = \mathrm{elu}(x) + 1$, $F = H$;
# the jattn default). Because $(\phi(q_t)\phi(k_s)^\top)\, v_s = \phi(q_t)\,(\phi(k_s)^\top
# v_s)$, the sum over keys moves inside:
#
# $$o_t = \frac{\sum_s \phi(q_t)\phi(k_s)^\top\, v_s}{\sum_s \phi(q_t)\phi(k_s)^\top}
#       = \frac{\phi(q_t) \sum_s \phi(k_s)^\top v_s}{\phi(q_t) \sum_s \phi(k_s)^\top}.$$
#
# In matrices, $(\phi(Q)\phi(K)^\top)V$ builds a $T \times T$ matrix in $O(T^2 F)$ while
# $\phi(Q)(\phi(K)^\top V)$ costs $O(T F H_v)$. With causal masking the sum runs over
# $s \le t$, and the two sums are running sums:
#
# $$S_t = S_{t-1} + \phi(k_t)^\top v_t, \qquad z_t = z_{t-1} + \phi(k_t)^\top, \qquad
#   o_t = \frac{\phi(q_t)\, S_t}{\phi(q_t)\, z_t}.$$
#
# That is an RNN: its state $S_t \in \mathbb{R}^{F \times H_v}$, $z_t \in \mathbb{R}^F$ has
# the same size whatever $t$, so decoding a token costs $O(F H_v)$ and nothing grows. The
# same causal attention has three forms:
#
# - **parallel**: $O = \dfrac{(\phi(Q)\phi(K)^\top \odot M)\, V}{(\phi(Q)\phi(K)^\top \odot M)
#   \mathbf{1}}$ with $M$ the lower-triangular mask: quadratic, like softmax attention;
# - **recurrent**: the recurrence above, one token at a time: linear in $T$, but $T$
#   sequential matrix-vector steps;
# - **chunked**: blocks of $C$ tokens. With $\Phi_Q, \Phi_K, V$ the rows of block $i$ and
#   $S_{[i]}$ the state after the blocks before it,
#
#   $$O_i = \Phi_Q S_{[i]} + (\Phi_Q \Phi_K^\top \odot M_C)\, V, \qquad
#     S_{[i+1]} = S_{[i]} + \Phi_K^\top V$$
#
#   (the normaliser likewise, with a column of ones for $V$): the quadratic form inside a
#   block, the state carried between blocks; matrix-matrix products and only $T / C$
#   sequential steps. It is jattn's default.
#
# **Decays.** Retention and GLA drop the feature map and the normaliser (RetNet normalises
# each head's output afterwards) and let the state forget:
#
# $$S_t = \mathrm{diag}(a_t)\, S_{t-1} + k_t^\top v_t, \qquad o_t = q_t S_t.$$
#
# - Retention (RetNet, Sun et al. 2023): $a_t = \gamma_n \mathbf{1}$, one constant per head
#   $n = 0, \dots, N - 1$ (`jattn.retnet_decays(N)` $= 1 - 2^{-5 - 5n/N}$). Its parallel
#   form is $O = (Q K^\top \odot D)\, V$ with $D_{ts} = \gamma_n^{t-s}$ for $s \le t$, else 0.
# - Gated linear attention (GLA, Yang et al. 2024): $a_t = \alpha_t \in (0, 1]^F$, a decay
#   per key feature, computed from the input (a gate):
#   $o_t = \sum_{s \le t} \big(q_t \odot \prod_{r=s+1}^{t} \alpha_r\big)\, k_s^\top\, v_s$.
#
# In the chunked form the decay from $s$ to $t$ inside a block is $\exp(b_t - b_s)$, with $b$
# the cumulative sum of $\log \alpha$: at most 1, so it cannot overflow.

# %% [markdown]
# ## The three forms, by hand
#
# One head, `q, k [T, H]`, `v [T, H]`, with $T$ not a multiple of the chunk size. The library
# takes `[B, T, N, H]` and runs the same math per head (`implementation="parallel"`,
# `"chunked"` or `"recurrent"`); it adds $10^{-6}$ to the normaliser, and so does this code.
# All six results agree to float32 rounding (relative to the largest output), and so does
# the non-causal form computed both ways round.

# %%
EPS = 1e-6
T, H, C = (50, 16, 16) if SMALL else (300, 64, 64)
phi = jattn.elu_feature_map  # elu(x) + 1
q, k, v = (x[0, :, 0] for x in qkv(T, n=1, h=H))  # [T, H] each


def parallel_form(q, k, v):
    w = jnp.tril(phi(q) @ phi(k).T)  # [T, T]: causal kernel weights
    return (w @ v) / (w.sum(-1, keepdims=True) + EPS)


def recurrent_form(q, k, v):
    def step(carry, x):
        s, z = carry
        fq, fk, vt = x
        s, z = s + jnp.outer(fk, vt), z + fk  # S_t, z_t
        return (s, z), (fq @ s) / (fq @ z + EPS)

    init = (jnp.zeros((q.shape[1], v.shape[1])), jnp.zeros(q.shape[1]))
    _, out = lax.scan(step, init, (phi(q), phi(k), v))
    return out


def chunked_form(q, k, v, chunk):
    s, z, outs = jnp.zeros((q.shape[1], v.shape[1])), jnp.zeros(q.shape[1]), []
    for i in range(0, q.shape[0], chunk):
        fq, fk, vc = phi(q[i : i + chunk]), phi(k[i : i + chunk]), v[i : i + chunk]
        w = jnp.tril(fq @ fk.T)  # inside the block: quadratic in the chunk size
        num, den = fq @ s + w @ vc, fq @ z + w.sum(-1)  # + the blocks before, via the state
        outs.append(num / (den[:, None] + EPS))
        s, z = s + fk.T @ vc, z + fk.sum(0)
    return jnp.concatenate(outs)


@jax.jit  # one compiled program for all of them (op-by-op execution is slow on a CPU)
def every_form(q, k, v):
    out = {
        "parallel": parallel_form(q, k, v),
        "recurrent": recurrent_form(q, k, v),
        "chunked": chunked_form(q, k, v, C),
    }
    qb, kb, vb = (x[None, :, None] for x in (q, k, v))  # [B=1, T, N=1, H]
    for impl in ("parallel", "chunked", "recurrent"):
        out[f"jattn {impl}"] = jattn.linear_attention(
            qb, kb, vb, is_causal=True, implementation=impl, chunk_size=C
        )[0, :, 0]
    # non-causal: (phi(Q) phi(K)^T) V against phi(Q) (phi(K)^T V), and the library
    w = phi(q) @ phi(k).T
    out["non-causal quadratic"] = (w @ v) / (w.sum(-1, keepdims=True) + EPS)
    out["non-causal linear"] = (phi(q) @ (phi(k).T @ v)) / (phi(q) @ phi(k).sum(0) + EPS)[:, None]
    out["non-causal jattn"] = jattn.linear_attention(qb, kb, vb)[0, :, 0]
    return out


out = every_form(q, k, v)
causal = [name for name in out if not name.startswith("non-causal")]
worst = max(rel(out[a], out[b]) for a in causal for b in causal)
print(f"causal: {len(causal)} results, largest pairwise relative difference {worst:.1e}")
assert worst < 1e-5
want = out["non-causal quadratic"]
for name in ("non-causal linear", "non-causal jattn"):
    print(f"{name} vs quadratic: {rel(out[name], want):.1e}")
    assert rel(out[name], want) < 1e-5

# %% [markdown]
# ## Retention and GLA, by hand
#
# Retention's parallel form with the decay matrix $D_{ts} = \gamma_n^{t-s}$ (RetNet's decays
# for 4 heads; queries scaled by $H^{-1/2}$ as RetNet does), and GLA's recurrence with gates
# `log_sigmoid(g) / 16` from random `g` (the scale of `LinearAttention(kind="gla")`), against
# `jattn.retention` and `jattn.gated_linear_attention` in their default, chunked form (their
# three forms agree as those of linear attention do; `tests/test_linear.py` checks all of
# them against float64 NumPy recurrences).

# %%
N4 = 4
q, k, v = qkv(T, n=N4, h=H, seed=1)
q = q * H**-0.5
gamma = np.asarray(1 - 2.0 ** (-5 - 5 * np.arange(N4) / N4), np.float32)
assert np.allclose(jattn.retnet_decays(N4), gamma)
print("RetNet decays:", gamma)
gates = normal(q.shape, 2)  # log-decays: log_sigmoid(gates) / 16 < 0


def retention_parallel(q, k, v, gamma):  # [B, T, N, H], decays [N]
    dist = jnp.arange(q.shape[1])[:, None] - jnp.arange(q.shape[1])[None, :]  # t - s
    decay = jnp.where(dist >= 0, gamma[:, None, None] ** jnp.maximum(dist, 0), 0.0)  # D
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) * decay
    return jnp.einsum("bnts,bsnh->btnh", scores, v)


def gla_head(q, k, v, log_a):  # [T, H] each
    def step(s, x):
        qt, kt, vt, la = x
        s = jnp.exp(la)[:, None] * s + jnp.outer(kt, vt)  # forget per key feature
        return s, qt @ s

    return lax.scan(step, jnp.zeros((q.shape[1], v.shape[1])), (q, k, v, log_a))[1]


@jax.jit
def decayed(q, k, v, gamma, gates):
    log_gates = jax.nn.log_sigmoid(gates) / 16.0
    heads = jax.vmap(gla_head, in_axes=1, out_axes=1)  # over the heads of [T, N, H]
    out = {
        "retention": retention_parallel(q, k, v, gamma),
        "GLA": jax.vmap(heads)(q, k, v, log_gates),
    }
    out["jattn retention"] = jattn.retention(q, k, v, gamma)
    out["jattn GLA"] = jattn.gated_linear_attention(q, k, v, log_gates)
    return out


out = decayed(q, k, v, gamma, gates)
for name in ("retention", "GLA"):
    diff = rel(out[f"jattn {name}"], out[name])
    print(f"{name:9s}: by hand vs jattn, relative difference {diff:.1e}")
    assert diff < 1e-5

# %% [markdown]
# ## Prefill with the chunked form, decode with the recurrent one
#
# Every form takes an `initial_state` and, with `return_state=True`, returns the final
# `jattn.LinearState` (`kv [B, N, F, Hv]`, `k_sum [B, N, F]`). A prompt is processed in one
# chunked call; the following tokens are fed one at a time with `implementation="recurrent"`
# (one compiled step, whatever the position), each starting from the state the previous call
# returned. The outputs are those of the whole sequence in one call, and the state has the
# same size after the prompt as after the last token.

# %%
N = 2 if SMALL else 8
P, NEW = 40, 8
q, k, v = qkv(P + NEW, b=2, n=N, h=H, seed=3)


@jax.jit
def whole_and_prompt(q, k, v):
    whole = jattn.linear_attention(q, k, v, is_causal=True)
    prompt = jattn.linear_attention(q[:, :P], k[:, :P], v[:, :P], is_causal=True, return_state=True)
    return whole, prompt


@jax.jit
def decode_step(q, k, v, state):
    return jattn.linear_attention(
        q, k, v, is_causal=True, initial_state=state, return_state=True, implementation="recurrent"
    )


whole, (out, state) = whole_and_prompt(q, k, v)
print(f"state after the {P}-token prompt: kv {state.kv.shape}, k_sum {state.k_sum.shape}")
prompt_shapes = jax.tree.map(jnp.shape, state)
outs = [out]
for t in range(P, P + NEW):
    out, state = decode_step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], state)
    outs.append(out)
diff = rel(jnp.concatenate(outs, 1), whole)
print(f"prefill + {NEW} steps vs one call: relative difference {diff:.1e}")
assert diff < 1e-5
assert jax.tree.map(jnp.shape, state) == prompt_shapes == ((2, N, H, H), (2, N, H))
assert decode_step._cache_size() == 1  # compiled once for all the positions

# %% [markdown]
# The same goes through a model. A `DecoderLM` with `attention="gla"` has
# `LinearAttention(kind="gla")` layers (gates from a projection of the input); its
# `init_cache` gives one `LinearDecodeState` per layer (the state and the number of tokens
# seen), and `step` runs a multi-token prompt in the chunked form and single tokens in the
# recurrent one. The logits of a 16-token prefill followed by 8 single-token steps (a
# `lax.scan` over them) are the logits of the full forward pass. The cache has the same
# shapes for 4096 positions as for 64, where a softmax decoder's `KVCache` holds the keys
# and values of every position.

# %%
lm = DecoderLM(32, num_layers=2, features=32, num_heads=4, mlp_features=32, max_len=64,
               dropout_rate=0.0, attention="gla", rngs=nnx.Rngs(0))  # fmt: skip
tokens = jnp.asarray(np.random.default_rng(4).integers(3, 32, (2, 24)), jnp.int32)


@nnx.jit
def full_and_cached(lm, tokens):
    caches = lm.init_cache(tokens.shape[0], 64)
    prefill, caches = lm.step(tokens[:, :16], caches)  # chunked

    def one_token(caches, token):  # recurrent
        logits, caches = lm.step(token[:, None], caches)
        return caches, logits[:, 0]

    caches, steps = lax.scan(one_token, caches, tokens[:, 16:].T)
    return lm(tokens), jnp.concatenate([prefill, jnp.swapaxes(steps, 0, 1)], 1), caches


full, cached, caches = full_and_cached(lm, tokens)
print(type(caches[0]).__name__, jax.tree.map(jnp.shape, caches[0]))
print(f"cached logits vs full forward: relative difference {rel(cached, full):.1e}")
assert rel(cached, full) < 1e-5
assert caches[0].index.tolist() == [24, 24]
shapes = jax.tree.map(jnp.shape, lm.init_cache(2, 64))
assert jax.tree.map(jnp.shape, lm.init_cache(2, 4096)) == shapes

# %% [markdown]
# ## Time against sequence length
#
# Causal linear attention in its chunked form (elu+1 features, 64-token chunks) against exact
# causal softmax attention, `jattn.dot_product_attention(q, k, v, is_causal=True)` (which
# picks its own path, dense or blocked), forward pass only, B = 1, jitted, median of a few
# runs. The work of the chunked form grows as $T$, that of exact attention as $T^2$, so on a
# log-log plot their slopes should approach 1 and 2 as $T$ grows; the times are not checked
# here (they move with the machine and its load, and the test suite runs the small sizes on a
# CPU). `benchmarks/bench_linear.py` times the forward and backward pass: chunked linear
# against exact causal attention at T = 16384, chunked against the scan (recurrent) form,
# and the chunked form from 1k to 64k tokens; its recorded numbers are in `BENCHMARKS.md`.


# %%
def median_ms(fn, *args, repeats=3 if SMALL else 7):
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


lengths, N_T, H_T = ((128, 512), 2, 16) if SMALL else ((512, 1024, 2048, 4096), 8, 64)
fns = {
    "linear (chunked)": jax.jit(lambda q, k, v: jattn.linear_attention(q, k, v, is_causal=True)),
    "exact causal": jax.jit(lambda q, k, v: jattn.dot_product_attention(q, k, v, is_causal=True)),
}
timings = {name: [] for name in fns}
for t in lengths:
    q, k, v = qkv(t, n=N_T, h=H_T)
    for name, fn in fns.items():
        timings[name].append(median_ms(fn, q, k, v))
    print(f"T={t:5d}: " + ", ".join(f"{name} {ms[-1]:7.2f} ms" for name, ms in timings.items()))

fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
for (name, ms), marker in zip(timings.items(), "os", strict=True):
    slope = np.polyfit(np.log(lengths), np.log(ms), 1)[0]
    ax.loglog(lengths, ms, marker + "-", label=f"{name} (slope {slope:.2f})")
ax.set_xlabel("sequence length T")
ax.set_ylabel("forward time (ms)")
ax.set_title(f"causal attention, B=1, N={N_T}, H={H_T} ({jax.default_backend()})")
ax.legend()
plt.show()

# %% [markdown]
# ## How close are the approximations to softmax attention?
#
# Linear attention with elu+1 features is a different kernel, not an approximation of
# softmax. Other mechanisms in jattn are meant to approximate it:
#
# - **Performer** (FAVOR+, `jattn.performer_attention`): $M$ positive orthogonal random
#   features (`jattn.orthogonal_random_features`, `jattn.favor_features`) whose inner
#   products estimate $\exp(q k^\top / \sqrt{H})$ without bias; the estimate improves as $M$
#   grows.
# - **Linformer** (`jattn.linformer_attention`): keys and values projected along the
#   sequence to $k$ rows, $\mathrm{softmax}(Q (E K)^\top / \sqrt{H})\,(E V)$; here $E$ is
#   random Gaussian divided by $\sqrt{k}$ (in a model it is learned).
# - **Nystromformer** (`jattn.nystrom_attention`): landmarks (means of consecutive segments
#   of the queries and of the keys) and the pseudo-inverse of the landmark kernel, with the
#   paper's 6 iterations.
#
# Two kinds of input, non-causal, T = S, one example of each: **iid** unit-normal queries and
# keys, whose attention is spread over many keys (logits of standard deviation 1), and
# **peaked** ones, where each query is twice the sum of two random keys, so that most of
# its weight lies on those two. The trivial baseline is the mean of V, what uniform weights
# give every query. Errors are the mean and the largest absolute difference from exact
# softmax attention (the values are unit normal).
#
# Two facts hold exactly and are checked first: Linformer with the identity projection
# ($k = S$) is softmax attention, and so is Nystromformer with every token a landmark once
# the pseudo-inverse has converged (40 iterations), provided the landmark kernel is well
# conditioned: here each query is twice its own key, so the weights concentrate on the
# diagonal.

# %%
T_E, N_E, H_E = (128, 2, 32) if SMALL else (512, 4, 32)
BUDGETS = (8, 128) if SMALL else (8, 16, 32, 64, 128, 256, 512)  # M, k or landmarks
DRAWS = 4  # random draws averaged for Performer and Linformer
KINDS = ("iid", "peaked")
assert BUDGETS[-1] == T_E and T_E % H_E == 0


def peaked_inputs(t, *, n, h, sharp, seed):
    """Keys and values unit normal; each query ``sharp`` times the sum of two random keys."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((1, t, n, h), np.float32)
    a, b = rng.integers(0, t, (2, t))
    q = sharp * (k[:, a] + k[:, b])
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(rng.standard_normal(k.shape, np.float32))


# the two kinds of input as a batch of two examples: [2, T, N, H]
iid, peaked = qkv(T_E, n=N_E, h=H_E, seed=5), peaked_inputs(T_E, n=N_E, h=H_E, sharp=2.0, seed=6)
q, k, v = (jnp.concatenate(pair) for pair in zip(iid, peaked, strict=True))
k_ny, v_ny = normal((1, 32, N_E, H_E), 7), normal((1, 32, N_E, H_E), 8)  # the Nystrom check
E = normal((DRAWS, T_E, T_E), 101)  # Linformer projections, divided by sqrt(k) below


def abs_errors(approx, want):
    """``[examples, 2]``: the mean and the largest absolute error of each example."""
    diff = jnp.abs(approx - want).reshape(approx.shape[0], -1)
    return jnp.stack([diff.mean(-1), diff.max(-1)], -1)


def errors_at(q, k, v, want, w, e, m):
    """Errors of the three approximations with a budget of m (w, e: the draws)."""

    def performer(w):
        return abs_errors(jattn.performer_attention(q, k, v, w), want)

    def linformer(e):
        return abs_errors(jattn.linformer_attention(q, k, v, e / np.sqrt(m)), want)

    return {
        "Performer": jax.vmap(performer)(w).mean(0),
        "Linformer": jax.vmap(linformer)(e).mean(0),
        "Nystromformer": abs_errors(jattn.nystrom_attention(q, k, v, m), want),
    }


@jax.jit  # everything in one compiled program (the shapes change with the budget)
def approximations(q, k, v, k_ny, v_ny, key, e_all):
    want = jattn.dot_product_attention(q, k, v)
    q_ny = 2.0 * k_ny  # logit about 2 sqrt(H) on its own key, N(0, 4) on the others
    w_all = jattn.orthogonal_random_features(key, DRAWS * T_E, H_E).reshape(DRAWS, T_E, H_E)
    return {
        "softmax": want,
        "Linformer identity": jattn.linformer_attention(q, k, v, jnp.eye(T_E)),
        "Nystromformer all": jattn.nystrom_attention(q_ny, k_ny, v_ny, 32, pinv_iterations=40),
        "softmax ny": jattn.dot_product_attention(q_ny, k_ny, v_ny),
        "elu+1 linear": abs_errors(jattn.linear_attention(q, k, v), want),
        "mean of V": abs_errors(jnp.broadcast_to(v.mean(1, keepdims=True), v.shape), want),
        "features": w_all,
        "curves": [errors_at(q, k, v, want, w_all[:, :m], e_all[:, :m], m) for m in BUDGETS],
    }


res = jax.tree.map(np.asarray, approximations(q, k, v, k_ny, v_ny, jax.random.key(100), E))
logits = np.einsum("btnh,bsnh->bnts", np.asarray(q), np.asarray(k)) / np.sqrt(H_E)
weights = np.exp(logits - logits.max(-1, keepdims=True))
weights /= weights.sum(-1, keepdims=True)
top2 = np.sort(weights, axis=-1)[..., -2:].sum(-1).mean(axis=(1, 2))  # [kind]
for kind, share in zip(KINDS, top2, strict=True):
    print(f"{kind:6s} inputs: weight on each query's two largest keys, mean {share:.2f}")
assert top2[1] > 0.6 and top2[0] < 0.2
exact_linformer = rel(res["Linformer identity"], res["softmax"])
exact_nystrom = rel(res["Nystromformer all"], res["softmax ny"])
print(f"Linformer, E = identity:               relative difference {exact_linformer:.1e}")
print(f"Nystromformer, every token a landmark: relative difference {exact_nystrom:.1e}")
assert exact_linformer < 1e-5 and exact_nystrom < 1e-4

# %% [markdown]
# Now the error against the budget: $M$ random features, $k$ projected rows or that many
# landmarks, up to $T$. Performer and Linformer errors are averaged over 4 random draws from
# fixed seeds. The draws are made once, for the largest budget: orthogonal random features
# come in blocks of $H$ orthogonal rows, each row with an independent norm, so the first $m$
# rows of a draw are a draw of $m$ features (and the first $m$ rows of a Gaussian $E$ a
# Gaussian $E$ of $m$ rows). What the curves show (and the asserts below check):
#
# - On the iid inputs the mean of V is already close, and elu+1 linear attention is within
#   10% of it: its weights are nearly uniform. Performer's error is lower at the largest $M$
#   than at the smallest, but it falls slowly and stays above the baseline: the relative
#   variance of one FAVOR+ estimate of $\exp(q k^\top / \sqrt{H})$ is about
#   $(\exp(|q + k|^2 / \sqrt{H}) - 1) / M$ (Choromanski et al., Lemma 2), and for unit-normal
#   queries and keys of H = 32 the exponential is over 100 times the largest $M$ here.
#   Random, untrained Linformer projections stay above the baseline at every $k$ (more than
#   twice its error at $k = 8$). Nystromformer's error drops to a fraction of the
#   baseline's once every token is a landmark (not to zero: 6 iterations of the
#   pseudo-inverse).
# - On the peaked inputs no method below a budget of $T$ gets more than 10% under the mean of
#   V's error: the attention matrix is sparse and of high rank, and neither low rank nor a
#   few random features capture it.

# %%
block = res["features"][0, :H_E].astype(np.float64)  # the first block of the first draw
block /= np.linalg.norm(block, axis=1, keepdims=True)
assert np.allclose(block @ block.T, np.eye(H_E), atol=1e-5)  # orthogonal rows
base = {name: res[name] for name in ("elu+1 linear", "mean of V")}  # [kind, 2]
curves = {name: np.stack([c[name] for c in res["curves"]]) for name in res["curves"][0]}
for i, kind in enumerate(KINDS):  # curves: [budget, kind, (mean, max)]
    print(f"{kind} inputs, mean |error| at budgets {BUDGETS}:")
    for name, errs in curves.items():
        print(f"  {name:14s} " + " ".join(f"{e:6.3f}" for e in errs[:, i, 0]))
    for name in ("elu+1 linear", "mean of V"):
        print(f"  {name:14s} {float(base[name][i, 0]):6.3f}")

fig, axes = plt.subplots(2, 2, figsize=(11, 7), layout="constrained", sharex=True)
for i, kind in enumerate(KINDS):
    for j, stat in enumerate(("mean", "max")):
        ax = axes[j, i]
        for (name, errs), marker in zip(curves.items(), "os^", strict=True):
            ax.plot(BUDGETS, errs[:, i, j], marker + "-", label=name)
        for name, style in (("elu+1 linear", "--"), ("mean of V", ":")):
            ax.axhline(float(base[name][i, j]), color="k", linestyle=style, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{kind} inputs: {stat} |error|, T={T_E}, H={H_E}")
        ax.set_xlabel("features M / projected rows k / landmarks")
axes[0, 0].legend()
plt.show()

mean_v, elu = base["mean of V"][:, 0], base["elu+1 linear"][:, 0]  # [kind]
perf, nystrom = curves["Performer"][:, :, 0], curves["Nystromformer"][:, :, 0]  # [budget, kind]
linformer = curves["Linformer"][:, :, 0]
q_iid, k_iid = np.asarray(q[0], np.float64), np.asarray(k[0], np.float64)
growth = np.median(np.exp(np.sum((q_iid + k_iid) ** 2, -1) / np.sqrt(H_E)))
print(f"iid inputs: median exp(|q + k|^2 / sqrt(H)) = {growth:.0f}")
assert np.all(np.abs(elu - mean_v) < 0.1 * mean_v)  # elu+1: about the mean of V
assert np.all(perf[-1] < perf[0])  # more features, smaller error (both kinds)
assert np.all(perf[:, 0] > mean_v[0]) and growth > 100 * BUDGETS[-1]  # iid: above the baseline
assert np.all(linformer[:, 0] > mean_v[0]) and np.all(linformer[0] > 2 * mean_v)
assert np.all(nystrom[-1] < 0.25 * mean_v)  # every token a landmark
below_t = np.stack([errs[:-1, 1, 0] for errs in curves.values()])  # peaked, budgets < T
assert np.all(below_t > 0.9 * mean_v[1])
