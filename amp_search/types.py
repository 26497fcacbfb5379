"""Value types shared across amp-search: precisions, assignments, ranges, latency, results."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from amp_search.errors import UserInputError

__all__ = [
    "LOW_PRECISIONS",
    "LatencyStats",
    "Precision",
    "PrecisionAssignment",
    "TensorRanges",
    "parse_precisions",
]


class Precision(str, Enum):
    """The precision a unit computes in."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    def __str__(self) -> str:
        return self.value


#: The low precisions a unit may take instead of FP32, in their canonical order.
LOW_PRECISIONS: tuple[Precision, ...] = (Precision.FP16, Precision.BF16)


def parse_precisions(text: str) -> tuple[Precision, ...]:
    """The low precisions of a ``--precisions`` value, in canonical (FP16, BF16) order.

    Accepts ``fp16``, ``bf16`` and ``fp16,bf16`` in either order (case and spaces around the
    names do not matter); anything else, an empty or repeated name included, is refused.

    Raises:
        UserInputError: ``text`` names anything but FP16 and BF16, each at most once.
    """
    names = [part.strip().lower() for part in text.split(",")]
    valid = {p.value for p in LOW_PRECISIONS}
    if len(set(names)) != len(names) or not set(names) <= valid:
        raise UserInputError(
            f"--precisions must be fp16, bf16 or fp16,bf16 (either order), got {text!r}."
        )
    return tuple(p for p in LOW_PRECISIONS if p.value in names)


@dataclass(frozen=True)
class PrecisionAssignment(Mapping[str, Precision]):
    """An immutable map from unit name to :class:`Precision`.

    Units that are not named are FP32. The :meth:`digest` is stable across processes and
    runs (it depends only on the sets of FP16 and BF16 units) and is the cache key of a
    candidate. An assignment without BF16 units has the digest it had before BF16 existed
    (that of its FP16 set alone), so existing studies and results directories stay valid.
    """

    _items: tuple[tuple[str, Precision], ...] = ()

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Precision | str]) -> PrecisionAssignment:
        """Builds an assignment from ``{unit: precision}`` (precision as enum or string)."""
        items = tuple(sorted((str(k), Precision(v)) for k, v in mapping.items()))
        return cls(items)

    @classmethod
    def uniform(cls, units: Iterable[str], precision: Precision) -> PrecisionAssignment:
        """Every unit of ``units`` at ``precision``."""
        return cls.from_mapping(dict.fromkeys(units, precision))

    @classmethod
    def with_fp16(cls, units: Iterable[str], fp16: Iterable[str]) -> PrecisionAssignment:
        """All ``units`` FP32 except those in ``fp16``."""
        fp16_set = set(fp16)
        return cls.from_mapping(
            {u: Precision.FP16 if u in fp16_set else Precision.FP32 for u in units}
        )

    def __getitem__(self, key: str) -> Precision:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def get(self, key: str, default: Any = Precision.FP32) -> Any:  # noqa: D102
        return dict(self._items).get(key, default)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def fp16_units(self) -> frozenset[str]:
        """Names of the units assigned FP16."""
        return frozenset(k for k, v in self._items if v is Precision.FP16)

    @property
    def bf16_units(self) -> frozenset[str]:
        """Names of the units assigned BF16."""
        return frozenset(k for k, v in self._items if v is Precision.BF16)

    @property
    def low_precision_units(self) -> frozenset[str]:
        """Names of the units assigned FP16 or BF16."""
        return frozenset(k for k, v in self._items if v is not Precision.FP32)

    def units_at(self, precision: Precision) -> frozenset[str]:
        """Names of the units assigned ``precision``."""
        return frozenset(k for k, v in self._items if v is precision)

    @property
    def fp32_units(self) -> frozenset[str]:
        """Names of the units assigned FP32 (the FP32 fallback set)."""
        return frozenset(k for k, v in self._items if v is Precision.FP32)

    def digest(self) -> str:
        """A short stable hex digest of the FP16 and BF16 unit sets.

        Without BF16 units the payload is the sorted FP16 list alone, as it always was (the
        digests of FP32/FP16-only assignments never change); with BF16 units it is an object
        naming both sets, which no list payload can collide with.
        """
        bf16 = self.bf16_units
        if bf16:
            data: object = {"bf16": sorted(bf16), "fp16": sorted(self.fp16_units)}
        else:
            data = sorted(self.fp16_units)
        payload = json.dumps(data).encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    def to_json(self) -> dict[str, str]:
        """``{unit: "fp32"|"fp16"|"bf16"}``."""
        return {k: v.value for k, v in self._items}


@dataclass
class TensorRanges:
    """Range statistics of one tensor over the calibration data.

    Attributes:
        name: Tensor name.
        max_abs: Largest finite magnitude seen.
        numel: Number of elements seen (all batches).
        nonzero: Number of nonzero elements seen.
        n_overflow: Elements whose magnitude exceeds the FP16 maximum (65504).
        n_subnormal: Nonzero elements in the FP16 subnormal range (below 6.1e-5).
        n_flush: Nonzero elements that FP16 flushes to zero (below 5.96e-8).
        n_nonfinite: NaN or Inf elements.
        is_weight: Whether the tensor is an initializer.
        shape: Its shape in the first batch seen (what shape inference may not know).
    """

    name: str
    max_abs: float = 0.0
    numel: int = 0
    nonzero: int = 0
    n_overflow: int = 0
    n_subnormal: int = 0
    n_flush: int = 0
    n_nonfinite: int = 0
    is_weight: bool = False
    shape: tuple[int, ...] | None = None

    @property
    def subnormal_fraction(self) -> float:
        """Fraction of nonzero elements in the FP16 subnormal range."""
        return self.n_subnormal / self.nonzero if self.nonzero else 0.0

    @property
    def flush_fraction(self) -> float:
        """Fraction of nonzero elements that FP16 flushes to zero."""
        return self.n_flush / self.nonzero if self.nonzero else 0.0

    def to_json(self) -> dict[str, Any]:
        """Plain-data form, with the derived fractions."""
        out = asdict(self)
        out["subnormal_fraction"] = self.subnormal_fraction
        out["flush_fraction"] = self.flush_fraction
        return out


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one candidate, in milliseconds (see :mod:`amp_search.timing`).

    Attributes:
        median_ms: The figure: with a reference, the median ratio to it times the reference's
            level; alone, the median over timing windows; estimated, the estimate.
        p90_ms: 90th percentile of the candidate's own timed runs.
        mean_ms: Mean of the candidate's own timed runs.
        min_ms: Fastest run.
        n_runs: Number of timed runs.
        n_warmup: Number of untimed warm-up runs before them.
        source: Where the figure comes from, e.g. ``"measured:onnxruntime-cpu"`` or
            ``"estimated:h100"``. A CPU figure never stands in for a GPU one silently.
        samples_ms: The individual timed runs.
        low_ms: Lower end of the figure's 95% interval (None: not measured in windows).
        high_ms: Upper end of the figure's 95% interval.
        ratio: The candidate's latency over the reference's (all-FP32), paired by window.
        ratio_low: Lower end of the ratio's 95% interval.
        ratio_high: Upper end of the ratio's 95% interval.
        reference_ms: The reference's level the ratio was scaled by.
        own_median_ms: The candidate's own median window, unscaled.
        windows: Timing windows (pairs) taken.
        steady: Whether the warm-up reached agreeing windows in its time.
        clock_mhz_min: Lowest SM clock read at a window's end (None: unreadable).
        clock_mhz_median: Median SM clock over the windows.
        clock_mhz_steady: The steady clock the floor was relative to (the highest seen).
        retaken_windows: Windows dropped for a low clock and taken again.
        timing_s: Seconds the timed windows took.
        front_retimed: Whether it got more windows for joining the front.
    """

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    n_runs: int
    n_warmup: int
    source: str
    samples_ms: tuple[float, ...] = field(default=(), repr=False)
    low_ms: float | None = None
    high_ms: float | None = None
    ratio: float | None = None
    ratio_low: float | None = None
    ratio_high: float | None = None
    reference_ms: float | None = None
    own_median_ms: float | None = None
    windows: int = 0
    steady: bool | None = None
    clock_mhz_min: float | None = None
    clock_mhz_median: float | None = None
    clock_mhz_steady: float | None = None
    retaken_windows: int = 0
    timing_s: float | None = None
    front_retimed: bool = False

    def to_json(self) -> dict[str, Any]:
        """Plain-data form (without the samples)."""
        out = asdict(self)
        out.pop("samples_ms")
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> LatencyStats:
        """The inverse of :meth:`to_json` (unknown keys ignored)."""
        names = set(cls.__dataclass_fields__) - {"samples_ms"}
        return cls(**{k: v for k, v in obj.items() if k in names})
