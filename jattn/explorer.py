"""An interactive attention explorer: one self-contained HTML page (no CDN, no server).

:func:`attention_explorer` turns a model's collected attention weights
(:func:`jattn.viz.collect_attention_weights`, or any ``[N, T, S]`` arrays) and the
tokens into an :class:`AttentionExplorer`. In a notebook it shows itself (Jupyter,
Colab, VS Code: ``_repr_html_``, an ``iframe``); :meth:`AttentionExplorer.save`
writes the page as a standalone HTML file that works offline.

Two views, as bertviz offers for PyTorch models:

- **Head view**: pick a layer and heads (click a head's colour chip to toggle it,
  double-click to keep only it). The queries are on the left and the keys on the
  right; hover a query to see the keys it attends to (lines and shaded keys, the
  weight averaged over the chosen heads; each key shows its weight), or hover a key
  to see the queries that attend to it.
- **Model view**: every layer and head as a small heatmap (rows: queries, columns:
  keys); click one to open it in the head view.

The weights travel inside the page as JSON, rounded to 4 decimals. Everything is
drawn by the page's own script (inline SVG and canvas); nothing is fetched.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping, Sequence

import numpy as np

from jattn.viz import _check_layer_keys, _for_layer, _per_layer, _write_atomically

__all__ = ["AttentionExplorer", "attention_explorer"]

#: Most weights one page carries (layers x heads x queries x keys).
MAX_WEIGHTS = 4_000_000


def _check_labels_type(what: str, value) -> None:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(
            f"{what} must be a list of token strings (or a dict of them by layer), got "
            f"{type(value).__name__}"
        )


def _labels(what: str, value, n: int, layer: str) -> list[str]:
    _check_labels_type(what, value)
    if len(value) != n:
        raise ValueError(
            f"{what} has {len(value)} tokens but layer {layer!r}'s weights have {n} along that axis"
        )
    return [str(t) for t in value]


class AttentionExplorer:
    """The explorer page for some attention weights (build it with :func:`attention_explorer`).

    Attributes:
      html: the whole standalone HTML document.
      layers: the layer names, in the page's order.
    """

    def __init__(self, document: str, layers: list[str], height: int):
        self.html = document
        self.layers = layers
        self._height = height

    def _repr_html_(self) -> str:
        """The page in an ``iframe`` (its script and style kept apart from the notebook's)."""
        return (
            f'<iframe srcdoc="{html.escape(self.html, quote=True)}" style="width: 100%; '
            f'height: {self._height}px; border: 1px solid #ddd" '
            'title="jattn attention explorer"></iframe>'
        )

    def save(self, path) -> str:
        """Writes the page to ``path`` (``.html``) atomically, readable as a plain write
        would leave it; returns the path."""
        data = self.html.encode("utf-8")
        return _write_atomically(path, lambda f: f.write(data))


def attention_explorer(
    weights,
    tokens,
    *,
    query_tokens=None,
    batch_index: int | None = None,
    layer_names: Sequence[str] | None = None,
    title: str = "Attention explorer",
) -> AttentionExplorer:
    """An interactive head view and model view of attention weights.

    Args:
      weights: a dict ``{layer: [N, T, S] or [B, N, T, S]}`` (what
        :func:`jattn.viz.collect_attention_weights` returns; layers may differ in N, T
        and S), or one array ``[L, N, T, S]`` / ``[L, B, N, T, S]``.
      tokens: the S key tokens (strings), or a dict of them by layer (its key or name).
      query_tokens: the T query tokens, or a dict by layer; default ``tokens`` (self
        attention). Cross-attention layers need them.
      batch_index: which example, where the weights have a batch axis.
      layer_names: names shown for the layers (default: the dict's keys).
      title: the page's heading.

    Returns:
      An :class:`AttentionExplorer`: shown in a notebook, ``.save(path)`` to a file.

    >>> import numpy as np
    >>> w = np.full((2, 3, 3), 1 / 3)  # [N, T, S]: two heads, uniform weights
    >>> explorer = attention_explorer({"layer 0": w}, ["the", "cat", "sat"])
    >>> explorer.layers, explorer.html.startswith("<!DOCTYPE html>")
    (['layer 0'], True)

    Raises:
      ValueError: token counts that do not match the weights, non-finite weights, more
        than ``MAX_WEIGHTS`` numbers (pick fewer layers or a shorter input), and the
        shape errors of :func:`jattn.viz.plot_attention_grid`.
      TypeError: tokens that are not lists of strings.
    """
    if not isinstance(title, str):
        raise TypeError(f"title must be a string, got {type(title).__name__}")
    if tokens is None:  # was "tokens has no entry for layer ..."
        _check_labels_type("tokens", tokens)
    names, arrays = _per_layer(weights, layer_names, batch_index)
    keys = list(weights) if isinstance(weights, Mapping) else names
    for what, value in (("tokens", tokens), ("query_tokens", query_tokens)):
        _check_layer_keys(what, value, keys, names)
    total = sum(a.size for a in arrays)
    if total > MAX_WEIGHTS:
        raise ValueError(
            f"the weights hold {total} numbers, more than an explorer page carries "
            f"({MAX_WEIGHTS}): pick fewer layers or a shorter input"
        )
    layers = []
    longest = 1
    for key, name, w in zip(keys, names, arrays, strict=True):
        if not np.all(np.isfinite(w)):
            raise ValueError(f"layer {name!r}'s weights hold NaN or inf")
        k_tokens = _for_layer(tokens, key, name)
        if k_tokens is None:
            raise ValueError(f"tokens has no entry for layer {name!r}")
        q_tokens = _for_layer(query_tokens, key, name)
        k = _labels("tokens", k_tokens, w.shape[2], name)
        q = k if q_tokens is None else _labels("query_tokens", q_tokens, w.shape[1], name)
        if q_tokens is None and w.shape[1] != w.shape[2]:
            raise ValueError(
                f"layer {name!r} has {w.shape[1]} queries and {w.shape[2]} keys: pass "
                "query_tokens (cross-attention)"
            )
        longest = max(longest, w.shape[1], w.shape[2])
        layers.append({"name": str(name), "q": q, "k": k, "w": np.round(w, 4).tolist()})
    data = json.dumps({"title": title, "layers": layers}, separators=(",", ":"))
    # No "<" in the data block: neither "</script>" nor "<!--" (which would swallow the
    # rest of the page) can change where it ends; JSON.parse reads the escapes back.
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    parts = {"TITLE": html.escape(title), "STYLE": _STYLE, "SCRIPT": _SCRIPT, "DATA": data}
    # one pass over the template: a title (or token) reading "__DATA__" stays text
    document = re.sub(r"__(TITLE|STYLE|SCRIPT|DATA)__", lambda m: parts[m.group(1)], _PAGE)
    height = min(900, 160 + 22 * longest)
    return AttentionExplorer(document, [str(n) for n in names], height)


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>__STYLE__</style>
</head>
<body>
<h1 id="title">__TITLE__</h1>
<div id="controls">
  <label>View <select id="view">
    <option value="head">Head view</option>
    <option value="model">Model view</option>
  </select></label>
  <label id="layer-label">Layer <select id="layer"></select></label>
  <span id="heads"></span>
  <span id="readout"></span>
</div>
<div id="head-view"><svg id="lines"></svg></div>
<div id="model-view" hidden></div>
<script type="application/json" id="attention-data">__DATA__</script>
<script>__SCRIPT__</script>
</body>
</html>
"""

_STYLE = """
body { font-family: system-ui, sans-serif; font-size: 13px; margin: 8px; color: #222; }
h1 { font-size: 15px; margin: 0 0 8px 0; }
#controls { display: flex; gap: 12px; align-items: center; flex-wrap: wrap; margin-bottom: 8px; }
.chip { display: inline-block; width: 16px; height: 16px; margin-right: 3px; cursor: pointer;
        border: 2px solid transparent; vertical-align: middle; }
.chip.off { opacity: 0.2; }
.chip:hover { border-color: #222; }
#readout { color: #555; }
svg text { font-size: 12px; cursor: default; dominant-baseline: middle; }
svg text.active { font-weight: bold; }
#model-view { display: grid; gap: 6px; align-items: center; }
#model-view canvas { cursor: pointer; border: 1px solid #ccc; image-rendering: pixelated; }
#model-view canvas:hover { border-color: #222; }
#model-view .row-label { text-align: right; padding-right: 4px; }
"""

_SCRIPT = r"""
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("attention-data").textContent);
  const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                  "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  const SVGNS = "http://www.w3.org/2000/svg";
  const ROW = 20, TEXT_W = 110, GAP = 220;
  const state = { layer: 0, heads: null, hover: null };
  const $ = (id) => document.getElementById(id);
  const color = (h) => COLORS[h % COLORS.length];

  function layer() { return data.layers[state.layer]; }
  function chosen() { return state.heads.map((on, h) => on ? h : -1).filter((h) => h >= 0); }

  // mean weight over the chosen heads of query i to key j
  function weight(i, j) {
    const heads = chosen();
    if (!heads.length) return 0;
    let s = 0;
    for (const h of heads) s += layer().w[h][i][j];
    return s / heads.length;
  }

  function setHeads(on) {
    const n = layer().w.length;
    state.heads = Array.from({ length: n }, (_, h) => typeof on === "function" ? on(h) : on);
  }

  function buildLayerSelect() {
    const sel = $("layer");
    data.layers.forEach((l, i) => {
      const o = document.createElement("option");
      o.value = String(i);
      o.textContent = l.name;
      sel.appendChild(o);
    });
    sel.addEventListener("change", () => {
      state.layer = Number(sel.value);
      setHeads(true);
      state.hover = null;
      render();
    });
  }

  function buildChips() {
    const box = $("heads");
    box.textContent = "Heads ";
    state.heads.forEach((on, h) => {
      const c = document.createElement("span");
      c.className = "chip" + (on ? "" : " off");
      c.dataset.head = String(h);
      c.title = "head " + h + " (click: toggle, double-click: only this head)";
      c.style.background = color(h);
      c.addEventListener("click", () => { state.heads[h] = !state.heads[h]; render(); });
      c.addEventListener("dblclick", () => { setHeads((k) => k === h); render(); });
      box.appendChild(c);
    });
  }

  function svgEl(tag, attrs) {
    const e = document.createElementNS(SVGNS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }

  // the head view's tokens are built once per layer and heads; a hover only updates them
  function renderHeadView() {
    const l = layer(), svg = $("lines");
    const T = l.q.length, S = l.k.length;
    svg.setAttribute("width", 2 * TEXT_W + GAP);
    svg.setAttribute("height", Math.max(T, S) * ROW + 10);
    svg.replaceChildren(svgEl("g", { id: "line-group", "pointer-events": "none" }));
    const build = (side, list, x, anchor) => {
      list.forEach((t, i) => {
        svg.appendChild(svgEl("rect", {
          x: anchor === "end" ? x - TEXT_W + 4 : x - 4, y: y(i) - ROW / 2 + 1,
          width: TEXT_W, height: ROW - 2, fill: "#3b6fb6", "fill-opacity": 0,
          class: side + "-box", "data-index": i, "pointer-events": "none",
        }));
        const text = svgEl("text", {
          x: anchor === "end" ? x - 4 : x + 4, y: y(i), "text-anchor": anchor,
          class: side === "q" ? "query" : "key", "data-index": i, "data-weight": "",
          "data-token": t,
        });
        text.textContent = t;
        text.appendChild(svgEl("title", {}));
        text.addEventListener("mouseenter", () => { state.hover = { side, index: i }; update(); });
        text.addEventListener("mouseleave", () => { state.hover = null; update(); });
        svg.appendChild(text);
      });
    };
    build("q", l.q, TEXT_W, "end");
    build("k", l.k, TEXT_W + GAP, "start");
    update();
  }

  const y = (i) => 10 + i * ROW + ROW / 2;

  function update() {
    if ($("head-view").hidden) return;  // a mouseleave as the head view hides
    const l = layer(), hv = state.hover, heads = chosen();
    const T = l.q.length, S = l.k.length;
    const xq = TEXT_W, xk = TEXT_W + GAP;
    const group = $("line-group");
    group.replaceChildren();
    for (let i = 0; i < T; i++) {  // for the hovered token only, else every pair faintly
      if (hv && hv.side === "q" && hv.index !== i) continue;
      for (let j = 0; j < S; j++) {
        if (hv && hv.side === "k" && hv.index !== j) continue;
        const w = weight(i, j);
        if (w < 0.005) continue;
        group.appendChild(svgEl("line", {
          x1: xq + 4, y1: y(i), x2: xk - 4, y2: y(j),
          stroke: heads.length === 1 ? color(heads[0]) : "#3b6fb6",
          "stroke-width": 2, "stroke-opacity": (hv ? 1 : 0.35) * w,
        }));
      }
    }
    const svg = $("lines");
    for (const side of ["q", "k"]) {
      const texts = svg.querySelectorAll("text." + (side === "q" ? "query" : "key"));
      const boxes = svg.querySelectorAll("rect." + side + "-box");
      texts.forEach((text, i) => {
        const tok = text.firstChild.textContent;
        let w = null;
        if (hv && hv.side !== side) w = side === "k" ? weight(hv.index, i) : weight(i, hv.index);
        text.setAttribute("data-weight", w === null ? "" : w.toFixed(4));
        text.classList.toggle("active", !!hv && hv.side === side && hv.index === i);
        text.lastChild.textContent = w === null ? tok : tok + ": " + w.toFixed(4);
        boxes[i].setAttribute("fill-opacity", w === null ? 0 : w);
      });
    }
    const readout = $("readout");
    if (hv) {
      const side = hv.side === "q" ? "query" : "key";
      const tok = hv.side === "q" ? l.q[hv.index] : l.k[hv.index];
      readout.textContent = side + " " + hv.index + " (" + tok + "), heads " + heads.join(", ");
    } else {
      readout.textContent = "hover a token";
    }
  }

  function renderModelView() {
    const box = $("model-view");
    box.replaceChildren();
    const maxHeads = Math.max(...data.layers.map((l) => l.w.length));
    box.style.gridTemplateColumns = "auto repeat(" + maxHeads + ", auto)";
    box.appendChild(document.createElement("div"));
    for (let h = 0; h < maxHeads; h++) {
      const d = document.createElement("div");
      d.textContent = "head " + h;
      box.appendChild(d);
    }
    data.layers.forEach((l, li) => {
      const label = document.createElement("div");
      label.className = "row-label";
      label.textContent = l.name;
      box.appendChild(label);
      for (let h = 0; h < maxHeads; h++) {
        if (h >= l.w.length) { box.appendChild(document.createElement("div")); continue; }
        const T = l.q.length, S = l.k.length;
        const cell = Math.max(1, Math.min(12, Math.floor(96 / Math.max(T, S))));
        const c = document.createElement("canvas");
        c.width = S * cell;
        c.height = T * cell;
        c.dataset.layer = String(li);
        c.dataset.head = String(h);
        c.title = l.name + ", head " + h + " (click for the head view)";
        const g = c.getContext("2d");
        for (let i = 0; i < T; i++) {
          for (let j = 0; j < S; j++) {
            g.fillStyle = "rgba(59, 111, 182, " + l.w[h][i][j] + ")";
            g.fillRect(j * cell, i * cell, cell, cell);
          }
        }
        c.addEventListener("click", () => {
          state.layer = li;
          $("layer").value = String(li);
          setHeads((k) => k === h);
          state.hover = null;
          $("view").value = "head";
          render();
        });
        box.appendChild(c);
      }
    });
  }

  function render() {
    const model = $("view").value === "model";
    $("head-view").hidden = model;
    $("model-view").hidden = !model;
    $("layer-label").hidden = model;
    $("heads").replaceChildren();
    if (model) {
      $("readout").textContent = "click a head to open it";
      renderModelView();
    } else {
      buildChips();
      renderHeadView();
    }
  }

  buildLayerSelect();
  setHeads(true);
  $("view").addEventListener("change", () => { state.hover = null; render(); });
  render();
})();
"""
