"""The Bahdanau/Luong GRU encoder-decoder against NumPy float64 references.

Tiny sizes throughout: every distinct shape compiles, and this file must stay fast.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from flax import nnx

from jattn.functional.scores import AdditiveParams, additive_scores
from jattn.models.decoding import beam_search, length_penalty_fn
from jattn.models.rnn import GRUCell, GRUEncoder
from jattn.models.seq2seq import BahdanauSeq2Seq, _additive_scores_projected_keys

PAD, BOS, EOS = 0, 1, 2
SRC_V, TGT_V = 9, 6
TOL = dict(rtol=1e-5, atol=1e-5)  # float32 model vs float64 reference


def _randomize(model: nnx.Module, seed: int) -> None:
    """Every parameter random (biases too), so each one takes part in the reference."""
    rng = np.random.default_rng(seed)
    for _, p in nnx.iter_graph(model):
        if isinstance(p, nnx.Param):
            p.set_value(jnp.asarray(rng.normal(0.0, 0.6, p.shape), jnp.float32))


def _build(make, seed):
    """``make()`` with random parameters, built abstractly (``nnx.eval_shape``): eager
    initializers would only cost compiles, as every parameter is replaced. RNG streams
    get concrete keys and zero counts."""
    model = nnx.eval_shape(make)
    for i, (_, v) in enumerate(nnx.iter_graph(model)):
        if isinstance(v, nnx.RngKey):
            v.set_value(jax.random.key(seed + i))
        elif isinstance(v, nnx.RngCount):
            v.set_value(jnp.zeros(v.shape, v.dtype))
    _randomize(model, seed)
    return model


@nnx.jit(static_argnames=("sow_weights", "deterministic"))
def _fwd(model, src, tgt_in, *, sow_weights=False, deterministic=True, rngs=None):
    """The model's teacher-forced call, compiled once per configuration (eager is slow)."""
    return model(src, tgt_in, sow_weights=sow_weights, deterministic=deterministic, rngs=rngs)


def _model(seed=0, **kw):
    """Additive attention, two layers, bidirectional unless ``kw`` says otherwise."""
    kw = dict(dict(embed_dim=3, hidden=4, num_layers=2), **kw)
    return _build(lambda: BahdanauSeq2Seq(SRC_V, TGT_V, rngs=nnx.Rngs(seed), **kw), seed)


# Source rows: right padding, interior padding, no padding, a single token.
SRC = np.array([[3, 4, 5, PAD, PAD], [6, PAD, 7, 8, PAD], [3, 8, 7, 6, 5], [4, PAD, PAD, PAD, PAD]])
TGT_IN = np.array([[BOS, 3, 4], [BOS, 5, 5], [BOS, 2, 3], [BOS, 4, 0]])


# ----------------------------------------------------------------------- NumPy reference


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _gru_step(cell, h, x):
    f = ref.f64
    xp = x @ f(cell.w_input[...]) + f(cell.b_input[...])
    hp = h @ f(cell.w_hidden[...]) + f(cell.b_hidden[...])
    n = h.shape[-1]
    r = _sigmoid(xp[:n] + hp[:n])
    z = _sigmoid(xp[n : 2 * n] + hp[n : 2 * n])
    c = np.tanh(xp[2 * n :] + r * hp[2 * n :])
    return (1 - z) * c + z * h


def _encode_ref(model, tokens):
    """One source row without its padding -> (states [S', Hk], finals [L, Hk])."""
    enc = model.encoder
    x = ref.f64(model.src_embed.embedding[...])[tokens]
    finals = []
    for i in range(enc.num_layers):
        h = np.zeros(enc.hidden)
        fwd = []
        for t in range(len(tokens)):
            h = _gru_step(enc.forward_cells[i], h, x[t])
            fwd.append(h)
        outs, final = [np.stack(fwd)], [h]
        if enc.bidirectional:
            h = np.zeros(enc.hidden)
            bwd = []
            for t in reversed(range(len(tokens))):
                h = _gru_step(enc.backward_cells[i], h, x[t])
                bwd.append(h)
            outs.append(np.stack(bwd[::-1]))
            final.append(h)
        x = np.concatenate(outs, axis=-1)
        finals.append(np.concatenate(final))
    return x, np.stack(finals)


def _reference(model, src_row, tgt_row):
    """Teacher-forced logits [T, V] and alignment weights [T, S'] of one example."""
    f = ref.f64
    tokens = [int(t) for t in src_row if t != model.pad_id]
    states, finals = _encode_ref(model, tokens)
    h = np.tanh(finals @ f(model.bridge.kernel[...]) + f(model.bridge.bias[...]))  # [L, H]
    logits, weights = [], []
    for y in tgt_row:
        if model.score_name == "additive":
            p = model.score.params()
            scores = ref.additive(h[-1][None], states, [x[0] for x in p])[0]
        elif model.score_name == "bilinear":
            scores = ref.bilinear(h[-1][None], states, model.score.params()[0])[0]
        else:
            scores = ref.dot(h[-1][None], states)[0]
        w = np.exp(scores - scores.max())
        w /= w.sum()
        ctx = w @ states
        x = np.concatenate([f(model.tgt_embed.embedding[...])[y], ctx])
        new = []
        for i, cell in enumerate(model.decoder_cells):
            x = _gru_step(cell, h[i], x)
            new.append(x)
        h = np.stack(new)
        feats = np.concatenate([h[-1], ctx])
        logits.append(feats @ f(model.out.kernel[...]) + f(model.out.bias[...]))
        weights.append(w)
    return np.stack(logits), np.stack(weights), tokens


@pytest.mark.parametrize(
    "kw",
    [
        dict(score="additive"),
        dict(score="bilinear", num_layers=1, bidirectional=True),
        dict(score="dot", num_layers=1, bidirectional=False),
    ],
    ids=["additive-2layer-bi", "bilinear", "dot"],
)
def test_teacher_forced_logits_and_weights_match_numpy(kw):
    model = _model(1, **kw)
    capture = nnx.capture(functools.partial(_fwd, sow_weights=True), nnx.Intermediate)
    logits, sown = capture(model, SRC, TGT_IN)
    (weights,) = sown["attention_weights"].get_value()
    assert logits.shape == (4, 3, TGT_V) and logits.dtype == jnp.float32
    assert weights.shape == (4, 3, 5)
    for b in range(SRC.shape[0]):
        want_logits, want_w, _ = _reference(model, SRC[b], TGT_IN[b])
        np.testing.assert_allclose(logits[b], want_logits, **TOL)
        valid = SRC[b] != PAD
        np.testing.assert_allclose(weights[b][:, valid], want_w, **TOL)
        np.testing.assert_array_equal(weights[b][:, ~valid], 0.0)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    if kw["score"] == "additive":  # sowing the weights does not change the output
        np.testing.assert_array_equal(_fwd(model, SRC, TGT_IN), logits)


def test_projected_key_additive_score_equals_additive_scores():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 4)), rng.normal(size=(5, 6))
    p = AdditiveParams(
        *(jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(4, 3), (6, 3), (3,)])
    )
    q, k = jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)
    got = _additive_scores_projected_keys(q, k @ p.w_key, p)
    np.testing.assert_allclose(got, additive_scores(q, k, p), **TOL)


def test_gru_cell_matches_flax_gru_cell():
    ours = _build(lambda: GRUCell(3, 4, rngs=nnx.Rngs(0)), 0)
    theirs = _build(lambda: nnx.GRUCell(3, 4, rngs=nnx.Rngs(1)), 1)
    ours.w_input[...] = theirs.dense_i.kernel[...]
    ours.b_input[...] = theirs.dense_i.bias[...]  # random, non-zero
    ours.w_hidden[...] = theirs.dense_h.kernel[...]
    ours.b_hidden[...] = jnp.zeros(12)  # flax's hidden projection has no bias
    x = jax.random.normal(jax.random.key(0), (2, 3))
    h = jax.random.normal(jax.random.key(1), (2, 4))
    np.testing.assert_allclose(ours(h, x)[0], theirs(h, x)[0], **TOL)


# -------------------------------------------------------------------------------- padding


def test_bidirectional_encoder_respects_lengths():
    enc = _build(lambda: GRUEncoder(3, 4, num_layers=2, rngs=nnx.Rngs(0)), 2)
    run = nnx.jit(lambda enc, x, valid: enc(x, valid))
    x = jax.random.normal(jax.random.key(0), (2, 6, 3))
    lengths = [4, 2]
    valid = jnp.arange(6)[None, :] < jnp.array(lengths)[:, None]
    outs, finals = run(enc, x, valid)
    assert outs.shape == (2, 6, 8) and finals.shape == (2, 2, 8)
    for b, n in enumerate(lengths):
        # Both directions see only the tokens: the same as running the sequence alone.
        alone_outs, alone_finals = run(enc, x[b : b + 1, :n], jnp.ones((1, n), bool))
        np.testing.assert_allclose(outs[b, :n], alone_outs[0], **TOL)
        np.testing.assert_allclose(finals[:, b], alone_finals[:, 0], **TOL)
        np.testing.assert_array_equal(outs[b, n:], 0.0)
        # The top layer's backward final state is its output at the first token.
        np.testing.assert_allclose(finals[1, b, 4:], outs[b, 0, 4:], **TOL)
        np.testing.assert_allclose(finals[1, b, :4], outs[b, n - 1, :4], **TOL)


def test_padding_does_not_change_outputs():
    model = _model(3)
    logits = _fwd(model, SRC, TGT_IN)
    # More padding columns, and different padding lengths, give the same logits.
    wider = np.concatenate([SRC, np.full((4, 3), PAD)], axis=1)
    np.testing.assert_allclose(_fwd(model, wider, TGT_IN), logits, **TOL)
    # Each row alone, with its padding removed, gives the same logits.
    for b in (0, 1, 3):
        alone = SRC[b][SRC[b] != PAD][None]
        np.testing.assert_allclose(_fwd(model, alone, TGT_IN[b : b + 1])[0], logits[b], **TOL)


def test_pad_id_is_taken_from_the_constructor():
    model = _model(4, pad_id=5, bos_id=1, eos_id=2)
    src = np.array([[3, 5, 4, 5], [3, 4, 6, 7]])  # 5 pads the first row
    logits = _fwd(model, src, TGT_IN[:2])
    want, _, tokens = _reference(model, src[0], TGT_IN[0])
    assert tokens == [3, 4]
    np.testing.assert_allclose(logits[0], want, **TOL)


# ------------------------------------------------------------------------------- decoding


def _seq_log_prob(model, src, seqs):
    """Sum of log-probabilities of ``seqs [B, L]`` through the first EOS, and the lengths."""
    tgt_in = np.concatenate([np.full((seqs.shape[0], 1), BOS), seqs[:, :-1]], axis=1)
    logp = np.asarray(jax.nn.log_softmax(_fwd(model, src, tgt_in)), np.float64)
    picked = np.take_along_axis(logp, seqs[..., None], axis=-1)[..., 0]  # [B, L]
    is_eos = seqs == model.eos_id
    first = np.where(is_eos.any(1), is_eos.argmax(1) + 1, seqs.shape[1])  # length incl. EOS
    keep = np.arange(seqs.shape[1])[None, :] < first[:, None]
    return (picked * keep).sum(1), first


def _eos_prone_model(seed):
    model = _model(seed)
    model.out.bias[...] = model.out.bias[...].at[EOS].add(1.5)  # so some rows end early
    return model


def test_greedy_is_the_argmax_of_teacher_forced_logits_on_its_output():
    model = _eos_prone_model(5)
    gen = np.asarray(model.generate(SRC, max_len=6))
    assert gen.shape == (4, 6) and gen.dtype == np.int32
    tgt_in = np.concatenate([np.full((4, 1), BOS), gen[:, :-1]], axis=1)
    argmax = np.asarray(_fwd(model, SRC, tgt_in).argmax(-1))
    ended = False
    for b in range(4):
        eos = np.flatnonzero(gen[b] == EOS)
        n = eos[0] + 1 if len(eos) else 6
        np.testing.assert_array_equal(gen[b, :n], argmax[b, :n])
        np.testing.assert_array_equal(gen[b, n:], PAD)
        ended |= n < 6
    assert ended, "no row ended before max_len: the test would not check PAD after EOS"


def test_beam_search_of_width_one_is_greedy():
    model = _eos_prone_model(5)

    @nnx.jit
    def width_one(model, src):
        states, valid, h0 = model.encode(src)
        *score, keys = model._score(states)
        state = (jnp.swapaxes(h0, 0, 1), keys, states, valid)
        step_fn = lambda t, s: model._log_probs_step(tuple(score), t, s)  # noqa: E731
        first = jnp.full((src.shape[0],), BOS, jnp.int32)
        kw = dict(beam_size=1, max_len=6, eos_id=EOS, pad_id=PAD)
        return beam_search(step_fn, state, first, **kw)[0]

    np.testing.assert_array_equal(width_one(model, SRC), model.generate(SRC, max_len=6))


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_wide_beam_finds_the_exhaustive_best_and_beats_greedy(alpha):
    """With a beam wider than the search space, beam search is exact."""
    model = _eos_prone_model(6)
    src, max_len = SRC[:2], 3
    got = np.asarray(model.generate(src, max_len=max_len, beam_size=32, length_penalty=alpha))
    every = np.array(list(itertools.product(range(TGT_V), repeat=max_len)))  # [V^L, L]
    greedy = np.asarray(model.generate(src, max_len=max_len))
    for b in range(2):
        rows = np.repeat(src[b : b + 1], len(every), axis=0)
        logp, length = _seq_log_prob(model, rows, every)
        score = logp / np.asarray(length_penalty_fn(jnp.asarray(length), alpha))
        best = every[score.argmax()].copy()
        best[length[score.argmax()] :] = PAD
        np.testing.assert_array_equal(got[b], best)
        (g,) = np.flatnonzero((every == greedy[b][None, :]).all(1))
        assert score.max() >= score[g]


def test_generate_jits_inside_a_caller_jit():
    model = _eos_prone_model(7)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, src):  # as the training program's eval step does
        m = nnx.merge(graphdef, state)
        return m(src, TGT_IN), m.generate(src, max_len=6)

    logits, tokens = run(state, SRC)
    np.testing.assert_allclose(logits, _fwd(model, SRC, TGT_IN), **TOL)
    np.testing.assert_array_equal(tokens, model.generate(SRC, max_len=6))


def test_dropout_uses_the_given_rngs():
    model = _model(8, dropout_rate=0.5)
    a = _fwd(model, SRC, TGT_IN, deterministic=False, rngs=nnx.Rngs(dropout=0))
    b = _fwd(model, SRC, TGT_IN, deterministic=False, rngs=nnx.Rngs(dropout=0))
    c = _fwd(model, SRC, TGT_IN, deterministic=False, rngs=nnx.Rngs(dropout=1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # Deterministic calls are dropout-free: they match the reference without dropout.
    want, _, _ = _reference(model, SRC[0], TGT_IN[0])
    np.testing.assert_allclose(_fwd(model, SRC, TGT_IN)[0], want, **TOL)


# --------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(score="cosine"), r"unknown score 'cosine'; expected one of"),
        (dict(hidden=0), r"hidden must be a positive int, got 0"),
        (dict(embed_dim=-2), r"embed_dim must be a positive int, got -2"),
        (dict(num_layers=0), r"num_layers must be a positive int, got 0"),
        (dict(tgt_vocab_size=0), r"tgt_vocab_size must be a positive int, got 0"),
        (dict(dropout_rate=1.0), r"dropout_rate must be in \[0, 1\), got 1.0"),
        (dict(score="dot"), r"score='dot' needs the query size \(hidden=4\) to equal"),
        (dict(eos_id=6), r"eos_id=6 is outside the target vocabulary \[0, 6\)"),
        (dict(src_vocab_size=3, pad_id=4), r"pad_id=4 is outside the source vocabulary"),
    ],
)
def test_bad_constructor_arguments(kw, match):
    args = dict(src_vocab_size=SRC_V, tgt_vocab_size=TGT_V, embed_dim=3, hidden=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        BahdanauSeq2Seq(args.pop("src_vocab_size"), args.pop("tgt_vocab_size"), **args,
                        rngs=nnx.Rngs(0))  # fmt: skip


def test_bad_inputs():
    model = _model(0)
    with pytest.raises(ValueError, match=r"src must be integer tokens \[B, L\], got int64\[5\]"):
        model(SRC[0], TGT_IN)
    for bad in ("abc", None):  # were a NumPy ufunc error and int()'s TypeError, unnamed
        with pytest.raises(ValueError, match=r"src must be integer tokens \[B, L\], got "):
            model(bad, TGT_IN)
    with pytest.raises(ValueError, match=r"tgt_in must be integer tokens \[B, L\], got float32"):
        model(SRC, TGT_IN.astype(np.float32))
    with pytest.raises(ValueError, match=r"src \[4, 5\] and tgt_in \[2, 3\] have different batch"):
        model(SRC, TGT_IN[:2])
    with pytest.raises(ValueError, match=r"max_len must be a positive int, got 0"):
        model.generate(SRC, max_len=0)
    with pytest.raises(ValueError, match=r"beam_size must be a positive int, got 0"):
        model.generate(SRC, max_len=3, beam_size=0)
    with pytest.raises(ValueError, match=r"length_penalty must be a float >= 0, got -1"):
        model.generate(SRC, max_len=3, length_penalty=-1)
    with pytest.raises(
        ValueError, match=r"src must be integer tokens \[B, L\], got int64\[1, 4, 5\]"
    ):
        model.generate(SRC[None], max_len=3)
    with pytest.raises(ValueError, match=r"src holds token ids outside the vocabulary"):
        model(SRC + SRC_V, TGT_IN)
    with pytest.raises(ValueError, match=r"tgt_in holds token ids outside the vocabulary"):
        model(SRC, TGT_IN - TGT_V)


# --------------------------------------------------------------------------------- config


@pytest.mark.parametrize("arg", [None, "small"])
def test_config_builds_the_model_through_the_training_program(arg):
    import pathlib

    from jattn.train import build_model, load_config, validate_config

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "bahdanau_dates.py"
    config = load_config(path, arg)
    validate_config(config)
    options = config.model.to_dict()
    model = nnx.eval_shape(
        lambda: build_model(options, src_vocab_size=SRC_V, tgt_vocab_size=TGT_V, seed=0)
    )
    assert isinstance(model, BahdanauSeq2Seq)
    assert model.hidden == options["hidden"] and model.score_name == options["score"]
    with pytest.raises(ValueError, match=r"config.model: unknown score 'cosine'"):
        build_model(dict(options, score="cosine"), src_vocab_size=9, tgt_vocab_size=6, seed=0)


def test_encoder_takes_float64_inputs_under_x64():
    """Under jax_enable_x64, float64 inputs promoted the GRU state inside the scan and
    broke it (carry float32 in, float64 out); the state keeps its dtype."""
    enc = GRUEncoder(3, 4, num_layers=1, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((2, 5, 3))
    valid = np.arange(5)[None, :] < np.array([5, 2])[:, None]
    ref_outs, ref_final = enc(jnp.asarray(x, jnp.float32), jnp.asarray(valid))
    with jax.enable_x64(True):
        outs, final = enc(jnp.asarray(x, jnp.float64), jnp.asarray(valid))
    assert outs.dtype == ref_outs.dtype == jnp.float32
    np.testing.assert_allclose(outs, ref_outs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(final, ref_final, rtol=1e-5, atol=1e-6)
