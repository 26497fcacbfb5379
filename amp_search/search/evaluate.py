"""One candidate, end to end: assignment -> mixed ONNX -> backend candidate -> figures.

:class:`CandidateEvaluator` is what each trial calls. It never rebuilds an assignment it has
evaluated before (the results directory caches by digest), writes every file atomically,
and raises :class:`~amp_search.errors.CandidateBuildError` /
:class:`~amp_search.errors.CandidateRunError` for a candidate that fails (whatever the
backend raised while building, running or timing it), which the study records as a failed
trial with its reason.

Measured latency is paired (:mod:`amp_search.timing`): a :class:`ResidentReference`, the
all-FP32 model built once and kept open for the whole search, is timed in windows alternating
with each candidate's, and every candidate's figure is its median ratio to the reference times
the reference's level, with a 95% interval.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from amp_search._atomic import BackgroundWrite, write_bytes_atomic
from amp_search.backends.base import Backend, BuildConfig
from amp_search.calibration import CalibrationData
from amp_search.errors import (
    AmpSearchError,
    CandidateBuildError,
    CandidateRunError,
    UserInputError,
)
from amp_search.graph.io import copy_without_initializers, exceeds_protobuf_limit, save_model
from amp_search.graph.precision import MixedPrecisionRewriter
from amp_search.objective import EvalContext, Objective
from amp_search.record import decode_float
from amp_search.results.store import ResultsStore
from amp_search.timing import DEFAULT_PLAN, Clock, PairedTiming, Step, TimingPlan, nvml_clock
from amp_search.types import LatencyStats, PrecisionAssignment

__all__ = [
    "CandidateEvaluator",
    "Evaluation",
    "LatencySettings",
    "ResidentReference",
    "local_failure",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencySettings:
    """How latency is obtained.

    Attributes:
        source: ``"measured"`` (the backend's timing) or ``"estimated"`` (roofline model).
        target: GPU the estimate is for (``h100``/``h200``).
        plan: Windows, stopping rule and clock floor of measured timing.
        paired: Time each candidate against the resident all-FP32 reference (measured only).
        front_pairs: More paired windows for a candidate that would join the front.
    """

    source: str = "estimated"
    target: str = "h100"
    plan: TimingPlan = DEFAULT_PLAN
    paired: bool = True
    front_pairs: int = 6


@dataclass
class Evaluation:
    """What one candidate scored.

    Attributes:
        digest: The assignment's digest (its folder name).
        latency: Latency statistics (median is the objective).
        deviation: The chosen metric's value (inf when outputs are not finite).
        deviations: Every built-in accuracy metric.
        finite: Whether every output value was finite.
        fp32_units: The FP32 fallback set.
        cached: Whether it came from the results directory without rebuilding.
        seconds: Wall time per phase (rewrite, build, run, time).
        extra: Casts inserted, weights flushed, build info.
    """

    digest: str
    latency: LatencyStats
    deviation: float
    deviations: dict[str, float]
    finite: bool
    fp32_units: list[str]
    cached: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """What ``metrics.json`` holds."""
        return {
            "digest": self.digest,
            "latency": self.latency.to_json(),
            "deviation": self.deviation,
            "deviations": self.deviations,
            "finite": self.finite,
            "n_fp32": len(self.fp32_units),
            "seconds": self.seconds,
            **self.extra,
        }


def local_failure(exc: BaseException, what: str) -> AmpSearchError:
    """Any error while a candidate is built, run or timed, as that candidate's failure.

    amp-search's own errors pass as they are; anything a backend raises (ONNX Runtime's
    ``RuntimeError``/``Fail``/``InvalidArgument``, a CUDA error) becomes a
    :class:`~amp_search.errors.CandidateRunError` with its first line.
    """
    if isinstance(exc, AmpSearchError):
        return exc
    text = str(exc).strip()
    line = text.splitlines()[0][:300] if text else ""
    return CandidateRunError(f"{what} failed: {type(exc).__name__}: {line}")


class ResidentReference:
    """The all-FP32 model, built once and open for the search: what candidates are timed against.

    :meth:`open` builds it on the target, runs the first calibration batch (the model itself
    must run there: if it does not, nothing is searched), settles it and measures its level,
    the latency every paired ratio is scaled by. ``level_ms`` may be set from the study (where
    the first worker stored it) so that every worker and every resumed run share one scale.

    Args:
        backend: The search's backend.
        config: Its build configuration.
        path: Where to write the reference's ONNX.
        model: The (sanitized) FP32 model.
        feeds: The batch that is timed (the first calibration batch).
        plan: Timing windows and stopping rule.
        clock: Reads the SM clock (None: off the GPU, or unreadable).
    """

    def __init__(self, backend: Backend, config: BuildConfig, path: Path, model: Any,
                 feeds: dict[str, np.ndarray], plan: TimingPlan,
                 clock: Clock | None = None) -> None:  # fmt: skip
        self.backend = backend
        self.config = config
        self.path = path
        self.model = model
        self.feeds = feeds
        self.plan = plan
        self.clock = clock
        self.level_ms: float | None = None
        self.level: LatencyStats | None = None
        self.step: Step | None = None
        self.execution: dict[str, Any] = {}
        self._candidate: Any = None
        self._runner: Any = None

    def open(self) -> None:
        """Builds, checks, settles and measures the reference (see the class docstring)."""
        if self._runner is not None:
            return
        where = f"{self.backend.name} ({self.config.device})"
        try:
            save_model(self.model, self.path)
            self._candidate = self.backend.build(self.path, self.config)
            self._runner = self.backend.open(self._candidate).__enter__()
            self._runner.infer(self.feeds)
            self._runner.bind(self.feeds)
        except Exception as exc:
            self.close()
            failure = local_failure(exc, "the FP32 model")
            raise UserInputError(
                f"The model itself does not run on {where}: {failure}. Nothing was searched; "
                "fix the model (or run on another device) and search again."
            ) from exc
        self.execution = dict(self._runner.execution)
        self.step = Step(self._runner.run_once, self._runner.timer())
        timing = PairedTiming(self.step, None, self.plan, self.clock)
        timing.run()
        self.level = timing.stats(source=self._runner.source)
        if self.level_ms is None:
            self.level_ms = self.level.median_ms
        logger.info("reference (all-FP32) on %s: %.4g ms [%.4g, %.4g]%s", where,
                    self.level.median_ms, self.level.low_ms, self.level.high_ms,
                    ", CUDA graph" if self.execution.get("cuda_graph") else "")  # fmt: skip

    def pair(self, runner: Any) -> PairedTiming:
        """A timing of a bound ``runner`` in windows paired with this (open) reference."""
        self.open()
        return PairedTiming(Step(runner.run_once, runner.timer()), self.step, self.plan,
                            self.clock)  # fmt: skip

    def close(self) -> None:
        """Releases the reference's session."""
        if self._runner is not None:
            self._runner.__exit__(None, None, None)
            self._runner = None
        if self._candidate is not None:
            self.backend.release(self._candidate)
            self._candidate = None


class CandidateEvaluator:
    """Evaluates assignments of one model on one backend against an FP32 reference.

    Args:
        rewriter: The model's rewriter.
        backend: The backend that builds and runs candidates.
        config: Device and backend options.
        data: Calibration batches.
        reference: The FP32 outputs of every batch (strict FP32).
        metric: The accuracy objective (the second study objective).
        extra_metrics: Other accuracy metrics recorded alongside.
        latency: How latency is obtained.
        store: The results directory.
        estimator: The roofline estimator (needed when ``latency.source`` is estimated).
        resident: The resident all-FP32 reference of paired measured timing (opened on first
            use if not yet open).
    """

    def __init__(
        self,
        rewriter: MixedPrecisionRewriter,
        backend: Backend,
        config: BuildConfig,
        data: CalibrationData,
        reference: list[dict[str, np.ndarray]],
        metric: Objective,
        store: ResultsStore,
        latency: LatencySettings,
        extra_metrics: list[Objective] | None = None,
        estimator: Any = None,
        resident: ResidentReference | None = None,
    ) -> None:
        self.rewriter = rewriter
        self.backend = backend
        self.config = config
        self.data = data
        self.reference = reference
        self.metric = metric
        self.extra_metrics = [m for m in (extra_metrics or []) if m.name != metric.name]
        self.store = store
        self.latency = latency
        self.estimator = estimator
        self.resident = resident
        #: Whether a measured candidate would join the current front (set by the search):
        #: such a candidate is timed ``latency.front_pairs`` windows longer.
        self.front_probe: Callable[[LatencyStats, float], bool] | None = None
        self.clock: Clock | None = None
        if latency.source == "measured" and config.device_type == "cuda":
            self.clock = resident.clock if resident is not None else nvml_clock(
                config.device_id)  # fmt: skip
        self.output_names = [o.name for o in rewriter.model.graph.output]
        self._small_model = not exceeds_protobuf_limit(rewriter.model)
        if latency.source == "estimated" and estimator is None:
            raise ValueError("an estimated latency needs an estimator")
        self._source_label = (
            f"estimated:{latency.target}" if latency.source == "estimated" else None
        )

    def evaluate(
        self, assignment: PrecisionAssignment, *, before_timing: Callable[[], object] | None = None
    ) -> Evaluation:
        """Scores one assignment (from the cache when it was evaluated before).

        Workers sharing the results directory never evaluate one assignment twice: the first
        claims it, the others wait for its metrics (or its error) and answer from those.

        Args:
            assignment: What to evaluate.
            before_timing: Called before the timed runs (measured latency); returns once
                nothing else in this process competes with them for the CPU.
        """
        digest = assignment.digest()
        fp32_units = sorted(assignment.fp32_units)
        found = self._cached(digest, fp32_units)
        if found is not None:
            return found
        t_claim = time.time()
        with self.store.claim(digest) as mine:
            if not mine:  # another worker evaluated it meanwhile
                found = self._cached(digest, fp32_units)
                if found is not None:
                    return found
                error = self.store.cached_error(digest, since=t_claim)
                if error is not None:
                    raise CandidateBuildError(f"{error} (evaluated by another worker)")
            try:
                return self._evaluate(assignment, digest, fp32_units, before_timing)
            except (CandidateBuildError, CandidateRunError) as exc:
                self.store.write_json(
                    self.store.candidate_dir(digest) / "error.json",
                    {"error": str(exc), "kind": type(exc).__name__},
                )
                raise

    def _cached(self, digest: str, fp32_units: list[str]) -> Evaluation | None:
        cached = self.store.cached_metrics(digest)
        if cached is not None and self.metric.name in cached.get("deviations", {}):
            return _from_cache(cached, digest, fp32_units)
        return None

    def _evaluate(
        self,
        assignment: PrecisionAssignment,
        digest: str,
        fp32_units: list[str],
        before_timing: Callable[[], object] | None = None,
    ) -> Evaluation:
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        folder = self.store.candidate_dir(digest)
        writing: BackgroundWrite | None = None
        parts: list[bytes] | None = None
        if self._small_model:  # bytes from cached weight encodings: no per-trial weight copy
            parts, model, report = self.rewriter.apply_serialized(assignment)
        else:
            model, report = self.rewriter.apply(assignment)
        # Before the model (and it makes the folder): its sync would otherwise wait for the
        # model's data.
        self.store.write_json(
            folder / "precision.json",
            {"units": assignment.to_json(), "fp32_fallback": fp32_units,
             "fp16_nodes": report.fp16_nodes, "forced_fp32": report.forced_fp32},
        )  # fmt: skip
        if parts is None:
            path = save_model(model, folder / "model.onnx")
            # Only the graph is read from here on (the latency estimate), as the small
            # model's skeleton: the weights go before the backend loads its own copy.
            model = copy_without_initializers(model)
        elif self.backend.builds_from_memory:
            # The backend builds from memory while the file is written beside it.
            writing = BackgroundWrite(folder / "model.onnx", parts)
            path = writing.path
        else:
            path = write_bytes_atomic(folder / "model.onnx", parts)
        seconds["rewrite"] = time.perf_counter() - t0
        try:
            result = self._build_and_score(
                assignment, digest, fp32_units, path, parts if writing else None, model,
                report, seconds, writing, before_timing,
            )  # fmt: skip
        except Exception as exc:  # whatever the backend raised: this candidate's failure only
            raise local_failure(exc, "the candidate") from exc
        finally:
            if writing is not None:  # the model file is in place before its metrics or error
                t0 = time.perf_counter()
                writing.wait()
                seconds["write_wait"] = time.perf_counter() - t0  # after scoring
        # Not synced: the model is (it is what a user picks); metrics lost to a power cut
        # only mean the candidate is evaluated again.
        self.store.write_json(folder / "metrics.json", result.to_json(), sync=False)
        return result

    def _build_and_score(
        self,
        assignment: PrecisionAssignment,
        digest: str,
        fp32_units: list[str],
        path: Path,
        model_bytes: list[bytes] | None,
        model: Any,
        report: Any,
        seconds: dict[str, float],
        writing: BackgroundWrite | None,
        before_timing: Callable[[], object] | None,
    ) -> Evaluation:
        t0 = time.perf_counter()
        candidate = self.backend.build(path, self.config, model_bytes=model_bytes)
        seconds["build"] = time.perf_counter() - t0
        outputs: list[dict[str, np.ndarray]] = []
        execution: dict[str, Any] = {}
        deviations: dict[str, float] = {}
        t0 = time.perf_counter()
        with self.backend.open(candidate) as runner:
            for batch in self.data:
                outputs.append(runner.infer(batch))
            seconds["run"] = time.perf_counter() - t0
            finite = all(np.isfinite(v).all() for out in outputs for v in out.values())
            ctx = EvalContext(reference=self.reference, outputs=outputs, assignment=assignment,
                              output_names=self.output_names)  # fmt: skip
            t0 = time.perf_counter()
            # Accuracy first (the session stays open): a new front member is timed longer.
            deviations.update(_score(self.metrics, ctx, latency=False))
            seconds["metric"] = time.perf_counter() - t0
            if self.latency.source == "measured":
                if writing is not None:
                    writing.wait()  # nothing else in this process competes with the timing
                if before_timing is not None:
                    before_timing()
                t0 = time.perf_counter()
                runner.bind(self.data.first())
                deviation = deviations.get(self.metric.name, math.inf) if finite else math.inf
                stats = self._time(runner, deviation)
                execution = dict(runner.execution)
                seconds["time"] = time.perf_counter() - t0
        # Freeing a session takes the backend milliseconds (MiniLM: ~20): timed here as its
        # own, not left to whatever line drops the last reference.
        t0 = time.perf_counter()
        del runner
        self.backend.release(candidate)
        seconds["release"] = time.perf_counter() - t0
        if self.latency.source == "estimated":
            t0 = time.perf_counter()
            ms = float(self.estimator.estimate(model))
            stats = LatencyStats(ms, ms, ms, ms, 1, 0, self._source_label or "estimated")
            seconds["estimate"] = time.perf_counter() - t0
        ctx.latency = stats
        t0 = time.perf_counter()
        deviations.update(_score(self.metrics, ctx, latency=True))
        seconds["metric"] += time.perf_counter() - t0
        deviation = deviations[self.metric.name]
        if not finite or math.isnan(deviation):
            deviation = float("inf")
        result = Evaluation(
            digest=digest,
            latency=stats,
            deviation=deviation,
            deviations=deviations,
            finite=finite,
            fp32_units=fp32_units,
            seconds=seconds,
            extra={
                "conversion": report.to_json(),
                "build": {"seconds": candidate.build_time_s, **_jsonable(candidate.info)},
                "artifacts": {k: str(v) for k, v in candidate.artifacts.items()},
                **({"execution": execution} if execution else {}),
            },
        )
        return result

    @property
    def metrics(self) -> list[Objective]:
        """The chosen metric, then the ones recorded beside it."""
        return [self.metric, *self.extra_metrics]

    def _time(self, runner: Any, deviation: float) -> LatencyStats:
        """Times a bound runner, paired with the resident reference when there is one.

        A candidate that would join the front (``front_probe``) gets ``front_pairs`` more
        windows at once, while its session is open: a front point is not one lucky draw.
        """
        reference = self.resident if self.latency.paired else None
        if reference is not None:
            timing = reference.pair(runner)
        else:
            timing = PairedTiming(Step(runner.run_once, runner.timer()), None,
                                  self.latency.plan, self.clock)  # fmt: skip
        timing.run()
        level = reference.level_ms if reference is not None else None
        stats = timing.stats(source=runner.source, reference_ms=level)
        probe = self.front_probe
        if probe is not None and self.latency.front_pairs and probe(stats, deviation):
            n = self.latency.front_pairs
            timing.run(min_pairs=n, max_pairs=n, until_sure=False)
            stats = replace(timing.stats(source=runner.source, reference_ms=level),
                            front_retimed=True)  # fmt: skip
        return stats


def _score(metrics: list[Objective], ctx: EvalContext, *, latency: bool) -> dict[str, float]:
    """The metrics that read latency (``latency=True``) or the ones that do not."""
    out: dict[str, float] = {}
    for m in metrics:
        if ("latency" in getattr(m, "needs", ())) != latency:
            continue
        try:
            out[m.name] = float(m.evaluate(ctx))
        except Exception as exc:  # a user metric that fails fails the trial, not the study
            raise CandidateRunError(f"Metric {m.name!r} failed: {exc}") from exc
    return out


def _figure(value: Any) -> float:
    """A deviation as ``metrics.json`` holds it (:func:`~amp_search.record.decode_float`)."""
    out = decode_float(value)
    return math.inf if out is None else out


def _from_cache(cached: dict[str, Any], digest: str, fp32_units: list[str]) -> Evaluation:
    lat = cached["latency"]
    deviation = cached["deviation"]
    return Evaluation(
        digest=digest,
        latency=LatencyStats.from_json(lat),
        deviation=_figure(deviation),
        deviations={k: _figure(v) for k, v in cached["deviations"].items()},
        finite=bool(cached["finite"]),
        fp32_units=fp32_units,
        cached=True,
        seconds={},
        extra={
            k: cached[k] for k in ("conversion", "build", "artifacts", "execution") if k in cached
        },  # fmt: skip
    )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)
