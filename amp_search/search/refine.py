"""Refining the front: its points rebuilt with final options, measured again, side by side.

During a search every candidate is built fast (TensorRT: a low builder optimization level if
the search asked for one) and timed once, against the resident all-FP32 reference, until its
interval is narrow enough. Before a point ships, :func:`refine_front` rebuilds the front points
within the budget, plus all-FP32 and all-FP16 (and all-BF16), on the target device with the
final options (a backend's build-speed options,
:attr:`~amp_search.backends.base.Backend.refine_defaults`, go back to their defaults unless
given again), measures each one's deviation there against the same strict FP32 reference,
and times them all with the search's protocol
(:mod:`amp_search.timing`: windows paired with a resident all-FP32 reference), in interleaved
rounds so that drift and neighbours hit every point alike, then widens the figures whose
interval is still wider than the target. A point or compared model that fails at any stage
is a failed entry; the others are still refined.

Given validation data (:mod:`amp_search.search.validation`: ``--validation-data``, or the
search's own validation set), every refined point's deviation on it is measured too; the
``data`` entry of ``refined.json`` records which data (file names and SHA-256 digests, or the
batches held out) each figure came from.

The result, ``refined.json`` in the results directory, holds every refined point and the front
they form; ``amp-search pick`` prefers it to the search's own figures. A search on the CPU with
estimated latency can be refined on a GPU machine: that is where its figures become measured.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from amp_search._atomic import write_json_atomic
from amp_search.errors import BackendUnavailableError, UserInputError
from amp_search.keys import ALL_FP32
from amp_search.results.pareto import FrontPoint, check_max_deviation, nondominated_points
from amp_search.results.refined import (
    REFINED_FILE,
    Refinement,
    draw_refined,
    is_current,
    load_refinement,
    summarize,
)
from amp_search.search.validation import ValidationRun, data_identity, output_deviation
from amp_search.timing import PairedTiming

if TYPE_CHECKING:
    from amp_search.backends.base import Backend, BuildConfig, Runner
    from amp_search.calibration import CalibrationData
    from amp_search.results.report import Results
    from amp_search.search.evaluate import ResidentReference
    from amp_search.search.validation import ValidationSet
    from amp_search.timing import TimingPlan

__all__ = [
    "REFINED_FILE",
    "Refinement",
    "draw_refined",
    "is_current",
    "load_refinement",
    "refine_front",
    "summarize",
]

CPU_TIMING_NOTE = (
    "Refined on the CPU: ONNX Runtime CPU runs FP16 nodes in FP32 behind casts, so these "
    "timings say nothing about a GPU; refine on the target GPU (--device cuda) before shipping."
)


def refine_front(
    results: Results,
    *,
    data: CalibrationData,
    device: str | None = None,
    options: dict[str, Any] | None = None,
    pairs: int = 20,
    rounds: int = 5,
    target: float = 0.02,
    max_time_s: float = 4.0,
    max_deviation: float | None = None,
    compare: Sequence[str | Path] = (),
    progress: Callable[[str, int, int], None] | None = None,
    validation: ValidationSet | None = None,
) -> Refinement:
    """Rebuilds, re-measures and re-times the front of ``results`` (see the module docstring).

    Args:
        results: A results directory, read back.
        data: The calibration data (the search's, as a rule).
        device: Where to measure; the search's device when None.
        options: Backend options over those the search used (on the same device type) or over
            the backend defaults (on another); build-speed options return to their defaults.
        pairs: Timing windows per candidate in all (each paired with one of the resident
            all-FP32 reference), split evenly over ``rounds``.
        rounds: Interleaved rounds (each times every candidate in turn).
        target: After the rounds, candidates whose 95% interval is wider than ``±target``
            get up to ``pairs`` more windows.
        max_time_s: Seconds of those extra windows per candidate at most (and of the
            reference's warm-up and level).
        max_deviation: Refine only front points within this budget (the search's budget when
            None; every front point without one). Refined deviations are checked against it.
        compare: Other ONNX models of the same inputs and outputs (the model in production,
            another tool's answer) measured alike; reported apart, never on the front.
        progress: Called with (stage, done, total).
        validation: Data never searched on: each point's deviation on it is measured too.
    """
    from amp_search.objective import load_metric
    from amp_search.timing import TimingPlan

    check_max_deviation(max_deviation)
    meta = results.meta
    run = results.store.read_json(results.store.root / "run.json") or {}
    backend, config, device, base_options = _target(results, run, data, device, options)
    identity = backend.identity(config)
    if rounds < 1 or pairs < 2 * rounds:
        raise UserInputError(f"--pairs ({pairs}) must be at least twice --rounds ({rounds}).")
    budget = max_deviation if max_deviation is not None else meta.get("max_deviation")
    entries = _entries_and_compared(results, budget, compare)
    metric = load_metric(str(meta.get("metric", "rel_l2")))
    model_path = _searched_model(results)
    reference = _reference(model_path, data)
    plan = TimingPlan(target=target, min_pairs=2, max_pairs=max(2, pairs), max_time_s=max_time_s)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as held:
        resident = _open_resident(results, backend, config, model_path, reference, data, plan,
                                  held)  # fmt: skip
        checks = None if validation is None else _ValidationChecks(
            ValidationRun(validation, resident.model, backend, device, base_options, metric),
            config, Path(held.enter_context(tempfile.TemporaryDirectory(
                prefix=".validation-", dir=results.store.root))),
        )  # fmt: skip
        opened, failed = _open_entries(backend, config, entries, data, reference, metric,
                                       resident, held, progress, checks)  # fmt: skip
        _time_in_rounds(opened, failed, pairs, rounds, progress)

    source = f"{resident.level.source if resident.level else 'measured'}, refined"
    points = [_refined_point(entry, source, resident.level_ms, budget) for entry in opened]
    compared = [p for p in points if "path" in p.metrics]
    points = [p for p in points if "path" not in p.metrics]
    points.sort(key=lambda p: (p.latency_ms, p.deviation))
    front = nondominated_points([p for p in points if p.feasible])
    meta_out = _refinement_meta(
        results, backend, device, identity, metric.name, budget, source, resident,
        timing={"pairs": pairs, "rounds": rounds, "target": target},
        seconds=time.perf_counter() - t0, cpu=config.device_type == "cpu",
    )  # fmt: skip
    meta_out["notes"] += checks.notes if checks is not None else []
    meta_out["validation"] = None if validation is None else validation.identity
    meta_out["data"] = _figure_data(run, data, validation)
    refinement = Refinement(
        points=points,
        front=front,
        compared=compared,
        failed=failed,
        meta=meta_out,
    )
    write_json_atomic(results.store.root / REFINED_FILE, refinement.to_json())
    draw_refined(refinement, results.store.root, str(meta.get("model", "")))
    return refinement


def _target(
    results: Results,
    run: dict[str, Any],
    data: CalibrationData,
    device: str | None,
    options: dict[str, Any] | None,
) -> tuple[Backend, BuildConfig, str, dict[str, Any]]:
    """The search's backend, usable here; the build config on ``device``; the device.

    ``run`` is the search's ``run.json`` (its options).

    Also the options before they were fitted to the data (a validation set may have other
    shapes).
    """
    from amp_search.backends import BuildConfig, get_backend

    meta = results.meta
    backend = get_backend(str(meta.get("backend", "onnxruntime")))
    reason = backend.unavailable_reason()
    if reason:
        raise BackendUnavailableError(f"Backend '{backend.name}' is unavailable: {reason}")
    device = device or str(meta.get("device", "cpu"))
    base_options = _final_options(backend, run, device, options)
    config = BuildConfig(device=device, options=base_options)
    if config.device_type not in backend.devices():
        raise BackendUnavailableError(
            f"Backend '{backend.name}' cannot use device {device!r} here (available: "
            f"{', '.join(backend.devices())}). Refine on the machine of the target GPU."
        )
    config = replace(config, options=backend.options_for_data(config.options, data.first()))
    return backend, config, device, base_options


def _entries_and_compared(
    results: Results, budget: float | None, compare: Sequence[str | Path]
) -> list[tuple[FrontPoint, Path]]:
    """The points to refine with their model files, then the ``compare`` models."""
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
    return entries


def _open_resident(
    results: Results,
    backend: Backend,
    config: BuildConfig,
    model_path: Path,
    reference: list[dict[str, np.ndarray]],
    data: CalibrationData,
    plan: TimingPlan,
    held: contextlib.ExitStack,
) -> ResidentReference:
    """The searched model, reconciled as the search did, open as the resident reference."""
    from amp_search.graph import load_model, reconcile_shapes, sanitize
    from amp_search.search.prepare import resident_reference

    fp32_model = sanitize(load_model(model_path))  # as the search reconciled it:
    reconcile_shapes(fp32_model, {k: v.shape for k, v in reference[0].items()})
    resident = resident_reference(
        backend, config, results.store.root / "reference" / "model.onnx",
        fp32_model, data.first(), plan, held,
    )  # fmt: skip
    resident.open()
    return resident


def _refined_point(
    entry: _Opened, source: str, level: float | None, budget: float | None
) -> FrontPoint:
    """The entry's point with its refined figures (the search's kept in ``metrics``)."""
    point, deviation, timing = entry.point, entry.deviation, entry.timing
    stats = timing.stats(source=source, reference_ms=level)
    feasible = math.isfinite(deviation) and (budget is None or deviation <= budget)
    return replace(
        point,
        latency_ms=stats.median_ms,
        latency_source=source,
        deviation=deviation,
        feasible=feasible,
        validation_deviation=entry.validation_deviation,
        metrics={
            **point.metrics,
            "latency_low_ms": stats.low_ms,
            "latency_high_ms": stats.high_ms,
            "ratio": stats.ratio,
            "ratio_low": stats.ratio_low,
            "ratio_high": stats.ratio_high,
            "own_median_ms": stats.own_median_ms,
            "p90_ms": stats.p90_ms,
            "runs": stats.n_runs,
            "windows": stats.windows,
            "clock_mhz_min": stats.clock_mhz_min,
            "execution": entry.execution,
            "search_latency_ms": point.latency_ms,
            "search_latency_source": point.latency_source,
            "search_deviation": point.deviation,
            "search_validation_deviation": point.validation_deviation,
            "build_s": round(entry.build_s, 3),
        },
    )


def _refinement_meta(
    results: Results,
    backend: Backend,
    device: str,
    identity: dict[str, Any],
    metric: str,
    budget: float | None,
    source: str,
    resident: ResidentReference,
    *,
    timing: dict[str, Any],
    seconds: float,
    cpu: bool,
) -> dict[str, Any]:
    """What ``refined.json`` says besides its points: where, how, against what, when."""
    return {
        "refined": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": backend.name,
        "device": device,
        "identity": identity,
        "metric": metric,
        "max_deviation": budget,
        "latency_source": source,
        "reference": {
            "ms": resident.level_ms,
            "low_ms": resident.level.low_ms if resident.level else None,
            "high_ms": resident.level.high_ms if resident.level else None,
            "execution": resident.execution,
        },
        "timing": {
            **timing,
            "protocol": "windows paired with the resident all-FP32 reference; latency = "
            "median ratio x the reference's level; 95% bootstrap intervals",
            "timer": backend.timer_name,
        },
        "seconds": round(seconds, 1),
        "front_digests": sorted(p.digest for p in results.front),
        "notes": [CPU_TIMING_NOTE] if cpu else [],
    }


@dataclass
class _Opened:
    """One refined entry, open on the device."""

    point: FrontPoint
    runner: Runner
    deviation: float
    build_s: float
    execution: dict[str, Any]
    timing: PairedTiming
    validation_deviation: float | None = None


@dataclass
class _ValidationChecks:
    """Refined points measured on the validation data (failures: inf and a note)."""

    run: ValidationRun
    config: Any
    scratch: Path
    notes: list[str] = field(default_factory=list)

    def measure(self, point: FrontPoint, path: Path, runner: Runner) -> float:
        """The entry's deviation on the validation data: on ``runner`` where it fits them."""
        from amp_search.search.evaluate import local_failure

        try:
            if self.run.config.options == self.config.options:  # the same build: reuse it
                return self.run.run(runner)
            return self.run.measure(path, self.scratch)  # TensorRT: other shapes, own engine
        except Exception as exc:  # that figure fails, the entry is still refined
            reason = (str(local_failure(exc, "running it on the validation data"))
                      .splitlines() or [""])[0]  # fmt: skip
            self.notes.append(f"{point.metrics['label']} has no validation figure (taken as "
                              f"inf): {reason}")  # fmt: skip
            return math.inf


def _figure_data(run: dict[str, Any], data: CalibrationData,
                 validation: ValidationSet | None) -> dict[str, Any]:  # fmt: skip
    """Which data each figure of ``refined.json`` came from."""
    searched = run.get("calibration") or {"description": run.get("data"),
                                          "digest": run.get("data_digest")}  # fmt: skip
    return {
        "deviation": data_identity(data),
        "validation_deviation": None if validation is None else validation.identity,
        "search_deviation": searched,
        "search_validation_deviation": run.get("validation"),
    }


def _open_entries(
    backend: Backend, config: Any, entries: list[tuple[FrontPoint, Path]],
    data: CalibrationData, reference: list[dict[str, np.ndarray]], metric: Any,
    resident: Any, held: contextlib.ExitStack, progress: Callable[[str, int, int], None] | None,
    checks: _ValidationChecks | None = None,
) -> tuple[list[_Opened], list[dict[str, Any]]]:  # fmt: skip
    """Builds each entry, measures its deviation and binds it; failures are entries too."""
    from amp_search.search.evaluate import local_failure

    names = list(reference[0])
    opened: list[_Opened] = []
    failed: list[dict[str, Any]] = []
    for k, (point, path) in enumerate(entries):
        if progress:
            progress("build", k, len(entries))
        try:
            candidate = backend.build(path, config)
            runner = backend.open(candidate).__enter__()
            held.callback(runner.__exit__, None, None, None)
            outputs = [runner.infer(batch) for batch in data]
            deviation = output_deviation(metric, reference, outputs, names)
            unseen = None if checks is None else checks.measure(point, path, runner)
            runner.bind(data.first())
        except Exception as exc:  # any stage, any error: this entry fails, the rest go on
            failed.append(_failure(point, local_failure(exc, "refining it")))
            continue
        opened.append(_Opened(point, runner, deviation, candidate.build_time_s,
                              dict(runner.execution), resident.pair(runner), unseen))  # fmt: skip
    if progress:
        progress("build", len(entries), len(entries))
    return opened, failed


def _time_in_rounds(
    opened: list[_Opened], failed: list[dict[str, Any]], pairs: int, rounds: int,
    progress: Callable[[str, int, int], None] | None,
) -> None:  # fmt: skip
    """Times every entry in interleaved rounds, then widens the unsure ones; drops failures."""
    from amp_search.search.evaluate import local_failure

    per_round = pairs // rounds
    for r in range(rounds + 1):
        if progress:
            progress("time", r, rounds + 1)
        for i in range(len(opened)):
            entry = opened[(i + r) % len(opened)]  # each round starts one later
            if entry.runner is None:
                continue
            try:
                if r < rounds:
                    entry.timing.run(min_pairs=per_round, max_pairs=per_round, until_sure=False)
                else:  # the last round: more windows only where the interval is still wide
                    entry.timing.run(min_pairs=0, max_pairs=pairs)
            except Exception as exc:  # a candidate that fails while timed: a failed entry
                failed.append(_failure(entry.point, local_failure(exc, "timing it")))
                entry.runner = None  # type: ignore[assignment]
    if progress:
        progress("time", rounds + 1, rounds + 1)
    opened[:] = [e for e in opened if e.runner is not None and e.timing.pairs]


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
    """Front points within ``budget``, then all-FP32, all-FP16 (and all-BF16), once each."""
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
                deviation=float(row.get("deviation", math.inf)),
                metric=str(results.meta.get("metric", "")),
                n_fp32=len(fp32),
                n_units=n_units,
                fp32_units=fp32,
                bf16_units=sorted(u for u, v in prec.get("units", {}).items() if v == "bf16"),
                feasible=bool(row.get("feasible", True)),
                metrics={"label": key},
            )  # fmt: skip
        )
        seen.add(digest)
    return chosen


def _searched_model(results: Results) -> Path:
    """The searched model's file (the all-FP32 candidate, the same graph, if it moved)."""
    model_path = Path(str(results.meta.get("model", "")))
    fp32 = results.baselines.get(ALL_FP32, {}).get("digest")
    if not model_path.is_file() and fp32:
        model_path = results.store.candidate_dir(str(fp32)) / "model.onnx"
    if not model_path.is_file():
        raise UserInputError(
            f"The searched model {results.meta.get('model')} is not there any more (nor the "
            "all-FP32 candidate): refine needs it for the FP32 reference."
        )
    return model_path


def _reference(model_path: Path, data: CalibrationData) -> list[dict[str, np.ndarray]]:
    """Strict FP32 outputs of the searched model on ONNX Runtime CPU (what the search used)."""
    from amp_search.graph import load_model, sanitize
    from amp_search.profiling import profile_model

    model = sanitize(load_model(model_path))
    prof = profile_model(model, [], data, fp16_pass=False, keep_reference=True)
    return list(prof.reference_outputs)
