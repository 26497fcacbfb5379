"""Seed trials, enqueued once before sampling: all FP32, all FP16, and the risk ladder.

The ladder keeps the k riskiest units FP32 (k = 1, 2, 4, ...), in the order of the FP16
risk report, which is how people fix models by hand. Seeds are enqueued once per study (a
study user attribute records it), so several workers never enqueue them twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from amp_search.search.space import SearchSpace

if TYPE_CHECKING:
    import optuna

__all__ = ["SEEDED_ATTR", "enqueue_seeds", "seed_params"]

SEEDED_ATTR = "amp_search:seeded"


def seed_params(space: SearchSpace, risk_order: list[str]) -> list[tuple[str, dict[str, str]]]:
    """(label, params) of every seed, without duplicates."""
    free = space.free
    ordered = [u for u in risk_order if u in set(free)]
    seeds: list[tuple[str, dict[str, str]]] = [
        ("all-fp32", space.params([])),
        ("all-fp16", space.params(free)),
    ]
    k = 1
    while k < len(free):
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


def enqueue_seeds(study: optuna.Study, space: SearchSpace, risk_order: list[str]) -> int:
    """Enqueues the seeds unless this study already got them; returns how many."""
    if study.user_attrs.get(SEEDED_ATTR):
        return 0
    seeds = seed_params(space, risk_order)
    for label, params in seeds:
        study.enqueue_trial(params, user_attrs={"seed": label}, skip_if_exists=True)
    study.set_user_attr(SEEDED_ATTR, True)
    return len(seeds)
