"""Helpers the benchmark scripts share."""

from __future__ import annotations

import numpy as np


def rel_l2(got: list[dict[str, np.ndarray]], ref: list[dict[str, np.ndarray]]) -> float:
    """Relative L2 of every output over every batch (float64); inf if any value is not finite."""
    num = den = 0.0
    for g, r in zip(got, ref, strict=True):
        for k in r:
            a = g[k].astype(np.float64)
            if not np.isfinite(a).all():
                return float("inf")
            num += float(np.sum((a - r[k]) ** 2))
            den += float(np.sum(r[k].astype(np.float64) ** 2))
    return (num / den) ** 0.5 if den else num**0.5
