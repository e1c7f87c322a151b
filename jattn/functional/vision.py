"""Images as token sequences: 2-D sine-cosine positions and patches.

Pure jax. Shapes: B batch, H and W image height and width in pixels, C channels,
p the patch side, h = H / p and w = W / p the patch grid, D features. Images are
channels-last, ``[B, H, W, C]``; a patch sequence is row-major over the grid
(patch ``(i, j)`` is token ``i * w + j``), and each patch is flattened row-major as
``(pixel row, pixel column, channel)``, so ``patchify`` followed by a Linear is a
convolution with kernel ``[p, p, C, D]`` reshaped to ``[p * p * C, D]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jattn.functional._checks import check_finite_scalar, check_real, check_size, fmt

__all__ = ["patchify", "relative_position_bias_2d", "sincos_2d", "unpatchify"]


def sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> jax.Array:
    """Fixed 2-D sine-cosine position embeddings for an ``h x w`` grid, ``[h * w, dim]``.

    big_vision's ``posemb_sincos_2d`` convention: with ``q = dim // 4`` frequencies
    ``omega_k = temperature ** (-k / (q - 1))`` (``k = 0 .. q-1``; ``omega = [1]``
    when ``q = 1``), the row of grid cell ``(y, x)`` (token ``y * w + x``) is the
    concatenation ``[sin(x omega), cos(x omega), sin(y omega), cos(y omega)]``:
    the column coordinate first, each block q wide.

    Args:
      h, w: the grid's rows and columns.
      dim: D, a positive multiple of 4.
      temperature: the longest wavelength's scale (big_vision: 10000).

    Returns:
      float32 ``[h * w, dim]``.
    """
    h, w, dim = check_size("h", h), check_size("w", w), check_size("dim", dim)
    temperature = check_finite_scalar("temperature", temperature, positive=True)
    if dim % 4:
        raise ValueError(
            f"dim must be a multiple of 4 (sin and cos of each of the two axes), got {dim}"
        )
    q = dim // 4
    omega = jnp.arange(q, dtype=jnp.float32) / max(q - 1, 1)
    omega = 1.0 / (temperature**omega)  # [q]
    y, x = jnp.mgrid[:h, :w]
    y = jnp.einsum("m,d->md", y.reshape(-1).astype(jnp.float32), omega)  # [h*w, q]
    x = jnp.einsum("m,d->md", x.reshape(-1).astype(jnp.float32), omega)
    return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=-1)


def relative_position_bias_2d(table: jax.Array, h: int, w: int) -> jax.Array:
    """A learned bias per head and 2-D offset, spread over the token pairs of an ``h x w``
    grid (Swin Transformer's relative position bias, Liu et al. 2021).

    Args:
      table: ``[N, (2h - 1) * (2w - 1)]``: head n's bias for the offset ``(dy, dx)`` of the
        query cell from the key cell (``dy`` in ``(-h, h)``, ``dx`` in ``(-w, w)``) at
        ``(dy + h - 1) * (2w - 1) + dx + w - 1``.
      h, w: the grid's rows and columns (tokens row-major, token ``y * w + x``).

    Returns:
      ``[N, h * w, h * w]``, ``out[n, i, j] = table[n, index(cell_i - cell_j)]``: an
      attention ``bias`` (the same offset, the same bias, wherever the pair is).
    """
    h, w = check_size("h", h), check_size("w", w)
    table = check_real("table", table)
    size = (2 * h - 1) * (2 * w - 1)
    if table.ndim != 2 or table.shape[1] != size:
        raise ValueError(
            f"table must be [N, (2h - 1) * (2w - 1)] = [N, {size}] for a {h} x {w} grid, "
            f"got {fmt(table.shape)}"
        )
    y, x = np.divmod(np.arange(h * w), w)
    dy, dx = y[:, None] - y[None, :], x[:, None] - x[None, :]
    index = (dy + h - 1) * (2 * w - 1) + dx + w - 1  # [h*w, h*w], static
    return table[:, index]


def _check_images(name: str, images) -> jax.Array:
    images = check_real(name, images)
    if images.ndim != 4:
        raise ValueError(f"{name} must have shape [B, H, W, C], got {fmt(images.shape)}")
    return images


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """``images [B, H, W, C] -> [B, h * w, p * p * C]``: non-overlapping ``p x p`` patches,
    row-major over the grid, each flattened as ``(pixel row, pixel column, channel)``.

    A ValueError unless p divides both H and W (crop or pad the images first).
    """
    images = _check_images("images", images)
    p = check_size("patch", patch)
    b, hh, ww, c = images.shape
    if hh % p or ww % p:
        raise ValueError(
            f"image size H x W = {hh} x {ww} is not divisible by patch={p} "
            f"(images {fmt(images.shape)}); crop or pad the images to multiples of {p}"
        )
    h, w = hh // p, ww // p
    x = images.reshape(b, h, p, w, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, h, w, p, p, C]
    return x.reshape(b, h * w, p * p * c)


def unpatchify(patches: jax.Array, patch: int, grid_hw: tuple[int, int]) -> jax.Array:
    """The inverse of :func:`patchify`: ``patches [B, h * w, p * p * C] -> [B, h*p, w*p, C]``
    with ``grid_hw = (h, w)``."""
    patches = check_real("patches", patches)
    p = check_size("patch", patch)
    if not isinstance(grid_hw, tuple | list) or len(grid_hw) != 2:
        raise ValueError(f"grid_hw must be a pair (h, w), got {grid_hw!r}")
    h, w = check_size("grid_hw[0]", grid_hw[0]), check_size("grid_hw[1]", grid_hw[1])
    if patches.ndim != 3 or patches.shape[1] != h * w or patches.shape[2] % (p * p):
        raise ValueError(
            f"patches must have shape [B, h * w, p * p * C] with h * w = {h} * {w} and "
            f"p * p = {p * p} dividing the last axis, got {fmt(patches.shape)}"
        )
    b, c = patches.shape[0], patches.shape[2] // (p * p)
    x = patches.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)  # [B, h, p, w, p, C]
    return x.reshape(b, h * p, w * p, c)
