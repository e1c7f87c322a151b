"""A small DETR (Carion et al., 2020): object queries cross-attend to an image's patches
and each predicts a class (or "no object") and a box.

``images -> ConvStem (optional) -> patches + 2-D sine-cosine positions -> encoder ->
DETRDecoder``. Trained with :func:`jattn.training.detection.set_loss` (Hungarian
matching), scored by AP50 (:func:`jattn.training.detection.mean_average_precision`);
``configs/detection_toy.py`` trains it on :func:`jattn.data.detection_task`.
"""

from __future__ import annotations

import jax
from flax import nnx

from jattn._model_config import config_class
from jattn.functional._checks import check_positive_int
from jattn.functional.vision import sincos_2d
from jattn.layers.dropout import TrainEval, per_site_rngs
from jattn.layers.vision import DETRDecoder, embed_patches, setup_patches

__all__ = ["DETR", "DETRConfig"]


class DETR(TrainEval, nnx.Module):
    """``images [B, H, W, C] -> (class_logits [B, Q, K + 1], boxes [B, Q, 4])``, boxes
    ``(cx, cy, w, h)`` as fractions of the image.

    Args:
      image_size: ``(H, W)`` (or an int), multiples of ``patch``.
      patch, in_channels: the patch side p and C.
      num_classes: K (the class head has K + 1 outputs, the last "no object").
      num_queries: Q, the most objects an image can hold.
      features, num_heads, mlp_features: width D, heads N and MLP width of encoder and
        decoder.
      num_encoder_layers, num_decoder_layers: their depths.
      stem_features, stem_layers: a :class:`jattn.layers.ConvStem` before the patches
        (None: none).
      dropout_rate: dropout in encoder and decoder.
      rngs: ``nnx.Rngs`` with ``params`` (and ``dropout`` for training).

    The decoder's cross-attention weights (each query over the patches) are sown with
    ``sow_weights=True`` (:func:`jattn.viz.collect_attention_weights`).
    """

    def __init__(self, *, image_size, patch: int, in_channels: int, num_classes: int,
                 num_queries: int, features: int, num_heads: int, mlp_features: int,
                 num_encoder_layers: int, num_decoder_layers: int,
                 stem_features: int | None = None, stem_layers: int = 1,
                 dropout_rate: float = 0.0, rngs: nnx.Rngs):  # fmt: skip
        from jattn.models.blocks import TransformerEncoder

        features = check_positive_int("features", features)
        if features % 4:  # else a late error from sincos_2d's dim at the first call
            raise ValueError(
                f"DETR: features={features} must be a multiple of 4 (its 2-D sine-cosine "
                "position embedding gives each grid axis a sine and a cosine)"
            )
        setup_patches(self, image_size=image_size, patch=patch, in_channels=in_channels,
                      features=features, stem_features=stem_features,
                      stem_layers=stem_layers, rngs=rngs)  # fmt: skip
        self.encoder = TransformerEncoder(
            check_positive_int("num_encoder_layers", num_encoder_layers), features, num_heads,
            mlp_features, dropout_rate=dropout_rate, pre_norm=True, activation="gelu",
            layer_norm_eps=1e-6, final_norm=True, rngs=rngs,
        )  # fmt: skip
        self.decoder = DETRDecoder(
            num_queries=num_queries, features=features, num_classes=num_classes,
            num_layers=num_decoder_layers, num_heads=num_heads, mlp_features=mlp_features,
            dropout_rate=dropout_rate, rngs=rngs,
        )  # fmt: skip
        self.deterministic = True

    def __call__(self, images: jax.Array, *, deterministic: bool | None = None, rngs=None,
                 sow_weights: bool = False) -> tuple[jax.Array, jax.Array]:  # fmt: skip
        kw = dict(deterministic=self._deterministic(deterministic), rngs=per_site_rngs(rngs),
                  sow_weights=sow_weights)  # fmt: skip
        x = embed_patches(self, images)
        x = x + sincos_2d(*self.grid_hw, x.shape[-1]).astype(x.dtype)[None]
        return self.decoder(self.encoder(x, **kw), **kw)


DETRConfig = config_class(DETR)
