"""The search space: one categorical parameter per searchable unit, named by the unit.

Each unit chooses among FP32 and the low precisions the search was asked for
(``--precisions``: FP16 by default, BF16, or both) that the unit admits: a unit whose weights
overflow FP16 cannot take FP16 (BF16 has FP32's range), and one whose ops the model's opset
does not type ``bfloat16`` cannot take BF16 (the rewriter would keep it FP32: no choice at
all). A unit left with FP32 alone is locked: not a parameter. The parameter name is the unit's
stable name, so a study resumes across runs and compares across them; its choices are
:data:`CHOICES` in that order, less what the unit does not admit (FP32/FP16 searches have the
distributions they always had).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from amp_search.types import Precision, PrecisionAssignment

if TYPE_CHECKING:
    import optuna

__all__ = ["CHOICES", "SearchSpace"]

#: Every choice, in the order of Optuna's categorical distributions; keep it fixed forever.
CHOICES = ("fp32", "fp16", "bf16")


class SearchSpace:
    """Maps Optuna trials to precision assignments and back.

    Args:
        units: Names of every unit, in graph order.
        locked: Units that must stay FP32 whatever the precisions (not parameters).
        precisions: The low precisions units may take (default FP16 alone).
        no_fp16: Units that cannot take FP16 (a weight overflows it).
        bf16_units: Units that can take BF16 (the opset types their ops ``bfloat16``);
            None: every unit.
    """

    def __init__(
        self,
        units: Iterable[str],
        locked: Iterable[str] = (),
        *,
        precisions: Iterable[Precision] = (Precision.FP16,),
        no_fp16: Iterable[str] = (),
        bf16_units: Iterable[str] | None = None,
    ) -> None:
        self.units = list(units)
        self.precisions = tuple(Precision(p) for p in precisions)
        hard, no16 = set(locked), set(no_fp16)
        bf16_ok = None if bf16_units is None else set(bf16_units)
        self._choices: dict[str, tuple[str, ...]] = {}
        for u in self.units:
            allowed = {"fp32"}
            if u not in hard:
                if Precision.FP16 in self.precisions and u not in no16:
                    allowed.add("fp16")
                if Precision.BF16 in self.precisions and (bf16_ok is None or u in bf16_ok):
                    allowed.add("bf16")
            self._choices[u] = tuple(c for c in CHOICES if c in allowed)
        self.locked = [u for u in self.units if len(self._choices[u]) == 1]
        self.free = [u for u in self.units if len(self._choices[u]) > 1]

    @property
    def three_way(self) -> bool:
        """Whether BF16 is among the choices of some unit."""
        return any("bf16" in self._choices[u] for u in self.free)

    def choices(self, unit: str) -> tuple[str, ...]:
        """The precisions ``unit`` may take (FP32 first; ``("fp32",)`` when locked)."""
        return self._choices[unit]

    def suggest(self, trial: optuna.Trial) -> PrecisionAssignment:
        """Suggests one precision per free unit."""
        chosen = {u: trial.suggest_categorical(u, self._choices[u]) for u in self.free}
        return self.assignment(chosen)

    def proposed(self, trial: optuna.Trial) -> PrecisionAssignment | None:
        """The sampler's proposal for every free unit, before any parameter is written.

        That is ``trial.relative_params``; None when the sampler left some unit to later
        sampling. For a trial enqueued with fixed parameters those win over the proposal:
        callers use this only as a guess and check it against :meth:`suggest`.
        """
        proposal = trial.relative_params
        if not all(proposal.get(u) in self._choices[u] for u in self.free):
            return None
        return self.assignment({u: proposal[u] for u in self.free})

    def assignment(self, params: Mapping[str, str]) -> PrecisionAssignment:
        """The assignment of a parameter dict (locked and missing units FP32)."""
        free = set(self.free)
        return PrecisionAssignment.from_mapping(
            {u: Precision(params.get(u, "fp32")) if u in free else Precision.FP32
             for u in self.units}
        )  # fmt: skip

    def params(self, fp16: Iterable[str], bf16: Iterable[str] = ()) -> dict[str, str]:
        """Parameters with ``bf16`` units BF16, ``fp16`` units FP16, the rest FP32.

        A unit named where it does not admit that precision stays FP32 (``bf16`` wins where a
        unit is in both).
        """
        fp16_set, bf16_set = set(fp16), set(bf16)

        def pick(u: str) -> str:
            if u in bf16_set and "bf16" in self._choices[u]:
                return "bf16"
            if u in fp16_set and "fp16" in self._choices[u]:
                return "fp16"
            return "fp32"

        return {u: pick(u) for u in self.free}
