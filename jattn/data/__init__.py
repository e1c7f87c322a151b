"""Offline tasks: copy, reverse, sort, addition and date translation generated in-process;
scikit-learn's bundled handwritten digits and a visual-question-answering toy
(classification)."""

from __future__ import annotations

import inspect

from jattn.data.dataset import Seq2SeqDataset, eval_batches
from jattn.data.dates import DATE_FORMATS, dates_task, format_date
from jattn.data.detection import DetectionDataset, detection_task
from jattn.data.images import ClassificationDataset, digits_task, warp_images
from jattn.data.tasks import addition_task, copy_task, reverse_task, sort_task
from jattn.data.tokenizer import BOS, EOS, PAD, CharTokenizer
from jattn.data.vqa import vqa_task

__all__ = [
    "BOS",
    "CLASSIFICATION_TASKS",
    "DETECTION_TASKS",
    "DATE_FORMATS",
    "EOS",
    "PAD",
    "TASKS",
    "CharTokenizer",
    "ClassificationDataset",
    "DetectionDataset",
    "Seq2SeqDataset",
    "eval_batches",
    "addition_task",
    "copy_task",
    "dates_task",
    "detection_task",
    "digits_task",
    "format_date",
    "make_task",
    "reverse_task",
    "sort_task",
    "vqa_task",
    "warp_images",
]

#: The offline tasks by name: each builds its data sets in-process (``make_task``).
TASKS = {
    "addition": addition_task,
    "copy": copy_task,
    "dates": dates_task,
    "detection": detection_task,
    "digits": digits_task,
    "reverse": reverse_task,
    "sort": sort_task,
    "vqa": vqa_task,
}
#: Tasks whose examples have one class label each (ClassificationDataset), not a target text.
CLASSIFICATION_TASKS = frozenset({"digits", "vqa"})
#: Tasks whose examples have a set of boxed objects each (DetectionDataset).
DETECTION_TASKS = frozenset({"detection"})


def make_task(name: str, **kwargs) -> tuple:
    """``(train, test)`` of the task ``name`` (a key of :data:`TASKS`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    allowed = inspect.signature(TASKS[name]).parameters
    for key in kwargs:
        if key not in allowed:
            raise ValueError(
                f"task {name!r} has no option {key!r}; its options are {sorted(allowed)}"
            )
    return TASKS[name](**kwargs)
