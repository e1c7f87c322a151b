"""Layers and models take mask_mod/score_mod (per layer, from code or config data) and
keep them in cached decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn import mods
from jattn.layers import MultiHeadAttention
from jattn.models import DecoderLM

WINDOW = {"name": "sliding_window", "window": [3, 0]}
T5 = {"name": "relative_position_bias", "num_buckets": 8, "max_distance": 16}


def test_layer_own_mods_equal_materialised_mask_and_bias_with_table_gradient():
    """A layer built with a window (config data) and a learned T5 score_mod gives what a
    plain layer with the same projections gives with the mask and the T5 bias
    materialised; the table's gradient agrees too."""
    x = jax.random.normal(jax.random.key(0), (2, 10, 16))
    own = MultiHeadAttention(4, 16, mask_mod=WINDOW, score_mod=T5, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(own, nnx.Param, ...)
    mask = mods.mask_grid(mods.sliding_window((3, 0)), 1, 4, 10, 10)

    def plain_twin(layer):  # no mods of its own, the same projections
        plain = MultiHeadAttention(4, 16, rngs=nnx.Rngs(1))
        plain.query, plain.key, plain.value, plain.out = (
            layer.query,
            layer.key,
            layer.value,
            layer.out,
        )
        return plain

    def loss(params, materialised):
        layer = nnx.merge(graphdef, params, rest)
        if materialised:
            out = plain_twin(layer)(x, mask=mask, bias=layer.score_mod(10, 10))
        else:
            out = layer(x)
        return jnp.sum(jnp.sin(out)), out

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, got), g_got = grad(params, False)
    (_, want), g_want = grad(params, True)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    g_got, g_want = (g["score_mod"]["embedding"]["embedding"][...] for g in (g_got, g_want))
    np.testing.assert_allclose(g_got, g_want, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(g_got))) > 0
    # a call's own mask_mod is combined with the layer's by logical and
    both = own(x, mask_mod=mods.causal(offset=-1))  # also hides the diagonal
    mask2 = mask & mods.mask_grid(mods.causal(offset=-1), 1, 4, 10, 10)
    want2 = plain_twin(own)(x, mask=mask2, bias=own.score_mod(10, 10))
    np.testing.assert_allclose(both, want2, rtol=0, atol=1e-6)


def test_decoder_lm_mixes_patterns_per_layer_and_decodes_with_them():
    """One window layer (config data) and one plain layer, ALiBi on both: the window
    hides old tokens from the window layer, and cached decoding (token by token) gives
    the logits of the full forward pass (the mods are seen from the cache positions)."""
    alibi = {"name": "alibi"}
    lm = DecoderLM(11, num_layers=2, features=16, num_heads=4, max_len=16, dropout_rate=0.0,
                   positional="none", mask_mod=[WINDOW, None], score_mod=alibi,
                   rngs=nnx.Rngs(0))  # fmt: skip
    assert lm.decoder.layers[1].self_attention.mask_mod is None
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 3, 11)
    full = lm(tokens)
    caches = lm.init_cache(2, 16)
    step = nnx.jit(lambda lm, tok, caches: lm.step(tok, caches))
    steps = []
    for t in range(9):
        logits, caches = step(lm, tokens[:, t : t + 1], caches)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=0, atol=2e-5)

    one = DecoderLM(11, num_layers=1, features=16, num_heads=4, max_len=16, dropout_rate=0.0,
                    positional="none", mask_mod=WINDOW, rngs=nnx.Rngs(0))  # fmt: skip
    changed = tokens.at[:, 0].set(3 + (tokens[:, 0] - 2) % 8)
    diff = jnp.max(jnp.abs(one(tokens) - one(changed)), axis=(0, 2))  # [T]
    assert float(jnp.max(diff[4:])) == 0.0  # query t sees keys t-3 .. t only
    assert float(jnp.min(diff[:4])) > 0.0


def test_patterns_from_a_training_config():
    """config.model.mask_mod / score_mod as data reach every layer through the trainer."""
    import pathlib

    from jattn.train import build_model, load_config, validate_config

    root = pathlib.Path(__file__).resolve().parents[1]
    config = load_config(root / "configs" / "dates.py", "small")
    config.model.positional = "none"
    config.model.mask_mod = {"name": "per_head", "mods": ["full", WINDOW]}
    config.model.score_mod = {"name": "alibi", "bidirectional": True}
    validate_config(config)
    model = build_model(config.model.to_dict(), src_vocab_size=13, tgt_vocab_size=13, seed=0)
    layer = model.encoder.layers[0].self_attention
    assert layer.mask_mod.name == "per_head" and layer.score_mod.name == "alibi"
    src = jnp.full((2, 6), 5, jnp.int32)
    assert model(src, src).shape == (2, 6, 13)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(mask_mod={"name": "slidng_window"}), ValueError, "unknown mask_mod pattern"),
        (dict(mask_mod={"name": "sliding_window"}), ValueError, "missing.*'window'"),
        (dict(mask_mod={"window": 3}), TypeError, "a dict with a 'name'"),
        (dict(score_mod="relu"), ValueError, "unknown score_mod pattern 'relu'"),
        (dict(score_mod={"name": "softcap", "cap": 1.0, "x": 1}), ValueError, "softcap"),
        (dict(mask_mod=[WINDOW]), ValueError, "mask_mod has 1 entries, one per layer"),
        # each was truncated (seed 1.7 as 1), read letter by letter ('causal' as 'c', ...),
        # accepted until the first call (no mods) or an error from inside Python
        *[
            (
                dict(mask_mod={"name": "bigbird", "seed": seed, "length": 8, "block": 2}),
                ValueError,
                r"mask_mod pattern 'bigbird': seed must be an int in \[0, 2\*\*32\)",
            )
            for seed in (1.7, "abc", 2**70)
        ],
        (dict(mask_mod={"name": ["causal"]}), TypeError, r"name must be a str, got \['causal'\]"),
        (
            dict(mask_mod={"name": "per_head", "mods": "causal"}),
            ValueError,
            "'mods' must be a non-empty list of patterns, got 'causal'",
        ),
        (dict(mask_mod={"name": "and", "mods": []}), ValueError, "a non-empty list"),
        (dict(score_mod={"name": "chain", "mods": []}), ValueError, "a non-empty list"),
    ],
)
def test_pattern_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        DecoderLM(11, num_layers=2, features=16, num_heads=4, rngs=nnx.Rngs(0), **kwargs)


def test_cached_cross_attention_with_mods_needs_positions():
    from jattn.models.decoding import cached_cross_attention, cross_attention_kv

    mha = MultiHeadAttention(2, 8, mask_mod=jattn.mods.causal(), rngs=nnx.Rngs(0))
    memory = jnp.ones((1, 5, 8))
    with pytest.raises(ValueError, match="has a mask_mod/score_mod; pass positions"):
        cached_cross_attention(mha, jnp.ones((1, 1, 8)), cross_attention_kv(mha, memory), None)
