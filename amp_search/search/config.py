"""What a search is asked to do: :class:`SearchConfig`, the flags of ``amp-search search``.

A config is plain data: :meth:`SearchConfig.to_json` is what the study keeps (so that
``amp-search worker`` can join it) and :meth:`SearchConfig.from_json` reads it back.
:func:`~amp_search.search.prepare.prepare` checks it and prepares the model for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amp_search.search.sampler import DEFAULT_SAMPLER
from amp_search.types import Precision, parse_precisions

__all__ = ["SearchConfig"]


@dataclass
class SearchConfig:
    """Everything a search needs (the CLI flags of ``amp-search search``)."""

    model: Path
    out: Path
    data: Path | None = None
    synthetic: bool = False
    #: With ``synthetic``: sizes of inputs with dynamic axes (``--shape``), by input name.
    shapes: dict[str, list[int]] = field(default_factory=dict)
    backend: str = "onnxruntime"
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)
    n_trials: int | None = 60
    timeout: float | None = None
    max_deviation: float | None = None
    metric: str = "rel_l2"
    latency: str | None = None  # measured | estimated; None: estimated on CPU
    target: str = "h100"
    storage: str | None = None
    study_name: str | None = None
    seed: int | None = 0
    sampler: str = DEFAULT_SAMPLER
    threshold: float = 10000.0
    #: The formats a unit may take besides FP32 (``--precisions``): ``fp16``, ``bf16``.
    precisions: tuple[str, ...] = ("fp16",)
    #: Measured latency: stop timing a candidate once its 95% interval is within +-this.
    timing_target: float = 0.02
    #: Measured latency: seconds of timing per candidate at most.
    timing_max_s: float = 8.0
    max_units: int | None = None
    #: Other accuracy metrics to record per trial (each costs a pass over every output).
    record_metrics: tuple[str, ...] = ()
    #: Join an existing study only (``amp-search worker``): never create it or seed it.
    join: bool = False
    #: How long to keep retrying when the study storage stops answering.
    storage_retry_s: float = 120.0
    #: ``all``: every candidate keeps its model; ``front``: dominated ones are pruned.
    keep_models: str = "all"
    #: Data the search never optimizes on; every front point is measured on it at the end.
    validation_data: Path | None = None
    #: Without ``validation_data``: hold out the last ceil(f * n) calibration batches (0: off).
    holdout_fraction: float = 0.0

    @property
    def low_precisions(self) -> tuple[Precision, ...]:
        """``precisions`` checked, in canonical order (:func:`~amp_search.types.parse_precisions`).

        Raises:
            UserInputError: A precision that is neither FP16 nor BF16.
        """
        return parse_precisions(",".join(self.precisions))

    def to_json(self) -> dict[str, Any]:
        """The settings a worker needs to join this search (paths made absolute)."""
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            if k in ("join", "storage_retry_s"):
                continue
            if isinstance(v, Path):
                v = str(v.resolve())
            elif isinstance(v, tuple):
                v = list(v)
            out[k] = v
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any], **overrides: Any) -> SearchConfig:
        """A config from :meth:`to_json` (unknown keys ignored), with ``overrides``."""
        names = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in obj.items() if k in names}
        for k in ("model", "out", "data", "validation_data"):
            if kw.get(k) is not None:
                kw[k] = Path(kw[k])
        kw["record_metrics"] = tuple(kw.get("record_metrics") or ())
        kw["precisions"] = tuple(kw.get("precisions") or ("fp16",))
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)
