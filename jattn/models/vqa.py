"""Visual question answering with co-attention: a question in tokens about an image.

Each layer lets the question attend to the image patches and the patches attend to the
question (:class:`jattn.layers.CoAttention`), then each modality attends to itself (the
patches with a learned bias per head and 2-D offset,
:func:`jattn.functional.vision.relative_position_bias_2d`, so a head can look at a
neighbour in one direction); the answer is read from the question's tokens (mean over
the real ones). Trained by the
training program on the toy of :func:`jattn.data.vqa_task` (``configs/vqa_toy.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jattn import mods
from jattn._model_config import config_class
from jattn.functional._checks import check_positive_int, fmt
from jattn.functional.vision import relative_position_bias_2d
from jattn.layers.axes import names
from jattn.layers.dropout import TrainEval, per_site_rngs
from jattn.layers.multimodal import CoAttention, _layer_norm, _PreNormBlock
from jattn.layers.positional import embed_ids
from jattn.layers.vision import embed_patches, setup_patches
from jattn.models._validate import check_tokens

__all__ = ["CoAttentionVQA", "CoAttentionVQAConfig", "neighbours_mod"]


# (row, column) offsets of the neighbour that each of the first four heads sees
_NEIGHBOURS = ((0, -1), (0, 1), (-1, 0), (1, 0))


def neighbours_mod(width: int, num_heads: int) -> mods.Mod:
    """A per-head ``mask_mod`` over the patches of a grid ``width`` wide (tokens
    row-major): head ``n < 4`` sees the query's own patch and its neighbour at
    ``_NEIGHBOURS[n]`` (left, right, up, down), the other heads every patch."""

    def neighbour(dy, dx):
        def mod(b, n, q, kv):
            same = (kv // width == q // width + dy) & (kv % width == q % width + dx)
            return same | (q == kv)

        return mod

    heads = [neighbour(dy, dx) for dy, dx in _NEIGHBOURS] + [mods.full()] * (num_heads - 4)
    return mods.per_head(heads)


class _CoLayer(nnx.Module):
    """``(t, i) += co_attention(norm(t), norm(i))``, then a pre-norm self-attention
    block on each; the image's with a learned 2-D relative position bias per head."""

    def __init__(self, features, num_heads, mlp_features, dropout_rate, eps, grid_hw,
                 image_mask_mod, rngs):  # fmt: skip
        self.grid_hw, self.image_mask_mod = grid_hw, image_mask_mod
        offsets = (2 * grid_hw[0] - 1) * (2 * grid_hw[1] - 1)
        self.relative_bias = nnx.Param(jnp.zeros((num_heads, offsets)), **names("heads", None))
        self.text_norm = _layer_norm(features, eps, rngs)
        self.image_norm = _layer_norm(features, eps, rngs)
        self.co = CoAttention(features, features, num_heads, dropout_rate=dropout_rate,
                              rngs=rngs)  # fmt: skip
        block = dict(in_kv_features=None, num_kv_heads=None, dropout_rate=dropout_rate, eps=eps,
                     rngs=rngs)  # fmt: skip
        self.text_block = _PreNormBlock(features, num_heads, mlp_features, **block)
        self.image_block = _PreNormBlock(features, num_heads, mlp_features, **block)

    def __call__(self, t, i, text_mask, **kw):
        dt, di = self.co(self.text_norm(t), self.image_norm(i), text_mask=text_mask, **kw)
        t, i = t + dt, i + di
        bias = relative_position_bias_2d(self.relative_bias[...], *self.grid_hw)
        return (
            self.text_block(t, mask=text_mask[:, None, None, :], **kw),
            self.image_block(i, bias=bias.astype(i.dtype), mask_mod=self.image_mask_mod, **kw),
        )


class CoAttentionVQA(TrainEval, nnx.Module):
    """``images [B, H, W, C]``, ``question [B, L]`` token ids (0 pads) ``-> logits [B, K]``.

    Args:
      image_size: ``(H, W)`` (or an int for square images), multiples of ``patch``.
      patch: p; the image becomes ``(H/p) * (W/p)`` tokens with learned positions.
      in_channels: C.
      vocab_size: the question's vocabulary (id 0 is padding).
      num_classes: K, the answers.
      features, num_heads, num_layers, mlp_features: the width D, heads, co-attention
        layers and MLP width.
      max_question_len: the longest question (learned positions).
      dropout_rate: dropout in every attention and residual branch.
      stem_features: as :class:`jattn.layers.ViT`'s: a 3 x 3 convolution to this many
        channels and a GELU before the patches (None: none).
      grid_neighbours: the image's self-attention gives its first four heads one
        direction each: head 0 sees the patch itself and its left neighbour, heads 1, 2
        and 3 the right, upper and lower one (:func:`neighbours_mod`; heads of
        different kinds in one layer, by per-head masks); the other heads see every
        patch. False: every head sees every patch.
      rngs: ``nnx.Rngs`` with ``params`` (and ``dropout`` for training).

    Every attention layer can sow its weights (``sow_weights=True``;
    :func:`jattn.viz.collect_attention_weights`): the question-to-image weights of layer
    ``l`` are keyed ``layers/l/co/text_to_image``.
    """

    def __init__(self, *, image_size, patch: int, in_channels: int, vocab_size: int,
                 num_classes: int, features: int, num_heads: int, num_layers: int,
                 mlp_features: int, max_question_len: int = 16, dropout_rate: float = 0.0,
                 stem_features: int | None = None, grid_neighbours: bool = False,
                 rngs: nnx.Rngs):  # fmt: skip
        features = check_positive_int("features", features)
        num_layers = check_positive_int("num_layers", num_layers)
        self.max_question_len = check_positive_int("max_question_len", max_question_len)
        setup_patches(self, image_size=image_size, patch=patch, in_channels=in_channels,
                      features=features, stem_features=stem_features, rngs=rngs)  # fmt: skip
        image_mask_mod = None
        if grid_neighbours:
            if num_heads < 4:
                raise ValueError(f"grid_neighbours needs num_heads >= 4, got {num_heads}")
            image_mask_mod = neighbours_mod(self.grid_hw[1], num_heads)
        init = nnx.initializers.normal(0.02)
        s = self.grid_hw[0] * self.grid_hw[1]
        self.image_pos = nnx.Param(init(rngs.params(), (s, features)), **names("position", "embed"))
        self.embed = nnx.Embed(check_positive_int("vocab_size", vocab_size), features,
                               embedding_metadata=names("vocab", "embed"), rngs=rngs)  # fmt: skip
        self.text_pos = nnx.Param(init(rngs.params(), (max_question_len, features)),
                                  **names("position", "embed"))  # fmt: skip
        self.layers = nnx.List([
            _CoLayer(features, num_heads, mlp_features, dropout_rate, 1e-6, self.grid_hw,
                     image_mask_mod, rngs)
            for _ in range(num_layers)
        ])  # fmt: skip
        self.final_norm = _layer_norm(features, 1e-6, rngs)
        self.head = nnx.Linear(features, check_positive_int("num_classes", num_classes),
                               kernel_metadata=names("embed", None), bias_metadata=names(None),
                               rngs=rngs)  # fmt: skip
        self.deterministic = True

    def __call__(self, images: jax.Array, question: jax.Array, *,
                 deterministic: bool | None = None, rngs=None,
                 sow_weights: bool = False) -> jax.Array:  # fmt: skip
        i = embed_patches(self, images) + self.image_pos[...][None]  # checks the images
        question = check_tokens("question", question, vocab_size=self.embed.num_embeddings)
        if question.shape[0] != i.shape[0]:
            raise ValueError(
                f"question must be [B, L] token ids with the images' B={i.shape[0]}, "
                f"got {fmt(question.shape)}"
            )
        if question.shape[1] > self.max_question_len:
            raise ValueError(
                f"question has L={question.shape[1]} tokens, more than max_question_len="
                f"{self.max_question_len}"
            )
        kw = dict(deterministic=self._deterministic(deterministic), rngs=per_site_rngs(rngs),
                  sow_weights=sow_weights)  # fmt: skip
        real = question != 0  # [B, L]
        t = embed_ids(self.embed, question) + self.text_pos[: question.shape[1]][None]
        for layer in self.layers:
            t, i = layer(t, i, real, **kw)
        t = self.final_norm(t)
        weights = real[..., None].astype(t.dtype)
        pooled = jnp.sum(t * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        return self.head(pooled)

    def question_to_image_weights(self, images, question) -> list[jax.Array]:
        """Each layer's question-to-image weights ``[B, N, L, (H/p) * (W/p)]``, first layer
        first; a deterministic forward pass."""
        from jattn.viz import collect_attention_weights

        sown = collect_attention_weights(self, images, question, deterministic=True)
        return [v for k, v in sown.items() if k.endswith("co/text_to_image")]


CoAttentionVQAConfig = config_class(CoAttentionVQA)
