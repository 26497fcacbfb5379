"""The results directory: candidates, the Pareto front, plots, and picking a point."""

from __future__ import annotations

from amp_search.results.pareto import FrontPoint, compute_front
from amp_search.results.store import ResultsStore

__all__ = ["FrontPoint", "ResultsStore", "compute_front"]
