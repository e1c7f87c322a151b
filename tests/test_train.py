"""The training program: end-to-end small run, loss and metrics vs references, config errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _train_utils import load_config, train_losses
from flax import nnx
from ml_collections import ConfigDict

import jattn.train as train_lib
from jattn.training import bleu, exact_match, masked_cross_entropy, read_metrics
from jattn.training.checkpoint import Checkpointer
from jattn.training.metrics import token_accuracy_counts


def test_small_run_writes_metrics_checkpoints_and_heatmaps(tmp_path, capsys):
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
    graphdef, fresh, _ = train_lib._initial_train_state(config.to_dict(), test_ds)
    trained = nnx.state(model, nnx.Param)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(fresh.params), strict=True)
    )


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
        ("train", "num_stepz", 3, r"config.train.num_stepz is not a known field"),
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
    with pytest.raises(ValueError, match=r"config.model: .*unexpected keyword argument 'heads'"):
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
