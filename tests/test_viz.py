"""Heatmaps checked by content (image data, labels, axes, masks) and weight collection."""

import matplotlib

matplotlib.use("Agg")

import os  # noqa: E402
import stat  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.image  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from jattn.layers import MultiHeadAttention  # noqa: E402
from jattn.viz import (  # noqa: E402
    collect_attention_weights,
    plot_attention,
    plot_attention_grid,
    plot_attention_on_image,
    save_figure,
)


def _weights(*shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(shape[-1]), size=shape[:-1]).astype(np.float32)


def _ticks(labels):
    return [t.get_text() for t in labels]


def _assert_no_overlap(texts, axis):
    boxes = sorted(
        (t.get_window_extent() for t in texts if t.get_visible() and t.get_text()),
        key=lambda b: b.x0 if axis == "x" else b.y0,
    )
    assert len(boxes) >= 2
    for a, b in zip(boxes, boxes[1:], strict=False):
        assert (a.x1 <= b.x0) if axis == "x" else (a.y1 <= b.y0), (a, b)


def _assert_inside(fig, text):
    box, frame = text.get_window_extent(), fig.bbox
    assert text.get_text()
    assert frame.x0 - 1 <= box.x0 and box.x1 <= frame.x1 + 1, (text.get_text(), box, frame)
    assert frame.y0 - 1 <= box.y0 and box.y1 <= frame.y1 + 1, (text.get_text(), box, frame)


def test_plot_attention_content():
    w = _weights(3, 4)
    mask = np.tril(np.ones((3, 4), bool))
    fig = plot_attention(
        w, row_labels=["a", "b", "c"], col_labels=list("WXYZ"), mask=mask, title="one head"
    )
    ax, cbar = fig.axes  # the heatmap and its colorbar
    arr = ax.images[0].get_array()
    np.testing.assert_array_equal(arr.data, w)
    np.testing.assert_array_equal(np.ma.getmaskarray(arr), ~mask)
    assert _ticks(ax.get_yticklabels()) == ["a", "b", "c"]
    assert _ticks(ax.get_xticklabels()) == list("WXYZ")
    assert ax.get_title() == "one head"
    assert ax.images[0].get_clim() == (0.0, pytest.approx(float(w[mask].max())))  # visible max
    # masked cells are transparent, so the hatched grey background shows through
    assert ax.images[0].get_cmap().get_bad()[3] == 0.0 and ax.patch.get_hatch()
    assert cbar.get_label() == "<colorbar>"


def test_bfloat16_weights_are_drawn_and_float64_beyond_float32_is_named():
    """A bfloat16 model's weights were refused ("must hold real numbers"); float64 values
    past float32's range were called non-finite ("look upstream") though finite."""
    w = jnp.asarray(_weights(3, 4), jnp.bfloat16)
    arr = plot_attention(w).axes[0].images[0].get_array()
    np.testing.assert_array_equal(arr.data, np.asarray(w, np.float32))
    with pytest.raises(ValueError, match=r"weights holds finite values beyond float32's range "
                       r"\(largest magnitude 1e\+39\): as float32 they would be inf"):  # fmt: skip
        plot_attention(np.full((2, 2), 1e39))


def test_plot_attention_into_given_axes_and_long_labels():
    import matplotlib.pyplot as plt

    fig, (a0, a1) = plt.subplots(1, 2)
    plt.close(fig)
    labels = [f"t{i}" for i in range(100)]
    out = plot_attention(_weights(100, 100), row_labels=labels, col_labels=labels, ax=a1)
    assert out is fig and len(a1.images) == 1 and not a0.images
    fig.draw_without_rendering()
    shown = _ticks(a1.get_xticklabels())
    step = labels.index(shown[1])
    assert step >= 3 and shown == labels[::step]  # thinned to fit the axes, in order
    _assert_no_overlap(a1.get_xticklabels(), "x")


def test_plot_attention_grid_array():
    w = _weights(2, 3, 4, 5)  # [L, N, T, S]
    mask = np.tril(np.ones((4, 5), bool))
    fig = plot_attention_grid(
        w,
        row_labels=list("abcd"),
        col_labels=list("VWXYZ"),
        layer_names=["enc 0", "enc 1"],
        head_names=["h0", "h1", "h2"],
        mask=mask,
        title="all heads",
    )
    assert len(fig.axes) == 2 * 3 + 1  # L * N heatmaps and one shared colorbar
    heat = fig.axes[:6]
    for idx, ax in enumerate(heat):
        layer, head = divmod(idx, 3)
        arr = ax.images[0].get_array()
        np.testing.assert_array_equal(arr.data, w[layer, head])
        np.testing.assert_array_equal(np.ma.getmaskarray(arr), ~mask)
        assert ax.get_title() == f"h{head}"
        assert _ticks(ax.get_xticklabels()) == list("VWXYZ")
        top = float(np.max(np.where(mask, w, 0)))
        assert ax.images[0].get_clim() == (0.0, pytest.approx(top))  # one shared scale
    assert heat[0].get_ylabel() == "enc 0" and heat[3].get_ylabel() == "enc 1"
    assert _ticks(heat[0].get_yticklabels()) == list("abcd")
    assert _ticks(heat[1].get_yticklabels()) == [""] * 4  # row labels on the first column only
    assert fig.get_suptitle() == "all heads"


def test_plot_attention_grid_dict_with_batch_and_mixed_shapes():
    enc = _weights(2, 2, 3, 3, seed=1)  # [B, N, S, S]
    cross = _weights(2, 2, 4, 3, seed=2)  # [B, N, T, S]
    pad = np.array([True, True, False])
    fig = plot_attention_grid(
        {"encoder": enc, "cross": cross},
        batch_index=1,
        row_labels={"encoder": ["x", "y", "<pad>"], "cross": ["p", "q", "r", "s"]},
        col_labels=["x", "y", "<pad>"],
        mask={"cross": pad},
    )
    assert len(fig.axes) == 4 + 1
    np.testing.assert_array_equal(fig.axes[1].images[0].get_array().data, enc[1, 1])
    np.testing.assert_array_equal(fig.axes[2].images[0].get_array().data, cross[1, 0])
    assert not np.ma.getmaskarray(fig.axes[0].images[0].get_array()).any()
    np.testing.assert_array_equal(
        np.ma.getmaskarray(fig.axes[3].images[0].get_array()), np.broadcast_to(~pad, (4, 3))
    )
    assert _ticks(fig.axes[2].get_yticklabels()) == ["p", "q", "r", "s"]
    assert fig.axes[0].get_ylabel() == "encoder" and fig.axes[0].get_title() == "head 0"


def test_grid_masks_by_key_under_layer_names_and_broadcast_batch():
    """A dict mask keyed by the weights' keys still applies when layer_names renames
    the rows; a [1, 1, T, S] mask broadcasts over the batch with batch_index."""
    causal = np.tril(np.ones((3, 3), bool))
    fig = plot_attention_grid({"enc": _weights(1, 3, 3)}, mask={"enc": causal}, layer_names=["E"])
    np.testing.assert_array_equal(np.ma.getmaskarray(fig.axes[0].images[0].get_array()), ~causal)
    assert fig.axes[0].get_ylabel() == "E"
    fig = plot_attention_grid(_weights(2, 3, 1, 3, 3), batch_index=2, mask=causal[None, None])
    np.testing.assert_array_equal(np.ma.getmaskarray(fig.axes[1].images[0].get_array()), ~causal)


def test_grid_with_fewer_heads_in_a_layer():
    fig = plot_attention_grid({"a": _weights(3, 2, 2), "b": _weights(1, 2, 2)})
    assert len(fig.axes) == 3 + 1 + 1


def test_save_figure_png(tmp_path):
    fig = plot_attention_grid(_weights(1, 2, 3, 3), cell_size=2.0)
    path = save_figure(fig, tmp_path / "sub" / "grid.png", dpi=50)
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    w_in, h_in = fig.get_size_inches()
    assert img.shape[:2] == (round(h_in * 50), round(w_in * 50))  # the figure's size at 50 dpi
    assert img[..., :3].std() > 0.05  # not a blank canvas
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["grid.png"]  # no temp file left


def test_long_titles_are_wrapped_inside_the_figure_and_the_saved_file(tmp_path):
    title = "attention of every head of " + "the copy task " * 12 + "x" * 90  # and a long word
    layer = "decoder/layers/0/cross_attention_with_a_long_name"
    fig = plot_attention_grid(
        {layer: _weights(2, 4, 4)}, title=title, head_names=["the first head of many", "h1"]
    )
    path = save_figure(fig, tmp_path / "grid.png", dpi=60)
    h_px, w_px = matplotlib.image.imread(path).shape[:2]
    assert abs(h_px - fig.get_figheight() * 60) <= 1 and abs(w_px - fig.get_figwidth() * 60) <= 1
    fig.draw_without_rendering()  # the saved file is the figure's box: what lies inside it is saved
    texts = list(fig.texts)  # the title and the y label
    assert len(texts) == 2
    texts += [t for ax in fig.axes[:2] for t in (ax.title, ax.xaxis.label, ax.yaxis.label)]
    for text in texts:
        if text.get_text():
            _assert_inside(fig, text)
    assert "\n" in fig.get_suptitle() and "\n" in fig.axes[0].get_ylabel()
    squeeze = lambda s: "".join(s.split())  # noqa: E731
    assert squeeze(fig.get_suptitle()) == squeeze(title)  # broken into lines, nothing lost
    assert squeeze(fig.axes[0].get_ylabel()) == squeeze(layer)

    fig = plot_attention(_weights(3, 3), title=title)
    fig.draw_without_rendering()
    _assert_inside(fig, fig.axes[0].title)
    assert squeeze(fig.axes[0].get_title()) == squeeze(title)


def test_long_inputs_keep_readable_labels():
    """200 queries and keys with long token strings: every shown tick label is its
    token (cut with "…" past 12 characters) at its position, and none overlap."""
    tokens = [f"tok{i}_" + "abcdefghij" * (i % 3) for i in range(200)]
    figs = [
        plot_attention(_weights(200, 200), row_labels=tokens, col_labels=tokens),
        plot_attention_grid(_weights(1, 2, 200, 200), row_labels=tokens, col_labels=tokens),
    ]
    for fig in figs:
        fig.draw_without_rendering()
        for ax in fig.axes[:-1]:  # the heatmaps
            for axis, pos, texts in (
                ("x", ax.get_xticks(), ax.get_xticklabels()),
                ("y", ax.get_yticks(), ax.get_yticklabels()),
            ):
                if not any(t.get_text() for t in texts):
                    continue  # the second head's rows are labelled by the first's
                _assert_no_overlap(texts, axis)
                assert pos[0] == 0 and len(set(np.diff(pos))) == 1  # every k-th token
                for p, text in zip(pos, _ticks(texts), strict=True):
                    token = tokens[int(p)]
                    assert p == int(p) and text and len(text) <= 12
                    if len(token) <= 12:
                        assert text == token
                    else:
                        assert text == token[:11] + "\u2026"
    fig = figs[0]
    assert 5 <= len(fig.axes[0].get_xticks()) <= 40


def test_grid_axis_titles():
    fig = plot_attention_grid({"a": _weights(3, 2, 2), "b": _weights(1, 2, 2)})
    xlabels = [ax.get_xlabel() for ax in fig.axes[:4]]
    assert xlabels == ["", "keys", "keys", "keys"]  # the lowest heatmap of each column
    assert fig.get_supylabel() == "queries"
    assert [ax.get_ylabel() for ax in fig.axes[:4]] == ["a", "", "", "b"]
    ax = plot_attention(_weights(2, 2)).axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("keys", "queries")


def test_saved_files_are_readable_by_others(tmp_path):
    fig = plot_attention(_weights(2, 2), colorbar=False)
    old = os.umask(0o022)
    try:
        path = save_figure(fig, tmp_path / "a.png", dpi=20)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
        os.umask(0o027)
        path = save_figure(fig, tmp_path / "b.svg")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640  # the umask is respected
        os.chmod(tmp_path / "a.png", 0o664)
        save_figure(fig, tmp_path / "a.png", dpi=20)  # a replaced file keeps its mode
        assert stat.S_IMODE(os.stat(tmp_path / "a.png").st_mode) == 0o664
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.svg"]


def test_save_figure_without_layout_engine_keeps_the_title(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    plt.close(fig)
    plot_attention(_weights(3, 3), ax=ax, title="a title " * 6)
    img = matplotlib.image.imread(save_figure(fig, tmp_path / "t.png", dpi=50))
    fig.draw_without_rendering()
    title = fig.axes[0].title.get_window_extent()
    assert title.y1 > fig.bbox.y1  # the wrapped title rises above this 2-inch figure ...
    assert img.shape[0] > 2 * 50  # ... so the file is cropped to the artists, title included


def test_errors():
    with pytest.raises(ValueError, match=r"weights must have shape \[T, S\], got \[2, 3, 4\]"):
        plot_attention(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="row_labels has 2 labels but the weights have 3"):
        plot_attention(np.zeros((3, 4)), row_labels=["a", "b"])
    with pytest.raises(ValueError, match=r"mask of shape \[2\] does not broadcast .* \[3, 4\]"):
        plot_attention(np.zeros((3, 4)), mask=np.ones(2, bool))
    with pytest.raises(TypeError, match="mask must be boolean"):
        plot_attention(np.zeros((3, 4)), mask=np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"\[L, B, N, T, S\] = \[1, 2, 1, 3, 3\] .* batch_index"):
        plot_attention_grid(np.zeros((1, 2, 1, 3, 3)))
    with pytest.raises(ValueError, match="has a batch axis"):
        plot_attention_grid({"a": np.zeros((2, 1, 3, 3))})
    with pytest.raises(ValueError, match="got 1 layer_names for 2 layers"):
        plot_attention_grid(np.zeros((2, 1, 3, 3)), layer_names=["x"])
    with pytest.raises(ValueError, match=r"mask has keys \['encc'\] that name no layer"):
        plot_attention_grid({"enc": np.zeros((1, 3, 3))}, mask={"encc": np.ones((3, 3), bool)})
    with pytest.raises(ValueError, match=r"row_labels has keys \['x'\] that name no layer"):
        plot_attention_grid({"enc": np.zeros((1, 3, 3))}, row_labels={"x": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="weights is an empty dict"):
        plot_attention_grid({})
    with pytest.raises(ValueError, match=r"batch_index=2 is out of range .* a batch of 1"):
        plot_attention_grid({"a": np.zeros((1, 1, 3, 3))}, batch_index=2)
    with pytest.raises(ValueError, match=r"batch_index=5 is out of range for weights .* of 2"):
        plot_attention_grid(np.zeros((1, 2, 1, 3, 3)), batch_index=5)
    # batch_index on weights without a batch axis was ignored: one layer's [B, N, T, S]
    # weights were drawn as B layers
    with pytest.raises(ValueError, match=r"batch_index=1 was given, but weights \[2, 1, 3, 3\] "
                       r"are read as \[L, N, T, S\], with no batch axis; one layer's"):  # fmt: skip
        plot_attention_grid(np.zeros((2, 1, 3, 3)), batch_index=1)
    with pytest.raises(
        ValueError, match=r"batch_index=0 was given, but weights\['a'\] \[1, 3, 3\]"
    ):
        plot_attention_grid({"a": np.zeros((1, 3, 3))}, batch_index=0)
    with pytest.raises(ValueError, match=r"weights of shape \[0, 3, 4, 5\] have no layer"):
        plot_attention_grid(np.zeros((0, 3, 4, 5)))
    for vmax in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"vmax must be finite and > 0 .*got {vmax}"):
            plot_attention(np.zeros((3, 4)), vmax=vmax)
        with pytest.raises(ValueError, match="vmax must be finite and > 0"):
            plot_attention_grid(np.zeros((1, 1, 3, 4)), vmax=vmax)
    with pytest.raises(TypeError, match="vmax must be a number, got '1'"):
        plot_attention(np.zeros((3, 4)), vmax="1")
    # each was an error from inside NumPy, matplotlib or the file system
    with pytest.raises(ValueError, match=r"weights of shape \[0, 4\] has no entry to draw"):
        plot_attention(np.zeros((0, 4)))
    with pytest.raises(ValueError, match=r"attn_map of shape \[0, 0\] has no entry to draw"):
        plot_attention_on_image(np.ones((4, 4, 3)), np.zeros((0, 0)))
    with pytest.raises(ValueError, match=r"weights of 'layer 0', \[0, 2, 2\], have no entry"):
        plot_attention_grid(np.zeros((1, 0, 2, 2)))
    for draw in (plot_attention, lambda w, ax: plot_attention_on_image(np.ones((3, 4)), w, ax=ax)):
        with pytest.raises(TypeError, match="ax must be a matplotlib Axes or None, got str 'foo'"):
            draw(np.zeros((3, 4)), ax="foo")


def test_save_paths_are_checked(tmp_path):
    fig = plot_attention(np.ones((2, 2)) / 2)
    with pytest.raises(TypeError, match=r"path must be a str or os.PathLike, got bytes b'x.png'"):
        save_figure(fig, b"x.png")
    for path in ("", str(tmp_path), f"{tmp_path}/sub/"):
        with pytest.raises(ValueError, match="path must name a file, got"):
            save_figure(fig, path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_an_error_unless_masked(bad):
    """One NaN/inf would silently wreck the (shared) colour scale: it is an error naming
    where it is, except in masked cells, which are not drawn."""
    w = np.full((1, 2, 2, 3), 0.5, np.float32)  # [L, N, T, S]
    w[0, 1, 0, 2] = bad
    with pytest.raises(ValueError, match=r"weights of 'layer 0' has 1 non-finite .*\[1, 0, 2\]"):
        plot_attention_grid(w)
    with pytest.raises(ValueError, match=r"weights has 1 non-finite value\(s\) .*\[0, 2\]"):
        plot_attention(w[0, 1])
    mask = np.ones((2, 2, 3), bool)
    mask[1, 0, 2] = False
    fig = plot_attention_grid(w, mask=mask)
    assert fig.axes[0].images[0].get_clim() == (0.0, 0.5)
    assert plot_attention(w[0, 1], mask=mask[1]).axes[0].images[0].get_clim() == (0.0, 0.5)


def test_grid_mask_with_batch_axis_of_one_broadcasts_without_batch_index():
    w = np.random.default_rng(0).random((2, 3, 4, 5)).astype(np.float32)  # [L, N, T, S]
    mask = np.ones((1, 3, 4, 5), bool)
    mask[..., -1] = False
    fig = plot_attention_grid(w, mask=mask)
    data = fig.axes[0].images[0].get_array()
    assert data.mask[:, -1].all() and not data.mask[:, :-1].any()


class _Stack(nnx.Module):
    """Two self-attention layers and a cross-attention layer, sown as the models do."""

    def __init__(self, rngs):
        self.layers = nnx.List([MultiHeadAttention(2, 8, rngs=rngs) for _ in range(2)])
        self.cross = MultiHeadAttention(2, 8, in_kv_features=4, rngs=rngs)

    def __call__(self, x, memory, *, sow_weights=False):
        for layer in self.layers:
            x = x + layer(x, is_causal=True, sow_weights=sow_weights)
        return self.cross(x, memory, sow_weights=sow_weights)


def test_collect_attention_weights_leaves_output_and_model_unchanged():
    model = _Stack(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    memory = jax.random.normal(jax.random.key(2), (2, 3, 4))

    @nnx.jit  # one compile for everything (collect_attention_weights works under jit)
    def run(model, x, memory):
        expected = model(x, memory)
        weights = collect_attention_weights(model, x, memory)
        h = x + model.layers[0](x, is_causal=True)
        _, w1 = model.layers[1](h, is_causal=True, return_weights=True)
        sown = nnx.capture(lambda m: m(x, memory, sow_weights=True), nnx.Intermediate)(model)[0]
        return expected, weights, w1, sown

    expected, weights, w1, sown = run(model, x, memory)
    assert list(weights) == ["cross", "layers/0", "layers/1"]
    assert weights["cross"].shape == (2, 2, 5, 3) and weights["layers/1"].shape == (2, 2, 5, 5)
    assert not nnx.state(model, nnx.Intermediate)  # nothing left behind
    np.testing.assert_allclose(weights["layers/1"], w1, rtol=1e-6, atol=1e-7)
    assert np.all(np.triu(np.asarray(weights["layers/0"]), k=1) == 0)  # causal
    np.testing.assert_array_equal(sown, expected)  # a sowing call's output equals a normal call's
    np.testing.assert_array_equal(run(model, x, memory)[0], expected)  # model unchanged


def test_collect_layer_called_twice():
    layer = MultiHeadAttention(1, 4, rngs=nnx.Rngs(0))

    class Twice(nnx.Module):
        def __init__(self):
            self.attn = layer

        def __call__(self, x, *, sow_weights=False):
            return self.attn(self.attn(x, sow_weights=sow_weights), sow_weights=sow_weights)

    w = collect_attention_weights(Twice(), jnp.ones((1, 3, 4)))
    assert list(w) == ["attn/0", "attn/1"]
    assert list(collect_attention_weights(layer, jnp.ones((1, 3, 4)))) == ["MultiHeadAttention"]


def test_collect_transformer_encoder_decoder_and_cross_weights():
    from jattn.models import Transformer

    model = Transformer(
        7, 9, num_layers=1, features=8, num_heads=2, max_len=8, dropout_rate=0.0, rngs=nnx.Rngs(0)
    )
    src = jnp.array([[3, 4, 5, 2, 0]])  # one PAD key at the end
    tgt = jnp.array([[1, 5, 6, 7]])

    @nnx.jit
    def run(model):
        sown = nnx.capture(lambda m: m(src, tgt, sow_weights=True), nnx.Intermediate)(model)[0]
        return model(src, tgt), collect_attention_weights(model, src, tgt), sown

    expected, weights, sown = run(model)
    assert {k: v.shape for k, v in weights.items()} == {
        "decoder/layers/0/cross_attention": (1, 2, 4, 5),
        "decoder/layers/0/self_attention": (1, 2, 4, 4),
        "encoder/layers/0/self_attention": (1, 2, 5, 5),
    }
    assert not nnx.state(model, nnx.Intermediate)
    np.testing.assert_array_equal(sown, expected)  # bitwise: weights do not change the output
    dec = np.asarray(weights["decoder/layers/0/self_attention"])
    assert np.all(np.triu(dec, k=1) == 0)  # causal decoder
    np.testing.assert_array_equal(weights["decoder/layers/0/cross_attention"][..., 4], 0.0)  # PAD
    np.testing.assert_allclose(np.sum(weights["encoder/layers/0/self_attention"], -1), 1.0, 1e-6)
    fig = plot_attention_grid(weights, batch_index=0)
    assert len(fig.axes) == 3 * 2 + 1
