"""Tile sizes for the blocked path, chosen from the work each size leaves to do.

A sparse pattern (a narrow window, BigBird, a block-sparse table) visits fewer scores
with small tiles, but small tiles cost more per score (smaller matrix products, more
loop steps). :func:`cheapest` weighs the two: the candidate whose visited scores times
its measured cost per score is least.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["CANDIDATES", "FINE", "TILE_COST", "cheapest"]

#: Cost per visited score of a masked tile ``(block_q, block_kv)``, relative to
#: ``(512, 256)``: CPU, float32, B*N=8, H=64, T=4096, every tile partial (the mask
#: evaluated on it), interleaved medians of two runs on an idle machine (BENCHMARKS.md,
#: ``benchmarks/bench_sparse.py --only tiles``). Small tiles cost up to 2.7x more per
#: score, so they win only where they skip more than that.
TILE_COST: dict[tuple[int, int], float] = {
    (512, 512): 1.1,
    (512, 256): 1.0,
    (256, 256): 1.5,
    (256, 128): 1.6,
    (128, 128): 1.9,
    (64, 64): 2.05,
    (32, 32): 2.7,
}
#: The tile shapes ``block_sizes='auto'`` chooses from.
CANDIDATES = tuple(TILE_COST)
#: The finest candidate's edge: every candidate is a multiple of it.
FINE = 32


def cheapest(visited: Mapping[tuple[int, int], int]) -> tuple[int, int]:
    """The candidate of least ``visited[c] * TILE_COST[c]`` (``visited``: scores a
    candidate's tiles cover); ties go to the larger tile."""
    return min(visited, key=lambda c: (visited[c] * TILE_COST[c], -c[0] * c[1]))
