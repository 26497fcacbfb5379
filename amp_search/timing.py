"""The one way amp-search measures latency.

Backends expose a ``run_once`` step (inputs already bound, outputs synchronized on return);
:func:`measure` warms it up, times N runs with a monotonic clock, and summarizes them as
:class:`~amp_search.types.LatencyStats`. A backend with device-side timing (TensorRT's CUDA
events) passes its own ``timer`` that returns the elapsed milliseconds of one step.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from amp_search.types import LatencyStats

__all__ = ["DEFAULT_RUNS", "DEFAULT_WARMUP", "measure", "summarize"]

DEFAULT_WARMUP = 5
DEFAULT_RUNS = 30


def _wall_timer(step: Callable[[], None]) -> float:
    t0 = time.perf_counter_ns()
    step()
    return (time.perf_counter_ns() - t0) / 1e6


def measure(
    step: Callable[[], None],
    *,
    source: str,
    warmup: int = DEFAULT_WARMUP,
    runs: int = DEFAULT_RUNS,
    max_time_s: float | None = None,
    timer: Callable[[Callable[[], None]], float] | None = None,
) -> LatencyStats:
    """Times ``step``: ``warmup`` untimed runs, then up to ``runs`` timed ones.

    Args:
        step: One complete inference (it must synchronize the device before returning).
        source: Label of where the figure comes from (``"measured:onnxruntime-cpu"``).
        warmup: Untimed runs first.
        runs: Timed runs (at least 1).
        max_time_s: Stop timing early once this much time was spent (at least 3 runs).
        timer: Returns one step's elapsed milliseconds; wall clock by default.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    time_one = timer or _wall_timer
    for _ in range(max(0, warmup)):
        step()
    samples: list[float] = []
    start = time.monotonic()
    for _ in range(runs):
        samples.append(time_one(step))
        if max_time_s is not None and len(samples) >= 3 and time.monotonic() - start > max_time_s:
            break
    return summarize(samples, source=source, warmup=warmup)


def summarize(samples: list[float], *, source: str, warmup: int = 0) -> LatencyStats:
    """Median, p90, mean and min of timed runs (milliseconds)."""
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
