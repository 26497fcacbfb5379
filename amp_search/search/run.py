"""The search: profile, seed, sample, evaluate, keep the front; stop cleanly, resume exactly.

:func:`run_search` is what ``amp-search search`` and ``amp-search demo`` call.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amp_search.backends import BuildConfig, get_backend
from amp_search.calibration import load_calibration, model_inputs
from amp_search.errors import (
    BackendUnavailableError,
    CandidateBuildError,
    CandidateRunError,
    UserInputError,
)
from amp_search.graph import (
    MixedPrecisionRewriter,
    find_units,
    group_units,
    load_model,
    reconcile_shapes,
    sanitize,
)
from amp_search.graph.io import model_to_bytes
from amp_search.graph.units import not_searched
from amp_search.keys import (
    CONFIG_ATTR,
    ERROR_ATTR,
    RECORD_ATTR,
    REFERENCE_ATTR,
    SEED_ATTR,
    SEED_PARAMS_ATTR,
)
from amp_search.profiling import assess_units, profile_model
from amp_search.profiling.report import CPU_NOTE, InspectReport, flops_by_node
from amp_search.results.pareto import (
    FrontPoint,
    baselines,
    check_max_deviation,
    compute_front,
    record_of,
    write_front,
)
from amp_search.results.prune import KEEP_MODELS, prune_dominated
from amp_search.results.store import ResultsStore, removed_if_left_empty
from amp_search.search.evaluate import (
    CandidateEvaluator,
    Evaluation,
    LatencySettings,
    ResidentReference,
)
from amp_search.search.sampler import DEFAULT_SAMPLER
from amp_search.search.seeds import enqueue_seeds
from amp_search.search.space import SearchSpace
from amp_search.search.study import (
    WorkerLock,
    default_storage,
    mark_trial_owner,
    open_or_create_study,
    recover_dead_trials,
    redact_storage,
    storage_errors,
)
from amp_search.search.target import fit_to_target
from amp_search.search.validation import measure_front, prepare_validation, run_identity
from amp_search.timing import TimingPlan, nvml_clock
from amp_search.types import PrecisionAssignment

__all__ = ["SearchConfig", "SearchOutcome", "run_search"]

logger = logging.getLogger(__name__)

#: Seconds between checks for trials of dead workers on this host.
RECOVER_EVERY_S = 15.0


@dataclass
class SearchConfig:
    """Everything a search needs (the CLI flags of ``amp-search search``)."""

    model: Path
    out: Path
    data: Path | None = None
    synthetic: bool = False
    #: With ``synthetic``: sizes of inputs with dynamic axes (``--shape``), by input name.
    shapes: dict[str, list[int]] = field(default_factory=dict)
    backend: str = "onnxruntime"
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)
    n_trials: int | None = 60
    timeout: float | None = None
    max_deviation: float | None = None
    metric: str = "rel_l2"
    latency: str | None = None  # measured | estimated; None: estimated on CPU
    target: str = "h100"
    storage: str | None = None
    study_name: str | None = None
    seed: int | None = 0
    sampler: str = DEFAULT_SAMPLER
    threshold: float = 10000.0
    #: Measured latency: stop timing a candidate once its 95% interval is within +-this.
    timing_target: float = 0.02
    #: Measured latency: seconds of timing per candidate at most.
    timing_max_s: float = 8.0
    max_units: int | None = None
    #: Other accuracy metrics to record per trial (each costs a pass over every output).
    record_metrics: tuple[str, ...] = ()
    #: Join an existing study only (``amp-search worker``): never create it or seed it.
    join: bool = False
    #: How long to keep retrying when the study storage stops answering.
    storage_retry_s: float = 120.0
    #: ``all``: every candidate keeps its model; ``front``: dominated ones are pruned.
    keep_models: str = "all"
    #: Data the search never optimizes on; every front point is measured on it at the end.
    validation_data: Path | None = None
    #: Without ``validation_data``: hold out the last ceil(f * n) calibration batches (0: off).
    holdout_fraction: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The settings a worker needs to join this search (paths made absolute)."""
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            if k in ("join", "storage_retry_s"):
                continue
            if isinstance(v, Path):
                v = str(v.resolve())
            elif isinstance(v, tuple):
                v = list(v)
            out[k] = v
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any], **overrides: Any) -> SearchConfig:
        """A config from :meth:`to_json` (unknown keys ignored), with ``overrides``."""
        names = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in obj.items() if k in names}
        for k in ("model", "out", "data", "validation_data"):
            if kw.get(k) is not None:
                kw[k] = Path(kw[k])
        kw["record_metrics"] = tuple(kw.get("record_metrics") or ())
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


@dataclass
class SearchOutcome:
    """What a search produced."""

    front: list[FrontPoint]
    n_trials: int
    n_complete: int
    n_failed: int
    interrupted: bool
    seconds: float
    out: Path
    #: As shown: a literal password hidden (:func:`~amp_search.search.study.redact_storage`).
    storage: str
    study_name: str
    latency_source: str
    notes: list[str] = field(default_factory=list)
    #: The study itself (the only handle on an in-memory one).
    study: Any = field(default=None, repr=False)


def _digest_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


class _Interrupt:
    """First Ctrl-C: finish the running trial, then stop. Second: abort."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _Interrupt:
        self._previous = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("Stopping after the running trial (Ctrl-C again to abort it).")

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def run_search(
    config: SearchConfig,
    progress: Callable[[dict[str, Any]], None] | None = None,
    stage: Callable[[str, int, int], None] | None = None,
) -> SearchOutcome:
    """Runs (or resumes) a search and writes the results directory.

    Args:
        config: What to search.
        progress: Called after each trial with a dict (trial, done, total, front size, best
            latency within budget, state).
        stage: Called with (stage, done, total) during preparation (profiling).
    """
    # The worker lock, released when the search ends; no empty --out if the inputs fail.
    with contextlib.ExitStack() as held, removed_if_left_empty(config.out):
        return _run_search(config, progress, stage, held)


def _run_search(
    config: SearchConfig,
    progress: Callable[[dict[str, Any]], None] | None,
    stage: Callable[[str, int, int], None] | None,
    held: contextlib.ExitStack,
) -> SearchOutcome:
    import optuna

    from amp_search.objective import load_deviation_metric, load_metric

    t_start = time.perf_counter()
    # Optuna logs a caught trial failure with its traceback; amp-search reports failures
    # itself (one line per failed trial, the reason in trial.user_attrs["error"]).
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if config.n_trials is not None and config.n_trials < 1:
        raise UserInputError(f"--n-trials must be at least 1, got {config.n_trials}.")
    check_max_deviation(config.max_deviation)
    if not 0 < config.timing_target < 1 or not config.timing_max_s > 0:
        raise UserInputError(
            f"--timing-target must be in (0, 1) and --timing-max-s positive; got "
            f"{config.timing_target} and {config.timing_max_s}."
        )
    if config.keep_models not in KEEP_MODELS:
        raise UserInputError(
            f"--keep-models must be one of {', '.join(KEEP_MODELS)}, got {config.keep_models!r}."
        )
    metric = load_deviation_metric(config.metric)
    extra = [load_metric(m) for m in config.record_metrics if m != metric.name]
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

    store = ResultsStore(config.out)
    original = load_model(config.model)
    model = sanitize(original)
    units = find_units(model)
    if not units:
        raise UserInputError(
            f"{config.model.name} has no float computation that could run in FP16: "
            "nothing to search."
        )
    if config.max_units:
        units = group_units(units, config.max_units)
    data = load_calibration(config.data, model_inputs(model), synthetic=config.synthetic,
                            shapes={k: tuple(v) for k, v in config.shapes.items()})  # fmt: skip
    # Unseen data (search/validation.py): held out of the search, measured on at the end.
    data, validation = prepare_validation(data, model_inputs(model), config.validation_data,
                                          config.holdout_fraction)  # fmt: skip
    options = backend.options_for_data(options, data.first())  # TensorRT: profile shapes
    build_config = BuildConfig(device=config.device, options=options)
    identity = backend.identity(build_config)  # validates the options
    # Nodes the target cannot run in FP16 stay FP32 in every candidate (ONNX Runtime would
    # run them on the CPU: copies each way and no CUDA graph); an opset upgrade may spare some.
    fitted = fit_to_target(model, units, backend, data.first(), build_config, config.max_units)
    model, units, rewriter, pinned = fitted.model, fitted.units, fitted.rewriter, fitted.pinned
    model_digest = hashlib.sha256(model_to_bytes(model)).hexdigest()[:16]
    data_digest = (f"synthetic:{config.seed}:{sorted(config.shapes.items())}" if data.is_synthetic
                   else _digest_files(data.files))  # fmt: skip
    label = (
        f"estimated:{config.target}" if latency_source == "estimated"
        else f"measured:{config.backend}-{build_config.device_type}"
    )  # fmt: skip
    store.check_run(
        {
            "model": str(config.model),
            "model_digest": model_digest,
            "backend": config.backend,
            # The device kind, not its index: workers on cuda:0 and cuda:1 share one folder.
            "device": build_config.device_type,
            "options": identity.get("options", {}),
            "identity": identity,
            "data": data.describe(),
            "data_digest": data_digest,
            "metric": metric.name,
            "latency_source": label,
            "units": [u.name for u in units],
            "max_units": config.max_units,
            "pinned_fp32": pinned,
            "opset_upgraded_from": fitted.upgraded_from,
            **run_identity(data, validation),
        }
    )

    # Profile once: FP32 reference outputs, ranges, per-unit FP16 deviation -> risk order.
    t0 = time.perf_counter()
    prof = profile_model(
        model, units, data, fp16_pass=True, keep_reference=True, rewriter=rewriter,
        progress=stage,
    )  # fmt: skip
    # Declared shapes the run contradicts are relaxed (a graph output: the rank that ran, free
    # sizes) or dropped (a value_info) before any candidate is written: the CUDA EP refuses to
    # bind an output whose declared rank is wrong (ORT CPU only warns).
    stale = reconcile_shapes(model, {n: t.shape for n, t in prof.tensors.items()
                                     if t.shape is not None})  # fmt: skip
    if stale:
        logger.warning("Relaxed %d declared shape(s) that the FP32 run contradicts: %s",
                       len(stale), "; ".join(stale))  # fmt: skip
        rewriter = MixedPrecisionRewriter(model, units, pinned)
    risks = assess_units(units, prof, threshold=config.threshold)
    flops = flops_by_node(model, data.first(), prof)
    left_out = not_searched(model, units, flops=flops)  # pinned nodes are in fitted.notes
    for x in left_out:
        logger.warning("Not searched, stays FP32: %s", x)
    InspectReport(
        model=str(config.model), n_nodes=len(model.graph.node), risks=risks,
        data=data.describe(), threshold=config.threshold,
        seconds=time.perf_counter() - t0, fp16_pass=True,
        not_searched=not_searched(model, units, pinned, flops=flops),
    ).write_json(store.root / "inspect.json")  # fmt: skip
    locked = [r.unit.name for r in risks if r.locked_fp32]
    space = SearchSpace([u.name for u in units], locked=locked)

    estimator = None
    if latency_source == "estimated":
        from amp_search.latency_model import LatencyEstimator

        shapes = {k: tuple(v.shape) for k, v in data.first().items()}
        observed = {n: t.shape for n, t in prof.tensors.items() if t.shape is not None}
        estimator = LatencyEstimator(model, shapes, target=config.target, known_shapes=observed)
    settings = LatencySettings(source=latency_source, target=config.target, plan=TimingPlan(
        target=config.timing_target, max_time_s=config.timing_max_s))  # fmt: skip
    reference = None
    if latency_source == "measured" or build_config.device_type != "cpu":
        # The all-FP32 model on the target, open for the whole search: the model itself is
        # checked there before anything is seeded, and every candidate is timed against it.
        clock = nvml_clock(build_config.device_id) if build_config.device_type == "cuda" else None
        reference = held.enter_context(contextlib.closing(ResidentReference(
            backend, BuildConfig(device=config.device, options=options),
            store.root / "reference" / "model.onnx", model, data.first(), settings.plan, clock,
        )))  # fmt: skip
    evaluator = CandidateEvaluator(
        rewriter, backend, build_config, data, prof.reference_outputs, metric, store,
        settings, extra_metrics=extra, estimator=estimator, resident=reference,
    )  # fmt: skip

    study_name = config.study_name or f"{config.model.stem}-{model_digest[:8]}"
    storage = config.storage or default_storage(study_name)
    study, created = open_or_create_study(
        storage, study_name, seed=config.seed, sampler=config.sampler, must_exist=config.join
    )
    recover_dead_trials(study, alone=held.enter_context(WorkerLock(storage)).alone)
    if reference is not None:
        _open_reference(reference, study, identity, measured=latency_source == "measured")
    if created:
        # The storage as shown: a worker gives its own (amp-search worker --storage).
        study.set_user_attr(CONFIG_ATTR, {**config.to_json(), "study_name": study_name,
                                          "storage": redact_storage(storage)})  # fmt: skip
    # Only the worker that created the study seeds it: workers started together all see it
    # empty, and creating is the one step the storage makes atomic. Seeds count toward
    # n_trials; a later search with a larger target enqueues the ones it cut.
    if created or not config.join:
        enqueue_seeds(
            study, space, [r.unit.name for r in risks], risks=risks,
            estimate=None if estimator is None
            else (lambda a: estimator.estimate_assignment(rewriter, a)),
            limit=config.n_trials, resume=not created,
        )  # fmt: skip
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

    # Digest -> a COMPLETE trial of it, study-wide (every worker's), refreshed after each trial.
    evaluated = _evaluated_trials(study)
    # The front as of the last finished trial: a measured candidate that would join it is
    # timed longer at once (CandidateEvaluator.front_probe).
    current_front = compute_front(study)

    def joins_front(stats: Any, deviation: float) -> bool:
        if not math.isfinite(deviation) or deviation > (config.max_deviation or math.inf):
            return False
        return not any(p.latency_ms <= stats.median_ms and p.deviation <= deviation
                       for p in current_front)  # fmt: skip

    evaluator.front_probe = joins_front

    # The trial this process runs now: after a storage outage it is failed by number, since
    # the outage may have hit the write that records its owner.
    current: list[int] = []

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        current[:] = [trial.number]
        # The sampler proposes every unit at once; evaluating that proposal starts now, while
        # Optuna writes the parameters one by one (one storage write per unit).
        ahead = None
        early: PrecisionAssignment | None
        seed_params = trial.user_attrs.get(SEED_PARAMS_ATTR)
        if isinstance(seed_params, dict):  # a seed: its fixed parameters win over the sampler
            early = space.assignment(seed_params)
        else:
            early = None if SEED_ATTR in trial.user_attrs else space.proposed(trial)
        if early is not None and early.digest() not in evaluated:
            ahead = _Ahead(evaluator.evaluate, early)
        try:
            mark_trial_owner(trial)  # one storage write, while the evaluation starts
            assignment = space.suggest(trial)
        except BaseException as exc:
            if ahead is not None:
                ahead.params_written.set()
                if isinstance(exc, Exception):  # a lost storage: not timed beside the next
                    ahead.wait()
            raise
        if ahead is not None:
            ahead.params_written.set()  # its timed runs may start: this thread now waits
        if ahead is not None and ahead.assignment != assignment:
            ahead.wait()  # a wrong guess (a trial enqueued by hand): discarded
            ahead = None
            logger.debug("trial %d: fixed parameters differ from the sampler's proposal; "
                         "evaluating them instead", trial.number)  # fmt: skip
        prior = evaluated.get(assignment.digest())
        if prior is not None:
            # Re-proposed: answered from the trial that evaluated it, without a rebuild, and
            # without its files (another worker's folder, or pruned by --keep-models front).
            trial.set_user_attr("duplicate", True)
            return _answer_from_trial(trial, prior)
        try:
            ev = ahead.result() if ahead is not None else evaluator.evaluate(assignment)
        except (CandidateBuildError, CandidateRunError) as exc:
            trial.set_user_attr(ERROR_ATTR, str(exc)[:1000])
            raise
        _record(trial, ev, metric.name, len(units))
        trial.set_constraint("finite_outputs", 0.0 if ev.finite else 1.0)
        if config.max_deviation is not None:
            dev = ev.deviation if ev.deviation != float("inf") else 1e300
            trial.set_constraint("max_deviation", dev - config.max_deviation)
        return ev.latency.median_ms, ev.deviation

    meta = {
        "model": str(config.model),
        "backend": config.backend,
        "device": config.device,
        "metric": metric.name,
        "latency_source": label,
        "max_deviation": config.max_deviation,
        "study": study_name,
        "storage": redact_storage(storage),
        "notes": notes,
        "validation": None if validation is None else validation.identity,
        # What no unit switches (pinned nodes included), by op and reason, with its shares.
        "not_searched": [x.to_json() for x in not_searched(model, units, pinned, flops=flops)],
    }
    target = config.n_trials
    last_recovery = time.monotonic()
    pruned: set[str] = set()  # digests whose files --keep-models front removed
    with _Interrupt() as interrupt, _quiet_heartbeat_errors():

        def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            nonlocal last_recovery
            evaluated.update(_evaluated_trials(study))
            if config.keep_models == "front":
                prune_dominated(store, study, pruned)
            if time.monotonic() - last_recovery > RECOVER_EVERY_S:
                recover_dead_trials(study)  # a worker beside this one may have died
                last_recovery = time.monotonic()
            front = compute_front(study)
            current_front[:] = front
            write_front(store, front, {**meta, "baselines": baselines(study)})
            if progress:
                progress(
                    {
                        "trial": trial.number,
                        "state": trial.state.name,
                        "done": len(evaluated),
                        "total": config.n_trials,
                        "front": len(front),
                        "best_latency": front[0].latency_ms if front else None,
                        "error": trial.user_attrs.get(ERROR_ATTR),
                    }
                )
            if interrupt.requested or (
                target is not None and len(evaluated) >= target and not _waiting(study)
            ):
                study.stop()

        # n_trials is a target of distinct evaluated assignments for the study (all workers
        # together): a rerun of the same command resumes up to it, and re-proposed assignments
        # (answered from the cache) do not count. The cap bounds the loop once the space is
        # nearly exhausted. A storage outage is retried for storage_retry_s, then reported.
        while True:
            remaining = None if target is None else max(0, target - len(evaluated))
            # Enqueued trials (a seed whose worker died) run even once the target is met.
            waiting = _waiting(study)
            if (remaining == 0 and not waiting) or interrupt.requested:
                break
            left = None if config.timeout is None else config.timeout - (
                time.perf_counter() - t_start)  # fmt: skip
            if left is not None and left <= 0:
                break
            try:
                study.optimize(
                    objective,
                    n_trials=None if remaining is None else 3 * remaining + 10 + waiting,
                    timeout=left,
                    catch=(CandidateBuildError, CandidateRunError),
                    callbacks=[after_trial],
                )
                break
            except Exception as exc:
                lost = _storage_error_in(exc)
                if lost is None:
                    raise
                study = _reconnect(config, storage, study_name, lost)
                recover_dead_trials(study, mine=current)  # this worker's interrupted trial
                evaluated.update(_evaluated_trials(study))
    front = compute_front(study)
    if config.max_deviation is not None and not front:
        notes.append(
            f"No candidate met --max-deviation {config.max_deviation:g}; the front is empty. "
            "Loosen the budget (the study holds every trial)."
        )
    if validation is not None:  # every front point's deviation on the unseen data
        front = measure_front(front, meta, validation, store=store, model=model,
                              backend=backend, device=config.device, options=config.options,
                              metric=metric)  # fmt: skip
    write_front(store, front, {**meta, "baselines": baselines(study)})
    from amp_search.results.plots import draw_plots  # matplotlib/plotly: imported when drawn

    draw_plots(store, study, front, meta)
    trials = study.get_trials(deepcopy=False)
    from optuna.trial import TrialState

    return SearchOutcome(
        front=front,
        n_trials=len(trials),
        n_complete=sum(t.state == TrialState.COMPLETE for t in trials),
        n_failed=sum(t.state == TrialState.FAIL for t in trials),
        interrupted=interrupt.requested,
        seconds=time.perf_counter() - t_start,
        out=store.root,
        storage=redact_storage(storage),
        study_name=study_name,
        latency_source=label,
        notes=notes,
        study=study,
    )


class _Ahead:
    """One evaluation run in a background thread (ONNX Runtime and numpy release the GIL)."""

    def __init__(self, evaluate: Callable[..., Evaluation],
                 assignment: PrecisionAssignment) -> None:  # fmt: skip
        self.assignment = assignment
        #: Set once the trial's parameters are written: timed runs wait for it, so the
        #: storage writes of this thread never compete with a measurement.
        self.params_written = threading.Event()
        self._value: Evaluation | None = None
        self._error: BaseException | None = None
        # A daemon: a second Ctrl-C does not wait for it (its claim is taken over later).
        self._thread = threading.Thread(target=self._run, args=(evaluate,), daemon=True)
        self._thread.start()

    def _run(self, evaluate: Callable[..., Evaluation]) -> None:
        try:
            self._value = evaluate(self.assignment, before_timing=self.params_written.wait)
        except BaseException as exc:  # handed to the trial's thread by result()
            self._error = exc

    def wait(self) -> None:
        """Waits for the evaluation to end, whatever its outcome."""
        self._thread.join()

    def result(self) -> Evaluation:
        """The evaluation, or its exception raised here."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


def _evaluated_trials(study: Any) -> dict[str, Any]:
    from optuna.trial import TrialState

    out: dict[str, Any] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        digest = record_of(t).get("digest")
        if digest is not None and str(digest) not in out:
            out[str(digest)] = t
    return out


def _answer_from_trial(trial: Any, prior: Any) -> tuple[float, float]:
    """A re-proposed assignment answered from the trial that evaluated it."""
    record = dict(record_of(prior))
    record["cached"] = True
    trial.set_user_attr(RECORD_ATTR, record)
    for name, value in prior.constraints.items():
        trial.set_constraint(name, value)
    return float(prior.values[0]), float(prior.values[1])


def _waiting(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def _storage_error_in(exc: BaseException) -> BaseException | None:
    """The storage error behind ``exc``, if any.

    Optuna can raise a secondary error (an UnboundLocalError from its own trial bookkeeping)
    while handling a lost connection; the storage error is then in the exception's context.
    """
    errors = storage_errors()
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, errors):
            # A full disk does not heal by waiting: let the CLI say so at once.
            return None if "disk is full" in str(cur) else cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _reconnect(config: SearchConfig, storage: str, study_name: str, first: BaseException) -> Any:
    """Reopens the study once its storage answers again, or gives up after storage_retry_s."""
    from amp_search.errors import StorageUnavailableError

    text = str(first).strip()
    reason = text.splitlines()[0][:200] if text else type(first).__name__
    logger.warning("Lost the study storage (%s); retrying for %.0f s", reason,
                   config.storage_retry_s)  # fmt: skip
    deadline = time.monotonic() + config.storage_retry_s
    retryable: tuple[type[BaseException], ...] = (UserInputError, *storage_errors())
    while True:
        try:
            study, _ = open_or_create_study(storage, study_name, seed=config.seed,
                                            sampler=config.sampler, must_exist=True)  # fmt: skip
            study.get_trials(deepcopy=False)
            logger.warning("The study storage answers again; resuming")
            return study
        except retryable as exc:
            if time.monotonic() >= deadline:
                raise StorageUnavailableError(
                    f"The study storage {redact_storage(storage)} did not answer for "
                    f"{config.storage_retry_s:.0f} s ({reason}). Every finished trial is stored "
                    f"there and every evaluated candidate in {config.out}; rerun the same "
                    "command once the storage is back to resume."
                ) from exc
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


class _quiet_heartbeat_errors:  # noqa: N801 - used as a context manager
    """Optuna's heartbeat thread dies with a traceback when the storage is down; log one line."""

    def __enter__(self) -> None:
        self._previous = threading.excepthook
        errors = storage_errors()

        def hook(args: Any) -> None:
            if args.exc_type is not None and issubclass(args.exc_type, errors):
                logger.warning("Heartbeat not recorded: the study storage does not answer")
                return
            self._previous(args)

        threading.excepthook = hook

    def __exit__(self, *exc: object) -> None:
        threading.excepthook = self._previous


def _record(trial: Any, ev: Evaluation, metric: str, n_units: int) -> None:
    """Stores the trial's figures as ONE user attribute (one storage write, not eight)."""
    deviations = {k: (v if v != float("inf") else "inf") for k, v in ev.deviations.items()}
    trial.set_user_attr(
        RECORD_ATTR,
        {
            "digest": ev.digest,
            "latency_source": ev.latency.source,
            "metric": metric,
            "n_fp32": len(ev.fp32_units),
            "n_units": n_units,
            "fp32_units": ev.fp32_units,
            "cached": ev.cached,
            "metrics": {
                "p90_ms": ev.latency.p90_ms,
                "deviations": deviations,
                "seconds": ev.seconds,
                "casts": ev.extra.get("conversion", {}).get("casts_inserted"),
                **_timing_record(ev),
            },
        },
    )


def _timing_record(ev: Evaluation) -> dict[str, Any]:
    """What a measured latency adds to the trial record: interval, ratio, windows, clock."""
    lat = ev.latency
    if lat.low_ms is None:
        return {}
    out: dict[str, Any] = {
        "latency_low_ms": lat.low_ms,
        "latency_high_ms": lat.high_ms,
        "windows": lat.windows,
        "runs": lat.n_runs,
        "front_retimed": lat.front_retimed,
        "steady": lat.steady,
        "own_median_ms": lat.own_median_ms,
    }
    if lat.ratio is not None:
        out.update(ratio=lat.ratio, ratio_low=lat.ratio_low, ratio_high=lat.ratio_high,
                   reference_ms=lat.reference_ms)  # fmt: skip
    if lat.clock_mhz_min is not None:
        out.update(clock_mhz_min=lat.clock_mhz_min, clock_mhz_steady=lat.clock_mhz_steady)
    if ev.extra.get("execution"):
        out["execution"] = ev.extra["execution"]
    return out


def _open_reference(reference: ResidentReference, study: Any, identity: dict[str, Any],
                    *, measured: bool) -> None:  # fmt: skip
    """Opens the resident reference with the study's level (the first worker stores its own)."""
    stored = study.user_attrs.get(REFERENCE_ATTR)
    key = hashlib.sha256(repr(sorted(identity.items())).encode()).hexdigest()[:16]
    if isinstance(stored, dict) and stored.get("identity") == key:
        reference.level_ms = float(stored["ms"])
    reference.open()
    if measured and not isinstance(stored, dict):
        assert reference.level is not None
        study.set_user_attr(REFERENCE_ATTR, {
            "ms": reference.level_ms, "low_ms": reference.level.low_ms,
            "high_ms": reference.level.high_ms, "identity": key,
            "execution": reference.execution,
        })  # fmt: skip
