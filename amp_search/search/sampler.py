"""The sampler that proposes assignments (``--sampler``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from amp_search.errors import UserInputError

if TYPE_CHECKING:
    import optuna

__all__ = ["SAMPLERS", "make_sampler"]

SAMPLERS = ("tpe", "nsga2", "random")


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    """The Optuna sampler called ``name`` (one of :data:`SAMPLERS`)."""
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise UserInputError(f"Unknown sampler {name!r}; use {', '.join(SAMPLERS)}.")
