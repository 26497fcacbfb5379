"""The guided sampler's deviation model: a Gaussian process over assignments.

:class:`DeviationGP` models log10(deviation) over 0/1 rows (1 = FP16; with BF16, the rows'
:func:`~.candidates.binary_features`) with an exponential Hamming kernel and a linear mean in
a prior feature (:func:`prior_feature`: the profile's per-unit FP16 and BF16 errors, combined
as a root sum of squares over the low-precision units); its hyperparameters come from the
marginal likelihood over a small grid. numpy only.

With ``relevance=True`` each feature (unit) gets its own weight in the Hamming distance
(automatic relevance determination): starting from the grid's best length scale, a coordinate
search over the marginal likelihood halves or doubles one weight at a time
(:data:`RELEVANCE_SWEEPS` passes), keeping a move only where it gains more than
:data:`RELEVANCE_PENALTY` nats. Deviation is not additive over units (rounding errors cancel:
on the PP-OCR recognizer units 0 and 2 FP32 give -2.5 decades, with unit 5 FP32 too -2.9),
and one length scale for all units spreads what a trial says about the units that matter over
those that do not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "LENGTH_SCALES",
    "MIN_VARIANCE",
    "NOISES",
    "RELEVANCE_PENALTY",
    "RELEVANCE_STEPS",
    "RELEVANCE_SWEEPS",
    "DeviationGP",
    "prior_feature",
]

#: Length scales (in flipped units) and noise levels the GP chooses from.
LENGTH_SCALES = (0.5, 1.0, 2.0, 4.0, 8.0)
NOISES = (1e-3, 1e-2, 1e-1)
#: Smallest prior variance of log10 deviation (decades squared). Fitted by likelihood alone,
#: the variance collapses when the first trials happen to deviate alike (the PP-OCR
#: recognizer: every early trial near 1e-2, while rare assignments reach 3e-4), and the
#: sampler stops exploring; this floor keeps roughly half a decade of doubt everywhere.
MIN_VARIANCE = 0.3
#: Factors one relevance weight is tried at, passes over the features, and the marginal
#: likelihood (nats) a move must gain to be kept: a weight moves only where the trials say so.
RELEVANCE_STEPS = (0.5, 2.0)
RELEVANCE_SWEEPS = 3
RELEVANCE_PENALTY = 1.0


def prior_feature(
    rows: np.ndarray,
    unit_error: Sequence[float],
    unit_error_bf16: Sequence[float] | None = None,
) -> np.ndarray:
    """log10 of the root sum of squares of the low-precision units' own errors (a proxy).

    Rows are 0/1 (1 = FP16) or, with ``unit_error_bf16``, codes (1 = FP16, 2 = BF16): a BF16
    unit contributes its own BF16 error.
    """
    w = np.asarray(unit_error, dtype=np.float64) ** 2
    if unit_error_bf16 is None:
        rss = np.sqrt(np.asarray(rows, dtype=np.float64) @ w)
    else:
        wb = np.asarray(unit_error_bf16, dtype=np.float64) ** 2
        r = np.asarray(rows, dtype=np.uint8)
        rss = np.sqrt((r == 1).astype(np.float64) @ w + (r == 2).astype(np.float64) @ wb)
        w = np.maximum(w, wb)
    floor = max(float(np.sqrt(w.max())) * 1e-6, 1e-30) if w.size else 1e-30
    return np.asarray(np.log10(rss + floor))


def _hamming(a: np.ndarray, b: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted Hamming distances between the 0/1 rows of ``a`` and ``b``."""
    # float32 is exact for the plain distance (integers below 2**24) and twice as fast.
    fa, fb = a.astype(np.float32), b.astype(np.float32)
    w = weights.astype(np.float32)
    return np.asarray((fa * w) @ (1.0 - fb).T + ((1.0 - fa) * w) @ fb.T, dtype=np.float64)


class DeviationGP:
    """A GP on log10 deviation over assignments (see the module docstring).

    Args:
        rows: Training assignments (0/1 rows).
        y: Their log10 deviation.
        prior: Their prior feature (:func:`prior_feature`), or None for a constant mean.
        relevance: Fit a weight per feature (ARD) after the length-scale grid.
    """

    def __init__(
        self,
        rows: np.ndarray,
        y: np.ndarray,
        prior: np.ndarray | None = None,
        *,
        relevance: bool = False,
    ) -> None:
        self.rows = np.asarray(rows, dtype=np.uint8)
        self.y = np.asarray(y, dtype=np.float64)
        self.use_prior = prior is not None
        f = self._basis(prior, len(self.y))
        d = self.rows.shape[1]
        best: tuple[float, np.ndarray, tuple[np.ndarray, ...]] | None = None
        for ls in LENGTH_SCALES:
            w = np.full(d, 1.0 / ls)
            fit = _fit(np.exp(-_hamming(self.rows, self.rows, w)), f, self.y, NOISES)
            if fit is not None and (best is None or fit[0] < best[0]):
                best = (fit[0], w, fit[1])
        if best is None:
            raise np.linalg.LinAlgError("no kernel setting gave a positive definite matrix")
        if relevance and d > 1:
            best = self._relevance(f, *best)
        self.weights, self._state = best[1], best[2]

    def _relevance(
        self, f: np.ndarray, nll: float, w: np.ndarray, state: tuple[np.ndarray, ...]
    ) -> tuple[float, np.ndarray, tuple[np.ndarray, ...]]:
        """Coordinate search of the per-feature weights from ``w`` (module docstring).

        At the grid's noise level; the noise is chosen again for the weights found.
        """
        x = self.rows.astype(np.float64)
        diff = np.abs(x.T[:, :, None] - x.T[:, None, :])  # (feature, row, row)
        noise = (float(state[4]),)
        start = w
        for _ in range(RELEVANCE_SWEEPS):
            moved = False
            for i in range(len(w)):
                for step in RELEVANCE_STEPS:
                    trial = w.copy()
                    trial[i] *= step
                    fit = _fit(np.exp(-np.tensordot(trial, diff, axes=1)), f, self.y, noise)
                    if fit is not None and fit[0] < nll - RELEVANCE_PENALTY:
                        nll, w, moved = fit[0], trial, True
            if not moved:
                break
        if w is start:
            return nll, w, state
        fit = _fit(np.exp(-np.tensordot(w, diff, axes=1)), f, self.y, NOISES)
        return (nll, w, state) if fit is None else (fit[0], w, fit[1])

    @staticmethod
    def _basis(prior: np.ndarray | None, n: int) -> np.ndarray:
        if prior is None:
            return np.ones((n, 1))
        return np.stack([np.ones(n), np.asarray(prior, dtype=np.float64)], axis=1)

    def predict(
        self, rows: np.ndarray, prior: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of log10 deviation at ``rows``."""
        chol, beta, alpha, sig2_arr, _ = self._state
        sig2 = max(float(sig2_arr), MIN_VARIANCE)
        ks = np.exp(-_hamming(np.asarray(rows, np.uint8), self.rows, self.weights))
        f = self._basis(prior if self.use_prior else None, ks.shape[0])
        mu = f @ beta + ks @ alpha
        v = _tri_solve(chol, ks.T)
        var = sig2 * np.maximum(1.0 - (v * v).sum(axis=0), 1e-12)
        return np.asarray(mu), np.asarray(np.sqrt(var))


def _fit(
    k0: np.ndarray, f: np.ndarray, y: np.ndarray, noises: Sequence[float]
) -> tuple[float, tuple[np.ndarray, ...]] | None:
    """The best of ``noises`` for kernel matrix ``k0``: (negative log likelihood, state).

    The mean's coefficients on ``f`` by generalized least squares; None if no level gives a
    positive definite matrix.
    """
    eye = np.eye(len(y))
    best: tuple[float, tuple[np.ndarray, ...]] | None = None
    for noise in noises:
        try:
            chol = np.linalg.cholesky(k0 + noise * eye)
        except np.linalg.LinAlgError:
            continue
        kf = _solve(chol, f)
        a = f.T @ kf + 1e-9 * np.eye(f.shape[1])
        beta = np.linalg.solve(a, kf.T @ y)
        r = y - f @ beta
        alpha = _solve(chol, r)
        sig2 = max(float(r @ alpha) / len(y), 1e-12)
        nll = 0.5 * len(y) * math.log(sig2) + float(np.log(np.diag(chol)).sum())
        if best is None or nll < best[0]:
            best = (nll, (chol, beta, alpha, np.asarray(sig2), np.asarray(noise)))
    return best


def _tri_solve(chol: np.ndarray, b: np.ndarray) -> np.ndarray:
    # Lower-triangular solve; numpy has no dedicated one, and these systems are small.
    return np.asarray(np.linalg.solve(chol, b))


def _solve(chol: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray(np.linalg.solve(chol.T, np.linalg.solve(chol, b)))
