"""The guide: what the sampler knows about the assignments before any trial, kept in the study.

Built once, by the process that creates and seeds the study, from what the search already has:

- ``units`` and ``edges``: the free units (the parameters) and which unit feeds which;
- ``latency``: the coefficients of a
  :class:`~amp_search.search._guided.latency.LatencySurrogate` fitted on the latency
  estimator's prices of a few assignments (none, all, each unit alone, each fed pair of units;
  2 + units + edges estimates), or None without an estimator;
- ``unit_error``: each unit's own FP16 error from the profile's all-FP16 pass. The profile
  measures the error accumulated at a unit's outputs; a unit's own share is what it adds to
  the error of its inputs, ``sqrt(max(0, d_unit**2 - max(d_feeder)**2))``. None without that
  pass.

With BF16 among the precisions (``--precisions fp16,bf16``) the guide also has

- ``choices``: each unit's choices (:meth:`~amp_search.search.space.SearchSpace.choices`;
  absent: FP32 and FP16 for every unit, as every guide before BF16);
- ``unit_error_bf16``: each unit's own BF16 error, as ``unit_error`` from the profile's
  all-BF16 pass where it ran, else a proxy: :data:`BF16_ERROR_RATIO` times the unit's own FP16
  error (BF16 keeps 7 mantissa bits to FP16's 10: rounding errors 8 times as large), and
  where FP16 overflows (no finite FP16 error) that ratio times the median finite one (BF16 has
  FP32's range);
- a three-way latency model (:class:`~.latency.LatencySurrogate` with ``three_way``).

It is a study user attribute (:data:`GUIDE_ATTR`, plain JSON), so every worker that joins the
study and every resumed run samples with the same guide, and a study made before guides
existed simply has none (the guided sampler then falls back to TPE).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from amp_search.errors import AmpSearchError
from amp_search.keys import GUIDE_ATTR
from amp_search.search._guided.candidates import is_ternary
from amp_search.search._guided.latency import LatencySurrogate
from amp_search.search.space import CHOICES

if TYPE_CHECKING:
    import optuna

    from amp_search.profiling.sensitivity import UnitRisk
    from amp_search.search.space import SearchSpace
    from amp_search.types import PrecisionAssignment

__all__ = [
    "BF16_ERROR_RATIO",
    "GUIDE_VERSION",
    "allowed_codes",
    "build_guide",
    "load_guide",
    "own_errors",
]

logger = logging.getLogger(__name__)

GUIDE_VERSION = 1
#: Most estimator calls spent on the latency model (2 + units + edges are needed).
MAX_ESTIMATES = 1000
#: A unit whose FP16 output is non-finite gets this own error (relative L2 of a broken unit).
NONFINITE_ERROR = 1.0
#: A unit's own BF16 error over its own FP16 error, without a BF16 pass (2**(10 - 7)).
BF16_ERROR_RATIO = 8.0
#: The two choices of every unit of a guide without ``choices``.
_DEFAULT_CHOICES = ("fp32", "fp16")


def own_errors(
    risks: Sequence[UnitRisk], units: Sequence[str], attr: str = "deviation"
) -> list[float] | None:
    """Each unit's own FP16 error (see the module docstring), or None without deviations.

    ``attr``: the risk's deviation to read (``"bf16_deviation"``: the all-BF16 pass's).
    """
    measured = {r.unit.name: getattr(r, attr, None) for r in risks}
    measured = {k: v for k, v in measured.items() if v is not None}
    if not measured:
        return None

    def acc(name: str) -> float:
        d = measured.get(name)
        if d is None or not d.numel:
            return 0.0
        if d.nonfinite or not math.isfinite(d.rel_l2):
            return math.inf
        return float(d.rel_l2)

    feeders = {r.unit.name: r.unit.feeders for r in risks}
    out = []
    for u in units:
        mine = acc(u)
        inherited = max((acc(f) for f in feeders.get(u, ())), default=0.0)
        if math.isinf(mine):
            out.append(0.0 if math.isinf(inherited) else NONFINITE_ERROR)
        else:
            out.append(math.sqrt(max(0.0, mine * mine - min(inherited, mine) ** 2)))
    return out


def build_guide(
    space: SearchSpace,
    risks: Sequence[UnitRisk],
    estimate: Callable[[PrecisionAssignment], float] | None = None,
) -> dict[str, Any]:
    """The guide of a search (see the module docstring).

    Args:
        space: The search space (its free units are the guide's units, in order).
        risks: The profile's unit risks (units with their feeders, measured FP16 deviation).
        estimate: Latency in ms of an assignment (the roofline estimator), or None.
    """
    units = list(space.free)
    index = {u: i for i, u in enumerate(units)}
    edges = sorted(
        {
            (index[f], index[r.unit.name])
            for r in risks
            if r.unit.name in index
            for f in r.unit.feeders
            if f in index and f != r.unit.name
        }
    )
    guide: dict[str, Any] = {
        "version": GUIDE_VERSION,
        "units": units,
        "edges": [list(e) for e in edges],
        "unit_error": own_errors(risks, units),
        "latency": None,
    }
    choices = [list(space.choices(u)) for u in units]
    if any(tuple(c) != _DEFAULT_CHOICES for c in choices):
        guide["choices"] = choices
    if space.three_way:
        guide["unit_error_bf16"] = _bf16_errors(risks, units, guide["unit_error"])
    if estimate is not None and units:
        guide["latency"] = _latency_model(space, units, edges, estimate, allowed_codes(guide))
    return guide


def allowed_codes(guide: dict[str, Any]) -> list[tuple[int, ...]]:
    """Each unit's codes (indices in :data:`~amp_search.search.space.CHOICES`)."""
    choices = guide.get("choices") or [_DEFAULT_CHOICES] * len(guide["units"])
    return [tuple(CHOICES.index(c) for c in unit) for unit in choices]


def _bf16_errors(
    risks: Sequence[UnitRisk], units: list[str], fp16: list[float] | None
) -> list[float] | None:
    """Each unit's own BF16 error: measured where the all-BF16 pass ran, else the proxy."""
    measured = own_errors(risks, units, "bf16_deviation")
    if measured is not None:
        return measured
    if fp16 is None:
        return None
    overflow = {
        r.unit.name for r in risks
        if r.deviation is not None and (r.deviation.nonfinite or not math.isfinite(
            r.deviation.rel_l2))
    }  # fmt: skip
    finite = [e for u, e in zip(units, fp16, strict=True) if u not in overflow]
    typical = float(np.median(finite)) if finite else 0.0
    return [BF16_ERROR_RATIO * (typical if u in overflow else e)
            for u, e in zip(units, fp16, strict=True)]  # fmt: skip


def _latency_model(
    space: SearchSpace,
    units: list[str],
    edges: list[tuple[int, int]],
    estimate: Callable[[PrecisionAssignment], float],
    allowed: list[tuple[int, ...]],
) -> dict[str, Any] | None:
    """The latency model's coefficients from the estimator's prices of its design rows."""
    t0 = time.perf_counter()
    three_way = is_ternary(allowed)
    model = LatencySurrogate(len(units), edges, three_way=three_way)
    rows = model.design(allowed if three_way else None)
    if len(rows) > MAX_ESTIMATES:
        logger.info("Guide: no latency model (%d estimates needed, limit %d)", len(rows),
                    MAX_ESTIMATES)  # fmt: skip
        return None
    try:
        prices = np.array(
            [
                estimate(
                    space.assignment({u: CHOICES[int(c)] for u, c in zip(units, r, strict=True)})
                )
                for r in rows
            ]
        )
    except (ValueError, AmpSearchError) as exc:
        logger.warning("Guide: no latency model, the estimator failed: %s", exc)
        return None
    residual = float(np.max(np.abs(model.fit(rows, prices).predict(rows) - prices)))
    logger.info(
        "Guide: latency model from %d estimates in %.1f s (max fit error %.2g ms)",
        len(rows), time.perf_counter() - t0, residual,
    )  # fmt: skip
    return {
        "coef": [float(c) for c in model.coefficients],
        "estimates": len(rows),
        "max_fit_error_ms": residual,
    }


def load_guide(study: optuna.Study) -> dict[str, Any] | None:
    """The study's guide, or None (no guide, or one of another version)."""
    guide = study.user_attrs.get(GUIDE_ATTR)
    if not isinstance(guide, dict) or guide.get("version") != GUIDE_VERSION:
        return None
    return guide
