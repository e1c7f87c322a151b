"""The framework-free functional core of jattn: pure functions that import only jax."""

from jattn.functional.attention import attention, dot_product_attention, single_head_attention
from jattn.functional.masks import (
    causal_mask,
    combine_masks,
    key_padding_mask,
    sequence_mask,
    sliding_window_mask,
    valid_lens_mask,
)
from jattn.functional.pooling import attention_pooling
from jattn.functional.scores import (
    AdditiveParams,
    MLPParams,
    ScoreFn,
    additive_scores,
    bilinear_scores,
    dot_product_scores,
    mlp_scores,
    scaled_dot_product_scores,
)
from jattn.functional.softmax import MASK_FILL, masked_softmax, masked_softmax_with_lse

__all__ = [
    "MASK_FILL",
    "AdditiveParams",
    "MLPParams",
    "ScoreFn",
    "additive_scores",
    "attention",
    "attention_pooling",
    "bilinear_scores",
    "causal_mask",
    "combine_masks",
    "dot_product_attention",
    "dot_product_scores",
    "key_padding_mask",
    "masked_softmax",
    "masked_softmax_with_lse",
    "mlp_scores",
    "scaled_dot_product_scores",
    "sequence_mask",
    "single_head_attention",
    "sliding_window_mask",
    "valid_lens_mask",
]
