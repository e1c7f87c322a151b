"""Flax NNX layers over the functional core."""

from jattn.layers.composite import ParallelAttention, SeriesAttention
from jattn.layers.dropout import Dropout
from jattn.layers.flax_compat import flax_attention_fn
from jattn.layers.gating import GatedAttention, MixtureOfHeads, sown_aux_loss
from jattn.layers.kernel_regression import NWKernelRegression
from jattn.layers.linear import LinearAttention
from jattn.layers.multihead import MultiHeadAttention
from jattn.layers.multimodal import (
    AttentionPoolingHead,
    CoAttention,
    GatedCrossAttentionBlock,
    PerceiverEncoder,
)
from jattn.layers.positional import (
    ALiBi,
    LearnedPositionalEmbedding,
    RelativePositionBias,
    RotaryEmbedding,
    SinusoidalEncoding,
)
from jattn.layers.scores import AdditiveScore, BilinearScore, MLPScore, Score
from jattn.layers.single_head import AdditiveAttention, DotProductAttention
from jattn.layers.vision import (
    CBAM,
    ECA,
    ConvStem,
    DETRDecoder,
    PatchEmbedding,
    SqueezeExcitation,
    ViT,
    ViTConfig,
    hungarian_match,
    rollout_map,
)

__all__ = [
    "rollout_map",
    "ViT",
    "ViTConfig",
    "SqueezeExcitation",
    "PatchEmbedding",
    "ECA",
    "CBAM",
    "ConvStem",
    "ALiBi",
    "AdditiveAttention",
    "AdditiveScore",
    "AttentionPoolingHead",
    "BilinearScore",
    "CoAttention",
    "DETRDecoder",
    "DotProductAttention",
    "Dropout",
    "GatedAttention",
    "GatedCrossAttentionBlock",
    "LearnedPositionalEmbedding",
    "LinearAttention",
    "MLPScore",
    "MixtureOfHeads",
    "MultiHeadAttention",
    "NWKernelRegression",
    "ParallelAttention",
    "PerceiverEncoder",
    "RelativePositionBias",
    "RotaryEmbedding",
    "Score",
    "SeriesAttention",
    "SinusoidalEncoding",
    "flax_attention_fn",
    "hungarian_match",
    "sown_aux_loss",
]
