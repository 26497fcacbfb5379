"""Built-in accuracy objectives: how far a candidate's outputs are from the FP32 reference.

Every objective here is minimized, needs ``{"outputs"}``, and aggregates over all
calibration batches: for each model output, the batches are flattened and concatenated (rows
are stacked, for ``top1``), the metric is computed on that whole output, and a multi-output
model scores the worst (largest) of its outputs. Arithmetic is float64.

A candidate with any NaN or Inf among its outputs scores ``float("inf")``, so the search
treats it as infeasible and never as the best; so does a metric value that comes out
non-finite (a reference with NaN/Inf, for instance).

Only numpy is imported here (``objectives`` stays light).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np

if TYPE_CHECKING:
    from amp_search.objective import EvalContext

__all__ = [
    "CosineDistance",
    "MaxAbs",
    "MeanAbs",
    "OutputDeviation",
    "RelativeL2",
    "Top1Disagreement",
]


class OutputDeviation:
    """Base of the output-comparing objectives (subclasses implement :meth:`compare`).

    Class attributes:
        name: Objective name.
        direction: Always ``"minimize"``.
        needs: Always ``{"outputs"}``.
    """

    name: str = ""
    direction: Literal["minimize", "maximize"] = "minimize"
    needs: frozenset[str] = frozenset({"outputs"})

    def evaluate(self, ctx: EvalContext) -> float:
        """The worst, over model outputs, of the metric over all batches.

        Raises:
            ValueError: The candidate and the reference disagree in batches, outputs or shapes.
        """
        if len(ctx.outputs) != len(ctx.reference):
            raise ValueError(
                f"{self.name}: {len(ctx.outputs)} candidate batches for "
                f"{len(ctx.reference)} reference batches."
            )
        if not ctx.reference:
            raise ValueError(f"{self.name}: no calibration batches to compare.")
        names = ctx.names()
        if not names:
            raise ValueError(f"{self.name}: no outputs to compare.")
        worst = 0.0
        for name in names:
            refs: list[np.ndarray] = []
            outs: list[np.ndarray] = []
            for b, (ref_batch, out_batch) in enumerate(
                zip(ctx.reference, ctx.outputs, strict=True)
            ):
                if name not in out_batch:
                    raise ValueError(f"{self.name}: batch {b} of the candidate lacks {name!r}.")
                ref = np.asarray(ref_batch[name])
                out = np.asarray(out_batch[name])
                if ref.shape != out.shape:
                    raise ValueError(
                        f"{self.name}: output {name!r} of batch {b} has shape {out.shape}, "
                        f"the reference {ref.shape}."
                    )
                if not np.all(np.isfinite(out)):
                    return math.inf
                refs.append(ref)
                outs.append(out)
            value = self.compare(_stack(refs, self._rows), _stack(outs, self._rows))
            if not math.isfinite(value):
                return math.inf
            worst = max(worst, value)
        return worst

    #: Whether :meth:`compare` gets 2-D ``[rows, last axis]`` arrays instead of flat ones.
    _rows: ClassVar[bool] = False

    def compare(self, reference: np.ndarray, output: np.ndarray) -> float:
        """The metric on one output over all batches (float64 arrays, same shape)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _stack(arrays: list[np.ndarray], rows: bool) -> np.ndarray:
    parts: list[np.ndarray]
    if rows:
        parts = [a.reshape(-1, a.shape[-1] if a.ndim else 1) for a in arrays]
    else:
        parts = [a.reshape(-1) for a in arrays]
    return np.concatenate(parts).astype(np.float64, copy=False)


class RelativeL2(OutputDeviation):
    """Relative L2 error ``||y - ref|| / ||ref||`` (the default accuracy objective).

    When the reference is all zeros, the absolute ``||y - ref||`` is returned instead.
    """

    name: str = "rel_l2"

    def compare(self, reference: np.ndarray, output: np.ndarray) -> float:  # noqa: D102
        diff = float(np.linalg.norm(output - reference))
        denom = float(np.linalg.norm(reference))
        return diff / denom if denom > 0.0 else diff


class MaxAbs(OutputDeviation):
    """Largest absolute difference ``max |y - ref|``."""

    name: str = "max_abs"

    def compare(self, reference: np.ndarray, output: np.ndarray) -> float:  # noqa: D102
        return float(np.max(np.abs(output - reference))) if output.size else 0.0


class MeanAbs(OutputDeviation):
    """Mean absolute difference ``mean |y - ref|``."""

    name: str = "mean_abs"

    def compare(self, reference: np.ndarray, output: np.ndarray) -> float:  # noqa: D102
        return float(np.mean(np.abs(output - reference))) if output.size else 0.0


class CosineDistance(OutputDeviation):
    """Cosine distance ``1 - cos(y, ref)`` of the flattened outputs, in ``[0, 2]``.

    Two all-zero arrays are at distance 0; an all-zero array and a nonzero one at distance 1.
    """

    name: str = "cosine"

    def compare(self, reference: np.ndarray, output: np.ndarray) -> float:  # noqa: D102
        n_ref = float(np.linalg.norm(reference))
        n_out = float(np.linalg.norm(output))
        if n_ref == 0.0 and n_out == 0.0:
            return 0.0
        if n_ref == 0.0 or n_out == 0.0:
            return 1.0
        cos = float(np.dot(reference, output)) / (n_ref * n_out)
        return float(min(2.0, max(0.0, 1.0 - cos)))


class Top1Disagreement(OutputDeviation):
    """Fraction of rows whose argmax over the last axis differs from the reference's.

    Meant for classifiers (``[batch, classes]`` logits or probabilities); every leading axis
    counts as rows, so ``[batch, tokens, vocab]`` compares per token.
    """

    name: str = "top1"
    _rows: ClassVar[bool] = True

    def compare(self, reference: np.ndarray, output: np.ndarray) -> float:  # noqa: D102
        if reference.shape[0] == 0:
            return 0.0
        differ = np.argmax(reference, axis=-1) != np.argmax(output, axis=-1)
        return float(np.mean(differ))
