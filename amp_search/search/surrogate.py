"""The numerics of the guided sampler: a latency model, a Gaussian process, EHVI, candidates.

Everything here works on assignments as 0/1 rows (1 = the unit runs FP16), with numpy only:

- :class:`LatencyModel`: latency as ``base + sum_i unit_i * x_i + sum_(i,j) edge_ij * [x_i !=
  x_j]`` over the units and the producer -> consumer edges between them. Per-unit FP16 savings
  plus what a precision boundary costs (Casts, lost fusion) is how the roofline estimator
  prices a model, so fitted on estimator calls the model reproduces it exactly on chains and
  within about 1% on the PP-OCR recognizer's 85 units. Fitted on measured trials (fewer than
  it has terms, at first) it takes the smallest terms that fit.
- :class:`DeviationGP`: a Gaussian process on log10(deviation) with an exponential Hamming
  kernel and a linear mean in a prior feature (the profile's per-unit FP16 error, combined as
  a root sum of squares over the FP16 units); hyperparameters by marginal likelihood over a
  small grid.
- :func:`expected_hvi`: the expected hypervolume improvement of a candidate whose latency is
  known (the latency model) and whose log deviation is Gaussian (the GP): a one-dimensional
  integral with a closed form per segment of the current front.
- :func:`candidates`: every assignment when there are few units, else a pool around the
  current front (one and two adjacent flips), contiguous blocks and random rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from amp_search.results.pareto import front_order

__all__ = [
    "ENUMERATE_MAX_UNITS",
    "DeviationGP",
    "LatencyModel",
    "all_rows",
    "candidates",
    "expected_hvi",
    "nondominated",
    "prior_feature",
    "row_key",
    "unique_rows",
]

#: Up to this many free units every assignment is a candidate (2**14 = 16384 rows).
ENUMERATE_MAX_UNITS = 14
#: Candidate pool size beyond :data:`ENUMERATE_MAX_UNITS`.
POOL_SIZE = 4000
#: Length scales (in flipped units) and noise levels the GP chooses from.
LENGTH_SCALES = (0.5, 1.0, 2.0, 4.0, 8.0)
NOISES = (1e-3, 1e-2, 1e-1)
#: Smallest prior variance of log10 deviation (decades squared). Fitted by likelihood alone,
#: the variance collapses when the first trials happen to deviate alike (the PP-OCR
#: recognizer: every early trial near 1e-2, while rare assignments reach 3e-4), and the
#: sampler stops exploring; this floor keeps roughly half a decade of doubt everywhere.
MIN_VARIANCE = 0.3

_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)


def all_rows(n: int) -> np.ndarray:
    """Every assignment of ``n`` units as uint8 rows (row k: bit i of k is unit i)."""
    k = np.arange(1 << n, dtype=np.int64)
    return ((k[:, None] >> np.arange(n)) & 1).astype(np.uint8)


class LatencyModel:
    """Latency of an assignment from per-unit terms and per-edge boundary terms.

    Args:
        n_units: Number of units (columns of the rows).
        edges: ``(producer, consumer)`` unit index pairs.
        coef: ``[base, unit_0 .. unit_n-1, edge_0 .. edge_m-1]``; fitted later if omitted.
    """

    def __init__(
        self, n_units: int, edges: Sequence[tuple[int, int]], coef: Sequence[float] | None = None
    ) -> None:
        self.n = n_units
        self.edges = [(int(a), int(b)) for a, b in edges]
        self._a = np.array([a for a, _ in self.edges], dtype=np.int64)
        self._b = np.array([b for _, b in self.edges], dtype=np.int64)
        self.coef = None if coef is None else np.asarray(coef, dtype=np.float64)

    def features(self, rows: np.ndarray) -> np.ndarray:
        """``[1, x, [x_a != x_b] per edge]`` for each row."""
        x = np.asarray(rows, dtype=np.float64)
        boundary = np.abs(x[:, self._a] - x[:, self._b])
        return np.hstack([np.ones((x.shape[0], 1)), x, boundary])

    def design(self) -> np.ndarray:
        """Rows that identify every coefficient: none, all, each unit, each edge's pair."""
        n = self.n
        rows = [np.zeros(n, np.uint8), np.ones(n, np.uint8)]
        for i in range(n):
            r = np.zeros(n, np.uint8)
            r[i] = 1
            rows.append(r)
        for a, b in self.edges:
            r = np.zeros(n, np.uint8)
            r[a] = r[b] = 1
            rows.append(r)
        return unique_rows(np.array(rows))

    def fit(self, rows: np.ndarray, latency: np.ndarray) -> LatencyModel:
        """Least squares; with fewer rows than terms, the smallest-norm terms around the mean."""
        f = self.features(rows)[:, 1:]
        y = np.asarray(latency, dtype=np.float64)
        fm, ym = f.mean(axis=0), float(y.mean())
        terms = np.linalg.lstsq(f - fm, y - ym, rcond=None)[0]
        self.coef = np.concatenate([[ym - float(fm @ terms)], terms])
        return self

    @property
    def coefficients(self) -> np.ndarray:
        """``[base, units..., edges...]`` (given or fitted)."""
        if self.coef is None:
            raise ValueError("The latency model has no coefficients: fit it first.")
        return self.coef

    def predict(self, rows: np.ndarray) -> np.ndarray:
        """Latency of each row."""
        c = self.coefficients
        x = np.asarray(rows, dtype=np.float32)
        out = c[0] + x @ c[1 : 1 + self.n]
        if self.edges:
            out = out + np.abs(x[:, self._a] - x[:, self._b]) @ c[1 + self.n :]
        return np.asarray(out, dtype=np.float64)


def prior_feature(rows: np.ndarray, unit_error: Sequence[float]) -> np.ndarray:
    """log10 of the root sum of squares of the FP16 units' own errors (a deviation proxy)."""
    w = np.asarray(unit_error, dtype=np.float64) ** 2
    rss = np.sqrt(np.asarray(rows, dtype=np.float64) @ w)
    floor = max(float(np.sqrt(w.max())) * 1e-6, 1e-30) if w.size else 1e-30
    return np.asarray(np.log10(rss + floor))


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # Exact in float32 (integers below 2**24), and twice as fast as float64.
    fa, fb = a.astype(np.float32), b.astype(np.float32)
    return np.asarray(fa @ (1.0 - fb).T + (1.0 - fa) @ fb.T, dtype=np.float64)


class DeviationGP:
    """A GP on log10 deviation over assignments (see the module docstring).

    Args:
        rows: Training assignments (0/1 rows).
        y: Their log10 deviation.
        prior: Their prior feature (:func:`prior_feature`), or None for a constant mean.
    """

    def __init__(self, rows: np.ndarray, y: np.ndarray, prior: np.ndarray | None = None) -> None:
        self.rows = np.asarray(rows, dtype=np.uint8)
        self.y = np.asarray(y, dtype=np.float64)
        self.use_prior = prior is not None
        f = self._basis(prior, len(self.y))
        h = _hamming(self.rows, self.rows)
        eye = np.eye(len(self.y))
        best: tuple[float, ...] | None = None
        for ls in LENGTH_SCALES:
            k0 = np.exp(-h / ls)
            for noise in NOISES:
                try:
                    chol = np.linalg.cholesky(k0 + noise * eye)
                except np.linalg.LinAlgError:
                    continue
                kf = _solve(chol, f)
                a = f.T @ kf + 1e-9 * np.eye(f.shape[1])
                beta = np.linalg.solve(a, kf.T @ self.y)
                r = self.y - f @ beta
                alpha = _solve(chol, r)
                sig2 = max(float(r @ alpha) / len(self.y), 1e-12)
                nll = 0.5 * len(self.y) * math.log(sig2) + float(np.log(np.diag(chol)).sum())
                if best is None or nll < best[0]:
                    best = (nll, ls, noise)
                    self._state = (chol, beta, alpha, sig2)
        if best is None:
            raise np.linalg.LinAlgError("no kernel setting gave a positive definite matrix")
        self.length_scale, self.noise = best[1], best[2]

    @staticmethod
    def _basis(prior: np.ndarray | None, n: int) -> np.ndarray:
        if prior is None:
            return np.ones((n, 1))
        return np.stack([np.ones(n), np.asarray(prior, dtype=np.float64)], axis=1)

    def predict(
        self, rows: np.ndarray, prior: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of log10 deviation at ``rows``."""
        chol, beta, alpha, sig2 = self._state
        sig2 = max(sig2, MIN_VARIANCE)
        ks = np.exp(-_hamming(np.asarray(rows, np.uint8), self.rows) / self.length_scale)
        f = self._basis(prior if self.use_prior else None, ks.shape[0])
        mu = f @ beta + ks @ alpha
        v = _tri_solve(chol, ks.T)
        var = sig2 * np.maximum(1.0 - (v * v).sum(axis=0), 1e-12)
        return np.asarray(mu), np.asarray(np.sqrt(var))


def _tri_solve(chol: np.ndarray, b: np.ndarray) -> np.ndarray:
    # Lower-triangular solve; numpy has no dedicated one, and these systems are small.
    return np.asarray(np.linalg.solve(chol, b))


def _solve(chol: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray(np.linalg.solve(chol.T, np.linalg.solve(chol, b)))


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): numpy has no erf, scipy is not a need.
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    c = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
    poly = t * (c[0] + t * (c[1] + t * (c[2] + t * (c[3] + t * c[4]))))
    return np.asarray(s * (1.0 - poly * np.exp(-a * a)))


def _psi(z: np.ndarray) -> np.ndarray:
    """Integral of the standard normal CDF: z * Phi(z) + phi(z)."""
    cdf = 0.5 * (1.0 + _erf(z / _SQRT2))
    return np.asarray(z * cdf + np.exp(-0.5 * z * z) / _SQRT2PI)


def nondominated(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-dominated points (both minimized), fastest first."""
    return [points[k] for k in front_order([p[0] for p in points], [p[1] for p in points])]


def expected_hvi(
    x: np.ndarray,
    mu: np.ndarray,
    sd: np.ndarray,
    front: Sequence[tuple[float, float]],
    ref: tuple[float, float],
    floor: float,
) -> np.ndarray:
    """Expected hypervolume improvement of candidates with known ``x`` and y ~ N(mu, sd^2).

    The improvement of a point (x, y) over ``front`` inside the box below ``ref`` is the
    integral over t from max(y, floor) to ref_y of max(0, L(t) - x), where L(t) is the
    smallest x among front points with y <= t (ref_x if none); its expectation is the
    integral of P(Y <= t) times the same width, in closed form on each segment where L is
    constant.
    """
    sd = np.maximum(sd, 1e-9)
    levels = sorted({floor, ref[1], *(p[1] for p in front if floor < p[1] < ref[1])})
    total = np.zeros_like(mu, dtype=np.float64)
    for lo, hi in zip(levels[:-1], levels[1:], strict=True):
        bound = min([p[0] for p in front if p[1] <= lo] + [ref[0]])
        width = np.maximum(0.0, bound - x)
        if not np.any(width > 0):
            continue
        total += width * sd * (_psi((hi - mu) / sd) - _psi((lo - mu) / sd))
    return total


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
