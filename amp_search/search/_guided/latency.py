"""The guided sampler's latency surrogate: a price for every assignment, before it is built.

:class:`LatencySurrogate` prices an assignment (a 0/1 row, 1 = FP16) as ``base + sum_i unit_i
* x_i + sum_(i,j) edge_ij * [x_i != x_j]`` over the units and the producer -> consumer edges
between them. It stands in for the roofline estimator
(:class:`~amp_search.latency_model.LatencyEstimator`, which prices a rewritten model): per-unit
FP16 savings plus what a precision boundary costs (Casts, lost fusion) is how the estimator
prices a model, so fitted on estimator calls the surrogate reproduces it exactly on chains and
within about 1% on the PP-OCR recognizer's 85 units. Fitted on measured trials (fewer than it
has terms, at first) it takes the smallest terms that fit.

With BF16 (``three_way``) a row holds codes (0 FP32, 1 FP16, 2 BF16) and the price is
``base + sum_i unit_i * low_i + sum_i bf16_i * [x_i = BF16] + sum_(i,j) edge_ij * [low_i !=
low_j] + sum_(i,j) mix_ij * [both low, one BF16]``: a BF16 unit may cost what its FP16 twin
does (the roofline prices BF16 as FP16 where the target has BF16 Tensor Cores) or not
(measured), and an FP16 -> BF16 edge is a boundary of its own (a Cast through FP32).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from amp_search.search._guided.candidates import BF16, FP16, clip_rows, unique_rows

__all__ = ["LatencySurrogate"]


class LatencySurrogate:
    """Latency of an assignment from per-unit terms and per-edge boundary terms.

    Args:
        n_units: Number of units (columns of the rows).
        edges: ``(producer, consumer)`` unit index pairs.
        coef: ``[base, unit_0 .. unit_n-1, edge_0 .. edge_m-1]`` (three-way: ``[base, units,
            bf16 units, edges, mixed edges]``); fitted later if omitted.
        three_way: Rows hold BF16 codes too (see the module docstring).
    """

    def __init__(
        self,
        n_units: int,
        edges: Sequence[tuple[int, int]],
        coef: Sequence[float] | None = None,
        *,
        three_way: bool = False,
    ) -> None:
        self.n = n_units
        self.three_way = three_way
        self.edges = [(int(a), int(b)) for a, b in edges]
        self._a = np.array([a for a, _ in self.edges], dtype=np.int64)
        self._b = np.array([b for _, b in self.edges], dtype=np.int64)
        self.coef = None if coef is None else np.asarray(coef, dtype=np.float64)

    def features(self, rows: np.ndarray) -> np.ndarray:
        """``[1, x, [x_a != x_b] per edge]`` for each row (three-way: the module docstring's)."""
        if self.three_way:
            return np.hstack([np.ones((len(rows), 1)), self._terms(rows)])
        x = np.asarray(rows, dtype=np.float64)
        boundary = np.abs(x[:, self._a] - x[:, self._b])
        return np.hstack([np.ones((x.shape[0], 1)), x, boundary])

    def _terms(self, rows: np.ndarray) -> np.ndarray:
        r = np.asarray(rows, dtype=np.uint8)
        low, bf = (r > 0).astype(np.float32), (r == BF16).astype(np.float32)
        edge = np.abs(low[:, self._a] - low[:, self._b])
        mix = low[:, self._a] * low[:, self._b] * np.abs(bf[:, self._a] - bf[:, self._b])
        return np.hstack([low, bf, edge, mix])

    def design(self, allowed: Sequence[Sequence[int]] | None = None) -> np.ndarray:
        """Rows that identify every coefficient: none, all, each unit, each edge's pair.

        Three-way, also all BF16, each unit alone BF16 and each edge FP16 -> BF16, each row
        clipped to what its units admit (``allowed``).
        """
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
        if self.three_way:
            rows.append(np.full(n, BF16, np.uint8))
            for i in range(n):
                r = np.zeros(n, np.uint8)
                r[i] = BF16
                rows.append(r)
            for a, b in self.edges:
                r = np.zeros(n, np.uint8)
                r[a], r[b] = FP16, BF16
                rows.append(r)
        out = np.array(rows)
        return unique_rows(out if allowed is None else clip_rows(out, allowed))

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
        if self.three_way:
            return np.asarray(c[0] + self._terms(rows) @ c[1:], dtype=np.float64)
        x = np.asarray(rows, dtype=np.float32)
        out = c[0] + x @ c[1 : 1 + self.n]
        if self.edges:
            out = out + np.abs(x[:, self._a] - x[:, self._b]) @ c[1 + self.n :]
        return np.asarray(out, dtype=np.float64)
