"""Interoperability with other frameworks' weights (PyTorch), without importing them."""

from jattn.interop.torch import (
    load_multihead_attention,
    load_transformer,
    load_transformer_decoder,
    load_transformer_decoder_layer,
    load_transformer_encoder,
    load_transformer_encoder_layer,
    torch_masks_to_jattn,
)

__all__ = [
    "load_multihead_attention",
    "load_transformer",
    "load_transformer_decoder",
    "load_transformer_decoder_layer",
    "load_transformer_encoder",
    "load_transformer_encoder_layer",
    "torch_masks_to_jattn",
]
