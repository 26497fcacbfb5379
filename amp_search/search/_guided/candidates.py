"""Which assignments the guided sampler scores: every one, or a pool around the front.

Assignments are rows of codes over the free units: the unit's index in
:data:`~amp_search.search.space.CHOICES` (0 = FP32, 1 = FP16, 2 = BF16). An FP32/FP16 search
has 0/1 rows; a search with BF16 (:func:`is_ternary` of its choices) has rows where each unit
takes only the codes it admits (``allowed``: each unit's codes). :func:`candidates` returns
every row when there are at most :data:`ENUMERATE_MAX_UNITS` units (0/1), or at most
:data:`ENUMERATE_MAX_ROWS` assignments (with BF16), else a pool around the current front (one
and two adjacent changes), contiguous blocks and random rows; rows already evaluated or running
are left out (by :func:`row_key`). :func:`binary_features` is how the models see a row with
BF16: "runs low precision" and "runs BF16" per unit, so FP32 -> FP16 and FP16 -> BF16 are one
step each and FP32 -> BF16 two.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "BF16",
    "ENUMERATE_MAX_ROWS",
    "ENUMERATE_MAX_UNITS",
    "FP16",
    "POOL_SIZE",
    "all_rows",
    "enumerated",
    "binary_features",
    "candidates",
    "clip_rows",
    "is_ternary",
    "row_key",
    "unique_rows",
]

#: Codes of the low precisions in a row (FP32 is 0).
FP16, BF16 = 1, 2
#: Up to this many free units every assignment is a candidate (2**14 = 16384 rows).
ENUMERATE_MAX_UNITS = 14
#: With BF16: every assignment is a candidate while there are at most this many.
ENUMERATE_MAX_ROWS = 1 << ENUMERATE_MAX_UNITS
#: Candidate pool size beyond :data:`ENUMERATE_MAX_UNITS`.
POOL_SIZE = 4000


def all_rows(n: int) -> np.ndarray:
    """Every assignment of ``n`` units as uint8 rows (row k: bit i of k is unit i)."""
    k = np.arange(1 << n, dtype=np.int64)
    return ((k[:, None] >> np.arange(n)) & 1).astype(np.uint8)


def enumerated(n: int, allowed: Sequence[Sequence[int]] | None = None) -> bool:
    """Whether :func:`candidates` scores every assignment (not a pool)."""
    if allowed is not None and is_ternary(allowed):
        return int(np.prod([len(a) for a in allowed], dtype=np.float64)) <= ENUMERATE_MAX_ROWS
    return n <= ENUMERATE_MAX_UNITS


def is_ternary(allowed: Sequence[Sequence[int]] | None) -> bool:
    """Whether some unit may take BF16 (rows are then more than 0/1)."""
    return allowed is not None and any(BF16 in a for a in allowed)


def binary_features(rows: np.ndarray) -> np.ndarray:
    """``[low | bf16]`` 0/1 columns of rows of codes (2 per unit; see the module docstring)."""
    r = np.asarray(rows, dtype=np.uint8)
    return np.hstack([r > 0, r == BF16]).astype(np.uint8)


def clip_rows(rows: np.ndarray, allowed: Sequence[Sequence[int]]) -> np.ndarray:
    """Rows with each code a unit does not admit replaced: the other low precision, else FP32."""
    out = np.array(rows, dtype=np.uint8, copy=True)
    for i, codes in enumerate(allowed):
        col = out[:, i]
        for c in (FP16, BF16):
            if c not in codes:
                other = BF16 if c == FP16 else FP16
                col[col == c] = other if other in codes else 0
    return out


def candidates(
    n: int,
    front: np.ndarray,
    edges: Sequence[tuple[int, int]],
    rng: np.random.Generator,
    exclude: set[bytes] | frozenset[bytes] = frozenset(),
    size: int = POOL_SIZE,
    allowed: Sequence[Sequence[int]] | None = None,
) -> np.ndarray:
    """Assignments to score: all up to :data:`ENUMERATE_MAX_UNITS` units, else a pool.

    Rows whose :func:`row_key` is in ``exclude`` (evaluated, running) are left out. With
    ``allowed`` giving some unit BF16, :func:`ternary_candidates`.

    The pool holds the rows of ``front`` with one unit flipped and with both units of an edge
    flipped, contiguous blocks (graph order) of FP32 units in all-FP16 and of FP16 units in
    all-FP32, and random rows of random density; duplicates removed.
    """
    if allowed is not None and is_ternary(allowed):
        return ternary_candidates(allowed, front, edges, rng, exclude, size)
    if enumerated(n):
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


def ternary_candidates(
    allowed: Sequence[Sequence[int]],
    front: np.ndarray,
    edges: Sequence[tuple[int, int]],
    rng: np.random.Generator,
    exclude: set[bytes] | frozenset[bytes] = frozenset(),
    size: int = POOL_SIZE,
) -> np.ndarray:
    """With BF16: every assignment up to :data:`ENUMERATE_MAX_ROWS`, else a pool.

    The pool, as :func:`candidates`' for 0/1 rows: the rows of ``front`` with one unit changed
    to each code it admits and with both units of an edge set to one code; contiguous blocks
    of each precision in rows all of another (FP32 in all-FP16 and in all-BF16, FP16 and BF16
    in all-FP32, BF16 in all-FP16); random rows of random low-precision density and BF16
    share. Every row is :func:`clip_rows`'d to what its units admit.
    """
    n = len(allowed)
    if enumerated(n, allowed):
        grids = np.meshgrid(*[np.asarray(a, np.uint8) for a in allowed], indexing="ij")
        rows = np.stack([g.ravel() for g in grids], axis=1).astype(np.uint8)
        return unique_rows(rows, exclude)
    parts: list[np.ndarray] = []
    for row in np.asarray(front, np.uint8):
        for i, codes in enumerate(allowed):
            for c in codes:
                if c != row[i]:
                    r = row.copy()
                    r[i] = c
                    parts.append(r[None])
        for a, b in edges:
            for c in set(allowed[a]) & set(allowed[b]):
                r = row.copy()
                r[a] = r[b] = c
                parts.append(r[None])
    lengths = sorted({1, 2, 3, 4, max(1, n // 8), max(1, n // 4), max(1, n // 2)})
    starts = [(s, k) for k in lengths for s in range(n - k + 1)]
    for base, fill in ((FP16, 0), (BF16, 0), (0, FP16), (0, BF16), (FP16, BF16)):
        block = np.full((len(starts), n), base, np.uint8)
        for j, (s, k) in enumerate(starts):
            block[j, s : s + k] = fill
        parts.append(block)
    pool = clip_rows(np.concatenate(parts), allowed) if parts else np.zeros((0, n), np.uint8)
    if pool.shape[0] > size:
        pool = pool[rng.choice(pool.shape[0], size, replace=False)]
    n_random = max(size // 4, size - pool.shape[0])
    low = rng.random((n_random, n)) < rng.random((n_random, 1))
    bf = rng.random((n_random, n)) < rng.random((n_random, 1))
    random = np.where(low, np.where(bf, BF16, FP16), 0).astype(np.uint8)
    return unique_rows(np.concatenate([pool, clip_rows(random, allowed)]), exclude)


def row_key(row: np.ndarray) -> bytes:
    """A hashable key of a row of codes (its bytes)."""
    return np.ascontiguousarray(row, dtype=np.uint8).tobytes()


def unique_rows(
    rows: np.ndarray, exclude: set[bytes] | frozenset[bytes] = frozenset()
) -> np.ndarray:
    """``rows`` without repeats or keys in ``exclude``, in first-seen order.

    Rows are hashed by :func:`row_key` (their bytes), not sorted.
    """
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    seen: set[bytes] = set(exclude)
    keep = []
    for k in range(rows.shape[0]):
        b = rows[k].tobytes()
        if b not in seen:
            seen.add(b)
            keep.append(k)
    return rows[keep]
