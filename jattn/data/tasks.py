"""Algorithmic toy tasks: copy, reverse, sort and addition, generated in-process.

Each task returns ``(train, test)`` :class:`Seq2SeqDataset` splits whose sources
never overlap. Everything is a pure function of ``seed``.
"""

from __future__ import annotations

import string

import numpy as np

from jattn.data.dataset import Seq2SeqDataset, check_sizes, split_unique
from jattn.data.tokenizer import CharTokenizer

__all__ = ["addition_task", "copy_task", "reverse_task", "sort_task"]


def _string_task(transform, *, num_train, num_test, seed, min_len, max_len, num_symbols):
    check_sizes(
        num_train=num_train,
        num_test=num_test,
        min_len=min_len,
        max_len=max_len,
        num_symbols=num_symbols,
    )
    if min_len > max_len:
        raise ValueError(f"min_len={min_len} must not exceed max_len={max_len}")
    if num_symbols > 26:
        raise ValueError(f"num_symbols must be at most 26, got {num_symbols}")
    alphabet = string.ascii_lowercase[:num_symbols]

    def sample(rng):
        n = int(rng.integers(min_len, max_len + 1))
        return "".join(alphabet[i] for i in rng.integers(0, num_symbols, size=n))

    rng = np.random.default_rng(seed)
    tok = CharTokenizer(alphabet)
    splits = split_unique(sample, num_train, num_test, rng)
    return tuple(
        Seq2SeqDataset.from_texts(
            src, [transform(s) for s in src], tok, tok, src_len=max_len + 1, tgt_len=max_len + 1
        )
        for src in splits
    )


def copy_task(*, num_train=10000, num_test=500, seed=0, min_len=1, max_len=10, num_symbols=10):
    """``"abca" -> "abca"`` over the first ``num_symbols`` lowercase letters."""
    return _string_task(lambda s: s, **locals())


def reverse_task(*, num_train=10000, num_test=500, seed=0, min_len=1, max_len=10, num_symbols=10):
    """``"abca" -> "acba"``."""
    return _string_task(lambda s: s[::-1], **locals())


def sort_task(*, num_train=10000, num_test=500, seed=0, min_len=1, max_len=10, num_symbols=10):
    """``"cabd" -> "abcd"``."""
    return _string_task(lambda s: "".join(sorted(s)), **locals())


def addition_task(*, num_train=10000, num_test=500, seed=0, max_digits=3):
    """``"123+45" -> "168"``: operands with 1..``max_digits`` digits, digit counts uniform."""
    check_sizes(num_train=num_train, num_test=num_test, max_digits=max_digits)
    if max_digits > 18:  # operands are drawn as int64
        raise ValueError(f"max_digits must be at most 18, got {max_digits}")

    def operand(rng):
        digits = int(rng.integers(1, max_digits + 1))
        return int(rng.integers(0 if digits == 1 else 10 ** (digits - 1), 10**digits))

    rng = np.random.default_rng(seed)
    splits = split_unique(lambda r: (operand(r), operand(r)), num_train, num_test, rng)
    src_tok = CharTokenizer("0123456789+")
    tgt_tok = CharTokenizer("0123456789")
    return tuple(
        Seq2SeqDataset.from_texts(
            [f"{a}+{b}" for a, b in pairs],
            [str(a + b) for a, b in pairs],
            src_tok,
            tgt_tok,
            src_len=2 * max_digits + 2,
            tgt_len=max_digits + 2,
        )
        for pairs in splits
    )
