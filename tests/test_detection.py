"""The detection toy: its data (jattn.data.detection) against the font it draws, its
metrics (jattn.training.detection) against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.data.detection import detection_task
from jattn.data.vqa import GLYPHS
from jattn.training.detection import (
    average_precision,
    box_iou,
    cxcywh_to_xyxy,
    mean_average_precision,
)

BOX = [0.0, 0.0, 2.0, 2.0]


def test_boxes_and_iou_by_hand():
    np.testing.assert_allclose(cxcywh_to_xyxy([[1.0, 1.0, 2.0, 2.0]]), [BOX])
    iou = box_iou([BOX], [BOX, [1.0, 1.0, 3.0, 3.0], [5.0, 5.0, 6.0, 6.0], [1, 1, 1, 1]])
    np.testing.assert_allclose(iou, [[1.0, 1.0 / 7.0, 0.0, 0.0]])  # inter 1, union 7
    with pytest.raises(ValueError, match=r"a must have shape \[n, 4\]"):
        box_iou([0.0, 1.0], [BOX])


def test_average_precision_by_hand():
    other = [4.0, 4.0, 6.0, 6.0]
    gts = [np.array([BOX]), np.array([other])]
    # by score: right (0.9), wrong place (0.8), right (0.7): recall 1/2, 1/2, 1 at
    # precision 1, 1/2, 2/3; the envelope makes it 1, 2/3, 2/3: AP = 1/2 * 1 + 1/2 * 2/3
    dets = [(np.array([BOX, [9.0, 9.0, 10.0, 10.0]]), np.array([0.9, 0.8])),
            (np.array([other]), np.array([0.7]))]  # fmt: skip
    assert average_precision(dets, gts) == pytest.approx(5 / 6)
    # a second detection of a box already found is a false positive
    twice = [(np.array([BOX, BOX]), np.array([0.9, 0.8])), (np.zeros((0, 4)), np.zeros(0))]
    assert average_precision(twice, gts) == pytest.approx(0.5)
    # IoU 1/7 is below 0.5 but reaches a threshold of 0.1
    near = [(np.array([[1.0, 1.0, 3.0, 3.0]]), np.array([1.0])), (np.zeros((0, 4)), np.zeros(0))]
    assert average_precision(near, gts) == 0.0
    assert average_precision(near, gts, iou_threshold=0.1) == pytest.approx(0.5)
    assert np.isnan(average_precision(dets, [np.zeros((0, 4))] * 2))
    with pytest.raises(ValueError, match="the same images, got 2 and 1"):
        average_precision(dets, gts[:1])


def test_mean_average_precision_over_classes_with_ground_truth():
    gt_boxes = [np.array([BOX, [4.0, 4.0, 6.0, 6.0]])]
    gt_classes = [np.array([0, 2])]
    # class 0 found, class 2 missed (detected as class 1, which has no ground truth)
    pred = dict(pred_boxes=[np.array([BOX, [4.0, 4.0, 6.0, 6.0]])],
                pred_scores=[np.array([0.9, 0.8])], pred_classes=[np.array([0, 1])])  # fmt: skip
    m = mean_average_precision(**pred, gt_boxes=gt_boxes, gt_classes=gt_classes, num_classes=3)
    assert m == pytest.approx(0.5)  # (1 + 0) / 2: class 1 has no ground truth
    pred["pred_classes"] = [np.array([0, 2])]
    m = mean_average_precision(**pred, gt_boxes=gt_boxes, gt_classes=gt_classes, num_classes=3)
    assert m == pytest.approx(1.0)


def test_detection_data_boxes_frame_their_glyphs():
    train, test = detection_task(num_train=20, num_test=30, seed=1)
    assert test.images.shape == (30, 32, 32, 1) and test.boxes.shape == (30, 3, 4)
    sizes = set()
    for image, boxes, classes in zip(test.images[..., 0], test.boxes, test.classes, strict=True):
        real = classes >= 0
        assert real[0] and (real[:-1] >= real[1:]).all()  # objects first, then padding
        assert (boxes[~real] == 0).all()
        corners = cxcywh_to_xyxy(boxes[real]) * 32
        np.testing.assert_allclose(corners, np.round(corners), atol=1e-4)  # whole pixels
        iou = box_iou(corners, corners)
        np.testing.assert_allclose(iou, np.eye(len(corners)), atol=1e-12)  # no overlaps
        outside = np.ones((32, 32), bool)
        for (x0, y0, x1, y1), digit in zip(np.round(corners).astype(int), classes[real],
                                           strict=True):  # fmt: skip
            h, w = y1 - y0, x1 - x0
            scale = h // 5
            sizes.add(scale)
            assert (h, w) == (5 * scale, 3 * scale)
            glyph = np.kron(GLYPHS[digit], np.ones((scale, scale))) > 0
            patch = image[y0:y1, x0:x1]
            assert (patch[glyph] >= 0.7).all() and (patch[~glyph] <= 0.1).all()
            outside[y0:y1, x0:x1] = False
        assert (image[outside] <= 0.1).all()  # nothing but noise outside the boxes
    assert sizes == {2, 3}
    a, b = train.sample_batch(0, 4, 6), train.sample_batch(0, 4, 6)
    for key in ("images", "boxes", "classes"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["images"], train.sample_batch(0, 5, 6)["images"])
    with pytest.raises(ValueError, match="a digit at scale 7 is 35 pixels tall"):
        detection_task(scales=(7,))
    with pytest.raises(TypeError, match=r"scales must be a tuple of positive ints, e.g. \(2, 3\)"):
        detection_task(scales=2)  # was "'int' object is not iterable"


def test_generalized_iou_by_hand():
    from jattn.training.detection import generalized_box_iou

    a = np.array([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    b = np.array([[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0], [1.0, 1.0, 3.0, 3.0]])
    # equal: 1; apart: IoU 0, hull 3, union 2 -> -1/3; overlapping: 1/7 - (9 - 7) / 9
    want = [1.0, -1.0 / 3.0, 1.0 / 7.0 - 2.0 / 9.0]
    np.testing.assert_allclose(generalized_box_iou(jnp.asarray(a), jnp.asarray(b)), want,
                               rtol=1e-6)  # fmt: skip


def _random_set(seed, b=2, q=4, m=3, k=5):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(b, q, k + 1)), jnp.float32)
    boxes = jnp.asarray(rng.uniform(0.2, 0.6, (b, q, 4)), jnp.float32)
    gt = jnp.asarray(rng.uniform(0.2, 0.6, (b, m, 4)), jnp.float32)
    classes = jnp.asarray([[1, 4, -1], [0, 2, 3]][:b], jnp.int32)
    return logits, boxes, gt, classes


def test_matching_is_the_least_cost_assignment_inside_jit():
    import itertools

    from jattn.training.detection import generalized_box_iou, match_queries

    logits, boxes, gt, classes = _random_set(0)
    matched = np.asarray(jax.jit(match_queries)(logits, boxes, gt, classes))
    assert matched[0, 2] == -1 and (matched[0, :2] >= 0).all() and (matched[1] >= 0).all()
    probs = np.asarray(jax.nn.softmax(logits, -1))
    for e in range(2):
        real = [j for j in range(3) if classes[e, j] >= 0]

        def cost(i, j, e=e):
            giou = float(generalized_box_iou(cxcywh_to_xyxy(boxes[e, i]), cxcywh_to_xyxy(gt[e, j])))
            l1 = float(np.abs(np.asarray(boxes[e, i] - gt[e, j])).sum())
            return -probs[e, i, classes[e, j]] + 5 * l1 - 2 * giou

        def total(qs, real=real):
            return sum(cost(i, j) for i, j in zip(qs, real, strict=True))

        best = min(itertools.permutations(range(4), len(real)), key=total)
        assert [int(matched[e, j]) for j in real] == list(best)
        assert len(set(matched[e][matched[e] >= 0])) == len(real)  # one query per target


def test_set_loss_by_hand_and_gradients():
    from jattn.training.detection import set_loss

    logits, boxes, gt, classes = _random_set(1)
    # uniform class logits: every query's cross-entropy is log(K + 1)
    flat = jnp.zeros_like(logits)
    loss, parts = set_loss(flat, boxes, gt, classes)
    np.testing.assert_allclose(parts["class"], np.log(6.0), rtol=1e-6)
    matched = np.asarray(parts["matched"])
    real = np.asarray(classes) >= 0
    picked = np.stack([np.asarray(boxes)[e, np.maximum(matched[e], 0)] for e in range(2)])
    l1 = np.abs(picked - np.asarray(gt))[real].sum() / real.sum()
    np.testing.assert_allclose(parts["l1"], l1, rtol=1e-5)
    np.testing.assert_allclose(loss, parts["class"] + 5 * parts["l1"] + 2 * parts["giou"],
                               rtol=1e-6)  # fmt: skip
    # a perfect prediction: matched queries hold the targets, the rest say "no object"
    perfect_boxes = np.asarray(boxes).copy()
    perfect_logits = np.full(logits.shape, -20.0, np.float32)
    perfect_logits[..., -1] = 20.0
    for e in range(2):
        for j in np.flatnonzero(real[e]):
            perfect_boxes[e, j] = np.asarray(gt)[e, j]
            perfect_logits[e, j] = -20.0
            perfect_logits[e, j, classes[e, j]] = 20.0
    loss, parts = jax.jit(set_loss)(jnp.asarray(perfect_logits), jnp.asarray(perfect_boxes),
                                    gt, classes)  # fmt: skip
    assert float(loss) < 1e-5 and float(parts["l1"]) == 0.0
    grads = jax.grad(lambda lg, bx: set_loss(lg, bx, gt, classes)[0], argnums=(0, 1))(logits, boxes)
    assert all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in grads)


def test_detr_shapes_errors_and_cross_attention_weights():
    from flax import nnx

    from jattn.models.detr import DETR
    from jattn.viz import collect_attention_weights

    model = DETR(image_size=16, patch=4, in_channels=1, num_classes=3, num_queries=5,
                 features=16, num_heads=2, mlp_features=16, num_encoder_layers=1,
                 num_decoder_layers=1, stem_features=4, rngs=nnx.Rngs(0))  # fmt: skip
    images = jnp.asarray(np.random.default_rng(0).random((2, 16, 16, 1)), jnp.float32)
    logits, boxes = model(images)
    assert logits.shape == (2, 5, 4) and boxes.shape == (2, 5, 4)
    assert (np.asarray(boxes) > 0).all() and (np.asarray(boxes) < 1).all()
    sown = collect_attention_weights(model, images)
    cross = [w for k, w in sown.items() if "cross" in k]
    assert [w.shape for w in cross] == [(2, 2, 5, 16)]  # each query over the 4 x 4 patches
    with pytest.raises(ValueError, match=r"\[B, H, W, C\] \(channels last\) with C=1"):
        model(jnp.zeros((2, 16, 16, 3)))
    with pytest.raises(ValueError, match="images must be 16 x 16"):
        model(jnp.zeros((2, 8, 8, 1)))


@pytest.mark.slow
def test_detection_toy_trains_and_reports_ap50(tmp_path):
    from _train_utils import load_config

    import jattn.train as train_lib
    from jattn.models.detr import DETR
    from jattn.training import read_metrics

    config = load_config("detection_toy", "small")
    result = train_lib.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 6 and set(result["eval"]) == {"loss", "accuracy", "ap50"}
    assert 0.0 <= result["eval"]["ap50"] <= 1.0
    final = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "eval"][-1]
    assert final["ap50"] == result["eval"]["ap50"]
    assert all("objects" in r for r in read_metrics(tmp_path / "metrics.jsonl")
               if r["split"] == "train")  # fmt: skip
    assert isinstance(train_lib.restore_model(tmp_path), DETR)
    smoothed = load_config("detection_toy", "small")
    smoothed.train.label_smoothing = 0.1  # the set loss has none: refused, not ignored
    with pytest.raises(ValueError, match=r"label_smoothing=0.1: task 'detection' is detection"):
        train_lib.validate_config(smoothed)
    with config.unlocked():
        config.task = load_config("vit_digits", "small").task
    with pytest.raises(ValueError, match=r"'detr' is a detection model, but task 'digits' is"):
        train_lib.validate_config(config)
