"""Masks and score modifiers as functions (jattn.mods), block masks, and every path on them.

Each pattern's mask is checked against an independent NumPy construction; the dense
and blocked paths with a mask_mod/score_mod are checked against jax.nn with the mask
(or bias) materialised, outputs and gradients, including fully masked rows, T != S
and lengths that are not a multiple of the block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import mods
from jattn.functional import blocked, dispatch

B, T, S, N, H = 2, 45, 70, 8, 8
BLOCKS = (16, 16)
COT = jnp.cos(jnp.arange(H, dtype=jnp.float32)).reshape(1, 1, 1, H)


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _grid(mod, b=B, n=N, t=T, s=S):
    return np.asarray(jnp.broadcast_to(mods.mask_grid(mod, b, n, t, s), (b, n, t, s)))


def _np_index(t=T, s=S):
    return np.arange(t)[:, None], np.arange(s)[None, :]


IDS = np.array([[0] * 20 + [1] * 30 + [2] * 20, [0] * 5 + [1] * 65])


@pytest.mark.parametrize(
    "name, mod, want",
    [
        ("causal", mods.causal(), lambda q, k: k <= q),
        ("causal+offset", mods.causal(S - T), lambda q, k: k <= q + S - T),
        ("window", mods.sliding_window((5, 2)), lambda q, k: (k >= q - 5) & (k <= q + 2)),
        ("prefix", mods.prefix_lm(7), lambda q, k: (k <= q) | (k < 7)),
        ("strided", mods.strided(4), lambda q, k: (q - k) % 4 == 0),
        (
            "dilated",
            mods.dilated((3, 1), 2),
            lambda q, k: ((q - k) % 2 == 0) & (q - k <= 6) & (k - q <= 2),
        ),
        ("fixed", mods.fixed(8, 2), lambda q, k: (q // 8 == k // 8) | (k % 8 >= 6)),
        (
            "longformer",
            mods.longformer(3, [0, 40], S),
            lambda q, k: (abs(q - k) <= 3) | np.isin(q, [0, 40]) | np.isin(k, [0, 40]),
        ),
        ("not", mods.not_mask(mods.causal()), lambda q, k: k > q),
        (
            "or",
            mods.or_masks(mods.strided(5), mods.causal()),
            lambda q, k: ((q - k) % 5 == 0) | (k <= q),
        ),
        ("offset", mods.offset(mods.causal(), q_offset=10), lambda q, k: k <= q + 10),
    ],
)
def test_patterns_match_numpy(name, mod, want):
    q, k = _np_index()
    np.testing.assert_array_equal(_grid(mod, 1, 1)[0, 0], np.broadcast_to(want(q, k), (T, S)))


def test_patterns_per_example_and_head():
    q, k = _np_index()
    seg = _grid(mods.segments(IDS[:, :T], IDS))
    for b in range(B):
        np.testing.assert_array_equal(seg[b, 0], IDS[b, :T][:, None] == IDS[b][None, :])
    prefix = _grid(mods.prefix_lm(jnp.array([3, 9])))
    np.testing.assert_array_equal(prefix[1, 0], (k <= q) | (k < 9))
    heads = _grid(mods.per_head([mods.causal(), mods.strided(3)]))
    np.testing.assert_array_equal(heads[0, 2], np.broadcast_to(k <= q, (T, S)))
    np.testing.assert_array_equal(heads[0, 5], (q - k) % 3 == 0)
    lens = _grid(mods.lengths(jnp.array([T, 10]), jnp.array([30, S])))
    np.testing.assert_array_equal(lens[0], np.broadcast_to(k < 30, (N, T, S)))
    np.testing.assert_array_equal(lens[1], np.broadcast_to(q < 10, (N, T, S)))
    cache = _grid(mods.offset(mods.causal(), q_offset=jnp.array([0, 20])))
    np.testing.assert_array_equal(cache[1, 0], k <= q + 20)


def test_bigbird_pattern_and_seed():
    key = jax.random.key(3)
    mod = mods.bigbird(key, S, 10, window_blocks=3, num_global_blocks=1, num_random_blocks=2)
    m = _grid(mod, 1, 1, S, S)[0, 0]
    blocks = m.reshape(7, 10, 7, 10)[:, 0, :, 0]  # the pattern is constant on 10x10 blocks
    np.testing.assert_array_equal(m, np.kron(blocks, np.ones((10, 10), bool)))
    qb, kb = np.arange(7)[:, None], np.arange(7)[None, :]
    assert np.all(blocks[(abs(qb - kb) <= 1) | (qb == 0) | (kb == 0)])
    extra = blocks & ~((abs(qb - kb) <= 1) | (qb == 0) | (kb == 0))
    assert 0 < extra.sum() <= 2 * 7  # the random blocks: at most 2 per row beyond the rest
    again = _grid(mods.bigbird(key, S, 10), 1, 1, S, S)
    np.testing.assert_array_equal(m, again[0, 0])  # same key, same pattern


def _plain(b, n, q, kv):  # a plain function (module level: an eager call compiles it once)
    return (q * 7 + kv * 3 + b) % 4 == 0


# Every pattern, one per head, through both paths (one compilation of each).
PER_HEAD = mods.per_head(
    [
        mods.and_masks(mods.causal(S - T), mods.segments(IDS[:, S - T :], IDS)),
        mods.bigbird(jax.random.key(0), S, 16),
        mods.and_masks(mods.causal(S - T), mods.strided(3)),
        mods.fixed(16, 3),
        mods.longformer((4, 9), [0, 33], S),
        mods.dilated(6, 2),
        mods.prefix_lm(jnp.array([12, 0])),
        _plain,
    ]
)


def _loss(path, q, k, v, **kw):
    out = jattn.dot_product_attention(q, k, v, implementation=path, **kw)
    return jnp.sum(out * COT), out


@functools.partial(jax.jit, static_argnames=("path", "fully_masked"))
def _per_head_run(q, k, v, kv_len, *, path, fully_masked):
    kw = dict(mask_mod=PER_HEAD, key_value_seq_lengths=kv_len, fully_masked=fully_masked)
    if path == "blocked":
        return jax.value_and_grad(
            lambda q, k, v: _loss_blocked(q, k, v, **kw), (0, 1, 2), has_aux=True
        )(q, k, v)
    mask = mods.mask_grid(mods.and_masks(PER_HEAD, mods.lengths(None, kv_len)), B, N, T, S)
    return jax.value_and_grad(
        lambda q, k, v: _loss_ref(q, k, v, mask, fully_masked), (0, 1, 2), has_aux=True
    )(q, k, v)


def _loss_blocked(q, k, v, **kw):
    out = blocked.blocked_attention(q, k, v, block_sizes=BLOCKS, **kw)
    return jnp.sum(out * COT), out


def _loss_ref(q, k, v, mask, fully_masked):
    if fully_masked == "uniform":  # jax.nn's own rule for rows without a key
        out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    else:
        out = jattn.dot_product_attention(q, k, v, mask=mask, implementation="dense")
    return jnp.sum(out * COT), out


@pytest.mark.parametrize("fully_masked", ["zeros", "uniform"])
def test_every_pattern_blocked_equals_reference(fully_masked):
    """T != S, lengths off the block grid, rows with no key (kv_len 0, prefix 0 heads)."""
    q, k, v = _normal(0, (B, T, N, H)), _normal(1, (B, S, N, H)), _normal(2, (B, S, N, H))
    kv_len = jnp.array([S - 3, 0], jnp.int32)
    (_, out), grads = _per_head_run(q, k, v, kv_len, path="blocked", fully_masked=fully_masked)
    (_, want), want_grads = _per_head_run(q, k, v, kv_len, path="ref", fully_masked=fully_masked)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)
    for a, b in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert np.abs(np.asarray(out)).max() > 0.1  # not all rows empty


def test_dense_path_mask_mod_equals_jax_nn():
    q, k, v = _normal(3, (B, T, N, H)), _normal(4, (B, S, N, H)), _normal(5, (B, S, N, H))
    out = jattn.dot_product_attention(q, k, v, mask_mod=PER_HEAD, fully_masked="uniform")
    want = jax.nn.dot_product_attention(q, k, v, mask=mods.mask_grid(PER_HEAD, B, N, T, S))
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)


def _t5_table():
    return _normal(6, (32, N)) * 0.5


SCORE_MODS = {
    "alibi": lambda table: mods.alibi(jattn.alibi_slopes(N)),
    "t5": lambda table: mods.relative_position_bias(table, bidirectional=False),
    "softcap+alibi": lambda table: mods.chain_scores(
        mods.alibi(jattn.alibi_slopes(N)), mods.softcap(2.0)
    ),
}


def _score_bias(name, table, t=T, s=S):
    """The score modification as a dense [N, T, S] function of the logits (NumPy-free:
    jax ops on the materialised positions, a reference independent of the mods)."""
    q, k = jnp.arange(t)[None, :, None], jnp.arange(s)[None, None, :]  # positions as given
    slopes = jattn.alibi_slopes(N)[:, None, None]
    if name == "t5":
        buckets = jattn.relative_position_buckets(k - q, bidirectional=False)[0]
        bias = jnp.moveaxis(table[buckets], -1, 0)
        return lambda x: x + bias
    if name == "alibi":
        return lambda x: x + slopes * (k - q)
    return lambda x: 2.0 * jnp.tanh((x + slopes * (k - q)) / 2.0)


@pytest.mark.parametrize("name", list(SCORE_MODS))
def test_score_mods_all_paths_with_gradients(name):
    """score_mod (with a causal offset mask_mod: queries are the last T keys) on the
    dense and blocked paths against dense logits modified by hand; gradients wrt q, k,
    v and the T5 table."""
    q, k, v = _normal(7, (B, T, N, H)), _normal(8, (B, S, N, H)), _normal(9, (B, S, N, H))
    table = _t5_table()
    scale = 1 / np.sqrt(H)

    def loss(path, q, k, v, table):
        kw = dict(mask_mod=mods.causal(S - T), score_mod=SCORE_MODS[name](table))
        if path == "blocked":
            out = blocked.blocked_attention(q, k, v, block_sizes=BLOCKS, **kw)
        elif path == "dense":
            out = jattn.dot_product_attention(q, k, v, implementation="dense", **kw)
        else:
            logits = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
            logits = (
                _score_bias(name, table)(logits[0])[None]
                if B == 1
                else jnp.stack([_score_bias(name, table)(x) for x in logits])
            )
            mask = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + (S - T)
            mask = mask[None, None]
            w = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
            out = jnp.einsum("bnts,bsnh->btnh", w, v)
        return jnp.sum(jnp.sin(out)), out

    run = jax.jit(jax.value_and_grad(loss, (1, 2, 3, 4), has_aux=True), static_argnums=0)
    (_, want), want_g = run("ref", q, k, v, table)
    for path in ("dense", "blocked"):
        (_, got), got_g = run(path, q, k, v, table)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        for a, b in zip(got_g[:3], want_g[:3], strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        # each table entry sums ~B*T*S/32 = 200 terms of size up to ~20: float32 sums
        np.testing.assert_allclose(got_g[3], want_g[3], rtol=2e-6, atol=1e-5)
    if name == "t5":
        assert np.abs(np.asarray(want_g[3])).max() > 1e-3  # the table learns


def test_block_mask_tables_and_reuse(monkeypatch):
    """A precomputed block mask: its map and tables, reuse under jit (no recompile for
    new segment ids), and the blocked path visits exactly its non-empty tiles."""
    t = s = 64
    mod = mods.and_masks(mods.causal(), mods.sliding_window((16, 0)))
    bm = jattn.block_mask(mod, t, s, (16, 16))
    kinds = np.asarray(bm.block_map[0, 0])
    qb, kb = np.arange(4)[:, None], np.arange(4)[None, :]
    np.testing.assert_array_equal(kinds, np.where(qb == kb, 1, np.where(qb == kb + 1, 1, 0)))
    assert float(bm.density()) == 7 / 16
    for i in range(4):  # partial blocks first, then full ones
        row = np.asarray(bm.kv_indices[i, : int(bm.kv_num_partial[i])])
        assert sorted(row.tolist()) == np.flatnonzero(kinds[i] == 1).tolist()

    full = jattn.block_mask(mods.causal(), t, s, (16, 16))
    np.testing.assert_array_equal(
        np.asarray(full.block_map[0, 0]), np.where(qb == kb, 1, np.where(qb > kb, 2, 0))
    )
    q, k, v = (_normal(i, (1, t, 2, 8)) for i in (10, 11, 12))
    calls = []
    original = blocked._logits

    def counting(*a, **kw):
        jax.debug.callback(lambda: calls.append(1))
        return original(*a, **kw)

    monkeypatch.setattr(blocked, "_logits", counting)
    out = jax.block_until_ready(jattn.blocked_attention(q, k, v, block_mask=bm))
    assert len(calls) == 7  # the visited tiles, not 16
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(16, 0))
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)

    traces = []

    @jax.jit
    def step(q, bm):
        traces.append(1)
        return jattn.dot_product_attention(q, k, v, block_mask=bm, implementation="blocked")

    for seed in range(2):  # new segment ids each step: the same compiled step
        ids = jnp.asarray(np.sort(np.random.default_rng(seed).integers(0, 3, (1, t))))
        seg = jattn.block_mask(mods.segments(ids), t, s, (16, 16))
        got = step(q, seg)
        want = jax.nn.dot_product_attention(
            q, k, v, mask=mods.mask_grid(mods.segments(ids), 1, 1, t, s)
        )
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert len(traces) == 1
    # a plain function inside a combinator: the block mask is still a pytree for jit
    plain = mods.and_masks(mods.causal(), lambda b, n, i, j: (i + j) % 3 != 1)
    got = step(q, jattn.block_mask(plain, t, s, (16, 16)))
    want = jax.nn.dot_product_attention(q, k, v, mask=mods.mask_grid(plain, 1, 1, t, s))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_selection_and_errors():
    q = jnp.ones((1, 16, 2, 8))
    spec = jax.ShapeDtypeStruct((1, 1024, 8, 64), jnp.bfloat16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dispatch, "_platform", lambda: "gpu")
        assert dispatch.select(None, spec, spec, spec) == "cudnn"
        assert dispatch.select(None, spec, spec, spec, mask_mod=mods.causal()) == "dense"
        with pytest.raises(ValueError, match="mask_mod .the cuDNN kernel cannot evaluate"):
            dispatch.select("cudnn", spec, spec, spec, mask_mod=mods.causal())
    with pytest.raises(TypeError, match="mask_mod must be a function"):
        jattn.dot_product_attention(q, q, q, mask_mod=np.ones((16, 16), bool))
    with pytest.raises(TypeError, match="mask_mod must return booleans"):
        jattn.dot_product_attention(q, q, q, mask_mod=lambda b, n, i, j: (i - j) * 1.0)
    with pytest.raises(ValueError, match="must be elementwise"):
        jattn.dot_product_attention(q, q, q, score_mod=lambda x, b, n, i, j: x[..., None])
    bm = jattn.block_mask(mods.causal(), 32, 32, (16, 16))
    with pytest.raises(ValueError, match=r"built for \(T, S\) = \(32, 32\).*\(16, 16\)"):
        jattn.dot_product_attention(q, q, q, block_mask=bm)
    bm = jattn.block_mask(mods.causal(), 16, 16, (8, 8))
    with pytest.raises(ValueError, match="mask_mod and block_mask.mask_mod differ"):
        jattn.dot_product_attention(q, q, q, block_mask=bm, mask_mod=mods.strided(2))
    with pytest.raises(ValueError, match=r"block_sizes=\(4, 4\) differ from the block mask's"):
        jattn.blocked_attention(q, q, q, block_mask=bm, block_sizes=(4, 4))
    with pytest.raises(TypeError, match="block_mask must be a jattn.BlockMask"):
        jattn.dot_product_attention(q, q, q, block_mask=np.ones((2, 2)))
    with pytest.raises(ValueError, match="stride must be a positive int"):
        mods.strided(0)
    with pytest.raises(ValueError, match="global positions must lie in"):
        mods.global_tokens([5, 99], 16)
    with pytest.raises(TypeError, match="q_segment_ids must be an int array"):
        mods.segments(jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="table must be a float"):
        mods.relative_position_bias(jnp.ones((32,)))
    with pytest.raises(ValueError, match="cap must be a positive number"):
        mods.softcap(0.0)


def test_layer_passes_mods_down():
    """MultiHeadAttention takes mask_mod/score_mod and gives what the materialised mask
    and bias give (per-head patterns mixed in one layer)."""
    from flax import nnx

    from jattn.layers import MultiHeadAttention

    mha = MultiHeadAttention(num_heads=4, in_features=16, rngs=nnx.Rngs(0))
    x = _normal(13, (2, 24, 16))
    pattern = mods.per_head([mods.causal(), mods.sliding_window((3, 3))])
    slopes = jattn.alibi_slopes(4)
    got = mha(x, mask_mod=pattern, score_mod=mods.alibi(slopes))
    want = mha(x, mask=mods.mask_grid(pattern, 1, 4, 24, 24), bias=jattn.alibi_bias(slopes, 24, 24))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_a_block_mask_reaches_layers_with_a_score_module():
    """A layer with an additive score passed block_mask to jattn.attention, which did not
    take it (a TypeError); its mask_mod now applies there as on the dot-product paths."""
    from flax import nnx

    from jattn.layers import AdditiveScore, MultiHeadAttention

    rngs = nnx.Rngs(0)
    mha = MultiHeadAttention(2, 8, score=AdditiveScore(2, 4, 4, 6, rngs=rngs), rngs=rngs)
    x = _normal(14, (2, 5, 8))
    bm = jattn.block_mask(mods.causal(), 5, 5, (4, 4))
    got = mha(x, block_mask=bm)
    np.testing.assert_array_equal(got, mha(x, mask=np.tril(np.ones((5, 5), bool))))
    assert not np.allclose(got, mha(x))


def test_block_sizes_chosen_from_the_pattern(monkeypatch):
    """block_mask(block_sizes=None) picks small tiles for a narrow window and large ones
    for a wide pattern, its map equals the mask evaluated at the chosen size directly
    (T, S not multiples of the tiles), eagerly and under jit; a mask_mod holding data
    keeps the default; the blocked path takes the chosen tiles and stays exact."""
    from jattn.functional import tiles
    from jattn.functional.mods import _kinds_jit

    narrow = mods.sliding_window((8, 8))
    wide = mods.or_masks(mods.causal(), mods.strided(5))
    t, s = 1030, 1100  # S > T: every query sees keys (jax.nn averages empty rows)
    for mod, small in ((narrow, True), (wide, False)):
        bm = jattn.block_mask(mod, t, s)
        assert bm.block_sizes in tiles.CANDIDATES
        assert (max(bm.block_sizes) <= 64) == small, bm.block_sizes
        direct = _kinds_jit(mods.as_mod(mod), 1, 1, t, s, *bm.block_sizes)
        np.testing.assert_array_equal(np.asarray(bm.block_map), np.asarray(direct))
        jitted = jax.jit(lambda mod=mod: jattn.block_mask(mod, t, s))()
        assert jitted.block_sizes == bm.block_sizes
    ids = jnp.zeros((1, t), jnp.int32)
    assert jattn.block_mask(mods.segments(ids), t, t).block_sizes == (512, 256)
    chosen = jattn.block_mask(mods.segments(ids), t, t, "auto").block_sizes  # one segment:
    assert chosen in tiles.CANDIDATES and tiles.TILE_COST[chosen] == 1.0  # dense, large tiles
    with pytest.raises(ValueError, match="pair of positive ints, None or 'auto'"):
        jattn.block_mask(narrow, t, t, "fast")
    assert jattn.block_mask(narrow, 1000, 1000).block_sizes == (512, 256)  # short

    q = _normal(30, (1, t, 2, 8))
    k, v = (_normal(i, (1, s, 2, 8)) for i in (31, 32))
    built, original = [], mods._block_mask
    monkeypatch.setattr(mods, "_block_mask", lambda *a: built.append(a[3]) or original(*a))
    chosen = jattn.block_mask(narrow, t, s).block_sizes
    built.clear()
    got = jattn.blocked_attention(q, k, v, mask_mod=narrow)
    assert built == [chosen]
    want = jax.nn.dot_product_attention(q, k, v, mask=mods.mask_grid(narrow, 1, 1, t, s))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    got = jattn.blocked_attention(q, k, v, local_window_size=(8, 8))  # the geometric path
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    from jattn.functional.blocked import default_block_sizes

    assert default_block_sizes(t, s, 8, masked_band=True, window=(8, 8)) == (32, 32)
