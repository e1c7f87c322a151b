"""A detection toy, generated in-process: digits of two sizes placed on a canvas, with
their boxes and classes.

Each image holds 1 to ``max_objects`` digits drawn from the 3 x 5 pixel font of
:mod:`jattn.data.vqa`, each scaled by a factor from ``scales`` (2: 6 x 10 pixels, 3: 9 x
15), at random places that do not touch, with random brightness in [0.7, 1] over uniform
noise of up to 0.1. Boxes are ``(cx, cy, w, h)`` as fractions of the canvas (DETR's
convention, :class:`jattn.layers.DETRDecoder`), the exact extent of each glyph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jattn.data.dataset import check_sizes, image_sizes
from jattn.data.vqa import GLYPHS

__all__ = ["DetectionDataset", "detection_task"]


@dataclasses.dataclass(frozen=True)
class DetectionDataset:
    """Images with a padded set of objects each.

    Attributes:
      images: ``[N, H, W, 1]`` float32 in [0, 1].
      boxes: ``[N, M, 4]`` float32 ``(cx, cy, w, h)`` in [0, 1]; rows past an image's
        objects are zeros.
      classes: ``[N, M]`` int32 class ids, -1 past an image's objects.
      class_names: a name per class.
      sampler: None, or ``sampler(rng, n) -> (images, boxes, classes)`` drawing fresh
        examples: training batches are then new each step.
    """

    images: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    class_names: tuple[str, ...]
    sampler: Callable | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def model_sizes(self) -> dict:
        """What a model needs of the data: ``num_classes``, ``image_size``,
        ``in_channels``."""
        return {"num_classes": self.num_classes, **image_sizes(self.images)}

    def batch(self, indices) -> dict[str, np.ndarray]:
        """Rows ``indices`` as ``{'images', 'boxes', 'classes'}``."""
        return {"images": self.images[indices], "boxes": self.boxes[indices],
                "classes": self.classes[indices]}  # fmt: skip

    def sample_batch(self, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """The training batch of ``step``: a pure function of ``(seed, step)``."""
        rng = np.random.default_rng([seed, step])
        if self.sampler is None:
            return self.batch(rng.integers(0, len(self), size=batch_size))
        images, boxes, classes = self.sampler(rng, batch_size)
        return {"images": images, "boxes": boxes, "classes": classes}


def _place(rng, canvas: int, sizes: list[tuple[int, int]]):
    """Top-left corners for glyphs of ``sizes`` (height, width), a pixel apart at least;
    None when the tries run out."""
    corners = []
    for h, w in sizes:
        for _ in range(100):
            top, left = int(rng.integers(0, canvas - h + 1)), int(rng.integers(0, canvas - w + 1))
            if all(top >= t + hh + 1 or t >= top + h + 1 or left >= l + ww + 1 or l >= left + w + 1
                   for (t, l), (hh, ww) in zip(corners, sizes, strict=False)):  # fmt: skip
                corners.append((top, left))
                break
        else:
            return None
    return corners


def _examples(rng, n: int, canvas: int, max_objects: int, scales: tuple[int, ...]):
    images = rng.uniform(0.0, 0.1, size=(n, canvas, canvas, 1)).astype(np.float32)
    boxes = np.zeros((n, max_objects, 4), np.float32)
    classes = np.full((n, max_objects), -1, np.int32)
    for i in range(n):
        while True:
            count = int(rng.integers(1, max_objects + 1))
            digits = rng.integers(0, 10, count)
            scale = rng.choice(scales, count)
            sizes = [(5 * int(s), 3 * int(s)) for s in scale]
            corners = _place(rng, canvas, sizes)
            if corners is not None:
                break
        for j, (d, s, (top, left)) in enumerate(zip(digits, scale, corners, strict=True)):
            glyph = np.kron(GLYPHS[d], np.ones((s, s), np.float32)) * rng.uniform(0.7, 1.0)
            h, w = glyph.shape
            region = images[i, top : top + h, left : left + w, 0]
            images[i, top : top + h, left : left + w, 0] = np.maximum(region, glyph)
            boxes[i, j] = [(left + w / 2) / canvas, (top + h / 2) / canvas, w / canvas, h / canvas]
            classes[i, j] = d
    return images, boxes, classes


def detection_task(*, num_train: int = 1000, num_test: int = 500, seed: int = 0,
                   canvas: int = 32, max_objects: int = 3,
                   scales: tuple[int, ...] = (2, 3)):  # fmt: skip
    """``(train, test)`` :class:`DetectionDataset` of ``canvas x canvas`` images. Training
    batches are fresh examples each step (the train split's ``sampler``); its
    ``num_train`` stored examples are for looking at. The test split is fixed, from
    another random stream of ``seed``."""
    check_sizes(num_train=num_train, num_test=num_test, canvas=canvas, max_objects=max_objects)
    if not hasattr(scales, "__iter__"):  # scales=2 was "'int' object is not iterable"
        raise TypeError(f"scales must be a tuple of positive ints, e.g. (2, 3), got {scales!r}")
    scales = tuple(scales)
    if not scales or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in scales):
        raise ValueError(f"scales must be positive ints (glyph magnifications), got {scales!r}")
    if 5 * max(scales) > canvas:
        raise ValueError(
            f"a digit at scale {max(scales)} is {5 * max(scales)} pixels tall, more than the "
            f"canvas ({canvas})"
        )
    names = tuple(str(d) for d in range(10))
    streams = np.random.SeedSequence(seed).spawn(2)

    def sampler(rng, n):
        return _examples(rng, n, canvas, max_objects, scales)

    train = DetectionDataset(
        *_examples(np.random.default_rng(streams[0]), num_train, canvas, max_objects, scales),
        names,
        sampler,
    )
    test = DetectionDataset(
        *_examples(np.random.default_rng(streams[1]), num_test, canvas, max_objects, scales),
        names,
    )
    return train, test
