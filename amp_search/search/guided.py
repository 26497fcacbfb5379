"""The guided sampler: expected hypervolume improvement over assignments (``--sampler guided``).

After the seed trials it proposes, one trial at a time, the unevaluated assignment with the
largest expected improvement of the hypervolume of the (latency, log10 deviation) front:

- latency from the study's guide (:mod:`amp_search.search._guided.guide`), a model fitted on
  the roofline estimator, so every candidate's latency is known before it is built; without a
  latency model in the guide (measured latency), a model of the same form fitted on the trials;
- log10 deviation from a Gaussian process over the assignments fitted on the trials, its mean
  following the profile's per-unit FP16 (and BF16) errors; where every assignment is a
  candidate, from :data:`~amp_search.search._guided.proposal.RELEVANCE_FROM` trials on, with a
  weight per unit in its distance (units whose rounding errors cancel are told apart);
- the improvement's expectation in closed form
  (:func:`amp_search.search._guided.acquisition.expected_hvi`).

Beyond :data:`~amp_search.search._guided.candidates.ENUMERATE_MAX_UNITS` units (a candidate
pool, not every assignment), once :data:`STALL_PATIENCE` trials in a row have left the front
as it was, every :data:`STALL_EVERY`-th proposal is TPE's instead (the study's own trials, no
prior): on a real model the prior and the latency model can both misjudge the assignments
that keep a few scattered units FP32, where rounding errors cancel, and the pool around the
front never reaches them; a TPE proposal that moves the front ends the stall.

With BF16 among the precisions (``--precisions fp16,bf16``) each unit has three choices (two
for a unit that admits one low precision only); the models see "runs low precision" and
"runs BF16" per unit, and the candidates are every assignment up to
:data:`~amp_search.search._guided.candidates.ENUMERATE_MAX_ROWS`, else the pool.

Deviation budgets (``--max-deviation``) move the reference point to the budget; non-finite
outputs train the process as worse than anything finite. A study without a guide (made
before guides existed) is sampled by TPE.

This module is the Optuna adapter only, as Optuna's ``samplers/_gp/sampler.py`` sits over its
``_gp`` package: :class:`GuidedSampler` reads the guide and the trials, :func:`observe` turns
the trials into arrays, and a proposed row becomes parameters again. The numerics are in
:mod:`amp_search.search._guided`.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState
from threadpoolctl import threadpool_limits

from amp_search.results.pareto import front_order
from amp_search.search._guided.candidates import ENUMERATE_MAX_UNITS, row_key
from amp_search.search._guided.guide import allowed_codes, load_guide
from amp_search.search._guided.proposal import Observations, next_row
from amp_search.search.sampler import make_tpe
from amp_search.search.space import CHOICES

if TYPE_CHECKING:
    from collections.abc import Sequence

    from optuna.distributions import BaseDistribution
    from optuna.trial import FrozenTrial

__all__ = ["GuidedSampler", "observe", "propose", "trials_since_front_moved"]

logger = logging.getLogger(__name__)

#: Trials in a row that left the front unchanged before TPE takes a share (pool path only).
STALL_PATIENCE = 5
#: While stalled, every this-many-th proposal is TPE's.
STALL_EVERY = 2


class GuidedSampler(optuna.samplers.BaseSampler):
    """Expected hypervolume improvement over assignments (see the module docstring).

    Life cycle: Optuna calls :meth:`infer_relative_search_space` and :meth:`sample_relative`
    once per trial; the guide is read from the study each time (one user-attribute read), so
    the sampler holds no state but its random generator and can serve any study. Trials that
    other workers are running count as pending: never proposed again, and their predicted
    point joins the front the improvement is measured against (the "kriging believer").

    Args:
        seed: Seed of the random generator (ties, candidate pools, fallbacks).
        explore: Let TPE take a share of the proposals while the front is stalled (more
            units than are enumerated; see the module docstring).
    """

    def __init__(self, seed: int | None = None, *, explore: bool = True) -> None:
        self._seed = seed
        self._explore = explore
        self._rng = np.random.default_rng(seed)
        self._fallback = make_tpe(seed)
        self._random = optuna.samplers.RandomSampler(seed=seed)

    def reseed_rng(self) -> None:
        """New random state (Optuna calls this for each process of a parallel study)."""
        self._rng = np.random.default_rng()
        self._fallback.reseed_rng()
        self._random.reseed_rng()

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        """Every unit of the guide, as the search space declares it."""
        guide = load_guide(study)
        if guide is None:
            return dict(self._fallback.infer_relative_search_space(study, trial))
        return {
            u: CategoricalDistribution(tuple(CHOICES[c] for c in codes))
            for u, codes in zip(guide["units"], allowed_codes(guide), strict=True)
        }

    def sample_relative(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        search_space: dict[str, BaseDistribution],
    ) -> dict[str, Any]:
        """The candidate of largest expected improvement ({} leaves it to random sampling)."""
        if not search_space:
            return {}
        guide = load_guide(study)
        if guide is None:
            return dict(self._fallback.sample_relative(study, trial, search_space))
        trials = study.get_trials(deepcopy=False)
        if self._explore and len(guide["units"]) > ENUMERATE_MAX_UNITS:
            params = self._tpe_when_stalled(study, trial, guide["units"], trials)
            if params is not None:
                return params
        # One BLAS thread: the solves are small, and BLAS's own threads, competing with the
        # candidates' sessions for the cores, made a proposal 20x slower (0.3 s -> 5.7 s).
        with threadpool_limits(limits=1, user_api="blas"):
            row = propose(guide, trials, trial.number, self._rng)
        if row is None:
            return {}
        return {u: CHOICES[int(b)] for u, b in zip(guide["units"], row, strict=True)}

    def _tpe_when_stalled(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        units: list[str],
        trials: Sequence[FrozenTrial],
    ) -> dict[str, Any] | None:
        """TPE's proposal when this trial's turn in a stall is TPE's and it is new, else None."""
        stalled = trials_since_front_moved(trials)
        if stalled < STALL_PATIENCE or (stalled - STALL_PATIENCE) % STALL_EVERY:
            return None
        space = self._fallback.infer_relative_search_space(study, trial)
        params = self._fallback.sample_relative(study, trial, space)
        if not all(params.get(u) in CHOICES for u in units):
            return None  # TPE's start-up trials: no model yet
        key = [params[u] for u in units]
        if any(t.number != trial.number and [t.params.get(u) for u in units] == key
               for t in trials):  # fmt: skip
            return None
        logger.debug("guided: front stalled for %d trials, TPE proposes", stalled)
        return {u: params[u] for u in units}

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        """A parameter outside the relative proposal: at random (or TPE without a guide)."""
        if load_guide(study) is None:
            return self._fallback.sample_independent(study, trial, param_name, param_distribution)
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Lets the fallback see the trial start."""
        self._fallback.before_trial(study, trial)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Any,
    ) -> None:
        """Lets the fallback see the trial end."""
        self._fallback.after_trial(study, trial, state, values)


def propose(
    guide: dict[str, Any],
    trials: Sequence[FrozenTrial],
    number: int,
    rng: np.random.Generator,
) -> np.ndarray | None:
    """The next assignment (a row of codes over ``guide["units"]``: 1 FP16, 2 BF16), or None.

    Before two trials have a finite nonzero deviation the profile's proxy stands in for the
    process; None without one (and when every candidate is taken). The numerics are
    :func:`~amp_search.search._guided.proposal.next_row`'s.
    """
    return next_row(observe(guide["units"], trials, number), guide, rng)


def trials_since_front_moved(trials: Sequence[FrozenTrial]) -> int:
    """Completed trials since the last one that joined the front (all of them if none did).

    A trial joins when no earlier feasible trial with finite deviation is as fast and as
    accurate; failed, non-finite and infeasible trials never do.
    """
    done = sorted(
        (t for t in trials if t.state == TrialState.COMPLETE and t.values is not None
         and len(t.values) == 2),
        key=lambda t: t.number,
    )  # fmt: skip
    front: list[tuple[float, float]] = []
    since = 0
    for t in done:
        x, d = float(t.values[0]), float(t.values[1])
        feasible = all(c <= 0.0 for c in t.constraints.values())
        if feasible and math.isfinite(d):
            grown = [*front, (x, d)]
            keep = front_order([a for a, _ in grown], [b for _, b in grown])
            if len(front) in keep:  # not matched or beaten by an earlier point
                front, since = [grown[k] for k in keep], 0
                continue
        since += 1
    return since


def observe(units: list[str], trials: Sequence[FrozenTrial], number: int) -> Observations:
    """The trials (all but trial ``number``) as arrays over ``units`` (1 = FP16, 2 = BF16)."""
    n = len(units)
    index = {u: i for i, u in enumerate(units)}
    code = {c: k for k, c in enumerate(CHOICES)}

    def row_of(params: dict[str, Any]) -> np.ndarray | None:
        if not all(u in params for u in units):
            return None
        r = np.zeros(n, np.uint8)
        for u, v in params.items():
            if u in index:
                r[index[u]] = code.get(v, 0)
        return r

    done_rows, lat, dev, feasible, taken, pending = [], [], [], [], set(), []
    budget: float | None = None
    for t in trials:
        if t.number == number:
            continue
        r = row_of(t.params)
        if r is None:
            continue
        taken.add(row_key(r))
        if t.state == TrialState.COMPLETE and t.values is not None and len(t.values) == 2:
            done_rows.append(r)
            lat.append(float(t.values[0]))
            dev.append(float(t.values[1]))
            cons = t.constraints
            feasible.append(all(c <= 0.0 for c in cons.values()))
            if "max_deviation" in cons and math.isfinite(t.values[1]):
                budget = float(t.values[1]) - float(cons["max_deviation"])
        elif t.state in (TrialState.RUNNING, TrialState.WAITING):
            pending.append(r)
    return Observations(
        rows=np.array(done_rows, dtype=np.uint8).reshape(len(done_rows), n),
        latency=np.array(lat, dtype=np.float64),
        deviation=np.array(dev, dtype=np.float64),
        feasible=np.array(feasible, dtype=bool),
        taken=taken,
        pending=pending,
        budget=budget,
    )
