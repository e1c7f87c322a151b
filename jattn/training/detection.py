"""Object detection: metrics (box conversions, IoU, average precision at an IoU
threshold; NumPy, on the host) and DETR's set loss (Hungarian matching, classes, L1 and
generalised IoU; JAX, inside ``jit``).

Boxes are ``(cx, cy, w, h)`` (DETR's output, :class:`jattn.layers.DETRDecoder`) or corners
``(x0, y0, x1, y1)``; the metric takes corners.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "average_precision",
    "evaluate",
    "box_iou",
    "cxcywh_to_xyxy",
    "generalized_box_iou",
    "match_queries",
    "mean_average_precision",
    "sample_lines",
    "set_loss",
]


def cxcywh_to_xyxy(boxes) -> np.ndarray:
    """``[..., 4]`` centre and size -> corners ``(x0, y0, x1, y1)``."""
    b = np.asarray(boxes, np.float64)
    if b.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape [..., 4], got {list(b.shape)}")
    return _corners(b, np)


def _corners(boxes, xp):
    """Centre and size -> corners, in NumPy or JAX (``xp``)."""
    cx, cy, w, h = xp.moveaxis(boxes, -1, 0)
    return xp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def _intersection_union(a, b, xp):
    """``(intersection, union)`` areas of corner boxes ``a``, ``b`` (broadcast), in NumPy
    or JAX (``xp``)."""
    lo, hi = xp.maximum(a[..., :2], b[..., :2]), xp.minimum(a[..., 2:], b[..., 2:])
    inter = xp.prod(xp.clip(hi - lo, 0.0, None), axis=-1)
    area = lambda x: xp.prod(xp.clip(x[..., 2:] - x[..., :2], 0.0, None), axis=-1)  # noqa: E731
    return inter, area(a) + area(b) - inter


def box_iou(a, b) -> np.ndarray:
    """Intersection over union of corner boxes ``a [P, 4]`` and ``b [G, 4]``: ``[P, G]``
    (0 where a box has no area)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    for name, x in (("a", a), ("b", b)):
        if x.ndim != 2 or x.shape[1] != 4:
            raise ValueError(f"{name} must have shape [n, 4] (x0, y0, x1, y1), got {list(x.shape)}")
    inter, union = _intersection_union(a[:, None], b[None], np)
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


# ----------------------------------------------------------------- DETR's set loss


def generalized_box_iou(a, b) -> jax.Array:
    """Generalised IoU (Rezatofighi et al. 2019) of corner boxes ``a [..., 4]`` and
    ``b [..., 4]`` pair by pair: ``IoU - (C - union) / C`` with C the smallest box
    enclosing both; in [-1, 1], 1 for equal boxes. JAX, differentiable."""
    inter, union = _intersection_union(a, b, jnp)
    hull = jnp.prod(
        jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2]), axis=-1
    )
    eps = jnp.finfo(jnp.float32).tiny
    return inter / jnp.maximum(union, eps) - (hull - union) / jnp.maximum(hull, eps)


def _host_match(cost, valid):
    """Per example, the query matched to each real target (-1 for padding)."""
    from jattn.layers.vision import hungarian_match

    out = np.full(valid.shape, -1, np.int32)
    for b in range(cost.shape[0]):
        real = np.flatnonzero(valid[b])
        if len(real):
            rows, cols = hungarian_match(np.asarray(cost[b][:, real], np.float64))
            out[b, real[cols]] = rows
    return out


def match_queries(class_logits, boxes, gt_boxes, gt_classes, *, class_weight: float = 1.0,
                  l1_weight: float = 5.0, giou_weight: float = 2.0) -> jax.Array:  # fmt: skip
    """DETR's matching: for each real target, the query that the least-cost one-to-one
    assignment gives it, by ``class_weight * -p(class) + l1_weight * L1(box) +
    giou_weight * -GIoU(box)`` (Hungarian algorithm, scipy, on the host through
    ``jax.pure_callback``: it runs inside ``jit``; no gradient flows through it).

    Args:
      class_logits: ``[B, Q, K + 1]`` (the last class is "no object").
      boxes: ``[B, Q, 4]`` predicted ``(cx, cy, w, h)``.
      gt_boxes: ``[B, M, 4]``; gt_classes: ``[B, M]`` int, -1 for padding (M <= Q).

    Returns:
      int32 ``[B, M]``: the matched query of each target, -1 for padding.
    """
    if gt_boxes.shape[1] > boxes.shape[1]:
        raise ValueError(
            f"{gt_boxes.shape[1]} target slots need at least as many queries, got {boxes.shape[1]}"
        )
    probs = jax.nn.softmax(jax.lax.stop_gradient(class_logits).astype(jnp.float32), axis=-1)
    boxes, gt = jax.lax.stop_gradient(boxes).astype(jnp.float32), gt_boxes.astype(jnp.float32)
    labels = jnp.maximum(gt_classes, 0)
    p = jnp.take_along_axis(probs, labels[:, None, :], axis=-1)  # [B, Q, M]
    l1 = jnp.sum(jnp.abs(boxes[:, :, None] - gt[:, None]), axis=-1)
    giou = generalized_box_iou(_corners(boxes, jnp)[:, :, None], _corners(gt, jnp)[:, None])
    cost = class_weight * -p + l1_weight * l1 + giou_weight * -giou  # [B, Q, M]
    shape = jax.ShapeDtypeStruct(gt_classes.shape, jnp.int32)
    return jax.pure_callback(_host_match, shape, cost, gt_classes >= 0)


def set_loss(class_logits, boxes, gt_boxes, gt_classes, *, no_object_weight: float = 0.1,
             l1_weight: float = 5.0, giou_weight: float = 2.0) -> tuple:  # fmt: skip
    """DETR's loss for one matched set: cross-entropy of every query's class (matched
    queries their target's, the others "no object", weighted ``no_object_weight``), plus
    ``l1_weight`` * L1 and ``giou_weight`` * (1 - GIoU) of the matched boxes, both per
    target. Shapes as :func:`match_queries`.

    Returns:
      ``(loss, {'class', 'l1', 'giou', 'matched'})``: the scalar loss, its parts, and
      the matched query per target ``[B, M]``.
    """
    b, q, k1 = class_logits.shape
    matched = match_queries(class_logits, boxes, gt_boxes, gt_classes,
                            l1_weight=l1_weight, giou_weight=giou_weight)  # fmt: skip
    real = gt_classes >= 0  # [B, M]
    # each query's target class: its matched target's, else "no object" (K)
    onehot = jax.nn.one_hot(jnp.where(real, matched, q), q + 1, dtype=jnp.int32)[..., :q]
    target = jnp.full((b, q), k1 - 1, jnp.int32)
    target = jnp.where(onehot.sum(1) > 0, jnp.einsum("bmq,bm->bq", onehot, gt_classes), target)
    logp = jax.nn.log_softmax(class_logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]  # [B, Q]
    weight = jnp.where(target == k1 - 1, no_object_weight, 1.0)
    class_loss = jnp.sum(ce * weight) / jnp.sum(weight)
    picked = jnp.take_along_axis(boxes, jnp.maximum(matched, 0)[..., None], axis=1)  # [B, M, 4]
    num = jnp.maximum(jnp.sum(real), 1).astype(jnp.float32)
    l1 = jnp.sum(jnp.where(real[..., None], jnp.abs(picked - gt_boxes), 0.0)) / num
    giou = generalized_box_iou(_corners(picked, jnp), _corners(gt_boxes, jnp))
    giou_loss = jnp.sum(jnp.where(real, 1.0 - giou, 0.0)) / num
    loss = class_loss + l1_weight * l1 + giou_weight * giou_loss
    return loss, {"class": class_loss, "l1": l1, "giou": giou_loss, "matched": matched}


# ------------------------------------------------------------ the training program


def _detections(probs, boxes):
    """Each query as a detection: its most likely real class and that probability."""
    classes = np.argmax(probs[..., :-1], axis=-1)  # [N, Q]
    scores = np.take_along_axis(probs[..., :-1], classes[..., None], axis=-1)[..., 0]
    return cxcywh_to_xyxy(boxes), scores, classes


def evaluate(eval_step, state, ds, *, batch_size: int, place=None):
    """``({'loss', 'accuracy', 'ap50'}, (probs [N, Q, K + 1], boxes [N, Q, 4]))`` on the
    detection set ``ds`` (:class:`jattn.data.DetectionDataset`): the set loss per object,
    the class accuracy of the matched queries, and AP50 over every query as a detection
    (scored by its most likely real class, as DETR is evaluated)."""
    from jattn.data import eval_batches

    loss_sum = correct = count = 0.0
    probs, boxes = [], []
    for n, batch in eval_batches(ds, batch_size, "classes", -1):  # padding: no objects
        batch = batch if place is None else place(batch)
        ls, c, k, (p, b) = jax.device_get(eval_step(state.params, state.rest, batch))
        loss_sum, correct, count = loss_sum + ls, correct + c, count + k
        probs.append(np.asarray(p[:n])), boxes.append(np.asarray(b[:n]))
    probs, boxes = np.concatenate(probs), np.concatenate(boxes)
    corners, scores, classes = _detections(probs, boxes)
    real = ds.classes >= 0
    ap50 = mean_average_precision(
        list(corners), list(scores), list(classes),
        [cxcywh_to_xyxy(b[r]) for b, r in zip(ds.boxes, real, strict=True)],
        [c[r] for c, r in zip(ds.classes, real, strict=True)],
        num_classes=ds.num_classes,
    )  # fmt: skip
    metrics = {"loss": float(loss_sum / count), "accuracy": float(correct / count), "ap50": ap50}
    return metrics, (probs, boxes)


def sample_lines(ds, predictions, count: int, *, min_score: float = 0.5) -> list[str]:
    """One line per test image for the first ``count``: its objects (class@box in
    pixels) and the detections scoring at least ``min_score``."""
    probs, boxes = predictions
    corners, scores, classes = _detections(probs, boxes)
    size = np.asarray(ds.images.shape[2:0:-1] * 2, np.float64)  # (W, H, W, H)

    def show(cls, box):
        return f"{ds.class_names[cls]}@" + ",".join(str(int(round(v))) for v in box * size)

    lines = []
    for i in range(min(count, len(ds))):
        real = ds.classes[i] >= 0
        gt = cxcywh_to_xyxy(ds.boxes[i][real])
        truth = [show(c, b) for c, b in zip(ds.classes[i][real], gt, strict=True)]
        keep = scores[i] >= min_score
        found = [show(c, b) for c, b in zip(classes[i][keep], corners[i][keep], strict=True)]
        lines.append(f"  image {i}: objects {' '.join(truth)} | detected {' '.join(found)}")
    return lines
