"""Character tokenizer with the shared special ids PAD=0, BOS=1, EOS=2."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["BOS", "EOS", "PAD", "CharTokenizer"]

#: The padding token's id (every tokenizer's first special token).
PAD = 0
#: The beginning-of-sequence token's id.
BOS = 1
#: The end-of-sequence token's id.
EOS = 2
_SPECIALS = ("<pad>", "<bos>", "<eos>")


class CharTokenizer:
    """Maps characters to ids ``3, 4, ...`` after the three special ids.

    Args:
      alphabet: the characters of the vocabulary (duplicates are dropped, order kept).
    """

    def __init__(self, alphabet: Iterable[str]):
        if not hasattr(alphabet, "__iter__"):  # an int was "object of type 'int' has no len()"
            raise TypeError(f"alphabet must be characters (a str or strs), got {alphabet!r}")
        chars = list(dict.fromkeys(alphabet))
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"alphabet entries must be single characters, got {c!r}")
        self.chars = tuple(chars)
        self._ids = {c: i + len(_SPECIALS) for i, c in enumerate(chars)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        """A tokenizer over the sorted set of characters in ``texts``."""
        return cls(sorted(set("".join(texts))))

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included."""
        return len(_SPECIALS) + len(self.chars)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = True) -> list[int]:
        """Ids of ``text`` (with EOS at the end by default)."""
        try:
            ids = [self._ids[c] for c in text]
        except KeyError as e:
            raise ValueError(
                f"character {e.args[0]!r} of {text!r} is not in the vocabulary"
            ) from None
        return ([BOS] if add_bos else []) + ids + ([EOS] if add_eos else [])

    def encode_batch(self, texts: Sequence[str], length: int) -> np.ndarray:
        """``[len(texts), length]`` int32 ids, each text followed by EOS then PAD."""
        out = np.full((len(texts), length), PAD, np.int32)
        for i, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > length:
                raise ValueError(f"{text!r} needs {len(ids)} ids with EOS, more than {length}")
            out[i, : len(ids)] = ids
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` up to the first EOS; PAD and BOS are skipped."""
        ids = np.asarray(ids)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):  # 3.0 is not an id
            raise TypeError(f"ids must be integers, got dtype {ids.dtype}")
        chars = []
        for i in ids.reshape(-1).tolist():
            if i == EOS:
                break
            if not 0 <= i < self.vocab_size:  # not an id of this vocabulary
                chars.append("?")
            elif i >= len(_SPECIALS):
                chars.append(self.chars[i - len(_SPECIALS)])
        return "".join(chars)

    def token(self, i: int) -> str:
        """The printable label of one id (specials as ``<eos>`` etc.)."""
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"token id must be an int, got {i!r}")
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return _SPECIALS[i] if i < len(_SPECIALS) else self.chars[i - len(_SPECIALS)]
