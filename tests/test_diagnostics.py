"""Entropy, rollout and head importance against NumPy references and known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.diagnostics import (
    attention_entropy,
    attention_rollout,
    head_importance,
    head_importance_gradient,
    head_masked,
    masking_heads,
)
from jattn.layers import MultiHeadAttention

TOL = dict(rtol=1e-5, atol=1e-6)


def _weights(*shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(shape[-1]), size=shape[:-1]).astype(np.float32)


def _np_entropy(p, mask):
    p = np.where(mask, p.astype(np.float64), 0.0)
    out = np.zeros(p.shape[:-2])
    for idx in np.ndindex(*p.shape[:-2]):
        rows = [
            -sum(x * np.log(x) for x in row if x > 0)
            for row, m in zip(p[idx], mask[idx], strict=True)
            if m.any() and row.sum() > 0
        ]
        out[idx] = np.mean(rows) if rows else 0.0
    return out


def test_entropy_uniform_and_one_hot():
    s = 7
    uniform = jnp.full((2, 3, 4, s), 1 / s)
    np.testing.assert_allclose(attention_entropy(uniform), np.full((2, 3), np.log(s)), **TOL)
    one_hot = jax.nn.one_hot(jnp.array([[0, 3, 6, 2]]), s)[:, None]  # [1, 1, 4, S]
    np.testing.assert_array_equal(attention_entropy(one_hot), [[0.0]])
    assert attention_entropy(uniform).shape == (2, 3)


def test_entropy_with_mask_excludes_fully_masked_rows():
    w = _weights(2, 3, 5, 6)
    lengths = np.array([4, 6])
    mask = np.broadcast_to(
        (np.arange(6)[None, :] < lengths[:, None])[:, None, None, :], w.shape
    ).copy()
    mask[0, :, 3:, :] = False  # fully masked queries: excluded from the mean
    ours = attention_entropy(jnp.asarray(w), jnp.asarray(mask))
    np.testing.assert_allclose(ours, _np_entropy(w, mask), **TOL)
    none = attention_entropy(jnp.zeros((1, 2, 3)))  # no valid row at all: 0, not NaN
    np.testing.assert_array_equal(none, [0.0])


def _np_rollout(w, residual):
    w = w.astype(np.float64)
    out = np.broadcast_to(np.eye(w.shape[-1]), w.shape[1:-3] + w.shape[-2:]).copy()
    for layer in w:
        a = layer.mean(-3)
        if residual:
            a = a + np.eye(a.shape[-1])
            a = a / a.sum(-1, keepdims=True)
        out = np.einsum("bts,bsr->btr", a, out)
    return out


@pytest.mark.parametrize("residual", [True, False])
def test_rollout_matches_numpy_loop(residual):
    w = _weights(3, 2, 4, 5, 5)  # [L, B, N, T, T]
    ours = attention_rollout(jnp.asarray(w), residual=residual)
    np.testing.assert_allclose(ours, _np_rollout(w, residual), **TOL)
    np.testing.assert_allclose(ours.sum(-1), 1.0, **TOL)
    as_list = attention_rollout([jnp.asarray(x) for x in w], residual=residual)
    np.testing.assert_allclose(as_list, ours, **TOL)


def test_rollout_one_layer_with_residual_is_half_identity():
    w = _weights(1, 1, 2, 3, 3)
    ref = 0.5 * w[0, 0].mean(0) + 0.5 * np.eye(3)
    np.testing.assert_allclose(attention_rollout(jnp.asarray(w))[0], ref, **TOL)


def test_head_importance_on_a_known_loss():
    c = jnp.array([[0.5, -1.0, 2.0], [0.0, 3.0, 1.5]])

    def loss_fn(mask):  # masking head (l, n) changes the loss by -c[l, n] * (1 + mask[0, 0]) ...
        return jnp.sum(c * mask) + mask[0, 0] * mask[1, 1]

    ref = -c - jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    np.testing.assert_allclose(head_importance(loss_fn, (2, 3)), ref, **TOL)
    grad_ref = np.abs(c + jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    np.testing.assert_allclose(head_importance_gradient(loss_fn, (2, 3)), grad_ref, **TOL)


def test_head_masked_equals_zeroing_the_output_projection():
    layer = MultiHeadAttention(3, 6, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 4, 6))
    keep = jnp.array([1.0, 0.0, 1.0])
    forward = nnx.jit(lambda layer, x: layer(x, is_causal=True))
    layer.attention_fn = head_masked(keep)
    ours = forward(layer, x)
    layer.attention_fn = None
    ref_layer = MultiHeadAttention(3, 6, rngs=nnx.Rngs(0))
    kernel = ref_layer.out.kernel[...]  # [N, Hv, D]
    ref_layer.out.kernel[...] = kernel * keep[:, None, None]
    np.testing.assert_allclose(ours, forward(ref_layer, x), **TOL)


def test_head_importance_of_an_attention_stack():
    layers = [MultiHeadAttention(2, 4, rngs=nnx.Rngs(i)) for i in range(2)]
    x = jax.random.normal(jax.random.key(2), (1, 3, 4))

    def forward(inp):
        for layer in layers:
            inp = inp + layer(inp)
        return inp

    def loss_fn(head_mask):
        with masking_heads(layers, head_mask):
            return jnp.sum(jnp.square(forward(x)))

    scores = head_importance(loss_fn, (2, 2))
    base = loss_fn(jnp.ones((2, 2)))
    assert all(layer.attention_fn is None for layer in layers)  # restored
    # reference: drop head (1, 0) by zeroing its slice of layer 1's output projection
    saved = layers[1].out.kernel[...]
    layers[1].out.kernel[...] = saved.at[0].set(0.0)
    dropped = jnp.sum(jnp.square(forward(x)))
    layers[1].out.kernel[...] = saved
    np.testing.assert_allclose(scores[1, 0], dropped - base, rtol=1e-4, atol=1e-6)


def test_head_masks_reach_linear_attention_and_keep_rope_for_decoding():
    """Were silent: LinearAttention calls no attention function, so masking its heads
    changed nothing (importance 0); a head mask around a RotaryAttention hid RoPE from
    cached decoding (steps 0.49 off the whole sequence). A linear layer's heads are now
    scaled (equal to zeroing its output projection's slice), and a RoPE block decodes
    step by step as it runs whole under the mask."""
    from jattn.layers import LinearAttention
    from jattn.models import EncoderBlock

    x = jax.random.normal(jax.random.key(3), (1, 5, 6))
    keep = jnp.array([1.0, 0.0])
    for kind in ("linear", "gla"):
        layer = LinearAttention(2, 6, kind=kind, rngs=nnx.Rngs(0))
        with masking_heads([layer], keep[None]):
            ours = layer(x, is_causal=True)
        assert layer.attention_fn is None  # restored
        saved = layer.out.kernel[...]
        layer.out.kernel[...] = saved * keep[:, None, None]
        np.testing.assert_allclose(ours, layer(x, is_causal=True), err_msg=kind, **TOL)
        layer.out.kernel[...] = saved
    layer.attention_fn = lambda *a, **k: None
    with pytest.raises(TypeError, match="LinearAttention calls no attention_fn"):
        layer(x, is_causal=True)

    block = EncoderBlock(8, 2, 12, rotary=True, dropout_rate=0.0, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (1, 5, 8))  # even head size, for RoPE
    with masking_heads([block.self_attention], jnp.array([[1.0, 0.5]])):
        whole = block(x, is_causal=True)
        cache, steps = block.init_cache(1, 5), []
        for t in range(5):
            out, cache = block.step(x[:, t : t + 1], cache)
            steps.append(out)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), whole, rtol=1e-5, atol=1e-5)
    unmasked = block(x, is_causal=True)
    assert float(jnp.abs(unmasked - whole).max()) > 1e-3  # the mask did something


def test_errors():
    with pytest.raises(ValueError, match=r"weights must have shape \[..., N, T, S\], got \[3, 4\]"):
        attention_entropy(jnp.ones((3, 4)))
    with pytest.raises(TypeError, match="mask must be boolean"):
        attention_entropy(jnp.ones((1, 3, 4)), jnp.ones((3, 4)))
    with pytest.raises(ValueError, match=r"mask of shape \[5\] does not broadcast"):
        attention_entropy(jnp.ones((1, 3, 4)), jnp.ones(5, bool))
    with pytest.raises(ValueError, match=r"square in T\), got \[2, 1, 3, 4\]"):
        attention_rollout(jnp.ones((2, 1, 3, 4)))
    with pytest.raises(ValueError, match="every layer must have the same shape"):
        attention_rollout([jnp.ones((1, 3, 3)), jnp.ones((1, 4, 4))])
    with pytest.raises(ValueError, match="loss_fn must return a scalar, got shape \\[2\\]"):
        head_importance(lambda m: m[0], (2, 2))
    with pytest.raises(ValueError, match=r"head_mask has 2 entries for 3 heads"):
        layer = MultiHeadAttention(3, 6, attention_fn=head_masked(jnp.ones(2)), rngs=nnx.Rngs(0))
        layer(jnp.ones((1, 2, 6)))
    with pytest.raises(ValueError, match=r"head_mask must have shape \[L, N\] with L = 1"):
        with masking_heads([object()], jnp.ones((2, 2))):
            pass
