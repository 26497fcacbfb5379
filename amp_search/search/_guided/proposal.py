"""The guided sampler's proposal: the next assignment, from the trials as arrays.

:func:`next_row` takes the study's trials as :class:`Observations` (rows of codes over the free
units, 1 = FP16, 2 = BF16, with their latency, deviation and feasibility) and the guide, and
returns
the unevaluated row of largest expected hypervolume improvement of the (latency, log10
deviation) front. Its steps:

1. :func:`deviation_predictor`: log10 deviation from a :class:`~.gp.DeviationGP` fitted on
   the trials (non-finite outputs trained as worse than anything finite; a relevance weight
   per unit from :data:`RELEVANCE_FROM` trials on where every assignment is a candidate), or,
   before two trials have a finite nonzero deviation, the profile's proxy alone (offset to
   what was measured); None without either;
2. :func:`latency_predictor`: the guide's latency model, or one of the same form fitted on
   the trials (measured latency);
3. :func:`front_points`: the front so far, in (latency, log10 deviation): feasible finite
   trials, plus trials other workers are running at their predicted point;
4. :func:`~.candidates.candidates`: every row, or a pool around the front;
5. :func:`best_candidate`: each candidate's EHVI (:func:`~.acquisition.expected_hvi`);
   the best, ties broken at random.

Deviation budgets (``--max-deviation``) move the reference point to the budget.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from amp_search.results.pareto import front_order
from amp_search.search._guided.acquisition import expected_hvi, nondominated
from amp_search.search._guided.candidates import (
    binary_features,
    candidates,
    enumerated,
    is_ternary,
)
from amp_search.search._guided.gp import DeviationGP, prior_feature
from amp_search.search._guided.guide import allowed_codes
from amp_search.search._guided.latency import LatencySurrogate

__all__ = [
    "PRIOR_SD",
    "REF_MARGIN",
    "RELEVANCE_FROM",
    "ZERO_GAP",
    "Observations",
    "best_candidate",
    "deviation_predictor",
    "front_points",
    "latency_predictor",
    "next_row",
]

logger = logging.getLogger(__name__)

#: Reference point margin above the worst log10 deviation seen (no deviation budget set).
REF_MARGIN = 0.5
#: How far below the best nonzero log10 deviation an exact (zero) deviation is placed.
ZERO_GAP = 1.0
#: Spread (decades) of the profile's proxy before two deviations are known.
PRIOR_SD = 1.0
#: Trials from which the GP fits a relevance weight per unit (ARD), where every assignment is
#: a candidate. Fewer trials do not tell which units matter (from the first trial on it cost
#: the classifier 0.03 of its hypervolume at 30 evaluations, 0.015 at 60); on a candidate pool
#: (more units) it is not used: its proposals could not be judged there (benchmarks/RESULTS.md).
RELEVANCE_FROM = 30

Predictor = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class Observations:
    """The study's trials as arrays over the guide's units (rows: 1 = FP16).

    Attributes:
        rows: The completed trials' rows (uint8, one per trial).
        latency: Their latency (ms).
        deviation: Their deviation.
        feasible: Whether each met every constraint.
        taken: :func:`~.candidates.row_key` of every trial's row (never proposed again).
        pending: Rows of trials that are running or waiting.
        budget: The deviation budget the trials' constraints tell, if any.
    """

    rows: np.ndarray
    latency: np.ndarray
    deviation: np.ndarray
    feasible: np.ndarray
    taken: set[bytes] = field(default_factory=set)
    pending: list[np.ndarray] = field(default_factory=list)
    budget: float | None = None


def next_row(
    obs: Observations, guide: dict[str, Any], rng: np.random.Generator
) -> np.ndarray | None:
    """The next assignment (a row of codes over ``guide["units"]``), or None (see the docstring).

    None also when every candidate is taken.
    """
    n = len(guide["units"])
    allowed = allowed_codes(guide)
    three_way = is_ternary(allowed)
    devs, rows, lats = obs.deviation, obs.rows, obs.latency
    finite = np.isfinite(devs)
    good = finite & (devs > 0)
    logdev = np.log10(np.where(good, devs, 1.0))
    errors = (guide.get("unit_error"), guide.get("unit_error_bf16") if three_way else None)
    relevance = enumerated(n, allowed)
    predict = deviation_predictor(rows, logdev, good, finite, *errors, three_way=three_way,
                                  relevance=relevance)  # fmt: skip
    if predict is None:
        return None
    edges = [(int(a), int(b)) for a, b in guide.get("edges", [])]
    model = latency_predictor(n, edges, guide.get("latency"), rows, lats, three_way=three_way)
    ok = obs.feasible & finite
    pts_x, pts_y, exact = front_points(obs, model, predict, lats, logdev, ok)
    cand = candidates(n, _front_rows(rows[ok], lats[ok], devs[ok]), edges, rng, obs.taken,
                      allowed=allowed)  # fmt: skip
    if not len(cand):
        return None
    return best_candidate(cand, model, predict, obs, lats, logdev, good, pts_x, pts_y, exact,
                          rng)  # fmt: skip


def deviation_predictor(
    rows: np.ndarray,
    logdev: np.ndarray,
    good: np.ndarray,
    finite: np.ndarray,
    unit_error: list[float] | None,
    unit_error_bf16: list[float] | None = None,
    *,
    three_way: bool = False,
    relevance: bool = False,
) -> Predictor | None:
    """Mean and spread of log10 deviation at rows: the GP, the profile's proxy, or None.

    ``three_way``: rows hold BF16 codes; the GP sees their
    :func:`~.candidates.binary_features`, and BF16 units add ``unit_error_bf16`` to the proxy.
    ``relevance``: from :data:`RELEVANCE_FROM` training rows on, the GP weighs each feature.
    """

    def prior(r: np.ndarray) -> np.ndarray | None:
        return None if unit_error is None else prior_feature(r, unit_error, unit_error_bf16)

    def feats(r: np.ndarray) -> np.ndarray:
        return binary_features(r) if three_way else r

    predict: Predictor
    if int(good.sum()) >= 2:
        # Non-finite outputs train the process as worse than anything finite.
        train = good | ~finite
        y = np.where(good, logdev, float(logdev[good].max()) + 1.0)[train]
        gp = DeviationGP(feats(rows[train]), y, prior(rows[train]),
                         relevance=relevance and len(y) >= RELEVANCE_FROM)  # fmt: skip

        def predict(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return gp.predict(feats(r), prior(r))

    elif unit_error is not None:
        # Too little to fit: the profile's proxy alone, offset to what was measured.
        base = prior(rows[good])
        offset = float(np.mean(logdev[good] - base)) if base is not None and good.any() else 0.0

        def predict(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            p = prior(r)
            assert p is not None
            return p + offset, np.full(len(r), PRIOR_SD)

    else:
        return None
    return predict


def latency_predictor(
    n: int,
    edges: list[tuple[int, int]],
    latency: dict[str, Any] | None,
    rows: np.ndarray,
    lats: np.ndarray,
    *,
    three_way: bool = False,
) -> LatencySurrogate:
    """The guide's latency model (``latency``), or one fitted on the trials without it."""
    model = LatencySurrogate(n, edges, None if latency is None else latency["coef"],
                             three_way=three_way)  # fmt: skip
    if latency is None:
        model.fit(rows, lats)
    return model


def front_points(
    obs: Observations,
    model: LatencySurrogate,
    predict: Predictor,
    lats: np.ndarray,
    logdev: np.ndarray,
    ok: np.ndarray,
) -> tuple[list[float], list[float], list[int]]:
    """Points of the front so far (x, y) and the indices of exact (zero) deviations.

    Feasible finite trials, plus trials other workers are running at their predicted point;
    an exact result (all-FP32) is later placed below the best nonzero one.
    """
    pts_x, pts_y = list(lats[ok]), list(logdev[ok])
    exact = [k for k, v in enumerate(obs.deviation[ok]) if v == 0]
    if obs.pending:
        prow = np.array(obs.pending, dtype=np.uint8)
        pts_x += list(model.predict(prow))
        pts_y += list(predict(prow)[0])
    return pts_x, pts_y, exact


def best_candidate(
    cand: np.ndarray,
    model: LatencySurrogate,
    predict: Predictor,
    obs: Observations,
    lats: np.ndarray,
    logdev: np.ndarray,
    good: np.ndarray,
    pts_x: list[float],
    pts_y: list[float],
    exact: list[int],
    rng: np.random.Generator,
) -> np.ndarray:
    """The candidate of largest EHVI over the front (ties broken by ``rng``)."""
    x = model.predict(cand)
    mu, sd = predict(cand)
    known = logdev[good] if good.any() else mu[np.isfinite(mu)]
    floor = float(known.min()) - ZERO_GAP
    for k in exact:
        pts_y[k] = floor
    front = nondominated(list(zip(map(float, pts_x), map(float, pts_y), strict=True)))
    budget = obs.budget
    ref_y = math.log10(budget) if budget and budget > 0 else float(known.max()) + REF_MARGIN
    ref = (float(max(x.max(), lats.max(initial=0.0))) * 1.05, ref_y)
    score = expected_hvi(x, mu, sd, front, ref, floor)
    best = np.flatnonzero(score >= score.max() - 1e-12 * max(1e-300, abs(float(score.max()))))
    pick = int(rng.choice(best))
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "guided: %d candidates, pick EHVI %.3g (latency %.4g, log10 deviation %.3g +- %.2g)",
            len(cand), score[pick], x[pick], mu[pick], sd[pick],
        )  # fmt: skip
    return np.asarray(cand[pick])


def _front_rows(rows: np.ndarray, lats: np.ndarray, devs: np.ndarray) -> np.ndarray:
    """The rows of the non-dominated trials (for the candidate pool of large spaces)."""
    return rows[front_order(lats.tolist(), devs.tolist())]
