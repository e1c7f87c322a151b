"""Weights and masks from PyTorch's attention modules, without importing torch.

State dicts arrive as plain mappings from key to NumPy array (for example
``{k: v.numpy() for k, v in module.state_dict().items()}``). The loaders build the
matching jattn module and copy every tensor into it, checking that each expected key
is there with the expected shape and that no key is left over.

Layouts: torch's ``nn.Linear`` weight is ``[out, in]`` (``y = x W^T + b``), flax's kernel
``[in, out]``. ``nn.MultiheadAttention`` stacks the query, key and value projections row
wise in ``in_proj_weight [3D, D]`` (or keeps ``q_proj_weight [D, D]``,
``k_proj_weight [D, Dk]``, ``v_proj_weight [D, Dv]`` when ``kdim``/``vdim`` differ from
``embed_dim``), with head ``n`` owning output rows ``n*H:(n+1)*H``; jattn's kernels are
``[D, N, H]`` and the output kernel ``[N, H, D]``.

Masks: torch's boolean masks are True = *blocked*; jattn's are True = attend. See
:func:`torch_masks_to_jattn`. Inputs: jattn is batch first; for a torch module built
with ``batch_first=False`` swap the first two axes of inputs and outputs.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn.functional import _checks
from jattn.layers.multihead import MultiHeadAttention
from jattn.models.blocks import DecoderBlock, EncoderBlock, TransformerDecoder, TransformerEncoder

__all__ = [
    "load_multihead_attention",
    "load_transformer",
    "load_transformer_decoder",
    "load_transformer_decoder_layer",
    "load_transformer_encoder",
    "load_transformer_encoder_layer",
    "torch_masks_to_jattn",
]


def _fmt(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


class _StateDict:
    """A state dict being consumed: each key is taken once, with its shape checked."""

    def __init__(self, state_dict: Mapping, what: str):
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"{what}: state_dict must be a mapping of key -> array, "
                f"got {type(state_dict).__name__}"
            )
        self.what = what
        self.arrays = {str(k): np.asarray(v) for k, v in state_dict.items()}
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.arrays

    def shape(self, key: str) -> tuple[int, ...]:
        return self._get(key).shape

    def _get(self, key: str) -> np.ndarray:
        if key not in self.arrays:
            prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
            near = sorted(k for k in self.arrays if k.startswith(prefix))[:8]
            hint = f"; keys under {prefix!r}: {near}" if prefix and near else ""
            raise ValueError(f"{self.what}: state dict has no key {key!r}{hint}")
        return self.arrays[key]

    def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        x = self._get(key)
        if tuple(x.shape) != tuple(shape):
            raise ValueError(
                f"{self.what}: {key!r} has shape {_fmt(x.shape)}, expected {_fmt(shape)}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):  # bfloat16 included
            raise TypeError(f"{self.what}: {key!r} must be a float array, got dtype {x.dtype}")
        _checks.check_float32_range(f"{self.what}: {key!r}", x)
        self.used.add(key)
        return x

    def finish(self) -> None:
        extra = sorted(set(self.arrays) - self.used)
        if extra:
            raise ValueError(
                f"{self.what}: unexpected keys in the state dict: {extra} "
                "(options such as add_bias_kv or bias=False in the layers are not supported)"
            )


def _assign(param: nnx.Param, value: np.ndarray) -> None:
    # Shapes were checked against the torch layout; the reshape maps onto flax's layout.
    current = param.get_value()
    param.set_value(jnp.asarray(value, dtype=current.dtype).reshape(current.shape))


def _check_heads(num_heads, features, what):
    try:
        num_heads = _checks.check_size("num_heads", num_heads)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    if features % num_heads:
        raise ValueError(
            f"{what}: embed_dim={features} (from the state dict) is not divisible by "
            f"num_heads={num_heads}"
        )


def _mha_sizes(sd: _StateDict, p: str) -> tuple[int, int, int, bool]:
    """``(embed_dim, kdim, vdim, bias)`` of the ``nn.MultiheadAttention`` under prefix ``p``."""
    if p + "bias_k" in sd or p + "bias_v" in sd:
        raise ValueError(f"{sd.what}: add_bias_kv=True ({p}bias_k/bias_v) is not supported")
    if p + "in_proj_weight" in sd:
        shape = sd.shape(p + "in_proj_weight")
        if len(shape) != 2 or shape[0] != 3 * shape[1]:
            raise ValueError(
                f"{sd.what}: {p + 'in_proj_weight'!r} has shape {_fmt(shape)}, "
                "expected [3 * embed_dim, embed_dim]"
            )
        d = kdim = vdim = shape[1]
    else:
        shape = sd.shape(p + "q_proj_weight")
        if len(shape) != 2:
            raise ValueError(
                f"{sd.what}: {p + 'q_proj_weight'!r} has shape {_fmt(shape)}, "
                "expected [embed_dim, embed_dim]"
            )
        d = shape[0]
        kdim, vdim = (sd.shape(p + f"{x}_proj_weight") for x in "kv")
        for name, dim in (("k_proj_weight", kdim), ("v_proj_weight", vdim)):
            if len(dim) != 2:  # a 0-d array was an IndexError
                raise ValueError(
                    f"{sd.what}: {p + name!r} has shape {_fmt(dim)}, expected [embed_dim, "
                    f"{name[0]}dim]"
                )
        kdim, vdim = kdim[-1], vdim[-1]
    return d, kdim, vdim, p + "in_proj_bias" in sd


def _copy_mha(mha: MultiHeadAttention, sd: _StateDict, p: str) -> None:
    """Copies the ``nn.MultiheadAttention`` weights under prefix ``p`` into ``mha``."""
    d, kdim, vdim, bias = _mha_sizes(sd, p)
    n, h = mha.num_heads, mha.head_dim
    if (n * h, mha.key.in_features[0], mha.value.in_features[0]) != (d, kdim, vdim):
        raise ValueError(
            f"{sd.what}: {p or 'the state dict'} has embed_dim={d}, kdim={kdim}, vdim={vdim}; "
            f"the jattn layer has qkv width {n * h}, key input {mha.key.in_features[0]}, "
            f"value input {mha.value.in_features[0]}"
        )
    if p + "in_proj_weight" in sd:
        w = sd.take(p + "in_proj_weight", (3 * d, d))
        weights = (w[:d], w[d : 2 * d], w[2 * d :])
    else:
        weights = (
            sd.take(p + "q_proj_weight", (d, d)),
            sd.take(p + "k_proj_weight", (d, kdim)),
            sd.take(p + "v_proj_weight", (d, vdim)),
        )
    projections = (mha.query, mha.key, mha.value)
    for proj, w in zip(projections, weights, strict=True):
        _assign(proj.kernel, w.T)  # [out=N*H, in] -> [in, N, H]
    _assign(mha.out.kernel, sd.take(p + "out_proj.weight", (d, d)).T)  # -> [N, H, D]
    if bias:
        b = sd.take(p + "in_proj_bias", (3 * d,))
        for proj, i in zip(projections, range(3), strict=True):
            _assign(proj.bias, b[i * d : (i + 1) * d])  # -> [N, H]
        _assign(mha.out.bias, sd.take(p + "out_proj.bias", (d,)))


def load_multihead_attention(
    state_dict: Mapping,
    *,
    num_heads: int,
    dropout_rate: float = 0.0,
    rngs: nnx.Rngs | None = None,
) -> MultiHeadAttention:
    """A :class:`jattn.layers.MultiHeadAttention` with the weights of a ``nn.MultiheadAttention``.

    ``embed_dim``, ``kdim``, ``vdim`` and ``bias`` are read from the state dict (packed
    ``in_proj_weight`` or separate ``q/k/v_proj_weight``); ``num_heads`` is not stored
    there. Call the result batch first: ``layer(q [B, T, D], k [B, S, Dk], v [B, S, Dv],
    mask=..., bias=...)`` with masks from :func:`torch_masks_to_jattn`;
    ``return_weights=True`` gives the per-head weights ``[B, N, T, S]`` (torch's
    ``average_attn_weights=True`` is their mean over N). ``add_bias_kv`` and
    ``add_zero_attn`` are not supported.

    Args:
      state_dict: key -> array, as ``nn.MultiheadAttention.state_dict()``.
      num_heads: N.
      dropout_rate: attention dropout for fine-tuning (not stored in a state dict).
      rngs: ``nnx.Rngs`` (a ``dropout`` stream when ``dropout_rate > 0``); default ``Rngs(0)``.
    """
    sd = _StateDict(state_dict, "nn.MultiheadAttention")
    d, kdim, vdim, bias = _mha_sizes(sd, "")
    _check_heads(num_heads, d, sd.what)
    mha = MultiHeadAttention(
        num_heads,
        d,
        in_kv_features=kdim,
        in_value_features=vdim,
        dropout_rate=dropout_rate,
        use_bias=bias,
        rngs=rngs if rngs is not None else nnx.Rngs(0),
    )
    _copy_mha(mha, sd, "")
    sd.finish()
    return mha


def _copy_linear(linear: nnx.Linear, sd: _StateDict, p: str) -> None:
    _assign(linear.kernel, sd.take(p + "weight", (linear.out_features, linear.in_features)).T)
    _assign(linear.bias, sd.take(p + "bias", (linear.out_features,)))


def _copy_norm(norm: nnx.LayerNorm, sd: _StateDict, p: str) -> None:
    (d,) = norm.scale.get_value().shape
    _assign(norm.scale, sd.take(p + "weight", (d,)))
    _assign(norm.bias, sd.take(p + "bias", (d,)))


def _layer_sizes(sd: _StateDict, p: str) -> tuple[int, int]:
    """``(d_model, dim_feedforward)`` of the torch encoder/decoder layer under ``p``."""
    d, kdim, vdim, bias = _mha_sizes(sd, p + "self_attn.")
    if (kdim, vdim) != (d, d) or not bias:
        raise ValueError(
            f"{sd.what}: {p}self_attn must be a packed nn.MultiheadAttention with biases"
        )
    shape = sd.shape(p + "linear1.weight")
    if len(shape) != 2 or shape[1] != d:
        raise ValueError(
            f"{sd.what}: {p + 'linear1.weight'!r} has shape {_fmt(shape)}, "
            f"expected [dim_feedforward, {d}]"
        )
    return d, shape[0]


def _copy_block(block: EncoderBlock | DecoderBlock, sd: _StateDict, p: str) -> None:
    _copy_mha(block.self_attention, sd, p + "self_attn.")
    if isinstance(block, DecoderBlock):
        _copy_mha(block.cross_attention, sd, p + "multihead_attn.")
        _copy_norm(block.norm3, sd, p + "norm3.")
    _copy_linear(block.mlp.linear1, sd, p + "linear1.")
    _copy_linear(block.mlp.linear2, sd, p + "linear2.")
    _copy_norm(block.norm1, sd, p + "norm1.")
    _copy_norm(block.norm2, sd, p + "norm2.")


def _block_options(norm_first, activation, layer_norm_eps, dropout_rate, rngs):
    norm_first = _checks.check_flag("norm_first", norm_first)
    return dict(
        pre_norm=norm_first,
        activation=activation,
        layer_norm_eps=layer_norm_eps,
        dropout_rate=dropout_rate,
        rngs=rngs if rngs is not None else nnx.Rngs(0),
    )


def _load_layer(cls, what, state_dict, num_heads, options):
    sd = _StateDict(state_dict, what)
    d, ff = _layer_sizes(sd, "")
    _check_heads(num_heads, d, what)
    block = cls(d, num_heads, ff, **options)
    _copy_block(block, sd, "")
    sd.finish()
    return block


def load_transformer_encoder_layer(
    state_dict: Mapping,
    *,
    num_heads: int,
    norm_first: bool,
    activation: str,
    layer_norm_eps: float = 1e-5,
    dropout_rate: float = 0.0,
    rngs: nnx.Rngs | None = None,
) -> EncoderBlock:
    """A :class:`jattn.models.EncoderBlock` with the weights of a ``nn.TransformerEncoderLayer``.

    ``d_model`` and ``dim_feedforward`` come from the state dict; ``num_heads``,
    ``norm_first`` and ``activation`` (``'relu'`` or ``'gelu'``, exact as torch's) are
    not stored there, so they are required. torch's ``src_key_padding_mask``/``src_mask``
    become the block's ``mask`` via :func:`torch_masks_to_jattn`.
    """
    options = _block_options(norm_first, activation, layer_norm_eps, dropout_rate, rngs)
    return _load_layer(EncoderBlock, "nn.TransformerEncoderLayer", state_dict, num_heads, options)


def load_transformer_decoder_layer(
    state_dict: Mapping,
    *,
    num_heads: int,
    norm_first: bool,
    activation: str,
    layer_norm_eps: float = 1e-5,
    dropout_rate: float = 0.0,
    rngs: nnx.Rngs | None = None,
) -> DecoderBlock:
    """A :class:`jattn.models.DecoderBlock` with the weights of a ``nn.TransformerDecoderLayer``.

    As :func:`load_transformer_encoder_layer`. torch's ``tgt_mask`` /
    ``tgt_key_padding_mask`` become ``self_mask`` (or ``is_causal=True`` for the causal
    mask) and ``memory_key_padding_mask`` / ``memory_mask`` become ``cross_mask``.
    """
    options = _block_options(norm_first, activation, layer_norm_eps, dropout_rate, rngs)
    return _load_layer(DecoderBlock, "nn.TransformerDecoderLayer", state_dict, num_heads, options)


def _num_layers(sd: _StateDict, p: str) -> int:
    indices = set()
    for key in sd.arrays:
        if key.startswith(p + "layers."):
            index = key[len(p + "layers.") :].split(".", 1)[0]
            if index.isdigit():
                indices.add(int(index))
    if not indices:
        raise ValueError(f"{sd.what}: state dict has no keys {p + 'layers.0.'!r}...")
    if indices != set(range(len(indices))):
        raise ValueError(f"{sd.what}: layer indices under {p + 'layers.'!r} are {sorted(indices)}")
    return len(indices)


def _load_stack(cls, sd: _StateDict, p: str, num_heads: int, options: dict):
    num_layers = _num_layers(sd, p)
    d, ff = _layer_sizes(sd, p + "layers.0.")
    _check_heads(num_heads, d, sd.what)
    final_norm = p + "norm.weight" in sd
    stack = cls(num_layers, d, num_heads, ff, final_norm=final_norm, **options)
    for i, block in enumerate(stack.layers):
        _copy_block(block, sd, f"{p}layers.{i}.")
    if final_norm:
        _copy_norm(stack.norm, sd, p + "norm.")
    return stack


def load_transformer_encoder(
    state_dict: Mapping,
    *,
    num_heads: int,
    norm_first: bool,
    activation: str,
    layer_norm_eps: float = 1e-5,
    dropout_rate: float = 0.0,
    rngs: nnx.Rngs | None = None,
) -> TransformerEncoder:
    """A :class:`jattn.models.TransformerEncoder` from a ``nn.TransformerEncoder`` state dict.

    The number of layers and the final norm (present iff ``norm.weight`` is) come from
    the state dict; the other options as in :func:`load_transformer_encoder_layer`.
    """
    sd = _StateDict(state_dict, "nn.TransformerEncoder")
    options = _block_options(norm_first, activation, layer_norm_eps, dropout_rate, rngs)
    encoder = _load_stack(TransformerEncoder, sd, "", num_heads, options)
    sd.finish()
    return encoder


def load_transformer_decoder(
    state_dict: Mapping,
    *,
    num_heads: int,
    norm_first: bool,
    activation: str,
    layer_norm_eps: float = 1e-5,
    dropout_rate: float = 0.0,
    rngs: nnx.Rngs | None = None,
) -> TransformerDecoder:
    """A :class:`jattn.models.TransformerDecoder` from a ``nn.TransformerDecoder`` state dict.

    As :func:`load_transformer_encoder`.
    """
    sd = _StateDict(state_dict, "nn.TransformerDecoder")
    options = _block_options(norm_first, activation, layer_norm_eps, dropout_rate, rngs)
    decoder = _load_stack(TransformerDecoder, sd, "", num_heads, options)
    sd.finish()
    return decoder


def load_transformer(
    state_dict: Mapping,
    *,
    num_heads: int,
    norm_first: bool,
    activation: str,
    layer_norm_eps: float = 1e-5,
    dropout_rate: float = 0.0,
    rngs: nnx.Rngs | None = None,
) -> tuple[TransformerEncoder, TransformerDecoder]:
    """``(encoder, decoder)`` with the weights of a ``nn.Transformer``.

    Layer counts, sizes and the final norms come from the state dict. torch's
    ``model(src, tgt, tgt_mask=causal, src_key_padding_mask=sp,
    tgt_key_padding_mask=tp, memory_key_padding_mask=sp)`` is
    ``decoder(tgt, encoder(src, mask=m_src), self_mask=m_tgt, cross_mask=m_src)``
    with ``m_src, _ = torch_masks_to_jattn(sp)`` and ``m_tgt, _ = torch_masks_to_jattn(tp)``
    (``is_causal=True`` is the decoder's default).
    """
    sd = _StateDict(state_dict, "nn.Transformer")
    options = _block_options(norm_first, activation, layer_norm_eps, dropout_rate, rngs)
    encoder = _load_stack(TransformerEncoder, sd, "encoder.", num_heads, options)
    decoder = _load_stack(TransformerDecoder, sd, "decoder.", num_heads, options)
    sd.finish()
    return encoder, decoder


def _torch_mask(m, name: str) -> np.ndarray:
    """A torch mask as a NumPy bool or float array; a TypeError naming it otherwise."""
    try:
        m = np.asarray(m)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a boolean or float array, got {type(m).__name__}") from e
    if m.dtype != np.bool_ and not jnp.issubdtype(m.dtype, jnp.floating):  # bfloat16 too
        raise TypeError(f"{name} must be boolean or float, got dtype {m.dtype}")
    return m


def _split_torch_mask(m: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """torch mask -> (jattn mask True = attend, additive bias or None)."""
    if m.dtype == np.bool_:
        return ~m, None
    if not jnp.issubdtype(m.dtype, jnp.floating):
        raise TypeError(f"{name} must be boolean or float, got dtype {m.dtype}")
    m = m.astype(np.promote_types(m.dtype, np.float32))  # bfloat16: NumPy's checks below
    if np.isnan(m).any() or np.isposinf(m).any():
        raise ValueError(f"{name} contains NaN or +inf")
    blocked = np.isneginf(m)
    # finite float64 entries stay finite (clipped to float32's range: a float64 min would
    # become -inf, i.e. a visible key with an -inf logit, not torch's finite bias)
    f32 = np.finfo(np.float32)
    bias = np.clip(np.where(blocked, 0.0, m), f32.min, f32.max).astype(np.float32)
    return ~blocked, (bias if bias.any() else None)


def torch_masks_to_jattn(
    key_padding_mask=None,
    attn_mask=None,
    *,
    num_heads: int | None = None,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Converts ``nn.MultiheadAttention``'s masks to jattn's ``(mask, bias)``.

    torch's boolean masks are True = blocked and its float masks are added to the
    logits; jattn's ``mask`` is True = attend and ``bias`` is added. ``-inf`` entries
    of a float mask become ``mask=False`` (so that a row with no visible key gets
    jattn's zero weights rather than torch's NaN) and the finite remainder becomes
    ``bias``, returned only when some entry is nonzero (the blocks take ``mask``
    only, so a causal ``generate_square_subsequent_mask`` works there). The masks
    are host NumPy arrays (convert them once, outside ``jit``).

    Args:
      key_padding_mask: ``[B, S]``, bool (True = padded key) or float (additive).
      attn_mask: ``[T, S]`` or ``[B * N, T, S]`` (batch major, as torch), bool or float.
      num_heads: N, needed for a 3-D ``attn_mask``.

    Returns:
      ``(mask, bias)``: ``mask`` is ``None`` only when no torch mask is given; each is
      ``None`` or an array that broadcasts to ``[B, N, T, S]``:
      ``[B, 1, 1, S]`` from the padding mask, ``[1, 1, T, S]`` or ``[B, N, T, S]`` from
      ``attn_mask``, combined (masks and-ed, biases added).
    """
    masks, biases = [], []
    if key_padding_mask is not None:
        kpm = _torch_mask(key_padding_mask, "key_padding_mask")
        if kpm.ndim != 2:
            raise ValueError(f"key_padding_mask must have shape [B, S], got {_fmt(kpm.shape)}")
        m, b = _split_torch_mask(kpm, "key_padding_mask")
        masks.append(m[:, None, None, :])
        if b is not None:
            biases.append(b[:, None, None, :])
    if attn_mask is not None:
        am = _torch_mask(attn_mask, "attn_mask")
        if num_heads is not None:
            num_heads = _checks.check_size("num_heads", num_heads)
        if am.ndim == 2:
            am = am[None, None]
        elif am.ndim == 3:
            if num_heads is None or am.shape[0] % num_heads:
                raise ValueError(
                    f"a 3-D attn_mask {_fmt(am.shape)} is [B * N, T, S]: pass num_heads "
                    f"(a divisor of {am.shape[0]}), got num_heads={num_heads!r}"
                )
            am = am.reshape((am.shape[0] // num_heads, num_heads) + am.shape[1:])
        else:
            raise ValueError(
                f"attn_mask must have shape [T, S] or [B * N, T, S], got {_fmt(am.shape)}"
            )
        if masks and masks[0].shape[-1] != am.shape[-1]:
            raise ValueError(
                f"key_padding_mask {_fmt(np.shape(key_padding_mask))} and attn_mask "
                f"{_fmt(np.shape(attn_mask))} disagree on the key length S"
            )
        if masks and am.shape[0] not in (1, masks[0].shape[0]):
            raise ValueError(
                f"key_padding_mask {_fmt(np.shape(key_padding_mask))} is for B="
                f"{masks[0].shape[0]} but the 3-D attn_mask {_fmt(np.shape(attn_mask))} "
                f"with num_heads={num_heads} is for B={am.shape[0]}"
            )
        m, b = _split_torch_mask(am, "attn_mask")
        masks.append(m)
        if b is not None:
            biases.append(b)
    mask = None
    if masks:
        mask = masks[0] if len(masks) == 1 else masks[0] & masks[1]
    bias = None
    if biases:
        bias = biases[0] if len(biases) == 1 else biases[0] + biases[1]
    return mask, bias
