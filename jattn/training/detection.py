"""Object detection metrics: box conversions, IoU and average precision at an IoU threshold.

Boxes are ``(cx, cy, w, h)`` (DETR's output, :class:`jattn.layers.DETRDecoder`) or corners
``(x0, y0, x1, y1)``; the metric takes corners. NumPy, on the host: it scores a whole
evaluation set once.
"""

from __future__ import annotations

import numpy as np

__all__ = ["average_precision", "box_iou", "cxcywh_to_xyxy", "mean_average_precision"]


def cxcywh_to_xyxy(boxes) -> np.ndarray:
    """``[..., 4]`` centre and size -> corners ``(x0, y0, x1, y1)``."""
    b = np.asarray(boxes, np.float64)
    if b.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape [..., 4], got {list(b.shape)}")
    cx, cy, w, h = np.moveaxis(b, -1, 0)
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def box_iou(a, b) -> np.ndarray:
    """Intersection over union of corner boxes ``a [P, 4]`` and ``b [G, 4]``: ``[P, G]``
    (0 where a box has no area)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    for name, x in (("a", a), ("b", b)):
        if x.ndim != 2 or x.shape[1] != 4:
            raise ValueError(f"{name} must have shape [n, 4] (x0, y0, x1, y1), got {list(x.shape)}")
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=-1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def average_precision(detections, ground_truth, *, iou_threshold: float = 0.5) -> float:
    """Average precision of one class (all-point interpolation, as PASCAL VOC since 2010
    and COCO's per-threshold AP).

    Args:
      detections: per image, ``(boxes [P, 4] corners, scores [P])``.
      ground_truth: per image, ``boxes [G, 4]`` corners.
      iou_threshold: a detection is right when its IoU with a not yet matched ground
        truth box of its image reaches this; detections are taken by falling score,
        each matched to the free box it overlaps most.

    Returns:
      The area under the precision-recall curve with precision made monotone; NaN when
      there is no ground truth box (the class does not count towards a mean).
    """
    if len(detections) != len(ground_truth):
        raise ValueError(
            f"detections and ground_truth must list the same images, got {len(detections)} "
            f"and {len(ground_truth)}"
        )
    total = sum(len(g) for g in ground_truth)
    if total == 0:
        return float("nan")
    flat = [(s, i, k) for i, (_, scores) in enumerate(detections) for k, s in enumerate(scores)]
    flat.sort(key=lambda t: -t[0])
    taken = [np.zeros(len(g), bool) for g in ground_truth]
    hits = np.zeros(len(flat))
    for rank, (_, i, k) in enumerate(flat):
        gt = np.asarray(ground_truth[i], np.float64).reshape(-1, 4)
        if not len(gt):
            continue
        iou = box_iou(np.asarray(detections[i][0], np.float64)[k : k + 1], gt)[0]
        iou[taken[i]] = -1.0
        best = int(np.argmax(iou))
        if iou[best] >= iou_threshold:
            taken[i][best], hits[rank] = True, 1.0
    tp = np.cumsum(hits)
    recall = np.concatenate([[0.0], tp / total])
    precision = np.concatenate([[1.0], tp / np.arange(1, len(flat) + 1)])
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the envelope
    return float(np.sum(np.diff(recall) * precision[1:]))


def mean_average_precision(pred_boxes, pred_scores, pred_classes, gt_boxes, gt_classes, *,
                           num_classes: int, iou_threshold: float = 0.5) -> float:  # fmt: skip
    """The mean over classes (with a ground truth box) of :func:`average_precision`
    (AP50 at the default threshold).

    Args:
      pred_boxes, pred_scores, pred_classes: per image, ``[P, 4]`` corners, ``[P]`` and
        ``[P]`` int class ids.
      gt_boxes, gt_classes: per image, ``[G, 4]`` corners and ``[G]`` class ids.
      num_classes: the classes ``0 .. num_classes - 1``.
    """
    aps = []
    for c in range(num_classes):
        dets = [
            (np.asarray(b).reshape(-1, 4)[np.asarray(k) == c], np.asarray(s)[np.asarray(k) == c])
            for b, s, k in zip(pred_boxes, pred_scores, pred_classes, strict=True)
        ]
        gts = [
            np.asarray(b).reshape(-1, 4)[np.asarray(k) == c]
            for b, k in zip(gt_boxes, gt_classes, strict=True)
        ]
        aps.append(average_precision(dets, gts, iou_threshold=iou_threshold))
    aps = [a for a in aps if not np.isnan(a)]
    return float(np.mean(aps)) if aps else float("nan")
