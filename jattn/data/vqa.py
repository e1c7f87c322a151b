"""A visual-question-answering toy, generated in-process: digits on a canvas, a question
in tokens, a one-word answer.

The canvas is a G x G grid of cells (8 x 8 pixels each); a cell holds a digit (drawn
from a 3 x 5 pixel font near the cell's centre, a pixel either way, with random
brightness and noise) or nothing. The questions:

- ``how many 7 ?``: how often the digit appears (``0`` to ``9``);
- ``what is left of 3 ?`` (``right``, ``above``, ``below``): the digit in the cell next
  to the one holding the 3, which appears exactly once, in that direction.

Every answer is a digit, so there are 10 classes. Answering takes both modalities: the
question names a digit to find among the cells, and then a neighbour or a count.
"""

from __future__ import annotations

import numpy as np

from jattn.data.dataset import check_sizes
from jattn.data.images import ClassificationDataset

__all__ = ["QUESTION_WORDS", "render_cells", "vqa_task"]

# 3 x 5 pixel digits ('#' on), rows top to bottom
_FONT = {
    0: ["###", "#.#", "#.#", "#.#", "###"],
    1: [".#.", "##.", ".#.", ".#.", "###"],
    2: ["###", "..#", "###", "#..", "###"],
    3: ["###", "..#", ".##", "..#", "###"],
    4: ["#.#", "#.#", "###", "..#", "..#"],
    5: ["###", "#..", "###", "..#", "###"],
    6: ["###", "#..", "###", "#.#", "###"],
    7: ["###", "..#", ".#.", ".#.", ".#."],
    8: ["###", "#.#", "###", "#.#", "###"],
    9: ["###", "#.#", "###", "..#", "###"],
}
GLYPHS = np.array([[[c == "#" for c in row] for row in _FONT[d]] for d in range(10)], np.float32)
CELL = 8
#: The questions' vocabulary: token 0 pads; the digits' tokens follow the words.
QUESTION_WORDS = (
    "<pad>", "what", "is", "left", "right", "above", "below", "of", "how", "many", "?",
    *(str(d) for d in range(10)),
)  # fmt: skip
_TOKEN = {w: i for i, w in enumerate(QUESTION_WORDS)}
QUESTION_LEN = 6  # "what is left of 3 ?"
# (row, column) step to the neighbour in each direction
_DIRECTIONS = {"left": (0, -1), "right": (0, 1), "above": (-1, 0), "below": (1, 0)}


def render_cells(cells: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``cells [n, G, G]`` digits (-1: empty) as images ``[n, 8G, 8G]``: each digit's glyph
    near the centre of its 8 x 8 cell (its top-left corner at row 1 or 2, column 2 or 3)
    with brightness in [0.7, 1], over uniform noise of up to 0.15 everywhere."""
    n, g, _ = cells.shape
    images = rng.uniform(0.0, 0.15, size=(n, g * CELL, g * CELL)).astype(np.float32)
    i, r, c = np.nonzero(cells >= 0)  # the cells with a digit
    top = r * CELL + rng.integers(1, 3, len(i))  # about the centre, a pixel either way
    left = c * CELL + rng.integers(2, 4, len(i))
    glyphs = GLYPHS[cells[i, r, c]] * rng.uniform(0.7, 1.0, (len(i), 1, 1)).astype(np.float32)
    rows = (top[:, None] + np.arange(5))[:, :, None]  # [k, 5, 1]
    cols = (left[:, None] + np.arange(3))[:, None, :]  # [k, 1, 3]
    at = (i[:, None, None], rows, cols)
    images[at] = np.maximum(images[at], glyphs)
    return images


def _question(words: list[str]) -> np.ndarray:
    ids = [_TOKEN[w] for w in words]
    return np.asarray(ids + [0] * (QUESTION_LEN - len(ids)), np.int32)


def _example(rng: np.random.Generator, grid: int, fill: float):
    """``(cells [G, G] with -1 for empty, question ids, answer)``: half the questions
    count, half ask for a neighbour (each direction a quarter of those)."""
    count = rng.random() < 0.5
    direction = list(_DIRECTIONS)[rng.integers(0, 4)]
    dr, dc = _DIRECTIONS[direction]
    for _ in range(_MAX_CANVASES):  # canvases until one answers the question
        cells = np.where(rng.random((grid, grid)) < fill, rng.integers(0, 10, (grid, grid)), -1)
        if count:
            digit = int(rng.integers(0, 10))
            return cells, _question(["how", "many", str(digit), "?"]), int(np.sum(cells == digit))
        anchors = []
        for r in range(grid):
            for c in range(grid):
                d = cells[r, c]
                nr, nc = r + dr, c + dc
                if d >= 0 and np.sum(cells == d) == 1 and 0 <= nr < grid and 0 <= nc < grid:
                    if cells[nr, nc] >= 0:
                        anchors.append((int(d), int(cells[nr, nc])))
        if anchors:
            digit, answer = anchors[rng.integers(0, len(anchors))]
            return cells, _question(["what", "is", direction, "of", str(digit), "?"]), answer
    raise ValueError(  # a small fill leaves too few neighbours: this would never end
        f"fill={fill} leaves a {grid}x{grid} grid too few digits: none of {_MAX_CANVASES} "
        f"canvases had two neighbours to ask about; raise fill (0.7 by default) or grid"
    )


#: Canvases drawn for one neighbour question before the fill is called too small (at
#: the default fill=0.7 on a 3x3 grid about 0.83 of the canvases have one).
_MAX_CANVASES = 10_000


def _examples(rng: np.random.Generator, n: int, grid: int, fill: float):
    """``({'images', 'question'}, answers)`` of ``n`` examples drawn with ``rng``."""
    cells = np.zeros((n, grid, grid), np.int64)
    questions = np.zeros((n, QUESTION_LEN), np.int32)
    answers = np.zeros(n, np.int32)
    for i in range(n):
        cells[i], questions[i], answers[i] = _example(rng, grid, fill)
    images = render_cells(cells, rng)[..., None]
    return {"images": images, "question": questions}, answers


def _split(n, rng, grid, fill, sampler=None) -> ClassificationDataset:
    inputs, answers = _examples(rng, n, grid, fill)
    names = tuple(str(d) for d in range(10))
    sizes = {"vocab_size": len(QUESTION_WORDS)}
    return ClassificationDataset(inputs, answers, names, sizes=sizes, sampler=sampler)


def vqa_task(*, num_train: int = 1000, num_test: int = 1000, seed: int = 0, grid: int = 3,
             fill: float = 0.7):  # fmt: skip
    """``(train, test)``: ``images [N, 8G, 8G, 1]``, ``question [N, 6]`` token ids (0 pads;
    :data:`QUESTION_WORDS`), the answer digit as the label. ``fill``: the chance that a
    cell holds a digit.

    Training batches are fresh examples each step (the train split's ``sampler``, a
    function of the batch's ``(seed, step)``); its ``num_train`` stored examples are
    for looking at. The test split is fixed, from another random stream of ``seed``."""
    check_sizes(num_train=num_train, num_test=num_test, grid=grid)
    if not 2 <= grid <= 3:
        raise ValueError(f"grid must be 2 or 3 (a count answer is one digit), got {grid}")
    if isinstance(fill, bool) or not isinstance(fill, int | float) or not 0 < fill <= 1:
        raise ValueError(f"fill must be a number in (0, 1], got {fill!r}")
    streams = np.random.SeedSequence(seed).spawn(2)

    def sampler(rng, n):
        return _examples(rng, n, grid, fill)

    train = _split(num_train, np.random.default_rng(streams[0]), grid, fill, sampler)
    return train, _split(num_test, np.random.default_rng(streams[1]), grid, fill)
