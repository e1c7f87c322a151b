"""The framework-free functional core of jattn: pure functions that import only jax."""

from jattn.functional import mods
from jattn.functional.attention import attention, dot_product_attention, single_head_attention
from jattn.functional.blocked import blocked_attention
from jattn.functional.kernel_regression import (
    Kernel,
    boxcar_kernel,
    constant_kernel,
    epanechikov_kernel,
    epanechnikov_kernel,
    gaussian_kernel,
    leave_one_out_mask,
    nadaraya_watson,
    nadaraya_watson_weights,
    parametric_nadaraya_watson,
    parametric_nadaraya_watson_weights,
    triangular_kernel,
)
from jattn.functional.linear import (
    LinearState,
    elu_feature_map,
    gated_linear_attention,
    linear_attention,
    relu_feature_map,
    retention,
    retnet_decays,
)
from jattn.functional.lowrank import (
    favor_features,
    linformer_attention,
    nystrom_attention,
    orthogonal_random_features,
    performer_attention,
)
from jattn.functional.masks import (
    causal_mask,
    combine_masks,
    key_padding_mask,
    sequence_mask,
    sliding_window_mask,
    valid_lens_mask,
)
from jattn.functional.mods import BlockMask, block_mask
from jattn.functional.pooling import attention_pooling
from jattn.functional.positional import (
    alibi_bias,
    alibi_slopes,
    relative_position_buckets,
    rotary_embedding,
    sinusoidal_encoding,
)
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
from jattn.functional.stochastic import dropout, keep_mask

__all__ = [
    "AdditiveParams",
    "BlockMask",
    "Kernel",
    "LinearState",
    "MASK_FILL",
    "MLPParams",
    "ScoreFn",
    "additive_scores",
    "alibi_bias",
    "alibi_slopes",
    "attention",
    "attention_pooling",
    "block_mask",
    "blocked_attention",
    "bilinear_scores",
    "boxcar_kernel",
    "causal_mask",
    "combine_masks",
    "dropout",
    "elu_feature_map",
    "gated_linear_attention",
    "linear_attention",
    "linformer_attention",
    "relu_feature_map",
    "retention",
    "retnet_decays",
    "constant_kernel",
    "dot_product_attention",
    "dot_product_scores",
    "epanechikov_kernel",
    "epanechnikov_kernel",
    "favor_features",
    "gaussian_kernel",
    "keep_mask",
    "key_padding_mask",
    "leave_one_out_mask",
    "masked_softmax",
    "masked_softmax_with_lse",
    "mlp_scores",
    "mods",
    "nadaraya_watson",
    "nadaraya_watson_weights",
    "nystrom_attention",
    "orthogonal_random_features",
    "parametric_nadaraya_watson",
    "parametric_nadaraya_watson_weights",
    "performer_attention",
    "relative_position_buckets",
    "rotary_embedding",
    "scaled_dot_product_scores",
    "sequence_mask",
    "single_head_attention",
    "sinusoidal_encoding",
    "sliding_window_mask",
    "triangular_kernel",
    "valid_lens_mask",
]
