"""Preparing a search: the model, data, units, backend and reference a trial needs.

:func:`prepare` is the first step of :func:`~amp_search.search.run.run_search`, before the
study opens. Its steps, in order (each a function of this module, most of them public so that
refine, inspect and the benchmarks prepare a model as the search does):

1. :func:`check_flags`: the settings that need no file (trials, budget, timing, kept models);
   then the deviation metric and the metrics recorded beside it;
2. :func:`open_backend`: the backend, usable here, on a device it has, and the latency source
   (measured, or estimated: the default on the CPU);
3. :func:`~amp_search.graph.units.load_units`: the model loaded and sanitized, its units
   (grouped to ``max_units``);
   then the calibration data, checked against the model's inputs, and the validation data
   the search never optimizes on (:mod:`amp_search.search.validation`: ``--validation-data``,
   or the batches ``--holdout-fraction`` holds out);
4. :func:`fit_backend`: the backend's options for the data (TensorRT: profile shapes), its
   identity, and the nodes the target cannot run in FP16, kept FP32 (an opset upgrade may spare
   some: :func:`~amp_search.search.target.fit_to_target`);
5. :func:`describe_run`: the run's identity, checked against ``run.json`` of the results
   directory (a different model, backend or data there is refused);
6. :func:`profile_units`: one FP32 reference run (reference outputs, tensor ranges, each unit's
   FP16 deviation); declared shapes that the run contradicts are relaxed or dropped;
7. :func:`assess`: the risk of each unit (those that cannot run FP16 are locked FP32), written
   as ``inspect.json``; :func:`make_space`: the search space (``--precisions``: BF16 offered
   to the units whose ops the opset types ``bfloat16``);
8. :func:`make_estimator`: the roofline latency estimator (estimated latency);
9. :func:`resident_reference`: the all-FP32 model on the target, open for the whole search
   (measured latency, or any device but the CPU);
10. the :class:`~amp_search.search.evaluate.CandidateEvaluator` over all of that, and the notes
    the results carry (:func:`search_notes`).

The result is a :class:`Prepared`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amp_search.backends import BuildConfig, get_backend
from amp_search.calibration import load_calibration, model_inputs
from amp_search.errors import BackendUnavailableError, UserInputError
from amp_search.graph import (
    MixedPrecisionRewriter,
    reconcile_shapes,
)
from amp_search.graph.io import model_to_bytes
from amp_search.graph.units import NotSearched, load_units, not_searched
from amp_search.profiling import assess_units, profile_model
from amp_search.profiling.inspection import BF16_NOTE, CPU_NOTE, InspectReport, flops_by_node
from amp_search.results.pareto import check_max_deviation
from amp_search.results.prune import KEEP_MODELS
from amp_search.results.store import ResultsStore
from amp_search.search.evaluate import CandidateEvaluator, LatencySettings, ResidentReference
from amp_search.search.space import SearchSpace
from amp_search.search.target import Fitted, fit_to_target
from amp_search.search.validation import ValidationSet, prepare_validation, run_identity
from amp_search.timing import TimingPlan, nvml_clock
from amp_search.types import Precision

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from amp_search.backends.base import Backend
    from amp_search.calibration import CalibrationData
    from amp_search.graph import Unit
    from amp_search.latency_model import LatencyEstimator
    from amp_search.objective import Objective
    from amp_search.profiling.ranges import Profile
    from amp_search.profiling.sensitivity import UnitRisk
    from amp_search.search.config import SearchConfig

__all__ = [
    "Prepared",
    "assess",
    "check_flags",
    "describe_run",
    "fit_backend",
    "make_estimator",
    "make_space",
    "open_backend",
    "prepare",
    "profile_units",
    "resident_reference",
    "search_notes",
]

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A model prepared for the search: what :func:`prepare` returns.

    Attributes:
        store: The results directory (``run.json`` checked, ``inspect.json`` written).
        backend: The backend, usable here.
        build_config: Its device and options (fitted to the data).
        identity: The backend's identity of ``build_config`` (versions, resolved options).
        latency_source: ``"measured"`` or ``"estimated"``.
        label: The latency source as results show it (``estimated:h100``,
            ``measured:onnxruntime-cpu``).
        metric: The deviation metric (the study's second objective).
        model: The sanitized model as candidates are rewritten from it (maybe upgraded).
        units: The searched units.
        data: The calibration data the search optimizes on.
        validation: The data it never optimizes on (None: none asked for).
        model_digest: The model's digest (names the study by default).
        fitted: What fitting to the target changed (pinned nodes, an opset upgrade).
        rewriter: The model's mixed-precision rewriter.
        risks: Each unit's FP16 risk, riskiest first.
        space: The search space (risky units locked FP32).
        estimator: The roofline estimator (estimated latency only).
        reference: The resident all-FP32 reference, not yet open (None: estimated on the CPU).
        evaluator: What turns an assignment into a scored candidate.
        notes: Lines for the results (what stays FP32 and why, CPU caveats).
        not_searched: What no unit switches (pinned nodes included), by op and reason, with
            its shares of the weights and FLOPs.
    """

    store: ResultsStore
    backend: Backend
    build_config: BuildConfig
    identity: dict[str, Any]
    latency_source: str
    label: str
    metric: Objective
    model: onnx.ModelProto
    units: list[Unit]
    data: CalibrationData
    model_digest: str
    fitted: Fitted
    rewriter: MixedPrecisionRewriter
    risks: list[UnitRisk]
    space: SearchSpace
    estimator: LatencyEstimator | None
    reference: ResidentReference | None
    evaluator: CandidateEvaluator
    validation: ValidationSet | None = None
    notes: list[str] = field(default_factory=list)
    not_searched: list[NotSearched] = field(default_factory=list)


def prepare(
    config: SearchConfig,
    *,
    held: contextlib.ExitStack,
    stage: Callable[[str, int, int], None] | None = None,
) -> Prepared:
    """Prepares ``config``'s search (the steps of the module docstring).

    Args:
        config: What to search.
        held: Where the resident reference is closed when the search ends.
        stage: Called with (stage, done, total) while profiling.
    """
    from amp_search.objective import load_deviation_metric, load_metric

    check_flags(config)
    metric = load_deviation_metric(config.metric)
    extra = [load_metric(m) for m in config.record_metrics if m != metric.name]
    backend, build_config, latency_source = open_backend(config)

    store = ResultsStore(config.out)
    model, units = load_units(config.model, config.max_units)
    data = load_calibration(config.data, model_inputs(model), synthetic=config.synthetic,
                            shapes={k: tuple(v) for k, v in config.shapes.items()})  # fmt: skip
    data, validation = prepare_validation(data, model_inputs(model), config.validation_data,
                                          config.holdout_fraction)  # fmt: skip
    build_config, identity, fitted = fit_backend(config, backend, model, units, data)
    model, units = fitted.model, fitted.units
    model_digest = hashlib.sha256(model_to_bytes(model)).hexdigest()[:16]
    label = (
        f"estimated:{config.target}" if latency_source == "estimated"
        else f"measured:{config.backend}-{build_config.device_type}"
    )  # fmt: skip
    store.check_run(describe_run(config, build_config, identity, data, metric.name, label,
                                 units, fitted, model_digest, validation))  # fmt: skip

    t0 = time.perf_counter()
    bf16 = Precision.BF16 in config.low_precisions
    prof, rewriter, stale = profile_units(model, units, data, fitted, stage, bf16=bf16)
    risks, left_out, everything_left_out = assess(config, model, units, data, prof, fitted,
                                                  store, t0)  # fmt: skip
    gaps = backend.bf16_gaps(rewriter, data.first(), build_config) if bf16 else {}
    space, bf16_note = make_space(config.low_precisions, units, risks, rewriter, gaps)
    estimator = None
    if latency_source == "estimated":
        estimator = make_estimator(model, data.first(), prof, config.target)
    settings = LatencySettings(source=latency_source, target=config.target, plan=TimingPlan(
        target=config.timing_target, max_time_s=config.timing_max_s))  # fmt: skip
    reference = None
    if latency_source == "measured" or build_config.device_type != "cpu":
        # The all-FP32 model on the target, open for the whole search: the model itself is
        # checked there before anything is seeded, and every candidate is timed against it.
        reference = resident_reference(
            backend, BuildConfig(device=config.device, options=build_config.options),
            store.root / "reference" / "model.onnx", model, data.first(), settings.plan, held,
        )  # fmt: skip
    evaluator = CandidateEvaluator(
        rewriter, backend, build_config, data, prof.reference_outputs, metric, store,
        settings, extra_metrics=extra, estimator=estimator, resident=reference,
    )  # fmt: skip
    notes = search_notes(fitted, left_out, stale, build_config, latency_source)
    if bf16_note:
        notes.append(bf16_note)
    if bf16 and build_config.device_type == "cpu":
        notes.append(BF16_NOTE)
    return Prepared(
        store=store, backend=backend, build_config=build_config, identity=identity,
        latency_source=latency_source, label=label, metric=metric, model=model, units=units,
        data=data, model_digest=model_digest, fitted=fitted, rewriter=rewriter, risks=risks,
        space=space, estimator=estimator, reference=reference, evaluator=evaluator,
        validation=validation, notes=notes, not_searched=everything_left_out,
    )  # fmt: skip


def check_flags(config: SearchConfig) -> None:
    """Refuses settings that are wrong whatever the model (before any file is read)."""
    if config.n_trials is not None and config.n_trials < 1:
        raise UserInputError(f"--n-trials must be at least 1, got {config.n_trials}.")
    check_max_deviation(config.max_deviation)
    config.low_precisions  # noqa: B018 - reading it refuses anything but fp16 and bf16
    if not 0 < config.timing_target < 1 or not config.timing_max_s > 0:
        raise UserInputError(
            f"--timing-target must be in (0, 1) and --timing-max-s positive; got "
            f"{config.timing_target} and {config.timing_max_s}."
        )
    if config.keep_models not in KEEP_MODELS:
        raise UserInputError(
            f"--keep-models must be one of {', '.join(KEEP_MODELS)}, got {config.keep_models!r}."
        )


def open_backend(config: SearchConfig) -> tuple[Backend, BuildConfig, str]:
    """The backend, its build config (before the data) and the latency source.

    Raises:
        BackendUnavailableError: The backend, or the device, cannot be used here.
    """
    backend = get_backend(config.backend)
    reason = backend.unavailable_reason()
    if reason:
        raise BackendUnavailableError(f"Backend '{config.backend}' is unavailable: {reason}")
    options = dict(config.options)
    build_config = BuildConfig(device=config.device, options=options)
    devices = backend.devices()
    if build_config.device_type not in devices:
        hint = backend.device_hint(config.device)
        raise BackendUnavailableError(
            f"Backend '{config.backend}' cannot use device {config.device!r} here "
            f"(available: {', '.join(devices)}). {hint + ' Or ' if hint else ''}pass "
            f"--device {devices[0]}."
        )
    latency_source = config.latency or ("measured" if build_config.device_type != "cpu"
                                        else "estimated")  # fmt: skip
    if latency_source not in ("measured", "estimated"):
        raise UserInputError(f"--latency must be measured or estimated, got {latency_source!r}.")
    return backend, build_config, latency_source


def fit_backend(
    config: SearchConfig,
    backend: Backend,
    model: onnx.ModelProto,
    units: list[Unit],
    data: CalibrationData,
) -> tuple[BuildConfig, dict[str, Any], Fitted]:
    """The build config for the data, the backend's identity of it, and the fitted model."""
    options = backend.options_for_data(dict(config.options), data.first())  # TRT: profiles
    build_config = BuildConfig(device=config.device, options=options)
    identity = backend.identity(build_config)  # validates the options
    # Nodes the target cannot run in FP16 stay FP32 in every candidate (ONNX Runtime would
    # run them on the CPU: copies each way and no CUDA graph); an opset upgrade may spare some.
    fitted = fit_to_target(model, units, backend, data.first(), build_config, config.max_units)
    return build_config, identity, fitted


def describe_run(
    config: SearchConfig,
    build_config: BuildConfig,
    identity: dict[str, Any],
    data: CalibrationData,
    metric: str,
    label: str,
    units: list[Unit],
    fitted: Fitted,
    model_digest: str,
    validation: ValidationSet | None = None,
) -> dict[str, Any]:
    """What identifies the run in ``run.json`` (a results directory holds one)."""
    data_digest = (f"synthetic:{config.seed}:{sorted(config.shapes.items())}" if data.is_synthetic
                   else _digest_files(data.files))  # fmt: skip
    return {
        "model": str(config.model),
        "model_digest": model_digest,
        "backend": config.backend,
        # The device kind, not its index: workers on cuda:0 and cuda:1 share one folder.
        "device": build_config.device_type,
        "options": identity.get("options", {}),
        "identity": identity,
        "data": data.describe(),
        "data_digest": data_digest,
        "metric": metric,
        "latency_source": label,
        "units": [u.name for u in units],
        "max_units": config.max_units,
        "pinned_fp32": fitted.pinned,
        "opset_upgraded_from": fitted.upgraded_from,
        "precisions": list(config.precisions),
        **run_identity(data, validation),
    }


def _digest_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def profile_units(
    model: onnx.ModelProto,
    units: list[Unit],
    data: CalibrationData,
    fitted: Fitted,
    stage: Callable[[str, int, int], None] | None = None,
    *,
    bf16: bool = False,
) -> tuple[Profile, MixedPrecisionRewriter, list[str]]:
    """One FP32 reference run with the all-FP16 pass; the rewriter; the reconciled shapes.

    ``bf16``: the all-BF16 pass too (each unit's own BF16 error, for the guided sampler).

    The reference outputs, ranges and per-unit FP16 deviation come from one profile. Declared
    shapes the run contradicts are then relaxed or dropped in ``model`` (in place) before any
    candidate is written: the CUDA EP refuses to bind an output whose declared rank is wrong
    (ORT CPU only warns); the rewriter is made again over the reconciled model.
    """
    rewriter = fitted.rewriter
    prof = profile_model(
        model, units, data, fp16_pass=True, bf16_pass=bf16, keep_reference=True,
        rewriter=rewriter, progress=stage,
    )  # fmt: skip
    stale = reconcile_shapes(model, {n: t.shape for n, t in prof.tensors.items()
                                     if t.shape is not None})  # fmt: skip
    if stale:
        logger.warning("Relaxed %d declared shape(s) that the FP32 run contradicts: %s",
                       len(stale), "; ".join(stale))  # fmt: skip
        rewriter = MixedPrecisionRewriter(model, units, fitted.pinned)
    return prof, rewriter, stale


def assess(
    config: SearchConfig,
    model: onnx.ModelProto,
    units: list[Unit],
    data: CalibrationData,
    prof: Profile,
    fitted: Fitted,
    store: ResultsStore,
    t0: float,
) -> tuple[list[UnitRisk], list[NotSearched], list[NotSearched]]:
    """Each unit's risk and the nodes left out (without, then with, the pinned ones).

    The pinned nodes are named in ``fitted.notes``; ``inspect.json`` is written with them.

    ``t0`` is when profiling began (``inspect.json`` says how long profiling took).
    """
    risks = assess_units(units, prof, threshold=config.threshold)
    flops = flops_by_node(model, data.first(), prof)
    left_out = not_searched(model, units, flops=flops)  # pinned nodes are in fitted.notes
    for x in left_out:
        logger.warning("Not searched, stays FP32: %s", x)
    everything = not_searched(model, units, fitted.pinned, flops=flops)
    InspectReport(
        model=str(config.model), n_nodes=len(model.graph.node), risks=risks,
        data=data.describe(), threshold=config.threshold,
        seconds=time.perf_counter() - t0, fp16_pass=True,
        not_searched=everything, precisions=config.low_precisions,
    ).write_json(store.root / "inspect.json")  # fmt: skip
    return risks, left_out, everything


def make_space(
    wanted: tuple[Precision, ...],
    units: list[Unit],
    risks: list[UnitRisk],
    rewriter: MixedPrecisionRewriter,
    gaps: dict[str, str] | None = None,
) -> tuple[SearchSpace, str | None]:
    """The search space for ``--precisions``, and a note on the units BF16 is withheld from.

    Units whose weights overflow FP16 are locked FP32 in an FP16 search; with BF16 they may
    still take BF16. A unit is offered BF16 when the model's opset types every one of its
    nodes ``bfloat16`` (:meth:`~amp_search.graph.MixedPrecisionRewriter.admits_bf16_unit`)
    and the target runs them in BF16 (``gaps``: node -> why not, from
    :meth:`~amp_search.backends.base.Backend.bf16_gaps`).

    Raises:
        UserInputError: BF16 alone was asked for and no unit admits it.
    """
    names = [u.name for u in units]
    locked = [r.unit.name for r in risks if r.locked_fp32]
    if Precision.BF16 not in wanted:
        return SearchSpace(names, locked=locked), None
    typed = [u for u in units if rewriter.admits_bf16_unit(u.name)]
    bf16 = [u.name for u in typed if not set(u.nodes) & set(gaps or {})]
    space = SearchSpace(names, precisions=wanted, no_fp16=locked, bf16_units=bf16)
    opset = next((o.version for o in rewriter.model.opset_import if o.domain in ("", "ai.onnx")),
                 None)  # fmt: skip
    if not space.three_way and Precision.FP16 not in wanted:
        raise UserInputError(
            f"--precisions bf16: no unit admits BF16 at opset {opset} (ONNX types Cast bfloat16 "
            "from opset 13, Conv from 22); search with --precisions fp16, or export the model "
            "at a newer opset."
        )
    notes = []
    if len(typed) < len(names):
        notes.append(
            f"BF16 withheld from {len(names) - len(typed)} of {len(names)} units: opset {opset} "
            "does not type bfloat16 for some of their ops (e.g. Conv below opset 22); they "
            "choose FP32 or FP16."
        )
    if gaps:
        reasons = sorted(set(gaps.values()))
        ran = sorted({op for u in units if u.name in bf16 for op in u.op_types})
        notes.append(
            f"BF16 withheld on the target from {len(typed) - len(bf16)} more unit(s): "
            f"{'; '.join(reasons)}. BF16 runs there for {', '.join(ran) or 'no op'}."
        )
    return space, " ".join(notes) or None


def make_estimator(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], prof: Profile, target: str
) -> LatencyEstimator:
    """The roofline estimator of ``model`` at the shapes of ``feeds`` and those profiled."""
    from amp_search.latency_model import LatencyEstimator

    shapes = {k: tuple(v.shape) for k, v in feeds.items()}
    observed = {n: t.shape for n, t in prof.tensors.items() if t.shape is not None}
    return LatencyEstimator(model, shapes, target=target, known_shapes=observed)


def resident_reference(
    backend: Backend,
    build_config: BuildConfig,
    path: Path,
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    plan: TimingPlan,
    held: contextlib.ExitStack,
) -> ResidentReference:
    """The all-FP32 reference on the target (not yet open), closed when ``held`` closes.

    Its SM clock is read on CUDA devices.
    """
    clock = nvml_clock(build_config.device_id) if build_config.device_type == "cuda" else None
    return held.enter_context(contextlib.closing(ResidentReference(
        backend, build_config, path, model, feeds, plan, clock,
    )))  # fmt: skip


def search_notes(
    fitted: Fitted,
    left_out: list[NotSearched],
    stale: list[str],
    build_config: BuildConfig,
    latency_source: str,
) -> list[str]:
    """The lines the results carry about the preparation (front.json ``notes``)."""
    notes: list[str] = [*fitted.notes, *(f"Not searched, stays FP32: {x}" for x in left_out)]
    if stale:
        notes.append(f"Declared shapes the FP32 run contradicts were relaxed: {'; '.join(stale)}")
    if build_config.device_type == "cpu":
        notes.append(CPU_NOTE)
    if latency_source == "measured" and build_config.device_type == "cpu":
        notes.append(
            "Latency measured on the CPU: CPU FP16 timings say nothing about a GPU. Use "
            "--latency estimated (default on CPU) or a GPU backend for speed decisions."
        )
    return notes
