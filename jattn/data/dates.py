"""Toy translation: dates as people write them -> ISO ``YYYY-MM-DD``.

``"Saturday, March 3rd 2021"``, ``"3/3/21"``, ``"03 Mar 2021"`` ... all become
``"2021-03-03"``. The held-out split is drawn over distinct (date, format) pairs,
so no test pair (hence no test source string) appears in training.
"""

from __future__ import annotations

import datetime

import numpy as np

from jattn.data.dataset import Seq2SeqDataset, check_sizes, split_unique
from jattn.data.tokenizer import CharTokenizer

__all__ = ["DATE_FORMATS", "FIRST_DATE", "LAST_DATE", "dates_task", "format_date"]

#: The first date the task draws. Two-digit years are unambiguous in this range (as
#: Python's %y: 69-99 -> 19xx, 00-68 -> 20xx).
FIRST_DATE = datetime.date(1969, 1, 1)
#: The last date the task draws.
LAST_DATE = datetime.date(2068, 12, 31)

_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# Each format: (y, m, d, Month, Mon, Weekday, Wkd, yy) -> text. Built from the parts by
# hand (not strftime), so the tests can check them independently with datetime.strptime.
_FORMATS = {
    "weekday_month_ordinal_year": lambda p: f"{p['W']}, {p['B']} {_ordinal(p['d'])} {p['y']}",
    "m/d/yy": lambda p: f"{p['m']}/{p['d']}/{p['yy']:02d}",
    "dd Mon yyyy": lambda p: f"{p['d']:02d} {p['b']} {p['y']}",
    "Month d, yyyy": lambda p: f"{p['B']} {p['d']}, {p['y']}",
    "yyyy.mm.dd": lambda p: f"{p['y']}.{p['m']:02d}.{p['d']:02d}",
    "d month yy": lambda p: f"{p['d']} {p['B'].lower()} {p['yy']:02d}",
    "mm/dd/yyyy": lambda p: f"{p['m']:02d}/{p['d']:02d}/{p['y']}",
    "d.m.yyyy": lambda p: f"{p['d']}.{p['m']}.{p['y']}",
    "Mon d, yyyy": lambda p: f"{p['b']} {p['d']}, {p['y']}",
    "Wkd d Mon yyyy": lambda p: f"{p['a']} {p['d']} {p['b']} {p['y']}",
    "yyyymmdd": lambda p: f"{p['y']}{p['m']:02d}{p['d']:02d}",
    "dth of Month, yyyy": lambda p: f"{_ordinal(p['d'])} of {p['B']}, {p['y']}",
    "MONTH d yyyy": lambda p: f"{p['B'].upper()} {p['d']} {p['y']}",
    "yyyy/m/d": lambda p: f"{p['y']}/{p['m']}/{p['d']}",
    "Wkd, dd Mon yyyy": lambda p: f"{p['a']}, {p['d']:02d} {p['b']} {p['y']}",
    "d-Mon-yyyy": lambda p: f"{p['d']}-{p['b']}-{p['y']}",
    "Weekday d Month yyyy": lambda p: f"{p['W']} {p['d']} {p['B']} {p['y']}",
    "dd-mm-yyyy": lambda p: f"{p['d']:02d}-{p['m']:02d}-{p['y']}",
    "the dth of month yy": lambda p: f"the {_ordinal(p['d'])} of {p['B'].lower()} {p['yy']:02d}",
}
#: The names of the source formats a date is written in.
DATE_FORMATS = tuple(_FORMATS)
_NUM_DAYS = (LAST_DATE - FIRST_DATE).days + 1

SRC_LEN = 32  # the longest source, "Wednesday, September 30th 2020", is 30 chars + EOS
TGT_LEN = 11  # "YYYY-MM-DD" + EOS


def format_date(date: datetime.date, fmt: str) -> str:
    """``date`` written in the format named ``fmt`` (one of :data:`DATE_FORMATS`)."""
    if fmt not in _FORMATS:
        raise ValueError(f"unknown date format {fmt!r}; expected one of {DATE_FORMATS}")
    if not isinstance(date, datetime.date):  # a str was an AttributeError ('month')
        raise TypeError(f"date must be a datetime.date, got {type(date).__name__} {date!r}")
    month, day = _MONTHS[date.month - 1], _DAYS[date.weekday()]
    parts = dict(
        y=date.year,
        m=date.month,
        d=date.day,
        yy=date.year % 100,
        B=month,
        b=month[:3],
        W=day,
        a=day[:3],
    )
    return _FORMATS[fmt](parts)


def _alphabet() -> str:
    return "".join(
        sorted(
            set(
                " ,./-0123456789"
                + "".join(_MONTHS + _DAYS).lower()
                + "".join(_MONTHS + _DAYS).upper()
            )
        )
    )


def dates_task(*, num_train=50000, num_test=1000, seed=0):
    """Date translation ``(train, test)`` splits over distinct (date, format) pairs.

    Dates are uniform over 1969-01-01 .. 2068-12-31 and formats uniform over
    :data:`DATE_FORMATS`.
    """
    check_sizes(num_train=num_train, num_test=num_test)
    population = _NUM_DAYS * len(DATE_FORMATS)
    if num_train + num_test > population // 2:
        raise ValueError(f"num_train + num_test must be at most {population // 2}")
    rng = np.random.default_rng(seed)
    splits = split_unique(lambda r: int(r.integers(population)), num_train, num_test, rng)
    src_tok = CharTokenizer(_alphabet())
    tgt_tok = CharTokenizer("-0123456789")
    out = []
    for keys in splits:
        src, tgt = [], []
        for key in keys:
            day, fmt = divmod(key, len(DATE_FORMATS))
            date = FIRST_DATE + datetime.timedelta(days=day)
            src.append(format_date(date, DATE_FORMATS[fmt]))
            tgt.append(date.isoformat())
        out.append(
            Seq2SeqDataset.from_texts(src, tgt, src_tok, tgt_tok, src_len=SRC_LEN, tgt_len=TGT_LEN)
        )
    return tuple(out)
