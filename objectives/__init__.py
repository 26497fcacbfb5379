"""Built-in objectives of amp-search, found through the ``amp_search.objectives`` entry points.

Accuracy objectives (minimized, read the candidate's outputs): ``rel_l2`` (default),
``max_abs``, ``mean_abs``, ``cosine``, ``top1``. Speed: ``latency_ms``. This package is
installed beside ``amp_search`` and imports nothing heavier than numpy; the core never imports
it directly (see ``amp_search.objective.load_metric``).
"""

from __future__ import annotations

from objectives.accuracy import (
    CosineDistance,
    MaxAbs,
    MeanAbs,
    OutputDeviation,
    RelativeL2,
    Top1Disagreement,
)
from objectives.latency import LatencyObjective

__all__ = [
    "CosineDistance",
    "LatencyObjective",
    "MaxAbs",
    "MeanAbs",
    "OutputDeviation",
    "RelativeL2",
    "Top1Disagreement",
]
