"""The one Pareto filter and hypervolume, by hand; and the front of real trials through it."""

from __future__ import annotations

import math

import pytest

from amp_search.results.pareto import FrontPoint, front_order, hypervolume, nondominated_points


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
