"""The trial loop: ``study.optimize`` with a look-ahead, callbacks, recovery and a clean stop.

As Optuna keeps its loop in ``optuna/study/_optimize.py``, apart from ``Study``, this module
keeps what runs between a prepared search (:mod:`amp_search.search.prepare`) and its results:

- :func:`optimize` calls ``study.optimize`` until the study holds ``n_trials`` distinct
  evaluated assignments (every worker's together), the timeout passes, or Ctrl-C comes
  (:class:`_Interrupt`: the first finishes the running trial, the second aborts it). A lost
  storage is retried for ``storage_retry_s`` (:func:`_reconnect`), then reported; meanwhile
  Optuna's heartbeat thread logs one line instead of a traceback
  (:class:`_quiet_heartbeat_errors`).
- :meth:`_TrialLoop.objective` turns a trial into an assignment and values. The sampler's
  proposal starts evaluating in a background thread (:class:`_Ahead`) while Optuna writes the
  parameters one by one; an assignment evaluated before is answered from its trial
  (:func:`_answer_from_trial`); the figures are stored as one trial attribute
  (:func:`_record`), and the constraints set.
- :meth:`_TrialLoop.after_trial`, after each trial: the evaluated set refreshed, dominated
  models pruned (``--keep-models front``), dead workers' trials recovered, the front written,
  progress reported, and the study stopped once the target is met.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from amp_search.errors import CandidateBuildError, CandidateRunError, UserInputError
from amp_search.keys import ERROR_ATTR, RECORD_ATTR, SEED_ATTR, SEED_PARAMS_ATTR
from amp_search.record import TrialRecord
from amp_search.results.outputs import save_front
from amp_search.results.pareto import compute_front
from amp_search.results.prune import prune_dominated
from amp_search.search.evaluate import Evaluation
from amp_search.search.study import (
    mark_trial_owner,
    open_or_create_study,
    recover_dead_trials,
    redact_storage,
    storage_errors,
)
from amp_search.types import PrecisionAssignment

if TYPE_CHECKING:
    import optuna

    from amp_search.search.config import SearchConfig
    from amp_search.search.prepare import Prepared

__all__ = ["RECOVER_EVERY_S", "optimize"]

logger = logging.getLogger(__name__)

#: Seconds between checks for trials of dead workers on this host.
RECOVER_EVERY_S = 15.0


def optimize(
    study: Any,
    config: SearchConfig,
    prepared: Prepared,
    meta: dict[str, Any],
    *,
    storage: str,
    study_name: str,
    t_start: float,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Any, bool]:
    """Runs trials until the search is done (see the module docstring).

    Args:
        study: The opened (and seeded) study.
        config: The search's settings.
        prepared: The prepared model, evaluator and space.
        meta: What ``front.json`` says about the search besides its front.
        storage: The study storage (to reconnect after an outage).
        study_name: The study's name (likewise).
        t_start: When the search started (``perf_counter``; the timeout counts from it).
        progress: Called after each trial (see :meth:`_TrialLoop.after_trial`).

    Returns:
        The study (a new handle after an outage) and whether Ctrl-C stopped the search.
    """
    loop = _TrialLoop(study, config, prepared, meta, progress)
    target = config.n_trials
    with _Interrupt() as interrupt, _quiet_heartbeat_errors():
        loop.interrupt = interrupt
        # n_trials is a target of distinct evaluated assignments for the study (all workers
        # together): a rerun of the same command resumes up to it, and re-proposed assignments
        # (answered from the cache) do not count. The cap bounds the loop once the space is
        # nearly exhausted. A storage outage is retried for storage_retry_s, then reported.
        while True:
            remaining = None if target is None else max(0, target - len(loop.evaluated))
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
                    loop.objective,
                    n_trials=None if remaining is None else 3 * remaining + 10 + waiting,
                    timeout=left,
                    catch=(CandidateBuildError, CandidateRunError),
                    callbacks=[loop.after_trial],
                )
                break
            except Exception as exc:
                lost = _storage_error_in(exc)
                if lost is None:
                    raise
                study = _reconnect(config, storage, study_name, lost)
                recover_dead_trials(study, mine=loop.current)  # this worker's interrupted trial
                loop.evaluated.update(_evaluated_trials(study))
    return study, interrupt.requested


class _TrialLoop:
    """What the objective and the after-trial callback of one process share."""

    def __init__(
        self,
        study: Any,
        config: SearchConfig,
        prepared: Prepared,
        meta: dict[str, Any],
        progress: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        self.config = config
        self.space = prepared.space
        self.evaluator = prepared.evaluator
        self.store = prepared.store
        self.metric = prepared.metric.name
        self.n_units = len(prepared.units)
        self.meta = meta
        self.progress = progress
        # Digest -> a COMPLETE trial of it, study-wide (every worker's), refreshed after each
        # trial.
        self.evaluated = _evaluated_trials(study)
        # The front as of the last finished trial: a measured candidate that would join it is
        # timed longer at once (CandidateEvaluator.front_probe).
        self.current_front = compute_front(study)
        self.evaluator.front_probe = self.joins_front
        # The trial this process runs now: after a storage outage it is failed by number, since
        # the outage may have hit the write that records its owner.
        self.current: list[int] = []
        self.last_recovery = time.monotonic()
        self.pruned: set[str] = set()  # digests whose files --keep-models front removed
        self.interrupt: _Interrupt | None = None

    def joins_front(self, stats: Any, deviation: float) -> bool:
        """Whether a candidate of this latency and deviation would join the current front."""
        if not math.isfinite(deviation) or deviation > (self.config.max_deviation or math.inf):
            return False
        return not any(p.latency_ms <= stats.median_ms and p.deviation <= deviation
                       for p in self.current_front)  # fmt: skip

    def objective(self, trial: optuna.Trial) -> tuple[float, float]:
        """(latency ms, deviation) of the trial's assignment."""
        self.current[:] = [trial.number]
        # The sampler proposes every unit at once; evaluating that proposal starts now, while
        # Optuna writes the parameters one by one (one storage write per unit).
        ahead = None
        early: PrecisionAssignment | None
        seed_params = trial.user_attrs.get(SEED_PARAMS_ATTR)
        if isinstance(seed_params, dict):  # a seed: its fixed parameters win over the sampler
            early = self.space.assignment(seed_params)
        else:
            early = None if SEED_ATTR in trial.user_attrs else self.space.proposed(trial)
        if early is not None and early.digest() not in self.evaluated:
            ahead = _Ahead(self.evaluator.evaluate, early)
        try:
            mark_trial_owner(trial)  # one storage write, while the evaluation starts
            assignment = self.space.suggest(trial)
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
        prior = self.evaluated.get(assignment.digest())
        if prior is not None:
            # Re-proposed: answered from the trial that evaluated it, without a rebuild, and
            # without its files (another worker's folder, or pruned by --keep-models front).
            trial.set_user_attr("duplicate", True)
            return _answer_from_trial(trial, prior)
        try:
            ev = ahead.result() if ahead is not None else self.evaluator.evaluate(assignment)
        except (CandidateBuildError, CandidateRunError) as exc:
            trial.set_user_attr(ERROR_ATTR, str(exc)[:1000])
            raise
        _record(trial, ev, self.metric, self.n_units, sorted(assignment.bf16_units))
        trial.set_constraint("finite_outputs", 0.0 if ev.finite else 1.0)
        if self.config.max_deviation is not None:
            dev = ev.deviation if ev.deviation != float("inf") else 1e300
            trial.set_constraint("max_deviation", dev - self.config.max_deviation)
        return ev.latency.median_ms, ev.deviation

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Refreshes, prunes, recovers, writes the front, reports progress, stops when done.

        ``progress`` gets a dict: trial, state, done (distinct evaluated assignments), total,
        front (its size), best_latency (of the front's fastest point), error.
        """
        config = self.config
        self.evaluated.update(_evaluated_trials(study))
        if config.keep_models == "front":
            prune_dominated(self.store, study, self.pruned)
        if time.monotonic() - self.last_recovery > RECOVER_EVERY_S:
            recover_dead_trials(study)  # a worker beside this one may have died
            self.last_recovery = time.monotonic()
        front = compute_front(study)
        self.current_front[:] = front
        save_front(self.store, study, front, self.meta)
        if self.progress:
            self.progress(
                {
                    "trial": trial.number,
                    "state": trial.state.name,
                    "done": len(self.evaluated),
                    "total": config.n_trials,
                    "front": len(front),
                    "best_latency": front[0].latency_ms if front else None,
                    "error": trial.user_attrs.get(ERROR_ATTR),
                }
            )
        target = config.n_trials
        if (self.interrupt is not None and self.interrupt.requested) or (
            target is not None and len(self.evaluated) >= target and not _waiting(study)
        ):
            study.stop()


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
        digest = TrialRecord.from_trial(t).digest
        if digest and digest not in out:
            out[digest] = t
    return out


def _answer_from_trial(trial: Any, prior: Any) -> tuple[float, float]:
    """A re-proposed assignment answered from the trial that evaluated it."""
    record = replace(TrialRecord.from_trial(prior), cached=True)
    trial.set_user_attr(RECORD_ATTR, record.to_attr())
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


def _record(trial: Any, ev: Evaluation, metric: str, n_units: int, bf16_units: list[str]) -> None:
    """Stores the trial's figures as ONE user attribute (one storage write, not eight)."""
    record = TrialRecord(
        digest=ev.digest,
        latency_source=ev.latency.source,
        metric=metric,
        n_fp32=len(ev.fp32_units),
        n_units=n_units,
        fp32_units=tuple(ev.fp32_units),
        cached=ev.cached,
        p90_ms=ev.latency.p90_ms,
        deviations=ev.deviations,
        seconds=ev.seconds,
        casts=ev.extra.get("conversion", {}).get("casts_inserted"),
        timing=_timing_record(ev),
        bf16_units=tuple(bf16_units),
    )
    trial.set_user_attr(RECORD_ATTR, record.to_attr())


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
