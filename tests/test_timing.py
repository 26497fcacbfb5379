"""The timing module: settle, paired windows, intervals, the clock floor, on real runs too."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from amp_search.timing import (
    PairedTiming,
    Step,
    TimingPlan,
    bootstrap_median_interval,
    measure,
    settle,
    summarize,
)


def _timer(values):
    """A timer that reports the given milliseconds, one per run (the step still runs)."""
    it = iter(values)

    def time_one(step):
        step()
        return next(it)

    return time_one


def test_settle_runs_until_two_windows_agree():
    plan = TimingPlan(window_ms=10.0, min_window_runs=2)
    # First run slow (algorithm search), then a ramp, then steady at 1 ms.
    values = itertools.chain([50.0], [4.0] * 2, [2.0] * 3, itertools.repeat(1.0))
    calls = []
    step = Step(lambda: calls.append(1), _timer(values))
    s = settle(step, plan)
    assert s.steady and s.first_run_ms == 50.0 and s.ms_per_run == 1.0
    assert s.runs == len(calls) and step.settled is s
    assert plan.window_runs(s.ms_per_run) == 10


def test_settle_is_bounded_in_time():
    plan = TimingPlan(warmup_max_s=0.05, window_ms=1.0)
    flip = itertools.cycle([1.0, 3.0])  # consecutive windows never agree

    def step():
        time.sleep(0.002)

    s = settle(Step(step, lambda f: (f(), next(flip))[1]), plan)
    assert not s.steady and 0.05 <= s.seconds < 1.0


def test_paired_ratio_is_a_median_over_windows_so_a_burst_hits_one_window():
    plan = TimingPlan(window_ms=3.0, min_window_runs=3, min_pairs=8, max_pairs=8)
    cand = Step(
        lambda: None, _timer(itertools.chain([2.0] * 10, [9.0] * 3, itertools.repeat(2.0)))
    )
    ref = Step(lambda: None, _timer(itertools.repeat(1.0)))
    timing = PairedTiming(cand, ref, plan)
    timing.run()
    stats = timing.stats(source="measured:test", reference_ms=1.5)
    assert timing.pairs == 8 and stats.windows == 8
    assert stats.ratio == 2.0 and stats.ratio_low == 2.0 and stats.ratio_high == 2.0
    assert stats.median_ms == 3.0 and stats.low_ms == 3.0 and stats.high_ms == 3.0
    assert stats.reference_ms == 1.5 and stats.own_median_ms == 2.0
    assert max(stats.samples_ms) == 9.0  # the burst is recorded, not the figure
    assert stats.mean_ms > 2.0


def test_stops_once_sure_and_runs_on_while_unsure():
    plan = TimingPlan(window_ms=1.0, min_window_runs=1, min_pairs=4, max_pairs=30,
                      target=0.02, max_time_s=60)  # fmt: skip
    steady = PairedTiming(Step(lambda: None, _timer(itertools.repeat(2.0))),
                          Step(lambda: None, _timer(itertools.repeat(1.0))), plan)  # fmt: skip
    steady.run()
    assert steady.pairs == 4  # the interval is a point: sure at the first chance
    rng = np.random.default_rng(0)
    noisy = PairedTiming(Step(lambda: None, _timer(iter(rng.uniform(1.0, 3.0, 10_000)))),
                         Step(lambda: None, _timer(itertools.repeat(1.0))), plan)  # fmt: skip
    noisy.run()
    assert noisy.pairs == 30  # +-50% noise never gets within +-2% by 30 windows
    s = noisy.stats(source="t")
    assert s.ratio_low < s.ratio < s.ratio_high
    assert s.median_ms == pytest.approx(s.ratio * s.reference_ms)


def test_windows_under_the_clock_floor_are_retaken():
    plan = TimingPlan(window_ms=1.0, min_window_runs=1, min_pairs=5, max_pairs=5)
    clocks = iter([1980.0] * 4 + [1200.0] + [1980.0] * 100)  # one reading at 61%
    timing = PairedTiming(Step(lambda: None, _timer(itertools.repeat(2.0))),
                          Step(lambda: None, _timer(itertools.repeat(1.0))), plan,
                          clock=lambda: next(clocks))  # fmt: skip
    timing.run()
    s = timing.stats(source="t")
    assert timing.pairs == 5 and s.retaken_windows == 1
    assert s.clock_mhz_min == 1200.0 and s.clock_mhz_steady == 1980.0


def test_bootstrap_interval_brackets_the_median():
    rng = np.random.default_rng(1)
    values = rng.normal(10.0, 1.0, 40)
    lo, hi = bootstrap_median_interval(values)
    assert lo < float(np.median(values)) < hi and hi - lo < 2.0
    assert bootstrap_median_interval(values) == (lo, hi)  # deterministic
    assert bootstrap_median_interval([3.0]) == (3.0, 3.0)


def test_measure_alone_reflects_real_duration():
    plan = TimingPlan(window_ms=6.0, min_window_runs=2, min_pairs=3, max_pairs=3)
    stats = measure(lambda: time.sleep(0.002), source="t", plan=plan)
    assert stats.windows == 3 and stats.ratio is None
    assert 2.0 <= stats.low_ms <= stats.median_ms <= stats.high_ms < 50
    s = summarize([1.0, 2.0, 3.0, 4.0, 100.0], source="t")
    assert s.median_ms == 3.0 and s.min_ms == 1.0 and s.p90_ms > 4.0
    with pytest.raises(ValueError, match="target"):
        TimingPlan(target=0)


def test_pairing_on_a_real_model(real_model):
    """ppocr_cls on ONNX Runtime CPU: a step that runs the model twice is timed ~2x of once."""
    import onnxruntime as ort

    path, feeds = real_model("ppocr_cls")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    a = ort.InferenceSession(str(path), so)
    b = ort.InferenceSession(str(path), so)

    def twice():
        a.run(None, feeds)
        a.run(None, feeds)

    plan = TimingPlan(window_ms=20.0, min_pairs=6, max_pairs=12, max_time_s=10)
    timing = PairedTiming(Step(twice), Step(lambda: b.run(None, feeds)), plan)
    timing.run()
    s = timing.stats(source="measured:onnxruntime-cpu")
    assert 1.5 < s.ratio < 2.7
    assert s.ratio_low <= s.ratio <= s.ratio_high
    assert s.median_ms == pytest.approx(s.ratio * s.reference_ms)
    assert s.windows >= 6 and s.n_runs >= 6 * 3 and s.steady is not None
