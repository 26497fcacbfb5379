"""The Pareto front of a study as :class:`FrontPoint` rows, and ``front.json``/``front.csv``.

Feasibility is Optuna's (constraints set with ``trial.set_constraint``: non-finite outputs,
the ``--max-deviation`` budget); dominance over two minimized objectives is a sort
(:func:`nondominated_points`), which also serves points measured again outside the study
(``amp-search refine``).

A measured latency carries its 95% interval (:mod:`amp_search.timing`); two points whose
intervals overlap are ties on speed (:func:`latency_tie`), and the speedup over all-FP32 comes
with its interval (:meth:`FrontPoint.speedup`).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from amp_search._atomic import write_bytes_atomic, write_json_atomic
from amp_search.errors import UserInputError
from amp_search.keys import ALL_FP32, BASELINES, SEED_ATTR
from amp_search.record import TrialRecord, decode_float, decode_metrics
from amp_search.results.store import ResultsStore

if TYPE_CHECKING:
    import optuna

__all__ = [
    "FrontPoint",
    "baselines",
    "check_max_deviation",
    "compute_front",
    "front_order",
    "hypervolume",
    "latency_tie",
    "nondominated_points",
    "point_from_trial",
    "write_front",
]


def check_max_deviation(max_deviation: float | None) -> None:
    """Refuses a ``--max-deviation`` budget that is not positive (None: no budget)."""
    if max_deviation is not None and not max_deviation > 0:
        raise UserInputError(f"--max-deviation must be positive, got {max_deviation:g}.")


@dataclass
class FrontPoint:
    """One evaluated candidate as the front shows it.

    Attributes:
        trial: Optuna trial number.
        digest: The candidate's folder name under ``candidates/``.
        latency_ms: Its latency (median).
        latency_source: Where the latency comes from (``estimated:h100``, ``measured:...``).
        deviation: Its deviation from FP32 under ``metric``.
        metric: The accuracy metric's name.
        n_fp32: Number of units kept FP32 (its fallback set's size).
        n_units: Number of units in the search.
        fp32_units: The FP32 fallback set.
        bf16_units: The units in BF16 (the rest of the units are FP16).
        feasible: Whether it meets every constraint (finite outputs, the budget).
        metrics: Every other figure recorded (p90, other deviations, casts, build time).
        validation_deviation: Its deviation under ``metric`` on the validation data, which
            the search never optimizes on (None: not measured; see
            :mod:`amp_search.results.validation`).
    """

    trial: int
    digest: str
    latency_ms: float
    latency_source: str
    deviation: float
    metric: str
    n_fp32: int
    n_units: int
    fp32_units: list[str] = field(default_factory=list)
    bf16_units: list[str] = field(default_factory=list)
    feasible: bool = True
    metrics: dict[str, Any] = field(default_factory=dict)
    validation_deviation: float | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> FrontPoint:
        """A point as ``front.json`` or ``refined.json`` holds it (figures decoded to floats).

        Columns that are not fields (the derived ones ``write_front`` adds) are left out.
        """
        fields = cls.__dataclass_fields__
        kept = {k: v for k, v in row.items() if k in fields}
        for key in ("latency_ms", "deviation"):
            kept[key] = decode_float(kept[key])
        kept["validation_deviation"] = decode_float(kept.get("validation_deviation"))
        kept["metrics"] = decode_metrics(kept.get("metrics") or {})
        return cls(**kept)

    @property
    def latency_interval(self) -> tuple[float, float] | None:
        """The latency's 95% interval (None: estimated, or timed without windows)."""
        lo, hi = self.metrics.get("latency_low_ms"), self.metrics.get("latency_high_ms")
        if lo is None or hi is None:
            return None
        return (float(lo), float(hi))

    def latency_text(self, unit: str = "") -> str:
        """``1.23 [1.21, 1.25]`` (with ``unit`` after the figure; no interval if estimated)."""
        interval = self.latency_interval
        text = f"{self.latency_ms:.4g}{unit}"
        return text + (f" [{interval[0]:.4g}, {interval[1]:.4g}]" if interval else "")

    def fallback_text(self, limit: int = 4) -> str:
        """The FP32 fallback set in short (the full list is in precision.json).

        ``none (all FP16)``, ``all 86 units (all FP32)``, or the first ``limit`` names and
        ``+N more``.
        """
        units = self.fp32_units
        if not units:
            if not self.bf16_units:
                return "none (all FP16)"
            if len(self.bf16_units) >= self.n_units > 0:
                return "none (all BF16)"
            return "none (FP16 and BF16)"
        if len(units) >= self.n_units > 0:
            return f"all {len(units)} units (all FP32)"
        return _names(units, limit)

    def bf16_text(self, limit: int = 4) -> str:
        """The BF16 set in short: ``""`` when no unit is BF16, ``all N units``, or names."""
        units = self.bf16_units
        if not units:
            return ""
        if len(units) >= self.n_units > 0:
            return f"all {len(units)} units"
        return _names(units, limit)

    def speedup(self, fp32_ms: float | None = None) -> tuple[float, float, float] | None:
        """Speedup over all-FP32 and its 95% interval, as (speedup, low, high).

        A point timed against the resident all-FP32 reference has it from its paired ratio;
        otherwise it is ``fp32_ms`` over its latency (an interval of one value).
        """
        r, r_lo, r_hi = (self.metrics.get(k) for k in ("ratio", "ratio_low", "ratio_high"))
        if r is not None and r_lo is not None and r_hi is not None and r_lo > 0:
            return (1.0 / float(r), 1.0 / float(r_hi), 1.0 / float(r_lo))
        if fp32_ms and self.latency_ms > 0 and math.isfinite(self.latency_ms):
            s = float(fp32_ms) / self.latency_ms
            return (s, s, s)
        return None

    @property
    def label(self) -> str:
        """A short name for plots and tables."""
        n_bf16 = len(self.bf16_units)
        if self.n_fp32 == 0 and not n_bf16:
            return "all FP16"
        if n_bf16 and n_bf16 == self.n_units:
            return "all BF16"
        if self.n_fp32 == self.n_units:
            return "all FP32"
        return f"#{self.trial}: {self.n_fp32} FP32" + (f", {n_bf16} BF16" if n_bf16 else "")


def _names(units: list[str], limit: int) -> str:
    """The first ``limit`` names and ``+N more``."""
    more = len(units) - limit
    return ", ".join(units[:limit]) + (f" +{more} more" if more > 0 else "")


def point_from_trial(trial: optuna.trial.FrozenTrial) -> FrontPoint | None:
    """A :class:`FrontPoint` from a completed trial (None for trials without values)."""
    if trial.values is None or len(trial.values) != 2:
        return None
    record = TrialRecord.from_trial(trial)
    constraints = getattr(trial, "constraints", {}) or {}
    return FrontPoint(
        trial=trial.number,
        digest=record.digest,
        latency_ms=float(trial.values[0]),
        latency_source=record.latency_source,
        deviation=float(trial.values[1]),
        metric=record.metric,
        n_fp32=record.n_fp32,
        n_units=record.n_units,
        fp32_units=list(record.fp32_units),
        bf16_units=list(record.bf16_units),
        feasible=all(v <= 0 for v in constraints.values()),
        metrics=record.metrics,
    )


def compute_front(study: optuna.Study) -> list[FrontPoint]:
    """The feasible Pareto front, fastest first (what ``study.best_trials`` holds).

    Computed from the trials without copying them: ``best_trials`` deep-copies every trial of
    the study, tens of milliseconds per call on a study of a hundred-unit model.
    """
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    points = [p for p in map(point_from_trial, trials) if p is not None and p.feasible]
    unique: dict[str, FrontPoint] = {}
    for p in nondominated_points(points):  # a re-proposed assignment: once, its first trial
        unique.setdefault(p.digest or str(p.trial), p)
    return list(unique.values())


def front_order(x: Sequence[float], y: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points (both coordinates minimized), fastest first.

    The one Pareto filter: the front, the sampler's, the candidate pool's and the benchmark's.
    Of equal points the first is kept.
    """
    out: list[int] = []
    best = math.inf
    for k in sorted(range(len(x)), key=lambda k: (x[k], y[k])):
        if y[k] < best:
            out.append(k)
            best = float(y[k])
    return out


def hypervolume(points: Iterable[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Exact 2-D hypervolume (both minimized) that ``points`` dominate up to ``ref``."""
    pts = [(x, y) for x, y in points if x < ref[0] and y < ref[1]]
    area, best_y = 0.0, ref[1]
    for k in front_order([p[0] for p in pts], [p[1] for p in pts]):
        x, y = pts[k]
        area += (ref[0] - x) * (best_y - y)
        best_y = y
    return area


def nondominated_points(points: list[FrontPoint]) -> list[FrontPoint]:
    """The points no other point beats on both latency and deviation, fastest first."""
    ordered = sorted(points, key=lambda p: p.trial)
    keep = front_order([p.latency_ms for p in ordered], [p.deviation for p in ordered])
    return [ordered[k] for k in keep]


def latency_tie(a: FrontPoint, b: FrontPoint) -> bool:
    """Whether the two points' latency intervals overlap (neither is surely faster)."""
    ia, ib = a.latency_interval, b.latency_interval
    if ia is None or ib is None:
        return a.latency_ms == b.latency_ms
    return ia[0] <= ib[1] and ib[0] <= ia[1]


def _timing_columns(p: FrontPoint, fp32_ms: float | None) -> dict[str, float | None]:
    interval = p.latency_interval
    speed = p.speedup(fp32_ms)
    return {
        "latency_low_ms": interval[0] if interval else None,
        "latency_high_ms": interval[1] if interval else None,
        "speedup": speed[0] if speed else None,
        "speedup_low": speed[1] if speed else None,
        "speedup_high": speed[2] if speed else None,
    }


def write_front(store: ResultsStore, front: list[FrontPoint], meta: dict[str, Any]) -> None:
    """Writes ``front.json`` and ``front.csv`` atomically.

    Each point also carries its latency interval and its speedup over all-FP32 with its
    interval (``latency_low_ms``, ``latency_high_ms``, ``speedup``, ``speedup_low``,
    ``speedup_high``; empty where the latency is estimated).
    """
    fp32 = meta.get("baselines", {}).get(ALL_FP32, {}).get("latency_ms")
    fp32_ms = float(fp32) if isinstance(fp32, int | float) else None
    rows = [{**asdict(p), **_timing_columns(p, fp32_ms)} for p in front]
    write_json_atomic(store.root / "front.json", {**meta, "front": rows})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        ["trial", "latency_ms", "latency_low_ms", "latency_high_ms", "speedup", "speedup_low",
         "speedup_high", "latency_source", "deviation", "validation_deviation", "metric",
         "n_fp32", "n_units", "digest", "fp32_units", "bf16_units"]
    )  # fmt: skip
    for p, row in zip(front, rows, strict=True):
        timing = [
            "" if row[k] is None else f"{row[k]:.6g}"
            for k in ("latency_low_ms", "latency_high_ms", "speedup", "speedup_low",
                      "speedup_high")
        ]  # fmt: skip
        validation = "" if p.validation_deviation is None else f"{p.validation_deviation:.6g}"
        w.writerow(
            [p.trial, f"{p.latency_ms:.6g}", *timing, p.latency_source, f"{p.deviation:.6g}",
             validation, p.metric, p.n_fp32, p.n_units, p.digest, ";".join(p.fp32_units),
             ";".join(p.bf16_units)]
        )  # fmt: skip
    write_bytes_atomic(store.root / "front.csv", buf.getvalue().encode())


def baselines(study: Any) -> dict[str, dict[str, Any]]:
    """all-FP32, all-FP16 (and all-BF16) figures from the seed trials."""
    from optuna.trial import TrialState

    out: dict[str, dict[str, Any]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        seed = t.user_attrs.get(SEED_ATTR)
        if seed in BASELINES and seed not in out:
            p = point_from_trial(t)
            if p is not None:
                out[seed] = {
                    "trial": p.trial,
                    "latency_ms": p.latency_ms,
                    "deviation": p.deviation,
                    "feasible": p.feasible,
                    "digest": p.digest,
                }
    return out
