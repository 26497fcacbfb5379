"""What a search writes in its results directory besides the candidates.

- :func:`save_front`: ``front.json`` and ``front.csv`` with the study's baselines (all-FP32,
  all-FP16), after every trial and at the end;
- :func:`write_outputs`: the front, then the Pareto plots (``pareto.png``, ``pareto.html``),
  when the search ends.

``run.json`` and ``inspect.json`` are written before the first trial
(:meth:`~amp_search.results.store.ResultsStore.check_run` and the profile's
:class:`~amp_search.profiling.inspection.InspectReport`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from amp_search.results.pareto import FrontPoint, baselines, write_front

if TYPE_CHECKING:
    from amp_search.results.store import ResultsStore

__all__ = ["save_front", "write_outputs"]


def save_front(
    store: ResultsStore, study: Any, front: list[FrontPoint], meta: dict[str, Any]
) -> None:
    """Writes ``front``, with ``meta`` and the study's baselines (``front.json``/``.csv``)."""
    write_front(store, front, {**meta, "baselines": baselines(study)})


def write_outputs(
    store: ResultsStore, study: Any, front: list[FrontPoint], meta: dict[str, Any]
) -> None:
    """The final front and the Pareto plots (skipped with a warning without plot extras)."""
    save_front(store, study, front, meta)
    from amp_search.results.plots import draw_plots  # matplotlib/plotly: imported when drawn

    draw_plots(store, study, front, meta)
