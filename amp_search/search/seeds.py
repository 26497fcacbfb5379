"""Seed trials and the study's guide, set once before sampling.

Seeds are all FP32 and all FP16, the two ends of every front, then either

- the risk ladder (other samplers): the k riskiest units kept FP32 (k = 1, 2, 4, ...) in the
  order of the FP16 risk report, as people fix models by hand; or
- the prefix sweep (the guided sampler): the first k units in graph order kept FP32 (k = 1,
  2, 3, 5, 8), each a single block (one pair of Casts) so it costs little latency. Error that
  FP16 adds early is carried and amplified by everything after it; on the PP-OCR models the
  most accurate fast assignments keep the first units FP32, while the ladder (ordered by the
  error accumulated at a unit, which grows with depth) keeps the last ones. The sweep also
  gives the Gaussian process points across the whole latency range before it proposes.

With the sweep, units the report marks critical (inf/NaN or overflow in FP16) stay FP32 in
every seed but all-FP16, and an extra "all-fp16-safe" seed is all FP16 but them.

With BF16 among the precisions, two more follow all-FP16: "all-bf16" (every unit that admits
BF16 in BF16, the rest FP32) and "fp16-bf16-rescue" (all FP16, with every unit FP16 breaks, the
critical ones and those whose weights overflow FP16, in BF16 instead of FP32).

The guide (:mod:`amp_search.search._guided.guide`) is what the guided sampler knows before
any trial; it is stored in the study with the seeds. Both are set once per study (a study user
attribute records it), so several workers never enqueue them twice.

Seeds count toward ``--n-trials``: a study seeded under a target of n holds the first n seeds
in the order above (``--n-trials 3``: all-FP32, all-FP16 and the next one), and a later run
with a larger target enqueues the rest, up to it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from amp_search.keys import (
    ALL_BF16,
    ALL_FP16,
    ALL_FP32,
    BF16_RESCUE,
    GUIDE_ATTR,
    SEED_ATTR,
    SEED_PARAMS_ATTR,
    SEEDED_ATTR,
)
from amp_search.search._guided.guide import build_guide
from amp_search.search.space import SearchSpace

if TYPE_CHECKING:
    import optuna

    from amp_search.profiling.sensitivity import UnitRisk
    from amp_search.types import PrecisionAssignment

__all__ = ["PREFIXES", "enqueue_seeds", "seed_params"]

logger = logging.getLogger(__name__)

#: The prefix sweep of the guided sampler (k first units kept FP32).
PREFIXES = (1, 2, 3, 5, 8)


def seed_params(
    space: SearchSpace,
    risk_order: list[str],
    *,
    prefixes: Sequence[int] | None = None,
    critical: Iterable[str] = (),
    breaks: Iterable[str] | None = None,
) -> list[tuple[str, dict[str, str]]]:
    """(label, params) of every seed, without duplicates.

    Args:
        space: The search space.
        risk_order: Unit names, riskiest first.
        prefixes: Seed the prefix sweep with these k instead of the risk ladder.
        critical: Units kept FP32 in every seed but all-FP16.
        breaks: Units FP16 breaks, BF16 in the rescue seed (None: ``critical``).
    """
    free = space.free
    keep = {u for u in critical if u in set(free)}
    ordered = [u for u in risk_order if u in set(free)]
    seeds: list[tuple[str, dict[str, str]]] = [
        (ALL_FP32, space.params([])),
        (ALL_FP16, space.params(free)),
    ]
    if space.three_way:
        no_fp16 = {u for u in free if "fp16" not in space.choices(u)}
        rescue = no_fp16 | {u for u in (keep if breaks is None else breaks) if u in set(free)}
        seeds.append((ALL_BF16, space.params([], bf16=free)))
        if rescue:
            seeds.append((BF16_RESCUE, space.params(free, bf16=rescue)))
    if keep:
        seeds.append(("all-fp16-safe", space.params([u for u in free if u not in keep])))
    if prefixes is not None:
        for k in prefixes:
            if 0 < k < len(free):
                fp16 = [u for u in free[k:] if u not in keep]
                seeds.append((f"prefix-{k}", space.params(fp16)))
    else:
        k = 1
        while k < len(free):
            top = set(ordered[:k]) | keep
            seeds.append((f"ladder-{k}", space.params([u for u in free if u not in top])))
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
    limit: int | None = None,
    resume: bool = False,
) -> int:
    """Enqueues the seeds (and stores the guide) unless this study has them; returns how many.

    Args:
        study: The study.
        space: The search space.
        risk_order: Unit names, riskiest first.
        risks: The profile's unit risks: their critical units stay FP32 in the seeds, and a
            study sampled by the guided sampler gets its guide and the prefix sweep.
        estimate: Latency in ms of an assignment (the roofline estimator) for the guide's
            latency model; None when latency is measured.
        limit: The study's trial target: at most this many seeds in the study, the first
            ones (None: all).
        resume: The study was made by another run: only complete a seeding that an earlier
            ``limit`` cut short (a study nobody seeded is its creator's to seed).
    """
    seeded = study.user_attrs.get(SEEDED_ATTR)
    if seeded is True or (resume and not isinstance(seeded, int)):
        return 0
    from amp_search.profiling.sensitivity import RiskLevel
    from amp_search.search.guided import GuidedSampler

    done = int(seeded or 0)
    critical = [r.unit.name for r in risks or () if r.level >= RiskLevel.CRITICAL]
    if risks is not None and isinstance(study.sampler, GuidedSampler):
        if not done:  # the guide comes with the first seeds
            study.set_user_attr(GUIDE_ATTR, build_guide(space, risks, estimate))
        seeds = seed_params(space, risk_order, prefixes=PREFIXES, critical=critical)
    else:
        seeds = seed_params(space, risk_order, breaks=critical)
    end = len(seeds) if limit is None else min(len(seeds), limit)
    if end <= done:
        return 0
    for label, params in seeds[done:end]:
        # The parameters in a user attribute too: the trial's own (fixed) ones are private to
        # Optuna until suggested, and the search starts evaluating before that.
        attrs = {SEED_ATTR: label, SEED_PARAMS_ATTR: params}
        study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=True)
    study.set_user_attr(SEEDED_ATTR, True if end == len(seeds) else end)
    return end - done
