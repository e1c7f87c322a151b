"""Attention heatmaps (matplotlib) and collecting a model's attention weights.

The plotting functions return a ``matplotlib.figure.Figure`` (shown inline when
it is the last expression of a notebook cell) and never call ``plt.show``;
:func:`save_figure` writes a PNG atomically. Masked cells (``mask`` False)
are drawn grey and hatched, so a masked key is never confused with a key that
got little attention. matplotlib is imported inside the functions.

Long inputs stay readable: token labels longer than 12 characters end in "…",
and only every k-th label is shown, k chosen at draw time from the axes' size
and the label font so that no two labels overlap. Titles too long for the
figure (or for their panel) are broken into lines, and the figures use
constrained layout, so no title is cut off.
"""

from __future__ import annotations

import functools
import math
import os
import re
import stat
import tempfile
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jattn.functional import _checks

__all__ = [
    "collect_attention_weights",
    "plot_attention",
    "plot_attention_grid",
    "plot_attention_on_image",
    "save_figure",
]

_SOWN_NAME = "attention_weights"
_MASKED_FACE = "0.8"
_MASKED_HATCH = "////"
_MAX_TICKS = 40  # at most this many labelled ticks per axis
_MAX_LABEL_CHARS = 12  # longer token labels are cut to 11 characters and "…"
_LABEL_SLOT = 1.5  # room along the axis per shown label, in label font sizes


def _new_figure(figsize):
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=figsize, layout="constrained")
    # Detach from pyplot: no global state left behind, and a notebook shows the
    # returned figure once (through its repr), not a second time at cell end.
    plt.close(fig)
    return fig


def _cmap(cmap):
    import matplotlib

    if isinstance(cmap, str):
        if cmap not in matplotlib.colormaps:
            raise ValueError(
                f"cmap must be a matplotlib colormap or the name of one (e.g. 'viridis'), "
                f"got {cmap!r}"
            )
        cmap = matplotlib.colormaps[cmap]
    if not hasattr(cmap, "with_extremes"):
        raise TypeError(f"cmap must be a matplotlib colormap or its name, got {cmap!r}")
    return cmap.with_extremes(bad=(0.0, 0.0, 0.0, 0.0))  # masked cells let the hatch show


def _as_real(name: str, x) -> np.ndarray:
    """``x`` as float32 NumPy values: a TypeError naming ``name`` for complex numbers (whose
    imaginary part the conversion would drop), strings and other non-numbers."""
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be an array of real numbers, got {type(x).__name__}") from e
    if arr.dtype.kind not in "biuf" and not jnp.issubdtype(arr.dtype, jnp.floating):  # bf16
        raise TypeError(f"{name} must hold real numbers (int or float), got dtype {arr.dtype}")
    _checks.check_float32_range(name, arr)  # the figures draw float32
    return arr.astype(np.float32)


def _check_axes(ax) -> None:
    """None, or a matplotlib Axes to draw into (a str was an AttributeError)."""
    from matplotlib.axes import Axes

    if ax is not None and not isinstance(ax, Axes):
        raise TypeError(f"ax must be a matplotlib Axes or None, got {type(ax).__name__} {ax!r}")


def _check_batch_index(batch_index) -> int | None:
    if batch_index is None:
        return None
    if not _checks.is_int(batch_index):
        raise ValueError(f"batch_index must be an int or None, got {batch_index!r}")
    return int(batch_index)


def _as_2d(name: str, x) -> np.ndarray:
    x = _as_real(name, x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [T, S], got {list(x.shape)}")
    if not x.size:  # was an error from inside NumPy's reductions
        raise ValueError(f"{name} of shape {list(x.shape)} has no entry to draw")
    return x


def _masked(weights: np.ndarray, mask) -> np.ndarray:
    if mask is None:
        return np.ma.masked_array(weights, mask=np.zeros(weights.shape, bool))
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must be boolean (True = attend), got dtype {mask.dtype}")
    try:
        mask = np.broadcast_to(mask, weights.shape)
    except ValueError:
        raise ValueError(
            f"mask of shape {list(mask.shape)} does not broadcast to the weights "
            f"{list(weights.shape)}"
        ) from None
    return np.ma.masked_array(weights, mask=~mask)


def _check_drawn(data: np.ndarray, name: str) -> None:
    """A ValueError naming ``name`` for a NaN or inf outside the mask (``data`` a masked
    array, or a plain one drawn whole): one would wreck the colour scale without a
    word, and a NaN is a bug to see."""
    bad = ~np.isfinite(np.ma.filled(data, 0.0))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite value(s) outside the mask (first: "
            f"{np.ma.getdata(data)[where]} at index {list(where)}); attention weights are finite, "
            "so look upstream (e.g. jnp.isnan on the scores), or mask those cells"
        )


def _color_top(vmax, datas, names) -> float:
    """Top of the colour scale: ``vmax`` (finite, > 0) or the largest weight shown.

    Weights drawn (not masked) must be finite (:func:`_check_drawn`)."""
    for data, name in zip(datas, names, strict=True):
        _check_drawn(data, name)
    if vmax is None:
        return max(float(np.max(d.filled(0.0), initial=0.0)) for d in datas) or 1.0
    if isinstance(vmax, bool) or not isinstance(vmax, int | float | np.number):
        raise TypeError(f"vmax must be a number, got {vmax!r}")
    if not (np.isfinite(vmax) and vmax > 0):
        raise ValueError(f"vmax must be finite and > 0 (the scale starts at 0), got {vmax!r}")
    return float(vmax)


def _short(label: str) -> str:
    """``label``, cut to ``_MAX_LABEL_CHARS`` characters (the last one "…") when longer."""
    if len(label) <= _MAX_LABEL_CHARS:
        return label
    return label[: _MAX_LABEL_CHARS - 1] + "\u2026"


class _TokenLabels:
    """Tick formatter: the (shortened) label of the cell at an integer position."""

    def __init__(self, labels):
        self.labels = [_short(s) for s in labels]

    def __call__(self, x, pos=None) -> str:
        i = int(round(float(x)))
        if 0 <= i < len(self.labels) and abs(float(x) - i) < 1e-6:
            return self.labels[i]
        return ""


_TOKEN_LOCATOR = None


def _token_locator(n: int):
    """A tick locator for ``n`` labelled cells: every k-th cell from 0, k the smallest
    step whose labels do not overlap along the axis at its size when drawn."""
    global _TOKEN_LOCATOR
    if _TOKEN_LOCATOR is None:
        from matplotlib.ticker import Locator

        class _TokenLocator(Locator):
            def __init__(self, n):
                self.n = n

            def __call__(self):
                return self.tick_values(0, self.n - 1)

            def tick_values(self, vmin, vmax):
                return np.arange(0, self.n, self.step())

            def step(self) -> int:
                most = _MAX_TICKS
                axis = self.axis
                if axis is not None and axis.axes is not None:
                    ax = axis.axes
                    length = ax.bbox.width if axis.axis_name == "x" else ax.bbox.height
                    size = axis.get_major_ticks(1)[0].label1.get_fontsize()  # points
                    slot = size * _LABEL_SLOT * ax.get_figure(root=True).dpi / 72
                    most = min(most, max(1, int(length // slot)))
                return max(1, math.ceil(self.n / most))

        _TokenLocator.__qualname__ = "_TOKEN_LOCATOR"  # picklable figures
        _TOKEN_LOCATOR = _TokenLocator
    return _TOKEN_LOCATOR(n)


def _set_ticks(ax, labels, n: int, axis: str, name: str, show: bool = True) -> None:
    from matplotlib.ticker import MaxNLocator, NullFormatter

    xy = ax.xaxis if axis == "x" else ax.yaxis
    if labels is None:  # integer positions
        xy.set_major_locator(MaxNLocator(nbins="auto", integer=True))
    else:
        labels = [str(s) for s in labels]
        if len(labels) != n:
            raise ValueError(
                f"{name} has {len(labels)} labels but the weights have {n} {axis}-cells"
            )
        xy.set_major_locator(_token_locator(n))
        if show:
            from matplotlib.ticker import FuncFormatter

            xy.set_major_formatter(FuncFormatter(_TokenLabels(labels)))
            if axis == "x":
                ax.tick_params(axis="x", labelrotation=90)
    if not show:
        xy.set_major_formatter(NullFormatter())


def _wrap_text(text, limit: float) -> float:
    """Breaks the string of the matplotlib ``text`` into lines at most ``limit`` pixels
    long (its width, or its height when rotated): after spaces, ``/``, ``_`` and ``-``
    where it can, inside a word longer than a line. Returns the pixels the lines
    added across (the room the figure should grow by)."""
    full = text.get_text()
    if not full or limit <= 0:
        return 0.0
    along, across = ("width", "height")
    if round(text.get_rotation()) % 180 != 0:
        along, across = across, along

    def fits(s: str) -> bool:
        text.set_text(s)
        return getattr(text.get_window_extent(), along) <= limit

    if fits(full):
        return 0.0
    fits(full.replace("\n", " "))
    one_line = getattr(text.get_window_extent(), across)
    lines: list[str] = []
    for para in full.split("\n"):
        line = ""
        for chunk in re.split(r"(?<=[\s/_\-])", para):
            if line and not fits((line + chunk).rstrip()):
                lines.append(line.rstrip())
                line = chunk.lstrip()
            else:
                line += chunk
            while len(line) > 1 and not fits(line.rstrip()):  # one word too long
                lo, hi = 1, len(line) - 1  # the longest prefix that fits (at least 1)
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    lo, hi = (mid, hi) if fits(line[:mid]) else (lo, mid - 1)
                lines.append(line[:lo])
                line = line[lo:]
        lines.append(line.rstrip())
    text.set_text("\n".join(lines))
    return max(0.0, getattr(text.get_window_extent(), across) - one_line)


def _grow(fig, width_px: float, height_px: float) -> None:
    """Makes ``fig`` larger by so many pixels (room for titles broken into lines)."""
    if width_px > 0 or height_px > 0:
        w, h = fig.get_size_inches()
        fig.set_size_inches(w + width_px / fig.dpi, h + height_px / fig.dpi)


def _heatmap(ax, data, cmap, norm, row_labels, col_labels, show_rows=True, show_cols=True):
    ax.patch.set_facecolor(_MASKED_FACE)
    ax.patch.set_hatch(_MASKED_HATCH)
    im = ax.imshow(data, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    t, s = data.shape
    _set_ticks(ax, row_labels, t, "y", "row_labels", show_rows)
    _set_ticks(ax, col_labels, s, "x", "col_labels", show_cols)
    return im


def plot_attention(
    weights,
    *,
    row_labels: Sequence | None = None,
    col_labels: Sequence | None = None,
    mask=None,
    title: str | None = None,
    ax=None,
    cmap="viridis",
    vmax: float | None = None,
    colorbar: bool = True,
):
    """One attention heatmap: queries down the rows, keys along the columns.

    Args:
      weights: ``[T, S]`` (any array; converted with NumPy).
      row_labels: T query labels (tokens); ``None`` for integer ticks.
      col_labels: S key labels.
      mask: optional boolean, broadcasts to ``[T, S]``, True = attend; False
        cells are masked in the image and drawn grey and hatched.
      title: axes title; broken into lines when wider than the figure (than the
        axes, for a given ``ax``).
      ax: draw into this axes (default: a new figure, with constrained layout).
      cmap: colormap name or object.
      vmax: top of the colour scale, finite and > 0 (default: the largest weight);
        the bottom is 0. A NaN or inf weight outside the mask is a ValueError.
      colorbar: add a colorbar.

    Long label lists are thinned to every k-th label so that none overlap, and
    labels longer than 12 characters end in "…" (the module docstring).

    Returns:
      The ``matplotlib.figure.Figure``; the image is ``fig.axes[0].images[0]``;
      the axes are titled "keys" (x) and "queries" (y).
    """
    import matplotlib.colors

    _check_axes(ax)
    data = _masked(_as_2d("weights", weights), mask)
    top = _color_top(vmax, [data], ["weights"])
    t, s = data.shape
    if ax is None:
        fig = _new_figure(
            (max(3.0, 0.25 * min(s, _MAX_TICKS) + 2), max(2.5, 0.25 * min(t, 40) + 1))
        )
        ax = fig.add_subplot()
        title_room = 0.9 * fig.bbox.width
    else:
        fig = ax.figure
        title_room = ax.bbox.width
    norm = matplotlib.colors.Normalize(vmin=0.0, vmax=top)
    im = _heatmap(ax, data, _cmap(cmap), norm, row_labels, col_labels)
    ax.set_xlabel("keys")
    ax.set_ylabel("queries")
    if title is not None:
        extra = _wrap_text(ax.set_title(title), title_room)
        if ax.get_figure(root=True).get_layout_engine() is not None:
            _grow(fig, 0.0, extra)
    if colorbar:
        fig.colorbar(im, ax=ax)
    return fig


def _select_batch(
    name: str, x: np.ndarray, batch_index: int | None, ndim: int, *, broadcast: bool = False
) -> np.ndarray:
    """Example ``batch_index`` of ``x`` when it has a batch axis. ``broadcast``: a batch
    axis of 1 stands for every example (a mask); weights must hold the example."""
    batch_index = _check_batch_index(batch_index)
    if x.ndim == ndim + 1:
        if broadcast and x.shape[0] == 1:
            return x[0]
        if batch_index is None:
            raise ValueError(
                f"{name} has a batch axis ({list(x.shape)}); pass batch_index= to pick an example"
            )
        if not -x.shape[0] <= batch_index < x.shape[0]:
            raise ValueError(
                f"batch_index={batch_index} is out of range for {name} with a batch of {x.shape[0]}"
            )
        return x[batch_index]
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape [N, T, S] or [B, N, T, S], got {list(x.shape)}")
    if batch_index is not None and not broadcast:  # was ignored: the caller meant a batch
        raise ValueError(
            f"batch_index={batch_index} was given, but {name} {list(x.shape)} is read as "
            "[N, T, S], with no batch axis; drop batch_index, or pass [B, N, T, S]"
        )
    return x


def _per_layer(weights, layer_names, batch_index):
    batch_index = _check_batch_index(batch_index)
    if isinstance(weights, Mapping):
        if not weights:
            raise ValueError("weights is an empty dict: there is no layer to plot")
        names = list(weights) if layer_names is None else list(layer_names)
        if len(names) != len(weights):
            raise ValueError(f"got {len(names)} layer_names for {len(weights)} layers")
        layers = [
            _select_batch(f"weights[{k!r}]", _as_real(f"weights[{k!r}]", v), batch_index, 3)
            for k, v in weights.items()
        ]
        return names, layers
    arr = _as_real("weights", weights)
    if arr.ndim == 5:
        if batch_index is None:
            raise ValueError(
                f"weights [L, B, N, T, S] = {list(arr.shape)} have a batch axis; pass batch_index="
            )
        if not -arr.shape[1] <= batch_index < arr.shape[1]:
            raise ValueError(
                f"batch_index={batch_index} is out of range for weights with a batch of "
                f"{arr.shape[1]}"
            )
        arr = arr[:, batch_index]
    elif arr.ndim == 4 and batch_index is not None:  # was ignored: [B, N, T, S] read as layers
        raise ValueError(
            f"batch_index={batch_index} was given, but weights {list(arr.shape)} are read as "
            "[L, N, T, S], with no batch axis; one layer's [B, N, T, S] weights go in a dict "
            "{name: weights}, a stack of layers' as [L, B, N, T, S]"
        )
    if arr.ndim != 4:
        raise ValueError(
            "weights must be [L, N, T, S], [L, B, N, T, S] (with batch_index) or a dict of "
            f"per-layer [N, T, S] / [B, N, T, S], got an array of shape {list(arr.shape)}"
        )
    if arr.shape[0] == 0:
        raise ValueError(f"weights of shape {list(arr.shape)} have no layer to plot (L=0)")
    names = [f"layer {i}" for i in range(arr.shape[0])] if layer_names is None else layer_names
    if len(names) != arr.shape[0]:
        raise ValueError(f"got {len(names)} layer_names for {arr.shape[0]} layers")
    return list(names), list(arr)


def _for_layer(value, key, name):
    """Labels or masks given once for all layers, or as a dict keyed by layer (the
    weights dict's key, or the layer's name in the figure)."""
    if isinstance(value, Mapping):
        return value.get(key, value.get(name))
    return value


def _check_layer_keys(what: str, value, keys, names) -> None:
    if isinstance(value, Mapping):
        unknown = set(value) - set(keys) - set(names)
        if unknown:
            raise ValueError(
                f"{what} has keys {sorted(map(str, unknown))} that name no layer; "
                f"the layers are {list(keys)}"
            )


def plot_attention_grid(
    weights,
    *,
    batch_index: int | None = None,
    row_labels=None,
    col_labels=None,
    layer_names: Sequence[str] | None = None,
    head_names: Sequence[str] | None = None,
    mask=None,
    title: str | None = None,
    cmap="viridis",
    vmax: float | None = None,
    cell_size: float = 2.2,
):
    """A grid of heatmaps: one row per layer, one column per head, one shared colorbar.

    Args:
      weights: ``[L, N, T, S]``; ``[L, B, N, T, S]`` with ``batch_index``; or a
        dict ``{layer name: [N, T, S] or [B, N, T, S]}`` (as returned by
        :func:`collect_attention_weights`), whose layers may differ in N, T and S
        (encoder self, decoder self and cross attention in one figure).
      batch_index: which example to draw when the weights have a batch axis.
      row_labels, col_labels: query and key labels, shared by every layer, or a
        dict ``{layer name: labels}`` when the layers attend over different sequences.
      layer_names: row titles (default: the dict keys or ``layer i``).
      head_names: column titles (default ``head j``).
      mask: boolean, True = attend, broadcasting to one layer's ``[N, T, S]`` (or
        ``[B, N, T, S]`` with ``batch_index``), or a dict ``{layer name: mask}``.
      title: figure title; broken into lines when wider than the figure.
      cmap: colormap.
      vmax: top of the shared colour scale, finite and > 0 (default: the largest
        weight shown). A NaN or inf weight outside the mask is a ValueError.
      cell_size: inches per heatmap.

    Each row is labelled with its layer's name (the y label of its first heatmap;
    the figure's y label is "queries"), each column's lowest heatmap has the x
    label "keys". Token labels are thinned and shortened as in :func:`plot_attention`;
    head and layer names too long for a panel are broken into lines.

    Returns:
      The ``matplotlib.figure.Figure``: ``sum over layers of N`` heatmap axes
      (row-major, layer by layer) followed by the colorbar axes.
    """
    import matplotlib.colors

    cell_size = _checks.check_finite_scalar("cell_size", cell_size, positive=True)
    names, layers = _per_layer(weights, layer_names, batch_index)
    keys = list(weights) if isinstance(weights, Mapping) else names
    for what, value in (("mask", mask), ("row_labels", row_labels), ("col_labels", col_labels)):
        _check_layer_keys(what, value, keys, names)
    for name, w in zip(names, layers, strict=True):
        if not w.size:  # was matplotlib's "Number of columns must be a positive integer"
            raise ValueError(f"weights of {name!r}, {list(w.shape)}, have no entry to draw")
    num_cols = max(w.shape[0] for w in layers)
    heads = [f"head {j}" for j in range(num_cols)] if head_names is None else list(head_names)
    if len(heads) < num_cols:
        raise ValueError(f"got {len(heads)} head_names for {num_cols} heads")
    datas = []
    for key, name, w in zip(keys, names, layers, strict=True):
        m = _for_layer(mask, key, name)
        if m is not None:
            m = np.asarray(m)
            if m.ndim == 4:
                m = _select_batch(f"mask for {name!r}", m, batch_index, 3, broadcast=True)
        datas.append(_masked(w, m))
    top = _color_top(vmax, datas, [f"weights of {name!r}" for name in names])
    norm = matplotlib.colors.Normalize(vmin=0.0, vmax=top)
    cm = _cmap(cmap)

    fig = _new_figure((cell_size * num_cols + 1.5, cell_size * len(layers) + 0.8))
    gs = fig.add_gridspec(len(layers), num_cols)
    # names longer than this break into lines: wider than its heatmap, a head's name
    # would squeeze the panels; taller than half of it, a layer's name would leave no
    # room for the key labels below the heatmap (constrained layout would give up)
    cell_w, cell_h = 0.8 * cell_size * fig.dpi, 0.5 * cell_size * fig.dpi
    bottom = {}  # column -> the lowest heatmap in it
    images, axes = [], []
    grow_w = grow_h = 0.0  # room for the names broken into lines
    for i, (key, name, data) in enumerate(zip(keys, names, datas, strict=True)):
        rl, cl = _for_layer(row_labels, key, name), _for_layer(col_labels, key, name)
        row_h = 0.0
        for j in range(data.shape[0]):
            ax = fig.add_subplot(gs[i, j])
            images.append(_heatmap(ax, data[j], cm, norm, rl, cl, show_rows=j == 0))
            row_h = max(row_h, _wrap_text(ax.set_title(f"{heads[j]}", fontsize="small"), cell_w))
            if j == 0:
                grow_w = max(grow_w, _wrap_text(ax.set_ylabel(name), cell_h))
            axes.append(ax)
            bottom[j] = ax
        grow_h += row_h
    for ax in bottom.values():
        ax.set_xlabel("keys")
    fig.supylabel("queries")
    fig.colorbar(images[0], ax=axes, fraction=0.04)
    if title is not None:
        grow_h += _wrap_text(fig.suptitle(title), 0.95 * fig.bbox.width)
    _grow(fig, grow_w, grow_h)
    return fig


def plot_attention_on_image(
    image,
    attn_map,
    *,
    alpha: float = 0.5,
    cmap="jet",
    title: str | None = None,
    ax=None,
    colorbar: bool = True,
):
    """An attention map over patches (e.g. :func:`jattn.layers.rollout_map`) laid over
    its image.

    Args:
      image: ``[H, W, C]`` (C = 1, 3 or 4) or ``[H, W]``; floats in [0, 1] or ints in
        [0, 255], as ``imshow`` takes them.
      attn_map: ``[h, w]``, one value per patch; stretched over the whole image
        (bilinear), so it needs no particular size.
      alpha: the map's opacity, in [0, 1].
      cmap, title, ax, colorbar: as :func:`plot_attention`.

    Returns:
      The ``matplotlib.figure.Figure``; ``fig.axes[0].images`` holds the image, then
      the map.
    """
    import matplotlib.colors

    _check_axes(ax)
    img = _as_real("image", image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[-1] in (3, 4))):
        raise ValueError(
            f"image must have shape [H, W, C] with C in (1, 3, 4), or [H, W], got {list(img.shape)}"
        )
    if np.issubdtype(np.asarray(image).dtype, np.integer):
        img = img / 255.0
    amap = _as_2d("attn_map", attn_map)
    _check_drawn(amap, "attn_map")  # a NaN made the colour scale NaN
    alpha = _checks.check_finite_scalar("alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    hh, ww = img.shape[:2]
    if ax is None:
        fig = _new_figure((4.5 if colorbar else 3.5, 3.5))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    extent = (-0.5, ww - 0.5, hh - 0.5, -0.5)
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, extent=extent)
    lo, hi = float(np.min(amap)), float(np.max(amap))
    norm = matplotlib.colors.Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1.0)
    im = ax.imshow(amap, cmap=_cmap(cmap), norm=norm, alpha=alpha, extent=extent,
                   interpolation="bilinear")  # fmt: skip
    ax.set_axis_off()
    if title is not None:
        ax.set_title(title)
    if colorbar:
        fig.colorbar(im, ax=ax)
    return fig


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:  # Linux: read without changing it
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_figure(fig, path, *, dpi: int = 100) -> str:
    """Saves ``fig`` atomically (a temporary file in the same folder, then ``os.replace``).

    The format follows the file extension (``.png``, ``.pdf``, ``.svg``); parent
    folders are created. The file gets the permissions a plain ``open(path, "w")``
    would give: those of the file it replaces, else ``0o666`` less the umask
    (``0o644`` under the usual umask ``022``), not the ``0o600`` of a temporary
    file. A figure with a layout engine (the ones made here) is saved at its
    size; one without (e.g. ``plt.subplots()`` given as ``ax``) is cropped to
    its artists (``bbox_inches="tight"``), so no title is cut off. Returns the
    path as a string.
    """
    from matplotlib.figure import Figure  # matplotlib is imported on first use

    dpi = _checks.check_size("dpi", dpi)
    if not isinstance(fig, Figure):  # was an AttributeError from inside
        raise TypeError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    path = _check_path(path)
    ext = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    extra = {} if fig.get_layout_engine() is not None else {"bbox_inches": "tight"}
    return _write_atomically(path, lambda f: fig.savefig(f, format=ext, dpi=dpi, **extra))


def _check_path(path) -> str:
    """``path`` (a str or ``os.PathLike``) as a str; a TypeError for bytes or anything
    else, a ValueError for an empty path or a folder (was an error from inside)."""
    if isinstance(path, bytes) or not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    path = os.fspath(path)
    if not path or path.endswith(os.sep) or os.path.isdir(path):
        raise ValueError(f"path must name a file, got {path!r}")
    return path


def _write_atomically(path, write) -> str:
    """Calls ``write(f)`` on a binary temporary file beside ``path``, then moves it there
    with ``os.replace`` (a reader never sees half a file); the file gets the permissions
    ``open(path, "w")`` would give (see :func:`save_figure`); parent folders are
    created. Returns the path as a string."""
    path = _check_path(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _path_name(path, root: str) -> str:
    parts = [str(p) for p in path[:-1]]  # drop the sown name
    return "/".join(parts) if parts else root


class _Unhashable:
    """Options that cannot be a jit cache key: equal only to themselves."""

    def __init__(self, items):
        self.items = items


def _forward_sowing(module, args, arrays, options):
    items = options.items if isinstance(options, _Unhashable) else options
    return module(*args, sow_weights=True, **arrays, **dict(items))


@functools.cache
def _collector():
    from flax import nnx

    return nnx.jit(nnx.capture(_forward_sowing, nnx.Intermediate), static_argnums=3)


def collect_attention_weights(model, *args, **kwargs) -> dict:
    """Runs ``model(*args, sow_weights=True, **kwargs)`` and returns every sown attention weight.

    Every attention layer that honours ``sow_weights`` sows its weights as
    ``nnx.Intermediate`` ``attention_weights``; the call runs under
    ``nnx.capture``, so the weights are returned, not stored: the model holds no
    new intermediates afterwards (any it held before are untouched), and its
    output is the one a normal call gives (asking for the weights does not change
    the computation).

    Returns:
      ``{'path/to/layer': weights}`` with the layer's weights (``[B, N, T, S]``
      for :class:`jattn.layers.MultiHeadAttention`), in the model's path order.
      A layer called k > 1 times in one forward pass gives ``'path/to/layer/0'``
      ... ``'path/to/layer/{k-1}'``; weights sown by ``model`` itself (a bare
      attention layer) are keyed by its class name.
    """
    # compiled (a whole model run op by op is many times slower), once per model
    # structure, shapes and options: array keyword arguments (masks) are traced, the
    # others (deterministic=True, ...) are static
    arrays = {k: v for k, v in kwargs.items() if hasattr(v, "shape") and hasattr(v, "dtype")}
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in arrays))
    try:
        hash(options)
    except TypeError:  # an unhashable option: compiled for this call only
        options = _Unhashable(options)
    from flax import nnx

    _, sown = _collector()(model, args, arrays, options)
    out = {}
    for path, var in nnx.to_flat_state(sown):
        if not path or path[-1] != _SOWN_NAME:
            continue  # other sown intermediates
        name = _path_name(path, type(model).__name__)
        values = var.get_value()
        values = values if isinstance(values, tuple) else (values,)
        if len(values) == 1:
            out[name] = values[0]
        else:
            out.update({f"{name}/{k}": v for k, v in enumerate(values)})
    return out
