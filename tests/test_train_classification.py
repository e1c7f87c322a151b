"""The training program on a classification task: a ViT on scikit-learn's digits.

The data against scikit-learn's own split, the augmentation against a hand-written
shift, the loss against NumPy, the config checks by message, and one small run (3
steps, then resumed to 6) whose logged test accuracy the restored model reproduces.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _layers import check_axis_names
from _train_utils import load_config, train_losses
from flax import nnx

import jattn.train as train_lib
from jattn.data import ClassificationDataset, digits_task, warp_images
from jattn.layers import ViT
from jattn.training import read_metrics
from jattn.training.state import PAD_LABEL, forward_loss


def test_digits_are_scikit_learns_example_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=0.5, shuffle=False
    )
    train, test = digits_task(max_shift=0)
    assert (len(train), len(test)) == (898, 899)
    np.testing.assert_array_equal(train.labels, y_train)
    np.testing.assert_array_equal(test.labels, y_test)
    np.testing.assert_allclose(train.inputs["images"][..., 0] * 16, x_train, rtol=1e-6)
    np.testing.assert_allclose(test.inputs["images"][..., 0] * 16, x_test, rtol=1e-6)
    assert train.model_sizes() == {"num_classes": 10, "image_size": [8, 8], "in_channels": 1}


def test_warp_images_shifts_exactly_and_turns_like_rot90():
    rng = np.random.default_rng(0)
    images = rng.random((3, 5, 4, 2)).astype(np.float32)
    shifts = np.array([[0, 0], [1, -2], [-1, 1]])
    square = rng.random((2, 4, 4, 1)).astype(np.float32)
    turned = warp_images(square, np.zeros((2, 2)), [90.0, 90.0], [1.0, 1.0])
    np.testing.assert_allclose(turned, np.rot90(square, -1, axes=(1, 2)), atol=1e-6)
    out = warp_images(images, shifts, np.zeros(3), np.ones(3))
    for img, (dr, dc), got in zip(images, shifts, out, strict=True):
        want = np.zeros_like(img)
        for r in range(5):
            for c in range(4):
                if 0 <= r - dr < 5 and 0 <= c - dc < 4:
                    want[r, c] = img[r - dr, c - dc]
        np.testing.assert_array_equal(got, want)


def test_warp_images_checks_one_value_per_image():
    """A scalar angle or a [2] shift was an IndexError, a batch mismatch a broadcast
    error, a scale of 0 or a NaN angle a black image with a RuntimeWarning."""
    images, zeros, ones = np.zeros((2, 4, 4, 1), np.float32), np.zeros(2), np.ones(2)
    for args, message in (
        ((np.zeros((2, 2)), 0.0, ones), r"angles must have shape \[2\] \(one per image\), got"),
        (([0, 0], zeros, ones), r"shifts must have shape \[2, 2\] \(one per image\), got \[2\]"),
        ((np.zeros((3, 2)), zeros, ones), r"shifts must have shape \[2, 2\]"),
        ((np.zeros((2, 2)), [0.0, np.nan], ones), r"angles must be finite, got nan"),
        ((np.zeros((2, 2)), zeros, [1.0, 0.0]), r"scales must be > 0, got 0.0"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            warp_images(images, *args)


def test_training_batches_are_a_function_of_seed_and_step():
    train, _ = digits_task(max_shift=1)
    a, b = train.sample_batch(0, 5, 8), train.sample_batch(0, 5, 8)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    c = train.sample_batch(0, 6, 8)
    assert not np.array_equal(a["images"], c["images"])
    plain, _ = digits_task(max_shift=0)
    d = plain.sample_batch(0, 5, 8)  # the same rows, unshifted
    np.testing.assert_array_equal(a["label"], d["label"])
    assert not np.array_equal(a["images"], d["images"])
    with pytest.raises(ValueError, match=r"max_shift must be an int in \[0, 4\), got 9"):
        digits_task(max_shift=9)


def test_dataset_checks_rows_and_labels():
    with pytest.raises(ValueError, match=r"inputs\['images'\] has 2 rows but there are 3 labels"):
        ClassificationDataset({"images": np.zeros((2, 4, 4, 1))}, np.zeros(3, np.int32), ("a",))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\), got \[0, 2\]"):
        ClassificationDataset({"x": np.zeros((2, 1))}, np.array([0, 2]), ("a", "b"))
    for labels in (np.array([0.5, 1.2]), np.zeros((2, 1), np.int32)):  # were class ids
        with pytest.raises(TypeError, match=r"labels must be \[N\] integer class ids, got "):
            ClassificationDataset({"x": np.zeros((2, 1))}, labels, ("a", "b"))
    ds = ClassificationDataset({"x": np.zeros((2, 1))}, [1, 0], ("a", "b"))  # a list: 'min'
    assert ds.labels.tolist() == [1, 0] and ds.batch(np.array([0]))["label"].tolist() == [1]


def test_classification_loss_matches_numpy_and_skips_padding_rows():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 5)).astype(np.float32)
    labels = np.array([2, 0, PAD_LABEL, 4], np.int32)

    def model(*, x, **_):
        return jnp.asarray(logits) + 0 * x.sum()

    batch = {"x": jnp.ones((4, 1)), "label": jnp.asarray(labels)}
    loss, count, correct, out = forward_loss(
        "classification", model, batch, label_smoothing=0.1, pad_id=0
    )
    lg = logits.astype(np.float64)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    keep = labels != PAD_LABEL
    target = np.full((4, 5), 0.1 / 5) + 0.9 * np.eye(5)[np.where(keep, labels, 0)]
    want = -(target * logp).sum(-1)[keep].mean()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(count) == 3
    assert int(correct) == int(np.sum((lg.argmax(-1) == labels) & keep))
    np.testing.assert_array_equal(out, logits)
    with pytest.raises(ValueError, match="unknown kind of task 'ranking'"):
        forward_loss("ranking", model, batch, label_smoothing=0.0, pad_id=0)


def test_configs_that_mix_kinds_are_named():
    config = load_config("vit_digits", "small")
    with config.unlocked():
        config.model.name = "transformer"
    with pytest.raises(ValueError, match=r"'transformer' is a seq2seq model, but task 'digits' "):
        train_lib.validate_config(config)
    config = load_config("dates", "small")
    with config.unlocked():
        config.model = load_config("vit_digits", "small").model
    with pytest.raises(ValueError, match=r"'vit' is a classification model, but task 'dates'"):
        train_lib.validate_config(config)
    config = load_config("vit_digits", "small")
    with config.unlocked():
        config.train.parallelism = "sequence"
    with pytest.raises(ValueError, match=r"parallelism='sequence' splits sequences"):
        train_lib.validate_config(config)


@pytest.mark.slow
def test_vit_digits_trains_resumes_and_restores(tmp_path):
    config = load_config("vit_digits", "small")
    with config.unlocked():
        config.train.stop_after_steps = 3
    first = train_lib.train_and_evaluate(config, str(tmp_path))
    assert first["interrupted"] == "stop_after_steps" and first["step"] == 3
    with config.unlocked():
        config.train.stop_after_steps = 0
    result = train_lib.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 6 and result["interrupted"] is None
    assert result["train_step_compiles"] == 1
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert sorted(train_losses(records)) == list(range(1, 7))
    assert all("examples_per_s" in r for r in records if r["split"] == "train")
    final = [r for r in records if r["split"] == "eval"][-1]
    assert final["step"] == 6 and set(final) >= {"loss", "accuracy"}
    assert result["eval"] == {k: final[k] for k in ("loss", "accuracy")}
    assert [p.rsplit("/", 1)[-1] for p in result["heatmaps"]] == ["rollout_0.png"]
    assert (tmp_path / "rollout_0.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["data_sizes"] == {"num_classes": 10, "image_size": [8, 8], "in_channels": 1}

    # the workdir alone restores the model that scored the logged accuracy
    model = train_lib.restore_model(tmp_path)
    assert isinstance(model, ViT)
    _, test = digits_task()
    logits = nnx.jit(lambda m, x: m(x, deterministic=True))(model, test.inputs["images"])
    accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == test.labels))
    np.testing.assert_allclose(accuracy, final["accuracy"], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------- the VQA toy


def _answer(cells, words):
    """The answer recomputed from the cells and the question's words."""
    if words[0] == "how":
        return int(np.sum(cells == int(words[2])))
    digit = int(words[4])
    (r,), (c,) = np.nonzero(cells == digit)  # exactly one
    dr, dc = {"left": (0, -1), "right": (0, 1), "above": (-1, 0), "below": (1, 0)}[words[2]]
    return int(cells[r + dr, c + dc])


def test_vqa_answers_follow_from_the_cells_and_the_question():
    from jattn.data import vqa

    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(300):
        cells, question, answer = vqa._example(rng, 3, 0.7)
        words = [vqa.QUESTION_WORDS[t] for t in question if t]
        kinds.add(words[2] if words[0] == "what" else "count")
        assert answer == _answer(cells, words), (cells, words, answer)
    assert kinds == {"left", "right", "above", "below", "count"}
    # a rendered cell holds its glyph (brightness >= 0.7 where the font is on) over noise
    cells = np.array([[[7, -1], [0, 7]]])
    image = vqa.render_cells(cells, np.random.default_rng(1))[0]
    assert image.shape == (16, 16) and image.min() >= 0 and image.max() <= 1
    for (r, c), digit in np.ndenumerate(cells[0]):
        cell = image[8 * r : 8 * r + 8, 8 * c : 8 * c + 8]
        if digit < 0:
            assert cell.max() <= 0.15
            continue
        on = vqa.GLYPHS[digit] > 0
        places = [(y, x) for y in range(4) for x in range(6)
                  if (cell[y : y + 5, x : x + 3][on] >= 0.7).all()]  # fmt: skip
        assert places, (r, c)
    train, test = vqa.vqa_task(num_train=40, num_test=10, seed=3)
    assert train.inputs["images"].shape == (40, 24, 24, 1)
    assert train.inputs["question"].shape == (40, 6) and len(test) == 10
    assert train.model_sizes() == {
        "num_classes": 10, "vocab_size": 21, "image_size": [24, 24], "in_channels": 1
    }  # fmt: skip
    again, _ = vqa.vqa_task(num_train=40, num_test=10, seed=3)
    np.testing.assert_array_equal(again.inputs["images"], train.inputs["images"])
    # training batches are fresh examples, a function of (seed, step)
    a, b, c = train.sample_batch(0, 5, 4), again.sample_batch(0, 5, 4), train.sample_batch(0, 6, 4)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a["images"], c["images"])
    assert a["images"].shape == (4, 24, 24, 1) and a["question"].shape == (4, 6)
    assert not any((a["images"] == x).all((1, 2, 3)).any() for x in train.inputs["images"])
    with pytest.raises(ValueError, match="grid must be 2 or 3"):
        vqa.vqa_task(grid=4)
    # a tiny fill: neighbour questions were drawn until one fitted, for hours
    with pytest.raises(ValueError, match=r"fill=0.001 leaves a 2x2 grid too few digits: none "):
        vqa.vqa_task(num_train=4, num_test=4, grid=2, fill=0.001)


def test_vqa_model_ignores_question_padding_and_checks_inputs():
    from jattn.models.vqa import CoAttentionVQA

    model = CoAttentionVQA(image_size=(16, 16), patch=8, in_channels=1, vocab_size=12,
                           num_classes=5, features=16, num_heads=2, num_layers=2,
                           mlp_features=32, max_question_len=8, stem_features=3,
                           rngs=nnx.Rngs(0))  # fmt: skip
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.random((3, 16, 16, 1)), jnp.float32)
    question = jnp.asarray([[3, 4, 5, 0], [6, 7, 0, 0], [8, 9, 10, 11]], jnp.int32)
    out = model(images, question)
    assert out.shape == (3, 5)
    padded = jnp.pad(question, ((0, 0), (0, 3)))  # more padding: the same answers
    np.testing.assert_allclose(model(images, padded), out, atol=1e-5)
    check_axis_names(lambda r: CoAttentionVQA(
        image_size=8, patch=4, in_channels=1, vocab_size=5, num_classes=2, features=8,
        num_heads=2, num_layers=1, mlp_features=8, stem_features=2, rngs=r))  # fmt: skip
    weights = model.question_to_image_weights(images, question)
    assert [w.shape for w in weights] == [(3, 2, 4, 4)] * 2
    np.testing.assert_allclose(np.sum(weights[0], -1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match=r"question has L=9 tokens, more than max_question_len=8"):
        model(images, jnp.ones((3, 9), jnp.int32))
    with pytest.raises(
        ValueError, match=r"question must be \[B, L\] token ids with the images' B=3"
    ):
        model(images, jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"images must be 16 x 16"):
        model(jnp.zeros((3, 8, 8, 1)), question)
    # ids outside the vocabulary were NaN answers (12) or the table read from its end
    # (-1), silently; a float question or a str was an error that did not name it
    for bad in (12, -1):
        vocab = rf"outside the vocabulary \[0, 12\): min {min(bad, 0)}, max {max(bad, 11)}"
        with pytest.raises(ValueError, match=rf"question holds token ids {vocab}"):
            model(images, question.at[0, 1].set(bad))
    for bad, what in ((question.astype(jnp.float32), "float32"), ("ab", "<U2")):
        with pytest.raises(
            ValueError, match=rf"question must be integer tokens \[B, L\], got {what}"
        ):
            model(images, bad)


@pytest.mark.slow
def test_vqa_toy_trains_and_draws_question_heatmaps(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    result = train_lib.train_and_evaluate(load_config("vqa_toy", "small"), str(tmp_path))
    assert result["step"] == 6 and set(result["eval"]) == {"loss", "accuracy"}
    assert [p.rsplit("/", 1)[-1] for p in result["heatmaps"]] == ["question_attention_0.png"]
    # the figures are closed once saved: none left to pyplot (a notebook would show it
    # again, and a long run would keep every one in memory)
    assert plt.get_fignums() == before
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["data_sizes"]["vocab_size"] == 21


def test_vqa_grid_neighbour_heads_see_one_neighbour_each():
    from jattn.models.vqa import CoAttentionVQA
    from jattn.viz import collect_attention_weights

    model = CoAttentionVQA(image_size=(16, 24), patch=8, in_channels=1, vocab_size=6,
                           num_classes=3, features=10, num_heads=5, num_layers=1,
                           mlp_features=8, grid_neighbours=True, rngs=nnx.Rngs(0))  # fmt: skip
    images = jnp.asarray(np.random.default_rng(0).random((1, 16, 24, 1)), jnp.float32)
    sown = collect_attention_weights(model, images, jnp.ones((1, 3), jnp.int32))
    weights = np.asarray(sown["layers/0/image_block/attention"])[0]  # [N, 6, 6], grid 2 x 3
    cells = [(r, c) for r in range(2) for c in range(3)]
    for head, (dy, dx) in enumerate([(0, -1), (0, 1), (-1, 0), (1, 0)]):
        want = np.array([[k == q or cells[k] == (cells[q][0] + dy, cells[q][1] + dx)
                          for k in range(6)] for q in range(6)])  # fmt: skip
        np.testing.assert_array_equal(weights[head] > 0, want)
    assert (weights[4] > 0).all()  # the fifth head sees every cell
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="grid_neighbours needs num_heads >= 4, got 2"):
        CoAttentionVQA(image_size=8, patch=8, in_channels=1, vocab_size=6, num_classes=3,
                       features=8, num_heads=2, num_layers=1, mlp_features=8,
                       grid_neighbours=True, rngs=nnx.Rngs(0))  # fmt: skip
