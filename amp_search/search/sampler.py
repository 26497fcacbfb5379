"""The sampler that proposes assignments (``--sampler``).

``guided`` (the default, :class:`amp_search.search.guided.GuidedSampler`) is model-based: after
the seed trials it proposes, one at a time, the assignment of largest expected hypervolume
improvement, with latency from the study's guide (a model fitted on the roofline estimator)
and deviation from a Gaussian process over the assignments whose mean follows the profile's
per-unit FP16 errors. ``tpe``, ``nsga2`` and ``random`` are Optuna's samplers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from amp_search.errors import UserInputError

if TYPE_CHECKING:
    import optuna

__all__ = ["DEFAULT_SAMPLER", "SAMPLERS", "make_sampler", "make_tpe"]

SAMPLERS = ("guided", "tpe", "nsga2", "random")
DEFAULT_SAMPLER = "guided"


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    """The Optuna sampler called ``name`` (one of :data:`SAMPLERS`)."""
    import optuna

    if name == "guided":
        from amp_search.search.guided import GuidedSampler

        return GuidedSampler(seed=seed)
    if name == "tpe":
        return make_tpe(seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise UserInputError(f"Unknown sampler {name!r}; use {', '.join(SAMPLERS)}.")


def make_tpe(seed: int | None) -> optuna.samplers.TPESampler:
    """TPE as ``--sampler tpe`` uses it (and the guided sampler without a guide)."""
    import optuna

    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10)
