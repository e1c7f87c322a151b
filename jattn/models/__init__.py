"""Transformer models built from :mod:`jattn.layers`: blocks, stacks, models and decoding."""

from jattn.models.blocks import (
    DecoderBlock,
    EncoderBlock,
    FeedForward,
    RotaryAttention,
    TransformerDecoder,
    TransformerEncoder,
)
from jattn.models.decoding import (
    KVCache,
    beam_search,
    cache_index,
    cached_cross_attention,
    cached_self_attention,
    cross_attention_kv,
    greedy_search,
    init_cache,
    length_penalty_fn,
    rewind_cache,
)
from jattn.models.rnn import GRUCell, GRUEncoder
from jattn.models.seq2seq import BahdanauSeq2Seq
from jattn.models.transformer import DecoderLM, EncoderClassifier, Transformer

__all__ = [
    "BahdanauSeq2Seq",
    "GRUCell",
    "GRUEncoder",
    "DecoderBlock",
    "DecoderLM",
    "EncoderBlock",
    "EncoderClassifier",
    "FeedForward",
    "KVCache",
    "RotaryAttention",
    "Transformer",
    "TransformerDecoder",
    "TransformerEncoder",
    "beam_search",
    "cache_index",
    "cached_cross_attention",
    "cached_self_attention",
    "cross_attention_kv",
    "greedy_search",
    "init_cache",
    "length_penalty_fn",
    "rewind_cache",
]
