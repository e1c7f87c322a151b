"""Multi-modal attention: layers where one modality attends to another.

- :class:`CoAttention`: text attends to image and image attends to text, with separate
  weights per direction or one shared set.
- :class:`GatedCrossAttentionBlock`: Flamingo's tanh-gated cross-attention and
  feed-forward, the identity at initialisation.
- :class:`PerceiverEncoder`: a learned latent array cross-attends to a long input, then
  self-attends; memory linear in the input length.
- :class:`AttentionPoolingHead`: big_vision's MAP head, learned probes attending over the
  tokens, then a residual MLP.

Each is a thin composition of :class:`jattn.layers.MultiHeadAttention` (whose widths may
differ for queries, keys and values: ``in_features``, ``in_kv_features``,
``in_value_features``, with ``v_head_dim`` and grouped heads ``num_kv_heads``), layer
norms and small MLPs. Shapes: B batch (any leading dims), T text or query tokens, S
image, media or input tokens, M latents, P probes, N heads, D features. Masks are
boolean, True = a real token (attend). Every call takes ``deterministic`` and ``rngs``
(dropout on the attention weights, as ``MultiHeadAttention``) and ``sow_weights``
(:func:`jattn.viz.collect_attention_weights`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.functional import _checks, _finite, _sharding
from jattn.functional._checks import check_positive_int, check_size, fmt
from jattn.layers.axes import names
from jattn.layers.dropout import per_site_rngs
from jattn.layers.multihead import MultiHeadAttention

__all__ = [
    "AttentionPoolingHead",
    "CoAttention",
    "GatedCrossAttentionBlock",
    "PerceiverEncoder",
]


# --------------------------------------------------------------------- shared parts


def _layer_norm(features: int, epsilon: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    axes = names("norm")
    return nnx.LayerNorm(features, epsilon=epsilon, scale_metadata=axes, bias_metadata=axes,
                         rngs=rngs)  # fmt: skip


class _MLP(nnx.Module):
    """``linear2(gelu(linear1(x)))``, ``[..., D] -> [..., D]`` (gelu's tanh form, as
    big_vision's ``MlpBlock``)."""

    def __init__(self, features: int, hidden: int, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(features, hidden, kernel_metadata=names("embed", "mlp"),
                                  bias_metadata=names("mlp"), rngs=rngs)  # fmt: skip
        self.linear2 = nnx.Linear(hidden, features, kernel_metadata=names("mlp", "embed"),
                                  bias_metadata=names("embed"), rngs=rngs)  # fmt: skip

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear2(jax.nn.gelu(self.linear1(x)))


def _check_input(name: str, x, width: int, letters: str) -> jax.Array:
    """``x`` as a real array of shape ``[..., L, width]``, else a ValueError."""
    x = _checks.check_real(name, x)
    if x.ndim < 2 or x.shape[-1] != width:
        raise ValueError(f"{name} must have shape {letters} with D={width}, got {fmt(x.shape)}")
    return x


def _same_batch(a_name: str, a: jax.Array, b_name: str, b: jax.Array) -> None:
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(
            f"{a_name} {fmt(a.shape)} and {b_name} {fmt(b.shape)} must have the same batch "
            "dims (all but the last two axes)"
        )


def _key_mask(name: str, mask, keys: jax.Array, letter: str) -> jax.Array | None:
    """A key padding mask ``[..., S]`` (True = a real token) of ``keys [..., S, D]`` as
    ``[..., 1, 1, S]``, broadcasting over heads and queries."""
    if mask is None:
        return None
    mask = _checks.check_bool_mask(name, mask, hint="True marks the real tokens")
    if mask.shape != keys.shape[:-1]:
        raise ValueError(
            f"{name} must have shape [B, {letter}] = {fmt(keys.shape[:-1])} (one entry per "
            f"token, True = a real token), got {fmt(mask.shape)}"
        )
    return mask[..., None, None, :]


def _kwargs(deterministic, rngs, sow_weights) -> dict:
    return dict(deterministic=deterministic, rngs=rngs, sow_weights=sow_weights)


# -------------------------------------------------------------------- co-attention


class CoAttention(nnx.Module):
    """Co-attention: text attends to image and image attends to text.

    ``text_to_image`` is a :class:`MultiHeadAttention` with queries from the text
    ``[..., T, Dt]`` and keys/values from the image ``[..., S, Di]``, output width Dt;
    ``image_to_text`` the reverse (output width Di).

    Args:
      text_features: Dt.
      image_features: Di.
      num_heads: N, in both directions.
      shared: False: the two directions have separate weights. True: one
        ``MultiHeadAttention`` (``text_to_image`` and ``image_to_text`` are the same
        module, its parameters counted once) projects queries, keys, values and
        outputs in both directions. One projection then reads both modalities, so
        ``shared=True`` needs ``text_features == image_features``; for different
        widths project one modality to the other's width first (e.g. an
        ``nnx.Linear(Di, Dt)``) and share at Dt.
      qkv_features: N * H in both directions (default: each direction's query width).
      num_kv_heads, v_head_dim, dropout_rate, use_bias: as :class:`MultiHeadAttention`.
      rngs: ``nnx.Rngs`` with a ``params`` stream (and ``dropout`` with dropout).
    """

    def __init__(self, text_features: int, image_features: int, num_heads: int, *,
                 shared: bool = False, qkv_features: int | None = None,
                 num_kv_heads: int | None = None, v_head_dim: int | None = None,
                 dropout_rate: float = 0.0, use_bias: bool = True, rngs: nnx.Rngs):  # fmt: skip
        text_features = check_positive_int("text_features", text_features)
        image_features = check_positive_int("image_features", image_features)
        shared = _checks.check_flag("shared", shared)
        if shared and text_features != image_features:
            raise ValueError(
                f"shared=True uses one projection for both modalities, which needs "
                f"text_features == image_features, got {text_features} and {image_features}; "
                "use shared=False, or project one modality to the other's width first"
            )
        opts = dict(qkv_features=qkv_features, num_kv_heads=num_kv_heads, v_head_dim=v_head_dim,
                    dropout_rate=dropout_rate, use_bias=use_bias, rngs=rngs)  # fmt: skip
        self.text_to_image = MultiHeadAttention(num_heads, text_features,
                                                in_kv_features=image_features, **opts)  # fmt: skip
        self.image_to_text = self.text_to_image if shared else MultiHeadAttention(
            num_heads, image_features, in_kv_features=text_features, **opts)  # fmt: skip
        self.shared = shared
        self.text_features, self.image_features = text_features, image_features

    def __call__(self, text: jax.Array, image: jax.Array, *, text_mask=None, image_mask=None,
                 return_weights: bool = False, sow_weights: bool = False,
                 deterministic: bool | None = None, rngs=None):  # fmt: skip
        """Both directions.

        Args:
          text: ``[..., T, Dt]``.
          image: ``[..., S, Di]``, the same batch dims.
          text_mask: ``[..., T]`` bool, True = a real text token (the image attends to
            those only); None: all.
          image_mask: ``[..., S]`` bool, the same for the image tokens.
          return_weights: also return the float32 weights, for :mod:`jattn.viz`.
          sow_weights: sow them (:func:`jattn.viz.collect_attention_weights` keys them
            ``'text_to_image'`` and ``'image_to_text'``; with ``shared=True`` the one
            layer sows both, under one path with ``/0``, text to image, and ``/1``).

        Returns:
          ``(text_out [..., T, Dt], image_out [..., S, Di])``: the text attended to the
          image and the image attended to the text; with ``return_weights``, ``(text_out,
          image_out, {'text_to_image': [..., N, T, S], 'image_to_text': [..., N, S,
          T]})``. Rows of padded queries are computed from zeroed inputs: ignore them.
          Padding (its values, NaN or inf included) changes no real row and gets zero
          gradients, as do the parameters through it.
        """
        text = _check_input("text", text, self.text_features, "[..., T, D]")
        image = _check_input("image", image, self.image_features, "[..., S, D]")
        _same_batch("text", text, "image", image)
        text_keys = _key_mask("text_mask", text_mask, text, "T")  # [..., 1, 1, T]
        image_keys = _key_mask("image_mask", image_mask, image, "S")  # [..., 1, 1, S]
        # padding zeroed first: it is also a query, whose NaN row, ignored by the caller,
        # would give NaN gradients to every projection (0 * NaN in the backward pass)
        if text_keys is not None:
            text = _finite.zero_padding(text, text_keys[..., 0, 0, :])
        if image_keys is not None:
            image = _finite.zero_padding(image, image_keys[..., 0, 0, :])
        kw = dict(return_weights=return_weights,
                  **_kwargs(deterministic, per_site_rngs(rngs), sow_weights))  # fmt: skip
        t2i = self.text_to_image(text, image, mask=image_keys, **kw)
        i2t = self.image_to_text(image, text, mask=text_keys, **kw)
        if not return_weights:
            return t2i, i2t
        (text_out, w_t2i), (image_out, w_i2t) = t2i, i2t
        return text_out, image_out, {"text_to_image": w_t2i, "image_to_text": w_i2t}


# ----------------------------------------------------------------------- Flamingo


def _mlp_features(mlp_features, features: int) -> int:
    """The MLP width: ``4 * features`` for None (0 is an error, not the default)."""
    return check_positive_int(
        "mlp_features", 4 * features if mlp_features is None else mlp_features
    )


class GatedCrossAttentionBlock(nnx.Module):
    """Flamingo's gated cross-attention block (Alayrac et al. 2022)::

        x = x + tanh(alpha_attn) * cross_attention(attn_norm(x), media)
        x = x + tanh(alpha_ff) * mlp(mlp_norm(x))

    ``alpha_attn`` and ``alpha_ff`` are scalar parameters initialised at 0, so at
    initialisation the block returns its input exactly: inserted into a pretrained
    language model it leaves the model unchanged until training opens the gates.

    Args:
      features: D, the width of the text stream ``x``.
      media_features: Dm, the width of the media tokens (e.g. a
        :class:`PerceiverEncoder`'s latents).
      num_heads: N.
      mlp_features: the MLP's hidden width (default 4 * D).
      num_kv_heads, dropout_rate: as :class:`MultiHeadAttention`.
      layer_norm_eps: epsilon of the two layer norms.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(self, features: int, media_features: int, num_heads: int,
                 mlp_features: int | None = None, *, num_kv_heads: int | None = None,
                 dropout_rate: float = 0.0, layer_norm_eps: float = 1e-5,
                 rngs: nnx.Rngs):  # fmt: skip
        features = check_positive_int("features", features)
        mlp_features = _mlp_features(mlp_features, features)
        _checks.check_finite_scalar("layer_norm_eps", layer_norm_eps, positive=True)
        self.attn_norm = _layer_norm(features, layer_norm_eps, rngs)
        media_features = check_positive_int("media_features", media_features)
        self.cross_attention = MultiHeadAttention(
            num_heads, features, in_kv_features=media_features, num_kv_heads=num_kv_heads,
            dropout_rate=dropout_rate, rngs=rngs,
        )  # fmt: skip
        self.alpha_attn = nnx.Param(jnp.zeros((), jnp.float32), **names())
        self.mlp_norm = _layer_norm(features, layer_norm_eps, rngs)
        self.mlp = _MLP(features, mlp_features, rngs)
        self.alpha_ff = nnx.Param(jnp.zeros((), jnp.float32), **names())
        self.in_features = self.out_features = features
        self.media_features = self.cross_attention.key.in_features[0]

    def _media_mask(self, media_mask, x, media):
        """``(mask [..., 1, 1|T, S], visible [..., 1|T, 1])`` from a ``[..., S]`` or
        ``[..., T, S]`` media mask (``visible``: the text tokens that see some media)."""
        if media_mask is None:
            return None, None
        mask = _checks.check_bool_mask("media_mask", media_mask, hint="True marks visible media")
        per_media, per_token = media.shape[:-1], (*x.shape[:-1], media.shape[-2])
        if mask.shape not in (per_media, per_token):
            raise ValueError(
                f"media_mask must have shape [B, S] = {fmt(per_media)} (media padding) or "
                f"[B, T, S] = {fmt(per_token)} (the media each text token sees), got "
                f"{fmt(mask.shape)}"
            )
        if mask.shape == per_media:
            mask = mask[..., None, :]  # [..., 1, S]
        return mask[..., None, :, :], jnp.any(mask, axis=-1)[..., None]

    def __call__(self, x: jax.Array, media: jax.Array, *, media_mask=None,
                 return_weights: bool = False, sow_weights: bool = False,
                 deterministic: bool | None = None, rngs=None):  # fmt: skip
        """``x [..., T, D]``, ``media [..., S, Dm]`` -> ``[..., T, D]``.

        ``media_mask``: bool ``[..., S]`` (True = a real media token) or ``[..., T, S]``
        (the media each text token may see, e.g. Flamingo's "only the latest image");
        a text token that sees no media gets no cross-attention update (zero before
        the gate). ``return_weights``: ``(out, weights [..., N, T, S])``.
        """
        x = _check_input("x", x, self.in_features, "[..., T, D]")
        media = _check_input("media", media, self.media_features, "[..., S, D]")
        _same_batch("x", x, "media", media)
        mask, visible = self._media_mask(media_mask, x, media)
        y = self.cross_attention(self.attn_norm(x), media, mask=mask, return_weights=return_weights,
                                 **_kwargs(deterministic, rngs, sow_weights))  # fmt: skip
        y, weights = y if return_weights else (y, None)
        if visible is not None:
            y = jnp.where(visible, y, 0)
        x = (x + jnp.tanh(self.alpha_attn[...]) * y).astype(x.dtype)
        x = (x + jnp.tanh(self.alpha_ff[...]) * self.mlp(self.mlp_norm(x))).astype(x.dtype)
        return (x, weights) if return_weights else x


# ----------------------------------------------------------------------- Perceiver


class _PreNormBlock(nnx.Module):
    """``z = z + attention(norm(z), kv_norm(inputs))``, then ``z = z + mlp(mlp_norm(z))``;
    self-attention when ``in_kv_features`` is None."""

    def __init__(self, features, num_heads, mlp_features, *, in_kv_features, num_kv_heads,
                 dropout_rate, eps, rngs):  # fmt: skip
        self.norm = _layer_norm(features, eps, rngs)
        self.kv_norm = None if in_kv_features is None else _layer_norm(in_kv_features, eps, rngs)
        self.attention = MultiHeadAttention(
            num_heads, features, in_kv_features=in_kv_features, num_kv_heads=num_kv_heads,
            dropout_rate=dropout_rate, rngs=rngs,
        )  # fmt: skip
        self.mlp_norm = _layer_norm(features, eps, rngs)
        self.mlp = _MLP(features, mlp_features, rngs)

    def __call__(self, z, inputs=None, *, mask=None, **kw):
        kv = None if self.kv_norm is None else self.kv_norm(inputs)
        z = z + self.attention(self.norm(z), kv, mask=mask, **kw)
        return z + self.mlp(self.mlp_norm(z))


class PerceiverEncoder(nnx.Module):
    """Perceiver encoder (Jaegle et al. 2021): a learned latent array ``[M, D]``
    cross-attends to the input ``[..., S, D_in]``, then ``num_self_layers``
    self-attention blocks run over the latents; a final layer norm.

    The cross-attention has M queries and S keys, so its cost and memory are O(M * S)
    and the rest does not depend on S: memory is linear in the input length. Its
    attention is :func:`jattn.dot_product_attention`, which picks its path from the
    shapes (on CPU the blocked, online-softmax path once M * S is large: no ``[M, S]``
    score matrix per head is materialised). Blocks are pre-norm with residuals.
    Nothing here knows the order of the input tokens: add position encodings to the
    input (e.g. Fourier features) if it has an order; without them the output is
    invariant to permuting the input.

    Args:
      num_latents: M.
      latent_features: D.
      input_features: D_in.
      num_heads: N, of every attention layer.
      num_self_layers: self-attention blocks after the cross-attention (>= 0).
      mlp_features: hidden width of the MLPs (default 4 * D).
      num_kv_heads, dropout_rate: as :class:`MultiHeadAttention`.
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Submodules: ``latents`` (``nnx.Param [M, D]``, truncated normal, std 0.02),
    ``cross`` (a block with ``attention``, ``norm``, ``kv_norm``, ``mlp``), ``layers``
    (the self-attention blocks), ``norm``.
    """

    def __init__(self, num_latents: int, latent_features: int, input_features: int,
                 num_heads: int, num_self_layers: int = 1, *, mlp_features: int | None = None,
                 num_kv_heads: int | None = None, dropout_rate: float = 0.0,
                 layer_norm_eps: float = 1e-5, rngs: nnx.Rngs):  # fmt: skip
        num_latents = check_positive_int("num_latents", num_latents)
        features = check_positive_int("latent_features", latent_features)
        input_features = check_positive_int("input_features", input_features)
        num_self_layers = check_size("num_self_layers", num_self_layers, minimum=0)
        mlp_features = _mlp_features(mlp_features, features)
        _checks.check_finite_scalar("layer_norm_eps", layer_norm_eps, positive=True)
        init = nnx.initializers.truncated_normal(0.02)
        self.latents = nnx.Param(init(rngs.params(), (num_latents, features)),
                                 **names(None, "embed"))  # fmt: skip
        opts = dict(num_kv_heads=num_kv_heads, dropout_rate=dropout_rate, eps=layer_norm_eps,
                    rngs=rngs)  # fmt: skip
        self.cross = _PreNormBlock(features, num_heads, mlp_features,
                                   in_kv_features=input_features, **opts)  # fmt: skip
        self.layers = nnx.List([_PreNormBlock(features, num_heads, mlp_features,
                                              in_kv_features=None, **opts)
                                for _ in range(num_self_layers)])  # fmt: skip
        self.norm = _layer_norm(features, layer_norm_eps, rngs)
        self.num_latents, self.in_features, self.out_features = (
            num_latents, input_features, features)  # fmt: skip

    def __call__(self, inputs: jax.Array, *, input_mask=None, sow_weights: bool = False,
                 deterministic: bool | None = None, rngs=None) -> jax.Array:  # fmt: skip
        """``inputs [..., S, D_in]`` -> the latents ``[..., M, D]``.

        ``input_mask``: bool ``[..., S]``, True = a real input token (padding is
        ignored: its values, NaN or inf included, do not change the output and get
        zero gradients). An example with no real token gets a zero cross-attention
        read (the library's fully-masked result).
        """
        inputs = _check_input("inputs", inputs, self.in_features, "[..., S, D_in]")
        mask = _key_mask("input_mask", input_mask, inputs, "S")  # [..., 1, 1, S]
        if mask is not None:
            # padding zeroed before the input norm: the attention's mask alone would
            # give a NaN row's norm, and the norm's scale and bias, NaN gradients
            inputs = _finite.zero_padding(inputs, mask[..., 0, 0, :])
        latents = self.latents[...].astype(inputs.dtype)
        z = jnp.broadcast_to(  # [..., M, D], split over the batch as the inputs are
            latents, (*inputs.shape[:-2], *latents.shape), out_sharding=_batch_sharding(inputs)
        )
        kw = _kwargs(deterministic, per_site_rngs(rngs), sow_weights)
        z = self.cross(z, inputs, mask=mask, **kw)
        for layer in self.layers:
            z = layer(z, **kw)
        return self.norm(z)


def _batch_sharding(x):
    """The sharding of ``x [..., L, D]``'s batch axes alone when ``x`` is sharded over
    explicit mesh axes (else None): the ``out_sharding`` of a new ``[..., M, D]``."""
    mesh = _sharding.explicit_mesh([x])
    return None if mesh is None else _sharding.sharding(mesh, *_sharding.spec(x)[:-2])


# ------------------------------------------------------------------- pooling head


class AttentionPoolingHead(nnx.Module):
    """Multi-head attention pooling (big_vision's ``MAPHead``): learned probes
    attend over the tokens, then a residual MLP::

        y = attention(probe, x)          # [..., P, D]
        out = y + mlp(norm(y))

    Args:
      features: D.
      num_heads: N.
      num_probes: P (default 1: the output is ``[..., D]``; more: ``[..., P, D]``).
      mlp_features: the MLP's hidden width (default 4 * D).
      num_kv_heads: as :class:`MultiHeadAttention`.
      layer_norm_eps: the norm's epsilon (1e-6, Flax's default, as big_vision).
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Submodules: ``probe`` (``nnx.Param [P, D]``, Xavier uniform, as the attention's
    kernels), ``attention``, ``norm``, ``mlp``.
    """

    def __init__(self, features: int, num_heads: int, *, num_probes: int = 1,
                 mlp_features: int | None = None, num_kv_heads: int | None = None,
                 layer_norm_eps: float = 1e-6, rngs: nnx.Rngs):  # fmt: skip
        features = check_positive_int("features", features)
        num_probes = check_positive_int("num_probes", num_probes)
        mlp_features = _mlp_features(mlp_features, features)
        _checks.check_finite_scalar("layer_norm_eps", layer_norm_eps, positive=True)
        xavier = nnx.initializers.xavier_uniform()
        self.probe = nnx.Param(xavier(rngs.params(), (num_probes, features)),
                               **names(None, "embed"))  # fmt: skip
        self.attention = MultiHeadAttention(num_heads, features, num_kv_heads=num_kv_heads,
                                            kernel_init=xavier, rngs=rngs)  # fmt: skip
        self.norm = _layer_norm(features, layer_norm_eps, rngs)
        self.mlp = _MLP(features, mlp_features, rngs)
        self.num_probes, self.in_features, self.out_features = num_probes, features, features

    def __call__(self, x: jax.Array, *, mask=None, return_weights: bool = False,
                 sow_weights: bool = False):  # fmt: skip
        """``x [..., S, D]`` -> ``[..., D]`` (one probe) or ``[..., P, D]``.

        ``mask``: bool ``[..., S]``, True = a real token. ``return_weights``: ``(out,
        weights [..., N, P, S])``, each probe's softmax over the tokens.
        """
        x = _check_input("x", x, self.in_features, "[..., S, D]")
        keys = _key_mask("mask", mask, x, "S")  # [..., 1, 1, S]
        probe = self.probe[...].astype(x.dtype)
        probe = jnp.broadcast_to(  # [..., P, D], split over the batch as x is
            probe, (*x.shape[:-2], *probe.shape), out_sharding=_batch_sharding(x)
        )
        y = self.attention(probe, x, mask=keys, return_weights=return_weights,
                           sow_weights=sow_weights)  # fmt: skip
        y, weights = y if return_weights else (y, None)
        out = y + self.mlp(self.norm(y))
        if self.num_probes == 1:
            out = out[..., 0, :]
        return (out, weights) if return_weights else out
