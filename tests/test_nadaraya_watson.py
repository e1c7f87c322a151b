"""Nadaraya-Watson kernel regression: NumPy float64 references, the layer, d2l's 20-seed result."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn.functional.kernel_regression as nw
from jattn.layers.kernel_regression import NWKernelRegression

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-5, atol=1e-6)


def _data(t=7, s=9, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.uniform(0, 5, t).astype(np.float32)
    k = np.sort(rng.uniform(0, 5, s)).astype(np.float32)
    v = rng.normal(size=s).astype(np.float32)
    return q, k, v


def _np_kernel(name, d, width):
    u = np.abs(d.astype(np.float64)) / width
    return {
        "gaussian": np.exp(-(u**2) / 2),
        "boxcar": (u < 1.0).astype(np.float64),
        "constant": np.ones_like(u),
        "triangular": np.maximum(1 - u, 0.0),
        "epanechnikov": np.maximum(0.75 * (1 - u**2), 0.0),
    }[name]


def _np_nw(q, k, v, name, width):
    kern = _np_kernel(name, q[:, None].astype(np.float64) - k[None, :], width)  # [T, S]
    total = kern.sum(1, keepdims=True)
    w = np.divide(kern, total, out=np.zeros_like(kern), where=total > 0)
    return w @ v.astype(np.float64), w


@pytest.mark.parametrize("name", ["gaussian", "boxcar", "constant", "triangular", "epanechnikov"])
@pytest.mark.parametrize("width", [0.3, 1.0, 2.5])
def test_kernels_match_numpy(name, width):
    q, k, v = _data()
    kernel = getattr(nw, f"{name}_kernel")
    pred, w = nw.nadaraya_watson(q, k, v, kernel=kernel, width=width)
    ref_pred, ref_w = _np_nw(q, k, v, name, width)
    np.testing.assert_allclose(w, ref_w, **TOL)
    np.testing.assert_allclose(pred, ref_pred, **TOL)
    assert w.dtype == jnp.float32 and pred.shape == (7,)


def test_kernel_is_log_of_d2l_kernel():
    d = jnp.linspace(-2, 2, 41)
    np.testing.assert_allclose(jnp.exp(nw.gaussian_kernel(d)), np.exp(-np.square(d) / 2), **TOL)
    np.testing.assert_array_equal(jnp.exp(nw.boxcar_kernel(d)), np.abs(np.asarray(d)) < 1)
    np.testing.assert_allclose(
        jnp.exp(nw.triangular_kernel(d)), np.maximum(1 - np.abs(np.asarray(d)), 0), **TOL
    )
    u = np.asarray(d, np.float64) / 1.5
    np.testing.assert_allclose(  # Epanechnikov: 3/4 (1 - u^2) inside the window
        jnp.exp(nw.epanechnikov_kernel(d, 1.5)), np.maximum(0.75 * (1 - u**2), 0), **TOL
    )
    with pytest.warns(DeprecationWarning, match="d2l's name for the triangular kernel"):
        np.testing.assert_array_equal(nw.epanechikov_kernel(d), nw.triangular_kernel(d))
    assert np.all(np.exp(np.asarray(nw.constant_kernel(d))) == 1)


def test_empty_window_gives_zero_weights_not_nan():
    q = jnp.array([0.0, 10.0])
    k = jnp.array([0.2, 0.5])
    pred, w = nw.nadaraya_watson(q, k, jnp.array([1.0, 3.0]), kernel=nw.boxcar_kernel)
    np.testing.assert_allclose(w, [[0.5, 0.5], [0.0, 0.0]])
    np.testing.assert_allclose(pred, [2.0, 0.0])
    g = jax.jit(
        jax.grad(lambda x: nw.nadaraya_watson(x, k, k, kernel=nw.triangular_kernel)[0].sum())
    )(q)
    assert np.all(np.isfinite(g))


def test_narrow_gaussian_picks_nearest_point_instead_of_underflowing():
    q, k, v = _data()
    pred, w = nw.nadaraya_watson(q, k, v, width=1e-4)
    nearest = np.argmin(np.abs(q[:, None] - k[None, :]), axis=1)
    np.testing.assert_allclose(pred, v[nearest], **TOL)
    np.testing.assert_allclose(w.sum(1), 1.0, **TOL)


def test_vector_values_and_vector_inputs():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(5, 3)).astype(np.float32)
    k = rng.normal(size=(8, 3)).astype(np.float32)
    v = rng.normal(size=(8, 2)).astype(np.float32)
    pred, w = nw.nadaraya_watson(q, k, v, width=0.7)
    dist = np.linalg.norm(q[:, None, :].astype(np.float64) - k[None], axis=-1)
    ref_w = np.exp(-((dist / 0.7) ** 2) / 2)
    ref_w /= ref_w.sum(1, keepdims=True)
    np.testing.assert_allclose(w, ref_w, **TOL)
    np.testing.assert_allclose(pred, ref_w @ v, **TOL)
    assert pred.shape == (5, 2)


def test_parametric_matches_numpy_and_gaussian_of_width_one_over_w():
    q, k, v = _data()
    w = jnp.float32(1.7)
    pred, weights = nw.parametric_nadaraya_watson(q, k, v, w)
    logits = -(((q[:, None].astype(np.float64) - k[None, :]) * 1.7) ** 2) / 2
    ref = np.exp(logits - logits.max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    np.testing.assert_allclose(weights, ref, **TOL)
    np.testing.assert_allclose(pred, ref @ v, **TOL)
    same, _ = nw.nadaraya_watson(q, k, v, width=1 / 1.7)
    np.testing.assert_allclose(pred, same, **TOL)


def test_parametric_per_feature_width():
    rng = np.random.default_rng(2)
    q = rng.normal(size=(4, 2)).astype(np.float32)
    k = rng.normal(size=(6, 2)).astype(np.float32)
    v = rng.normal(size=6).astype(np.float32)
    w = np.array([0.5, 2.0], np.float32)
    pred, weights = nw.parametric_nadaraya_watson(q, k, v, w)
    diff = (q[:, None, :].astype(np.float64) - k[None]) * w
    ref = np.exp(-np.sum(diff**2, -1) / 2)
    ref /= ref.sum(1, keepdims=True)
    np.testing.assert_allclose(weights, ref, **TOL)
    np.testing.assert_allclose(pred, ref @ v, **TOL)


def test_parametric_gradient_in_w_matches_finite_differences():
    _, k, v = _data(s=6)
    mask = nw.leave_one_out_mask(6)

    def loss(w):
        pred, _ = nw.parametric_nadaraya_watson(k, k, v, w, mask=mask)
        return jnp.sum(jnp.square(pred - v))

    def np_loss(w):
        logits = -(((k[:, None].astype(np.float64) - k[None, :]) * w) ** 2) / 2
        e = np.where(np.eye(6, dtype=bool), 0.0, np.exp(logits))
        return np.sum((e @ v / e.sum(1) - v) ** 2)

    grad = jax.jit(jax.grad(loss))
    for w in (0.3, 0.8, 2.0):
        fd = (np_loss(w + 1e-5) - np_loss(w - 1e-5)) / 2e-5
        np.testing.assert_allclose(grad(jnp.float32(w)), fd, rtol=1e-3, atol=1e-5)


def test_leave_one_out_equals_d2l_removed_diagonal():
    _, x, y = _data(s=12)
    w = 1.3
    pred, weights = nw.parametric_nadaraya_watson(x, x, y, w, mask=nw.leave_one_out_mask(12))
    off = ~np.eye(12, dtype=bool)
    keys = np.tile(x, (12, 1))[off].reshape(12, 11).astype(np.float64)  # d2l's construction
    values = np.tile(y, (12, 1))[off].reshape(12, 11).astype(np.float64)
    logits = -(((x[:, None] - keys) * w) ** 2) / 2
    ref = np.exp(logits - logits.max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    np.testing.assert_allclose(pred, (ref * values).sum(1), **TOL)
    np.testing.assert_array_equal(np.diag(np.asarray(weights)), 0.0)


def test_layer_matches_function_scalar_and_per_head():
    q, k, v = _data()
    layer = NWKernelRegression(rngs=nnx.Rngs(0))
    assert layer.w.shape == () and 0.0 <= float(layer.w[...]) < 1.0
    out = layer(q, k, v)
    ref, ref_w = nw.parametric_nadaraya_watson(q, k, v, layer.w[...])
    np.testing.assert_allclose(out, ref, **TOL)
    np.testing.assert_allclose(layer.attention_weights[...], ref_w, **TOL)

    heads = NWKernelRegression(num_heads=3, rngs=nnx.Rngs(1))
    vv = np.stack([v, 2 * v], -1)  # [S, 2]
    out = heads(q, k, vv)
    assert out.shape == (7, 3, 2) and heads.attention_weights.shape == (3, 7, 9)
    for h in range(3):
        r, rw = nw.parametric_nadaraya_watson(q, k, vv, heads.w[...][h])
        np.testing.assert_allclose(out[:, h], r, **TOL)
        np.testing.assert_allclose(heads.attention_weights[...][h], rw, **TOL)


def test_layer_per_head_and_feature():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(4, 2)).astype(np.float32)
    k = rng.normal(size=(6, 2)).astype(np.float32)
    v = rng.normal(size=6).astype(np.float32)
    layer = NWKernelRegression(num_heads=2, num_features=2, rngs=nnx.Rngs(0))
    assert layer.w.shape == (2, 2)
    out = layer(q, k, v)
    assert out.shape == (4, 2)
    r, _ = nw.parametric_nadaraya_watson(q, k, v, layer.w[...][1])
    np.testing.assert_allclose(out[:, 1], r, **TOL)


@pytest.mark.parametrize(
    "kernel", [nw.gaussian_kernel, nw.triangular_kernel, nw.epanechnikov_kernel]
)
def test_gradient_where_a_query_sits_on_a_key(kernel):
    """[T, F] inputs: a query on a key (distance 0) has the gradient of the scalar
    case, not the NaN of sqrt's derivative at 0."""
    x, y = jnp.array([0.0, 1.0, 2.5]), jnp.array([0.0, 1.0, 4.0])
    mask = nw.leave_one_out_mask(3)

    def loss(keys, queries):
        return nw.nadaraya_watson(queries, keys, y, kernel=kernel, width=2.0, mask=mask)[0].sum()

    scalar = jax.grad(loss, argnums=(0, 1))(x, x)
    vector = jax.grad(loss, argnums=(0, 1))(x[:, None], x[:, None])
    for a, b in zip(vector, scalar, strict=True):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a[:, 0], b, rtol=1e-5, atol=1e-6)


def test_an_eager_call_is_one_cached_program_over_widths():
    """Eagerly, a call runs as one compiled program with the width an argument: a
    sweep over widths reuses it, a new kernel compiles once, and the results equal the
    op-by-op run (jax.disable_jit) and the float64 reference."""
    from jattn.functional._eager import _jitted as run

    q, k, v = _data(t=11, s=13)  # shapes no other test uses: no program cached yet
    before = run._cache_size()
    for width in (0.3, 0.7, 2.0):
        pred, weights = nw.nadaraya_watson(q, k, v, width=width)
        np.testing.assert_allclose(pred, _np_nw(q, k, v, "gaussian", width)[0], **TOL)
    assert run._cache_size() == before + 1
    nw.nadaraya_watson(q, k, v, kernel="boxcar", width=0.7)
    assert run._cache_size() == before + 2
    with jax.disable_jit():
        want = nw.nadaraya_watson(q, k, v, width=2.0)
    for a, b in zip((pred, weights), want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # the parametric form: w an argument too
    for w in (0.5, 1.5):
        got = nw.parametric_nadaraya_watson(q, k, v, jnp.float32(w))
        np.testing.assert_allclose(got[0], _np_nw(q, k, v, "gaussian", 1 / w)[0], **TOL)
    assert run._cache_size() == before + 3


def test_errors_name_the_shapes():
    for width in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"width must be finite and > 0, got {width}"):
            nw.nadaraya_watson_weights(jnp.zeros(2), jnp.zeros(3), width=width)
    q, k, v = _data()
    with pytest.raises(ValueError, match=r"keys \[9\] and values \[8\]"):
        nw.nadaraya_watson(q, k, v[:8])
    with pytest.raises(ValueError, match=r"queries \[7\] and keys \[9, 2\]"):
        nw.nadaraya_watson(q, np.stack([k, k], 1), v)
    with pytest.raises(ValueError, match=r"queries must have shape \[T\] or \[T, F\]"):
        nw.nadaraya_watson(q.reshape(7, 1, 1), k, v)
    with pytest.raises(ValueError, match=r"w must be a scalar \[\] or .* \[F\] = \[1\], got \[3\]"):
        nw.parametric_nadaraya_watson(q, k, v, jnp.ones(3))
    with pytest.raises(ValueError, match=r"mask of shape \[9, 9\] does not broadcast"):
        nw.nadaraya_watson(q, k, v, mask=nw.leave_one_out_mask(9))
    with pytest.raises(TypeError, match="mask must be boolean"):
        nw.nadaraya_watson(q, k, v, mask=jnp.ones((7, 9)))
    with pytest.raises(TypeError, match="queries must have a floating dtype"):
        nw.nadaraya_watson(jnp.arange(3), k, v)
    with pytest.raises(ValueError, match="a kernel must act elementwise"):
        nw.nadaraya_watson(q, k, v, kernel=lambda d, w: d.sum(1))
    with pytest.raises(ValueError, match="num_points >= 2"):
        nw.leave_one_out_mask(1)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        NWKernelRegression(num_heads=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"queries must be \[T, 2\], got \[7\]"):
        NWKernelRegression(num_features=2, rngs=nnx.Rngs(0))(q, k, v)


def _experiment():
    spec = importlib.util.spec_from_file_location(
        "nadaraya_watson_experiment", ROOT / "experiments" / "nadaraya_watson.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_d2l_experiment_20_seeds(tmp_path):
    """d2l's result over 20 seeds: parametric < non-parametric < plain averaging (medians)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image

    result = _experiment().main(["--seeds", "20", "--out", str(tmp_path)])
    m = result["medians"]
    assert m["mse_parametric"] < m["mse_nonparametric"] < m["mse_average"], m
    a = result["arrays"]
    assert a["pred_parametric"].shape == (20, 50) and a["weights_parametric"].shape == (20, 50, 50)
    # the data follow the protocol: sorted x in [0, 5), test grid arange(0, 5, 0.1)
    assert np.all(np.diff(a["x_train"], axis=1) >= 0) and a["x_train"].max() < 5
    np.testing.assert_allclose(a["x_test"][0], np.arange(0, 5, 0.1), atol=1e-6)
    # the average predictor is the training mean; the nonparametric one the width-1 Gaussian
    np.testing.assert_allclose(a["pred_average"][3], np.full(50, a["y_train"][3].mean()), rtol=1e-5)
    ref, _ = _np_nw(a["x_test"][3], a["x_train"][3], a["y_train"][3], "gaussian", 1.0)
    np.testing.assert_allclose(a["pred_nonparametric"][3], ref, rtol=1e-4, atol=1e-5)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["medians"] == pytest.approx(m) and len(saved["per_seed"]["w_final"]) == 20
    for name in ("curves.png", "weights.png"):
        img = matplotlib.image.imread(tmp_path / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
