"""Which assignments the guided sampler scores: every one, or a pool around the front.

Assignments are 0/1 rows over the free units (1 = the unit runs FP16). :func:`candidates`
returns every row when there are at most :data:`ENUMERATE_MAX_UNITS` units, else a pool around
the current front (one and two adjacent flips), contiguous blocks and random rows; rows already
evaluated or running are left out (by :func:`row_key`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "ENUMERATE_MAX_UNITS",
    "POOL_SIZE",
    "all_rows",
    "candidates",
    "row_key",
    "unique_rows",
]

#: Up to this many free units every assignment is a candidate (2**14 = 16384 rows).
ENUMERATE_MAX_UNITS = 14
#: Candidate pool size beyond :data:`ENUMERATE_MAX_UNITS`.
POOL_SIZE = 4000


def all_rows(n: int) -> np.ndarray:
    """Every assignment of ``n`` units as uint8 rows (row k: bit i of k is unit i)."""
    k = np.arange(1 << n, dtype=np.int64)
    return ((k[:, None] >> np.arange(n)) & 1).astype(np.uint8)


def candidates(
    n: int,
    front: np.ndarray,
    edges: Sequence[tuple[int, int]],
    rng: np.random.Generator,
    exclude: set[bytes] | frozenset[bytes] = frozenset(),
    size: int = POOL_SIZE,
) -> np.ndarray:
    """Assignments to score: all up to :data:`ENUMERATE_MAX_UNITS` units, else a pool.

    Rows whose :func:`row_key` is in ``exclude`` (evaluated, running) are left out.

    The pool holds the rows of ``front`` with one unit flipped and with both units of an edge
    flipped, contiguous blocks (graph order) of FP32 units in all-FP16 and of FP16 units in
    all-FP32, and random rows of random density; duplicates removed.
    """
    if n <= ENUMERATE_MAX_UNITS:
        return unique_rows(all_rows(n), exclude) if exclude else all_rows(n)
    parts: list[np.ndarray] = []
    eye = np.eye(n, dtype=np.uint8)
    pair = np.zeros((len(edges), n), np.uint8)
    for k, (a, b) in enumerate(edges):
        pair[k, a] = pair[k, b] = 1
    for row in np.asarray(front, np.uint8):
        parts.append(row ^ eye)
        if len(edges):
            parts.append(row ^ pair)
    lengths = sorted({1, 2, 3, 4, max(1, n // 8), max(1, n // 4), max(1, n // 2)})
    starts = [(s, k) for k in lengths for s in range(n - k + 1)]
    if starts:
        block = np.zeros((len(starts), n), np.uint8)
        for j, (s, k) in enumerate(starts):
            block[j, s : s + k] = 1
        parts += [block, 1 - block]
    pool = np.concatenate(parts) if parts else np.zeros((0, n), np.uint8)
    if pool.shape[0] > size:
        pool = pool[rng.choice(pool.shape[0], size, replace=False)]
    n_random = max(size // 4, size - pool.shape[0])
    density = rng.random((n_random, 1))
    parts = [pool, (rng.random((n_random, n)) < density).astype(np.uint8)]
    return unique_rows(np.concatenate(parts), exclude)


def row_key(row: np.ndarray) -> bytes:
    """A hashable key of a 0/1 row (its packed bits)."""
    return np.packbits(row).tobytes()


def unique_rows(
    rows: np.ndarray, exclude: set[bytes] | frozenset[bytes] = frozenset()
) -> np.ndarray:
    """``rows`` without repeats or keys in ``exclude``, in first-seen order.

    Rows are hashed by :func:`row_key` (packed bits), not sorted.
    """
    seen: set[bytes] = set(exclude)
    keep = []
    for k, key in enumerate(np.packbits(rows, axis=1)):
        b = key.tobytes()
        if b not in seen:
            seen.add(b)
            keep.append(k)
    return rows[keep]
