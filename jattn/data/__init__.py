"""Offline tasks generated in-process: copy, reverse, sort, addition and date translation."""

from __future__ import annotations

import inspect

from jattn.data.dataset import Seq2SeqDataset
from jattn.data.dates import DATE_FORMATS, dates_task, format_date
from jattn.data.tasks import addition_task, copy_task, reverse_task, sort_task
from jattn.data.tokenizer import BOS, EOS, PAD, CharTokenizer

__all__ = [
    "BOS",
    "DATE_FORMATS",
    "EOS",
    "PAD",
    "TASKS",
    "CharTokenizer",
    "Seq2SeqDataset",
    "addition_task",
    "copy_task",
    "dates_task",
    "format_date",
    "make_task",
    "reverse_task",
    "sort_task",
]

TASKS = {
    "addition": addition_task,
    "copy": copy_task,
    "dates": dates_task,
    "reverse": reverse_task,
    "sort": sort_task,
}


def make_task(name: str, **kwargs) -> tuple[Seq2SeqDataset, Seq2SeqDataset]:
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
