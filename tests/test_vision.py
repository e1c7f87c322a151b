"""Vision: sincos positions, patches, PatchEmbedding, ViT, rollout maps, SE/ECA/CBAM."""

import matplotlib

matplotlib.use("Agg")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from _layers import check_axis_names
from flax import nnx  # noqa: E402

from jattn.diagnostics import attention_rollout  # noqa: E402
from jattn.functional.vision import (  # noqa: E402
    patchify,
    relative_position_bias_2d,
    sincos_2d,
    unpatchify,
)
from jattn.layers import (  # noqa: E402
    CBAM,
    ECA,
    ConvStem,
    DETRDecoder,
    PatchEmbedding,
    SqueezeExcitation,
    ViT,
    hungarian_match,
    rollout_map,
)
from jattn.layers.vision import eca_kernel_size  # noqa: E402
from jattn.viz import collect_attention_weights, plot_attention_on_image, save_figure  # noqa: E402

ATOL = 1e-5  # float32 against float64 references


def _rand(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np(p):
    return np.asarray(p[...], np.float64)


# ------------------------------------------------------------------ functional


@pytest.mark.parametrize("h,w,dim", [(3, 5, 16), (4, 4, 8), (2, 3, 4)])
def test_sincos_2d_matches_big_vision_formula(h, w, dim):
    q = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(q) / max(q - 1, 1))
    want = np.zeros((h * w, dim))
    for y in range(h):
        for x in range(w):
            row = y * w + x
            want[row] = np.concatenate(
                [np.sin(x * omega), np.cos(x * omega), np.sin(y * omega), np.cos(y * omega)]
            )
    got = sincos_2d(h, w, dim)
    assert got.shape == (h * w, dim) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_relative_position_bias_2d_looks_up_each_offset():
    h, w, n = 2, 3, 2
    table = _rand((n, (2 * h - 1) * (2 * w - 1)))
    out = relative_position_bias_2d(table, h, w)
    assert out.shape == (n, h * w, h * w)
    for i in range(h * w):
        for j in range(h * w):
            dy, dx = i // w - j // w, i % w - j % w
            np.testing.assert_array_equal(
                out[:, i, j], table[:, (dy + h - 1) * (2 * w - 1) + dx + w - 1]
            )
    with pytest.raises(
        ValueError, match=r"table must be \[N, \(2h - 1\) \* \(2w - 1\)\] = \[N, 15\]"
    ):
        relative_position_bias_2d(table[:, :-1], h, w)


def test_sincos_2d_bad_dim():
    with pytest.raises(ValueError, match="dim must be a multiple of 4"):
        sincos_2d(2, 2, 6)


def test_patchify_reference_and_round_trip():
    b, hh, ww, c, p = 2, 6, 9, 2, 3
    images = _rand((b, hh, ww, c))
    got = np.asarray(patchify(images, p))
    want = np.empty((b, (hh // p) * (ww // p), p * p * c), np.float32)
    for i in range(hh // p):
        for j in range(ww // p):
            want[:, i * (ww // p) + j] = images[
                :, i * p : (i + 1) * p, j * p : (j + 1) * p
            ].reshape(b, -1)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(unpatchify(got, p, (hh // p, ww // p)), images)


def test_patchify_errors():
    with pytest.raises(ValueError, match=r"H x W = 6 x 7 is not divisible by patch=3"):
        patchify(jnp.zeros((1, 6, 7, 1)), 3)
    with pytest.raises(ValueError, match=r"images must have shape \[B, H, W, C\]"):
        patchify(jnp.zeros((6, 6, 1)), 3)
    with pytest.raises(ValueError, match=r"patches must have shape \[B, h \* w, p \* p \* C\]"):
        unpatchify(jnp.zeros((1, 5, 9)), 3, (2, 2))


# -------------------------------------------------------------- patch embedding


def test_patch_embedding_equals_patchify_then_linear():
    p, c, d = 2, 3, 5
    embed = PatchEmbedding(p, c, d, rngs=nnx.Rngs(0))
    linear = nnx.Linear(p * p * c, d, rngs=nnx.Rngs(1))
    linear.kernel[...] = embed.conv.kernel[...].reshape(p * p * c, d)
    linear.bias[...] = embed.conv.bias[...]
    images = _rand((2, 4, 6, c))
    got = embed(images)
    assert got.shape == (2, 2 * 3, d)
    np.testing.assert_allclose(got, linear(patchify(images, p)), atol=ATOL)


def test_patch_embedding_errors():
    embed = PatchEmbedding(2, 3, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"images must have shape \[B, H, W, C\] .* C=3"):
        embed(jnp.zeros((1, 4, 4, 1)))
    with pytest.raises(ValueError, match="H x W = 5 x 4 is not divisible by patch=2"):
        embed(jnp.zeros((1, 5, 4, 3)))


# ------------------------------------------------------------------------- ViT


def _vit(pool, posemb="sincos", seed=0):
    return ViT(image_size=(4, 6), patch=2, in_channels=3, num_classes=7, features=8,
               num_layers=2, num_heads=2, mlp_features=16, pool=pool, posemb=posemb,
               rngs=nnx.Rngs(seed))  # fmt: skip


@pytest.mark.parametrize("pool", ["cls", "mean", "map"])
def test_vit_shapes_and_manual_forward(pool):
    model = _vit(pool, posemb="learned" if pool == "mean" else "sincos")
    images = _rand((2, 4, 6, 3))
    logits = model(images)
    assert logits.shape == (2, 7)
    tokens = model.tokens(images)
    assert tokens.shape == (2, 6 + (pool == "cls"), 8)
    x = model.encoder(tokens)
    pooled = {"cls": lambda: x[:, 0], "mean": lambda: x.mean(1), "map": lambda: model.map_head(x)}
    np.testing.assert_allclose(logits, model.head(pooled[pool]()), atol=ATOL)


def test_vit_cls_pooling_reads_token_zero():
    model = _vit("cls")
    images = _rand((1, 4, 6, 3))
    x = model.encoder(model.tokens(images))
    h = model.head
    # Changing any token but 0 of the encoder output leaves the logits alone; token 0 does not.
    np.testing.assert_allclose(model(images), h(x.at[:, 1:].set(0.0)[:, 0]), atol=ATOL)
    assert not np.allclose(model(images), h(x[:, 1]), atol=1e-3)


def test_vit_positions_added_before_cls():
    model = _vit("cls")
    images = _rand((1, 4, 6, 3))
    tokens = model.tokens(images)
    np.testing.assert_allclose(tokens[:, 0], np.zeros((1, 8)))  # cls token, zero init
    np.testing.assert_allclose(
        tokens[:, 1:], model.patch_embed(images) + sincos_2d(2, 3, 8)[None], atol=ATOL
    )


def test_vit_conv_stem_is_a_3x3_convolution_and_gelu_before_the_patches():
    model = ViT(image_size=(4, 6), patch=2, in_channels=3, num_classes=7, features=8,
                num_layers=1, num_heads=2, mlp_features=16, stem_features=5,
                rngs=nnx.Rngs(0))  # fmt: skip
    images = _rand((2, 4, 6, 3))
    x = np.pad(np.asarray(images, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    kernel = np.asarray(model.stem.convs[0].kernel[...], np.float64)  # [3, 3, 3, 5]
    conv = sum(
        np.einsum("bhwc,cf->bhwf", x[:, i : i + 4, j : j + 6], kernel[i, j])
        for i in range(3)
        for j in range(3)
    ) + np.asarray(model.stem.convs[0].bias[...], np.float64)
    stem = jax.nn.gelu(jnp.asarray(conv, jnp.float32))
    want = model.patch_embed(stem) + sincos_2d(2, 3, 8)[None]
    np.testing.assert_allclose(model.tokens(images)[:, 1:], want, atol=1e-5)
    assert model.patch_embed.in_channels == 5
    deep = ConvStem(3, 4, 2, rngs=nnx.Rngs(1))  # two convolutions, a GELU after each
    first, second = deep.convs
    np.testing.assert_allclose(
        deep(images), jax.nn.gelu(second(jax.nn.gelu(first(images)))), atol=1e-6
    )
    assert first.kernel.shape == (3, 3, 3, 4) and second.kernel.shape == (3, 3, 4, 4)
    with pytest.raises(ValueError, match="stem_layers must be a positive int"):
        ConvStem(3, 4, 0, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="stem_features must be a positive int"):
        ViT(image_size=4, patch=2, in_channels=3, num_classes=2, features=8, num_layers=1,
            num_heads=2, mlp_features=8, stem_features=0, rngs=nnx.Rngs(0))  # fmt: skip


def test_vit_errors():
    with pytest.raises(
        ValueError, match=r"pool must be one of \('cls', 'mean', 'map'\), got 'max'"
    ):
        _vit("max")
    with pytest.raises(ValueError, match="posemb must be one of"):
        _vit("cls", posemb="rope")
    with pytest.raises(ValueError, match="H x W = 5 x 6 is not divisible by patch=2"):
        ViT(image_size=(5, 6), patch=2, in_channels=3, num_classes=2, features=8, num_layers=1,
            num_heads=2, mlp_features=8, rngs=nnx.Rngs(0))  # fmt: skip
    model = _vit("cls")
    with pytest.raises(ValueError, match=r"\[B, H, W, C\] \(channels last\) with C=3"):
        model(jnp.zeros((1, 4, 6, 1)))
    with pytest.raises(ValueError, match="images must be 4 x 6"):
        model(jnp.zeros((1, 6, 4, 3)))


# --------------------------------------------------------------------- rollout


def test_vit_attention_weights_and_rollout_map():
    model = _vit("cls")
    images = _rand((2, 4, 6, 3))
    weights = model.attention_weights(images)
    assert len(weights) == 2 and all(w.shape == (2, 2, 7, 7) for w in weights)
    sown = collect_attention_weights(model, images)
    assert set(sown) == {"encoder/layers/0/self_attention", "encoder/layers/1/self_attention"}
    amap = rollout_map(weights, model.grid_hw)
    assert amap.shape == (2, 2, 3)
    rollout = attention_rollout(weights)
    np.testing.assert_allclose(amap.reshape(2, -1), rollout[:, 0, 1:], atol=ATOL)
    np.testing.assert_allclose(amap.sum((-2, -1)), 1.0 - rollout[:, 0, 0], atol=ATOL)
    # mean pooling: the mean of the rows, which sums to 1.
    model = _vit("map")
    weights = model.attention_weights(images)
    assert len(weights) == 2  # the MAP head's cross-attention is left out
    amap = rollout_map(weights, model.grid_hw, num_prefix_tokens=0)
    np.testing.assert_allclose(amap.sum((-2, -1)), 1.0, atol=ATOL)


def test_rollout_map_errors():
    weights = [jnp.full((1, 2, 7, 7), 1 / 7)]
    with pytest.raises(
        ValueError, match=r"T=7 tokens, but num_prefix_tokens \+ h \* w = 1 \+ 2 \* 2"
    ):
        rollout_map(weights, (2, 2))
    with pytest.raises(ValueError, match="num_prefix_tokens must be 0 or 1"):
        rollout_map(weights, (2, 3), num_prefix_tokens=2)


def test_plot_attention_on_image_writes_png(tmp_path):
    image = np.random.default_rng(0).uniform(size=(4, 6, 3))
    fig = plot_attention_on_image(image, np.arange(6.0).reshape(2, 3), title="rollout")
    assert len(fig.axes[0].images) == 2
    path = save_figure(fig, tmp_path / "overlay.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(
        ValueError, match=r"image must have shape \[H, W, C\] with C in \(1, 3, 4\)"
    ):
        plot_attention_on_image(np.zeros((4, 6, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="alpha must be in"):
        plot_attention_on_image(image, np.zeros((2, 3)), alpha=1.5)


# ------------------------------------------------------ channel/spatial attention


def test_squeeze_excitation_reference():
    c = 8
    layer = SqueezeExcitation(c, reduction=4, rngs=nnx.Rngs(0))
    x = _rand((2, 3, 5, c))
    out, a = layer(x, return_weights=True)
    s = x.astype(np.float64).mean((1, 2))
    z = np.maximum(s @ _np(layer.down.kernel) + _np(layer.down.bias), 0)
    want_a = _sigmoid(z @ _np(layer.up.kernel) + _np(layer.up.bias))
    assert layer.down.kernel.shape == (8, 2)
    np.testing.assert_allclose(a, want_a, atol=ATOL)
    np.testing.assert_allclose(out, x * want_a[:, None, None, :], atol=ATOL)
    np.testing.assert_allclose(layer(x), out)


def test_eca_reference():
    c, k = 6, 3
    layer = ECA(c, kernel_size=k, rngs=nnx.Rngs(0))
    x = _rand((2, 3, 4, c))
    out, a = layer(x, return_weights=True)
    s = np.pad(x.astype(np.float64).mean((1, 2)), ((0, 0), (k // 2, k // 2)))
    w = _np(layer.conv.kernel).reshape(k)
    want_a = _sigmoid(np.stack([s[:, i : i + k] @ w for i in range(c)], axis=-1))
    np.testing.assert_allclose(a, want_a, atol=ATOL)
    np.testing.assert_allclose(out, x * want_a[:, None, None, :], atol=ATOL)
    assert eca_kernel_size(64) == 3 and eca_kernel_size(512) == 5
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ECA(c, kernel_size=4, rngs=nnx.Rngs(0))


def test_cbam_reference():
    c, k = 8, 3
    layer = CBAM(c, reduction=2, kernel_size=k, rngs=nnx.Rngs(0))
    x = _rand((2, 4, 5, c))
    out, maps = layer(x, return_weights=True)
    x64 = x.astype(np.float64)
    down, up = _np(layer.down.kernel), _np(layer.up.kernel)

    def mlp(s):
        return np.maximum(s @ down, 0) @ up

    a_c = _sigmoid(mlp(x64.mean((1, 2))) + mlp(x64.max((1, 2))))
    y = x64 * a_c[:, None, None, :]
    pooled = np.stack([y.mean(-1), y.max(-1)], axis=-1)  # [B, H, W, 2]
    padded = np.pad(pooled, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    kernel = _np(layer.spatial.kernel)[..., 0]  # [k, k, 2]
    logits = np.zeros(pooled.shape[:3]) + _np(layer.spatial.bias)[0]
    for i in range(k):
        for j in range(k):
            logits += padded[:, i : i + 4, j : j + 5] @ kernel[i, j]
    a_s = _sigmoid(logits)
    np.testing.assert_allclose(maps["channel"], a_c, atol=ATOL)
    np.testing.assert_allclose(maps["spatial"], a_s, atol=ATOL)
    np.testing.assert_allclose(out, y * a_s[..., None], atol=ATOL)


@pytest.mark.parametrize("cls", [SqueezeExcitation, ECA, CBAM])
def test_channel_attention_wrong_channels(cls):
    layer = cls(8, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError, match=r"x must have shape \[B, H, W, C\] \(channels last\) with C=8"
    ):
        layer(jnp.zeros((1, 3, 3, 4)))
    with pytest.raises(TypeError, match="x must hold real numbers"):
        layer(jnp.zeros((1, 3, 3, 8), jnp.complex64))


def test_vit_jits():
    model = _vit("map")
    images = _rand((1, 4, 6, 3))
    got = nnx.jit(lambda m, x: m(x))(model, images)
    np.testing.assert_allclose(got, model(images), atol=ATOL)
    assert jax.tree.leaves(nnx.state(model, nnx.Param))  # parameters exist


# ------------------------------------------------------------------------ DETR


def test_detr_decoder_shapes_and_cross_attention_weights():
    model = DETRDecoder(num_queries=5, features=8, num_classes=3, num_layers=2, num_heads=2,
                        mlp_features=16, rngs=nnx.Rngs(0))  # fmt: skip
    feats = _rand((2, 6, 8))
    logits, boxes = model(feats)
    assert logits.shape == (2, 5, 4) and boxes.shape == (2, 5, 4)
    assert np.all((np.asarray(boxes) > 0) & (np.asarray(boxes) < 1))
    sown = collect_attention_weights(model, feats)
    cross = sown["decoder/layers/1/cross_attention"]
    assert cross.shape == (2, 2, 5, 6)
    np.testing.assert_allclose(cross.sum(-1), 1.0, atol=ATOL)
    # a masked feature token gets no weight, and changing it changes nothing
    mask = np.ones((2, 6), bool)
    mask[:, -1] = False
    masked = collect_attention_weights(model, feats, mask=jnp.asarray(mask))
    np.testing.assert_allclose(masked["decoder/layers/0/cross_attention"][..., -1], 0.0)
    changed = feats.copy()
    changed[:, -1] += 10.0
    for a, b in zip(model(feats, mask=mask), model(changed, mask=mask), strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL)
    with pytest.raises(ValueError, match=r"features must have shape \[B, S, D\] with D=8"):
        model(jnp.zeros((2, 6, 4)))
    with pytest.raises(ValueError, match=r"mask must have shape \[B, S\] = \[2, 6\]"):
        model(feats, mask=jnp.ones((2, 5), bool))


def test_hungarian_match_against_brute_force():
    import itertools

    cost = np.random.default_rng(0).uniform(size=(5, 3))
    rows, cols = hungarian_match(cost)
    best = min(
        itertools.permutations(range(5), 3), key=lambda p: sum(cost[p[j], j] for j in range(3))
    )
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == sorted(
        (p, j) for j, p in enumerate(best)
    )
    assert rows.dtype == np.int64 and list(rows) == sorted(rows)
    with pytest.raises(ValueError, match=r"cost must be a real \[Q, M\] matrix"):
        hungarian_match(np.zeros(3))
    with pytest.raises(ValueError, match="cost must be finite"):
        hungarian_match(np.array([[0.0, np.inf]]))
    with pytest.raises(TypeError, match="outside jit"):
        jax.jit(hungarian_match)(jnp.zeros((2, 2)))


# ------------------------------------------------------------ conventions


LAYERS = {
    "PatchEmbedding": lambda r: PatchEmbedding(2, 3, 8, rngs=r),
    "ViT-cls-learned": lambda r: _vit("cls", posemb="learned"),
    "ViT-map": lambda r: _vit("map"),
    "ViT-stem": lambda r: ViT(
        image_size=4,
        patch=2,
        in_channels=3,
        num_classes=2,
        features=8,
        num_layers=1,
        num_heads=2,
        mlp_features=8,
        stem_features=4,
        rngs=r,
    ),  # fmt: skip
    "DETRDecoder": lambda r: DETRDecoder(
        num_queries=2, features=8, num_classes=2, num_layers=1, num_heads=2, mlp_features=8, rngs=r
    ),  # fmt: skip
    "SqueezeExcitation": lambda r: SqueezeExcitation(8, rngs=r),
    "ECA": lambda r: ECA(8, rngs=r),
    "CBAM": lambda r: CBAM(8, rngs=r),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_every_parameter_names_each_of_its_axes(name):
    check_axis_names(LAYERS[name])


def test_vit_dropout_follows_train_and_eval():
    model = ViT(image_size=4, patch=2, in_channels=3, num_classes=2, features=8, num_layers=1,
                num_heads=2, mlp_features=8, dropout_rate=0.5, rngs=nnx.Rngs(0))  # fmt: skip
    images = _rand((2, 4, 4, 3))
    eval_out = model(images)
    train = [model(images, deterministic=False, rngs=nnx.Rngs(dropout=s)) for s in (1, 2)]
    assert not np.allclose(train[0], train[1]) and not np.allclose(train[0], eval_out)
    model.train()
    assert not np.allclose(model(images, rngs=nnx.Rngs(dropout=1)), eval_out)
    model.eval()
    np.testing.assert_array_equal(model(images), eval_out)
