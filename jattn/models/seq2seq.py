"""The RNN encoder-decoder with attention (Bahdanau et al. 2015; Luong et al. 2015).

A GRU encoder (optionally bidirectional) reads the source; at every target step
the decoder's previous hidden state is the query, and the encoder states at all
source positions are the keys and values. The alignment is computed by
:func:`jattn.attention` with a swappable score function: additive (Bahdanau),
bilinear ("general", Luong) or dot (Luong). The decoder GRU reads the previous
target token's embedding and the context; the output layer reads the new state
and the context. Padded source positions (``src == pad_id``) are masked out of
the attention and skipped by the encoder.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jattn._model_config import config_class
from jattn.functional import _checks, _sharding
from jattn.functional._checks import check_positive_int
from jattn.functional.attention import attention
from jattn.functional.scores import AdditiveParams, dot_product_scores
from jattn.layers.axes import names
from jattn.layers.dropout import Dropout, TrainEval, per_site_rngs
from jattn.layers.positional import embed_ids
from jattn.layers.scores import AdditiveScore, BilinearScore
from jattn.models._validate import (
    check_search_options,
    check_special_ids,
    check_tokens,
)
from jattn.models.decoding import beam_search, greedy_search, per_example
from jattn.models.rnn import GRUCell, GRUEncoder

__all__ = ["BahdanauSeq2Seq", "BahdanauSeq2SeqConfig", "SCORES"]

#: The score functions :class:`BahdanauSeq2Seq` takes by name.
SCORES = ("additive", "bilinear", "dot")


def _additive_scores_projected_keys(
    query: jax.Array, key_proj: jax.Array, params: AdditiveParams
) -> jax.Array:
    """:func:`jattn.additive_scores` with the keys already multiplied by ``w_key``.

    ``query [T, H]``, ``key_proj [S, A] = key @ params.w_key`` -> ``[T, S]`` float32.
    """
    q = jnp.einsum("th,ha->ta", query, params.w_query, preferred_element_type=jnp.float32)
    hidden = jnp.tanh(q[:, None, :] + key_proj.astype(jnp.float32)[None, :, :])  # [T, S, A]
    return jnp.einsum("tsa,a->ts", hidden, params.w_value.astype(jnp.float32))


class BahdanauSeq2Seq(TrainEval, nnx.Module):
    """GRU encoder-decoder with additive (or multiplicative) attention.

    Args:
      src_vocab_size: source vocabulary size.
      tgt_vocab_size: V, target vocabulary size.
      embed_dim: E, token embedding size (source and target).
      hidden: H, GRU state size (per direction in the encoder; the decoder's
        state and the attention hidden width A are also H).
      num_layers: L, GRU layers in the encoder and in the decoder.
      bidirectional: encoder states are ``[forward, backward]`` (size 2H) if True.
      dropout_rate: dropout on embeddings, between encoder layers and before the
        output layer.
      score: ``'additive'`` (Bahdanau: ``w^T tanh(W_q q + W_k k)``), ``'bilinear'``
        (Luong's general: ``q^T W k``) or ``'dot'`` (Luong: ``q . k``; needs the
        encoder state size to equal H, i.e. ``bidirectional=False``).
      pad_id, bos_id, eos_id: special token ids.
      rngs: ``params`` stream (and ``dropout`` when ``dropout_rate > 0``).

    Call ``model(src [B, S], tgt_in [B, T])`` for teacher-forced logits
    ``[B, T, V]``; ``model.generate(src, max_len=...)`` decodes.
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        *,
        embed_dim: int = 64,
        hidden: int = 128,
        num_layers: int = 1,
        bidirectional: bool = True,
        dropout_rate: float = 0.0,
        score: str = "additive",
        pad_id: int = 0,
        bos_id: int = 1,
        eos_id: int = 2,
        rngs: nnx.Rngs,
    ):
        for name, value in (
            ("src_vocab_size", src_vocab_size),
            ("tgt_vocab_size", tgt_vocab_size),
            ("embed_dim", embed_dim),
            ("hidden", hidden),
            ("num_layers", num_layers),
        ):
            check_positive_int(name, value)
        _checks.check_rate("dropout_rate", dropout_rate)
        _checks.check_flag("bidirectional", bidirectional)
        if not isinstance(score, str) or score not in SCORES:
            raise ValueError(f"unknown score {score!r}; expected one of {SCORES}")
        key_size = (2 if bidirectional else 1) * hidden
        if score == "dot" and key_size != hidden:
            raise ValueError(
                f"score='dot' needs the query size (hidden={hidden}) to equal the encoder "
                f"state size ({key_size} with bidirectional=True); use score='bilinear' "
                "or bidirectional=False"
            )
        check_special_ids(tgt_vocab_size, "target vocabulary", vocab_name="tgt_vocab_size",
                          pad_id=pad_id, bos_id=bos_id,
                          eos_id=eos_id)  # fmt: skip
        check_special_ids(
            src_vocab_size, "source vocabulary", vocab_name="src_vocab_size", pad_id=pad_id
        )

        self.tgt_vocab_size = tgt_vocab_size
        self.hidden = hidden
        self.num_layers = num_layers
        self.score_name = score
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

        embed_axes = names("vocab", "embed")
        self.src_embed = nnx.Embed(
            src_vocab_size, embed_dim, embedding_metadata=embed_axes, rngs=rngs
        )
        self.tgt_embed = nnx.Embed(
            tgt_vocab_size, embed_dim, embedding_metadata=embed_axes, rngs=rngs
        )
        self.encoder = GRUEncoder(
            embed_dim,
            hidden,
            num_layers=num_layers,
            bidirectional=bidirectional,
            dropout_rate=dropout_rate,
            rngs=rngs,
        )
        # Initial decoder state per layer from that encoder layer's final states.
        self.bridge = nnx.Linear(
            key_size,
            hidden,
            kernel_metadata=names("mlp", "mlp"),
            bias_metadata=names("mlp"),
            rngs=rngs,
        )
        if score == "additive":
            self.score = AdditiveScore(1, hidden, key_size, hidden, rngs=rngs)
        elif score == "bilinear":
            self.score = BilinearScore(1, hidden, key_size, rngs=rngs)
        else:
            self.score = nnx.data(None)
        self.decoder_cells = nnx.List(
            [
                GRUCell(embed_dim + key_size if i == 0 else hidden, hidden, rngs=rngs)
                for i in range(num_layers)
            ]
        )
        self.out = nnx.Linear(
            hidden + key_size,
            tgt_vocab_size,
            kernel_metadata=names("mlp", "vocab"),
            bias_metadata=names("vocab"),
            rngs=rngs,
        )
        self.dropout = Dropout(
            dropout_rate, deterministic=True, rngs=rngs if dropout_rate > 0 else None
        )
        self.deterministic = True  # eval; train() / eval() switch every layer

    # -- pieces -----------------------------------------------------------------------------

    def _score(self, states: jax.Array):
        """``(score_fn, params, per_head, keys)`` for :func:`jattn.attention`.

        For the additive score the key half ``W_k k`` is computed once per source
        (Bahdanau et al. note it does not depend on the decoder step), and the
        attention runs :func:`_additive_scores_projected_keys` on the projected keys;
        it equals :func:`jattn.additive_scores` on the raw keys.
        """
        if self.score is None:
            return dot_product_scores, None, False, states
        if self.score_name == "additive":
            params = self.score.params()
            keys = jnp.einsum("bsk,ka->bsa", states, params.w_key[0])  # [B, S, A]
            return _additive_scores_projected_keys, params, True, keys
        return self.score.score_fn, self.score.params(), True, states

    def encode(self, src: jax.Array, *, deterministic: bool | None = None, rngs=None):
        """``src [B, S]`` -> ``(states [B, S, Hk], valid [B, S], h0 [L, B, H])``."""
        deterministic = self._deterministic(deterministic)
        rngs = per_site_rngs(rngs)
        src = check_tokens("src", src, vocab_size=self.src_embed.num_embeddings)
        valid = src != self.pad_id
        x = self.dropout(
            embed_ids(self.src_embed, src, out_sharding=_sharding.like(src)),
            deterministic=deterministic,
            rngs=rngs,
        )
        states, finals = self.encoder(x, valid, deterministic=deterministic, rngs=rngs)
        h0 = jnp.tanh(self.bridge(finals))  # [L, B, H]
        return states, valid, h0

    def _step(self, score, h, emb, keys, values, valid):
        """One decoder step.

        Args:
          score: ``(score_fn, params, per_head)`` from :meth:`_score`.
          h: ``[L, B, H]`` previous states; ``h[-1]`` is the query.
          emb: ``[B, E]`` embedding of the previous target token.
          keys: ``[B, S, Hk]`` encoder states (``[B, S, A]`` projected for additive).
          values: ``[B, S, Hk]`` encoder states.
          valid: ``[B, S]`` source token mask.

        Returns:
          ``(h' [L, B, H], context [B, Hk], weights [B, S])``.
        """
        score_fn, params, per_head = score
        ctx, weights = attention(
            h[-1][:, None, None, :],  # [B, T=1, N=1, H]
            keys[:, :, None, :],  # [B, S, K=1, Hk]
            values[:, :, None, :],
            mask=valid[:, None, None, :],  # [B, N, T, S]
            score_fn=score_fn,
            score_params=params,
            per_head_params=per_head,
            return_weights=True,
        )
        ctx, weights = ctx[:, 0, 0, :], weights[:, 0, 0, :]
        x = jnp.concatenate([emb, ctx], axis=-1)
        new = []
        for i, cell in enumerate(self.decoder_cells):
            x = cell.step(h[i], cell.project_inputs(x))
            new.append(x)
        return jnp.stack(new), ctx, weights

    # -- teacher forcing --------------------------------------------------------------------

    def __call__(
        self,
        src: jax.Array,
        tgt_in: jax.Array,
        *,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | None = None,
        sow_weights: bool = False,
    ) -> jax.Array:
        """Teacher-forced logits.

        Args:
          src: ``[B, S]`` source ids, padded with ``pad_id``.
          tgt_in: ``[B, T]`` target ids starting with ``bos_id``.
          deterministic: disable dropout; None (the default) uses the model's mode
            (``model.train()`` / ``model.eval()``; eval when built).
          rngs: dropout randomness (default: the model's own ``dropout`` stream).
          sow_weights: sow the alignment weights ``[B, T, S]`` as ``nnx.Intermediate``
            ``attention_weights`` (collect them with ``nnx.capture`` or
            :func:`jattn.viz.collect_attention_weights`).

        Returns:
          ``[B, T, V]`` float32 logits.
        """
        deterministic = self._deterministic(deterministic)
        rngs = per_site_rngs(rngs)
        tgt_in = check_tokens("tgt_in", tgt_in, vocab_size=self.tgt_embed.num_embeddings)
        states, valid, h0 = self.encode(src, deterministic=deterministic, rngs=rngs)  # checks src
        if valid.shape[0] != tgt_in.shape[0]:
            raise ValueError(
                f"src {list(valid.shape)} and tgt_in {list(tgt_in.shape)} have different batch "
                "sizes"
            )
        emb = self.dropout(
            embed_ids(self.tgt_embed, tgt_in, out_sharding=_sharding.like(tgt_in)),
            deterministic=deterministic,
            rngs=rngs,
        )
        *score, keys = self._score(states)

        def body(h, emb_t):
            h, ctx, weights = self._step(score, h, emb_t, keys, states, valid)
            return h, (h[-1], ctx, weights)

        _, (top, ctx, weights) = jax.lax.scan(body, h0, jnp.swapaxes(emb, 0, 1))
        feats = jnp.swapaxes(jnp.concatenate([top, ctx], axis=-1), 0, 1)  # [B, T, H + Hk]
        feats = self.dropout(feats, deterministic=deterministic, rngs=rngs)
        if sow_weights:
            self.sow(nnx.Intermediate, "attention_weights", jnp.swapaxes(weights, 0, 1))
        return self.out(feats).astype(jnp.float32)

    # -- decoding ---------------------------------------------------------------------------

    def generate(
        self,
        src: jax.Array,
        *,
        max_len: int,
        beam_size: int = 1,
        length_penalty: float = 0.6,
    ) -> jax.Array:
        """Decodes ``src [B, S]`` into ``[B, max_len]`` int32 tokens (no BOS; PAD after EOS).

        ``beam_size == 1`` is greedy decoding; larger beams keep the ``beam_size``
        best hypotheses by length-normalised log-probability
        ``log p / ((5 + len) / 6) ** length_penalty`` (Wu et al. 2016) and return
        the best one (:func:`jattn.models.decoding.beam_search`). Runs as one
        jit-compiled ``lax.while_loop`` that stops when every sequence has ended.
        """
        src = check_tokens("src", src, vocab_size=self.src_embed.num_embeddings)
        check_positive_int("max_len", max_len)
        beam_size, length_penalty = check_search_options(beam_size, length_penalty)
        penalty = jnp.float32(length_penalty)
        return per_example(
            lambda model, src: _generate(model, src, penalty, max_len=max_len, beam_size=beam_size),
            self,
            src,
        )

    def _log_probs_step(self, score, tokens, state):
        """``step_fn`` for :mod:`jattn.models.decoding`: ``tokens [B, 1]``, state
        ``(h [B, L, H], keys [B, S, .], values [B, S, Hk], valid [B, S])`` ->
        ``(log_probs [B, V], state)``."""
        h, keys, values, valid = state
        emb = embed_ids(self.tgt_embed, tokens[:, 0])
        h_new, ctx, _ = self._step(score, jnp.swapaxes(h, 0, 1), emb, keys, values, valid)
        logits = self.out(jnp.concatenate([h_new[-1], ctx], axis=-1)).astype(jnp.float32)
        return jax.nn.log_softmax(logits), (jnp.swapaxes(h_new, 0, 1), keys, values, valid)


def _generate(model: BahdanauSeq2Seq, src, length_penalty, *, max_len: int, beam_size: int):
    """``jax.jit`` over the model's split state, not ``nnx.jit``, whose write-back of the
    state fails inside a caller's ``jax.jit`` that captured the model (TraceContextError,
    the model left without attributes); decoding changes no state."""
    graphdef, state = nnx.split(model)
    return _generate_jit(graphdef, state, src, length_penalty, max_len=max_len, beam_size=beam_size)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("max_len", "beam_size"))
def _generate_jit(graphdef, state, src, length_penalty, *, max_len: int, beam_size: int):
    model = nnx.merge(graphdef, state)
    states, valid, h0 = model.encode(src)
    *score, keys = model._score(states)
    step_fn = functools.partial(model._log_probs_step, tuple(score))
    state = (jnp.swapaxes(h0, 0, 1), keys, states, valid)  # every leaf batch-major
    first = jnp.full((src.shape[0],), model.bos_id, jnp.int32)
    ids = dict(max_len=max_len, eos_id=model.eos_id, pad_id=model.pad_id)
    if beam_size == 1:
        return greedy_search(step_fn, state, first, **ids)
    tokens, _ = beam_search(
        step_fn, state, first, beam_size=beam_size, length_penalty=length_penalty, **ids
    )
    return tokens


BahdanauSeq2SeqConfig = config_class(BahdanauSeq2Seq)
