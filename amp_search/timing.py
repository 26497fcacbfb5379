"""The one way amp-search measures latency.

Backends expose a ``run_once`` step (inputs already bound, outputs synchronized on return), and
optionally a ``timer`` that returns one step's device-side milliseconds (TensorRT's CUDA events).
On a GPU, single runs scatter by about 12% and whole stretches of a second or two run slow on the
host side, so one block of runs timed alone is not a figure to rank by. The paired protocol:

1. **Settle** (:func:`settle`): run the step until two consecutive windows agree within
   ``steady_tolerance`` (the first runs hold cuDNN's algorithm search and the clock's ramp),
   bounded by ``warmup_max_s``. The window size follows from the settled run time: enough runs
   for about ``window_ms`` (at least ``min_window_runs``).
2. **Interleave** (:class:`PairedTiming`): time the candidate and a resident reference (the
   all-FP32 model) in short alternating windows, A B A B …; each pair gives a ratio of window
   medians. A burst hits one window, not the figure. A window taken while the SM clock reads
   below ``min_clock_fraction`` of the steady clock is dropped and taken again.
3. **Stop when sure**: after ``min_pairs``, stop once the 95% interval of the median ratio is
   within ``±target`` of it, or at ``max_pairs`` / ``max_time_s``.
4. **Summarize** (:meth:`PairedTiming.stats`): the ratio is the median of the pair ratios, its
   interval a percentile bootstrap over pairs; the latency is that ratio times the reference's
   level (a fixed figure per study, so every candidate is on one scale), with the same interval.
   The candidate's own median, p90 and run count are kept beside it.

:func:`measure` times a step alone with the same windows (settle, then windows until the
interval of the median window is within ``target``), for a figure without a reference.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from amp_search.types import LatencyStats

__all__ = [
    "DEFAULT_PLAN",
    "Clock",
    "PairedTiming",
    "Settled",
    "Step",
    "TimingPlan",
    "bootstrap_median_interval",
    "measure",
    "nvml_clock",
    "settle",
    "summarize",
]

logger = logging.getLogger(__name__)

#: Returns one step's elapsed milliseconds.
Timer = Callable[[Callable[[], None]], float]
#: Returns the SM clock in MHz now (None where unreadable).
Clock = Callable[[], "float | None"]


@dataclass(frozen=True)
class TimingPlan:
    """How long and how finely to time.

    Attributes:
        window_ms: Aim for windows about this long (the runs per window follow from it).
        min_window_runs: Fewest runs in one window.
        max_window_runs: Most runs in one window.
        min_pairs: Fewest windows (pairs, when interleaved) before stopping.
        max_pairs: Most windows (pairs).
        target: Stop once the 95% interval is within ``±target`` (relative) of the median.
        max_time_s: Stop timing after this long (the interval says how sure the figure is).
        warmup_max_s: Longest warm-up before timing starts anyway (the figure is then marked
            not steady); never longer than ``max_time_s``.
        steady_tolerance: Consecutive warm-up windows agree when their medians differ by less.
        min_clock_fraction: Windows under this fraction of the steady SM clock are retaken.
        bootstrap: Bootstrap resamples for intervals.
    """

    window_ms: float = 25.0
    min_window_runs: int = 3
    max_window_runs: int = 200
    min_pairs: int = 6
    max_pairs: int = 40
    target: float = 0.02
    max_time_s: float = 8.0
    warmup_max_s: float = 5.0
    steady_tolerance: float = 0.05
    min_clock_fraction: float = 0.9
    bootstrap: int = 1000

    def __post_init__(self) -> None:
        if self.min_window_runs < 1 or self.max_window_runs < self.min_window_runs:
            raise ValueError("need 1 <= min_window_runs <= max_window_runs")
        if self.min_pairs < 2 or self.max_pairs < self.min_pairs:
            raise ValueError("need 2 <= min_pairs <= max_pairs")
        if not 0 < self.target < 1:
            raise ValueError(f"target must be in (0, 1), got {self.target}")

    def window_runs(self, ms_per_run: float) -> int:
        """Runs per window for a step of ``ms_per_run``."""
        if not ms_per_run > 0:
            return self.max_window_runs
        n = int(np.ceil(self.window_ms / ms_per_run))
        return int(min(self.max_window_runs, max(self.min_window_runs, n)))


DEFAULT_PLAN = TimingPlan()


def _wall_timer(step: Callable[[], None]) -> float:
    t0 = time.perf_counter_ns()
    step()
    return (time.perf_counter_ns() - t0) / 1e6


@dataclass
class Step:
    """One thing to time: its step, its timer (wall clock when None) and how it settled."""

    run: Callable[[], None]
    timer: Timer | None = None
    settled: Settled | None = None

    def window(self, runs: int) -> list[float]:
        """Times ``runs`` consecutive runs (milliseconds each)."""
        time_one = self.timer or _wall_timer
        return [time_one(self.run) for _ in range(runs)]


@dataclass(frozen=True)
class Settled:
    """What warming a step up took.

    Attributes:
        runs: Untimed runs, all windows included.
        seconds: Time spent.
        steady: Whether two consecutive windows agreed before ``warmup_max_s``.
        ms_per_run: The last window's median (sets the window size).
        first_run_ms: The first run (session warm-up, cuDNN's algorithm search).
    """

    runs: int
    seconds: float
    steady: bool
    ms_per_run: float
    first_run_ms: float


def settle(step: Step, plan: TimingPlan = DEFAULT_PLAN) -> Settled:
    """Warms ``step`` up until two consecutive windows agree (see the module docstring)."""
    start = time.monotonic()
    first = step.window(1)[0]
    runs, previous, steady = 1, None, False
    ms = first
    while True:
        n = plan.window_runs(ms)
        window = step.window(n)
        runs += n
        ms = float(np.median(window))
        if previous is not None and abs(ms / previous - 1.0) < plan.steady_tolerance:
            steady = True
            break
        previous = ms
        if time.monotonic() - start > min(plan.warmup_max_s, plan.max_time_s):
            break
    step.settled = Settled(runs, time.monotonic() - start, steady, ms, first)
    return step.settled


def bootstrap_median_interval(
    values: np.ndarray | list[float], *, resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median of ``values``."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return (float("nan"), float("nan"))
    if a.size == 1:
        return (float(a[0]), float(a[0]))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(resamples, a.size))
    meds = np.median(a[idx], axis=1)
    lo, hi = np.percentile(meds, [2.5, 97.5])
    return (float(lo), float(hi))


@dataclass
class PairedTiming:
    """Windows of a candidate interleaved with windows of a resident reference.

    Several :meth:`run` calls add up (``amp-search refine`` times in rounds); :meth:`stats`
    summarizes everything taken so far.

    Args:
        candidate: The candidate's step.
        reference: The reference's step (None: the candidate is timed alone).
        plan: Window sizes, stopping rule, clock floor.
        clock: Reads the SM clock (None: not recorded, no floor).
    """

    candidate: Step
    reference: Step | None = None
    plan: TimingPlan = DEFAULT_PLAN
    clock: Clock | None = None
    cand_medians: list[float] = field(default_factory=list)
    ref_medians: list[float] = field(default_factory=list)
    runs: list[float] = field(default_factory=list)
    clocks: list[float] = field(default_factory=list)
    retaken: int = 0
    seconds: float = 0.0
    _steady_clock: float = 0.0

    @property
    def pairs(self) -> int:
        """Windows (pairs) taken so far."""
        return len(self.cand_medians)

    def run(
        self, *, min_pairs: int | None = None, max_pairs: int | None = None,
        max_time_s: float | None = None, until_sure: bool = True,
    ) -> None:  # fmt: skip
        """Takes windows (pairs) until the stopping rule holds.

        Args:
            min_pairs: Pairs to take at least in this call (the plan's by default).
            max_pairs: Pairs to take at most in this call (the plan's by default).
            max_time_s: Seconds at most for this call (the plan's by default).
            until_sure: Stop early once the interval is within the target.
        """
        plan = self.plan
        for step in (self.candidate, self.reference):
            if step is None:
                continue
            if step.settled is None:
                settle(step, plan)
            elif self.pairs == 0:  # a resident reference sat idle: one untimed window
                step.window(plan.window_runs(step.settled.ms_per_run))
        lo_n = plan.min_pairs if min_pairs is None else min_pairs
        hi_n = plan.max_pairs if max_pairs is None else max_pairs
        budget = plan.max_time_s if max_time_s is None else max_time_s
        assert self.candidate.settled is not None
        n_cand = plan.window_runs(self.candidate.settled.ms_per_run)
        n_ref = 0
        if self.reference is not None:
            assert self.reference.settled is not None
            n_ref = plan.window_runs(self.reference.settled.ms_per_run)
        if (
            until_sure
            and lo_n == 0
            and self.pairs >= 2
            and (self._relative_halfwidth() <= plan.target)
        ):
            return  # already sure: nothing to add
        start = time.monotonic()
        taken = 0
        attempts = 0
        while taken < hi_n:
            attempts += 1
            # Alternate which side goes first, so neither always follows the other.
            order = [self.candidate, self.reference] if attempts % 2 else [
                self.reference, self.candidate]  # fmt: skip
            got: dict[int, list[float]] = {}
            low_clock = False
            for step in order:
                if step is None:
                    continue
                window = step.window(n_cand if step is self.candidate else n_ref)
                got[id(step)] = window
                low_clock |= self._clock_is_low()
            elapsed = time.monotonic() - start
            if low_clock and self.retaken < 4 * hi_n and elapsed < budget:
                self.retaken += 1
                continue
            cand = got[id(self.candidate)]
            self.cand_medians.append(float(np.median(cand)))
            self.runs.extend(cand)
            if self.reference is not None:
                self.ref_medians.append(float(np.median(got[id(self.reference)])))
            taken += 1
            if taken >= lo_n and (
                elapsed > budget or (until_sure and self._relative_halfwidth() <= plan.target)
            ):
                break
        self.seconds += time.monotonic() - start

    def _clock_is_low(self) -> bool:
        if self.clock is None:
            return False
        mhz = self.clock()
        if mhz is None:
            return False
        self.clocks.append(mhz)
        self._steady_clock = max(self._steady_clock, mhz)
        return mhz < self.plan.min_clock_fraction * self._steady_clock

    def ratios(self) -> np.ndarray:
        """Candidate / reference window-median ratio of each pair."""
        ratios: np.ndarray = np.asarray(self.cand_medians) / np.asarray(self.ref_medians)
        return ratios

    def _relative_halfwidth(self) -> float:
        values = self.ratios() if self.reference is not None else np.asarray(self.cand_medians)
        lo, hi = bootstrap_median_interval(values, resamples=self.plan.bootstrap)
        mid = float(np.median(values))
        return max(mid - lo, hi - mid) / mid if mid > 0 else float("inf")

    def stats(self, *, source: str, reference_ms: float | None = None) -> LatencyStats:
        """The figures so far (see the module docstring).

        Args:
            source: Where the figure comes from (``"measured:onnxruntime-cuda"``).
            reference_ms: The reference's level; with a reference, the latency is the median
                ratio times this (the reference's own median of this timing when None).
        """
        if not self.cand_medians:
            raise ValueError("nothing timed yet")
        own = np.asarray(self.cand_medians)
        runs = np.asarray(self.runs)
        settled = self.candidate.settled
        clocks = np.asarray(self.clocks) if self.clocks else None
        common = dict(
            p90_ms=float(np.percentile(runs, 90)),
            mean_ms=float(runs.mean()),
            min_ms=float(runs.min()),
            n_runs=int(runs.size),
            n_warmup=settled.runs if settled else 0,
            source=source,
            samples_ms=tuple(float(x) for x in runs),
            own_median_ms=float(np.median(own)),
            windows=int(own.size),
            steady=bool(settled.steady) if settled else None,
            clock_mhz_min=None if clocks is None else float(clocks.min()),
            clock_mhz_median=None if clocks is None else float(np.median(clocks)),
            clock_mhz_steady=self._steady_clock or None,
            retaken_windows=self.retaken,
            timing_s=round(self.seconds, 3),
        )
        if self.reference is None:
            lo, hi = bootstrap_median_interval(own, resamples=self.plan.bootstrap)
            return LatencyStats(median_ms=float(np.median(own)), low_ms=lo, high_ms=hi,
                                **common)  # type: ignore[arg-type]  # fmt: skip
        ratios = self.ratios()
        ratio = float(np.median(ratios))
        r_lo, r_hi = bootstrap_median_interval(ratios, resamples=self.plan.bootstrap)
        level = float(np.median(self.ref_medians)) if reference_ms is None else reference_ms
        return LatencyStats(
            median_ms=ratio * level,
            low_ms=r_lo * level,
            high_ms=r_hi * level,
            ratio=ratio,
            ratio_low=r_lo,
            ratio_high=r_hi,
            reference_ms=level,
            **common,  # type: ignore[arg-type]
        )


def measure(
    step: Callable[[], None],
    *,
    source: str,
    plan: TimingPlan = DEFAULT_PLAN,
    timer: Timer | None = None,
    clock: Clock | None = None,
) -> LatencyStats:
    """Times ``step`` alone: settle, then windows until the interval is within the target.

    Args:
        step: One complete inference (it must synchronize the device before returning).
        source: Label of where the figure comes from (``"measured:onnxruntime-cpu"``).
        plan: Window sizes and the stopping rule.
        timer: Returns one step's elapsed milliseconds; wall clock by default.
        clock: Reads the SM clock (recorded; windows under its floor are retaken).
    """
    timing = PairedTiming(Step(step, timer), None, plan, clock)
    timing.run()
    return timing.stats(source=source)


def summarize(samples: list[float], *, source: str, warmup: int = 0) -> LatencyStats:
    """Median, p90, mean and min of single timed runs (milliseconds), without windows."""
    a = np.asarray(samples, dtype=np.float64)
    return LatencyStats(
        median_ms=float(np.median(a)),
        p90_ms=float(np.percentile(a, 90)),
        mean_ms=float(a.mean()),
        min_ms=float(a.min()),
        n_runs=len(samples),
        n_warmup=warmup,
        source=source,
        samples_ms=tuple(float(x) for x in a),
    )


def nvml_clock(device_id: int = 0) -> Clock | None:
    """A reader of the GPU's SM clock through NVML (``nvidia-ml-py``), or None if unreadable."""
    try:
        import pynvml  # the nvidia-ml-py package

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_id)
        pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)
    except Exception as exc:  # not installed, no driver, no such device
        logger.debug("SM clock not readable through NVML: %s", exc)
        return None

    def read() -> float | None:
        try:
            return float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
        except Exception:  # a transient NVML error: this window unrecorded
            return None

    return read
