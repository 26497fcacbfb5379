"""The search: prepare, open the study, run the trials, write the results; resume exactly.

:func:`run_search` is what ``amp-search search``, ``amp-search worker`` and
``amp-search demo`` call. It is a short composition:

1. :func:`~amp_search.search.prepare.prepare`: the model, data, units, backend, the FP32
   reference and the evaluator (checks every setting first);
2. :func:`_open_study`: the study created or joined, dead trials recovered, the resident
   reference opened at the study's level, the seeds enqueued;
3. :func:`~amp_search.search._optimize.optimize`: the trial loop, until the target, the
   timeout or Ctrl-C;
4. :func:`_finish`: the front and plots written (:mod:`amp_search.results.outputs`), the
   :class:`SearchOutcome`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amp_search.errors import UserInputError
from amp_search.keys import CONFIG_ATTR, REFERENCE_ATTR
from amp_search.results.outputs import write_outputs
from amp_search.results.pareto import FrontPoint, compute_front
from amp_search.results.store import removed_if_left_empty
from amp_search.search._optimize import optimize
from amp_search.search.config import SearchConfig
from amp_search.search.evaluate import ResidentReference
from amp_search.search.prepare import Prepared, prepare
from amp_search.search.seeds import enqueue_seeds
from amp_search.search.study import (
    WorkerLock,
    default_storage,
    open_or_create_study,
    recover_dead_trials,
    redact_storage,
)
from amp_search.search.validation import measure_front

__all__ = ["SearchConfig", "SearchOutcome", "run_search"]

logger = logging.getLogger(__name__)


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

    t_start = time.perf_counter()
    # Optuna logs a caught trial failure with its traceback; amp-search reports failures
    # itself (one line per failed trial, the reason in trial.user_attrs["error"]).
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    prepared = prepare(config, held=held, stage=stage)
    study, storage, study_name = _open_study(config, prepared, held)
    meta = {
        "model": str(config.model),
        "backend": config.backend,
        "device": config.device,
        "metric": prepared.metric.name,
        "latency_source": prepared.label,
        "max_deviation": config.max_deviation,
        "study": study_name,
        "storage": redact_storage(storage),
        "notes": prepared.notes,  # the same list: a note added at the end shows in it
        "validation": None if prepared.validation is None else prepared.validation.identity,
        # What no unit switches (pinned nodes included), by op and reason, with its shares.
        "not_searched": [x.to_json() for x in prepared.not_searched],
    }
    study, interrupted = optimize(
        study, config, prepared, meta, storage=storage, study_name=study_name,
        t_start=t_start, progress=progress,
    )  # fmt: skip
    return _finish(config, prepared, study, meta, interrupted=interrupted, t_start=t_start,
                   storage=storage, study_name=study_name)  # fmt: skip


def _open_study(
    config: SearchConfig, prepared: Prepared, held: contextlib.ExitStack
) -> tuple[Any, str, str]:
    """The study (created, or joined), ready for trials; its storage and name.

    Dead workers' trials are recovered, the resident reference is opened at the study's
    level, and the seeds are enqueued.
    """
    study_name = config.study_name or f"{config.model.stem}-{prepared.model_digest[:8]}"
    storage = config.storage or default_storage(study_name)
    study, created = open_or_create_study(
        storage, study_name, seed=config.seed, sampler=config.sampler, must_exist=config.join
    )
    _check_precisions(study, config, created, study_name)
    recover_dead_trials(study, alone=held.enter_context(WorkerLock(storage)).alone)
    reference = prepared.reference
    if reference is not None:
        _open_reference(reference, study, prepared.identity,
                        measured=prepared.latency_source == "measured")  # fmt: skip
    if created:
        # The storage as shown: a worker gives its own (amp-search worker --storage).
        study.set_user_attr(CONFIG_ATTR, {**config.to_json(), "study_name": study_name,
                                          "storage": redact_storage(storage)})  # fmt: skip
    # Only the worker that created the study seeds it: workers started together all see it
    # empty, and creating is the one step the storage makes atomic. Seeds count toward
    # n_trials; a later search with a larger target enqueues the ones it cut.
    if created or not config.join:
        estimator, rewriter, risks = prepared.estimator, prepared.rewriter, prepared.risks
        enqueue_seeds(
            study, prepared.space, [r.unit.name for r in risks], risks=risks,
            estimate=None if estimator is None
            else (lambda a: estimator.estimate_assignment(rewriter, a)),
            limit=config.n_trials, resume=not created,
        )  # fmt: skip
    return study, storage, study_name


def _check_precisions(study: Any, config: SearchConfig, created: bool, name: str) -> None:
    """Refuses to resume a study searched with other ``--precisions`` (other choices)."""
    if created:
        return
    saved = list((study.user_attrs.get(CONFIG_ATTR) or {}).get("precisions") or ["fp16"])
    if saved != list(config.precisions):
        raise UserInputError(
            f"Study {name!r} was searched with --precisions {','.join(saved)}, not "
            f"{','.join(config.precisions)}: pass --study with a new name (and another --out)."
        )


def _finish(
    config: SearchConfig,
    prepared: Prepared,
    study: Any,
    meta: dict[str, Any],
    *,
    interrupted: bool,
    t_start: float,
    storage: str,
    study_name: str,
) -> SearchOutcome:
    """Writes the final front and plots; what the search produced."""
    from optuna.trial import TrialState

    front = compute_front(study)
    notes = prepared.notes
    if config.max_deviation is not None and not front:
        notes.append(
            f"No candidate met --max-deviation {config.max_deviation:g}; the front is empty. "
            "Loosen the budget (the study holds every trial)."
        )
    if prepared.validation is not None:  # every front point's deviation on the unseen data
        front = measure_front(front, meta, prepared.validation, store=prepared.store,
                              model=prepared.model, backend=prepared.backend,
                              device=config.device, options=config.options,
                              metric=prepared.metric)  # fmt: skip
    write_outputs(prepared.store, study, front, meta)
    trials = study.get_trials(deepcopy=False)
    return SearchOutcome(
        front=front,
        n_trials=len(trials),
        n_complete=sum(t.state == TrialState.COMPLETE for t in trials),
        n_failed=sum(t.state == TrialState.FAIL for t in trials),
        interrupted=interrupted,
        seconds=time.perf_counter() - t_start,
        out=prepared.store.root,
        storage=redact_storage(storage),
        study_name=study_name,
        latency_source=prepared.label,
        notes=notes,
        study=study,
    )


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
