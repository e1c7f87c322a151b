"""Sharded models and training: every parameter names its axes (NNX sharding metadata),
the rules table lays them out per strategy, the config's mesh fields fail with the field
and the reason; the training program on 8 emulated CPU devices gives the one-device
losses and evaluation data parallel (and resumes there with the same losses), the
one-device losses with the state split (fsdp, tensor) or the batch split along its
sequence axis, and resumes a checkpoint saved split over 8 devices on 1; a run of 2
processes on this machine gives the one-process losses. (The device count is fixed when
jax starts: the multi-device runs are separate processes.)"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import pytest
from _layers import check_axis_names
from _train_utils import ROOT, device_env, load_config, train_losses
from flax import nnx
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

import jattn.train as train_lib
from jattn.layers import (
    AdditiveAttention,
    LinearAttention,
    MLPScore,
    MultiHeadAttention,
    NWKernelRegression,
    axes,
)
from jattn.models import DecoderLM, EncoderClassifier, Transformer
from jattn.models.seq2seq import BahdanauSeq2Seq
from jattn.training import read_metrics
from jattn.training.parallel import initialize_distributed
from jattn.training.sharding import MESH_AXES, RULES, batch_shardings, mesh_spec

RTOL = 1e-5  # float32: only the order of the sums over devices differs

MODELS = {
    "transformer": lambda r: Transformer(
        src_vocab_size=20, tgt_vocab_size=20, features=16, num_heads=2, mlp_features=32,
        num_encoder_layers=1, num_decoder_layers=1, positional="learned", rngs=r,
    ),
    "lm_relative_bias": lambda r: DecoderLM(
        20, num_layers=1, features=16, num_heads=2, mlp_features=32,
        score_mod={"name": "relative_position_bias"}, rngs=r,
    ),
    "classifier": lambda r: EncoderClassifier(
        20, 3, num_layers=1, features=16, num_heads=2, mlp_features=32, final_norm=True, rngs=r
    ),
    "bahdanau": lambda r: BahdanauSeq2Seq(
        src_vocab_size=20, tgt_vocab_size=20, embed_dim=8, hidden=16, rngs=r
    ),
    "bahdanau_bilinear": lambda r: BahdanauSeq2Seq(
        src_vocab_size=20, tgt_vocab_size=20, embed_dim=8, hidden=16, score="bilinear", rngs=r
    ),
    "gla": lambda r: LinearAttention(2, 16, kind="gla", rngs=r),
    "mlp_score": lambda r: MultiHeadAttention(2, 16, score=MLPScore(2, 8, 4, rngs=r), rngs=r),
    "additive": lambda r: AdditiveAttention(4, 5, 6, rngs=r),
    "kernel_regression": lambda r: NWKernelRegression(2, 3, rngs=r),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_parameter_names_each_of_its_axes(name):
    check_axis_names(MODELS[name])


def test_names_read_back_with_flax_and_build_under_a_mesh():
    mesh = jax.make_mesh((1,), ("data",))
    with jax.set_mesh(mesh):  # Flax's eager sharding would look for mesh axis 'embed'
        mha = MultiHeadAttention(4, 32, num_kv_heads=2, rngs=nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(mha, nnx.Param))
    assert specs["query"]["kernel"].get_value() == P("embed", "heads", "head_dim")
    assert specs["out"]["kernel"].get_value() == P("heads", "head_dim", "embed")
    assert specs["out"]["bias"].get_value() == P("embed")
    with pytest.raises(ValueError, match=r"unknown logical axis name 'embd'; expected one of"):
        axes.names("embd", "mlp")


def _mha_specs(parallelism, mesh_shape):
    mesh = AbstractMesh(mesh_shape, MESH_AXES[parallelism])
    mha = nnx.eval_shape(lambda: MultiHeadAttention(4, 32, num_kv_heads=2, rngs=nnx.Rngs(0)))
    out = {}
    for layer in ("query", "key", "out"):
        for kind in ("kernel", "bias"):
            param = getattr(getattr(mha, layer), kind)
            names = param.get_metadata()["out_sharding"]
            out[f"{layer}.{kind}"] = mesh_spec(names, param.shape, RULES[parallelism], mesh)
    return out


def test_rules_give_each_strategy_its_layout_of_attention_kernels():
    # query [D=32, N=4, H=8], key [32, K=2, 8], out [4, 8, 32]
    assert set(_mha_specs("data", (8,)).values()) == {P()}
    assert _mha_specs("fsdp", (8,)) == {  # the largest axis 8 divides
        "query.kernel": P("data"),
        "query.bias": P(None, "data"),  # [4, 8]: 8 does not divide 4
        "key.kernel": P("data"),
        "key.bias": P(None, "data"),
        "out.kernel": P(None, None, "data"),
        "out.bias": P("data"),
    }
    assert _mha_specs("tensor", (2, 4)) == {  # heads over 'model' where 4 divides them
        "query.kernel": P(None, "model"),
        "query.bias": P("model"),
        "key.kernel": P(),  # K=2 key/value heads stay whole
        "key.bias": P(),
        "out.kernel": P("model"),
        "out.bias": P(),
    }
    assert set(_mha_specs("sequence", (2, 4)).values()) == {P()}
    mesh = AbstractMesh((2, 4), ("data", "seq"))
    batch = {"src": jax.ShapeDtypeStruct((8, 32), "int32")}
    batch["tgt"] = jax.ShapeDtypeStruct((8, 11), "int32")
    specs = {k: s.spec for k, s in batch_shardings(batch, mesh, RULES["sequence"]).items()}
    assert specs == {"src": P("data", "seq"), "tgt": P("data")}  # 4 does not divide 11
    # a mesh axis splits one axis of an array, never two: the largest it divides
    fsdp_mesh = AbstractMesh((8,), ("data",))
    assert mesh_spec(("mlp", "mlp"), (16, 48), RULES["fsdp"], fsdp_mesh) == P(None, "data")
    assert mesh_spec(("mlp", "mlp"), (16, 12), RULES["fsdp"], fsdp_mesh) == P("data")


def _config(parallelism="data", mesh_shape=(), **train):
    config = load_config("copy", "small")
    config.train.update(parallelism=parallelism, mesh_shape=mesh_shape, **train)
    return config


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (_config("pipeline"), "config.train.parallelism must be one of ['data', 'fsdp', 'tensor', 'sequence'], got 'pipeline' (str)"),  # noqa: E501
        (_config(mesh_shape=(0,)), "config.train.mesh_shape must be a tuple of positive ints (one of them may be -1), got (0,) (tuple)"),  # noqa: E501
        (_config("tensor", (1, 1, 1)), "config.train.mesh_shape=(1, 1, 1) has 3 sizes, but parallelism 'tensor' has the mesh axes ('data', 'model'): give one size each"),  # noqa: E501
        (_config("sequence", (-1, -1)), "config.train.mesh_shape=(-1, -1) has more than one -1"),
        (_config("tensor", (2, 1)), "config.train.mesh_shape=(2, 1) has 2 devices, but the run has 1: make their product 1, use -1 for one size, or set num_devices"),  # noqa: E501
        (_config("fsdp", (2, -1)), "config.train.mesh_shape=(2, -1) has 2 sizes, but parallelism 'fsdp' has the mesh axes ('data',): give one size each"),  # noqa: E501
        (_config("tensor", (3, -1)), "config.train.mesh_shape=(3, -1): its other sizes make 3 devices, which do not divide the run's 1"),  # noqa: E501
    ],
)  # fmt: skip
def test_bad_mesh_fields_fail_with_the_field_and_reason(config, message):
    with pytest.raises(ValueError) as e:
        train_lib.validate_config(config)
    assert str(e.value) == message


def test_mesh_fields_default_to_todays_data_parallel_run():
    cfg = load_config("copy", "small").to_dict()
    del cfg["train"]["parallelism"], cfg["train"]["mesh_shape"]  # configs of older versions
    train_lib.validate_config(ConfigDict(cfg))
    assert train_lib._mesh(cfg).axis_names == ("data",)


def test_distributed_arguments_are_checked_before_jax_sees_them(monkeypatch):
    for env in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(env, raising=False)
    assert initialize_distributed() is False  # one process: nothing to do
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID\); missing: process_id$"):
        initialize_distributed("127.0.0.1:1234", 2)
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"^process_id=2 must be in \[0, num_processes=2\)$"):
        initialize_distributed("127.0.0.1:1234", 2)
    monkeypatch.setenv("JAX_PROCESS_ID", "one")
    with pytest.raises(ValueError, match=r"^process_id must be an int, got 'one'$"):
        initialize_distributed("127.0.0.1:1234", 2)


SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile
    from pathlib import Path
    import jax
    from jax.sharding import PartitionSpec as P
    sys.path.insert(0, sys.argv[1])
    from _train_utils import load_config, train_losses, train_step_compiles
    import jattn.train as train_lib
    from jattn.training import read_metrics

    compiles = train_step_compiles()

    layouts = {}  # what the train step returns: the state's and the batch's layout
    sharded_train_step = train_lib.sharding.sharded_train_step
    def spy(*args, **kwargs):
        step = sharded_train_step(*args, **kwargs)
        def run(state, batch, lr):
            state, metrics = step(state, batch, lr)
            enc = state.params["encoder"]["layers"][0]
            mu = state.opt_state[1][0].mu["encoder"]["layers"][0]
            rules = kwargs["rules"]
            strategy = next(k for k, v in train_lib.sharding.RULES.items() if v == rules)
            def spec(x):  # trailing unsplit axes dropped (Explicit meshes list them)
                entries = list(x.sharding.spec)
                while entries and entries[-1] is None:
                    entries.pop()
                return str(P(*entries))
            layouts[f"{strategy}:{kwargs['mesh'].size}"] = {
                "query": spec(enc["self_attention"]["query"]["kernel"]),
                "query_mu": spec(mu["self_attention"]["query"]["kernel"]),
                "mlp": spec(enc["mlp"]["linear1"]["kernel"]),
                "src": spec(batch["src"]),
                "explicit": all(str(t) == "AxisType.Explicit" for t in kwargs["mesh"].axis_types),
            }
            return state, metrics
        run._cache_size = step._cache_size
        return run
    train_lib.sharding.sharded_train_step = spy

    def config(parallelism="data", mesh_shape=(), num_devices=0, stop=3, batch_size=8):
        cfg = load_config("dates", "small")
        cfg.train.update(num_steps=8, stop_after_steps=stop, num_devices=num_devices,
                         parallelism=parallelism, mesh_shape=mesh_shape, batch_size=batch_size)
        cfg.eval.update(num_samples=0, num_heatmaps=0)  # generation is tested elsewhere
        return cfg

    out = {"device_count": jax.device_count(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [  # (name, workdir, config)
            ("one", "one", config(num_devices=1, stop=0)),  # all 8 steps, evaluated
            ("data", "data", config(stop=0)),  # data parallel over all 8 devices
            ("data_stopped", "data_run", config(stop=4)),  # stopped, resumed on 8 devices
            ("data_resumed", "data_run", config(stop=0)),
            ("fsdp", "fsdp", config("fsdp")),  # saves its state, split over 8, at step 3
            ("tensor", "tensor", config("tensor", (4, 2))),
            ("sequence", "sequence", config("sequence", (-1, 2))),
            ("resumed_on_one", "fsdp", config(num_devices=1, stop=6)),
        ]
        for name, where, cfg in runs:
            workdir = Path(tmp) / where
            result = train_lib.train_and_evaluate(cfg, str(workdir))
            out["runs"][name] = {
                "losses": train_losses(read_metrics(workdir / "metrics.jsonl")),
                "step": result["step"],
                "eval": result.get("eval"),
            }
    out["layouts"] = layouts
    out["compiles"] = compiles
    errors = {}
    for name, cfg in [("tensor_batch", config("tensor", (4, 2), batch_size=6)),
                      ("batch", config(batch_size=12)), ("devices", config(num_devices=9))]:
        try:
            train_lib.validate_config(cfg)
        except ValueError as e:
            errors[name] = str(e)
    out["errors"] = errors
    print("RESULT " + json.dumps(out))
    """
)


def _run(argv, env, timeout=600):
    return subprocess.run(
        argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout, check=False
    )


def _result(proc) -> dict:
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def _close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= RTOL * abs(b[k]) for k in a)


@pytest.mark.slow
def test_sharded_runs_train_like_one_device_and_resume_on_another_count():
    env = device_env(8)
    out = _result(_run([sys.executable, "-c", SCRIPT, str(ROOT / "tests")], env))
    assert out["device_count"] == 8
    runs = out["runs"]
    one = runs["one"]["losses"]
    assert sorted(one, key=int) == [str(s) for s in range(1, 9)]
    # Data parallel over 8 devices: only the order of the gradient sum differs.
    data = runs["data"]
    assert data["step"] == 8 and _close(data["losses"], one), data
    assert abs(data["eval"]["loss"] - runs["one"]["eval"]["loss"]) <= RTOL * data["eval"]["loss"]
    assert data["eval"]["token_accuracy"] == runs["one"]["eval"]["token_accuracy"]
    # Stopped at 4 and resumed on 8 devices: the same losses as the uninterrupted run.
    assert runs["data_stopped"]["step"] == 4 and runs["data_resumed"]["step"] == 8
    assert runs["data_resumed"]["losses"] == data["losses"]
    first = {k: v for k, v in one.items() if int(k) <= 3}
    for name in ("fsdp", "tensor", "sequence"):
        assert runs[name]["step"] == 3 and _close(runs[name]["losses"], first), (name, runs)
    # Saved split over 8 devices (fsdp), resumed on 1: the same continued losses.
    assert runs["resumed_on_one"]["step"] == 6
    six = {k: v for k, v in one.items() if int(k) <= 6}
    assert _close(runs["resumed_on_one"]["losses"], six), runs["resumed_on_one"]
    # The state (parameters and Adam moments) and the batch as the rules lay them out:
    # encoder query kernel [16, 2, 8], MLP kernel [16, 32], source tokens [8, 32].
    assert out["layouts"] == {
        "data:1": {"query": "P()", "query_mu": "P()", "mlp": "P()", "src": "P('data',)",
                   "explicit": False},
        "data:8": {"query": "P()", "query_mu": "P()", "mlp": "P()", "src": "P('data',)",
                   "explicit": False},
        "fsdp:8": {"query": "P('data',)", "query_mu": "P('data',)", "mlp": "P(None, 'data')",
                   "src": "P('data',)", "explicit": False},
        "tensor:8": {"query": "P(None, 'model')", "query_mu": "P(None, 'model')",
                     "mlp": "P(None, 'model')", "src": "P('data',)", "explicit": False},
        # an Explicit mesh: the attention layers see the source sharded along the sequence
        "sequence:8": {"query": "P()", "query_mu": "P()", "mlp": "P()", "src": "P('data', 'seq')",
                       "explicit": True},
    }  # fmt: skip
    # One XLA compilation per layout; the resumed runs reuse theirs (8-device data
    # parallel; the one-device step).
    assert len(out["compiles"]) == 5, out["compiles"]
    errors = out["errors"]
    assert errors["batch"] == (
        "config.train.batch_size=12 must be a multiple of the 8 devices it is split over "
        "(all local devices); change it, or set config.train.num_devices"
    )
    assert errors["devices"] == (
        "config.train.num_devices=9, but this process has only 8 local cpu device(s)"
    )
    assert errors["tensor_batch"] == (
        "config.train.batch_size=6 must be a multiple of 4, the size of the mesh axis 'data' "
        "it is split over (config.train.mesh_shape=(4, 2), axes ('data', 'model')); change "
        "either"
    )


PROCESS = textwrap.dedent(
    """
    import json, sys
    import jax
    port, process_id, workdir, *overrides = sys.argv[1:]
    # jattn's import creates arrays (jattn/functional/blocked.py), which starts the
    # backend: initialise first; train.main's own initialize_distributed then sees it done
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
    import jattn.train
    jattn.train.main(["--config", "dates:small", "--workdir", workdir, "--num_processes", "2",
                      "--process_id", process_id, "--coordinator_address", f"127.0.0.1:{port}",
                      *overrides])
    print("RESULT " + json.dumps({"processes": jax.process_count(), "devices": jax.device_count()}))
    """
)

_OVERRIDES = {
    "parallelism": "fsdp",
    "num_steps": 6,
    "checkpoint_every": 2,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_on_one(tmp_path):
    """Two processes (one CPU device each, jax.distributed on the loopback address) train
    4 of 6 steps with the state split over both (fsdp) and stop; this process (one
    device) resumes their checkpoint and finishes: the losses and the evaluation are
    those of one process running all 6 steps."""
    config = load_config("dates", "small")
    config.train.update(**_OVERRIDES)
    config.eval.update(num_samples=0, num_heatmaps=0)
    train_lib.train_and_evaluate(config, str(tmp_path / "one"))

    env = device_env(None)  # one CPU device each
    overrides = [f"--config.train.{k}={v}" for k, v in _OVERRIDES.items()]
    overrides += ["--config.compilation_cache_dir=", "--config.eval.num_samples=0"]
    overrides += ["--config.eval.num_heatmaps=0", "--config.train.stop_after_steps=4"]
    port, workdir = _free_port(), tmp_path / "two"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PROCESS, str(port), str(i), str(workdir), *overrides],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for i in range(2)
    ]
    try:
        done = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (stdout, stderr) in zip(procs, done, strict=True):
        lines = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
        assert p.returncode == 0 and lines, stderr[-3000:]
        assert json.loads(lines[-1][len("RESULT ") :]) == {"processes": 2, "devices": 2}
    two = read_metrics(workdir / "metrics.jsonl")
    assert sorted(train_losses(two)) == [1, 2, 3, 4]  # process 0 alone wrote them
    assert not [r for r in two if r["split"] == "eval"]  # stopped: no evaluation yet
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]  # saved by both
    assert json.loads((workdir / "config.json").read_text())["train"]["parallelism"] == "fsdp"

    resumed = train_lib.train_and_evaluate(config, str(workdir))  # here, on one device
    assert resumed["step"] == 6 and resumed["interrupted"] is None
    one, two = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("one", "two"))
    assert sorted(train_losses(two)) == [1, 2, 3, 4, 5, 6]
    assert _close(train_losses(two), train_losses(one))
    (eval_one,), (eval_two,) = ([r for r in m if r["split"] == "eval"] for m in (one, two))
    assert abs(eval_two["loss"] - eval_one["loss"]) <= RTOL * eval_one["loss"]
    assert eval_two["token_accuracy"] == eval_one["token_accuracy"]
