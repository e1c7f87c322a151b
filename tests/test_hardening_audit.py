"""Bad inputs found by audit 10 (issue "Hardening"): the training helpers for several
devices and processes, the vision stem and ViT, the GRU encoder and cell, the composite
layers' decoding and the demo's command line. Each bad input is a TypeError or
ValueError at the public boundary naming the argument, the value and what is expected,
raised before any computation: never a truncated float, a silently ignored argument or
an error from deep inside JAX or Flax."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _hardening import generated
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from jattn.layers import LinearAttention, ParallelAttention, SeriesAttention
from jattn.layers.vision import ConvStem, ViT
from jattn.models import GRUCell, GRUEncoder
from jattn.training import parallel, sharding

SETTINGS = generated(30)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------ initialize_distributed


@pytest.fixture
def no_distributed(monkeypatch):
    """No JAX_* variables, and a jax.distributed.initialize that fails the test: every
    error must come before jax sees the arguments. Yields the arguments of the calls
    that got through (a stand-in records them)."""
    for env in parallel.DISTRIBUTED_ENV.values():
        monkeypatch.delenv(env, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    return calls


@pytest.mark.parametrize(
    "args, exc, message",
    [
        (("h:1", 2.5, 1), TypeError, r"^num_processes must be an int, got 2\.5 \(a float\)$"),
        (("h:1", 2, 1.9), TypeError, r"^process_id must be an int, got 1\.9 \(a float\)$"),
        (("h:1", 2.0, 1), TypeError, r"^num_processes must be an int, got 2\.0 \(a float\)$"),
        (("h:1", True, False), TypeError, r"^num_processes must be an int, got True \(a bool\)$"),
        (("h:1", 2, False), TypeError, r"^process_id must be an int, got False \(a bool\)$"),
        (("h:1", 0, 0), ValueError, r"^num_processes must be >= 1 .*got 0$"),
        (("h:1", -2, 0), ValueError, r"^num_processes must be >= 1 .*got -2$"),
        (("h:1", 2, -1), ValueError, r"^process_id=-1 must be in \[0, num_processes=2\)$"),
        ((5, 1, 0), TypeError, r"^coordinator_address must be a 'host:port' string .*got 5$"),
        (("", 1, 0), ValueError, r"^coordinator_address must be 'host:port' .*got ''$"),
        (
            ("localhost", 1, 0),
            ValueError,
            r"^coordinator_address must be 'host:port'.*'localhost'$",
        ),
        ((":1234", 1, 0), ValueError, r"^coordinator_address must be 'host:port'.*':1234'$"),
        (("h:port", 1, 0), ValueError, r"^coordinator_address must be 'host:port'.*'h:port'$"),
        (("h:70000", 1, 0), ValueError, r"^coordinator_address must be 'host:port'.*'h:70000'$"),
    ],
)
def test_initialize_distributed_refuses_bad_arguments_before_jax(
    no_distributed, args, exc, message
):
    with pytest.raises(exc, match=message):
        parallel.initialize_distributed(*args)
    assert no_distributed == []


@SETTINGS
@given(
    which=st.sampled_from(["num_processes", "process_id"]),
    value=st.floats(allow_nan=True, allow_infinity=True) | st.booleans(),
)
def test_initialize_distributed_never_truncates_a_float_or_bool(no_distributed, which, value):
    args = {"coordinator_address": "127.0.0.1:1234", "num_processes": 4, "process_id": 1}
    args[which] = value
    with pytest.raises(TypeError, match=rf"^{which} must be an int, got "):
        parallel.initialize_distributed(**args)
    assert no_distributed == []


def test_initialize_distributed_still_takes_ints_and_their_strings(no_distributed, monkeypatch):
    assert parallel.initialize_distributed("10.0.0.1:1234", np.int64(2), 1) is True
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")  # environment variables are strings
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    assert parallel.initialize_distributed("host.example:80") is True
    assert no_distributed == [
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1},
        {"coordinator_address": "host.example:80", "num_processes": 2, "process_id": 0},
    ]
    assert all(type(v) is int for kw in no_distributed for v in list(kw.values())[1:])


# ----------------------------------------------------------------- meshes, shardings


@pytest.mark.parametrize("bad", [True, False, 1.0, "1", None, -1])
def test_data_parallel_mesh_and_make_mesh_refuse_the_same_num_devices(bad):
    for fn in (parallel.data_parallel_mesh, lambda n: sharding.make_mesh("data", (), n)):
        with pytest.raises(ValueError, match=r"^num_devices must be an int >= 0, got "):
            fn(bad)


def test_data_parallel_mesh_and_make_mesh_take_the_same_ints():
    for n in (0, 1, np.int64(1)):
        assert parallel.data_parallel_mesh(n).shape == sharding.make_mesh("data", (), n).shape


MESH = AbstractMesh((8,), ("data",))
TENSOR_MESH = AbstractMesh((2, 4), ("data", "model"))


DATA_RULES_ERROR = r"^rules must be a sequence of \(logical axis name, mesh axis\) pairs "


@pytest.mark.parametrize(
    "rules, mesh, exc, message",
    [
        ({"batch": "data"}, MESH, TypeError, DATA_RULES_ERROR + r".*\(dict\)$"),
        ("data", MESH, TypeError, DATA_RULES_ERROR + r".*got 'data' \(str\)$"),
        (None, MESH, TypeError, DATA_RULES_ERROR + r".*got None \(NoneType\)$"),
        ((("batch",),), MESH, TypeError, r"^rules\[0\] must be a pair \(logical axis name, mesh"),
        (("batch", "data"), MESH, TypeError, r"^rules\[0\] must be a pair .*got 'batch'$"),
        ((("batch", ("data",)),), MESH, TypeError, r"^rules\[0\] must be a pair .*of strings"),
        (
            (("batch", "data"), ("mlp", "dta")),
            TENSOR_MESH,
            ValueError,
            r"^rules\[1\] = \('mlp', 'dta'\) names the mesh axis 'dta', but the mesh has the "
            r"axes \('data', 'model'\)$",
        ),
        (  # the tensor strategy's rules on a data-parallel mesh
            sharding.RULES["tensor"],
            MESH,
            ValueError,
            r"^rules\[1\] = \('heads', 'model'\) names the mesh axis 'model', but the mesh "
            r"has the axes \('data',\)$",
        ),
    ],
)
def test_sharding_rules_are_checked_by_every_entry_point(rules, mesh, exc, message):
    calls = {
        "mesh_spec": lambda: sharding.mesh_spec(("batch",), (8,), rules, mesh),
        "batch_shardings": lambda: sharding.batch_shardings({"x": np.ones((8, 2))}, mesh, rules),
        "state_shardings": lambda: sharding.state_shardings(nnx.Param(jnp.ones(8)), mesh, rules),
    }
    for name, call in calls.items():
        with pytest.raises(exc, match=message):
            call()
            pytest.fail(f"{name} took rules={rules!r}")


def test_sharding_rules_that_are_right_still_split():
    assert sharding.mesh_spec(("batch",), (8,), sharding.RULES["data"], MESH) == P("data")
    # pairs as lists (a config file's JSON) and a None mesh axis (never split) are rules too
    assert sharding.mesh_spec(("batch", "mlp"), (8, 4), [["batch", "data"], ["mlp", None]],
                              MESH) == P("data")  # fmt: skip


def test_replicated_and_batch_sharding_check_their_mesh():
    with pytest.raises(TypeError, match=r"^mesh must be a jax.sharding.Mesh .*got NoneType$"):
        parallel.replicated(None)
    with pytest.raises(TypeError, match=r"^mesh must be a jax.sharding.Mesh .*got str$"):
        parallel.batch_sharding("x")
    with pytest.raises(ValueError, match=r"^mesh must have a 'data' axis .*\('model',\)$"):
        parallel.batch_sharding(AbstractMesh((1,), ("model",)))
    assert parallel.batch_sharding(MESH, batch_size=16).spec == P("data")


@pytest.mark.parametrize("batch_size", [6, 4, 12])
def test_batch_sharding_names_a_batch_the_devices_do_not_divide(batch_size):
    with pytest.raises(
        ValueError,
        match=rf"^batch_size={batch_size} does not split over the mesh's 'data' axis of 8 "
        r"devices .*use a multiple of 8",
    ):
        parallel.batch_sharding(MESH, batch_size=batch_size)


# ------------------------------------------------------------------- vision, ViT

R = nnx.Rngs(0)


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 8), r"^in_channels must be a positive int, got 0$"),
        ((2.0, 8), r"^in_channels must be a positive int, got 2\.0 \(a float\)$"),
        ((True, 8), r"^in_channels must be a positive int, got True \(a bool\)$"),
        ((3, 0), r"^features must be a positive int, got 0$"),
    ],
)
def test_conv_stem_names_its_own_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        ConvStem(*args, rngs=R)


VIT = dict(image_size=8, patch=4, in_channels=3, num_classes=2, num_layers=1, num_heads=2,
           mlp_features=8)  # fmt: skip


@pytest.mark.parametrize("features", [2, 6, 10, 14])
def test_vit_sincos_needs_features_a_multiple_of_4_at_construction(features):
    with pytest.raises(
        ValueError, match=rf"^features={features} must be a multiple of 4 with posemb='sincos'"
    ):
        ViT(features=features, posemb="sincos", rngs=R, **VIT)
    ViT(features=features, posemb="learned", rngs=R, **VIT)  # learned positions: any width


def test_vit_stem_errors_still_name_the_models_options():
    with pytest.raises(ValueError, match=r"^stem_features must be a positive int, got 0$"):
        ViT(features=8, stem_features=0, rngs=R, **VIT)


# ---------------------------------------------------------------------------- GRU

CELL = GRUCell(4, 3, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "h_shape, x_shape",
    [((2, 3), (2, 5)), ((2, 4), (2, 4)), ((2, 3), (3, 4)), ((3,), (2, 4)), ((), (2, 4))],
)
def test_gru_cell_names_wrong_widths_and_batches(h_shape, x_shape):
    with pytest.raises(
        ValueError,
        match=r"^h must be \[B, H\] with H = hidden = 3 and x \[B, F\] with F = in_features "
        rf"= 4 \(one batch shape B\), got h \[{', '.join(map(str, h_shape))}\] and x",
    ):
        CELL(jnp.zeros(h_shape), jnp.ones(x_shape))


@pytest.mark.parametrize("which", ["h", "x"])
def test_gru_cell_refuses_complex_inputs(which):
    h, x = jnp.zeros((2, 3)), jnp.ones((2, 4))
    if which == "h":
        h = h.astype(jnp.complex64)
    else:
        x = x * (1 + 2j)
    with pytest.raises(TypeError, match=rf"^{which} must hold real numbers .*complex64$"):
        CELL(h, x)


def test_gru_encoder_names_the_input_width():
    enc = GRUEncoder(4, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"^x must be \[B, S, F\] with F = in_features = 4, "
                       r"got \[2, 5, 5\]$"):  # fmt: skip
        enc(jnp.ones((2, 5, 5)), jnp.ones((2, 5), bool))


@pytest.mark.parametrize("num_layers", [1, 2])
def test_gru_encoder_dropout_names_the_missing_stream(num_layers):
    with pytest.raises(
        ValueError,
        match=r"^dropout_rate=0.5 needs a 'dropout' stream in rngs .*rngs has only \['params'\]: "
        r"pass nnx.Rngs\(params=0, dropout=1\)",
    ):
        GRUEncoder(4, 3, num_layers=num_layers, dropout_rate=0.5, rngs=nnx.Rngs(params=0))
    GRUEncoder(4, 3, num_layers=num_layers, dropout_rate=0.5, rngs=nnx.Rngs(params=0, dropout=1))
    GRUEncoder(4, 3, num_layers=num_layers, rngs=nnx.Rngs(params=0))  # no dropout: no stream


# --------------------------------------------------------------------- composites


def _parts(n):
    return [LinearAttention(2, 8, rngs=nnx.Rngs(i)) for i in range(n)]


@pytest.mark.parametrize("cache", [None, (), [None], 0])
@pytest.mark.parametrize("kind", ["parallel", "series"])
def test_composite_step_says_the_cache_comes_from_init_cache(kind, cache):
    layer = (
        ParallelAttention(_parts(2), combine="sum")
        if kind == "parallel"
        else SeriesAttention(_parts(2))
    )
    what = "branch" if kind == "parallel" else "layer"
    with pytest.raises(
        TypeError,
        match=rf"^cache must be the tuple of 2 caches \(one per {what}\) that "
        r"init_cache\(batch_size, max_len\) returns, got ",
    ):
        layer.step(jnp.ones((1, 1, 8)), cache)


@pytest.mark.parametrize(
    "layer_types, exc, message",
    [
        (["a"], ValueError, r"^layer_types has 1 names \('a',\), but there are 2 layers"),
        (["a", "b", "c"], ValueError, r"^layer_types has 3 names .*but there are 2 layers"),
        (
            "ab",
            TypeError,
            r"^layer_types must be None or a list of names, one per layer, got 'ab'$",
        ),
        (["a", 1], TypeError, r"^layer_types must be None or a list of names"),
        (3, TypeError, r"^layer_types must be None or a list of names.*got 3$"),
    ],
)
def test_series_attention_checks_layer_types(layer_types, exc, message):
    with pytest.raises(exc, match=message):
        SeriesAttention(_parts(2), layer_types=layer_types)
    assert SeriesAttention(_parts(2), layer_types=["a", "b"]).layer_types == ("a", "b")


# --------------------------------------------------------------------------- demo


def _demo(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "jattn.demo", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_demo_help_prints_the_usage_and_does_not_run():
    done = _demo("--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m jattn.demo")
    assert "masked_softmax" not in done.stdout  # the tour did not run


@pytest.mark.parametrize("args", [["--bogus"], ["extra"]])
def test_demo_refuses_unknown_arguments(args):
    done = _demo(*args)
    assert done.returncode == 2
    assert "unrecognized arguments" in done.stderr
    assert "masked_softmax" not in done.stdout


@pytest.mark.parametrize("features", [6, 10])
def test_detr_features_a_multiple_of_4_at_construction(features):
    """Was a late error at the first call (sincos_2d's "dim must be a multiple of 4"),
    naming neither the model nor its features."""
    from jattn.models.detr import DETR

    with pytest.raises(ValueError, match=rf"DETR: features={features} must be a multiple of 4"):
        DETR(image_size=8, patch=4, in_channels=3, num_classes=2, num_queries=2,
             features=features, num_heads=2, mlp_features=8, num_encoder_layers=1,
             num_decoder_layers=1, rngs=nnx.Rngs(0))  # fmt: skip
