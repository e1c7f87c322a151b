"""The training program: end-to-end small run, loss and metrics vs references, config errors,
the command line and a loss that stops being finite."""

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _train_utils import ROOT, load_config, train_losses
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from ml_collections import ConfigDict

import jattn.train as train_lib
from jattn.training import bleu, exact_match, masked_cross_entropy, read_metrics, validate
from jattn.training.checkpoint import Checkpointer
from jattn.training.config_files import apply_overrides
from jattn.training.metrics import token_accuracy_counts


def test_small_run_writes_metrics_checkpoints_and_heatmaps(tmp_path, capsys, monkeypatch):
    config = load_config("dates", "small")
    result = train_lib.train_and_evaluate(config, str(tmp_path))
    n = config.train.num_steps
    assert result["step"] == n and result["interrupted"] is None
    assert result["train_step_compiles"] == 1  # one compile, no recompiles after step 1
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert sorted(train_losses(records)) == list(range(1, n + 1))
    assert all(np.isfinite(r["loss"]) for r in records)
    assert all(r["tokens_per_s"] > 0 for r in records if r["split"] == "train")
    (final,) = [r for r in records if r["split"] == "eval"]
    assert final["step"] == n and 0.0 <= final["exact_match"] <= 1.0
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} == {"3", "6"}
    (png,) = result["heatmaps"]
    assert png.endswith("cross_attention_0.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "attention_explorer.html").read_text(encoding="utf-8")
    for layer in ("encoder/layers/0/self_attention", "decoder/layers/0/self_attention",
                  "decoder/layers/0/cross_attention"):  # fmt: skip
        assert f'"name":"{layer}"' in page
    out = capsys.readouterr().out
    assert "held-out (32 examples)" in out and "reference" in out

    # The checkpoint restores into a model that decodes as the final evaluation did.
    model = train_lib.restore_model(config, str(tmp_path))
    _, test_ds = train_lib.make_datasets(config)
    generated = np.asarray(model.generate(test_ds.src, max_len=test_ds.tgt.shape[1]))
    predictions = [test_ds.decode(row) for row in generated]
    tokenize = config.eval.bleu_tokenize
    assert bleu(predictions, test_ds.tgt_texts, tokenize=tokenize) == pytest.approx(
        final["bleu"], abs=1e-9
    )
    assert exact_match(predictions, test_ds.tgt_texts) == final["exact_match"]
    sizes = dict(src_vocab_size=test_ds.src_vocab_size, tgt_vocab_size=test_ds.tgt_vocab_size)
    graphdef, fresh, _ = train_lib._initial_train_state(config.to_dict(), **sizes)
    trained = nnx.state(model, nnx.Param)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(fresh.params), strict=True)
    )

    # The workdir alone restores the same model, from its config.json: no data set built.
    def no_data(*args, **kwargs):
        raise AssertionError("restore_model(workdir) built the data set")

    monkeypatch.setattr(train_lib, "make_task", no_data)
    alone = train_lib.restore_model(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(alone, nnx.Param), trained)
    again = alone.generate(test_ds.src, max_len=test_ds.tgt.shape[1])
    np.testing.assert_array_equal(again, generated)  # the outputs the final eval scored
    monkeypatch.undo()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved.pop("data_sizes") == sizes
    (tmp_path / "config.json").write_text(json.dumps(saved))  # as older jattn versions wrote it
    older = train_lib.restore_model(tmp_path)  # the sizes from the saved config's data set
    jax.tree.map(np.testing.assert_array_equal, nnx.state(older, nnx.Param), trained)


def numpy_smoothed_ce(logits, labels, smoothing, pad_id=0):
    logits = logits.astype(np.float64)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    v = logits.shape[-1]
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if labels[b, t] == pad_id:
                continue
            target = np.full(v, smoothing / v)
            target[labels[b, t]] += 1.0 - smoothing
            total += -(target * logp[b, t]).sum()
            count += 1
    return total / count, count


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_masked_label_smoothed_loss_matches_numpy(smoothing):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32) * 3
    labels = rng.integers(1, 7, size=(3, 5)).astype(np.int32)
    labels[0, 3:] = 0
    labels[2, 1:] = 0
    loss, count = masked_cross_entropy(logits, labels, label_smoothing=smoothing)
    ref, ref_count = numpy_smoothed_ce(logits, labels, smoothing)
    assert int(count) == ref_count == 9
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    # padding logits do not matter
    logits2 = logits.copy()
    logits2[labels == 0] = 100.0
    np.testing.assert_allclose(
        float(masked_cross_entropy(logits2, labels, label_smoothing=smoothing)[0]), float(loss)
    )
    with pytest.raises(ValueError, match=r"logits must be \[B, T, V\] and labels \[B, T\]"):
        masked_cross_entropy(logits, labels[:, :4])


def test_loss_ignores_what_padding_holds_and_banned_classes():
    """NaN/inf logits at padding positions and a -inf logit on a class that is not the
    label (a banned token) leave the loss and its gradient finite and exact."""
    labels = jnp.array([[3, 0, 1]])  # position 1 is PAD
    logits = jnp.zeros((1, 3, 5)).at[0, 1].set(jnp.nan).at[0, 2, 4].set(-jnp.inf)
    loss, grad = jax.value_and_grad(lambda x: masked_cross_entropy(x, labels)[0])(logits)
    np.testing.assert_allclose(loss, (np.log(5.0) + np.log(4.0)) / 2, rtol=1e-6)
    assert np.all(np.isfinite(grad)) and np.all(grad[0, 1] == 0) and grad[0, 2, 4] == 0
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\) or pad_id=0, got \[-1, 5\]"):
        masked_cross_entropy(jnp.zeros((1, 3, 5)), jnp.array([[5, -1, 0]]))
    with pytest.raises(ValueError, match=r"label_smoothing must be a float in \[0, 1\)"):
        masked_cross_entropy(logits, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"logits must be \[B, T, V\] and labels \[B, T\]"):
        token_accuracy_counts(jnp.zeros((2, 3, 4)), jnp.ones((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="bleu needs at least one reference"):
        bleu([], [])


def test_token_accuracy_exact_match_and_bleu_by_hand():
    logits = np.zeros((2, 3, 4), np.float32)
    # predictions: [[1, 2, 3], [3, 3, 0]]
    for b, row in enumerate([[1, 2, 3], [3, 3, 0]]):
        for t, k in enumerate(row):
            logits[b, t, k] = 1.0
    labels = np.array([[1, 2, 1], [3, 0, 0]], np.int32)  # 4 real tokens, 3 right
    correct, total = token_accuracy_counts(logits, labels)
    assert (int(correct), int(total)) == (3, 4)
    assert exact_match(["a", "bc", "d"], ["a", "bd", "d"]) == pytest.approx(2 / 3)
    assert bleu(["2021-03-03", "1999-12-31"], ["2021-03-03", "1999-12-31"]) == pytest.approx(100.0)
    assert bleu(["xyz"], ["2021-03-03"]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], ["a"])


def _config_with(section, key, value):
    cfg = load_config("copy", "small").to_dict()
    cfg[section][key] = value
    return ConfigDict(cfg)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("train", "num_stepz", 3, r"unknown field config.train.num_stepz \(did you mean "),
        ("train", "num_steps", "ten", r"config.train.num_steps must be a positive int, got 'ten'"),
        ("train", "batch_size", 0, r"config.train.batch_size must be a positive int, got 0"),
        ("train", "learning_rate", -1.0, r"config.train.learning_rate must be a finite number > 0"),
        ("train", "learning_rate", float("inf"), r"learning_rate must be a finite number > 0"),
        ("train", "weight_decay", float("nan"), r"weight_decay must be a finite number >= 0"),
        ("train", "warmup_steps", 6, r"warmup_steps=6 must be less than config.train.num_steps=6"),
        ("train", "decay", "step", r"config.train.decay must be one of \['cosine', 'linear'\]"),
        ("train", "label_smoothing", 1.0, r"config.train.label_smoothing must be a number in"),
        ("eval", "beam_size", 0, r"config.eval.beam_size must be a positive int"),
        ("model", "features", 17, r"features=17 must be divisible by config.model.num_heads=2"),
        ("model", "num_heads", -2, r"config.model.num_heads must be a positive int, got -2"),
        ("model", "mlp_features", 2.5, r"config.model.mlp_features must be a positive int"),
        ("model", "dropout_rate", 1.5, r"config.model.dropout_rate must be a number in \[0, 1\)"),
        ("model", "name", "lstm", r"config.model.name: unknown model 'lstm'"),
        ("model", "layer_norm_eps", -1.0, r"layer_norm_eps must be a finite number > 0, got -1"),
        ("model", "pre_norm", "yes", r"config.model.pre_norm must be True or False, got 'yes'"),
        ("model", "pad_id", 5, r"config.model.pad_id=5 must be 0, the id the data uses"),
        ("model", "max_len", 4, r"config.model.max_len=4 is shorter than the task's sequences"),
        ("task", "name", "dates2", r"config.task.name: unknown task 'dates2'"),
        ("task", "num_train", 0, r"config.task.num_train must be a positive int, got 0"),
        ("train", "num_devices", -1, r"config.train.num_devices must be an int >= 0, got -1"),
        ("train", "num_devices", 2, r"config.train.num_devices=2, but this process has only 1"),
    ],
)
def test_bad_configs_fail_with_the_field_and_reason(tmp_path, section, key, value, message):
    config = _config_with(section, key, value)
    with pytest.raises(ValueError, match=message):
        train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # failed before anything was written


def test_a_seed_past_2_to_the_32_fails_with_the_field(tmp_path):
    config = load_config("copy", "small")
    config.seed = 2**63 - 1  # the dropout stream (seed + 1) would overflow int64
    with pytest.raises(ValueError, match=r"config.seed must be an int in \[0, 2\*\*32\)"):
        train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def _workdir_with_a_checkpoint(path, config, step):
    """A workdir as a run of ``config`` leaves it, with a (stand-in) checkpoint at ``step``."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config.to_dict()))
    ckpt = Checkpointer(path / "checkpoints", max_to_keep=2)
    ckpt.save(step, {"x": np.zeros(2, np.float32)})
    ckpt.wait()
    ckpt.close()


def test_resuming_under_another_model_or_past_num_steps_fails_before_restoring(tmp_path):
    config = load_config("copy", "small")
    _workdir_with_a_checkpoint(tmp_path / "run", config, step=8)
    saved = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(ValueError, match=r"holds step 8, past config.train.num_steps=6"):
        train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    config.train.num_steps = 20
    config.model.features = 32
    config.seed = 1
    with pytest.raises(
        ValueError,
        match=r"another config \(config.seed: 0 -> 1; config.model.features: 16 -> 32\): "
        "resume with the same seed, task and model",
    ):
        train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    assert (tmp_path / "run" / "config.json").read_text() == saved  # still the saved run's


def test_restore_model_names_the_missing_checkpoint(tmp_path):
    config = load_config("copy", "small")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        train_lib.restore_model(config, str(tmp_path / "nowhere"))
    assert not (tmp_path / "nowhere").exists()
    _workdir_with_a_checkpoint(tmp_path / "run", config, step=8)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 5 in .*; it has \[8\]"):
        train_lib.restore_model(config, str(tmp_path / "run"), step=5)


def test_a_model_max_len_equal_to_the_targets_trains_and_draws_heatmaps(tmp_path):
    """The decoder reads exactly ``tgt.shape[1]`` tokens (BOS + targets), also when the
    heatmaps feed back the model's own predictions."""
    config = load_config("copy", "small")
    train_ds, test_ds = train_lib.make_datasets(config)
    config.model.max_len = max(ds.shape[1] for ds in (train_ds.src, train_ds.tgt, test_ds.tgt))
    config.train.update(num_steps=3)
    result = train_lib.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 3 and len(result["heatmaps"]) == 1


def test_optional_fields_may_be_left_out():
    cfg = load_config("copy", "small").to_dict()
    del cfg["train"]["num_devices"]  # configs written before the field existed
    train_lib.validate_config(ConfigDict(cfg))


def test_options_the_model_or_task_rejects_fail_before_training(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"unknown field config.model.heads of model 'transformer' \(did you mean "
        r"'num_heads'\?\); known fields: .*layer_norm_eps, ",
    ):
        train_lib.train_and_evaluate(_config_with("model", "heads", 2), str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"config.task: task 'copy' has no option 'digits'"):
        train_lib.train_and_evaluate(_config_with("task", "digits", 2), str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_locked_config_rejects_unknown_fields_and_wrong_types():
    # config files are loaded locked (config_flags lock_config=True), so command-line
    # overrides of unknown fields or with the wrong type fail before training
    config = load_config("dates", "small")
    with pytest.raises(AttributeError, match="num_stepz"):
        config.train.num_stepz = 3
    with pytest.raises(TypeError, match="int"):
        config.train.num_steps = "ten"


def test_restore_model_from_a_workdir_with_an_empty_checkpoints_folder(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*checkpoints$"):
        train_lib.restore_model(load_config("copy", "small"), str(tmp_path / "run"))


def test_restore_model_from_the_workdir_alone_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        train_lib.restore_model(tmp_path / "nowhere")
    config = load_config("copy", "small")
    _workdir_with_a_checkpoint(tmp_path / "run", config, step=8)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    for key, bad in [("data_sizes", [13, 13]), ("vocab_sizes", {"src_vocab_size": 0})]:
        saved.pop("data_sizes", None)
        (tmp_path / "run" / "config.json").write_text(json.dumps({**saved, key: bad}))
        with pytest.raises(ValueError, match=rf"its '{key}' is not a mapping of positive sizes"):
            train_lib.restore_model(tmp_path / "run")
    (tmp_path / "run" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config.json: .* pass the config"):
        train_lib.restore_model(tmp_path / "run")
    with pytest.raises(TypeError, match=r"restore_model\(config, workdir\): workdir is missing"):
        train_lib.restore_model(config)


# ------------------------------------------------------------ a loss that is not finite


def _schedule_that_blows_up_after(good_steps):
    """A learning rate of 1e-3, then inf from step ``good_steps + 1`` on: that update
    makes the parameters inf/NaN, and the next step's loss NaN."""

    def schedule(*args, **kwargs):
        return lambda step: 1e-3 if step < good_steps else np.inf

    return schedule


@pytest.mark.parametrize(
    ("checkpoint_every", "message", "kept"),
    [
        # logged every step: step 5's loss is the first NaN; the checkpoint at 3 is good
        (3, r"the training loss became nan at step 5; training stopped without saving", [3]),
        # the save at step 4 finds its parameters non-finite (its loss was finite)
        (2, r"the parameters became NaN or infinite in the update of step 4 \(its loss", [2]),
    ],
)
def test_a_loss_that_stops_being_finite_stops_the_run_at_its_step(
    tmp_path, monkeypatch, checkpoint_every, message, kept
):
    monkeypatch.setattr(train_lib, "learning_rate_schedule", _schedule_that_blows_up_after(3))
    config = load_config("dates", "small")
    config.train.update(checkpoint_every=checkpoint_every, log_every=1)
    with pytest.raises(FloatingPointError, match=message) as e:
        train_lib.train_and_evaluate(config, str(tmp_path))
    where = f"the last good checkpoint is step {kept[-1]} in {tmp_path / 'checkpoints'}"
    assert where in str(e.value) and "Lower config.train.learning_rate" in str(e.value)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == kept
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert all(np.isfinite(r["loss"]) for r in records)  # the NaN record is not written
    if checkpoint_every == 3:
        monkeypatch.undo()  # a sane learning rate: the same command resumes from step 3
        config.train.stop_after_steps = 5
        assert train_lib.train_and_evaluate(config, str(tmp_path))["step"] == 5
        assert sorted(train_losses(read_metrics(tmp_path / "metrics.jsonl"))) == [1, 2, 3, 4, 5]


def test_a_loss_that_is_nan_before_the_first_checkpoint_says_so(tmp_path):
    """A learning rate far too high (a real config, nothing patched)."""
    config = load_config("dates", "small")
    config.train.update(learning_rate=1e30, log_every=100)
    with pytest.raises(FloatingPointError, match=r"at step \d; .*no checkpoint was saved"):
        train_lib.train_and_evaluate(config, str(tmp_path))
    assert list((tmp_path / "checkpoints").iterdir()) == []


# ------------------------------------------------------------ configs by name, the command line


def test_configs_load_by_name_as_by_path(tmp_path):
    for name in ("dates", "copy", "bahdanau_dates"):
        by_path = train_lib.load_config(ROOT / "configs" / f"{name}.py", "small")
        assert train_lib.load_config(name, "small").to_dict() == by_path.to_dict()
    with pytest.raises(ValueError, match=r"unknown config 'date'; the shipped configs are "):
        train_lib.load_config("date")
    with pytest.raises(FileNotFoundError, match=r"no config file nope.py; .*: bahdanau_dates, "):
        train_lib.load_config("nope.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match=r"empty.py defines no get_config\(arg=None\)"):
        train_lib.load_config(tmp_path / "empty.py")


def _main(monkeypatch, capsys, *args):
    """``jattn-train ARGS`` in this process, training replaced by recording the config:
    ``(exit code, stdout + stderr, config)``."""
    seen = {}

    def record(config, workdir):
        seen.update(config=config, workdir=workdir)
        return {"interrupted": None}

    monkeypatch.setattr(train_lib, "_prepare", lambda config: config)  # what _train gets
    monkeypatch.setattr(train_lib, "_train", record)
    monkeypatch.setattr(sys, "argv", ["jattn-train", *args])
    code = 0
    try:
        train_lib.main()
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err, seen.get("config")


def test_command_line_help_lists_the_configs_and_missing_flags_are_named(monkeypatch, capsys):
    code, out, _ = _main(monkeypatch, capsys, "--help")
    assert code == 0
    for name in ("--config", "--workdir", "--config.FIELD=VALUE", "dates", "bahdanau_dates"):
        assert name in out
    assert "Date translation" in out  # each config with its summary
    code, out, _ = _main(monkeypatch, capsys, "--config", "dates")
    assert code == 2 and "the following arguments are required: --workdir" in out


def test_command_line_configs_by_name_and_path_and_model_options(monkeypatch, capsys, tmp_path):
    no_cache = "--config.compilation_cache_dir="
    w = str(tmp_path / "w")
    args = ["--config", "dates:small", "--workdir", w, no_cache, "--config.train.num_steps", "9"]
    code, _, config = _main(monkeypatch, capsys, *args, "--config.model.layer_norm_eps=1e-6")
    assert code == 0 and config.train.num_steps == 9 and config.is_locked
    assert config.model.layer_norm_eps == 1e-6  # a Transformer option dates.py leaves out
    code, _, by_path = _main(monkeypatch, capsys, "--config", "configs/dates.py:small",
                             "--workdir", w, no_cache)  # fmt: skip
    assert code == 0 and by_path.train.num_steps == 6  # relative to the current directory
    mine = tmp_path / "my.py"
    mine.write_text(
        "from jattn.train import load_config\n\n"
        "def get_config(arg=None):\n"
        "    config = load_config('copy', 'small')\n"
        "    config.seed = int(arg)\n"
        "    return config\n"
    )
    code, _, own = _main(monkeypatch, capsys, "--config", f"{mine}:7", "--workdir", w, no_cache)
    assert code == 0 and own.seed == 7 and own.task.name == "copy"
    monkeypatch.chdir(tmp_path)  # a shipped config by name from any directory
    code, _, config = _main(monkeypatch, capsys, "--config", "copy", "--workdir", w, no_cache)
    assert code == 0 and config.train.num_steps == 600


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config.foo=1"], r"unknown field config.foo \(in --config.foo\); known fields: "),
        (["--config.model.nonsense=3"], r"unknown field config.model.nonsense .*layer_norm_eps"),
        (["--config.train.num_steps=ten"], r"config.train.num_steps must be an int, got 'ten'"),
        (["--config.model.pre_norm=maybe"], r"config.model.pre_norm must be True or False"),
        (["--config.train.batch_size=0"], r"config.train.batch_size must be a positive int"),
        (["--config.model.name=lstm"], r"config.model.name: unknown model 'lstm'"),
        (["--config", "date"], r"unknown config 'date'; the shipped configs are bahdanau_dates"),
        (  # was a FileNotFoundError's traceback
            ["--config.compilation_cache_dir=/dev/null/cache"],
            r"config.compilation_cache_dir='/dev/null/cache': Not a directory "
            r"\(--config.compilation_cache_dir= runs without the cache\)",
        ),
    ],
)
def test_command_line_errors_name_the_field_and_exit_2(
    monkeypatch, capsys, tmp_path, args, message
):
    if args[0] != "--config":
        args = ["--config", "dates", *args]
    code, out, config = _main(monkeypatch, capsys, *args, "--workdir", str(tmp_path / "w"))
    assert code == 2 and config is None
    assert re.search(message, out), out


@pytest.mark.parametrize(
    ("override", "message"),
    [  # a str where a function or module goes: a TypeError at the first step, mid-run
        (
            "attention_fn=foo",
            "attention_fn must be a function attention_fn(q, k, v, bias, "
            "mask, **kwargs) or None, got 'foo' (a str)",
        ),
        (
            "score=xyz",
            "score must be a jattn.layers.Score, a factory score(num_heads, "
            "head_dim, *, rngs) or None, got 'xyz' (a str)",
        ),  # was: 'str' object
    ],  # fmt: skip
)
def test_model_options_of_the_wrong_kind_are_usage_errors(
    monkeypatch, capsys, tmp_path, override, message
):
    monkeypatch.setattr(train_lib, "_train", lambda config, workdir: pytest.fail("trained"))
    argv = ["--config", "dates:small", "--workdir", str(tmp_path), f"--config.model.{override}"]
    monkeypatch.setattr(sys, "argv", ["jattn-train", *argv])
    with pytest.raises(SystemExit) as e:
        train_lib.main()
    assert e.value.code == 2
    assert f"--config dates:small: config.model: {message}" in capsys.readouterr().err


# Fields of the dates config (and options of its model), for the generated inputs below.
_DATES = train_lib.load_config("dates").to_dict()
_KNOWN = {
    "": set(_DATES),
    "train": set(_DATES["train"]),
    "eval": set(_DATES["eval"]),
    "task": set(_DATES["task"]),
    "model": set(_DATES["model"]) | set(train_lib.model_options("transformer")),
}
_INT_FIELDS = [(s, k) for s in ("train", "eval") for k, v in _DATES[s].items() if type(v) is int]
_SCHEMA_INTS = [k for k, kind in validate.SCHEMAS["train"].items() if "int" in kind]


def _extra(section_path, section):
    return train_lib.model_options(section.name) if section_path == "model" else {}


@settings(max_examples=40, deadline=None)
@given(
    section=st.sampled_from(sorted(_KNOWN)),
    name=st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True),
)
def test_any_unknown_field_is_named_with_the_known_ones(section, name):
    if name in _KNOWN[section]:
        return
    path = f"{section}.{name}" if section else name
    with pytest.raises(ValueError) as e:
        apply_overrides(train_lib.load_config("dates"), [(path, "1")], extra_fields=_extra)
    assert f"unknown field config.{path} " in str(e.value) and "; known fields: " in str(e.value)


@settings(max_examples=40, deadline=None)
@given(field=st.sampled_from(_INT_FIELDS), text=st.text(max_size=8))
def test_any_value_of_the_wrong_type_is_named_with_the_field(field, text):
    try:
        int(text)
        return  # a valid int
    except ValueError:
        pass
    config = train_lib.load_config("dates")
    with pytest.raises(ValueError) as e:
        apply_overrides(config, [(".".join(field), text)], extra_fields=_extra)
    assert f"config.{'.'.join(field)} must be an int, got {text!r}" in str(e.value)


@settings(max_examples=40, deadline=None)
@given(
    field=st.sampled_from(_SCHEMA_INTS),
    value=st.one_of(st.integers(max_value=-1), st.floats(), st.booleans(), st.text(max_size=4)),
)
def test_validate_config_names_any_field_with_a_bad_value(field, value):
    cfg = train_lib.load_config("dates").to_dict()
    cfg["train"][field] = value
    with pytest.raises(ValueError, match=rf"config\.train\.{field} must be "):
        train_lib.validate_config(ConfigDict(cfg))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--config.model.positional=xyz", r"config.model: positional must be one of"),
        ("--config.model.max_len=4", r"config.model.max_len=4 is shorter than the task's"),
    ],
)
def test_command_line_model_option_errors_exit_2(monkeypatch, capsys, tmp_path, override, message):
    """Found by the model as it is built, not by the config's checks: they were a
    traceback (exit code 1); now a usage error naming the config, and no workdir files."""
    monkeypatch.setattr(sys, "argv", ["jattn-train", "--config", "copy:small", "--workdir",
                                      str(tmp_path / "run"), override])  # fmt: skip
    with pytest.raises(SystemExit) as info:
        train_lib.main()
    assert info.value.code == 2
    assert re.search(r"error: --config copy:small: " + message, capsys.readouterr().err)
    assert not list((tmp_path / "run").iterdir())  # checked and created, nothing written
