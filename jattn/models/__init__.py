"""Transformer models built from :mod:`jattn.layers`: blocks, stacks, models and decoding.

Each model ``M`` has a config dataclass ``MConfig`` (``M.Config``): frozen, keyword-only,
its fields and defaults exactly the constructor's options; ``M.from_config(config,
rngs=...)`` builds the model from one, as in Flax's lm1b and wmt examples:

>>> from flax import nnx
>>> from jattn.models import DecoderLM, DecoderLMConfig
>>> config = DecoderLMConfig(vocab_size=100, num_layers=2, features=64, num_heads=4)
>>> config.max_len, config.replace(max_len=64).max_len
(256, 64)
>>> lm = DecoderLM.from_config(config, rngs=nnx.Rngs(0))
>>> lm.max_len
256
"""

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
from jattn.models.seq2seq import BahdanauSeq2Seq, BahdanauSeq2SeqConfig
from jattn.models.transformer import (
    DecoderLM,
    DecoderLMConfig,
    EncoderClassifier,
    EncoderClassifierConfig,
    Transformer,
    TransformerConfig,
)

__all__ = [
    "BahdanauSeq2Seq",
    "BahdanauSeq2SeqConfig",
    "DecoderLMConfig",
    "EncoderClassifierConfig",
    "TransformerConfig",
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
