"""KV-cache decoding equals the full forward; greedy and beam search against references."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.functional.attention import dot_product_attention
from jattn.functional.masks import key_padding_mask
from jattn.models import (
    BahdanauSeq2Seq,
    DecoderLM,
    RotaryAttention,
    Transformer,
    beam_search,
    greedy_search,
    length_penalty_fn,
)

PAD, BOS, EOS = 0, 1, 2
SMALL = dict(features=16, num_heads=2, mlp_features=32, dropout_rate=0.0, max_len=16)


def _log_softmax(x):
    return np.asarray(jax.nn.log_softmax(jnp.asarray(x)), np.float64)


# ----------------------------------------------------------------------------- the cache


# A user's RotaryAttention reaches every attention layer, cross-attention included.
USER_ROPE = RotaryAttention(dot_product_attention, max_wavelength=100.0)


@pytest.mark.parametrize(
    "positional,pre_norm,layers,attention_fn",
    [("learned", False, 1, None), ("rotary", True, 2, None), ("learned", True, 1, USER_ROPE)],
    ids=["learned", "rotary", "user-rotary-attention"],
)
def test_seq2seq_cache_matches_full_forward(positional, pre_norm, layers, attention_fn):
    model = Transformer(
        9, 7, num_layers=layers, positional=positional, pre_norm=pre_norm, rngs=nnx.Rngs(0),
        attention_fn=attention_fn, **SMALL,
    )  # fmt: skip
    src = jnp.array([[3, 4, 5, 6, 2], [7, 8, 2, 0, 0]])
    tgt = jnp.array([[1, 3, 4, 5, 6, 3], [1, 6, 5, 4, 2, 0]])
    full = nnx.jit(lambda m, s, t: m(s, t))(model, src, tgt)  # [B, T, V]

    @nnx.jit
    def incremental(model, src, tgt):
        memory = model.encode(src)
        kvs = model.decoder.cross_kv(memory)
        step = model._step_fn(kvs, key_padding_mask(src != PAD))
        caches = model.decoder.init_cache(2, 8)
        # multi-token prefill of the first 3 tokens, then single-token steps
        y = model.tgt_embed(tgt[:, :3], jnp.arange(3)[None, :])
        y, caches = model.decoder.step(y, caches, kvs, key_padding_mask(src != PAD))
        first = jax.nn.log_softmax(model._logits(y))

        def body(caches, tokens):  # tokens [B]
            lp, caches = step(tokens[:, None], caches)
            return caches, lp

        caches, rest = jax.lax.scan(body, caches, tgt[:, 3:].T)  # rest [T - 3, B, V]
        return jnp.concatenate([first, rest.transpose(1, 0, 2)], axis=1), caches[0].index

    got, index = incremental(model, src, tgt)
    np.testing.assert_allclose(np.asarray(got), _log_softmax(full), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(index), [6, 6])


@pytest.mark.parametrize("positional", ["learned", "rotary"])
def test_lm_cache_applies_a_user_rotary_attention(positional):
    """RoPE from an ``attention_fn=RotaryAttention(...)`` (its own wavelength, and on top
    of ``positional='rotary'``) is applied at the cache positions as in the forward."""
    model = DecoderLM(11, positional=positional, attention_fn=USER_ROPE, rngs=nnx.Rngs(2), **SMALL)
    tokens = jnp.array([[1, 3, 4, 5, 6, 7], [1, 9, 8, 7, 6, 5]])
    full = model(tokens)
    logits, caches = model.step(tokens[:, :3], model.init_cache(2, 8))
    steps = [logits]
    for t in range(3, 6):
        logits, caches = model.step(tokens[:, t : t + 1], caches)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


def test_lm_cache_with_different_prompt_lengths():
    model = DecoderLM(11, positional="rotary", rngs=nnx.Rngs(1), **SMALL)
    lengths = jnp.array([2, 5, 3])
    prompt = jnp.array([[1, 4, 0, 0, 0], [1, 5, 6, 7, 8], [1, 9, 3, 0, 0]])
    cont = jnp.array([[3, 4, 5], [6, 7, 8], [9, 10, 3]])  # fed after each prompt

    @nnx.jit
    def incremental(model, prompt, lengths, cont):
        caches = model.init_cache(3, 10)
        prefill, caches = model.step(prompt, caches)
        caches = [c._replace(index=lengths) for c in caches]

        def body(caches, tokens):  # tokens [B]
            logits, caches = model.step(tokens[:, None], caches)
            return caches, logits[:, 0]

        _, steps = jax.lax.scan(body, caches, cont.T)  # [T, B, V]
        return prefill, steps.transpose(1, 0, 2)

    prefill, steps = incremental(model, prompt, lengths, cont)
    # the whole sequences, right-padded to one length (causal: padding is never seen)
    seqs = np.zeros((3, 8), np.int32)
    for b, n in enumerate(np.asarray(lengths)):
        seqs[b, : n + 3] = np.concatenate([prompt[b, :n], cont[b]])
    full = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(seqs)))
    for b, n in enumerate(np.asarray(lengths)):
        np.testing.assert_allclose(np.asarray(prefill[b, :n]), full[b, :n], atol=1e-5)
        np.testing.assert_allclose(np.asarray(steps[b]), full[b, n : n + 3], atol=1e-5)


# ----------------------------------------------------------------------------- models


def _stepwise_argmax(forward, prefix, lengths, max_new):
    """Greedy by full forwards: ``forward(tokens [B, L]) -> logits [B, L, V]`` (causal).

    ``prefix [B, P]`` right-padded with ``lengths``; one fixed shape, so one compile.
    """
    batch = prefix.shape[0]
    seq = np.zeros((batch, prefix.shape[1] + max_new), np.int32)
    seq[:, : prefix.shape[1]] = np.asarray(prefix)
    out = np.full((batch, max_new), PAD, np.int32)
    done = np.zeros(batch, bool)
    for j in range(max_new):
        logits = np.asarray(forward(jnp.asarray(seq)))
        for b in range(batch):
            pos = int(lengths[b]) + j
            nxt = int(np.argmax(logits[b, pos - 1]))
            seq[b, pos] = nxt
            if not done[b]:
                out[b, j] = nxt
                done[b] = nxt == EOS
    return out


SRC = jnp.array([[3, 4, 5, 2, 0], [6, 7, 8, 5, 2], [5, 2, 0, 0, 0]])


@pytest.fixture(scope="module")
def seq2seq():
    model = Transformer(9, 6, rngs=nnx.Rngs(3), **SMALL)
    # make EOS likely enough to appear, so PAD-after-EOS is exercised
    model.output.bias[...] = model.output.bias[...].at[EOS].set(3.0)
    return model


def test_seq2seq_greedy_equals_stepwise_argmax_and_beam1(seq2seq):
    got = np.asarray(seq2seq.generate(SRC, max_len=6))
    forward = nnx.jit(lambda m, tgt: m(SRC, tgt))
    want = _stepwise_argmax(lambda t: forward(seq2seq, t), jnp.full((3, 1), BOS), [1, 1, 1], 6)
    np.testing.assert_array_equal(got, want)
    assert (got == EOS).any() and (got[:, -1] != PAD).any(), "exercise EOS and no EOS"
    np.testing.assert_array_equal(np.asarray(seq2seq.generate(SRC, max_len=6, beam_size=1)), got)


def _seq_score(log_probs, tokens, alpha):
    """Length-penalised score of generated ``tokens`` (up to EOS) under teacher forcing."""
    total, n = 0.0, 0
    for t, tok in enumerate(tokens):
        total += log_probs[t, tok]
        n += 1
        if tok == EOS:
            break
    return total / ((5 + n) / 6) ** alpha


def test_seq2seq_beam_equals_brute_force(seq2seq):
    vocab, max_len, alpha = 6, 3, 0.6
    # every output: tokens ending in EOS, or max_len tokens without EOS
    cands = [
        seq
        for n in range(1, max_len + 1)
        for seq in itertools.product(range(vocab), repeat=n)
        if (seq[-1] == EOS or n == max_len) and EOS not in seq[:-1]
    ]
    beam = np.asarray(seq2seq.generate(SRC, max_len=max_len, beam_size=8, length_penalty=alpha))
    # greedy to max_len is the prefix of greedy to 6 (same compile as the test above)
    greedy = np.asarray(seq2seq.generate(SRC, max_len=6))[:, :max_len]
    forward = nnx.jit(lambda m, s, t: m(s, t))
    tgt = jnp.array([[BOS, *seq] + [PAD] * (max_len - len(seq)) for seq in cands])
    beats_greedy = 0
    for b in range(SRC.shape[0]):
        lp = _log_softmax(forward(seq2seq, jnp.repeat(SRC[b : b + 1], len(cands), axis=0), tgt))
        scores = [_seq_score(lp[i], seq, alpha) for i, seq in enumerate(cands)]
        best = cands[int(np.argmax(scores))]
        np.testing.assert_array_equal(beam[b], list(best) + [PAD] * (max_len - len(best)))
        g = (
            tuple(int(t) for t in greedy[b][: list(greedy[b]).index(EOS) + 1])
            if EOS in greedy[b]
            else tuple(int(t) for t in greedy[b])
        )
        greedy_score = scores[cands.index(g)]
        assert greedy_score <= max(scores) + 1e-6
        beats_greedy += greedy_score < max(scores) - 1e-6
    assert beats_greedy >= 1, "the case should have beam search beat greedy"


def test_lm_generate_equals_stepwise_argmax():
    model = DecoderLM(8, positional="rotary", rngs=nnx.Rngs(2), **SMALL)
    prompt = jnp.array([[1, 4, 5, 0], [1, 3, 0, 0], [1, 6, 7, 4]])
    lengths = jnp.array([3, 2, 4])
    got = np.asarray(model.generate(prompt, lengths, max_new_tokens=5))
    forward = nnx.jit(lambda m, t: m(t))
    want = _stepwise_argmax(lambda t: forward(model, t), prompt, np.asarray(lengths), 5)
    np.testing.assert_array_equal(got, want)
    assert (got == EOS).any() and (got[:, -1] != PAD).any(), "exercise EOS and no EOS"
    # beam search through the prefilled caches scores at least as well as greedy
    beam = np.asarray(model.generate(prompt, lengths, max_new_tokens=5, beam_size=3))

    def score(new):
        seq = np.zeros((3, 9), np.int32)
        for b, n in enumerate(np.asarray(lengths)):
            seq[b, :n], seq[b, n : n + 5] = prompt[b, :n], new[b]
        lp = _log_softmax(forward(model, jnp.asarray(seq)))
        return [
            _seq_score(lp[b, n - 1 : n + 4], new[b], 0.6) for b, n in enumerate(np.asarray(lengths))
        ]

    assert all(s_b >= s_g - 1e-5 for s_b, s_g in zip(score(beam), score(got), strict=True))
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        model.generate(prompt, lengths, max_new_tokens=20)
    with pytest.raises(ValueError, match=r"prompt_lengths must have shape \[B\]"):
        model.generate(prompt, lengths[:2], max_new_tokens=2)
    for bad in ([0, 2, 3], [2, 5, 3]):  # each prompt holds 1..P tokens
        with pytest.raises(ValueError, match=r"prompt_lengths must be in \[1, 4\]"):
            model.generate(prompt, jnp.array(bad), max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_lengths must be integers"):
        model.generate(prompt, lengths.astype(jnp.float32), max_new_tokens=2)
    with pytest.raises(ValueError, match="beam_size must be a positive int, got 0"):
        model.generate(prompt, lengths, max_new_tokens=2, beam_size=0)
    with pytest.raises(ValueError, match="length_penalty must be a float >= 0"):
        model.generate(prompt, lengths, max_new_tokens=2, beam_size=2, length_penalty=-1.0)
    same = model.generate(prompt, lengths, max_new_tokens=np.int64(5))  # NumPy ints are ints
    np.testing.assert_array_equal(np.asarray(same), np.asarray(got))
    # a cache that is full refuses more tokens instead of overwriting its last slot
    _, caches = model.step(prompt, model.init_cache(3, 4))
    with pytest.raises(ValueError, match=r"the cache is full: writing 1 tokens at index"):
        model.step(prompt[:, :1], caches)
    with pytest.raises(ValueError, match="5 new tokens do not fit a cache of 4 positions"):
        model.step(jnp.ones((3, 5), jnp.int32), model.init_cache(3, 4))


def test_generate_inside_jit_and_errors(seq2seq):
    out = nnx.jit(lambda m, s: m.generate(s, max_len=6))(seq2seq, SRC)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(seq2seq.generate(SRC, max_len=6)))
    with pytest.raises(ValueError, match=r"max_len must be an int in \[1, 16\]"):
        seq2seq.generate(SRC, max_len=17)
    np.testing.assert_array_equal(
        np.asarray(seq2seq.generate(SRC, max_len=np.int64(6))), np.asarray(out)
    )
    with pytest.raises(ValueError, match="beam_size must be a positive int"):
        seq2seq.generate(SRC, max_len=3, beam_size=0)
    with pytest.raises(ValueError, match="length_penalty must be a float >= 0, got -1"):
        seq2seq.generate(SRC, max_len=3, beam_size=2, length_penalty=-1)


def test_generate_checks_token_ids_before_its_own_jit(seq2seq):
    """generate runs the model under the library's own jit, where the forward pass's
    check sees only tracers: ids outside the vocabulary (also int64 ones that an int32
    conversion would wrap into range) are checked first."""
    bad = jnp.asarray([[3, 4, 50, 2]])
    with pytest.raises(ValueError, match=r"src holds token ids outside .*\[0, 9\): .*max 50"):
        seq2seq.generate(bad, max_len=3)
    lm = DecoderLM(11, rngs=nnx.Rngs(0), **SMALL)
    with pytest.raises(ValueError, match=r"prompt_tokens holds token ids .*min -1"):
        lm.generate(jnp.asarray([[3, 4, -1]]), jnp.asarray([3]), max_new_tokens=2)
    huge = np.array([[2**32 + 3, 4]], np.int64)  # int32 would read it as 3
    with pytest.raises(ValueError, match="max 4294967299"):
        lm(huge)
    with pytest.raises(ValueError, match=r"tokens holds token ids .*max 11"):
        lm.step(jnp.asarray([[11]]), lm.init_cache(1, 4))  # the cached path checks too
    rnn = BahdanauSeq2Seq(9, 6, embed_dim=8, hidden=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"src holds token ids outside the vocabulary \[0, 9\)"):
        rnn.generate(bad, max_len=3)
    with pytest.raises(ValueError, match=r"src \[1, 4\] and tgt_in \[2, 3\] have different"):
        seq2seq(bad[:, :4] % 9, jnp.ones((2, 3), jnp.int32))


def test_model_options_take_numpy_ints_and_reject_bools():
    lm = DecoderLM(11, positional="learned", rngs=nnx.Rngs(0), **SMALL)
    with pytest.raises(ValueError, match="a cache of 17 positions outruns the learned position"):
        lm.init_cache(1, 17)  # positions past the table were clipped: wrong logits
    for kw in ({"num_layers": True}, {"max_len": True}):
        with pytest.raises(ValueError, match="must be a positive int, got True"):
            DecoderLM(11, rngs=nnx.Rngs(0), **{**SMALL, **kw})
    with pytest.raises(ValueError, match="the vocabulary size must be a positive int, got True"):
        DecoderLM(True, rngs=nnx.Rngs(0), **SMALL)


# ------------------------------------------------------------- search on a bigram model


def _bigram(rows):
    """A Markov 'model': log-probs of the next token depend on the last token only."""
    table = np.full((5, 5), 1e-6)
    for prev, probs in rows.items():
        for tok, p in probs.items():
            table[prev, tok] = p
    table /= table.sum(1, keepdims=True)
    return np.log(table)


# PAD=0 BOS=1 EOS=2 A=3 B=4. Greedy takes A (0.55) then wanders; B EOS has probability 0.43.
TABLE = _bigram(
    {
        1: {3: 0.55, 4: 0.45},
        3: {3: 0.36, 4: 0.34, 2: 0.30},
        4: {2: 0.95, 3: 0.05},
        0: {0: 1.0},
        2: {0: 1.0},
    }
)


def _step(tokens, state):
    return jnp.asarray(TABLE, jnp.float32)[tokens[:, 0]], state + 1


def _brute_force(max_len, alpha):
    best, best_seq = -np.inf, None
    for n in range(1, max_len + 1):
        for seq in itertools.product(range(5), repeat=n):
            if EOS in seq[:-1] or (seq[-1] != EOS and n < max_len):
                continue
            lp = sum(TABLE[a, b] for a, b in zip((BOS, *seq[:-1]), seq, strict=True))
            score = lp / ((5 + n) / 6) ** alpha
            if score > best:
                best, best_seq = score, list(seq)
    return best, best_seq + [PAD] * (max_len - len(best_seq))


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_beam_search_beats_greedy_on_bigram(alpha):
    max_len = 4
    state = jnp.zeros((2,), jnp.int32)
    first = jnp.full((2,), BOS, jnp.int32)
    ids = dict(eos_id=EOS, pad_id=PAD)
    search = jax.jit(
        lambda w: beam_search(
            _step, state, first, beam_size=w, max_len=max_len, length_penalty=alpha, **ids
        ),
        static_argnums=0,
    )
    greedy = np.asarray(jax.jit(lambda: greedy_search(_step, state, first, max_len=4, **ids))())
    np.testing.assert_array_equal(greedy, [[3, 3, 3, 3]] * 2)
    tokens, scores = search(1)
    np.testing.assert_array_equal(np.asarray(tokens), greedy)  # beam 1 == greedy
    want_score, want_seq = _brute_force(max_len, alpha)
    tokens, scores = search(3)
    np.testing.assert_array_equal(np.asarray(tokens), [want_seq] * 2)
    np.testing.assert_allclose(np.asarray(scores), want_score, rtol=1e-5)
    assert want_seq[:2] == [4, EOS]  # B EOS beats greedy's A A A A
    lp = length_penalty_fn(jnp.array([1, 4]), 0.6)
    np.testing.assert_allclose(np.asarray(lp), [1.0, (9 / 6) ** 0.6], rtol=1e-6)


def test_greedy_pads_after_eos():
    table = _bigram({1: {4: 1.0}, 4: {2: 1.0}, 2: {3: 1.0}, 3: {3: 1.0}, 0: {0: 1.0}})

    def step(tokens, state):
        return jnp.asarray(table, jnp.float32)[tokens[:, 0]], state

    first = jnp.array([BOS, 3], jnp.int32)
    out = greedy_search(step, jnp.zeros((2,)), first, max_len=4, eos_id=EOS, pad_id=PAD)
    np.testing.assert_array_equal(np.asarray(out), [[4, 2, 0, 0], [3, 3, 3, 3]])


def test_flax_style_decode_reads_its_cache_dtype_and_names_bad_calls():
    """Were a dtype error on every step, a raw broadcasting error, a layer left in
    decode mode by a refused set_view, and clamped writes past the cache under jit."""
    from jattn.layers import MultiHeadAttention

    layer = MultiHeadAttention(2, 8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 4, 8))
    whole = layer(x, is_causal=True)
    layer.init_cache((2, 6, 8), dtype=jnp.bfloat16)  # a bfloat16 cache, float32 parameters
    steps = jnp.concatenate([layer(x[:, t : t + 1], decode=True) for t in range(4)], axis=1)
    assert steps.dtype == jnp.float32
    np.testing.assert_allclose(steps, whole, atol=2e-2)  # keys and values rounded to bfloat16
    layer.init_cache((2, 6, 8))
    with pytest.raises(ValueError, match=r"mask of shape \[2, 1, 1, 5\] does not broadcast to "
                       r"\[..., N, T, max_length\] \(the cache\) = \[2, 2, 1, 6\]"):  # fmt: skip
        layer(x[:, :1], decode=True, mask=jnp.ones((2, 1, 1, 5), bool))
    with pytest.raises(TypeError, match="pass both batch_size and max_length"):
        layer.set_view(decode=True, batch_size=2)
    assert layer.decode is False  # unchanged by the refused call
    layer.init_cache((2, 3, 8))
    step = nnx.jit(lambda layer, x: layer(x, decode=True))
    outs = [step(layer, x[:, :1]) for _ in range(4)]  # one more than the cache holds
    assert all(bool(jnp.isfinite(o).all()) for o in outs[:3]) and bool(jnp.isnan(outs[3]).all())


def test_rewind_cache_checks_its_index():
    from jattn.models import cache_index, rewind_cache

    model = DecoderLM(20, num_layers=1, rngs=nnx.Rngs(0), **SMALL)
    cache = model.init_cache(3, 8)
    tokens = jnp.ones((3, 4), jnp.int32)
    _, cache = model.step(tokens, cache)
    back = rewind_cache(cache, 2)  # an int rewinds every example
    np.testing.assert_array_equal(cache_index(cache), [4, 4, 4])
    np.testing.assert_array_equal(cache_index(back), [2, 2, 2])
    with pytest.raises(ValueError, match=r"index has shape \[2\]; the cache holds B=3"):
        rewind_cache(cache, jnp.array([1, 2]))
    with pytest.raises(ValueError, match=r"index must be in \[0, 8\].*\[-3, 0, 0\]"):
        rewind_cache(cache, jnp.array([-3, 0, 0]))
    with pytest.raises(TypeError, match=r"index must be an int or an int array \[B\], got float32"):
        rewind_cache(cache, jnp.array([1.0, 2.0, 3.0]))


def test_decoding_functions_name_bad_inputs():
    """Were errors from inside JAX (vmap's inconsistent sizes, dot_general's shapes,
    dynamic_update_slice's ranks) or an AttributeError; a negative length penalty,
    refused by the models' generate, was taken by beam_search."""
    from jattn.layers import MultiHeadAttention
    from jattn.models import (
        cached_cross_attention,
        cached_self_attention,
        cross_attention_kv,
        init_cache,
    )

    layer = MultiHeadAttention(2, 8, rngs=nnx.Rngs(0))
    cache, x = init_cache(layer, 2, 4), jnp.ones((2, 1, 8))
    for bad in (jnp.ones((3, 1, 8)), jnp.ones((2, 1, 6)), jnp.ones((1, 8))):
        with pytest.raises(ValueError, match=r"x must have shape \[B, L, 8\] \(B=2, the cache's\)"):
            cached_self_attention(layer, bad, cache)
    with pytest.raises(TypeError, match="cache must be a KVCache \\(init_cache\\), got NoneType"):
        cached_self_attention(layer, x, None)
    with pytest.raises(ValueError, match=r"memory must have shape \[B, L, 8\], got \[2, 3, 6\]"):
        cross_attention_kv(layer, jnp.ones((2, 3, 6)))
    kv = cross_attention_kv(layer, jnp.ones((2, 3, 8)))
    with pytest.raises(ValueError, match=r"y must have shape \[B, L, 8\] \(B=2, the memory's\)"):
        cached_cross_attention(layer, jnp.ones((1, 1, 8)), kv, None)

    def step(tokens, state):  # [B, 1, V]: the token axis kept by mistake
        return jax.nn.one_hot(tokens, 5), state

    first = jnp.asarray([1, 3])
    for search, rows in ((greedy_search, 2), (functools.partial(beam_search, beam_size=2), 4)):
        shape = rf"\[B, 1\] with B={rows}, got log_probs of shape \[{rows}, 1, 5\]"
        with pytest.raises(ValueError, match=rf"step_fn must return .* for tokens {shape}"):
            search(step, None, first, max_len=3, eos_id=2, pad_id=0)
    with pytest.raises(ValueError, match="length_penalty must be a float >= 0, got -0.5"):
        beam_search(step, None, first, beam_size=2, max_len=3, eos_id=2, pad_id=0,
                    length_penalty=-0.5)  # fmt: skip
