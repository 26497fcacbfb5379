"""The guided sampler's acquisition: expected hypervolume improvement (EHVI).

:func:`expected_hvi` is the expected improvement of the hypervolume of the (latency, log10
deviation) front by a candidate whose latency is known (the latency model) and whose log
deviation is Gaussian (the GP): a one-dimensional integral with a closed form per segment of
the current front. numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from amp_search.results.pareto import front_order

__all__ = ["expected_hvi", "nondominated"]

_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)


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
