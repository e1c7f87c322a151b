"""Mask builders vs masks hand-computed with NumPy loops (True = attend)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn


def _loop_mask(t, s, visible):
    return np.array([[visible(i, j) for j in range(s)] for i in range(t)], bool)


def test_sequence_mask():
    got = jattn.sequence_mask(jnp.array([[0, 2], [3, 1]]), 3)
    want = np.array([[[0, 0, 0], [1, 1, 0]], [[1, 1, 1], [1, 0, 0]]], bool)
    np.testing.assert_array_equal(got, want)


def test_valid_lens_mask_per_example():
    got = jattn.valid_lens_mask(jnp.array([2, 0, 4]), 3, 4)
    assert got.shape == (3, 3, 4)
    for b, n in enumerate([2, 0, 4]):
        np.testing.assert_array_equal(got[b], _loop_mask(3, 4, lambda i, j, n=n: j < n))


def test_valid_lens_mask_per_query():
    lens = np.array([[1, 2, 3], [4, 0, 2]])
    got = jattn.valid_lens_mask(jnp.asarray(lens), 3, 4)
    want = np.array([_loop_mask(3, 4, lambda i, j, b=b: j < lens[b, i]) for b in range(2)])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("t,s", [(4, 4), (3, 5), (5, 3)])
def test_causal_mask_top_left(t, s):
    np.testing.assert_array_equal(jattn.causal_mask(t, s), _loop_mask(t, s, lambda i, j: j <= i))
    # Same convention as jax.nn's is_causal (jnp.tril of a [T, S] matrix).
    np.testing.assert_array_equal(jattn.causal_mask(t, s), np.tril(np.ones((t, s), bool)))


def test_causal_mask_cache_offset():
    t, s = 2, 5  # the queries are the last 2 of 5 positions
    got = jattn.causal_mask(t, s, offset=s - t)
    np.testing.assert_array_equal(got, _loop_mask(t, s, lambda i, j: j <= i + s - t))
    assert got[-1].all()  # the last query sees every key


def test_causal_mask_traced_per_example_offset():
    offsets = jnp.array([0, 2, 3])
    got = jax.jit(lambda o: jattn.causal_mask(2, 5, offset=o))(offsets)
    assert got.shape == (3, 2, 5)
    for b, o in enumerate([0, 2, 3]):
        np.testing.assert_array_equal(got[b], _loop_mask(2, 5, lambda i, j, o=o: j <= i + o))


@pytest.mark.parametrize("window", [1, (1, 1), (2, 0), (0, 2), (1, 3)])
@pytest.mark.parametrize("t,s", [(5, 5), (3, 6)])
def test_sliding_window_mask(t, s, window):
    left, right = (window, window) if isinstance(window, int) else window
    got = jattn.sliding_window_mask(t, s, window)
    np.testing.assert_array_equal(got, _loop_mask(t, s, lambda i, j: i - left <= j <= i + right))


def test_sliding_window_mask_traced_offset():
    offsets = jnp.array([0, 3])
    got = jax.jit(lambda o: jattn.sliding_window_mask(2, 6, (2, 0), offset=o))(offsets)
    for b, o in enumerate([0, 3]):
        want = _loop_mask(2, 6, lambda i, j, o=o: i + o - 2 <= j <= i + o)
        np.testing.assert_array_equal(got[b], want)


def test_key_padding_mask():
    valid = np.array([[1, 1, 0], [1, 0, 0]], bool)
    got = jattn.key_padding_mask(jnp.asarray(valid))
    assert got.shape == (2, 1, 1, 3) and got.dtype == jnp.bool_
    np.testing.assert_array_equal(got[:, 0, 0], valid)


def test_combine_masks():
    rng = np.random.default_rng(0)
    a = rng.random((2, 1, 3, 4)) < 0.5
    b = rng.random((3, 4)) < 0.5
    c = rng.random((2, 1, 1, 4)) < 0.5
    got = jattn.combine_masks(a, None, b, c)
    assert got.shape == (2, 1, 3, 4)
    np.testing.assert_array_equal(got, a & b[None, None] & c)
    assert jattn.combine_masks(None, None) is None
    np.testing.assert_array_equal(jattn.combine_masks(b), b)


def test_masks_combine_with_causal_and_padding():
    """A decoder self-attention mask: causal AND key padding, checked entry by entry."""
    valid = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    got = jattn.combine_masks(jattn.causal_mask(4, 4), jattn.key_padding_mask(jnp.asarray(valid)))
    for b in range(2):
        np.testing.assert_array_equal(
            got[b, 0], _loop_mask(4, 4, lambda i, j, b=b: j <= i and valid[b, j])
        )
