"""Transformer models: encoder-decoder, decoder-only language model, encoder classifier.

Tokens are embedded, scaled by ``sqrt(D)``, added to a positional encoding and passed
through dropout (Vaswani et al.). ``positional`` is ``'sinusoidal'`` (d2l's formula),
``'learned'`` (a table of ``max_len`` rows) or ``'rotary'`` (no additive encoding;
RoPE in every self-attention layer) or ``'none'`` (positions come from a score_mod
such as ALiBi or T5's relative bias). Padding masks come from the token ids
(``pad_id``); sequences are right-padded.

Dropout follows Flax's convention: ``model.train()`` turns it on in every layer,
``model.eval()`` off (the state a model is built in); a call's ``deterministic=None``
(the default) uses that mode, an explicit ``deterministic=`` wins. Without ``rngs``
each dropout site draws fresh keys from its own stream.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn._model_config import config_class
from jattn.functional import _sharding
from jattn.functional._checks import (
    check_flag,
    check_int_array,
    check_positive_int,
    check_size,
    concrete,
    is_int,
)
from jattn.functional.masks import key_padding_mask
from jattn.layers.axes import names
from jattn.layers.composite import pattern_names
from jattn.layers.dropout import Dropout, TrainEval, per_site_rngs
from jattn.layers.positional import LearnedPositionalEmbedding, SinusoidalEncoding, embed_ids
from jattn.models._validate import (
    check_search_options,
    check_special_ids,
    check_tokens,
)
from jattn.models.blocks import (
    LAYER_TYPES,
    TransformerDecoder,
    TransformerEncoder,
    _check_config,
)
from jattn.models.decoding import (
    KVCache,
    beam_search,
    cache_index,
    greedy_search,
    per_example,
    rewind_cache,
)

__all__ = [
    "Transformer",
    "DecoderLM",
    "EncoderClassifier",
    "TransformerConfig",
    "DecoderLMConfig",
    "EncoderClassifierConfig",
]

_POSITIONAL = ("sinusoidal", "learned", "rotary", "none")


def _output_layer(features: int, vocab_size: int, *, rngs: nnx.Rngs) -> nnx.Linear:
    """The projection ``[D] -> [vocab]`` to the logits."""
    return nnx.Linear(
        features,
        vocab_size,
        kernel_metadata=names("embed", "vocab"),
        bias_metadata=names("vocab"),
        rngs=rngs,
    )


class _Embedding(TrainEval, nnx.Module):
    """Token embedding * sqrt(D) + positional encoding, then dropout."""

    def __init__(self, vocab_size, features, max_len, positional, dropout_rate, *, rngs):
        if positional not in _POSITIONAL:
            raise ValueError(f"positional must be one of {_POSITIONAL}, got {positional!r}")
        check_positive_int("vocab_size", vocab_size)
        check_positive_int("max_len", max_len)
        self.features = features
        self.max_len = max_len
        self.token = nnx.Embed(
            vocab_size, features, embedding_metadata=names("vocab", "embed"), rngs=rngs
        )
        if positional == "sinusoidal":
            self.position = SinusoidalEncoding(features, max_len)
        elif positional == "learned":
            self.position = LearnedPositionalEmbedding(max_len, features, rngs=rngs)
        else:
            self.position = None
        self.dropout = Dropout(dropout_rate, deterministic=True, rngs=rngs)
        self.deterministic = True

    def __call__(self, tokens, positions=None, *, deterministic=None, rngs=None):
        """``tokens [B, T]`` at ``positions [B, T]`` (default ``0..T-1``) -> ``[B, T, D]``.

        Token ids are checked by the models' entry points (``_validate.check_tokens``)."""
        deterministic = self._deterministic(deterministic)
        x = embed_ids(self.token, tokens, out_sharding=_sharding.like(tokens))
        x = x * math.sqrt(self.features)
        if self.position is not None:
            if positions is None:
                positions = jnp.arange(tokens.shape[-1], dtype=jnp.int32)[None, :]
            x = x + self.position(positions).astype(x.dtype)
        return self.dropout(x, deterministic=deterministic, rngs=rngs)


def _check_nonempty(name, tokens, *, length: bool = True):
    """A ValueError naming ``name`` and its shape when ``tokens [B, L]`` holds no
    sequence (B = 0) or, with ``length``, sequences of no tokens (L = 0): nothing to
    decode from."""
    if tokens.shape[0] == 0 or (length and tokens.shape[1] == 0):
        what = "one sequence (B >= 1)" if tokens.shape[0] == 0 else "one token (L >= 1)"
        raise ValueError(
            f"{name} must hold at least {what} to decode from, got shape {list(tokens.shape)}"
        )


def _stack_options(features, num_heads, mlp_features, dropout_rate, pre_norm, activation,
                   layer_norm_eps, final_norm, attention_fn, score, positional,
                   mask_mod=None, score_mod=None, attention="softmax", layer_pattern=None,
                   local_window=None):  # fmt: skip
    """Validates the options (before any parameter is created) and returns the stack kwargs."""
    if mlp_features is None and is_int(features):
        mlp_features = 4 * features
    _check_config(features, num_heads, mlp_features, dropout_rate, activation, layer_norm_eps,
                  pre_norm)  # fmt: skip
    if positional not in _POSITIONAL:
        raise ValueError(f"positional must be one of {_POSITIONAL}, got {positional!r}")
    if final_norm is not None:  # "yes" was taken as True
        check_flag("final_norm", final_norm)
    if positional == "sinusoidal" and features % 2:
        raise ValueError(f"sinusoidal encoding needs an even positive features, got {features!r}")
    return dict(
        features=features,
        num_heads=num_heads,
        mlp_features=mlp_features,
        dropout_rate=dropout_rate,
        pre_norm=pre_norm,
        activation=activation,
        layer_norm_eps=layer_norm_eps,
        final_norm=pre_norm if final_norm is None else final_norm,
        attention_fn=attention_fn,
        score=score,
        rotary=positional == "rotary",
        mask_mod=mask_mod,
        score_mod=score_mod,
        attention=attention,
        layer_pattern=layer_pattern,
        local_window=local_window,
    )


def _check_bidirectional(attention: str, layer_pattern=None) -> None:
    if attention in ("retention", "gla"):
        raise ValueError(
            f"attention={attention!r} is causal only, and this model's encoder attends both "
            "ways: use it in a DecoderLM, or 'linear'/'performer' here"
        )
    if layer_pattern is None:
        return
    for kinds in pattern_names(layer_pattern, LAYER_TYPES, name="layer_pattern", parallel=True):
        kind = next((k for k in kinds.split("+") if k in ("retention", "gla")), None)
        if kind is not None:
            raise ValueError(
                f"layer_pattern {layer_pattern!r} has {kind!r} layers, which are causal only, "
                "and this model's encoder attends both ways: use them in a DecoderLM"
            )


class Transformer(TrainEval, nnx.Module):
    """The encoder-decoder Transformer (Vaswani et al. 2017).

    Submodules: ``src_embed``, ``tgt_embed`` (token ``.token`` + ``.position``),
    ``encoder`` (:class:`TransformerEncoder`), ``decoder`` (:class:`TransformerDecoder`),
    ``output`` (``nnx.Linear`` to the target vocabulary, ``None`` with
    ``share_embeddings``, which ties source, target and output embeddings).

    Args:
      src_vocab_size, tgt_vocab_size: vocabulary sizes.
      num_layers: layers of encoder and decoder, unless ``num_encoder_layers`` /
        ``num_decoder_layers`` are given.
      features: D. num_heads: N (D % N == 0). mlp_features: F (default 4 D).
      dropout_rate: on embeddings, attention weights, sublayer outputs and FFN hidden.
      max_len: longest sequence (size of the learned position table; cache size bound).
      pre_norm: pre-LN blocks; final_norm: LayerNorm after each stack (default: pre_norm).
      positional: ``'sinusoidal'``, ``'learned'``, ``'rotary'`` or ``'none'`` (no
        position embedding: with ALiBi or T5 score_mods).
      activation: ``'relu'`` or ``'gelu'``.
      pad_id, bos_id, eos_id: special token ids.
      attention_fn, score: passed to every attention layer (see :mod:`jattn.models.blocks`).
      mask_mod, score_mod: the self-attention pattern of every layer of both stacks, or
        a list with one per layer (:mod:`jattn.mods`; config data as in
        :mod:`jattn.layers.patterns`, e.g. ``{"name": "sliding_window", "window":
        [16, 0]}``, ``{"name": "alibi"}`` with ``positional="none"``); the decoder's
        stays causal.
      attention: the self-attention mechanism of every layer: ``"softmax"`` or a
        :class:`jattn.layers.LinearAttention` kind (``"linear"``, ``"performer"``; the
        causal-only ``"retention"`` and ``"gla"`` where every self-attention is causal:
        :class:`DecoderLM`). Linear layers decode with a constant-size state.
      layer_pattern: instead of ``attention``, a type per layer, as a config can give
        it: ``"local, local, global"`` or a list, repeated over each stack's layers;
        types ``"global"``, ``"local"`` (a sliding window of ``local_window``
        positions each side, only the earlier one in causal stacks) and the
        LinearAttention kinds, or several joined by ``+`` (``"global+local"``: one
        layer of gated parallel branches, :class:`jattn.layers.ParallelAttention`),
        all of which decode (:mod:`jattn.models.blocks`).
      local_window: the window of the ``"local"`` layers (a positive int).
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        *,
        num_layers: int = 2,
        num_encoder_layers: int | None = None,
        num_decoder_layers: int | None = None,
        features: int = 128,
        num_heads: int = 4,
        mlp_features: int | None = None,
        dropout_rate: float = 0.1,
        max_len: int = 256,
        pre_norm: bool = False,
        final_norm: bool | None = None,
        positional: str = "sinusoidal",
        activation: str = "relu",
        layer_norm_eps: float = 1e-5,
        pad_id: int = 0,
        bos_id: int = 1,
        eos_id: int = 2,
        share_embeddings: bool = False,
        attention_fn: Callable | None = None,
        score=None,
        mask_mod=None,
        score_mod=None,
        attention: str = "softmax",
        layer_pattern=None,
        local_window: int | None = None,
        rngs: nnx.Rngs,
    ):
        check_size("src_vocab_size", src_vocab_size)
        check_size("tgt_vocab_size", tgt_vocab_size)
        share_embeddings = check_flag("share_embeddings", share_embeddings)
        if share_embeddings and src_vocab_size != tgt_vocab_size:
            raise ValueError(
                f"share_embeddings needs src_vocab_size == tgt_vocab_size, "
                f"got {src_vocab_size} and {tgt_vocab_size}"
            )
        opts = _stack_options(features, num_heads, mlp_features, dropout_rate, pre_norm,
                              activation, layer_norm_eps, final_norm, attention_fn, score,
                              positional, mask_mod, score_mod, attention, layer_pattern,
                              local_window)  # fmt: skip
        self.src_embed = _Embedding(
            src_vocab_size, features, max_len, positional, dropout_rate, rngs=rngs
        )
        if share_embeddings:
            self.tgt_embed = _Embedding(
                tgt_vocab_size, features, max_len, positional, dropout_rate, rngs=rngs
            )
            self.tgt_embed.token = self.src_embed.token
            self.output = None
        else:
            self.tgt_embed = _Embedding(
                tgt_vocab_size, features, max_len, positional, dropout_rate, rngs=rngs
            )
            self.output = _output_layer(features, tgt_vocab_size, rngs=rngs)
        # num_layers is checked by the stacks; an override is checked here, by its name
        for name, value in (("num_encoder_layers", num_encoder_layers),
                            ("num_decoder_layers", num_decoder_layers)):  # fmt: skip
            if value is not None:
                check_positive_int(name, value)
        check_special_ids(tgt_vocab_size, "target vocabulary", vocab_name="tgt_vocab_size",
                          pad_id=pad_id, bos_id=bos_id,
                          eos_id=eos_id)  # fmt: skip
        check_special_ids(
            src_vocab_size, "source vocabulary", vocab_name="src_vocab_size", pad_id=pad_id
        )
        _check_bidirectional(attention, layer_pattern)
        enc = num_layers if num_encoder_layers is None else num_encoder_layers
        dec = num_layers if num_decoder_layers is None else num_decoder_layers
        self.encoder = TransformerEncoder(enc, rngs=rngs, **opts)
        self.decoder = TransformerDecoder(dec, rngs=rngs, **opts)
        self.max_len = max_len
        self.deterministic = True  # eval; train() / eval() switch every layer
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

    def _logits(self, y):
        if self.output is None:
            return self.tgt_embed.token.attend(y).astype(jnp.float32)
        return self.output(y).astype(jnp.float32)

    def encode(self, src, *, deterministic=None, rngs=None, sow_weights=False) -> jax.Array:
        """``src [B, S]`` -> memory ``[B, S, D]`` (padding keys masked)."""
        deterministic = self._deterministic(deterministic)
        rngs = per_site_rngs(rngs)
        src = check_tokens("src", src, self.max_len, vocab_size=self.src_embed.token.num_embeddings)
        x = self.src_embed(src, deterministic=deterministic, rngs=rngs)
        mask = key_padding_mask(src != self.pad_id)
        return self.encoder(x, mask=mask, deterministic=deterministic, rngs=rngs,
                            sow_weights=sow_weights)  # fmt: skip

    def decode(self, tgt_in, memory, src, *, deterministic=None, rngs=None, sow_weights=False):
        """Teacher-forced decoder: ``tgt_in [B, T]``, ``memory [B, S, D]``, ``src [B, S]``
        (for its padding mask) -> logits ``[B, T, V]`` float32 (causal self-attention)."""
        deterministic = self._deterministic(deterministic)
        rngs = per_site_rngs(rngs)
        tgt_in = check_tokens(
            "tgt_in", tgt_in, self.max_len, vocab_size=self.tgt_embed.token.num_embeddings
        )
        y = self.tgt_embed(tgt_in, deterministic=deterministic, rngs=rngs)
        y = self.decoder(y, memory, cross_mask=key_padding_mask(src != self.pad_id),
                         deterministic=deterministic, rngs=rngs,
                         sow_weights=sow_weights)  # fmt: skip
        return self._logits(y)

    def __call__(self, src, tgt_in, *, deterministic=None, rngs=None, sow_weights=False):
        """``src [B, S]``, ``tgt_in [B, T]`` (starting with BOS) -> logits ``[B, T, V]`` float32.

        ``deterministic=None`` uses the model's mode (``train()`` / ``eval()``)."""
        deterministic = self._deterministic(deterministic)
        rngs = per_site_rngs(rngs)
        if jnp.ndim(src) == 2 == jnp.ndim(tgt_in) and jnp.shape(src)[0] != jnp.shape(tgt_in)[0]:
            raise ValueError(
                f"src {list(jnp.shape(src))} and tgt_in {list(jnp.shape(tgt_in))} have "
                "different batch sizes"
            )
        kw = dict(deterministic=deterministic, rngs=rngs, sow_weights=sow_weights)
        memory = self.encode(src, **kw)
        return self.decode(tgt_in, memory, src, **kw)

    def generate(self, src, *, max_len: int, beam_size: int = 1, length_penalty: float = 0.6):
        """Greedy (``beam_size=1``) or beam search: ``src [B, S]`` -> tokens ``[B, max_len]``.

        Output has no BOS; tokens after EOS are PAD. Compiled once per shape and options.
        """
        src = check_tokens("src", src, self.max_len, vocab_size=self.src_embed.token.num_embeddings)
        _check_nonempty("src", src, length=False)
        if not is_int(max_len) or not 0 < max_len <= self.max_len:
            raise ValueError(f"max_len must be an int in [1, {self.max_len}], got {max_len!r}")
        max_len = int(max_len)
        beam_size, length_penalty = check_search_options(beam_size, length_penalty)
        return per_example(
            lambda model, src: _generate_seq2seq(model, src, max_len, beam_size, length_penalty),
            self,
            src,
        )

    def _step_fn(self, cross_kvs, cross_mask):
        def step(tokens, caches):
            positions = cache_index(caches)[:, None]  # [B, 1]
            y = self.tgt_embed(tokens, positions)
            y, caches = self.decoder.step(y, caches, cross_kvs, cross_mask)
            return jax.nn.log_softmax(self._logits(y)[:, -1]), caches

        return step


def _generate_seq2seq(model: Transformer, src, max_len, beam_size, length_penalty):
    """Compiled with ``jax.jit`` over the model's split state, not ``nnx.jit``: that
    writes the state back after the call, which inside a caller's own ``jax.jit`` (the
    model captured, not passed) fails with flax's TraceContextError half way and leaves
    the model without its attributes. Decoding changes no state: nothing to write back."""
    graphdef, state = nnx.split(model)
    return _generate_seq2seq_jit(graphdef, state, src, max_len, beam_size, length_penalty)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _generate_seq2seq_jit(graphdef, state, src, max_len, beam_size, length_penalty):
    model = nnx.merge(graphdef, state)
    return _generate_seq2seq_body(model, src, max_len, beam_size, length_penalty)


def _generate_seq2seq_body(model: Transformer, src, max_len, beam_size, length_penalty):
    batch = src.shape[0]
    memory = model.encode(src)
    src_valid = src != model.pad_id
    if beam_size > 1:
        memory = jnp.repeat(memory, beam_size, axis=0)
        src_valid = jnp.repeat(src_valid, beam_size, axis=0)
    cross_kvs = model.decoder.cross_kv(memory)
    step = model._step_fn(cross_kvs, key_padding_mask(src_valid))
    caches = model.decoder.init_cache(batch, max_len, memory.dtype)
    first = jnp.full((batch,), model.bos_id, jnp.int32)
    ids = dict(eos_id=model.eos_id, pad_id=model.pad_id)
    if beam_size == 1:
        return greedy_search(step, caches, first, max_len=max_len, **ids)
    tokens, _ = beam_search(step, caches, first, beam_size=beam_size, max_len=max_len,
                            length_penalty=length_penalty, **ids)  # fmt: skip
    return tokens


class DecoderLM(TrainEval, nnx.Module):
    """A decoder-only (GPT-style) language model: causal self-attention blocks, no cross-attention.

    Submodules: ``embed`` (token ``.token`` + ``.position``), ``decoder`` (a
    :class:`TransformerEncoder` run with a causal mask), ``output`` (``nnx.Linear``, or
    ``None`` with ``tie_embeddings``). Options as :class:`Transformer`. Sequences are
    right-padded; causality alone keeps real positions from seeing the padding.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        num_layers: int = 2,
        features: int = 128,
        num_heads: int = 4,
        mlp_features: int | None = None,
        dropout_rate: float = 0.1,
        max_len: int = 256,
        pre_norm: bool = True,
        final_norm: bool | None = None,
        positional: str = "sinusoidal",
        activation: str = "relu",
        layer_norm_eps: float = 1e-5,
        pad_id: int = 0,
        bos_id: int = 1,
        eos_id: int = 2,
        tie_embeddings: bool = False,
        attention_fn: Callable | None = None,
        score=None,
        mask_mod=None,
        score_mod=None,
        attention: str = "softmax",
        layer_pattern=None,
        local_window: int | None = None,
        rngs: nnx.Rngs,
    ):
        opts = _stack_options(features, num_heads, mlp_features, dropout_rate, pre_norm,
                              activation, layer_norm_eps, final_norm, attention_fn, score,
                              positional, mask_mod, score_mod, attention, layer_pattern,
                              local_window)  # fmt: skip
        check_special_ids(vocab_size, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id)
        tie_embeddings = check_flag("tie_embeddings", tie_embeddings)
        self.embed = _Embedding(vocab_size, features, max_len, positional, dropout_rate, rngs=rngs)
        self.decoder = TransformerEncoder(num_layers, rngs=rngs, **opts)
        self.output = None if tie_embeddings else _output_layer(features, vocab_size, rngs=rngs)
        self.max_len = max_len
        self.deterministic = True  # eval; train() / eval() switch every layer
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

    def _logits(self, y):
        if self.output is None:
            return self.embed.token.attend(y).astype(jnp.float32)
        return self.output(y).astype(jnp.float32)

    def __call__(self, tokens, *, deterministic=None, rngs=None, sow_weights=False):
        """``tokens [B, T]`` -> next-token logits ``[B, T, V]`` float32 (``deterministic=None``:
        the model's mode)."""
        deterministic = self._deterministic(deterministic)
        rngs = per_site_rngs(rngs)
        tokens = check_tokens(
            "tokens", tokens, self.max_len, vocab_size=self.embed.token.num_embeddings
        )
        x = self.embed(tokens, deterministic=deterministic, rngs=rngs)
        x = self.decoder(x, is_causal=True, deterministic=deterministic, rngs=rngs,
                         sow_weights=sow_weights)  # fmt: skip
        return self._logits(x)

    def init_cache(self, batch_size: int, max_len: int):
        """One empty :class:`KVCache` per layer, ``max_len`` positions each (at most the
        model's ``max_len`` with learned positions, whose table ends there)."""
        batch_size = check_size("batch_size", batch_size)
        max_len = check_size("max_len", max_len)
        if isinstance(self.embed.position, LearnedPositionalEmbedding) and max_len > self.max_len:
            raise ValueError(
                f"a cache of {max_len} positions outruns the learned position table of "
                f"max_len={self.max_len}"
            )
        return self.decoder.init_cache(batch_size, max_len)

    def step(self, tokens, caches):
        """Cached forward of ``tokens [B, T]`` at positions ``cache_index(caches) + t``.

        A multi-token prefill or single-token steps; returns ``(logits [B, T, V], caches)``.
        The caches must have room: ``index + T`` at most their length (checked when the
        index is concrete; :meth:`generate` sizes them itself).
        """
        tokens = check_tokens("tokens", tokens, vocab_size=self.embed.token.num_embeddings)
        index = cache_index(caches)
        if index.shape != tokens.shape[:1]:
            held = f"B={index.shape[0]}" if index.ndim == 1 else f"index {list(index.shape)}"
            raise ValueError(
                f"tokens {list(tokens.shape)} hold B={tokens.shape[0]} sequences, but the "
                f"caches hold {held} (init_cache(batch_size={tokens.shape[0]}, ...) makes "
                "caches for this batch)"
            )
        positions = index[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
        x = self.embed(tokens, positions)
        x, caches = self.decoder.step(x, caches)
        return self._logits(x), caches

    def generate(self, prompt_tokens, prompt_lengths, *, max_new_tokens: int, beam_size: int = 1,
                 length_penalty: float = 0.6):  # fmt: skip
        """Continues right-padded prompts ``[B, P]`` of ``prompt_lengths [B]`` (each >= 1).

        The prompts are prefilled into the cache in one pass, then tokens are generated
        greedily (or by beam search) in a compiled loop. A concrete ``prompt_lengths``
        outside ``[1, P]`` is a ValueError; a traced one (under ``jax.jit``) cannot raise,
        so an example whose length is outside gets ``-1`` for every token (never a
        token id), not a continuation of a clipped prompt.

        Returns:
          ``[B, max_new_tokens]`` int32: the continuation only, PAD after EOS.
        """
        prompt_tokens = check_tokens(
            "prompt_tokens", prompt_tokens, vocab_size=self.embed.token.num_embeddings
        )
        _check_nonempty("prompt_tokens", prompt_tokens)
        if not isinstance(prompt_lengths, jax.Array | np.ndarray):
            prompt_lengths = np.asarray(prompt_lengths)  # NumPy first: int64 must not wrap
        if prompt_lengths.shape != prompt_tokens.shape[:1]:
            raise ValueError(
                f"prompt_lengths must have shape [B] = [{prompt_tokens.shape[0]}], "
                f"got {list(prompt_lengths.shape)}"
            )
        if not jnp.issubdtype(prompt_lengths.dtype, jnp.integer):
            raise ValueError(f"prompt_lengths must be integers, got dtype {prompt_lengths.dtype}")
        plen = prompt_tokens.shape[1]
        lengths = concrete(prompt_lengths)
        if lengths is not None:
            if lengths.size and (lengths.min() < 1 or lengths.max() > plen):
                raise ValueError(
                    f"prompt_lengths must be in [1, {plen}] (the prompts' length), got "
                    f"{lengths.tolist()}"
                )
        prompt_lengths = check_int_array("prompt_lengths", prompt_lengths)
        if isinstance(max_new_tokens, np.integer):
            max_new_tokens = int(max_new_tokens)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool):
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if max_new_tokens <= 0 or plen + max_new_tokens > self.max_len:
            raise ValueError(
                f"max_new_tokens must be a positive int with prompt length + max_new_tokens <= "
                f"max_len={self.max_len}, got {max_new_tokens!r} for prompts of length {plen}"
            )
        beam_size, length_penalty = check_search_options(beam_size, length_penalty)
        return per_example(
            lambda model, prompt, lengths: _generate_lm(
                model, prompt, lengths, max_new_tokens, beam_size, length_penalty
            ),
            self,
            prompt_tokens,
            prompt_lengths,
        )


def _generate_lm(model: DecoderLM, prompt, lengths, max_new, beam_size, length_penalty):
    """As :func:`_generate_seq2seq`: ``jax.jit`` over the split state, nothing written back."""
    graphdef, state = nnx.split(model)
    return _generate_lm_jit(graphdef, state, prompt, lengths, max_new, beam_size, length_penalty)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _generate_lm_jit(graphdef, state, prompt, lengths, max_new, beam_size, length_penalty):
    model = nnx.merge(graphdef, state)
    return _generate_lm_body(model, prompt, lengths, max_new, beam_size, length_penalty)


def _generate_lm_body(model: DecoderLM, prompt, lengths, max_new, beam_size, length_penalty):
    plen = prompt.shape[1]
    # checked when concrete; traced, a length outside [1, P] marks its example's tokens
    outside = (lengths < 1) | (lengths > plen)
    tokens = _continue_lm(model, prompt, jnp.clip(lengths, 1, plen), max_new, beam_size,
                          length_penalty)  # fmt: skip
    return jnp.where(outside[:, None], -1, tokens)


def _continue_lm(model: DecoderLM, prompt, lengths, max_new, beam_size, length_penalty):
    """:func:`_generate_lm_body` for ``lengths`` in ``[1, P]``."""
    batch, plen = prompt.shape
    caches = model.init_cache(batch, plen + max_new)
    parts = jax.tree.leaves(caches, is_leaf=lambda x: isinstance(x, KVCache))
    if all(isinstance(c, KVCache) for c in parts):
        _, caches = model.step(prompt, caches)
        # re-feed each prompt's last token at its own position: the cache beyond it is masked
        caches = rewind_cache(caches, lengths - 1)
    else:  # a state (linear attention, a user's) cannot be rewound: feed each prompt to its end
        caches = _prefill_states(model, prompt, lengths - 1, caches)
    last = jnp.take_along_axis(prompt, (lengths - 1)[:, None], axis=1)[:, 0]

    def step(tokens, caches):
        logits, caches = model.step(tokens, caches)
        return jax.nn.log_softmax(logits[:, -1]), caches

    ids = dict(eos_id=model.eos_id, pad_id=model.pad_id)
    if beam_size == 1:
        return greedy_search(step, caches, last, max_len=max_new, **ids)
    tokens, _ = beam_search(step, caches, last, beam_size=beam_size, max_len=max_new,
                            length_penalty=length_penalty, **ids)  # fmt: skip
    return tokens


def _prefill_states(model, prompt, num, caches):
    """The caches after the first ``num[b]`` tokens of each prompt, one token at a time:
    a linear-attention state cannot be rewound past a padding token, so each example's
    state stops where its prompt does."""

    def feed(caches, xs):
        tokens, t = xs
        _, new = model.step(tokens[:, None], caches)
        keep = t < num  # [B]
        return jax.tree.map(
            lambda a, b: jnp.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, caches
        ), None

    steps = (prompt.T, jnp.arange(prompt.shape[1], dtype=jnp.int32))
    return jax.lax.scan(feed, caches, steps)[0]


class EncoderClassifier(TrainEval, nnx.Module):
    """An encoder-only classifier: encoder stack, pooling over real tokens, linear head.

    Submodules: ``embed``, ``encoder`` (:class:`TransformerEncoder`), ``classifier``
    (``nnx.Linear``). ``pooling='mean'`` averages the non-pad positions; ``'cls'``
    takes position 0 (put a CLS token there).
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        *,
        num_layers: int = 2,
        features: int = 128,
        num_heads: int = 4,
        mlp_features: int | None = None,
        dropout_rate: float = 0.1,
        max_len: int = 256,
        pre_norm: bool = False,
        final_norm: bool | None = None,
        positional: str = "sinusoidal",
        activation: str = "relu",
        layer_norm_eps: float = 1e-5,
        pooling: str = "mean",
        pad_id: int = 0,
        attention_fn: Callable | None = None,
        score=None,
        mask_mod=None,
        score_mod=None,
        attention: str = "softmax",
        layer_pattern=None,
        local_window: int | None = None,
        rngs: nnx.Rngs,
    ):
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        check_positive_int("num_classes", num_classes)
        opts = _stack_options(features, num_heads, mlp_features, dropout_rate, pre_norm,
                              activation, layer_norm_eps, final_norm, attention_fn, score,
                              positional, mask_mod, score_mod, attention, layer_pattern,
                              local_window)  # fmt: skip
        check_special_ids(vocab_size, pad_id=pad_id)
        _check_bidirectional(attention, layer_pattern)
        self.embed = _Embedding(vocab_size, features, max_len, positional, dropout_rate, rngs=rngs)
        self.encoder = TransformerEncoder(num_layers, rngs=rngs, **opts)
        self.classifier = nnx.Linear(
            features,
            num_classes,
            kernel_metadata=names("embed", None),
            bias_metadata=names(None),
            rngs=rngs,
        )
        self.pooling = pooling
        self.max_len = max_len
        self.deterministic = True  # eval; train() / eval() switch every layer
        self.pad_id = pad_id

    def __call__(self, tokens, *, deterministic=None, rngs=None, sow_weights=False):
        """``tokens [B, T]`` -> class logits ``[B, num_classes]`` float32 (``deterministic=None``:
        the model's mode)."""
        deterministic = self._deterministic(deterministic)
        rngs = per_site_rngs(rngs)
        tokens = check_tokens(
            "tokens", tokens, self.max_len, vocab_size=self.embed.token.num_embeddings
        )
        valid = tokens != self.pad_id  # [B, T]
        x = self.embed(tokens, deterministic=deterministic, rngs=rngs)
        x = self.encoder(x, mask=key_padding_mask(valid), deterministic=deterministic, rngs=rngs,
                         sow_weights=sow_weights)  # fmt: skip
        if self.pooling == "cls":
            pooled = x[:, 0]
        else:
            w = valid.astype(x.dtype)[..., None]  # [B, T, 1]
            pooled = (x * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0)
        return self.classifier(pooled).astype(jnp.float32)


TransformerConfig = config_class(Transformer)
DecoderLMConfig = config_class(DecoderLM)
EncoderClassifierConfig = config_class(EncoderClassifier)
