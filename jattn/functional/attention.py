"""The public boundary of scaled dot-product attention: one checked call, one spec.

:func:`dot_product_attention` checks its inputs once
(:func:`jattn.functional._checks.check_attention_inputs`, which builds the
:class:`~jattn.functional._checks.AttentionSpec` every path takes), asks
:func:`jattn.functional.dispatch.select` which path runs, and runs it from
:data:`jattn.functional.dispatch.PATHS`. The dense math (:func:`attention` with any
score function) lives in :mod:`jattn.functional.dense`.
"""

from __future__ import annotations

import jax

from jattn.functional import _checks, _eager, dispatch
from jattn.functional.dense import attention, single_head_attention
from jattn.functional.mods import BlockMask, MaskMod, ScoreMod
from jattn.functional.softmax import FullyMasked

__all__ = ["attention", "dot_product_attention", "single_head_attention"]


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    fully_masked: FullyMasked = "zeros",
    return_weights: bool = False,
    return_residual: bool = False,
    mask_mod: MaskMod | None = None,
    score_mod: ScoreMod | None = None,
    block_mask: BlockMask | None = None,
):
    """Scaled dot-product attention, a drop-in replacement for ``jax.nn.dot_product_attention``.

    ``softmax(q k^T * scale + bias, mask) v`` per head, with the argument names,
    ``[B, T, N, H]`` layout and semantics of ``jax.nn.dot_product_attention``, plus:
    a value head dim that may differ from H, dropout, a choice of result for
    fully masked rows (zeros by default, where jax.nn gives uniform weights), any
    number of leading batch dims, and the attention weights on request.

    Called eagerly, the checked call runs as one compiled program, cached by shapes,
    dtypes and options (under ``jax.jit`` and other transformations it is traced into
    the caller's program as usual); ``jax.disable_jit()`` runs it op by op.

    Args:
      query: ``[..., T, N, H]``.
      key: ``[..., S, K, H]``; N must be a multiple of K (GQA/MQA).
      value: ``[..., S, K, Hv]``.
      bias: see :func:`attention`, as for ``mask``, ``is_causal``,
        ``query_seq_lengths``, ``key_value_seq_lengths``, ``local_window_size``,
        ``dropout_rate``, ``dropout_rng``, ``fully_masked``, ``return_weights`` and
        ``return_residual``.
      scale: logit scale; ``None`` means ``1 / sqrt(H)``.
      implementation: which algorithm computes the output:

        - ``None`` (default): the fastest path that gives these results for the
          shape, dtype and device (see :func:`jattn.functional.dispatch.select`):
          dense for short sequences and for a few queries against many keys (a
          decoding step; on CPU, for a batch of two or more, its products then read
          keys and values in place),
          blocked for other long ones on CPU, cuDNN on GPU and
          the Pallas flash kernel on TPU where they support the inputs (other
          inputs there: dense while the float32 scores fit in 1 GiB, then blocked).
        - ``'dense'`` (alias ``'xla'``): the materialised ``[B, N, T, S]`` path.
        - ``'blocked'``: online-softmax blocks with a recomputing backward pass,
          O(T * H) memory (:func:`jattn.functional.blocked.blocked_attention`).
        - ``'cudnn'``, ``'pallas'``: the GPU / TPU kernels; a ``ValueError`` lists
          what they do not support.
        - ``'splash'``: the TPU Pallas splash kernel with the mask_mod (and causal /
          window shortcuts) evaluated per head and block, empty blocks skipped; the
          default on TPU for calls with mask functions it can take.

        With ``return_weights`` the output still comes from the chosen path, and
        the weights from the dense softmax.

        Differentiation: every path supports reverse mode (``jax.grad``,
        ``jax.vjp``). Dense and blocked also support forward-over-reverse (Hessian-
        vector products as ``jax.jvp`` of ``jax.grad``). Pure forward mode
        (``jax.jvp``, ``jax.jacfwd`` of the output) and reverse-over-reverse
        (``jax.grad`` of ``jax.grad``) need ``'dense'``: the blocked, cuDNN and
        Pallas paths are custom VJPs, which JAX cannot push tangents through, and
        the blocked backward loops over a traced number of blocks. The automatic
        choice's decoding step (a few queries against a long KV cache,
        :func:`jattn.functional.dispatch.dense_in_layout`) is a custom VJP too:
        its guard against non-finite hidden inputs keeps less that way in reverse
        mode. It differentiates reverse over reverse on finite inputs only.

      mask_mod: ``mask_mod(b, n, q_idx, kv_idx) -> bool`` (True = attend), a pattern of
        :mod:`jattn.mods` or your own; combined with ``mask``, ``is_causal``, the
        window and the lengths by logical and. ``b`` is the flattened batch index,
        ``n`` the query head, ``q_idx``/``kv_idx`` positions (int32 arrays that
        broadcast against each other).
      score_mod: ``score_mod(score, b, n, q_idx, kv_idx) -> score``, applied to the
        scaled logits ``q k^T * scale`` before ``bias`` is added (ALiBi, T5 buckets,
        soft-capping from :mod:`jattn.mods`, or your own; arrays it closes over get
        gradients on every path).
      block_mask: a :class:`jattn.BlockMask` from :func:`jattn.block_mask`: which key
        blocks each query block visits. It carries its ``mask_mod`` (pass the same
        one or none); the blocked path visits only its non-empty blocks and skips the
        mask on full ones. Build it once outside ``jit`` and reuse it across layers
        and steps.

    Returns:
      ``output [..., T, N, Hv]``, or ``(output, weights?, residual?)``.

    >>> import jax, jax.numpy as jnp
    >>> q = k = v = jnp.ones((2, 5, 4, 8))
    >>> dot_product_attention(q, k, v, is_causal=True).shape
    (2, 5, 4, 8)
    """
    _checks.check_flags(return_weights=return_weights)
    # One check of the inputs for every path (the cuDNN and Pallas runners make none).
    spec = _checks.check_attention_inputs(
        query,
        key,
        value,
        bias,
        mask,
        same_head_dim=True,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        fully_masked=fully_masked,
        is_causal=is_causal,
        scale=scale,
        return_residual=return_residual,
        mask_mod=mask_mod,
        score_mod=score_mod,
        block_mask=block_mask,
    )
    # The path is chosen from the call as given (an eager call's arrays are concrete).
    impl = dispatch.select(implementation, spec)
    # Pure forward mode is promised with implementation='dense' only: the automatic
    # choice takes the in-layout path's leaner reverse-mode-only guard.
    forward_mode = implementation in ("dense", "xla")
    if impl == "splash":  # evaluates the mask_mod on the host, from its values: as it is
        return _run(spec, impl, forward_mode, return_weights)
    return _eager.run(_run, (spec,), impl, forward_mode, return_weights)


def _run(spec, impl, forward_mode, return_weights):
    """:func:`dot_product_attention` after its checks, on the path ``impl``."""
    return_residual = spec.return_residual
    if impl == "dense" and return_weights:  # the dense path is the weights' path
        out, lse, weights = dispatch.dense_path(
            spec, return_weights=True, forward_mode=forward_mode
        )
    elif impl == "dense":
        (out, lse), weights = dispatch.dense_path(spec, forward_mode=forward_mode), None
    else:
        out, lse = dispatch.run(impl, spec)
        # The weights are the [..., N, T, S] matrix the other paths never build: take
        # them from the dense softmax (its unused output is dropped by XLA), and keep
        # the output of the chosen path, so asking for weights never changes the output.
        weights = dispatch.dense_path(spec, return_weights=True)[2] if return_weights else None
    extras = [x for x in (weights, lse if return_residual else None) if x is not None]
    return (out, *extras) if extras else out
