"""Attention heatmaps (matplotlib) and collecting a model's attention weights.

The plotting functions return a ``matplotlib.figure.Figure`` (shown inline when
it is the last expression of a notebook cell) and never call ``plt.show``;
:func:`save_figure` writes a PNG atomically. Masked cells (``mask`` False)
are drawn grey and hatched, so a masked key is never confused with a key that
got little attention. matplotlib is imported inside the functions.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np

from jattn.functional import _checks

__all__ = [
    "collect_attention_weights",
    "plot_attention",
    "plot_attention_grid",
    "save_figure",
]

_SOWN_NAME = "attention_weights"
_MASKED_FACE = "0.8"
_MASKED_HATCH = "////"
_MAX_TICKS = 40


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
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers (int or float), got dtype {arr.dtype}")
    return arr.astype(np.float32)


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


def _color_top(vmax, datas, names) -> float:
    """Top of the colour scale: ``vmax`` (finite, > 0) or the largest weight shown.

    Weights drawn (not masked) must be finite: one NaN or inf would otherwise
    wreck the shared colour scale without a word, and a NaN is a bug to see."""
    for data, name in zip(datas, names, strict=True):
        bad = ~np.isfinite(data.filled(0.0))
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{name} has {int(bad.sum())} non-finite value(s) outside the mask (first: "
                f"{data.data[where]} at index {list(where)}); attention weights are finite, "
                "so look upstream (e.g. jnp.isnan on the scores), or mask those cells"
            )
    if vmax is None:
        return max(float(np.max(d.filled(0.0), initial=0.0)) for d in datas) or 1.0
    if isinstance(vmax, bool) or not isinstance(vmax, int | float | np.number):
        raise TypeError(f"vmax must be a number, got {vmax!r}")
    if not (np.isfinite(vmax) and vmax > 0):
        raise ValueError(f"vmax must be finite and > 0 (the scale starts at 0), got {vmax!r}")
    return float(vmax)


def _set_ticks(ax, labels, n: int, axis: str, name: str, show: bool = True) -> None:
    setter = ax.set_xticks if axis == "x" else ax.set_yticks
    if labels is None:  # integer positions
        from matplotlib.ticker import MaxNLocator

        (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))
        if not show:
            (ax.xaxis if axis == "x" else ax.yaxis).set_ticklabels([])
        return
    labels = [str(s) for s in labels]
    if len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} labels but the weights have {n} {axis}-cells")
    step = max(1, math.ceil(n / _MAX_TICKS))  # long sequences: every step-th label
    idx = list(range(0, n, step))
    if not show:
        setter(idx, [""] * len(idx))
        return
    if axis == "x":
        ax.set_xticks(idx, [labels[i] for i in idx], rotation=90)
    else:
        ax.set_yticks(idx, [labels[i] for i in idx])


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
      title: axes title.
      ax: draw into this axes (default: a new figure).
      cmap: colormap name or object.
      vmax: top of the colour scale, finite and > 0 (default: the largest weight);
        the bottom is 0. A NaN or inf weight outside the mask is a ValueError.
      colorbar: add a colorbar.

    Returns:
      The ``matplotlib.figure.Figure``; the image is ``fig.axes[0].images[0]``.
    """
    import matplotlib.colors

    data = _masked(_as_2d("weights", weights), mask)
    top = _color_top(vmax, [data], ["weights"])
    t, s = data.shape
    if ax is None:
        fig = _new_figure(
            (max(3.0, 0.25 * min(s, _MAX_TICKS) + 2), max(2.5, 0.25 * min(t, 40) + 1))
        )
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    norm = matplotlib.colors.Normalize(vmin=0.0, vmax=top)
    im = _heatmap(ax, data, _cmap(cmap), norm, row_labels, col_labels)
    ax.set_xlabel("keys")
    ax.set_ylabel("queries")
    if title is not None:
        ax.set_title(title)
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
      title: figure title.
      cmap: colormap.
      vmax: top of the shared colour scale, finite and > 0 (default: the largest
        weight shown). A NaN or inf weight outside the mask is a ValueError.
      cell_size: inches per heatmap.

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
    images, axes = [], []
    for i, (key, name, data) in enumerate(zip(keys, names, datas, strict=True)):
        rl, cl = _for_layer(row_labels, key, name), _for_layer(col_labels, key, name)
        for j in range(data.shape[0]):
            ax = fig.add_subplot(gs[i, j])
            images.append(_heatmap(ax, data[j], cm, norm, rl, cl, show_rows=j == 0))
            ax.set_title(f"{heads[j]}", fontsize="small")
            if j == 0:
                ax.set_ylabel(name)
            axes.append(ax)
    fig.colorbar(images[0], ax=axes, fraction=0.04)
    if title is not None:
        fig.suptitle(title)
    return fig


def save_figure(fig, path, *, dpi: int = 100) -> str:
    """Saves ``fig`` atomically (a temporary file in the same folder, then ``os.replace``).

    The format follows the file extension (``.png``, ``.pdf``, ``.svg``); parent
    folders are created. Returns the path as a string.
    """
    dpi = _checks.check_size("dpi", dpi)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    ext = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="." + ext, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format=ext, dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _path_name(path, root: str) -> str:
    parts = [str(p) for p in path[:-1]]  # drop the sown name
    return "/".join(parts) if parts else root


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
    from flax import nnx

    def forward(module, *a, **kw):
        return module(*a, sow_weights=True, **kw)

    _, sown = nnx.capture(forward, nnx.Intermediate)(model, *args, **kwargs)
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
