"""Composite attention (jattn.layers.composite): parallel, series and fused layers over any
attention layer, exact identities, decoding, routing, and the models' layer_pattern."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _train_utils import ROOT
from flax import nnx

import jattn.train as train_lib
from jattn import mods, viz
from jattn.layers import (
    GatedAttention,
    LinearAttention,
    MixtureOfHeads,
    MultiHeadAttention,
    ParallelAttention,
    SeriesAttention,
    sown_aux_loss,
)
from jattn.layers.gating import load_balancing_loss, top_k_routing
from jattn.models import DecoderLM, Transformer, cache_index

B, T, D, N = 2, 5, 8, 4
X = jax.random.normal(jax.random.key(0), (B, T, D))
ATOL = 1e-6  # the exact identities
DECODE_ATOL = 2e-5  # prefill + cached steps against the full pass (other summation order)


def mha(rngs, **kw):
    """A layer of N heads of width D (``rngs``: a seed or ``nnx.Rngs``)."""
    return MultiHeadAttention(N, D, rngs=rngs if isinstance(rngs, nnx.Rngs) else nnx.Rngs(rngs),
                              **kw)  # fmt: skip


def local(rngs):
    """A causal window of 1: each query sees itself and the token before."""
    return mha(rngs, mask_mod=mods.sliding_window((1, 0)))


def saturate(linear, open_index, n):
    """Zero kernel, bias +30 for branch ``open_index`` and -30 for the others."""
    linear.kernel[...] = jnp.zeros_like(linear.kernel[...])
    sign = jnp.where(jnp.arange(n) == open_index, 30.0, -30.0)
    linear.bias[...] = jnp.broadcast_to(sign[:, None], linear.bias.shape)


def test_one_branch_composites_equal_the_branch():
    """Each combine with one branch (concat with an identity projection), a one-layer
    series, and a mixture of heads keeping all N heads under a uniform router equal the
    layer itself."""
    branch = mha(1)
    want = branch(X, is_causal=True)
    layers = [ParallelAttention([branch], combine=c, rngs=nnx.Rngs(2))
              for c in ("sum", "mean", "softmax", "concat")]  # fmt: skip
    layers.append(ParallelAttention([branch], combine="softmax", input_dependent=False,
                                    per_feature=False, rngs=nnx.Rngs(2)))  # fmt: skip
    concat = layers[3]
    concat.proj.kernel[...] = jnp.eye(D)
    concat.proj.bias[...] = jnp.zeros(D)
    layers.append(SeriesAttention([branch]))
    moh = MixtureOfHeads(branch, k=N, rngs=nnx.Rngs(3))
    moh.router.kernel[...] = jnp.zeros_like(moh.router.kernel[...])
    layers.append(moh)
    for layer in layers:
        np.testing.assert_allclose(layer(X, is_causal=True), want, rtol=0, atol=ATOL)
    # the wrapped layer was copied, not changed: it still projects to D
    assert branch(X).shape == (B, T, D) and moh.attention is not branch


def test_saturated_gates_select_a_branch():
    """Gate and softmax logits saturated at +-30 (kernel 0) give the selected branch,
    per feature and per branch; GatedAttention fully open is its layer, fully shut its
    output bias."""
    a, b = local(1), mha(2)
    ya, yb = a(X, is_causal=True), b(X, is_causal=True)
    for combine in ("gate", "softmax"):
        for per_feature in (True, False):
            par = ParallelAttention([a, b], combine=combine, per_feature=per_feature,
                                    rngs=nnx.Rngs(3))  # fmt: skip
            for pick, want in ((0, ya), (1, yb)):
                saturate(par.logits, pick, 2)
                got = par(X, is_causal=True)
                np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    gated = GatedAttention(b, output_gate="headwise", value_gate=True, rngs=nnx.Rngs(4))
    for lin in (gated.gate, gated.attention.value.gate):
        lin.kernel[...] = jnp.zeros_like(lin.kernel[...])
        lin.bias[...] = jnp.full(lin.bias.shape, 30.0)
    np.testing.assert_allclose(gated(X, is_causal=True), yb, rtol=0, atol=ATOL)
    gated.gate.bias[...] = jnp.full(gated.gate.bias.shape, -30.0)
    shut = jnp.broadcast_to(b.out.bias[...], (B, T, D))
    np.testing.assert_allclose(gated(X, is_causal=True), shut, rtol=0, atol=ATOL)


def test_parallel_sum_and_mean_of_any_mechanisms_and_their_weights():
    """Softmax, windowed and linear branches: 'sum' is the sum of their outputs, 'mean'
    the mean; the weights come back per branch (None for linear attention) and
    jattn.viz collects them by branch."""
    branches = [mha(1), local(2), LinearAttention(N, D, rngs=nnx.Rngs(3))]
    outs = [br(X, is_causal=True) for br in branches]
    total = ParallelAttention(branches, combine="sum")
    got, weights = total(X, is_causal=True, return_weights=True)
    np.testing.assert_allclose(got, outs[0] + outs[1] + outs[2], rtol=0, atol=ATOL)
    mean = ParallelAttention(branches, combine="mean")(X, is_causal=True)
    np.testing.assert_allclose(mean, (outs[0] + outs[1] + outs[2]) / 3, rtol=0, atol=ATOL)
    assert weights[2] is None and weights[0].shape == (B, N, T, T)
    assert float(weights[1][0, 0, 4, 2]) == 0.0  # outside the window of 1
    sown = viz.collect_attention_weights(total, X, is_causal=True)
    assert sorted(sown) == ["branches/0", "branches/1"]
    np.testing.assert_allclose(sown["branches/1"], weights[1], rtol=0, atol=ATOL)


def test_heads_of_two_kinds_in_one_layer_equal_the_sum_of_split_layers():
    """Heads of different kinds in one layer (per_head mask_mods: even heads a causal
    window, odd heads global) equal a parallel sum of a local and a global layer
    holding those heads' weights."""
    fused = mha(1, mask_mod=mods.per_head([mods.sliding_window((1, 0)), mods.full()]))
    parts = []
    for first, mask_mod in ((0, mods.sliding_window((1, 0))), (1, None)):
        half = MultiHeadAttention(N // 2, D, D // 2, mask_mod=mask_mod, rngs=nnx.Rngs(5))
        for name in ("query", "key", "value"):
            dst, src = getattr(half, name), getattr(fused, name)
            dst.kernel[...] = src.kernel[...][:, first::2]
            dst.bias[...] = src.bias[...][first::2]
        half.out.kernel[...] = fused.out.kernel[...][first::2]
        half.out.bias[...] = fused.out.bias[...] * (first == 0)
        parts.append(half)
    got = ParallelAttention(parts, combine="sum")(X, is_causal=True)
    np.testing.assert_allclose(got, fused(X, is_causal=True), rtol=0, atol=ATOL)


def decode_in_pieces(layer):
    """A prefill of 3 tokens, then one token at a time."""
    cache = layer.init_cache(B, T)
    outs = []
    for lo, hi in ((0, 3), (3, 4), (4, 5)):
        out, cache = layer.step(X[:, lo:hi], cache)
        outs.append(out)
    return jnp.concatenate(outs, axis=1)


def test_prefill_and_cached_decode_equal_the_full_forward():
    """Every composite decodes: parallel (gated; a causal window, global and linear
    branches), gated (output and value gates), mixture of heads, a residual series."""
    layers = {
        "parallel": ParallelAttention(
            [local(1), mha(2), LinearAttention(N, D, kind="gla", rngs=nnx.Rngs(3))],
            combine="gate",
            rngs=nnx.Rngs(4),
        ),  # fmt: skip
        "gated": GatedAttention(mha(5), value_gate=True, rngs=nnx.Rngs(6)),
        "moh": MixtureOfHeads(local(7), k=2, rngs=nnx.Rngs(8)),
        "series": SeriesAttention.from_pattern(
            "local, global",
            {"local": local, "global": mha},
            residual=True,
            rngs=nnx.Rngs(9),
        ),  # fmt: skip
    }
    for name, layer in layers.items():
        full = layer(X, is_causal=True)
        np.testing.assert_allclose(decode_in_pieces(layer), full, rtol=0, atol=DECODE_ATOL,
                                   err_msg=name)  # fmt: skip


def test_models_decode_with_parallel_layer_types():
    """A ``layer_pattern`` type joined by '+' is a gated ParallelAttention inside the
    model's blocks, and the blocks decode it: prefill + cached steps equal the full
    forward (DecoderLM; Transformer's decoder), ragged prompts generate as one at a time
    (the KV caches rewound, a linear branch's state fed token by token)."""
    lm = DecoderLM(11, num_layers=2, features=D, num_heads=2, max_len=12, dropout_rate=0.0,
                   layer_pattern="global+local, linear+local", local_window=2,
                   rngs=nnx.Rngs(0))  # fmt: skip
    attn = [layer.self_attention for layer in lm.decoder.layers]
    assert all(isinstance(a, ParallelAttention) and a.combine == "gate" for a in attn)
    assert [type(b).__name__ for b in attn[1].branches] == ["LinearAttention",
                                                            "MultiHeadAttention"]  # fmt: skip
    assert attn[0].branches[0].mask_mod is None and attn[0].branches[1].mask_mod is not None
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 3, 11)
    step = nnx.jit(lambda lm, tok, caches: lm.step(tok, caches))  # eager is op by op: slow
    caches = lm.init_cache(2, 12)
    outs = []
    for lo, hi in ((0, 5), (5, 6), (6, 7), (7, 8)):
        logits, caches = step(lm, tokens[:, lo:hi], caches)
        outs.append(logits)
    full = nnx.jit(lambda lm, tok: lm(tok))(lm, tokens)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=0, atol=DECODE_ATOL)
    assert cache_index(caches).tolist() == [8, 8]
    lengths = jnp.array([5, 3])
    both = lm.generate(tokens[:, :5], lengths, max_new_tokens=3)
    one = lm.generate(tokens[1:, :3], lengths[1:], max_new_tokens=3)  # the shorter prompt
    np.testing.assert_array_equal(both[1], one[0])
    model = Transformer(11, 11, num_layers=1, features=D, num_heads=2, max_len=12,
                        dropout_rate=0.0, layer_pattern="global+local", local_window=1,
                        rngs=nnx.Rngs(1))  # fmt: skip
    memory = model.encode(tokens[:, :6])
    ys = model.tgt_embed(tokens[:, 2:7])  # [B, 5, D]
    cross = [layer.cross_kv(memory) for layer in model.decoder.layers]
    step = nnx.jit(lambda dec, y, caches, cross: dec.step(y, caches, cross))
    caches = model.decoder.init_cache(2, 8)
    first, caches = step(model.decoder, ys[:, :3], caches, cross)  # a prefill, then steps
    rest = []
    for t in (3, 4):
        y, caches = step(model.decoder, ys[:, t : t + 1], caches, cross)
        rest.append(y)
    got = jnp.concatenate([first, *rest], axis=1)
    full = nnx.jit(lambda dec, ys, memory: dec(ys, memory))(model.decoder, ys, memory)
    np.testing.assert_allclose(got, full, rtol=0, atol=DECODE_ATOL)


def test_linear_parts_decode_with_a_state_of_constant_size():
    """A composite of linear-attention parts needs no max_len (their states do not grow);
    a MultiHeadAttention part does, and says so."""
    parts = [LinearAttention(N, D, rngs=nnx.Rngs(i)) for i in range(2)]
    cache = ParallelAttention(parts, combine="sum").init_cache(B)
    assert [type(c).__name__ for c in cache] == ["LinearDecodeState"] * 2
    with pytest.raises(ValueError, match="a MultiHeadAttention needs max_len"):
        ParallelAttention([mha(1)], combine="sum").init_cache(B)


def test_router_top_k_and_load_balancing_loss_by_hand():
    logits = jnp.array([[3.0, 1.0, 2.0, 0.0], [0.0, 5.0, -1.0, 4.0], [1.0, 1.0, 1.0, 9.0]])
    probs, selected = top_k_routing(logits, 2)
    np.testing.assert_array_equal(
        selected,
        [[True, False, True, False], [False, True, False, True], [True, False, False, True]],
    )  # row 3: 9.0, then the tie of three 1.0 goes to the lowest index
    e = np.exp(np.asarray(logits, np.float64))
    p = e / e.sum(-1, keepdims=True)
    np.testing.assert_allclose(probs, p, rtol=1e-6)
    sel = np.array(selected, np.float64)
    want = 4 * np.sum(sel.sum(0) / sel.sum() * p.mean(0))
    np.testing.assert_allclose(load_balancing_loss(probs, selected), want, rtol=1e-6)
    # Switch's bounds: a uniform router gives 1, a collapsed one (k=1) gives E
    uniform = top_k_routing(jnp.zeros((6, 4)), 1)
    assert abs(float(load_balancing_loss(*uniform)) - 1.0) < 1e-6
    collapsed = top_k_routing(jnp.tile(jnp.array([60.0, 0.0, 0.0, 0.0]), (6, 1)), 1)
    assert abs(float(load_balancing_loss(*collapsed)) - 4.0) < 1e-6
    # padding does not count: where= keeps the real tokens' loss, whatever the padding says
    pad = top_k_routing(jnp.tile(jnp.array([60.0, 0.0, 0.0, 0.0]), (2, 1)), 1)
    joined = [jnp.concatenate([a, b]) for a, b in zip(uniform, pad, strict=True)]
    real = jnp.arange(8) < 6
    np.testing.assert_allclose(load_balancing_loss(*joined, where=real), 1.0, rtol=1e-6)
    assert float(load_balancing_loss(*joined)) > 1.1  # counted, the padding skews it
    assert float(load_balancing_loss(*uniform, where=jnp.zeros(6, bool))) == 0.0
    with pytest.raises(ValueError, match=r"where must mark the tokens of probs \[6, 4\]: shape"):
        load_balancing_loss(*uniform, where=jnp.ones(5, bool))
    with pytest.raises(TypeError, match="where must be boolean"):
        load_balancing_loss(*uniform, where=jnp.ones(6))


def test_mixture_of_heads_uses_only_the_selected_heads_and_reports_its_loss():
    """The output is W_O of the heads weighted N * p on each token's top-k, zero
    elsewhere; the loss is returned and sown, and sown_aux_loss adds it up."""
    moh = MixtureOfHeads(mha(1), k=2, sow_aux_loss=True, rngs=nnx.Rngs(2))
    out, loss = moh(X, is_causal=True, sow_aux_loss=False, return_aux_loss=True)
    heads = moh.attention(X, is_causal=True)  # [B, T, N, Hv]: the copy's out is the heads
    probs, selected = top_k_routing(moh.router(X), 2)
    assert np.all(np.sum(selected, -1) == 2)
    g = np.where(selected, N * probs, 0.0)
    kernel, bias = np.asarray(moh.out.kernel[...]), np.asarray(moh.out.bias[...])
    want = np.einsum("btnh,nhd->btd", np.asarray(heads, np.float64) * g[..., None], kernel) + bias
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(loss, load_balancing_loss(probs, selected), rtol=1e-6)
    # token_mask keeps padding out of the loss: a padded call's loss is the real tokens'
    real = jnp.array([[True] * T, [True] * 3 + [False] * 2])
    _, masked = moh(X, is_causal=True, return_aux_loss=True, sow_aux_loss=False, token_mask=real)
    want = load_balancing_loss(probs[real], selected[real])
    np.testing.assert_allclose(masked, want, rtol=1e-6)
    assert abs(float(masked) - float(loss)) > 1e-4
    (out2, sown) = nnx.capture(moh, nnx.Intermediate)(X, is_causal=True)
    np.testing.assert_allclose(sown_aux_loss(sown), loss, rtol=1e-6)
    np.testing.assert_allclose(out2, out, rtol=0, atol=ATOL)
    assert float(sown_aux_loss(nnx.State({}))) == 0.0


def test_gradients_flow_through_gates_weights_and_router():
    layers = {
        "gate": ParallelAttention([local(1), mha(2)], combine="gate", rngs=nnx.Rngs(3)),
        "softmax": ParallelAttention(
            [local(1), mha(2)], combine="softmax", input_dependent=False, rngs=nnx.Rngs(3)
        ),  # fmt: skip
        "gated": GatedAttention(mha(4), value_gate=True, rngs=nnx.Rngs(5)),
        "moh": MixtureOfHeads(mha(6), k=2, rngs=nnx.Rngs(7)),
    }

    def loss(layer):
        if isinstance(layer, MixtureOfHeads):
            out, aux = layer(X, is_causal=True, return_aux_loss=True)
            return jnp.sum(jnp.sin(out)) + aux
        return jnp.sum(jnp.sin(layer(X, is_causal=True)))

    gate_params = {  # where each layer's gate parameters sit in its state
        "gate": [("logits", "kernel"), ("logits", "bias")],
        "softmax": [("logits",)],
        "gated": [("gate", "kernel"), ("attention", "value", "gate", "kernel")],
        "moh": [("router", "kernel"), ("router", "bias")],
    }
    for name, layer in layers.items():
        grads = nnx.grad(loss)(layer)
        for path in gate_params[name]:
            g = grads
            for key in path:
                g = g[key]
            g = np.asarray(g[...])
            assert np.all(np.isfinite(g)) and np.max(np.abs(g)) > 0, name


def test_layer_pattern_builds_the_layer_types():
    """``layer_pattern`` types each layer; a 'local' layer is the sliding window of
    ``local_window`` (the model equals one given that window as a mask_mod)."""
    lm = DecoderLM(11, num_layers=4, features=D, num_heads=2, max_len=8, dropout_rate=0.0,
                   layer_pattern="local, local, linear", local_window=2,
                   rngs=nnx.Rngs(0))  # fmt: skip
    attn = [layer.self_attention for layer in lm.decoder.layers]
    assert [type(a).__name__ for a in attn] == ["MultiHeadAttention"] * 2 + [
        "LinearAttention", "MultiHeadAttention"]  # fmt: skip
    assert attn[0].mask_mod is not None and attn[3].mask_mod is not None
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 3, 11)
    kw = dict(num_layers=1, features=D, num_heads=2, max_len=8, dropout_rate=0.0)
    window = {"name": "sliding_window", "window": [2, 2]}
    by_pattern = DecoderLM(11, layer_pattern=["local"], local_window=2, rngs=nnx.Rngs(3), **kw)
    by_mask = DecoderLM(11, mask_mod=window, rngs=nnx.Rngs(3), **kw)
    np.testing.assert_allclose(by_pattern(tokens), by_mask(tokens), rtol=0, atol=ATOL)
    # the training program's model takes it as a config field, from the command line
    config = train_lib.config_from_command_line(
        f"{ROOT / 'configs' / 'copy.py'}:small",
        [("model.layer_pattern", "local, global"), ("model.local_window", "3"),
         ("model.num_encoder_layers", "2"), ("model.num_decoder_layers", "3")],
    )  # fmt: skip
    assert config.model.layer_pattern == "local, global"
    model = train_lib.build_model(config.model.to_dict(), src_vocab_size=13, tgt_vocab_size=13,
                                  seed=0)  # fmt: skip
    enc = [layer.self_attention.mask_mod for layer in model.encoder.layers]
    dec = [layer.self_attention.mask_mod for layer in model.decoder.layers]
    assert enc[0] is not None and enc[1] is None
    assert dec[0] is not None and dec[1] is None and dec[2] is not None
    assert all(layer.cross_attention.mask_mod is None for layer in model.decoder.layers)


def test_layer_pattern_errors_name_the_field():
    kw = dict(num_layers=2, features=D, num_heads=2, max_len=8, rngs=nnx.Rngs(0))
    known = r"\['gla', 'global', 'linear', 'local', 'performer', 'retention'\]"
    with pytest.raises(
        ValueError, match=f"layer_pattern: unknown layer type 'lokal'; known: {known}"
    ):
        DecoderLM(11, layer_pattern="lokal, global", **kw)
    with pytest.raises(ValueError, match="has an empty layer type"):
        DecoderLM(11, layer_pattern="local,,global", **kw)
    with pytest.raises(ValueError, match="has 'local' layers: set local_window"):
        DecoderLM(11, layer_pattern="local, global", **kw)
    with pytest.raises(ValueError, match="local_window is the window of a layer_pattern"):
        DecoderLM(11, local_window=4, **kw)
    with pytest.raises(ValueError, match="give either attention='linear' .* not both"):
        DecoderLM(11, attention="linear", layer_pattern="global", **kw)
    with pytest.raises(ValueError, match="has 3 layer types, more than the 2 layers"):
        DecoderLM(11, layer_pattern="local,local,global", local_window=2, **kw)
    with pytest.raises(TypeError, match="layer_pattern must be a string such as"):
        DecoderLM(11, layer_pattern=3, **kw)
    with pytest.raises(ValueError, match="has 'gla' layers, which are causal only"):
        Transformer(11, 11, layer_pattern="global, gla", **kw)
    with pytest.raises(ValueError, match="config.model.local_window must be a positive int"):
        train_lib.config_from_command_line(
            f"{ROOT / 'configs' / 'copy.py'}:small", [("model.local_window", "0")]
        )


def test_bad_arguments_raise_clear_errors():
    a, b = mha(1), MultiHeadAttention(N, D, out_features=4, rngs=nnx.Rngs(2))
    rngs = nnx.Rngs(0)
    cases = [
        (
            ValueError,
            "branches is empty: give at least one attention layer",
            lambda: ParallelAttention([], combine="sum"),
        ),
        (
            TypeError,
            "branches must be a list of attention layers, got MultiHeadAttention",
            lambda: ParallelAttention(a),
        ),
        (
            TypeError,
            r"branches\[1\] must be an nnx.Module attention layer, got function",
            lambda: ParallelAttention([a, lambda x: x], combine="sum"),
        ),
        (
            ValueError,
            r"combine must be one of \('concat', 'sum', 'mean', 'gate', 'softmax'\), got 'max'",
            lambda: ParallelAttention([a], combine="max"),
        ),
        (
            ValueError,
            r"combine='sum' needs branches of one output width, got out_features \[8, 4\]",
            lambda: ParallelAttention([a, b], combine="sum"),
        ),
        (
            ValueError,
            r"different widths: in_features \[8, 6\]",
            lambda: ParallelAttention(
                [a, MultiHeadAttention(2, 6, rngs=rngs)], combine="concat", rngs=rngs
            ),
        ),
        (
            ValueError,
            "per_feature is an option of combine='gate' or 'softmax', not 'mean'",
            lambda: ParallelAttention([a], combine="mean", per_feature=True),
        ),
        (
            ValueError,
            "out_features is an option of combine='concat'",
            lambda: ParallelAttention([a], combine="sum", out_features=4),
        ),
        (
            TypeError,
            r"combine='gate' has parameters: pass rngs=nnx.Rngs\(...\)",
            lambda: ParallelAttention([a], combine="gate"),
        ),
        (
            ValueError,
            r"layers\[0\] gives out_features=4 but layers\[1\] takes in_features=8",
            lambda: SeriesAttention([b, a]),
        ),
        (
            ValueError,
            "residual=True needs layers that keep their width",
            lambda: SeriesAttention([b], residual=True),
        ),
        (
            ValueError,
            r"pattern: unknown layer type 'global'; known: \['local'\]",
            lambda: SeriesAttention.from_pattern("local, global", {"local": local}, rngs=rngs),
        ),
        (
            TypeError,
            "GatedAttention works on the heads of a jattn.layers.MultiHeadAttention",
            lambda: GatedAttention(SeriesAttention([a]), rngs=rngs),
        ),
        (
            ValueError,
            "GatedAttention needs a gate: output_gate or value_gate=True",
            lambda: GatedAttention(a, output_gate=None, rngs=rngs),
        ),
        (
            ValueError,
            "output_gate must be 'elementwise', 'headwise' or None, got 'head'",
            lambda: GatedAttention(a, output_gate="head", rngs=rngs),
        ),
        (
            ValueError,
            r"k must be in \[1, 4\] \(the layer's num_heads\), got 5",
            lambda: MixtureOfHeads(a, k=5, rngs=rngs),
        ),
        (
            TypeError,
            "NoCache cannot decode: a self-attention layer needs init_cache",
            lambda: SeriesAttention([NoCache()]).init_cache(1, 4),
        ),
    ]
    for error, message, build in cases:
        with pytest.raises(error, match=message):
            build()


class NoCache(nnx.Module):
    """An attention-like layer without a decoding cache."""

    in_features = out_features = D

    def __call__(self, x, **kwargs):
        return x
