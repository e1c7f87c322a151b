"""Linear-attention layers: the projections of :class:`MultiHeadAttention` around the
linear family of :mod:`jattn.functional.linear` and :mod:`jattn.functional.lowrank`.

A :class:`LinearAttention` goes wherever a ``MultiHeadAttention`` goes (same parameters
``query``, ``key``, ``value``, ``out``, GQA included) and decodes with a constant-size
state instead of a growing key/value cache (:meth:`LinearAttention.init_cache`,
:meth:`LinearAttention.step`), through the models' usual greedy and beam search.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.functional import _checks, _finite, lowrank
from jattn.functional import linear as lin
from jattn.layers.axes import names
from jattn.layers.multihead import MultiHeadAttention

__all__ = ["KINDS", "LinearAttention", "LinearDecodeState"]

#: The mechanisms a :class:`LinearAttention` runs; the last two are causal only.
KINDS = ("linear", "performer", "retention", "gla")


class LinearDecodeState(NamedTuple):
    """A decoding cache: the state after the tokens so far (``kv [B, N, F, Hv]``,
    ``k_sum [B, N, F]`` or None, as :class:`jattn.LinearState`), ``index [B]``, the
    number of tokens seen (their positions, as :class:`jattn.models.KVCache`), and for
    kind ``"performer"`` ``key_max [B, K]``, the max of the keys' feature logits so far
    (the sums are stabilised by it; None for the other kinds)."""

    kv: jax.Array
    k_sum: jax.Array | None
    index: jax.Array
    key_max: jax.Array | None = None


def _key_validity(mask, b: int, s: int):
    """``[B, S]`` key validity from a key-padding mask ``[B|1, 1, 1, S]`` (or None)."""
    if mask is None:
        return None
    mask = _checks.check_bool_mask("mask", mask, hint="pass jattn.key_padding_mask(valid)")
    if (
        mask.ndim != 4
        or mask.shape[1:3] != (1, 1)
        or mask.shape[0] not in (1, b)
        or (mask.shape[3] != s)
    ):
        raise ValueError(
            f"linear attention takes only a boolean key-padding mask [B, 1, 1, S] = "
            f"[{b}, 1, 1, {s}] (as jattn.key_padding_mask gives), got {mask.dtype} "
            f"{list(mask.shape)}; other masks need softmax attention"
        )
    return jnp.broadcast_to(mask[:, 0, 0, :], (b, s))


def _head_rms_norm(out, eps: float = 1e-6):
    """``out [B, T, N, Hv]`` (float32) over each head's Hv: ``out / rms(out)``."""
    return out * jax.lax.rsqrt(jnp.mean(out * out, axis=-1, keepdims=True) + eps)


def _no_decode(where: str, value) -> str:
    return (
        f"{where} takes no decode={value!r}: it has no Flax autoregressive cache; it "
        "decodes with a constant-size state through init_cache(batch_size) and step(x, "
        "cache), as jattn.models' cached decoding (generate) does"
    )


class LinearAttention(MultiHeadAttention):
    """Multi-head linear attention with ``MultiHeadAttention``'s projections.

    Args:
      num_heads, in_features, qkv_features, out_features, num_kv_heads, ...: as
        :class:`MultiHeadAttention` (no ``score``, ``dropout_rate``, mods: the weights
        are never materialised).
      kind: ``"linear"`` (elu+1 features, :func:`jattn.linear_attention`),
        ``"performer"`` (FAVOR+ with ``num_features`` orthogonal random features, drawn
        once from ``rngs`` and kept as a non-trained variable ``projection``;
        :meth:`redraw` draws new ones), ``"retention"`` (RetNet decays per head,
        queries scaled by ``H ** -0.5``) or ``"gla"`` (gates
        ``log_sigmoid(x W_g + b_g) / 16`` per head and feature, as Yang et al.); these
        two have no normaliser, so each head's output is RMS-normalised (as RetNet's
        GroupNorm and GLA's RMSNorm, without their affine: the output projection
        follows).
      chunk_size: block length of the chunked form (default per kind).
    """

    def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None,
                 out_features: int | None = None, *, kind: str = "linear",
                 num_features: int = 64, chunk_size: int | None = None, rngs: nnx.Rngs,
                 **kwargs):  # fmt: skip
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        for bad in ("score", "dropout_rate", "mask_mod", "score_mod", "attention_fn", "decode"):
            if kwargs.get(bad) not in (None, 0.0):  # decode=False (== 0.0) is the default
                if bad == "decode":
                    raise ValueError(_no_decode(f"LinearAttention(kind={kind!r})", kwargs[bad]))
                raise ValueError(f"LinearAttention(kind={kind!r}) takes no {bad}")
        num_features = _checks.check_size("num_features", num_features)
        chunk_size = _checks.check_optional_size("chunk_size", chunk_size)
        super().__init__(num_heads, in_features, qkv_features, out_features, rngs=rngs, **kwargs)
        self.kind = kind
        self.chunk_size = chunk_size
        if kind == "performer":
            self.num_features = num_features
            self.projection = nnx.Variable(
                lowrank.orthogonal_random_features(rngs.params(), num_features, self.head_dim)
            )
        if kind == "gla":
            self.gate = nnx.Linear(
                in_features,
                num_heads * self.head_dim,  # [N * H]: split over heads, as the projections
                kernel_metadata=names("embed", "heads"),
                bias_metadata=names("heads"),
                rngs=rngs,
            )
        if kind == "retention":
            self.decay = nnx.data(lin.retnet_decays(num_heads))

    def set_view(self, deterministic=None, decode=None, batch_size=None, max_length=None):
        """Used by ``nnx.view``: ``deterministic`` as :class:`MultiHeadAttention`'s; a
        Flax cache (``decode=True``, ``batch_size``, ``max_length``) is refused."""
        if decode or batch_size is not None or max_length is not None:
            raise ValueError(_no_decode(f"nnx.view of LinearAttention(kind={self.kind!r})", decode))
        super().set_view(deterministic=deterministic)

    def redraw(self, key: jax.Array) -> None:
        """New FAVOR+ random features (kind ``"performer"``)."""
        self.projection.value = lowrank.orthogonal_random_features(
            key, self.num_features, self.head_dim
        )

    def _performer_features(self, q, k, is_causal, valid, key_max):
        """``(fq, fk, log_a, key_max)``: queries stabilised per row; keys by the max of
        the keys each row sees (causal: the running max, from ``key_max [B, K]`` on, with
        the log decays ``[B, T, N, 1]`` that carry the sums from one max to the next; else
        the max over the valid keys), so that no key scale underflows them all to 0."""
        w = self.projection[...]
        fq = lowrank.favor_features(q, w, stabilizer="row")
        if is_causal:
            fk, log_a, m = lowrank._causal_key_features(k, w, None, key_max)
            log_a = jnp.repeat(log_a, self.num_heads // self.num_kv_heads, axis=2)
            return fq, fk, log_a, m[:, -1, :, 0]
        return fq, lowrank._key_features(k, w, valid), None, None

    def _features(self, q, k):
        if self.kind == "linear":
            return lin.elu_feature_map(q), lin.elu_feature_map(k)
        if self.kind == "retention":
            return q * self.head_dim**-0.5, k
        return q, k

    def _log_gates(self, x):
        x, _ = _finite.hide_nonfinite(x)  # its q, k, v mark a bad token; no NaN derivative
        g = jax.nn.log_sigmoid(self.gate(x).astype(jnp.float32)) / 16.0
        return g.reshape(x.shape[:-1] + (self.num_heads, self.head_dim))

    def _attend(self, x, q, k, v, *, is_causal, state=None, return_state=False, valid=None,
                implementation=None, key_max=None):  # fmt: skip
        """``out``, or ``(out, LinearState, key_max)`` with ``return_state`` (``key_max``
        the performer's new running max, else None)."""
        bad = log_a = None
        if self.kind in ("linear", "performer"):  # features of finite inputs only
            # (a padding mask hides keys too: a padded query's NaN row must not reach
            # the keys' gradients through its zero cotangent)
            q, k, bad = lin.hide_before_features(q, k, is_causal or valid is not None, None)
        if self.kind == "performer":
            fq, fk, log_a, key_max = self._performer_features(q, k, is_causal, valid, key_max)
        else:
            fq, fk = self._features(q, k)
        if valid is not None:  # padding keys contribute nothing
            fk = jnp.where(valid[:, :, None, None], fk, 0.0)
            v = jnp.where(valid[:, :, None, None], v, 0.0)
        opts = dict(initial_state=state, return_state=return_state, chunk_size=self.chunk_size,
                    implementation=implementation)  # fmt: skip
        if self.kind in ("linear", "performer"):
            res = lin.normalized_attention(
                "LinearAttention", fq, fk, v, is_causal, state, return_state, self.chunk_size,
                None, implementation, bad, log_a,
            )  # fmt: skip
            return (*res, key_max) if return_state else res
        if not is_causal:
            raise ValueError(
                f"LinearAttention(kind={self.kind!r}) is causal only: call it with "
                "is_causal=True (a decoder), or use kind 'linear' or 'performer'"
            )
        # float32 out of the core, normalised per head (RetNet's GroupNorm, GLA's RMSNorm,
        # without their affine: the output projection follows), then the value dtype:
        # unnormalised, the sums grow with T and with the cube of the inputs' scale (in
        # float16, inf at inputs of scale 30)
        v32 = v.astype(jnp.float32)
        if self.kind == "retention":
            res = lin.retention(fq, fk, v32, self.decay, **opts)
        else:
            res = lin.gated_linear_attention(fq, fk, v32, self._log_gates(x), **opts)
        out, *state = res if return_state else (res,)
        out = _head_rms_norm(out).astype(v.dtype)
        return (out, *state, None) if return_state else out

    def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None, bias=None,
                 is_causal: bool = False, deterministic: bool = True, rngs=None,
                 return_weights: bool = False, sow_weights: bool = False):  # fmt: skip
        """``inputs_q [B, T, D]`` (self-attention; ``inputs_k``/``inputs_v`` for the
        non-causal cross form of kinds linear and performer) -> ``[B, T, D_out]``.
        ``mask``: a key-padding mask ``[B, 1, 1, S]`` only; no ``bias`` and no weights
        (linear attention never forms them)."""
        del deterministic, rngs
        if bias is not None or return_weights or sow_weights:
            raise ValueError(
                "LinearAttention has no bias, return_weights or sow_weights: it never "
                "forms the [T, S] weights"
            )
        inputs_k, inputs_v = self._check_inputs(inputs_q, inputs_k, inputs_v, True)
        if is_causal and inputs_k is not inputs_q:
            raise ValueError("causal LinearAttention is self-attention: pass inputs_q only")
        if inputs_q.shape[0] != inputs_k.shape[0]:
            raise ValueError(
                f"inputs_q {list(inputs_q.shape)} and inputs_k {list(inputs_k.shape)} must "
                "have the same batch size B"
            )
        valid = _key_validity(mask, *inputs_k.shape[:2])
        if is_causal and valid is not None:
            raise ValueError("causal LinearAttention takes no mask (right padding is causal)")
        if valid is not None:  # padding keys: zeros in (NaN there reaches no gradient)
            inputs_k = _finite.zero_padding(inputs_k, valid)
            inputs_v = _finite.zero_padding(inputs_v, valid)
        q, k, v = self._project(inputs_q, inputs_k, inputs_v)
        out = self._attend(inputs_q, q, k, v, is_causal=is_causal, valid=valid)
        return self._output(self._scale_heads(out).astype(v.dtype))

    def _scale_heads(self, out):
        """``out [B, T, N, Hv]`` scaled per head by a :func:`jattn.diagnostics.head_masked`
        ``attention_fn`` (set by :func:`jattn.diagnostics.masking_heads`): the layer
        calls no attention function, so nothing else could be set there."""
        fn = self.attention_fn
        if fn is None:
            return out
        if not hasattr(fn, "scale_heads"):
            raise TypeError(
                "LinearAttention calls no attention_fn (it never forms the weights); only "
                f"jattn.diagnostics.head_masked's can be set there, got {fn!r}"
            )
        return fn.scale_heads(out)

    def init_cache(self, batch_size: int, max_len: int | None = None, dtype=jnp.float32):
        """The decoding state of ``batch_size`` empty sequences: constant size, whatever
        ``max_len`` (accepted for the models' cache protocol)."""
        batch_size = _checks.check_size("batch_size", batch_size)
        _checks.check_optional_size("max_len", max_len)
        del max_len, dtype
        f = self.num_features if self.kind == "performer" else self.head_dim
        shape = (batch_size, self.num_heads, f, self.v_head_dim)
        k_sum = key_max = None
        if self.kind in ("linear", "performer"):
            k_sum = jnp.zeros(shape[:3], jnp.float32)
        if self.kind == "performer":  # no key yet: the smallest float (no inf is made)
            key_max = jnp.full((batch_size, self.num_kv_heads), jnp.finfo(jnp.float32).min)
        return LinearDecodeState(
            jnp.zeros(shape, jnp.float32), k_sum, jnp.zeros((batch_size,), jnp.int32), key_max
        )

    def step(self, x: jax.Array, cache: LinearDecodeState):
        """Causal attention of new tokens ``x [B, T, D]`` after the cached ones ->
        ``([B, T, D_out], cache)``: chunked for a prompt, recurrent for single tokens."""
        self._check_inputs(x, None, None, True, q_name="x")
        if not isinstance(cache, LinearDecodeState):
            raise TypeError(
                f"cache must be the LinearDecodeState of init_cache, got {type(cache).__name__}"
            )
        if cache.kv.shape[0] != x.shape[0]:
            raise ValueError(
                f"x {list(x.shape)} has B={x.shape[0]} sequences, but the cache holds "
                f"{cache.kv.shape[0]} (init_cache(batch_size={x.shape[0]}))"
            )
        key_max = cache.key_max
        if self.kind == "performer":
            want = (x.shape[0], self.num_kv_heads)
            if key_max is None or jnp.shape(key_max) != want:
                got = None if key_max is None else list(jnp.shape(key_max))
                raise ValueError(
                    f"a performer's cache.key_max must be [B, K] = {list(want)} (as "
                    f"init_cache gives it), got {got}"
                )
        q, k, v = self._project(x, x, x)
        form = "recurrent" if x.shape[-2] == 1 else None
        state = lin.LinearState(cache.kv, cache.k_sum)
        out, state, key_max = self._attend(x, q, k, v, is_causal=True, state=state,
                                           return_state=True, implementation=form,
                                           key_max=key_max)  # fmt: skip
        new = LinearDecodeState(state.kv, state.k_sum, cache.index + x.shape[-2], key_max)
        return self._output(self._scale_heads(out).astype(v.dtype)), new
