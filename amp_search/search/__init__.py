"""The Optuna search over per-unit precisions (see ``run.py``)."""

from __future__ import annotations

from amp_search.search.run import SearchConfig, SearchOutcome, run_search

__all__ = ["SearchConfig", "SearchOutcome", "run_search"]
