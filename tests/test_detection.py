"""The detection toy: its data (jattn.data.detection) against the font it draws, its
metrics (jattn.training.detection) against hand-computed values."""

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
