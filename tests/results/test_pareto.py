"""The one Pareto filter and hypervolume, by hand; front points as people read them."""

from __future__ import annotations

import math

import pytest

from amp_search.errors import UserInputError
from amp_search.results.pareto import (
    FrontPoint,
    check_max_deviation,
    front_order,
    hypervolume,
    nondominated_points,
)


def test_front_order_by_hand():
    # (latency, deviation): 1 and 3 are beaten by 0; 4 repeats 2 (the first is kept).
    x = [1.0, 2.0, 0.5, 3.0, 0.5, 0.2]
    y = [0.1, 0.2, 0.3, 0.05, 0.3, math.inf]
    assert front_order(x, y) == [2, 0, 3]
    assert front_order([], []) == []


def test_hypervolume_by_hand():
    # Two staircase steps against (4, 1): (1, 0.5) covers 3 x 0.5, (2, 0.25) adds 2 x 0.25.
    assert hypervolume([(1.0, 0.5), (2.0, 0.25), (3.0, 0.75)], (4.0, 1.0)) == pytest.approx(2.0)
    assert hypervolume([(5.0, 0.1)], (4.0, 1.0)) == 0.0  # beyond the reference: nothing


def test_nondominated_points_keeps_the_earlier_trial_of_equal_points():
    def point(trial, lat, dev):
        return FrontPoint(trial=trial, digest=f"d{trial}", latency_ms=lat, latency_source="t",
                          deviation=dev, metric="rel_l2", n_fp32=0, n_units=1)  # fmt: skip

    pts = [point(3, 1.0, 0.1), point(1, 1.0, 0.1), point(2, 2.0, 0.01), point(4, 3.0, 0.5)]
    assert [p.trial for p in nondominated_points(pts)] == [1, 2]


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
