"""Which input columns of each LoRA A to encrypt: sensitivity, negotiation, and the column swap."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def sensitivity(a: np.ndarray, input_norm: np.ndarray) -> np.ndarray:
    """S_j = |sum_k A_kj| * ||X_:,j||_2 (Wanda-style; |sum|, as the reference code).

    a: (r, n) LoRA A; input_norm: (n,) L2 norm of input feature j over calibration tokens.
    """
    return np.abs(np.asarray(a).sum(axis=0)) * np.asarray(input_norm)


def top_columns(scores: np.ndarray, k: int) -> list[int]:
    """The k highest-scoring columns, best first (ties: lower index first). Only this order is uploaded."""
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores)))
    return [int(j) for j in order[:k]]


def negotiate(rank_lists: Sequence[Sequence[int]], length: int) -> list[int]:
    """Merge clients' ordered top-k lists into one global ordered subset of ``length`` columns.

    Ordered by how many clients listed a column, then by its best (smallest) position in
    any list, then by index. Client i encrypts the first k_i entries, so the cipher part
    of every upload is a prefix of one list and the aggregate's ciphertexts number
    max_i k_i, not the size of the union.
    """
    hits: dict[int, int] = {}
    best: dict[int, int] = {}
    for ranks in rank_lists:
        for pos, col in enumerate(ranks):
            hits[col] = hits.get(col, 0) + 1
            best[col] = min(best.get(col, pos), pos)
    merged = sorted(hits, key=lambda c: (-hits[c], best[c], c))
    if len(merged) < length:
        raise ValueError(f"clients listed {len(merged)} distinct columns, fewer than the {length} needed")
    return merged[:length]


def swap_permutation(selected: Sequence[int], n: int) -> np.ndarray:
    """An involution p of range(n) that moves ``selected`` into the last k positions.

    Selected columns already in the tail stay; the others swap, in sorted order, with
    the non-selected tail columns. ``A[:, p]`` is the swapped matrix and applying ``p``
    twice is the identity.
    """
    sel = sorted(set(int(j) for j in selected))
    if len(sel) != len(selected) or (sel and not 0 <= sel[0] <= sel[-1] < n):
        raise ValueError(f"selected columns {list(selected)} must be distinct and in [0, {n})")
    k = len(sel)
    tail = set(range(n - k, n))
    movers = [j for j in sel if j not in tail]
    holes = [j for j in range(n - k, n) if j not in set(sel)]
    p = np.arange(n)
    for j, h in zip(movers, holes):
        p[j], p[h] = h, j
    return p
