"""Flax NNX layers over the functional core."""

from jattn.layers.multihead import MultiHeadAttention
from jattn.layers.scores import AdditiveScore, BilinearScore, MLPScore, Score
from jattn.layers.single_head import AdditiveAttention, DotProductAttention

__all__ = [
    "AdditiveAttention",
    "AdditiveScore",
    "BilinearScore",
    "DotProductAttention",
    "MLPScore",
    "MultiHeadAttention",
    "Score",
]
