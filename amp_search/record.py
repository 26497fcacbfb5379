"""The trial record (one completed trial's figures) and the JSON codec of non-finite floats.

Like :mod:`amp_search.keys`, this is a format: a study and a results directory outlive the
process that wrote them, so what is read back here must be what earlier versions wrote.

- :class:`TrialRecord` is what a completed trial stores as its one user attribute
  (:data:`~amp_search.keys.RECORD_ATTR`): :meth:`TrialRecord.to_attr` writes it (one storage
  write), :meth:`TrialRecord.from_trial`/:meth:`TrialRecord.from_attr` read it back, tolerant
  of records of earlier versions (a missing key reads as its default).
- JSON has no inf or NaN: amp-search writes them as the strings ``"inf"``, ``"-inf"`` and
  ``"nan"`` (:func:`encode_float`) and reads them back as floats (:func:`decode_float`),
  whichever file or attribute they are in.

It sits at the top of the package, not under ``results/``, because the lowest layer
(:mod:`amp_search._atomic`, which every JSON file goes through) uses the codec.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from amp_search.keys import RECORD_ATTR

__all__ = ["TrialRecord", "decode_float", "decode_metrics", "encode_float"]


def encode_float(value: float | None) -> float | str | None:
    """``value`` as JSON can hold it: inf/-inf/NaN as ``"inf"``/``"-inf"``/``"nan"``.

    A finite number (or None) is returned as it is.
    """
    if value is None or math.isfinite(value):
        return value
    if math.isnan(value):
        return "nan"
    return "inf" if value > 0 else "-inf"


def decode_float(value: Any) -> float | None:
    """A number as :func:`encode_float` wrote it, as a float (None stays None).

    Also reads what Python's ``json`` writes for non-finite floats (``Infinity``, ``NaN``),
    found in records and files of earlier versions.

    Raises:
        ValueError: ``value`` is not a number nor one of those strings.
    """
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Expected a number, 'inf', '-inf' or 'nan'; got {value!r}.") from None


def decode_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A record's ``metrics`` as read from JSON, its ``deviations`` as floats."""
    out = dict(metrics)
    deviations = out.get("deviations")
    if isinstance(deviations, Mapping):
        out["deviations"] = {k: decode_float(v) for k, v in deviations.items()}
    return out


@dataclass(frozen=True)
class TrialRecord:
    """What one completed trial stores: its candidate, fallback set and figures.

    The stored form (:meth:`to_attr`) is a dict: the fields below, with ``p90_ms``,
    ``deviations``, ``seconds``, ``casts`` and ``timing``'s entries nested in ``metrics``;
    ``bf16_units`` only where there are any (records of FP32/FP16 searches are as they were
    before BF16), non-finite deviations as strings (:func:`encode_float`).

    Attributes:
        digest: The assignment's digest (its folder under ``candidates/``).
        latency_source: Where the latency comes from (``estimated:h100``, ``measured:...``).
        metric: The accuracy metric's name.
        n_fp32: Number of units kept FP32.
        n_units: Number of units in the search.
        fp32_units: The FP32 fallback set.
        cached: Whether it was answered without a build (from the results directory, or a
            re-proposed assignment answered from its first trial).
        p90_ms: The latency's 90th percentile.
        deviations: Every accuracy metric computed (inf: non-finite outputs).
        seconds: Wall time per phase (rewrite, build, run, time, ...).
        casts: Casts the rewrite inserted (None: not known, a cached candidate).
        timing: What a measured latency adds (interval, ratio, windows, clock, execution),
            and any other figure a later version records; empty where estimated.
        bf16_units: The units in BF16.
    """

    digest: str = ""
    latency_source: str = ""
    metric: str = ""
    n_fp32: int = 0
    n_units: int = 0
    fp32_units: tuple[str, ...] = ()
    cached: bool = False
    p90_ms: float | None = None
    deviations: Mapping[str, float | None] = field(default_factory=dict)
    seconds: Mapping[str, float] = field(default_factory=dict)
    casts: int | None = None
    timing: Mapping[str, Any] = field(default_factory=dict)
    bf16_units: tuple[str, ...] = ()

    @property
    def metrics(self) -> dict[str, Any]:
        """Every figure besides the objectives, as a front point carries them (floats)."""
        return {
            "p90_ms": self.p90_ms,
            "deviations": dict(self.deviations),
            "seconds": dict(self.seconds),
            "casts": self.casts,
            **self.timing,
        }

    def to_attr(self) -> dict[str, Any]:
        """The stored form (see the class docstring): what ``trial.set_user_attr`` gets."""
        metrics = self.metrics
        metrics["deviations"] = {k: encode_float(v) for k, v in self.deviations.items()}
        return {
            **({"bf16_units": list(self.bf16_units)} if self.bf16_units else {}),
            "digest": self.digest,
            "latency_source": self.latency_source,
            "metric": self.metric,
            "n_fp32": self.n_fp32,
            "n_units": self.n_units,
            "fp32_units": list(self.fp32_units),
            "cached": self.cached,
            "metrics": metrics,
        }

    @classmethod
    def from_attr(cls, attr: Any) -> TrialRecord:
        """The record of a stored dict (any version's; anything else: an empty record)."""
        if not isinstance(attr, Mapping):
            return cls()
        found = attr.get("metrics")
        metrics = decode_metrics(found) if isinstance(found, Mapping) else {}
        p90 = metrics.pop("p90_ms", None)
        casts = metrics.pop("casts", None)
        return cls(
            digest=str(attr.get("digest", "")),
            latency_source=str(attr.get("latency_source", "")),
            metric=str(attr.get("metric", "")),
            n_fp32=int(attr.get("n_fp32", 0)),
            n_units=int(attr.get("n_units", 0)),
            fp32_units=tuple(attr.get("fp32_units") or ()),
            cached=bool(attr.get("cached", False)),
            p90_ms=None if p90 is None else decode_float(p90),
            deviations=dict(metrics.pop("deviations", None) or {}),
            seconds=dict(metrics.pop("seconds", None) or {}),
            casts=None if casts is None else int(casts),
            timing=metrics,
            bf16_units=tuple(attr.get("bf16_units") or ()),
        )

    @classmethod
    def from_trial(cls, trial: Any) -> TrialRecord:
        """The record a trial stores (an empty one where it stores none: failed, running)."""
        return cls.from_attr(trial.user_attrs.get(RECORD_ATTR))
