"""Pareto plots: ``pareto.png`` (matplotlib) and ``pareto.html`` (plotly, interactive).

Both draw from one backend-agnostic :class:`PlotData` (as Optuna's visualization does):
every evaluated trial as a grey dot, infeasible ones (non-finite outputs, over budget) as
red crosses, the front as a highlighted step line with each point named, the budget as a
dashed line, and optional reference points (peers such as other tools' answers). Front points
measured on validation data (``--validation-data``) also show that deviation, as a hollow
triangle joined to the point by a dotted line.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amp_search._atomic import write_bytes_atomic
from amp_search._optional import try_import
from amp_search.keys import ALL_BF16, ALL_FP16, ALL_FP32, SEED_ATTR

if TYPE_CHECKING:
    import optuna

    from amp_search.results.pareto import FrontPoint
    from amp_search.results.refined import Refinement
    from amp_search.results.store import ResultsStore

__all__ = [
    "PlotData",
    "PlotPoint",
    "draw_plots",
    "plot_data_from_refinement",
    "plot_data_from_study",
    "write_html",
    "write_plots",
    "write_png",
]

logger = logging.getLogger(__name__)

with try_import() as _mpl:
    import matplotlib

with try_import() as _plotly:
    import plotly  # noqa: F401


@dataclass
class PlotPoint:
    """One point: a trial, or a reference such as a peer tool's answer."""

    latency_ms: float
    deviation: float
    label: str
    feasible: bool = True
    on_front: bool = False
    kind: str = "trial"  # trial | reference
    #: The latency's 95% interval (None: estimated): drawn as a horizontal bar.
    interval: tuple[float, float] | None = None
    #: Its deviation on the validation data (None: not measured there).
    validation: float | None = None


@dataclass
class PlotData:
    """Everything a Pareto plot shows."""

    points: list[PlotPoint]
    title: str
    x_label: str
    y_label: str
    budget: float | None = None
    notes: list[str] = field(default_factory=list)
    #: The validation data in a few words, where points carry a validation deviation.
    validation: str | None = None

    @property
    def front(self) -> list[PlotPoint]:
        """Front points, fastest first."""
        return sorted((p for p in self.points if p.on_front), key=lambda p: p.latency_ms)


def plot_data_from_study(
    study: optuna.Study,
    front: list[FrontPoint],
    *,
    title: str,
    metric: str,
    latency_source: str,
    budget: float | None = None,
) -> PlotData:
    """The plot data of a study's completed trials and its front."""
    from optuna.trial import TrialState

    from amp_search.results.pareto import point_from_trial

    on_front = {p.trial for p in front}
    labels = {p.trial: p.label for p in front}
    validation = {p.trial: p.validation_deviation for p in front}
    seeds = {ALL_FP32: "all FP32", ALL_FP16: "all FP16", ALL_BF16: "all BF16"}
    points: list[PlotPoint] = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        p = point_from_trial(t)
        if p is None:
            continue
        seed = seeds.get(str(t.user_attrs.get(SEED_ATTR)))
        points.append(
            PlotPoint(
                latency_ms=p.latency_ms,
                deviation=p.deviation,
                label=labels.get(t.number, seed or p.label),
                feasible=p.feasible and math.isfinite(p.deviation),
                on_front=t.number in on_front,
                interval=p.latency_interval,
                validation=validation.get(t.number),
            )
        )
    x_label = f"latency, ms ({latency_source})"
    notes = []
    if latency_source.startswith("measured") and latency_source.endswith("cpu"):
        notes.append("CPU latency: says nothing about GPU FP16 speed")
    return PlotData(points, title, x_label, f"deviation from FP32 ({metric})", budget, notes)


def plot_data_from_refinement(refinement: Refinement, *, title: str) -> PlotData:
    """The plot data of a refinement: its points and compared models, from one timing run."""
    front_digests = {p.digest for p in refinement.front}
    points = [
        PlotPoint(
            latency_ms=p.latency_ms,
            deviation=p.deviation,
            label=refinement.label(p).replace("all-fp", "all FP"),
            feasible=p.feasible and math.isfinite(p.deviation),
            on_front=p.digest in front_digests,
            interval=p.latency_interval,
            validation=p.validation_deviation,
        )
        for p in refinement.points
    ]
    points += [
        PlotPoint(
            p.latency_ms,
            p.deviation,
            Path(str(p.metrics["path"])).name + " (compared)",
            kind="reference",
            interval=p.latency_interval,
        )  # fmt: skip
        for p in refinement.compared
        if math.isfinite(p.latency_ms)
    ]
    m = refinement.meta
    t = m.get("timing", {})
    notes = [
        f"{t.get('pairs')} windows each, paired with all-FP32, in {t.get('rounds')} interleaved "
        f"rounds, {m.get('refined')}; bars: 95% intervals (overlapping bars are ties)"
    ]
    if str(m.get("device", "")).startswith("cpu"):
        notes.append("CPU latency: says nothing about GPU FP16 speed")
    return PlotData(points, title, f"latency, ms ({m.get('latency_source')})",
                    f"deviation from FP32 ({m.get('metric')})", m.get("max_deviation"),
                    notes, _validation(m, points))  # fmt: skip


def _validation(meta: dict[str, Any], points: list[PlotPoint]) -> str | None:
    """The validation data's label, where some point was measured on it."""
    from amp_search.results.validation import validation_label

    return validation_label(meta) if any(p.validation is not None for p in points) else None


def _drawn(deviation: float | None, ceiling: float) -> float:
    """Where a deviation is drawn: non-finite ones at the ceiling."""
    return deviation if deviation is not None and math.isfinite(deviation) else ceiling


def _validated(data: PlotData) -> list[PlotPoint]:
    return [p for p in data.points if p.kind == "trial" and p.validation is not None]


def _finite_dev(points: list[PlotPoint]) -> float:
    """Where non-finite deviations are drawn: above every finite one."""
    finite = [d for d in _figures(points) if math.isfinite(d) and d > 0]
    return max(finite) * 3 if finite else 1.0


def _figures(points: list[PlotPoint]) -> list[float]:
    """Every deviation drawn: calibration, and validation where measured."""
    return [p.deviation for p in points] + [p.validation for p in points
                                            if p.validation is not None]  # fmt: skip


def _floor(points: list[PlotPoint]) -> float:
    """Where exact (zero) deviations are drawn on the log axis: below every nonzero one."""
    nonzero = [d for d in _figures(points) if math.isfinite(d) and d > 0]
    return min(nonzero) / 3 if nonzero else 1e-6


def write_png(data: PlotData, path: str | os.PathLike[str]) -> Path:
    """Draws ``pareto.png`` with matplotlib (extra ``plots``)."""
    _mpl.check()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ceiling = _finite_dev(data.points)
    floor = _floor(data.points)
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    trials = [p for p in data.points if p.kind == "trial"]
    ok = [p for p in trials if p.feasible and not p.on_front]
    bad = [p for p in trials if not p.feasible]
    ax.scatter([p.latency_ms for p in ok], [max(p.deviation, floor) for p in ok],
               s=18, c="#b0b0b0", label="evaluated", zorder=2)  # fmt: skip
    for p in trials:  # name the all-FP32 / all-FP16 baselines wherever they land
        if not p.on_front and p.label.startswith(("all FP", "all BF")):
            y = p.deviation if math.isfinite(p.deviation) else ceiling
            ax.annotate(f"{p.label}" + ("" if p.feasible else " (infeasible)"),
                        (p.latency_ms, max(y, floor)), textcoords="offset points",
                        xytext=(6, -12), fontsize=8, color="#555555", zorder=6)  # fmt: skip
    if bad:
        ax.scatter([p.latency_ms for p in bad],
                   [p.deviation if math.isfinite(p.deviation) else ceiling for p in bad],
                   s=30, marker="x", c="#d62728",
                   label="infeasible (inf/NaN output or over budget)", zorder=3)  # fmt: skip
    front = [p for p in data.front if p.kind == "trial"]
    if front:
        xs = [p.latency_ms for p in front]
        ys = [max(p.deviation, floor) for p in front]
        ax.step(xs, ys, where="post", c="#1f77b4", lw=1.5, zorder=4)
        ax.scatter(xs, ys, s=60, c="#1f77b4", edgecolors="black", label="Pareto front",
                   zorder=5)  # fmt: skip
        for k, (p, y) in enumerate(zip(front, ys, strict=True)):
            offset = (6, 6) if k % 2 == 0 else (6, -13)  # alternate: neighbours don't collide
            ax.annotate(p.label, (p.latency_ms, y), textcoords="offset points", xytext=offset,
                        fontsize=8, zorder=6)  # fmt: skip
    validated = _validated(data)
    if validated:  # the same points on the unseen data: hollow triangles, joined by a dotted line
        xs = [p.latency_ms for p in validated]
        vs = [max(p.validation if math.isfinite(p.validation) else ceiling, floor)
              for p in validated if p.validation is not None]  # fmt: skip
        ds = [max(p.deviation if math.isfinite(p.deviation) else ceiling, floor)
              for p in validated]  # fmt: skip
        ax.vlines(xs, ds, vs, colors="#9467bd", linestyles="dotted", lw=1, zorder=4)
        ax.scatter(xs, vs, s=55, marker="^", facecolors="none", edgecolors="#9467bd",
                   linewidths=1.5, label=f"deviation on validation data ({data.validation})",
                   zorder=5)  # fmt: skip
        for p, y in zip(validated, vs, strict=True):
            if p.validation is not None and not math.isfinite(p.validation):
                ax.annotate("inf/NaN on validation data", (p.latency_ms, y), fontsize=8,
                            textcoords="offset points", xytext=(6, 4),
                            color="#9467bd")  # fmt: skip
    refs = [p for p in data.points if p.kind == "reference"]
    for i, p in enumerate(refs):
        y = p.deviation if math.isfinite(p.deviation) else ceiling
        ax.scatter([p.latency_ms], [max(y, floor)], s=90, marker="D",
                   c=f"C{(i + 2) % 10}", edgecolors="black", label=p.label, zorder=6)  # fmt: skip
    barred = [p for p in data.points if p.interval is not None]
    if barred:  # each latency's 95% interval: points whose bars overlap are ties on speed
        ys = [max(p.deviation if math.isfinite(p.deviation) else ceiling, floor) for p in barred]
        lo = [max(0.0, p.latency_ms - p.interval[0]) for p in barred if p.interval]
        hi = [max(0.0, p.interval[1] - p.latency_ms) for p in barred if p.interval]
        ax.errorbar([p.latency_ms for p in barred], ys, xerr=[lo, hi], fmt="none",
                    ecolor="#7f7f7f", elinewidth=1, capsize=2, zorder=1)  # fmt: skip
    if data.budget is not None:
        ax.axhline(data.budget, ls="--", c="#2ca02c", lw=1, label=f"budget {data.budget:g}")
    ax.set_yscale("log")
    if any(d == 0 for d in _figures(data.points)):
        data.notes.append(f"deviation 0 (bit-exact) drawn at {floor:.1g}")
    ax.set_xlabel(data.x_label)
    ax.set_ylabel(data.y_label)
    ax.set_title(data.title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if data.notes:
        fig.text(0.01, 0.01, "; ".join(data.notes), fontsize=7, color="#555555")
    fig.tight_layout()
    # Rendered in memory, then written atomically under a unique temp name: several workers
    # of one study redraw the same plot at the same time.
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue())


def write_plots(data: PlotData, folder: str | os.PathLike[str], stem: str) -> list[Path]:
    """Writes ``<stem>.png`` and ``<stem>.html`` (without a plotting package: a warning)."""
    from amp_search.errors import BackendUnavailableError

    written = []
    for writer, suffix in ((write_png, ".png"), (write_html, ".html")):
        try:
            written.append(writer(data, Path(folder) / f"{stem}{suffix}"))
        except BackendUnavailableError as exc:
            logger.warning("%s%s not drawn: %s", stem, suffix, exc.message)
    return written


def write_html(data: PlotData, path: str | os.PathLike[str]) -> Path:
    """Writes the interactive ``pareto.html`` with plotly (extra ``plots``)."""
    _plotly.check()
    import plotly.graph_objects as go

    ceiling = _finite_dev(data.points)
    fig = go.Figure()
    groups = [
        ("evaluated", [p for p in data.points if p.kind == "trial" and p.feasible
                       and not p.on_front], dict(color="#b0b0b0", size=6)),
        ("infeasible", [p for p in data.points if p.kind == "trial" and not p.feasible],
         dict(color="#d62728", size=8, symbol="x")),
        ("Pareto front", [p for p in data.front if p.kind == "trial"],
         dict(color="#1f77b4", size=11, line=dict(width=1, color="black"))),
        ("reference", [p for p in data.points if p.kind == "reference"],
         dict(color="#ff7f0e", size=12, symbol="diamond")),
    ]  # fmt: skip
    validated = _validated(data)
    if validated:
        fig.add_trace(
            go.Scatter(
                x=[p.latency_ms for p in validated],
                y=[_drawn(p.validation, ceiling) for p in validated],
                mode="markers",
                marker=dict(color="#9467bd", size=10, symbol="triangle-up-open"),
                name=f"deviation on validation data ({data.validation})",
                text=[f"{p.label}: {p.deviation:.3g} on calibration data" for p in validated],
                hovertemplate="%{text}<br>latency %{x:.4g} ms<br>validation deviation %{y:.3g}",
            )
        )
    for name, pts, marker in groups:
        if not pts:
            continue
        bars = all(p.interval is not None for p in pts)
        fig.add_trace(
            go.Scatter(
                x=[p.latency_ms for p in pts],
                y=[p.deviation if math.isfinite(p.deviation) else ceiling for p in pts],
                error_x=dict(
                    type="data",
                    symmetric=False,
                    array=[p.interval[1] - p.latency_ms for p in pts if p.interval],
                    arrayminus=[p.latency_ms - p.interval[0] for p in pts if p.interval],
                )
                if bars
                else None,
                mode="markers+lines" if name == "Pareto front" else "markers",
                line=dict(shape="hv") if name == "Pareto front" else None,
                marker=marker,
                name=name,
                text=[p.label for p in pts],
                hovertemplate="%{text}<br>latency %{x:.4g} ms<br>deviation %{y:.3g}",
            )
        )
    if data.budget is not None:
        fig.add_hline(y=data.budget, line_dash="dash", line_color="#2ca02c",
                      annotation_text=f"budget {data.budget:g}")  # fmt: skip
    fig.update_layout(
        title=data.title, xaxis_title=data.x_label, yaxis_title=data.y_label,
        yaxis_type="log", template="plotly_white",
    )  # fmt: skip
    html = fig.to_html(include_plotlyjs=True, full_html=True)
    return write_bytes_atomic(path, html.encode())


def draw_plots(store: ResultsStore, study: Any, front: list[FrontPoint], meta: dict[str, Any],
               references: list[Any] | None = None) -> list[Path]:  # fmt: skip
    """Writes pareto.png and pareto.html (skipped with a warning without the plot extras)."""
    data = plot_data_from_study(
        study, front, title=f"amp-search: {Path(str(meta['model'])).name} "
        f"on {meta['backend']} ({meta['device']})",
        metric=str(meta["metric"]), latency_source=str(meta["latency_source"]),
        budget=meta.get("max_deviation"),
    )  # fmt: skip
    data.validation = _validation(meta, data.points)
    data.points.extend(references or [])
    return write_plots(data, store.root, "pareto")
