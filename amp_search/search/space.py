"""The search space: one categorical parameter per searchable unit, named by the unit.

Units whose weights overflow FP16 are locked FP32 and are not parameters. The parameter
name is the unit's stable name, so a study resumes across runs and compares across them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from amp_search.types import Precision, PrecisionAssignment

if TYPE_CHECKING:
    import optuna

__all__ = ["CHOICES", "SearchSpace"]

#: Order matters for Optuna's categorical distribution; keep it fixed forever.
CHOICES = ("fp32", "fp16")


class SearchSpace:
    """Maps Optuna trials to precision assignments and back.

    Args:
        units: Names of every unit, in graph order.
        locked: Units that must stay FP32 (not parameters).
    """

    def __init__(self, units: Iterable[str], locked: Iterable[str] = ()) -> None:
        self.units = list(units)
        locked_set = set(locked)
        self.locked = [u for u in self.units if u in locked_set]
        self.free = [u for u in self.units if u not in locked_set]

    def suggest(self, trial: optuna.Trial) -> PrecisionAssignment:
        """Suggests one precision per free unit."""
        chosen = {u: trial.suggest_categorical(u, CHOICES) for u in self.free}
        return self.assignment(chosen)

    def proposed(self, trial: optuna.Trial) -> PrecisionAssignment | None:
        """The sampler's proposal for every free unit, before any parameter is written.

        That is ``trial.relative_params``; None when the sampler left some unit to later
        sampling. For a trial enqueued with fixed parameters those win over the proposal:
        callers use this only as a guess and check it against :meth:`suggest`.
        """
        proposal = trial.relative_params
        if not all(proposal.get(u) in CHOICES for u in self.free):
            return None
        return self.assignment({u: proposal[u] for u in self.free})

    def assignment(self, params: dict[str, str]) -> PrecisionAssignment:
        """The assignment of a parameter dict (locked and missing units FP32)."""
        return PrecisionAssignment.from_mapping(
            {u: Precision(params.get(u, "fp32")) if u in self.free else Precision.FP32
             for u in self.units}
        )  # fmt: skip

    def params(self, fp16: Iterable[str]) -> dict[str, str]:
        """Parameters that put ``fp16`` units in FP16 and the rest FP32."""
        fp16_set = set(fp16)
        return {u: "fp16" if u in fp16_set else "fp32" for u in self.free}
