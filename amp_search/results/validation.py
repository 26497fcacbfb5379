"""Unseen data in the results: which deviation a budget checks, and how a refusal reads.

A search given validation data (``--validation-data``, or ``--holdout-fraction``, see
:mod:`amp_search.search.validation`) never optimizes on it; at its end every front point's
deviation on it is measured too (:attr:`FrontPoint.validation_deviation
<amp_search.results.pareto.FrontPoint.validation_deviation>`), and ``refine`` measures every
refined point alike. Where that figure exists it decides: a budget is checked against it
(:func:`decisive_deviation`), and a point within the budget on the calibration data but over
it on the validation data is refused, both figures named in one line (:func:`refusal`).

Which data each figure came from is recorded beside it: ``front.json``'s ``validation`` and
``run.json``'s ``calibration``/``validation`` (file names and SHA-256 digests, or the held-out
batches), and ``refined.json``'s ``data``, one entry per figure.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from amp_search.results.pareto import FrontPoint

__all__ = [
    "VALIDATION_FILE",
    "decisive_deviation",
    "holds",
    "refusal",
    "unmeasured_note",
    "validation_label",
]

#: A candidate's deviation on the validation data, cached in its folder (``candidates/<d>/``).
VALIDATION_FILE = "validation.json"


def decisive_deviation(point: FrontPoint) -> float:
    """The deviation a budget is checked against: on the validation data where measured."""
    v = point.validation_deviation
    if v is None:
        return point.deviation
    return v if not math.isnan(v) else math.inf


def holds(point: FrontPoint, budget: float | None) -> bool:
    """Whether ``point`` is within ``budget`` (None: no budget) by :func:`decisive_deviation`."""
    return budget is None or decisive_deviation(point) <= budget


def validation_label(meta: dict[str, Any]) -> str:
    """The validation data in a few words (``val.npz``, ``holdout of d.npz batches 6..7``)."""
    found = meta.get("validation")
    if isinstance(found, dict) and found.get("label"):
        return str(found["label"])
    return "the validation data"


def refusal(point: FrontPoint, budget: float, meta: dict[str, Any]) -> str:
    """One line: why ``point``, within ``budget`` on the calibration data, is refused."""
    v = point.validation_deviation
    return (
        f"trial {point.trial} refused: deviation {point.deviation:.3g} on the calibration data "
        f"but {v if v is None else f'{v:.3g}'} on the validation data "
        f"({validation_label(meta)}), over the budget {budget:g}"
    )


def unmeasured_note(points: list[FrontPoint], meta: dict[str, Any]) -> str | None:
    """A line when validation data was given but some points have no figure on it yet.

    A search measures its front on the validation data when it ends; one stopped before (a
    second Ctrl-C, a crash) leaves points that only a budget on the calibration data checks.
    """
    if not meta.get("validation"):
        return None
    missing = [p.trial for p in points if p.validation_deviation is None]
    if not missing:
        return None
    return (
        f"{len(missing)} front point(s) (trials {', '.join(map(str, missing[:8]))}"
        f"{', ...' if len(missing) > 8 else ''}) have no deviation on the validation data yet "
        "(the search ended before measuring them): their calibration figure is checked; run "
        "the same search command again to measure them."
    )
