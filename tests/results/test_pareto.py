"""Front points as people read them."""

from __future__ import annotations

import pytest

from amp_search.errors import UserInputError
from amp_search.results.pareto import FrontPoint, check_max_deviation


def _point(fp32: list[str], n_units: int) -> FrontPoint:
    return FrontPoint(trial=0, digest="d", latency_ms=1.0, latency_source="estimated:h100",
                      deviation=0.0, metric="rel_l2", n_fp32=len(fp32), n_units=n_units,
                      fp32_units=fp32)  # fmt: skip


def test_fallback_text_is_short_with_a_count():
    names = [f"block{i}/Conv" for i in range(86)]
    assert _point(names, 86).fallback_text() == "all 86 units (all FP32)"
    assert _point([], 86).fallback_text() == "none (all FP16)"
    assert _point(names[:10], 86).fallback_text(8) == ", ".join(names[:8]) + " +2 more"
    assert _point(names[:3], 86).fallback_text(8) == ", ".join(names[:3])


@pytest.mark.parametrize("budget", [-1.0, 0.0, float("nan")])
def test_a_budget_must_be_positive(budget):
    with pytest.raises(UserInputError, match="--max-deviation must be positive"):
        check_max_deviation(budget)
    check_max_deviation(None)
    check_max_deviation(1e-30)
