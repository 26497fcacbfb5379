"""A refined front: ``refined.json``, what ``amp-search refine`` measured, and how it is read.

:func:`~amp_search.search.refine.refine_front` writes it; ``report``, ``pick`` and the plots
read it here, so nothing below ``results/`` needs the search.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amp_search.errors import UserInputError
from amp_search.keys import ALL_FP32
from amp_search.record import decode_float
from amp_search.results.pareto import FrontPoint
from amp_search.results.validation import decisive_deviation, holds

if TYPE_CHECKING:
    from amp_search.results.report import Results

__all__ = [
    "REFINED_FILE",
    "Refinement",
    "draw_refined",
    "is_current",
    "load_refinement",
    "summarize",
]

REFINED_FILE = "refined.json"
#: The search's figures a refined point keeps in its ``metrics`` (non-finite: strings in JSON).
_SEARCH_FIGURES = ("search_latency_ms", "search_deviation", "search_validation_deviation")


@dataclass
class Refinement:
    """What :func:`refine_front` measured.

    Attributes:
        points: Every refined candidate (front points, all-FP32, all-FP16), fastest first; their
            latency and deviation are the refined ones, the search's are in ``metrics``.
        front: The non-dominated feasible points among ``points``.
        meta: Device, backend, options, timing protocol, date, budget and notes; ``data``
            says which data each figure came from (``deviation``, ``validation_deviation``,
            ``search_deviation``: file names and SHA-256 digests, or the batches held out).
        compared: The ``compare`` models, measured alike (``metrics["path"]`` is the file).
        failed: Candidates that did not build or run here, with the reason.
    """

    points: list[FrontPoint]
    front: list[FrontPoint]
    meta: dict[str, Any]
    compared: list[FrontPoint] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The ``refined.json`` document."""
        return {
            **self.meta,
            "points": [asdict(p) for p in self.points],
            "front": [asdict(p) for p in self.front],
            "compared": [asdict(p) for p in self.compared],
            "failed": self.failed,
        }

    def label(self, point: FrontPoint) -> str:
        """``all-fp32``/``all-fp16`` for the baselines, else ``#trial``."""
        return str(point.metrics.get("label") or f"#{point.trial}")


def load_refinement(root: str | Path) -> Refinement | None:
    """The ``refined.json`` of a results directory, or None if it was never refined."""
    import json

    path = Path(root) / REFINED_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserInputError(
            f"{path} cannot be read ({exc}); delete it and run 'amp-search refine' again."
        ) from exc

    def points(rows: list[dict[str, Any]]) -> list[FrontPoint]:
        out = [FrontPoint.from_row(row) for row in rows]
        for p in out:  # the search's figures, kept beside the refined ones
            for key in _SEARCH_FIGURES:
                if key in p.metrics:
                    p.metrics[key] = decode_float(p.metrics[key])
        return out

    lists = ("points", "front", "compared", "failed")
    meta = {k: v for k, v in doc.items() if k not in lists}
    return Refinement(points(doc["points"]), points(doc["front"]), meta,
                      points(doc.get("compared", [])), doc.get("failed", []))  # fmt: skip


def is_current(refinement: Refinement, results: Results) -> bool:
    """Whether the search's front is still the one that was refined (no trial changed it)."""
    return sorted(p.digest for p in results.front) == refinement.meta.get("front_digests")


def draw_refined(refinement: Refinement, folder: Path, model: str) -> list[Path]:
    """Writes ``refined.png``/``refined.html`` (skipped with a warning without plot extras)."""
    from amp_search.results.plots import plot_data_from_refinement, write_plots

    title = f"amp-search refine: {Path(model).name} on {refinement.meta['backend']} " + (
        f"({refinement.meta['device']})"
    )
    return write_plots(plot_data_from_refinement(refinement, title=title), folder, "refined")


def summarize(refinement: Refinement, budget: float | None) -> Sequence[str]:
    """Lines on the fastest refined point within the budget against all-FP32 and all-FP16."""
    by_label = {refinement.label(p): p for p in refinement.points}
    fp32 = by_label.get(ALL_FP32)
    within = [p for p in refinement.front if holds(p, budget)]
    lines = []
    if within:
        best = min(within, key=lambda p: (p.latency_ms, decisive_deviation(p)))
        s = best.speedup(fp32.latency_ms if fp32 else None)
        speed = "" if s is None else f", {s[0]:.2f}x all-FP32 [{s[1]:.2f}, {s[2]:.2f}]"
        v = best.validation_deviation
        lines.append(
            f"fastest {'refined point' if budget is None else f'within {budget:g}'}: "
            f"{refinement.label(best)} {best.latency_ms:.4g} ms at {best.deviation:.3g}"
            + ("" if v is None else f" ({v:.3g} on the validation data)")
            + speed
        )
    else:
        best = None
        lines.append("no refined point is within the budget")
    for c in refinement.compared:
        ok = math.isfinite(c.deviation) and (budget is None or c.deviation <= budget)
        vs = (f"; {best.metrics['label']} is {c.latency_ms / best.latency_ms:.2f}x as fast"
              if best is not None and ok else "")  # fmt: skip
        lines.append(f"{c.metrics['label']}: {c.latency_ms:.4g} ms at {c.deviation:.3g}"
                     f"{'' if ok else ' (over the budget)'}{vs}")  # fmt: skip
    return lines
