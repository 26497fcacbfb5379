"""Seed trials and the study's guide, set once before sampling.

Seeds: all FP32 and all FP16, the two ends of every front, then the risk ladder, which keeps
the k riskiest units FP32 (k = 1, 2, 4, ...) in the order of the FP16 risk report, as people
fix models by hand. With the guided sampler (the default) only the ladder's first rung is
kept: its Gaussian process needs two finite, nonzero deviations to start from, and on the
PP-OCR classifier the deeper rungs were dominated evaluations taken from the budget.

The guide (:mod:`amp_search.search.guide`) is what the guided sampler knows before any trial;
it is stored in the study with the seeds. Both are set once per study (a study user attribute
records it), so several workers never enqueue them twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from amp_search.search.guide import GUIDE_ATTR, build_guide
from amp_search.search.space import SearchSpace

if TYPE_CHECKING:
    import optuna

    from amp_search.profiling.sensitivity import UnitRisk
    from amp_search.types import PrecisionAssignment

__all__ = ["SEEDED_ATTR", "enqueue_seeds", "seed_params"]

logger = logging.getLogger(__name__)

SEEDED_ATTR = "amp_search:seeded"


def seed_params(
    space: SearchSpace, risk_order: list[str], *, ladder: int | None = None
) -> list[tuple[str, dict[str, str]]]:
    """(label, params) of every seed, without duplicates.

    Args:
        space: The search space.
        risk_order: Unit names, riskiest first.
        ladder: How many rungs of the risk ladder (k = 1, 2, 4, ...); None: every rung.
    """
    free = space.free
    ordered = [u for u in risk_order if u in set(free)]
    seeds: list[tuple[str, dict[str, str]]] = [
        ("all-fp32", space.params([])),
        ("all-fp16", space.params(free)),
    ]
    k = 1
    while k < len(free) and (ladder is None or k < 1 << ladder):
        keep = set(ordered[:k])
        seeds.append((f"ladder-{k}", space.params([u for u in free if u not in keep])))
        k *= 2
    out: list[tuple[str, dict[str, str]]] = []
    seen: set[tuple[tuple[str, str], ...]] = set()
    for label, params in seeds:
        key = tuple(sorted(params.items()))
        if key not in seen:
            seen.add(key)
            out.append((label, params))
    return out


def enqueue_seeds(
    study: optuna.Study,
    space: SearchSpace,
    risk_order: list[str],
    *,
    risks: Sequence[UnitRisk] | None = None,
    estimate: Callable[[PrecisionAssignment], float] | None = None,
) -> int:
    """Enqueues the seeds (and stores the guide) unless this study has them; returns how many.

    Args:
        study: The study.
        space: The search space.
        risk_order: Unit names, riskiest first.
        risks: The profile's unit risks; with them a study sampled by the guided sampler gets
            its guide and the shorter ladder.
        estimate: Latency in ms of an assignment (the roofline estimator) for the guide's
            latency model; None when latency is measured.
    """
    if study.user_attrs.get(SEEDED_ATTR):
        return 0
    from amp_search.search.guided import GuidedSampler

    guided = isinstance(study.sampler, GuidedSampler)
    if guided and risks is not None:
        study.set_user_attr(GUIDE_ATTR, build_guide(space, risks, estimate))
    seeds = seed_params(space, risk_order, ladder=1 if guided and risks is not None else None)
    for label, params in seeds:
        study.enqueue_trial(params, user_attrs={"seed": label}, skip_if_exists=True)
    study.set_user_attr(SEEDED_ATTR, True)
    return len(seeds)
