"""The common sequence-to-sequence dataset: padded int32 arrays plus tokenizers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from jattn.data.tokenizer import BOS, CharTokenizer

__all__ = ["Seq2SeqDataset", "eval_batches", "split_unique"]


@dataclasses.dataclass(frozen=True)
class Seq2SeqDataset:
    """Source/target pairs as fixed-length padded arrays.

    Attributes:
      src: ``[N, S]`` int32 source ids, each row ``text + EOS`` then PAD.
      tgt: ``[N, T]`` int32 target ids (the labels), ``text + EOS`` then PAD.
      src_texts, tgt_texts: the strings behind the rows.
      src_tokenizer, tgt_tokenizer: their character tokenizers.
    """

    src: np.ndarray
    tgt: np.ndarray
    src_texts: tuple[str, ...]
    tgt_texts: tuple[str, ...]
    src_tokenizer: CharTokenizer
    tgt_tokenizer: CharTokenizer

    @classmethod
    def from_texts(
        cls,
        src_texts: Sequence[str],
        tgt_texts: Sequence[str],
        src_tokenizer: CharTokenizer,
        tgt_tokenizer: CharTokenizer,
        *,
        src_len: int,
        tgt_len: int,
    ) -> Seq2SeqDataset:
        """Encodes and pads the texts (``src_len``/``tgt_len`` include EOS)."""
        return cls(
            src=src_tokenizer.encode_batch(src_texts, src_len),
            tgt=tgt_tokenizer.encode_batch(tgt_texts, tgt_len),
            src_texts=tuple(src_texts),
            tgt_texts=tuple(tgt_texts),
            src_tokenizer=src_tokenizer,
            tgt_tokenizer=tgt_tokenizer,
        )

    def __len__(self) -> int:
        return len(self.src)

    @property
    def src_vocab_size(self) -> int:
        return self.src_tokenizer.vocab_size

    @property
    def tgt_vocab_size(self) -> int:
        return self.tgt_tokenizer.vocab_size

    def model_sizes(self) -> dict:
        """What a model needs of the data: ``src_vocab_size``, ``tgt_vocab_size``."""
        return {"src_vocab_size": self.src_vocab_size, "tgt_vocab_size": self.tgt_vocab_size}

    def decode(self, ids) -> str:
        """Target-side text of ``ids`` (up to EOS)."""
        return self.tgt_tokenizer.decode(ids)

    def decode_src(self, ids) -> str:
        """Source-side text of ``ids`` (up to EOS)."""
        return self.src_tokenizer.decode(ids)

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``indices`` as ``{'src' [B,S], 'tgt_in' [B,T], 'tgt' [B,T]}``.

        ``tgt_in`` is the teacher-forcing input: BOS followed by ``tgt`` shifted right.
        """
        tgt = self.tgt[indices]
        tgt_in = np.concatenate([np.full_like(tgt[:, :1], BOS), tgt[:, :-1]], axis=1)
        return {"src": self.src[indices], "tgt_in": tgt_in, "tgt": tgt}

    def sample_batch(self, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """The training batch of ``step``: a pure function of ``(seed, step)``.

        A resumed run therefore sees exactly the batches an uninterrupted one would.
        """
        rng = np.random.default_rng([seed, step])
        return self.batch(rng.integers(0, len(self), size=batch_size))


def split_unique(
    sample: Callable[[np.random.Generator], object],
    num_train: int,
    num_test: int,
    rng: np.random.Generator,
    *,
    max_tries: int = 20,
) -> tuple[list, list]:
    """Draws ``num_train + num_test`` distinct keys with ``sample(rng)`` and splits them.

    Train and test share no key. Raises ValueError when the key space is too small.
    """
    need = num_train + num_test
    keys: dict = {}
    for _ in range(max_tries * need):
        keys.setdefault(sample(rng), None)
        if len(keys) == need:
            break
    else:
        raise ValueError(
            f"could only draw {len(keys)} distinct examples, need num_train + num_test = {need}; "
            "lower them or enlarge the task"
        )
    keys = list(keys)
    return keys[:num_train], keys[num_train:]


def eval_batches(ds, batch_size: int, key: str, fill: int):
    """``(n, batch)``: ``ds`` (any data set with ``len`` and ``batch(indices)``, of every
    kind of task) in order, in batches of ``batch_size`` rows (one compiled shape); the
    last one is filled up with copies of row 0 whose ``batch[key]`` is set
    to ``fill`` (padding that the metrics leave out), ``n`` the real rows."""
    check_sizes(batch_size=batch_size)  # -1 gave no batch at all: an empty evaluation
    for start in range(0, len(ds), batch_size):
        idx = np.arange(start, min(start + batch_size, len(ds)))
        n = len(idx)
        batch = ds.batch(np.concatenate([idx, np.zeros(batch_size - n, idx.dtype)]))
        batch[key][n:] = fill
        yield n, batch


def check_sizes(**sizes: int) -> None:
    """A ValueError naming the first of ``sizes`` (a task's counts and dimensions) that is
    not a positive int."""
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def image_sizes(images: np.ndarray) -> dict:
    """``image_size [H, W]`` and ``in_channels`` C of ``images [N, H, W, C]``, as a model
    takes them."""
    _, h, w, c = images.shape
    return {"image_size": [int(h), int(w)], "in_channels": int(c)}
