"""Offline tasks: tokenizer, date formats (checked with datetime.strptime), splits, seeds."""

import datetime
import re

import numpy as np
import pytest

from jattn.data import (
    BOS,
    DATE_FORMATS,
    EOS,
    PAD,
    CharTokenizer,
    addition_task,
    copy_task,
    dates_task,
    format_date,
    make_task,
    reverse_task,
    sort_task,
)
from jattn.data.dates import FIRST_DATE, LAST_DATE, SRC_LEN

# An independent reading of every format with the standard library's parser.
STRPTIME = {
    "weekday_month_ordinal_year": "%A, %B %d %Y",
    "m/d/yy": "%m/%d/%y",
    "dd Mon yyyy": "%d %b %Y",
    "Month d, yyyy": "%B %d, %Y",
    "yyyy.mm.dd": "%Y.%m.%d",
    "d month yy": "%d %B %y",
    "mm/dd/yyyy": "%m/%d/%Y",
    "d.m.yyyy": "%d.%m.%Y",
    "Mon d, yyyy": "%b %d, %Y",
    "Wkd d Mon yyyy": "%a %d %b %Y",
    "yyyymmdd": "%Y%m%d",
    "dth of Month, yyyy": "%d of %B, %Y",
    "MONTH d yyyy": "%B %d %Y",
    "yyyy/m/d": "%Y/%m/%d",
    "Wkd, dd Mon yyyy": "%a, %d %b %Y",
    "d-Mon-yyyy": "%d-%b-%Y",
    "Weekday d Month yyyy": "%A %d %B %Y",
    "dd-mm-yyyy": "%d-%m-%Y",
    "the dth of month yy": "the %d of %B %y",
}


def parse_date(text: str, fmt: str) -> datetime.date:
    plain = re.sub(r"\b(\d{1,2})(st|nd|rd|th)\b", r"\1", text)
    parsed = datetime.datetime.strptime(plain, STRPTIME[fmt]).date()
    pattern = STRPTIME[fmt]
    if "%A" in pattern or "%a" in pattern:  # strptime ignores weekdays: check them here
        weekday = re.match(r"[A-Za-z]+", text).group(0)
        assert weekday in (parsed.strftime("%A"), parsed.strftime("%a")), (text, parsed)
    return parsed


def test_tokenizer_round_trip_and_specials():
    tok = CharTokenizer("abc -")
    assert tok.vocab_size == 8
    ids = tok.encode("a-b c")
    assert ids[-1] == EOS and min(ids[:-1]) >= 3
    assert tok.decode(ids) == "a-b c"
    assert tok.decode([BOS, *ids, PAD, PAD]) == "a-b c"
    assert tok.decode([*tok.encode("ab", add_eos=False), EOS, *tok.encode("c")]) == "ab"
    batch = tok.encode_batch(["ab", "", "cab"], 5)
    np.testing.assert_array_equal(
        batch, [[3, 4, EOS, PAD, PAD], [EOS, PAD, PAD, PAD, PAD], [5, 3, 4, EOS, PAD]]
    )
    assert batch.dtype == np.int32
    with pytest.raises(ValueError, match="'z' of 'az' is not in the vocabulary"):
        tok.encode("az")
    with pytest.raises(ValueError, match="needs 4 ids with EOS, more than 3"):
        tok.encode_batch(["abc"], 3)
    # ids of no character: '?' in text, an error for one label (-1 is not '<eos>')
    assert tok.decode([3, -1, 8, 4]) == "a??b"
    # floats are no ids, an int no alphabet (were errors from inside Python)
    with pytest.raises(TypeError, match="ids must be integers, got dtype float64"):
        tok.decode(np.array([3.0]))
    with pytest.raises(TypeError, match="token id must be an int, got 3.5"):
        tok.token(3.5)
    with pytest.raises(ValueError, match="alphabet entries must be single characters, got 1"):
        CharTokenizer([1, 2])
    with pytest.raises(TypeError, match="alphabet must be characters"):
        CharTokenizer(5)
    assert tok.token(EOS) == "<eos>" and tok.token(3) == "a"
    for bad in (-1, 8):
        with pytest.raises(ValueError, match=rf"token id {bad} is outside the vocabulary \[0, 8\)"):
            tok.token(bad)


def test_there_are_at_least_15_date_formats_and_the_checker_covers_them():
    assert len(DATE_FORMATS) >= 15
    assert set(STRPTIME) == set(DATE_FORMATS)


@pytest.mark.parametrize("fmt", DATE_FORMATS)
def test_every_date_format_parses_back_to_the_same_date(fmt):
    rng = np.random.default_rng(1)
    days = (LAST_DATE - FIRST_DATE).days
    edge = [
        FIRST_DATE,
        LAST_DATE,
        datetime.date(2000, 2, 29),
        datetime.date(2021, 3, 3),
        datetime.date(2011, 11, 11),
        datetime.date(1999, 12, 22),
    ]
    for date in edge + [
        FIRST_DATE + datetime.timedelta(days=int(d)) for d in rng.integers(0, days, 60)
    ]:
        text = format_date(date, fmt)
        assert len(text) + 1 <= SRC_LEN
        assert parse_date(text, fmt) == date, (fmt, text)


def test_examples_from_the_issue():
    date = datetime.date(2021, 3, 3)
    written = {format_date(date, f) for f in DATE_FORMATS}
    assert {
        "Wednesday, March 3rd 2021",
        "3/3/21",
        "03 Mar 2021",
        "March 3, 2021",
        "2021.03.03",
        "3 march 21",
    } <= written
    with pytest.raises(ValueError, match="unknown date format 'iso'"):
        format_date(date, "iso")
    with pytest.raises(TypeError, match="date must be a datetime.date, got str '2021-03-03'"):
        format_date("2021-03-03", DATE_FORMATS[0])  # was an AttributeError


def test_dates_task_targets_are_iso_of_the_source():
    train, test = dates_task(num_train=600, num_test=100, seed=3)
    assert train.src.shape == (600, SRC_LEN) and test.tgt.shape == (100, 11)
    assert train.src.dtype == np.int32 and train.tgt.dtype == np.int32
    for ds in (train, test):
        for i in range(len(ds)):
            src, tgt = ds.decode_src(ds.src[i]), ds.decode(ds.tgt[i])
            assert (src, tgt) == (ds.src_texts[i], ds.tgt_texts[i])
            date = datetime.date.fromisoformat(tgt)
            assert any(format_date(date, f) == src for f in DATE_FORMATS), (
                f"{src!r} is no format of {tgt}"
            )


def test_dates_split_is_disjoint_on_date_format_pairs():
    train, test = dates_task(num_train=5000, num_test=1000, seed=0)
    pairs = lambda ds: set(zip(ds.src_texts, ds.tgt_texts, strict=True))  # noqa: E731
    assert len(pairs(train)) == 5000 and len(pairs(test)) == 1000
    assert not pairs(train) & pairs(test)
    assert not set(train.src_texts) & set(test.src_texts)


@pytest.mark.parametrize("task", [copy_task, reverse_task, sort_task, addition_task])
def test_toy_splits_are_disjoint(task):
    train, test = task(num_train=300, num_test=50, seed=0)
    assert len(set(train.src_texts)) == 300 and len(set(test.src_texts)) == 50
    assert not set(train.src_texts) & set(test.src_texts)


def test_determinism_by_seed():
    a, _ = dates_task(num_train=200, num_test=10, seed=7)
    b, _ = dates_task(num_train=200, num_test=10, seed=7)
    c, _ = dates_task(num_train=200, num_test=10, seed=8)
    np.testing.assert_array_equal(a.src, b.src)
    assert a.src_texts == b.src_texts and a.src_texts != c.src_texts
    x = a.sample_batch(0, 5, 16)
    y = b.sample_batch(0, 5, 16)
    z = a.sample_batch(0, 6, 16)
    for k in ("src", "tgt_in", "tgt"):
        np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(x["src"], z["src"])


def test_batch_teacher_forcing_input_is_shifted_target():
    train, _ = reverse_task(num_train=20, num_test=2, seed=0)
    batch = train.batch(np.array([3, 1]))
    np.testing.assert_array_equal(batch["tgt_in"][:, 0], [BOS, BOS])
    np.testing.assert_array_equal(batch["tgt_in"][:, 1:], batch["tgt"][:, :-1])


def test_addition_is_correct():
    train, test = addition_task(num_train=500, num_test=50, seed=2, max_digits=3)
    for ds in (train, test):
        for src, tgt in zip(ds.src_texts, ds.tgt_texts, strict=True):
            a, b = src.split("+")
            assert len(a) <= 3 and len(b) <= 3 and a == str(int(a)) and b == str(int(b))
            assert int(tgt) == int(a) + int(b)
            assert ds.decode(ds.tgt_tokenizer.encode(tgt)) == tgt
    lengths = {len(s.split("+")[0]) for s in train.src_texts}
    assert lengths == {1, 2, 3}
    with pytest.raises(ValueError, match="max_digits must be at most 18, got 19"):
        addition_task(max_digits=19)  # operands are int64


def test_copy_reverse_sort_targets():
    for task, fn in (
        (copy_task, lambda s: s),
        (reverse_task, lambda s: s[::-1]),
        (sort_task, lambda s: "".join(sorted(s))),
    ):
        train, _ = task(num_train=50, num_test=5, seed=0, max_len=6, num_symbols=4)
        for src, tgt in zip(train.src_texts, train.tgt_texts, strict=True):
            assert 1 <= len(src) <= 6 and set(src) <= set("abcd")
            assert tgt == fn(src)


def test_task_errors():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_task("nope")
    with pytest.raises(ValueError, match="task 'copy' has no option 'max_digits'"):
        make_task("copy", max_digits=3)
    with pytest.raises(ValueError, match="num_train must be a positive int, got 0"):
        copy_task(num_train=0)
    with pytest.raises(ValueError, match="could only draw .* distinct examples"):
        copy_task(num_train=100, num_test=10, max_len=2, num_symbols=2)
