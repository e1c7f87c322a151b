"""Image classification data: scikit-learn's bundled handwritten digits, offline.

:func:`digits_task` splits the 1797 8x8 digits as scikit-learn's own classification
example does (``train_test_split(..., test_size=0.5, shuffle=False)``: the first half
trains, the second half tests), so its accuracy compares with the example's SVM (96.9%).
The images ship inside scikit-learn (the ``digits`` extra): nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jattn.data.dataset import image_sizes

__all__ = ["ClassificationDataset", "digits_task", "warp_images"]


@dataclasses.dataclass(frozen=True)
class ClassificationDataset:
    """Examples with one class label each.

    Attributes:
      inputs: ``{name: [N, ...]}``, the model's inputs by argument name (``images``
        ``[N, H, W, C]`` float32 for an image classifier).
      labels: ``[N]`` int32 class ids in ``[0, len(class_names))``.
      class_names: a name per class.
      max_shift: training batches (:meth:`sample_batch`) translate ``inputs['images']``
        by up to this many whole pixels along each axis (zero fill), drawn per example.
      max_rotation: ... and rotate them by up to this many degrees either way,
      max_scale: ... and scale them by a factor in ``[1 - max_scale, 1 + max_scale]``
        (bilinear, about the image's centre: :func:`warp_images`).
      sizes: other sizes a model needs of the data (``{'vocab_size': 21}``).
      sampler: None, or ``sampler(rng, n) -> (inputs, labels)`` drawing ``n`` fresh
        examples: training batches are then new examples each step (a generated task
        with no fixed training set), instead of rows of ``inputs``.
    """

    inputs: dict
    labels: np.ndarray
    class_names: tuple[str, ...]
    max_shift: int = 0
    max_rotation: float = 0.0
    max_scale: float = 0.0
    sizes: dict = dataclasses.field(default_factory=dict)
    sampler: Callable | None = None

    def __post_init__(self):
        labels = np.asarray(self.labels)  # a list too
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(  # a float label 0.5 was taken as a class id, 2-D labels too
                f"labels must be [N] integer class ids, got {labels.dtype}{list(labels.shape)}"
            )
        object.__setattr__(self, "labels", labels)  # frozen
        n = len(self.labels)
        for name, x in self.inputs.items():
            if len(x) != n:
                raise ValueError(f"inputs[{name!r}] has {len(x)} rows but there are {n} labels")
        if n and not (0 <= self.labels.min() and self.labels.max() < len(self.class_names)):
            raise ValueError(
                f"labels must be in [0, {len(self.class_names)}), got "
                f"[{self.labels.min()}, {self.labels.max()}]"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def model_sizes(self) -> dict:
        """What a model needs of the data: ``num_classes`` and, with ``images``
        ``[N, H, W, C]``, ``image_size [H, W]`` and ``in_channels`` C; and :attr:`sizes`."""
        sizes = {"num_classes": self.num_classes, **self.sizes}
        if "images" in self.inputs:
            sizes.update(image_sizes(self.inputs["images"]))
        return sizes

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``indices`` as ``{**inputs, 'label': [B]}``."""
        return {**{k: v[indices] for k, v in self.inputs.items()}, "label": self.labels[indices]}

    def sample_batch(self, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """The training batch of ``step``, augmented: a pure function of ``(seed, step)``,
        so a resumed run sees exactly the batches an uninterrupted one would."""
        rng = np.random.default_rng([seed, step])
        if self.sampler is not None:
            inputs, labels = self.sampler(rng, batch_size)
            batch = {**inputs, "label": labels}
        else:
            batch = self.batch(rng.integers(0, len(self), size=batch_size))
        if "images" in batch and (self.max_shift or self.max_rotation or self.max_scale):
            b = batch_size
            shifts = rng.integers(-self.max_shift, self.max_shift + 1, size=(b, 2))
            angles = rng.uniform(-self.max_rotation, self.max_rotation, size=b)
            scales = rng.uniform(1 - self.max_scale, 1 + self.max_scale, size=b)
            batch["images"] = warp_images(batch["images"], shifts, angles, scales)
        return batch


def warp_images(images: np.ndarray, shifts, angles, scales) -> np.ndarray:
    """``images [B, H, W, C]`` each rotated by ``angles [B]`` degrees (clockwise as
    displayed, rows down: 90 is ``np.rot90(image, -1)``) and scaled by ``scales [B]``
    about its centre, then translated by ``shifts [B, 2]`` pixels (rows, columns);
    bilinear (``scipy.ndimage``), zeros outside (without rotation and scaling, integer
    shifts move the pixels exactly)."""
    from scipy.ndimage import map_coordinates

    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C], got shape {list(images.shape)}")
    b, h, w, c = images.shape
    shifts = _per_image("shifts", shifts, (b, 2))
    theta = np.deg2rad(_per_image("angles", angles, (b,)))[:, None, None]
    scale = _per_image("scales", scales, (b,))[:, None, None]
    if (scale <= 0).any():  # 0 drew a black image, a negative one a flipped image
        raise ValueError(f"scales must be > 0, got {scale.min()}")
    cy, cx = (h - 1) / 2, (w - 1) / 2
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    y = rows - cy - shifts[:, 0, None, None]  # [B, H, W], about the centre
    x = cols - cx - shifts[:, 1, None, None]
    cos, sin = np.cos(theta), np.sin(theta)
    # each output pixel reads the input where the inverse transform takes it
    src_y = (cos * y - sin * x) / scale + cy
    src_x = (sin * y + cos * x) / scale + cx
    index = np.broadcast_to(np.arange(b, dtype=np.float64)[:, None, None], src_y.shape)
    out = [
        map_coordinates(images[..., ch], [index, src_y, src_x], order=1, cval=0.0)
        for ch in range(c)
    ]
    return np.stack(out, axis=-1).astype(images.dtype)


def _per_image(name: str, x, shape: tuple[int, ...]) -> np.ndarray:
    """``x`` as finite float64 of ``shape`` (one value, or one pair, per image)."""
    try:
        x = np.asarray(x, np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be real numbers, got {type(x).__name__}") from e
    if x.shape != shape:
        raise ValueError(
            f"{name} must have shape {list(shape)} (one per image), got {list(x.shape)}"
        )
    if not np.isfinite(x).all():  # a NaN angle drew a black image
        raise ValueError(f"{name} must be finite, got {x[~np.isfinite(x)][0]}")
    return x


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "the digits task reads scikit-learn's bundled digits: pip install 'jattn[digits]'"
        ) from e
    return load_digits()


def digits_task(
    *, seed: int = 0, max_shift: int = 1, max_rotation: float = 0.0, max_scale: float = 0.0
):
    """``(train, test)``: scikit-learn's 1797 handwritten digits, 8x8 grey images
    ``images [N, 8, 8, 1]`` in [0, 1], labels 0-9; the first 898 train, the last 899
    test (scikit-learn's example split; ``seed`` only draws the training batches).
    ``max_shift``, ``max_rotation``, ``max_scale``: the training batches' random
    translation (whole pixels), rotation (degrees) and scaling (0: none;
    :class:`ClassificationDataset`)."""
    if not isinstance(max_shift, int) or isinstance(max_shift, bool) or not 0 <= max_shift < 4:
        raise ValueError(f"max_shift must be an int in [0, 4), got {max_shift!r}")
    for name, value, top in (("max_rotation", max_rotation, 90), ("max_scale", max_scale, 0.5)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < top:
            raise ValueError(f"{name} must be a number in [0, {top}), got {value!r}")
    digits = _load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    half = len(labels) // 2  # train_test_split(test_size=0.5, shuffle=False): 898 / 899
    names = tuple(str(i) for i in range(10))
    return (
        ClassificationDataset(
            {"images": images[:half]}, labels[:half], names, max_shift, max_rotation, max_scale
        ),
        ClassificationDataset({"images": images[half:]}, labels[half:], names),
    )
