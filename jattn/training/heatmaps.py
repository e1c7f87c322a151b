"""Cross-attention heatmaps with character labels (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

__all__ = ["plot_attention_grid"]


def plot_attention_grid(
    weights: np.ndarray,
    src_tokens: Sequence[str],
    tgt_tokens: Sequence[str],
    path: str | os.PathLike,
    *,
    row_names: Sequence[str] = (),
    title: str = "",
) -> None:
    """Saves a grid of heatmaps, one row per layer and one column per head, to ``path``.

    Args:
      weights: ``[L, N, T, S]``: layers, heads, output (query) and input (key) positions.
      src_tokens: S labels of the input axis (x).
      tgt_tokens: T labels of the output axis (y).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_layers, num_heads, t, s = weights.shape
    cell = 0.22
    fig, axes = plt.subplots(
        num_layers,
        num_heads,
        figsize=(num_heads * (s * cell + 0.8), num_layers * (t * cell + 0.9) + 0.4),
        squeeze=False,
    )
    for layer in range(num_layers):
        for head in range(num_heads):
            ax = axes[layer, head]
            ax.imshow(weights[layer, head], cmap="viridis", vmin=0.0, vmax=1.0, aspect="equal")
            ax.set_xticks(range(s), labels=list(src_tokens), fontsize=6, rotation=90)
            ax.set_yticks(range(t), labels=list(tgt_tokens), fontsize=6)
            name = row_names[layer] if layer < len(row_names) else f"layer {layer}"
            ax.set_title(f"{name}, head {head}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
