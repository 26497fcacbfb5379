"""Refining the front: its points rebuilt with final options, measured again, side by side.

During a search every candidate is built fast (TensorRT: a low builder optimization level if
the search asked for one) and timed once, briefly and alone: at about a millisecond, two timings
of one candidate taken minutes apart differ by a few percent to tens of percent. Before a point
ships, :func:`refine_front` rebuilds the front points within the budget, plus all-FP32 and
all-FP16, on the target device with the final options (a backend's build-speed options,
:attr:`~amp_search.backends.base.Backend.refine_defaults`, go back to their defaults unless
given again), measures each one's deviation there against the same strict FP32 reference, and
times them all in interleaved rounds, so drift and neighbours hit every point alike.

The result, ``refined.json`` in the results directory, holds every refined point and the front
they form; ``amp-search pick`` prefers it to the search's own figures. A search on the CPU with
estimated latency can be refined on a GPU machine: that is where its figures become measured.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from amp_search._atomic import write_json_atomic
from amp_search.errors import AmpSearchError, BackendUnavailableError, UserInputError
from amp_search.results.pareto import FrontPoint, nondominated_points

if TYPE_CHECKING:
    from amp_search.backends.base import Backend, Runner
    from amp_search.calibration import CalibrationData
    from amp_search.results.report import Results

__all__ = [
    "REFINED_FILE",
    "Refinement",
    "draw_refined",
    "is_current",
    "load_refinement",
    "refine_front",
    "summarize",
]

REFINED_FILE = "refined.json"
CPU_TIMING_NOTE = (
    "Refined on the CPU: ONNX Runtime CPU runs FP16 nodes in FP32 behind casts, so these "
    "timings say nothing about a GPU; refine on the target GPU (--device cuda) before shipping."
)


@dataclass
class Refinement:
    """What :func:`refine_front` measured.

    Attributes:
        points: Every refined candidate (front points, all-FP32, all-FP16), fastest first; their
            latency and deviation are the refined ones, the search's are in ``metrics``.
        front: The non-dominated feasible points among ``points``.
        meta: Device, backend, options, timing protocol, date, budget and notes.
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
        out = []
        for row in rows:
            row = dict(row)
            for key in ("latency_ms", "deviation"):
                row[key] = float(row[key]) if not isinstance(row[key], str) else math.inf
            out.append(FrontPoint(**row))
        return out

    lists = ("points", "front", "compared", "failed")
    meta = {k: v for k, v in doc.items() if k not in lists}
    return Refinement(points(doc["points"]), points(doc["front"]), meta,
                      points(doc.get("compared", [])), doc.get("failed", []))  # fmt: skip


def is_current(refinement: Refinement, results: Results) -> bool:
    """Whether the search's front is still the one that was refined (no trial changed it)."""
    return sorted(p.digest for p in results.front) == refinement.meta.get("front_digests")


def refine_front(
    results: Results,
    *,
    data: CalibrationData,
    device: str | None = None,
    options: dict[str, Any] | None = None,
    runs: int = 100,
    rounds: int = 5,
    warmup: int = 10,
    max_deviation: float | None = None,
    compare: Sequence[str | Path] = (),
    progress: Callable[[str, int, int], None] | None = None,
) -> Refinement:
    """Rebuilds, re-measures and re-times the front of ``results`` (see the module docstring).

    Args:
        results: A results directory, read back.
        data: The calibration data (the search's, as a rule).
        device: Where to measure; the search's device when None.
        options: Backend options over those the search used (on the same device type) or over
            the backend defaults (on another); build-speed options return to their defaults.
        runs: Timed runs per candidate in all, split evenly over ``rounds``.
        rounds: Interleaved timing rounds (each times every candidate once, in turn).
        warmup: Untimed runs before each candidate's block in every round.
        max_deviation: Refine only front points within this budget (the search's budget when
            None; every front point without one). Refined deviations are checked against it.
        compare: Other ONNX models of the same inputs and outputs (the model in production,
            another tool's answer) measured alike; reported apart, never on the front.
        progress: Called with (stage, done, total).
    """
    from amp_search.backends import BuildConfig, get_backend
    from amp_search.objective import EvalContext, load_metric

    meta = results.meta
    backend = get_backend(str(meta.get("backend", "onnxruntime")))
    reason = backend.unavailable_reason()
    if reason:
        raise BackendUnavailableError(f"Backend '{backend.name}' is unavailable: {reason}")
    run = results.store.read_json(results.store.root / "run.json") or {}
    device = device or str(meta.get("device", "cpu"))
    config = BuildConfig(device=device, options=_final_options(backend, run, device, options))
    if config.device_type not in backend.devices():
        raise BackendUnavailableError(
            f"Backend '{backend.name}' cannot use device {device!r} here (available: "
            f"{', '.join(backend.devices())}). Refine on the machine of the target GPU."
        )
    if backend.name == "tensorrt" and not config.options.get("shapes"):
        shapes = {k: list(v.shape) for k, v in data.first().items()}
        config = replace(config, options={**config.options, "shapes": shapes})
    identity = backend.identity(config)
    if rounds < 1 or runs < rounds:
        raise UserInputError(f"--runs ({runs}) must be at least --rounds ({rounds}) >= 1.")
    budget = max_deviation if max_deviation is not None else meta.get("max_deviation")
    entries = [(p, results.store.candidate_dir(p.digest) / "model.onnx")
               for p in _entries(results, budget)]  # fmt: skip
    if not entries:
        raise UserInputError(
            f"{results.store.root} has no front point or baseline to refine; run the search first."
        )
    for other in map(Path, compare):
        if not other.is_file():
            raise UserInputError(f"--compare {other}: no such file.")
        attrs = {"label": f"compare:{other.name}", "path": str(other)}
        point = FrontPoint(trial=-1, digest="", latency_ms=math.nan, latency_source="",
                           deviation=math.nan, metric="", n_fp32=0, n_units=0,
                           metrics=attrs)  # fmt: skip
        entries.append((point, other))
    metric = load_metric(str(meta.get("metric", "rel_l2")))
    reference = _reference(results, data)
    names = list(reference[0])

    opened: list[tuple[FrontPoint, Runner, float, Any]] = []
    failed: list[dict[str, Any]] = []
    samples: dict[int, list[float]] = {}
    t0 = time.perf_counter()
    try:
        for k, (point, path) in enumerate(entries):
            if progress:
                progress("build", k, len(entries))
            try:
                candidate = backend.build(path, config)
                runner = backend.open(candidate).__enter__()
            except AmpSearchError as exc:
                failed.append(_failure(point, exc))
                continue
            try:
                outputs = [runner.infer(batch) for batch in data]
                ctx = EvalContext(reference=reference, outputs=outputs, output_names=names)
                finite = all(np.isfinite(v).all() for out in outputs for v in out.values())
                deviation = float(metric.evaluate(ctx)) if finite else math.inf
                runner.bind(data.first())
            except (AmpSearchError, ValueError) as exc:  # ValueError: outputs that differ
                runner.__exit__(None, None, None)
                failed.append(_failure(point, exc))
                continue
            opened.append((point, runner, deviation, candidate))
            samples[len(opened) - 1] = []
        if progress:
            progress("build", len(entries), len(entries))
        per_round = runs // rounds
        from amp_search.timing import measure

        for r in range(rounds):
            if progress:
                progress("time", r, rounds)
            for i in range(len(opened)):
                k = (i + r) % len(opened)  # each round starts one later: no fixed position
                runner = opened[k][1]
                stats = measure(runner.run_once, source=runner.source, warmup=warmup,
                                runs=per_round, timer=runner.timer())  # fmt: skip
                samples[k].extend(stats.samples_ms)
        if progress:
            progress("time", rounds, rounds)
    finally:
        for _, runner, _, _ in opened:
            runner.__exit__(None, None, None)

    source = f"{opened[0][1].source}, refined" if opened else "measured, refined"
    points = []
    for k, (point, _, deviation, candidate) in enumerate(opened):
        a = np.asarray(samples[k], dtype=np.float64)
        feasible = math.isfinite(deviation) and (budget is None or deviation <= budget)
        points.append(
            replace(
                point,
                latency_ms=float(np.median(a)),
                latency_source=source,
                deviation=deviation,
                feasible=feasible,
                metrics={
                    **point.metrics,
                    "p90_ms": float(np.percentile(a, 90)),
                    "runs": int(a.size),
                    "search_latency_ms": point.latency_ms,
                    "search_latency_source": point.latency_source,
                    "search_deviation": point.deviation,
                    "build_s": round(candidate.build_time_s, 3),
                },
            )
        )
    compared = [p for p in points if "path" in p.metrics]
    points = [p for p in points if "path" not in p.metrics]
    points.sort(key=lambda p: (p.latency_ms, p.deviation))
    front = nondominated_points([p for p in points if p.feasible])
    notes = [CPU_TIMING_NOTE] if config.device_type == "cpu" else []
    refinement = Refinement(
        points=points,
        front=front,
        compared=compared,
        failed=failed,
        meta={
            "refined": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "backend": backend.name,
            "device": device,
            "identity": identity,
            "metric": metric.name,
            "max_deviation": budget,
            "latency_source": source,
            "timing": {
                "runs": per_round * rounds,
                "rounds": rounds,
                "warmup": warmup,
                "timer": "cuda events" if backend.name == "tensorrt" else "wall clock",
            },
            "seconds": round(time.perf_counter() - t0, 1),
            "front_digests": sorted(p.digest for p in results.front),
            "notes": notes,
        },  # fmt: skip
    )
    write_json_atomic(results.store.root / REFINED_FILE, refinement.to_json())
    draw_refined(refinement, results.store.root, str(meta.get("model", "")))
    return refinement


def draw_refined(refinement: Refinement, folder: Path, model: str) -> list[Path]:
    """Writes ``refined.png``/``refined.html`` (skipped with a warning without plot extras)."""
    from amp_search.results.plots import plot_data_from_refinement, write_plots

    title = f"amp-search refine: {Path(model).name} on {refinement.meta['backend']} " + (
        f"({refinement.meta['device']})"
    )
    return write_plots(plot_data_from_refinement(refinement, title=title), folder, "refined")


def _failure(point: FrontPoint, exc: Exception) -> dict[str, Any]:
    return {"label": str(point.metrics["label"]), "digest": point.digest, "error": str(exc)}


def _final_options(
    backend: Backend, run: dict[str, Any], device: str, given: dict[str, Any] | None
) -> dict[str, Any]:
    """The search's options on the same device type (less build-speed ones), then ``given``."""
    same = str(run.get("device", "")).split(":")[0] == device.split(":")[0]
    base = dict(run.get("options") or {}) if same else {}
    for key in backend.refine_defaults:
        base.pop(key, None)
    base.pop("shapes", None)  # taken from the data again
    return {**base, **(given or {})}


def _entries(results: Results, budget: float | None) -> list[FrontPoint]:
    """Front points within ``budget``, then all-FP32 and all-FP16 (once each)."""
    labels = {str(row.get("digest")): key for key, row in results.baselines.items()}
    chosen = [
        replace(p, metrics={**p.metrics, "label": labels.get(p.digest) or f"#{p.trial}"})
        for p in results.front
        if budget is None or p.deviation <= budget
    ]
    seen = {p.digest for p in chosen}
    for key, row in results.baselines.items():
        digest = str(row.get("digest", ""))
        folder = results.store.candidate_dir(digest) if digest else None
        if folder is None or digest in seen or not (folder / "model.onnx").is_file():
            continue
        prec = results.store.read_json(folder / "precision.json") or {}
        fp32 = list(prec.get("fp32_fallback", []))
        n_units = len(prec.get("units", {})) or (chosen[0].n_units if chosen else 0)
        chosen.append(
            FrontPoint(
                trial=int(row.get("trial", -1)),
                digest=digest,
                latency_ms=float(row.get("latency_ms", math.nan)),
                latency_source=str(results.meta.get("latency_source", "")),
                deviation=float(row.get("deviation", "inf")),  # "inf"/"nan" as written
                metric=str(results.meta.get("metric", "")),
                n_fp32=len(fp32),
                n_units=n_units,
                fp32_units=fp32,
                feasible=bool(row.get("feasible", True)),
                metrics={"label": key},
            )  # fmt: skip
        )
        seen.add(digest)
    return chosen


def _reference(results: Results, data: CalibrationData) -> list[dict[str, np.ndarray]]:
    """Strict FP32 outputs of the searched model on ONNX Runtime CPU (what the search used)."""
    from amp_search.graph import load_model, sanitize
    from amp_search.profiling import profile_model

    model_path = Path(str(results.meta.get("model", "")))
    fp32 = results.baselines.get("all-fp32", {}).get("digest")
    if not model_path.is_file() and fp32:  # the model moved: all-FP32 is the same graph
        model_path = results.store.candidate_dir(str(fp32)) / "model.onnx"
    if not model_path.is_file():
        raise UserInputError(
            f"The searched model {results.meta.get('model')} is not there any more (nor the "
            "all-FP32 candidate): refine needs it for the FP32 reference."
        )
    model = sanitize(load_model(model_path))
    prof = profile_model(model, [], data, fp16_pass=False, keep_reference=True)
    return list(prof.reference_outputs)


def summarize(refinement: Refinement, budget: float | None) -> Sequence[str]:
    """Lines on the fastest refined point within the budget against all-FP32 and all-FP16."""
    by_label = {refinement.label(p): p for p in refinement.points}
    fp32 = by_label.get("all-fp32")
    within = [p for p in refinement.front if budget is None or p.deviation <= budget]
    lines = []
    if within:
        best = min(within, key=lambda p: (p.latency_ms, p.deviation))
        speed = f", {fp32.latency_ms / best.latency_ms:.2f}x all-FP32" if fp32 else ""
        lines.append(
            f"fastest {'refined point' if budget is None else f'within {budget:g}'}: "
            f"{refinement.label(best)} {best.latency_ms:.4g} ms at {best.deviation:.3g}{speed}"
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
