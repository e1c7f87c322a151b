"""Vision layers: patch embedding, a ViT classifier, and channel/spatial attention.

- :class:`PatchEmbedding`: ``[B, H, W, C] -> [B, h * w, D]``, a stride-p convolution
  (equal to :func:`jattn.functional.vision.patchify` then a Linear).
- :class:`ViT`: patch embedding, 2-D sine-cosine or learned positions, a pre-norm
  :class:`jattn.models.TransformerEncoder`, pooling (``'cls'``, ``'mean'`` or ``'map'``)
  and a linear head. :meth:`ViT.attention_weights` returns the encoder's per-layer
  weights for :func:`jattn.diagnostics.attention_rollout`; :func:`rollout_map` turns
  the rollout into an ``[h, w]`` map over the patches, for
  :func:`jattn.viz.plot_attention_on_image`.
- :class:`DETRDecoder`: learned object queries cross-attend to patch features and
  predict classes and boxes; :func:`hungarian_match` assigns predictions to targets
  (scipy, the ``vision`` extra).
- :class:`SqueezeExcitation`, :class:`ECA` (channel attention) and :class:`CBAM`
  (channel, then spatial attention) on convolutional features ``[B, H, W, C]``; each
  returns its attention map with ``return_weights=True``.

Images and features are channels-last. Shapes: B batch, H x W pixels, C channels, p
the patch side, (h, w) the patch grid, T = h * w (+1 with a class token), D features,
N heads, L layers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn._model_config import config_class
from jattn.diagnostics import attention_rollout
from jattn.functional import _checks
from jattn.functional._checks import check_positive_int, fmt
from jattn.functional.vision import sincos_2d
from jattn.layers.axes import names
from jattn.layers.dropout import TrainEval, per_site_rngs
from jattn.layers.multimodal import AttentionPoolingHead

__all__ = [
    "ViTConfig",
    "CBAM",
    "ConvStem",
    "DETRDecoder",
    "ECA",
    "PatchEmbedding",
    "SqueezeExcitation",
    "ViT",
    "hungarian_match",
    "rollout_map",
]

_POOLS = ("cls", "mean", "map")
_POSEMBS = ("sincos", "learned")


def _check_features(name: str, x, channels: int) -> jax.Array:
    """``x`` as a real ``[B, H, W, C]`` array with ``C == channels``, else a ValueError."""
    x = _checks.check_real(name, x)
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(
            f"{name} must have shape [B, H, W, C] (channels last) with C={channels}, "
            f"got {fmt(x.shape)}"
        )
    return x


# ----------------------------------------------------------------- patch embedding


class PatchEmbedding(nnx.Module):
    """``images [B, H, W, C] -> tokens [B, h * w, D]``: a ``p x p`` convolution with stride
    p (``conv``, kernel ``[p, p, C, D]``), tokens row-major over the patch grid.

    It equals ``patchify(images, p) @ kernel.reshape(p * p * C, D) + bias``. H and W
    must be multiples of p (a ValueError otherwise).
    """

    def __init__(self, patch: int, in_channels: int, features: int, *, rngs: nnx.Rngs):
        self.patch = check_positive_int("patch", patch)
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.features = check_positive_int("features", features)
        p = self.patch
        self.conv = nnx.Conv(in_channels, features, kernel_size=(p, p), strides=(p, p),
                             padding="VALID", kernel_metadata=names(None, None, None, "embed"),
                             bias_metadata=names("embed"), rngs=rngs)  # fmt: skip

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid ``(h, w)`` of ``height x width`` images; a ValueError unless p
        divides both."""
        p = self.patch
        if height % p or width % p:
            raise ValueError(
                f"image size H x W = {height} x {width} is not divisible by patch={p}; "
                f"crop or pad the images to multiples of {p}"
            )
        return height // p, width // p

    def __call__(self, images: jax.Array) -> jax.Array:
        images = _check_features("images", images, self.in_channels)
        self.grid(images.shape[1], images.shape[2])
        y = self.conv(images)  # [B, h, w, D]
        return y.reshape(y.shape[0], y.shape[1] * y.shape[2], y.shape[-1])  # B may be 0


class ConvStem(nnx.Module):
    """``num_layers`` 3 x 3 convolutions ("SAME" padding), each followed by a GELU:
    ``[B, H, W, C] -> [B, H, W, F]``, applied before a patch embedding (the
    convolutional stem of Xiao et al. 2021, "Early convolutions help transformers see
    better"). Submodules: ``convs``, an ``nnx.List`` of ``nnx.Conv``."""

    def __init__(self, in_channels: int, features: int, num_layers: int = 1, *,
                 rngs: nnx.Rngs):  # fmt: skip
        in_channels = check_positive_int("in_channels", in_channels)
        features = check_positive_int("features", features)
        # named as the models' stem_layers option, which is passed on here
        num_layers = check_positive_int("stem_layers", num_layers)
        self.convs = nnx.List([
            nnx.Conv(in_channels if i == 0 else features, features, kernel_size=(3, 3),
                     padding="SAME", kernel_metadata=names(None, None, None, "embed"),
                     bias_metadata=names("embed"), rngs=rngs)
            for i in range(num_layers)
        ])  # fmt: skip
        self.out_features = features

    def __call__(self, images: jax.Array) -> jax.Array:
        images = _check_features("images", images, self.convs[0].in_features)
        for conv in self.convs:
            images = jax.nn.gelu(conv(images))
        return images


def setup_patches(module: nnx.Module, *, image_size, patch: int, in_channels: int,
                  features: int, stem_features: int | None, stem_layers: int = 1,
                  rngs: nnx.Rngs) -> None:  # fmt: skip
    """Gives an image model ``image_size`` (an int or ``(H, W)``, as a tuple),
    ``in_channels``, ``stem`` (a :class:`ConvStem` with ``stem_features``, or None),
    ``patch_embed`` and ``grid_hw``: what :func:`embed_patches` uses."""
    if _checks.is_int(image_size):
        image_size = (image_size, image_size)
    if not isinstance(image_size, tuple | list) or len(image_size) != 2:
        raise ValueError(f"image_size must be an int or a pair (H, W), got {image_size!r}")
    # each a positive int: 0 made a model of no patches, True a 1 x 1 image
    module.image_size = tuple(
        check_positive_int(f"image_size[{i}]", d) for i, d in enumerate(image_size)
    )
    module.in_channels = check_positive_int("in_channels", in_channels)
    module.stem = nnx.data(None)
    stem_layers = check_positive_int("stem_layers", stem_layers)
    if stem_features is None and stem_layers != 1:  # was ignored: no stem without its width
        raise ValueError(f"stem_layers={stem_layers} needs stem_features (the stem's width)")
    if stem_features is not None:  # checked here, so the error names this model's option
        stem_features = check_positive_int("stem_features", stem_features)
        module.stem = ConvStem(in_channels, stem_features, stem_layers, rngs=rngs)
        in_channels = module.stem.out_features
    module.patch_embed = PatchEmbedding(patch, in_channels, features, rngs=rngs)
    module.grid_hw = module.patch_embed.grid(*module.image_size)


def embed_patches(module: nnx.Module, images: jax.Array) -> jax.Array:
    """``images [B, H, W, C] -> [B, h * w, D]`` through the stem (if any) and the patch
    embedding of a model set up by :func:`setup_patches`; a ValueError naming the
    expected shape otherwise."""
    images = _check_features("images", images, module.in_channels)
    if tuple(images.shape[1:3]) != module.image_size:
        raise ValueError(
            f"images must be {module.image_size[0]} x {module.image_size[1]} (the model's "
            f"image_size), got {fmt(images.shape)}"
        )
    if module.stem is not None:
        images = module.stem(images)  # [B, H, W, stem_features]
    return module.patch_embed(images)


# ---------------------------------------------------------------------------- ViT


class ViT(TrainEval, nnx.Module):
    """A Vision Transformer classifier (Dosovitskiy et al., 2021; big_vision's ``ViT``)::

        x = patch_embed(images) + positions      # [B, h*w, D]
        x = [cls; x]                             # pool='cls' only: [B, 1 + h*w, D]
        x = encoder(x)                           # pre-norm blocks, final LayerNorm
        logits = head(pool(x))                   # [B, num_classes]

    Args:
      image_size: ``(H, W)`` (or an int for square images), multiples of ``patch``.
      patch: p.
      in_channels: C.
      num_classes: the head's width.
      features: D (a multiple of 4 with ``posemb='sincos'``).
      num_layers, num_heads, mlp_features: the encoder's L, N and hidden width.
      pool: ``'cls'`` (a learned class token, prepended after the positions are
        added; the head reads token 0), ``'mean'`` (mean over the patch tokens) or
        ``'map'`` (:class:`jattn.layers.AttentionPoolingHead`).
      posemb: ``'sincos'`` (fixed, :func:`jattn.functional.vision.sincos_2d`) or
        ``'learned'`` (``pos_embedding [h*w, D]``, normal(0.02)).
      dropout_rate: the encoder's dropout.
      stem_features: None (the default): the patches are embedded straight from the
        pixels. An int F: ``stem_layers`` 3 x 3 convolutions to F channels, each with a
        GELU, come first (:class:`ConvStem`), which helps on small data sets.
      stem_layers: the stem's depth (1 by default).
      rngs: ``nnx.Rngs`` with a ``params`` stream (and ``dropout`` for training).

    Submodules: ``patch_embed``, ``cls_token`` (``'cls'``: ``nnx.Param [1, D]``, zeros),
    ``pos_embedding`` (``'learned'``), ``encoder``, ``map_head`` (``'map'``), ``head``.
    """

    def __init__(self, *, image_size, patch: int, in_channels: int, num_classes: int,
                 features: int, num_layers: int, num_heads: int, mlp_features: int,
                 pool: str = "cls", posemb: str = "sincos", dropout_rate: float = 0.0,
                 stem_features: int | None = None, stem_layers: int = 1,
                 rngs: nnx.Rngs):  # fmt: skip
        from jattn.models.blocks import TransformerEncoder  # models import layers

        if pool not in _POOLS:
            raise ValueError(f"pool must be one of {_POOLS}, got {pool!r}")
        if posemb not in _POSEMBS:
            raise ValueError(f"posemb must be one of {_POSEMBS}, got {posemb!r}")
        num_classes = check_positive_int("num_classes", num_classes)
        features = check_positive_int("features", features)
        if posemb == "sincos" and features % 4:  # else a late error from sincos_2d's dim
            raise ValueError(
                f"features={features} must be a multiple of 4 with posemb='sincos' (a sine "
                "and a cosine per grid axis share D); pick such a width or posemb='learned'"
            )
        setup_patches(self, image_size=image_size, patch=patch, in_channels=in_channels,
                      features=features, stem_features=stem_features,
                      stem_layers=stem_layers, rngs=rngs)  # fmt: skip
        self.pool, self.posemb = pool, posemb
        t = self.grid_hw[0] * self.grid_hw[1]
        if posemb == "learned":
            init = nnx.initializers.normal(0.02)
            self.pos_embedding = nnx.Param(init(rngs.params(), (t, features)),
                                           **names("position", "embed"))  # fmt: skip
        if pool == "cls":
            self.cls_token = nnx.Param(jnp.zeros((1, features)), **names(None, "embed"))
        self.encoder = TransformerEncoder(
            num_layers, features, num_heads, mlp_features, dropout_rate=dropout_rate,
            pre_norm=True, activation="gelu", layer_norm_eps=1e-6, final_norm=True, rngs=rngs,
        )  # fmt: skip
        if pool == "map":
            self.map_head = AttentionPoolingHead(features, num_heads, mlp_features=mlp_features,
                                                 rngs=rngs)  # fmt: skip
        self.head = nnx.Linear(features, num_classes, kernel_metadata=names("embed", None),
                               bias_metadata=names(None), rngs=rngs)  # fmt: skip
        self.num_prefix_tokens = 1 if pool == "cls" else 0
        self.deterministic = True

    def tokens(self, images: jax.Array) -> jax.Array:
        """The encoder's input: ``images [B, H, W, C] -> [B, T, D]`` (patches plus
        positions, with the class token first for ``pool='cls'``)."""
        x = embed_patches(self, images)  # [B, h*w, D]
        if self.posemb == "sincos":
            pos = sincos_2d(*self.grid_hw, x.shape[-1])  # fixed, recomputed (no state)
        else:
            pos = self.pos_embedding[...]
        x = x + pos.astype(x.dtype)[None]
        if self.pool == "cls":
            cls = jnp.broadcast_to(
                self.cls_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1])
            )
            x = jnp.concatenate([cls, x], axis=1)  # [B, 1 + h*w, D]
        return x

    def __call__(self, images: jax.Array, *, deterministic: bool | None = None, rngs=None,
                 sow_weights: bool = False) -> jax.Array:  # fmt: skip
        """``images [B, H, W, C] -> logits [B, num_classes]``. ``sow_weights``: every
        attention layer sows its weights (:func:`jattn.viz.collect_attention_weights`)."""
        deterministic = self._deterministic(deterministic)
        rngs = per_site_rngs(rngs)
        x = self.encoder(self.tokens(images), deterministic=deterministic, rngs=rngs,
                         sow_weights=sow_weights)  # fmt: skip
        if self.pool == "cls":
            x = x[:, 0]
        elif self.pool == "mean":
            x = jnp.mean(x, axis=1)
        else:
            x = self.map_head(x, sow_weights=sow_weights)
        return self.head(x)

    def attention_weights(self, images: jax.Array) -> list[jax.Array]:
        """The encoder's self-attention weights, one ``[B, N, T, T]`` per layer, first
        layer first (input for :func:`jattn.diagnostics.attention_rollout` and
        :func:`rollout_map`); a deterministic forward pass."""
        from jattn.viz import collect_attention_weights

        sown = collect_attention_weights(self, images, deterministic=True)
        return [v for k, v in sown.items() if k.startswith("encoder/")]


def rollout_map(weights, grid_hw: tuple[int, int], *, num_prefix_tokens: int = 1,
                residual: bool = True) -> jax.Array:  # fmt: skip
    """Attention rollout as a map over the patch grid.

    Computes ``R = attention_rollout(weights)`` (``[..., T, T]``, T = prefix + h * w)
    and returns, reshaped to ``[..., h, w]``:

    - ``num_prefix_tokens=1`` (a class token first): the class token's row over the
      patches, ``R[..., 0, 1:]``; it sums to ``1 - R[..., 0, 0]`` with ``residual``.
    - ``num_prefix_tokens=0`` (mean or MAP pooling): the mean of all rows, what a
      mean-pooled output draws on each patch; it sums to 1 with ``residual``.

    Args:
      weights: as :func:`jattn.diagnostics.attention_rollout` (e.g.
        :meth:`ViT.attention_weights`).
      grid_hw: the patch grid ``(h, w)`` (``ViT.grid_hw``).
    """
    if not isinstance(grid_hw, tuple | list) or len(grid_hw) != 2:
        raise ValueError(f"grid_hw must be a pair (h, w), got {grid_hw!r}")
    h, w = (check_positive_int(f"grid_hw[{i}]", n) for i, n in enumerate(grid_hw))
    if not _checks.is_int(num_prefix_tokens) or num_prefix_tokens not in (0, 1):
        raise ValueError(
            f"num_prefix_tokens must be 0 or 1, got {num_prefix_tokens!r}"
            f"{_checks.type_note(num_prefix_tokens)}"
        )
    rollout = attention_rollout(weights, residual=residual)  # [..., T, T]
    t = rollout.shape[-1]
    if t != num_prefix_tokens + h * w:
        raise ValueError(
            f"weights have T={t} tokens, but num_prefix_tokens + h * w = "
            f"{num_prefix_tokens} + {h} * {w} = {num_prefix_tokens + h * w}"
        )
    row = rollout[..., 0, 1:] if num_prefix_tokens else jnp.mean(rollout, axis=-2)  # [..., h*w]
    return row.reshape(*row.shape[:-1], h, w)


# -------------------------------------------------------------------------- DETR


class DETRDecoder(TrainEval, nnx.Module):
    """A DETR-style set-prediction head (Carion et al., 2020)::

        y = queries                               # [B, Q, D], learned
        y = decoder(y, features)                  # self-attention among the queries
                                                  # (not causal), cross-attention to
                                                  # the features [B, S, D]
        class_logits = class_head(y)              # [B, Q, num_classes + 1]
        boxes = sigmoid(box_head(y))              # [B, Q, 4], (cx, cy, w, h) in [0, 1]

    The last class is "no object". A simplification of DETR: the learned queries are
    the decoder's input (DETR starts from zeros and adds the queries to every
    layer's queries and keys), and ``features`` should already carry positions (e.g.
    :class:`ViT`'s ``encoder(tokens(images))``). Match predictions to targets with
    :func:`hungarian_match`.

    Args:
      num_queries: Q, the most objects one image can have.
      features: D.
      num_classes: the object classes (the class head has one more).
      num_layers, num_heads, mlp_features: the :class:`jattn.models.TransformerDecoder`'s
        L, N and hidden width (pre-norm, final LayerNorm).
      dropout_rate: the decoder's dropout.
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Submodules: ``queries`` (``nnx.Param [Q, D]``, normal(1)), ``decoder``,
    ``class_head``, ``box_head`` (two gelu Linears, then a Linear to 4).
    """

    def __init__(self, *, num_queries: int, features: int, num_classes: int, num_layers: int,
                 num_heads: int, mlp_features: int, dropout_rate: float = 0.0,
                 rngs: nnx.Rngs):  # fmt: skip
        from jattn.models.blocks import TransformerDecoder  # models import layers

        num_queries = check_positive_int("num_queries", num_queries)
        self.features = check_positive_int("features", features)
        num_classes = check_positive_int("num_classes", num_classes)
        init = nnx.initializers.normal(1.0)
        self.queries = nnx.Param(init(rngs.params(), (num_queries, features)),
                                 **names(None, "embed"))  # fmt: skip
        self.decoder = TransformerDecoder(
            num_layers, features, num_heads, mlp_features, dropout_rate=dropout_rate,
            pre_norm=True, activation="gelu", final_norm=True, rngs=rngs,
        )  # fmt: skip
        self.class_head = nnx.Linear(features, num_classes + 1,
                                     kernel_metadata=names("embed", None),
                                     bias_metadata=names(None), rngs=rngs)  # fmt: skip
        self.box_head = nnx.List(
            [nnx.Linear(features, features, kernel_metadata=names("embed", "mlp"),
                        bias_metadata=names("mlp"), rngs=rngs),
             nnx.Linear(features, features, kernel_metadata=names("mlp", "embed"),
                        bias_metadata=names("embed"), rngs=rngs),
             nnx.Linear(features, 4, kernel_metadata=names("embed", None),
                        bias_metadata=names(None), rngs=rngs)]
        )  # fmt: skip
        self.deterministic = True

    def __call__(self, features: jax.Array, *, mask=None, deterministic: bool | None = None,
                 rngs=None, sow_weights: bool = False) -> tuple[jax.Array, jax.Array]:  # fmt: skip
        """``features [B, S, D]`` -> ``(class_logits [B, Q, num_classes + 1], boxes [B, Q,
        4])``. ``mask``: bool ``[B, S]``, True = a real feature token. ``sow_weights``:
        the cross-attention weights ``[B, N, Q, S]`` are sown as
        ``decoder/layers/{l}/cross_attention`` (:func:`jattn.viz.collect_attention_weights`);
        reshape their S axis to the patch grid to see where each query looks."""
        x = _checks.check_real("features", features)
        if x.ndim != 3 or x.shape[-1] != self.features:
            raise ValueError(
                f"features must have shape [B, S, D] with D={self.features}, got {fmt(x.shape)}"
            )
        cross_mask = None
        if mask is not None:
            mask = _checks.check_bool_mask("mask", mask, hint="True marks the real tokens")
            if mask.shape != x.shape[:2]:
                raise ValueError(
                    f"mask must have shape [B, S] = {fmt(x.shape[:2])}, got {fmt(mask.shape)}"
                )
            cross_mask = mask[:, None, None, :]  # [B, 1, 1, S]
        deterministic = self._deterministic(deterministic)
        y = jnp.broadcast_to(self.queries[...].astype(x.dtype), (x.shape[0], *self.queries.shape))
        y = self.decoder(y, x, cross_mask=cross_mask, is_causal=False,
                         deterministic=deterministic, rngs=per_site_rngs(rngs),
                         sow_weights=sow_weights)  # fmt: skip
        h = y
        for i, layer in enumerate(self.box_head):
            h = layer(h)
            h = jax.nn.gelu(h) if i < len(self.box_head) - 1 else h
        return self.class_head(y), jax.nn.sigmoid(h)


def hungarian_match(cost) -> tuple[np.ndarray, np.ndarray]:
    """The assignment of predictions to targets with the least total cost (the
    Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``; ``pip install
    jattn[vision]``).

    Args:
      cost: ``[Q, M]`` (Q predictions, M targets, Q >= M for DETR), finite; NumPy
        or a concrete jax array (call it outside ``jit``, on the host).

    Returns:
      ``(pred_idx, target_idx)``, int64 ``[min(Q, M)]`` each, prediction
      ``pred_idx[k]`` matched to target ``target_idx[k]``, sorted by ``pred_idx``
      (scipy's order). Unmatched predictions are "no object".
    """
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "hungarian_match needs scipy: pip install 'jattn[vision]' (or scipy>=1.11)"
        ) from e
    if isinstance(cost, jax.core.Tracer):
        raise TypeError(
            "hungarian_match runs on the host: call it outside jit with a concrete cost matrix"
        )
    cost = np.asarray(cost)
    if cost.ndim != 2 or cost.dtype.kind not in "biuf":
        raise ValueError(
            f"cost must be a real [Q, M] matrix (predictions x targets), got "
            f"{cost.dtype}{fmt(cost.shape)}"
        )
    if not np.all(np.isfinite(cost)):
        raise ValueError("cost must be finite (use a large finite number for forbidden pairs)")
    rows, cols = linear_sum_assignment(cost)
    return rows.astype(np.int64), cols.astype(np.int64)


# --------------------------------------------------------- channel/spatial attention


def _mlp(channels: int, hidden: int, rngs: nnx.Rngs, *, use_bias: bool = True):
    kw = dict(use_bias=use_bias, rngs=rngs)
    down = nnx.Linear(channels, hidden, kernel_metadata=names("embed", "mlp"),
                      bias_metadata=names("mlp"), **kw)  # fmt: skip
    up = nnx.Linear(hidden, channels, kernel_metadata=names("mlp", "embed"),
                    bias_metadata=names("embed"), **kw)  # fmt: skip
    return down, up


def _hidden(channels: int, reduction: int) -> int:
    reduction = check_positive_int("reduction", reduction)
    return max(channels // reduction, 1)


class SqueezeExcitation(nnx.Module):
    """Squeeze-and-excitation (Hu et al., 2018) on ``x [B, H, W, C]``::

        s = mean_{H, W} x                        # [B, C]
        a = sigmoid(up(relu(down(s))))           # [B, C], down: C -> max(C // r, 1)
        out = x * a[:, None, None, :]

    ``return_weights=True``: ``(out, a [B, C])``.
    """

    def __init__(self, channels: int, *, reduction: int = 16, rngs: nnx.Rngs):
        self.channels = check_positive_int("channels", channels)
        self.down, self.up = _mlp(channels, _hidden(channels, reduction), rngs)

    def __call__(self, x: jax.Array, *, return_weights: bool = False):
        x = _check_features("x", x, self.channels)
        a = jax.nn.sigmoid(self.up(jax.nn.relu(self.down(jnp.mean(x, axis=(1, 2))))))
        out = x * a[:, None, None, :]
        return (out, a) if return_weights else out


def eca_kernel_size(channels: int, *, gamma: float = 2.0, b: float = 1.0) -> int:
    """ECA's adaptive kernel size: ``t = int(|log2(C) + b| / gamma)``, made odd (``t + 1``
    when even), as the reference implementation."""
    channels = check_positive_int("channels", channels)
    gamma = _checks.check_finite_scalar("gamma", gamma, positive=True)
    b = _checks.check_finite_scalar("b", b)
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class ECA(nnx.Module):
    """Efficient channel attention (Wang et al., 2020) on ``x [B, H, W, C]``::

        s = mean_{H, W} x                        # [B, C]
        a = sigmoid(conv1d_k(s))                 # [B, C], over the channel axis
        out = x * a[:, None, None, :]

    ``conv1d_k`` is a cross-correlation (as ``torch.nn.Conv1d``) of width k, zero
    padding k // 2 on each side, no bias: ``a_c = sigmoid(sum_j kernel[j] s_{c+j-k//2})``.
    ``kernel_size`` (odd) defaults to :func:`eca_kernel_size`. ``return_weights=True``:
    ``(out, a [B, C])``. Submodule: ``conv`` (``nnx.Conv``, kernel ``[k, 1, 1]``).
    """

    def __init__(self, channels: int, *, kernel_size: int | None = None, rngs: nnx.Rngs):
        self.channels = check_positive_int("channels", channels)
        k = eca_kernel_size(channels) if kernel_size is None else kernel_size
        k = check_positive_int("kernel_size", k)
        if k % 2 == 0:
            raise ValueError(f"kernel_size must be odd (centred on each channel), got {k}")
        self.kernel_size = k
        self.conv = nnx.Conv(1, 1, kernel_size=(k,), padding=[(k // 2, k // 2)], use_bias=False,
                             kernel_metadata=names(None, None, None), rngs=rngs)  # fmt: skip

    def __call__(self, x: jax.Array, *, return_weights: bool = False):
        x = _check_features("x", x, self.channels)
        s = jnp.mean(x, axis=(1, 2))[..., None]  # [B, C, 1]: channels as the length
        a = jax.nn.sigmoid(self.conv(s)[..., 0])  # [B, C]
        out = x * a[:, None, None, :]
        return (out, a) if return_weights else out


class CBAM(nnx.Module):
    """Convolutional block attention module (Woo et al., 2018) on ``x [B, H, W, C]``:
    channel attention, then spatial attention::

        a_c = sigmoid(mlp(mean_{H,W} x) + mlp(max_{H,W} x))     # [B, C], one shared mlp
        y = x * a_c[:, None, None, :]
        a_s = sigmoid(conv_kxk([mean_C y, max_C y]))            # [B, H, W]
        out = y * a_s[..., None]

    ``mlp`` is ``up(relu(down(.)))`` without biases, ``down: C -> max(C // r, 1)``;
    ``conv_kxk`` maps 2 channels (mean, max) to 1 with zero "same" padding and a
    bias (the paper's batch norm after it is left out). ``return_weights=True``:
    ``(out, {'channel': a_c, 'spatial': a_s})``.
    """

    def __init__(self, channels: int, *, reduction: int = 16, kernel_size: int = 7,
                 rngs: nnx.Rngs):  # fmt: skip
        self.channels = check_positive_int("channels", channels)
        k = check_positive_int("kernel_size", kernel_size)
        if k % 2 == 0:
            raise ValueError(f"kernel_size must be odd (centred on each pixel), got {k}")
        self.down, self.up = _mlp(channels, _hidden(channels, reduction), rngs, use_bias=False)
        self.spatial = nnx.Conv(2, 1, kernel_size=(k, k), padding=[(k // 2, k // 2)] * 2,
                                kernel_metadata=names(None, None, None, None),
                                bias_metadata=names(None), rngs=rngs)  # fmt: skip

    def __call__(self, x: jax.Array, *, return_weights: bool = False):
        x = _check_features("x", x, self.channels)

        def mlp(s):
            return self.up(jax.nn.relu(self.down(s)))

        a_c = jax.nn.sigmoid(mlp(jnp.mean(x, axis=(1, 2))) + mlp(jnp.max(x, axis=(1, 2))))
        y = x * a_c[:, None, None, :]
        pooled = jnp.stack([jnp.mean(y, axis=-1), jnp.max(y, axis=-1)], axis=-1)  # [B, H, W, 2]
        a_s = jax.nn.sigmoid(self.spatial(pooled)[..., 0])  # [B, H, W]
        out = y * a_s[..., None]
        return (out, {"channel": a_c, "spatial": a_s}) if return_weights else out


ViTConfig = config_class(ViT)
