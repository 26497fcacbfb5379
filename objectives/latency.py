"""The built-in latency objective: the candidate's median latency in milliseconds.

The figure is whatever the evaluation measured or estimated (``LatencyStats.source`` says
which: ``measured:...`` or ``estimated:<gpu>``); this objective only reads it. Only the
standard library is imported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from amp_search.objective import EvalContext

__all__ = ["LatencyObjective"]


class LatencyObjective:
    """Median latency of the candidate (``ctx.latency.median_ms``), minimized."""

    name: str = "latency_ms"
    direction: Literal["minimize", "maximize"] = "minimize"
    needs: frozenset[str] = frozenset({"latency"})

    def evaluate(self, ctx: EvalContext) -> float:
        """The median latency in milliseconds.

        Raises:
            ValueError: The candidate was not timed (``ctx.latency`` is None).
        """
        if ctx.latency is None:
            raise ValueError(
                "latency_ms needs a timed candidate, but the evaluation context carries no "
                "latency; time the candidate (or estimate it) before evaluating."
            )
        return float(ctx.latency.median_ms)

    def __repr__(self) -> str:
        return "LatencyObjective()"
