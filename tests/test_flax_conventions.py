"""Flax NNX conventions: train()/eval() switch dropout in every jattn layer and model,
``jattn.layers.flax_attention_fn`` as the attention_fn of ``flax.nnx.MultiHeadAttention``,
and Flax's autoregressive cache API on ``jattn.layers.MultiHeadAttention``.

Every comparison is against ``flax.nnx.MultiHeadAttention`` (its default
``dot_product_attention``) with the same weights, or against jattn's own full forward.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn.layers
import jattn.models
from jattn import mods
from jattn.layers import (
    AdditiveAttention,
    DotProductAttention,
    MultiHeadAttention,
    flax_attention_fn,
)
from jattn.models import (
    BahdanauSeq2Seq,
    DecoderLM,
    EncoderClassifier,
    RotaryAttention,
    Transformer,
    cached_self_attention,
    init_cache,
)

B, L, D = 2, 6, 16
TOL = dict(rtol=1e-6, atol=1e-6)  # float32, two orders of summation


def _x(seed, shape=(B, L, D)):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _build(build):
    """``build()`` without compiling its initializers (``nnx.eval_shape``, then NumPy
    weights and fresh keys): these tests are about modes, not initialization."""
    graphdef, state = nnx.split(nnx.eval_shape(build))
    rng = np.random.default_rng(0)

    def fill(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(int(rng.integers(2**31)))
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return np.zeros(x.shape, x.dtype)  # stream counts
        return (0.3 * rng.standard_normal(x.shape)).astype(x.dtype)

    return nnx.merge(graphdef, jax.tree.map(fill, state))


def _flax_pair(**kw):
    """``flax.nnx.MultiHeadAttention`` with its default attention_fn, and the same layer
    (same weights, copied) with ``flax_attention_fn``."""
    kw.setdefault("decode", False)
    theirs = _build(lambda: nnx.MultiHeadAttention(4, D, rngs=nnx.Rngs(0), **kw))
    ours = _build(
        lambda: nnx.MultiHeadAttention(4, D, attention_fn=flax_attention_fn, rngs=nnx.Rngs(1), **kw)
    )
    nnx.update(ours, nnx.state(theirs, nnx.Param))
    return theirs, ours


def _jattn_like(flax_layer, **kw):
    """A ``jattn.layers.MultiHeadAttention`` with ``flax_layer``'s weights (the layouts
    match one to one)."""
    layer = _build(
        lambda: MultiHeadAttention(
            flax_layer.num_heads, D, num_kv_heads=flax_layer.num_kv_heads, rngs=nnx.Rngs(2), **kw
        )
    )
    nnx.update(layer, nnx.state(flax_layer, nnx.Param))
    return layer


def _deterministic_flags(model):
    return {
        path: m.deterministic for path, m in nnx.iter_modules(model) if hasattr(m, "deterministic")
    }


# ---------------------------------------------------------------- 2. flax_attention_fn


def test_flax_attention_fn_is_exported():
    assert jattn.layers.flax_attention_fn is flax_attention_fn
    assert "flax_attention_fn" in jattn.layers.__all__


# One jitted call for every layer and option (compiled once per layer and options).
_apply = nnx.jit(
    lambda m, *a, **kw: m(*a, **kw),
    static_argnames=("is_causal", "deterministic", "decode", "sow_weights"),
)
_sown = nnx.jit(
    nnx.capture(lambda m, x, mask: m(x, mask=mask, is_causal=True, sow_weights=True),
                nnx.Intermediate)
)  # fmt: skip


def test_flax_attention_fn_equals_flax_in_eval():
    """Same outputs as Flax's dot_product_attention (both of Flax's paths: jax.nn's when
    there is no dropout rate and no module, its own weights path otherwise): grouped
    query heads, a boolean mask with a fully masked query row (Flax: uniform weights),
    is_causal, the weights sown into module (sow_weights), and a dropout layer in eval
    with two batch dims."""
    theirs, ours = _flax_pair(num_kv_heads=2)
    x = _x(0)
    mask = np.random.default_rng(1).random((B, 1, L, L)) < 0.7
    mask[0, 0, 2] = False
    want, got = _apply(theirs, x), _apply(ours, x)
    assert got.dtype == want.dtype and got.shape == want.shape == (B, L, D)
    np.testing.assert_allclose(got, want, **TOL)
    (want, want_sown), (got, got_sown) = _sown(theirs, x, mask), _sown(ours, x, mask)
    np.testing.assert_allclose(got, want, **TOL)
    (want_w,), (got_w,) = (s["attention_weights"].get_value() for s in (want_sown, got_sown))
    assert got_w.shape == want_w.shape == (B, 4, L, L) and got_w.dtype == want_w.dtype
    np.testing.assert_allclose(got_w, want_w, **TOL)
    np.testing.assert_allclose(got_w[0, :, 2], 1.0 / L, **TOL)  # the fully masked row
    # the mask hides keys inside the causal triangle of rows that still see some key
    causal = np.tril(np.ones((L, L), bool))
    cut = ~mask[:, 0] & causal & (mask[:, 0] & causal).any(-1, keepdims=True)  # [B, T, S]
    assert cut.any() and (np.moveaxis(np.asarray(got_w), 1, -1)[cut] == 0).all()

    theirs, ours = _flax_pair(dropout_rate=0.5, deterministic=True)
    x2 = _x(3, (2, B, L, D))  # two batch dims (Flax flattens them for jax.nn)
    want, got = _apply(theirs, x2, mask=mask), _apply(ours, x2, mask=mask)
    np.testing.assert_allclose(got, want, **TOL)


def test_flax_attention_fn_equals_flax_in_decode_mode():
    """Flax's decode mode (init_cache, decode=True) hands the attention_fn the whole
    cache and a float32 mask [B, 1, 1, L]: step by step, the same outputs as Flax."""
    theirs, ours = _flax_pair(num_kv_heads=2, decode=True)
    masks = []

    def spy(*args, **kwargs):
        masks.append(kwargs["mask"])
        return flax_attention_fn(*args, **kwargs)

    ours.attention_fn = spy
    x = _x(4)
    for layer in (theirs, ours):
        layer.init_cache(x.shape)
    for t in range(L):  # jitted: the cache index is traced, one compile per layer
        tok = x[:, t : t + 1]
        np.testing.assert_allclose(_apply(ours, tok), _apply(theirs, tok), **TOL)
    assert masks[0].dtype == jnp.float32 and masks[0].shape == (B, 1, 1, L)
    np.testing.assert_array_equal(ours.cached_key[...], theirs.cached_key[...])


def test_flax_attention_fn_dtype_and_precision():
    """dtype: q, k, v promoted as Flax promotes them, the output in that dtype (bfloat16
    results agree to bfloat16 resolution: Flax's softmax runs in bfloat16, jattn's in
    float32); precision is accepted as Flax takes it (one jax.lax.Precision)."""
    q, k, v = (_x(i, (B, L, 4, 8)).astype(jnp.bfloat16) for i in (12, 13, 14))
    want = jax.jit(nnx.dot_product_attention)(q, k, v)
    got = jax.jit(flax_attention_fn)(q, k, v)
    assert got.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=2**-7, atol=2**-7)
    up = functools.partial(flax_attention_fn, dtype=jnp.float32)
    want32 = jax.jit(functools.partial(nnx.dot_product_attention, dtype=jnp.float32))(q, k, v)
    got32 = jax.jit(up)(q, k, v)
    assert got32.dtype == jnp.float32
    np.testing.assert_allclose(got32, want32, **TOL)
    highest = jax.jit(functools.partial(up, precision=jax.lax.Precision.HIGHEST))(q, k, v)
    np.testing.assert_allclose(highest, want32, **TOL)
    with pytest.raises(ValueError, match="precision must be one jax.lax.Precision"):
        up(q, k, v, precision=(jax.lax.Precision.HIGH, jax.lax.Precision.HIGHEST))


_KEY = jax.random.key(5)


def _uniform_probe(broadcast_dropout, rate=0.25, rng=_KEY, **kw):
    """q = k = 0 gives uniform weights 1/S; value one-hot over S reads the (dropped)
    weights back: out[b, t, n, s] = probs[b, n, t, s]."""
    b, t, n, s = 2, 64, 2, 64
    q = jnp.zeros((b, t, n, 8))
    value = jnp.broadcast_to(jnp.eye(s)[None, :, None, :], (b, s, 1, s))
    return flax_attention_fn(
        q, jnp.zeros((b, s, 1, 8)), value, dropout_rate=rate, dropout_rng=rng,
        broadcast_dropout=broadcast_dropout, **kw,
    )  # fmt: skip


def test_flax_attention_fn_dropout_rate_and_broadcast():
    s, keep = 64, 0.75
    per_entry = np.asarray(_uniform_probe(False))
    shared = np.asarray(_uniform_probe(True))
    for out in (per_entry, shared):
        kept = out != 0
        # kept weights are scaled by 1 / keep, the rest are zero
        np.testing.assert_allclose(out[kept], 1.0 / (s * keep), rtol=1e-6)
        # 8192 (per entry) or 4096 (shared) independent draws: 4+ standard deviations
        assert abs(kept.mean() - keep) < 0.03, kept.mean()
    # broadcast_dropout=True (Flax's default): one [T, S] mask for every batch entry and
    # head, as Flax's dropout_shape (1, ..., 1, T, S); False: one per entry.
    assert (shared == shared[:1, :, :1]).all()
    assert not (per_entry[0] == per_entry[1]).all()
    assert not (per_entry[:, :, 0] == per_entry[:, :, 1]).all()
    assert not (shared[0, 0] == shared[0, 1]).all()  # rows still differ
    # another key, another mask
    assert not (np.asarray(_uniform_probe(True, rng=jax.random.key(6))) == shared).all()
    # deterministic=True, or rate 0: no dropout at all, exactly the uniform weights
    for kw in (dict(deterministic=True), dict(rate=0.0)):
        for bd in (False, True):
            np.testing.assert_array_equal(_uniform_probe(bd, **kw), 1.0 / s)
    with pytest.raises(ValueError, match="needs dropout_rng"):
        _uniform_probe(True, rng=None)
    with pytest.raises(ValueError, match=r"dropout_rate must be in \[0, 1\)"):
        _uniform_probe(False, rate=1.0)


def test_flax_layer_trains_with_flax_attention_fn():
    """In Flax's training mode the layer passes dropout_rng and deterministic=False: the
    output is dropped (differs from eval, and between calls) and differentiable."""
    theirs, ours = _flax_pair(dropout_rate=0.5)
    x = _x(7)
    evaluated = _apply(ours, x, deterministic=True)
    np.testing.assert_allclose(evaluated, _apply(theirs, x, deterministic=True), **TOL)

    @nnx.jit
    def train_step(m):
        return nnx.value_and_grad(lambda m: jnp.sum(m(x, deterministic=False) ** 2))(m)

    (a, grads), (b, _) = train_step(ours), train_step(ours)
    assert a != b and a != jnp.sum(evaluated**2)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


# ------------------------------------------------------- 3. Flax's cache on jattn's layer


def test_flax_cache_decode_equals_full_forward_flax_and_functional_cache():
    """jattn's MultiHeadAttention with Flax's cache: one token per call equals the full
    causal forward, flax.nnx.MultiHeadAttention in decode mode with the same weights
    (outputs and cache contents), and jattn's functional cache."""
    theirs = _build(
        lambda: nnx.MultiHeadAttention(4, D, num_kv_heads=2, decode=True, rngs=nnx.Rngs(0))
    )
    layer = _jattn_like(theirs)
    x = _x(8)
    full = _apply(layer, x, is_causal=True)
    theirs.init_cache(x.shape)
    layer.init_cache(x.shape)
    assert layer.cached_key.shape == theirs.cached_key.shape == (B, L, 2, 4)
    cache = init_cache(layer, B, L)
    for t in range(L):
        tok = x[:, t : t + 1]
        got = _apply(layer, tok, decode=True)  # jitted: the cache index is traced
        np.testing.assert_allclose(got, full[:, t : t + 1], **TOL)
        np.testing.assert_allclose(got, _apply(theirs, tok), **TOL)
        functional, cache = cached_self_attention(layer, tok, cache)
        np.testing.assert_allclose(got, functional, **TOL)
    assert int(layer.cache_index[...]) == int(theirs.cache_index[...]) == L
    np.testing.assert_allclose(layer.cached_key[...], theirs.cached_key[...], **TOL)
    np.testing.assert_allclose(layer.cached_value[...], theirs.cached_value[...], **TOL)


def test_flax_cache_prefill_rotary_mods_and_view():
    """A multi-token prefill then single steps equal the full causal forward, also with
    RoPE (RotaryAttention) and a sliding-window mask_mod seen from the cache positions
    (the layer's own and a call's); nnx.view(decode=True, batch_size, max_length) makes
    the cache, as Flax's set_view."""
    layer = MultiHeadAttention(
        2, D, attention_fn=RotaryAttention(jattn.dot_product_attention),
        mask_mod={"name": "sliding_window", "window": [3, 0]}, rngs=nnx.Rngs(3),
    )  # fmt: skip
    x = _x(9)
    full = _apply(layer, x, is_causal=True)
    view = nnx.view(layer, decode=True, batch_size=B, max_length=L)
    assert view.decode and not layer.decode and layer.cached_key is None
    assert view.cached_key.shape == (B, L, 2, 8)
    np.testing.assert_allclose(_apply(view, x[:, :3]), full[:, :3], **TOL)  # prefill
    for t in range(3, L):
        np.testing.assert_allclose(_apply(view, x[:, t : t + 1]), full[:, t : t + 1], **TOL)
    window = mods.sliding_window((1, 0))
    windowed = nnx.jit(
        lambda m, x, decode: m(x, is_causal=True, decode=decode, mask_mod=window),
        static_argnames="decode",
    )
    want = windowed(layer, x, False)
    assert not np.allclose(want, full)  # the call's window cuts deeper than the layer's
    layer.init_cache(x.shape)
    for t in range(L):
        got = windowed(layer, x[:, t : t + 1], True)
        np.testing.assert_allclose(got, want[:, t : t + 1], **TOL)


def test_flax_cache_errors():
    layer = MultiHeadAttention(2, D, rngs=nnx.Rngs(0))
    x = _x(10)
    with pytest.raises(ValueError, match=r"call init_cache\(input_shape\) first"):
        layer(x[:, :1], decode=True)
    layer.init_cache((B, 2, D))
    with pytest.raises(ValueError, match="cache holds batch"):
        layer(x[:1, :1], decode=True)
    with pytest.raises(ValueError, match="do not fit a cache of 2"):
        layer(x[:, :3], decode=True)
    layer(x[:, :2], decode=True)
    with pytest.raises(ValueError, match="the cache is full"):
        layer(x[:, 2:3], decode=True)
    with pytest.raises(ValueError, match="input_shape must be"):
        layer.init_cache((B, 0, D))
    with pytest.raises(TypeError, match="decode must be a bool, got 'yes'"):
        layer(x, decode="yes")


# ------------------------------------------------------------------- 1. train() / eval()


def test_layers_follow_train_and_eval():
    """MultiHeadAttention, DotProductAttention, AdditiveAttention: eval by default (as
    before), train() turns dropout on with the layer's own stream (no rngs), an explicit
    deterministic= wins, eval() turns it off again, nnx.view switches a copy."""
    x = _x(11, (B, L, 8))
    layers = [
        (_build(lambda: MultiHeadAttention(2, 8, dropout_rate=0.5, rngs=nnx.Rngs(0))), (x,)),
        (DotProductAttention(0.5, rngs=nnx.Rngs(0)), (x, x, x)),
        (_build(lambda: AdditiveAttention(8, 8, 4, 0.5, rngs=nnx.Rngs(0))), (x, x, x)),
    ]
    for layer, args in layers:
        assert layer.deterministic is True
        evaluated = layer(*args)
        np.testing.assert_array_equal(evaluated, layer(*args, deterministic=True))
        trained_view = nnx.view(layer, deterministic=False)
        assert layer.deterministic is True and trained_view.deterministic is False
        assert not np.allclose(trained_view(*args), evaluated)
        layer.train()
        a, b = layer(*args), layer(*args)
        assert not np.allclose(a, evaluated) and not np.allclose(a, b)
        np.testing.assert_array_equal(layer(*args, deterministic=True), evaluated)
        layer.eval()
        np.testing.assert_array_equal(layer(*args), evaluated)
        assert not np.allclose(layer(*args, deterministic=False), evaluated)
        with pytest.raises(TypeError, match="deterministic must be True"):
            layer(*args, deterministic="no")


_TINY = dict(features=8, num_heads=2, mlp_features=16, dropout_rate=0.3, max_len=8)
_SRC = jnp.array([[3, 4, 5, 2, 0], [6, 2, 0, 0, 0]])
_TGT = jnp.array([[1, 3, 4, 5], [1, 6, 2, 0]])

_MODELS = {
    # name: (builder, call args, dropout sites: keys drawn by one training call)
    # Transformer 1+1 layers: 2 embeddings; encoder block: attention + 2 residuals +
    # FFN = 4; decoder block: 2 attentions + 3 residuals + FFN = 6.
    "transformer": (lambda: Transformer(9, 7, num_layers=1, rngs=nnx.Rngs(0), **_TINY),
                    (_SRC, _TGT), 12),
    "decoder_lm": (lambda: DecoderLM(9, num_layers=1, rngs=nnx.Rngs(0), **_TINY), (_TGT,), 5),
    "classifier": (lambda: EncoderClassifier(9, 3, num_layers=1, rngs=nnx.Rngs(0), **_TINY),
                   (_SRC,), 5),
    # GRU seq2seq, 2 layers: source and target embeddings, between the GRU layers,
    # before the output layer.
    "seq2seq": (lambda: BahdanauSeq2Seq(9, 7, embed_dim=8, hidden=8, num_layers=2,
                                        bidirectional=False, score="dot", dropout_rate=0.3,
                                        rngs=nnx.Rngs(0)), (_SRC, _TGT), 4),
}  # fmt: skip


def _draws(model):
    """How many keys each dropout stream of ``model`` has drawn."""
    return [int(c) for c in jax.tree.leaves(nnx.state(model, nnx.RngCount))]


@pytest.mark.parametrize("name", list(_MODELS))
def test_models_train_with_no_rngs(name):
    """model.train() switches every jattn module, and every dropout site then draws a
    key from its layer's own stream (no rngs passed; each stream advances, by its number
    of sites), model.eval() switches back, and an explicit deterministic=True wins."""
    build, args, sites = _MODELS[name]
    model = _build(build)
    flags = _deterministic_flags(model)
    assert flags and all(v is True for v in flags.values())
    evaluated = model(*args)
    assert sum(_draws(model)) == 0
    model.train()
    assert all(v is False for v in _deterministic_flags(model).values())
    trained = model(*args)
    draws = _draws(model)
    assert min(draws) >= 1 and sum(draws) == sites, draws
    assert not np.allclose(trained, evaluated)
    np.testing.assert_array_equal(model(*args, deterministic=True), evaluated)
    assert sum(_draws(model)) == sites
    model.eval()
    assert all(v is True for v in _deterministic_flags(model).values())


def test_jitted_training_step_without_rngs_draws_fresh_keys():
    """A jitted step of a model in train() mode, no rngs argument: the streams advance
    inside nnx.jit, so each step drops different units; the gradients are finite."""
    model = _build(_MODELS["decoder_lm"][0])
    model.train()

    @nnx.jit
    def step(model, tokens):
        def loss(model):
            return jnp.mean(model(tokens) ** 2)

        return nnx.value_and_grad(loss)(model)

    (l1, g1), (l2, _) = step(model, _TGT), step(model, _TGT)
    assert np.isfinite(l1) and l1 != l2
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(g1))
    model.eval()
    np.testing.assert_array_equal(model(_TGT), model(_TGT, deterministic=True))


# ----------------------------------------------------------- config dataclasses


def test_every_model_has_a_config_dataclass_of_its_options():
    """``M.Config``: frozen, keyword-only, fields and defaults exactly the constructor's
    options (every model the training program builds); ``from_config`` builds the same
    model as the keywords; configs are data (hashable, equal, replaceable)."""
    import dataclasses
    import inspect

    import jattn.train as train_lib

    for name in train_lib.MODELS:
        cls = train_lib.model_class(name)
        required = (inspect.Parameter.empty, dataclasses.MISSING)
        params = {p.name: "required" if p.default in required else p.default
                  for p in inspect.signature(cls.__init__).parameters.values()
                  if p.name not in ("self", "rngs")}  # fmt: skip
        fields = {f.name: "required" if f.default in required else f.default
                  for f in dataclasses.fields(cls.Config)}  # fmt: skip
        assert fields == params, name
        assert cls.Config.__name__ == f"{cls.__name__}Config"
    config = jattn.models.DecoderLMConfig(vocab_size=11, num_layers=1, features=8, num_heads=2,
                                          max_len=8, dropout_rate=0.0)  # fmt: skip
    by_config = DecoderLM.from_config(config, rngs=nnx.Rngs(0))
    by_keywords = DecoderLM(11, num_layers=1, features=8, num_heads=2, max_len=8,
                            dropout_rate=0.0, rngs=nnx.Rngs(0))  # fmt: skip
    tokens = jnp.array([[3, 4, 5, 6]])
    np.testing.assert_array_equal(by_config(tokens), by_keywords(tokens))
    assert hash(config) == hash(jattn.models.DecoderLMConfig(**dataclasses.asdict(config)))
    assert config.replace(max_len=16).max_len == 16 and config.max_len == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.features = 16
    with pytest.raises(TypeError, match="unexpected keyword argument 'featurez'"):
        jattn.models.DecoderLMConfig(vocab_size=11, featurez=8)
    with pytest.raises(TypeError, match="positional argument"):
        jattn.models.DecoderLMConfig(11)
    with pytest.raises(TypeError, match="Transformer.from_config takes a TransformerConfig, got "
                                        "DecoderLMConfig"):  # fmt: skip
        Transformer.from_config(config, rngs=nnx.Rngs(0))
