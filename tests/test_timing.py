"""The timing module: warm-up, counts, statistics."""

from __future__ import annotations

import time

import pytest

from amp_search.timing import measure, summarize


def test_measure_runs_warmup_then_timed_runs():
    calls = []
    stats = measure(lambda: calls.append(1), source="measured:test", warmup=3, runs=7)
    assert len(calls) == 10
    assert stats.n_runs == 7 and stats.n_warmup == 3 and stats.source == "measured:test"


def test_measure_reflects_real_duration():
    stats = measure(lambda: time.sleep(0.002), source="t", warmup=1, runs=5)
    assert 2.0 <= stats.median_ms < 50
    assert stats.min_ms <= stats.median_ms <= stats.p90_ms


def test_max_time_stops_early_after_three_runs():
    stats = measure(lambda: time.sleep(0.01), source="t", warmup=0, runs=100, max_time_s=0.001)
    assert stats.n_runs == 3


def test_custom_timer_and_summary():
    stats = measure(lambda: None, source="t", warmup=0, runs=4, timer=lambda step: 2.5)
    assert stats.median_ms == 2.5 and stats.samples_ms == (2.5,) * 4
    s = summarize([1.0, 2.0, 3.0, 4.0, 100.0], source="t")
    assert s.median_ms == 3.0 and s.min_ms == 1.0 and s.p90_ms > 4.0
    with pytest.raises(ValueError, match="runs"):
        measure(lambda: None, source="t", runs=0)
