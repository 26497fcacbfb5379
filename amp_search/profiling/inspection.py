"""The FP16 risk report (``amp-search inspect``): pipeline, JSON form and table.

:func:`inspect_model` runs load -> sanitize -> units -> calibration -> profile -> risk and
returns an :class:`InspectReport`, which renders as a rich table or writes JSON. The profile
holds an all-FP16 pass, and with BF16 among the precisions an all-BF16 one too (each unit's
BF16 deviation, or why BF16 is withheld from it); it is cached per model, data, units and
passes run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amp_search._atomic import write_json_atomic
from amp_search.calibration import load_calibration, model_inputs
from amp_search.errors import UserInputError
from amp_search.graph import MixedPrecisionRewriter
from amp_search.graph.units import NotSearched, load_units, not_searched
from amp_search.profiling.ranges import Profile, profile_model
from amp_search.profiling.sensitivity import DEFAULT_THRESHOLD, RiskLevel, UnitRisk, assess_units
from amp_search.types import Precision

if TYPE_CHECKING:
    import numpy as np
    import onnx
    from rich.console import Console
    from rich.table import Table

__all__ = ["BF16_NOTE", "CPU_NOTE", "InspectReport", "flops_by_node", "inspect_model"]

logger = logging.getLogger(__name__)

CPU_NOTE = (
    "FP16 figures come from ONNX Runtime CPU with FP16 storage emulated at every node "
    "boundary: an accuracy estimate. CPU arithmetic inside a node stays FP32, so it cannot "
    "show a GPU kernel's own FP16 failures; measure on the target backend before shipping."
)
BF16_NOTE = (
    "BF16 figures likewise: one bfloat16 rounding of every BF16 tensor and weight, FP32 "
    "arithmetic in between; 'withheld' units have ops the model's opset does not type "
    "bfloat16 (the rewrite keeps them FP32 and never upgrades the opset)."
)
_STYLE = {
    RiskLevel.CRITICAL: "bold red",
    RiskLevel.HIGH: "red",
    RiskLevel.MEDIUM: "yellow",
    RiskLevel.LOW: "cyan",
}


@dataclass
class InspectReport:
    """The result of :func:`inspect_model`."""

    model: str
    n_nodes: int
    risks: list[UnitRisk]
    data: str
    threshold: float
    seconds: float
    fp16_pass: bool
    extra: dict[str, Any] = field(default_factory=dict)
    #: Float computation no unit covers (:func:`amp_search.graph.units.not_searched`).
    not_searched: list[NotSearched] = field(default_factory=list)
    #: The low precisions asked for (``--precisions``); BF16 adds its column and rule.
    precisions: tuple[Precision, ...] = (Precision.FP16,)

    @property
    def bf16(self) -> bool:
        """Whether BF16 was asked for (the all-BF16 pass, its column and its rule)."""
        return Precision.BF16 in self.precisions

    def counts(self) -> dict[str, int]:
        """Number of units per risk level."""
        out = {str(lv): 0 for lv in reversed(RiskLevel)}
        for r in self.risks:
            out[str(r.level)] += 1
        return out

    def to_json(self) -> dict[str, Any]:
        """Plain-data form (what ``--json`` writes); the BF16 keys only when BF16 was asked."""
        out: dict[str, Any] = {
            "model": self.model,
            "nodes": self.n_nodes,
            "units": len(self.risks),
            "data": self.data,
            "threshold": self.threshold,
            "seconds": round(self.seconds, 3),
            "reference": "onnxruntime CPU, FP32 (strict: no TF32)",
            "fp16_source": "onnxruntime-cpu (FP16 storage emulated)" if self.fp16_pass else None,
            "note": CPU_NOTE,
            "counts": self.counts(),
            "locked_fp32": [r.unit.name for r in self.risks if r.locked_fp32],
            "units_by_risk": [r.to_json(bf16=self.bf16) for r in self.risks],
            "not_searched": [x.to_json() for x in self.not_searched],
        }
        if self.bf16:
            out["precisions"] = [p.value for p in self.precisions]
            out["bf16_source"] = "onnxruntime-cpu (BF16 storage emulated)"
            out["bf16_note"] = BF16_NOTE
            out["bf16_rescued"] = [r.unit.name for r in self.risks if r.bf16_rescue]
        return out

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        """Writes :meth:`to_json` atomically."""
        return write_json_atomic(path, self.to_json())

    def render(self, console: Console, top: int | None = 30) -> None:
        """Prints the table (riskiest first) and a summary."""
        shown = self.risks if not top else self.risks[:top]
        console.print(self._table(shown))
        if top and len(self.risks) > top:
            console.print(f"({len(self.risks) - top} more units; --top 0 shows all, --json all)")
        counts = ", ".join(f"{k} {v}" for k, v in self.counts().items() if v)
        console.print(f"units by risk: {counts}")
        locked = [r.unit.name for r in self.risks if r.locked_fp32]
        if locked:
            console.print(f"locked FP32 (weights overflow FP16): {', '.join(locked)}")
        if self.bf16:
            self._render_bf16(console)
        for x in self.not_searched:
            console.print(f"not searched, stays FP32: {x}", style="yellow")
        console.print(
            f"data: {self.data}; threshold {self.threshold:g}; {self.seconds:.1f} s. "
            "Reference: ONNX Runtime CPU, strict FP32."
        )
        if self.fp16_pass:
            console.print(f"Note: {CPU_NOTE}", style="dim")
        if self.bf16:
            console.print(f"Note: {BF16_NOTE}", style="dim")

    def _table(self, shown: list[UnitRisk]) -> Table:
        """The table of ``shown`` units; a BF16 column after the FP16 ones when asked."""
        from rich.table import Table

        table = Table(
            title=f"FP16 risk by unit: {Path(self.model).name} "
            f"({len(self.risks)} units, {self.n_nodes} nodes)",
            title_justify="left",
        )
        columns: list[tuple[str, dict[str, Any]]] = [
            ("#", {"justify": "right"}),
            ("unit", {"overflow": "fold", "max_width": 36}),
            ("ops", {"max_width": 24}),
            ("max|x|", {"justify": "right"}),
            ("act flush", {"justify": "right"}),
            ("w flush/subn", {"justify": "right"}),
            ("FP16 rel.L2", {"justify": "right"}),
            ("off>10%", {"justify": "right"}),
            *([("BF16 rel.L2", {"justify": "right"})] if self.bf16 else []),
            ("risk", {}),
            ("reason", {"overflow": "fold", "max_width": 60}),
        ]
        for col, kw in columns:
            table.add_column(col, **kw)
        for i, r in enumerate(shown, 1):
            d = r.deviation
            cells = [
                str(i),
                r.unit.name,
                "/".join(r.unit.op_types),
                f"{r.max_abs:.4g}",
                f"{r.act_flush_fraction:.1%}",
                f"{r.weight_flush}/{r.weight_subnormal}" if r.weight_numel else "-",
                f"{d.rel_l2:.2e}" if d and d.numel else "-",
                f"{d.off_fraction:.1%}" if d and d.numel else "-",
                *([_bf16_cell(r)] if self.bf16 else []),
                str(r.level),
                r.reason,
            ]
            table.add_row(*cells, style=_STYLE.get(r.level))
        return table

    def _render_bf16(self, console: Console) -> None:
        """The units BF16 rescues from an FP16 overflow, then those it is withheld from."""
        for r in self.risks:
            if r.bf16_rescue:
                console.print(f"{r.unit.name}: {r.bf16_rescue}", style="green")
        withheld: dict[str, list[str]] = {}
        for r in self.risks:
            if r.bf16_withheld:
                withheld.setdefault(r.bf16_withheld, []).append(r.unit.name)
        for reason, names in withheld.items():
            listed = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            console.print(f"BF16 withheld, {reason}: {listed} ({len(names)} units)",
                          style="yellow")  # fmt: skip


def _bf16_cell(r: UnitRisk) -> str:
    """The BF16 column: the measured rel. L2, ``withheld``, or ``-`` (not measured)."""
    if r.bf16_withheld:
        return "withheld"
    b = r.bf16_deviation
    return f"{b.rel_l2:.2e}" if b and b.numel else "-"


def flops_by_node(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], prof: Profile
) -> dict[str, float] | None:
    """FLOPs of every node (subgraph bodies included) for the shapes of one calibration batch.

    What the latency model counts (:func:`amp_search.latency_model.node_flops`), with the
    shapes the profiling run saw; None (and the FLOPs shares left out) where shape inference
    fails.
    """
    from amp_search.latency_model import node_flops

    seen = {n: t.shape for n, t in prof.tensors.items() if t.shape is not None}
    try:
        return node_flops(model, {k: tuple(v.shape) for k, v in feeds.items()}, seen)
    except Exception as exc:  # a report, not a requirement: the shares of weights remain
        logger.info("FLOPs not worked out (%s); not-searched shares are of weights only", exc)
        return None


def inspect_model(
    model_path: str | os.PathLike[str],
    data: str | os.PathLike[str] | None,
    *,
    synthetic: bool = False,
    shapes: dict[str, tuple[int, ...]] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    fp16_pass: bool = True,
    threads: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
    cache: bool = True,
    precisions: tuple[Precision, ...] = (Precision.FP16,),
) -> InspectReport:
    """Runs the FP16 (and BF16) risk analysis of a model on calibration data.

    Args:
        model_path: The ONNX model.
        data: ``.npz`` file or folder (None with ``synthetic``).
        synthetic: Use random inputs (with a warning).
        shapes: Sizes of synthetic inputs with dynamic axes, by input name.
        threshold: |x| above which an activation is "near overflow".
        fp16_pass: Also run the all-FP16 model and measure each unit's deviation (when FP16
            is among ``precisions``).
        threads: ONNX Runtime CPU threads (0: default).
        progress: Called with (stage, done, total).
        cache: Reuse the profile of an earlier run on the same model, data and passes (and
            keep this one for the next): only the risk rules run again
            (:func:`profile_cache_dir`).
        precisions: The low precisions to measure (:func:`amp_search.types.parse_precisions`);
            with BF16, an all-BF16 pass gives each unit's BF16 deviation, or why the rewrite
            withholds BF16 from it.
    """
    if threshold <= 0:
        raise UserInputError(f"--threshold must be positive, got {threshold}.")
    t0 = time.perf_counter()
    model, units = load_units(Path(model_path), purpose="inspect")  # as the search does
    cal = load_calibration(data, model_inputs(model), synthetic=synthetic, shapes=shapes)
    precisions = tuple(p for p in (Precision.FP16, Precision.BF16) if p in precisions)
    fp16_pass = fp16_pass and Precision.FP16 in precisions
    bf16_pass = Precision.BF16 in precisions
    passes = tuple(p.value for p in precisions if p is not Precision.FP16 or fp16_pass)
    key = _profile_key(model, cal, units, passes) if cache and not cal.is_synthetic else None
    prof = _cached_profile(key)
    extra: dict[str, Any] = {}
    if prof is None:
        rewriter = MixedPrecisionRewriter(model, units)
        prof = profile_model(
            model, units, cal, fp16_pass=fp16_pass, bf16_pass=bf16_pass, rewriter=rewriter,
            threads=threads, progress=progress,
        )  # fmt: skip
        _keep_profile(key, prof)
    else:
        extra["cached_profile"] = str(profile_cache_dir() / f"{key}.pkl")
    risks = assess_units(units, prof, threshold=threshold)
    left_out = not_searched(model, units, flops=flops_by_node(model, cal.first(), prof))
    return InspectReport(
        model=str(model_path),
        n_nodes=len(model.graph.node),
        risks=risks,
        data=cal.describe(),
        threshold=threshold,
        seconds=time.perf_counter() - t0,
        fp16_pass=fp16_pass,
        extra=extra,
        not_searched=left_out,
        precisions=precisions,
    )


#: Where ``inspect`` keeps profiles for a rerun (set it to move the cache).
CACHE_ENV = "AMP_SEARCH_CACHE"


def profile_cache_dir() -> Path:
    """``$AMP_SEARCH_CACHE/inspect`` if set, else ``~/.cache/amp-search/inspect``."""
    root = os.environ.get(CACHE_ENV, "").strip()
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "amp-search") / "inspect"


def _profile_key(
    model: onnx.ModelProto, cal: Any, units: list[Any], passes: tuple[str, ...]
) -> str:
    """What a profile depends on: the model, the data files, the units, the passes, this code.

    The sanitized model is hashed weight by weight; ``passes`` are the low-precision passes
    run (``("fp16", "bf16")``), so a BF16 run never reuses an FP16-only profile.
    """
    from amp_search.graph.io import copy_without_initializers

    # The graph, then each weight: never the whole model in one buffer (models over 2 GiB).
    h = hashlib.sha256(copy_without_initializers(model).SerializeToString())
    for t in model.graph.initializer:
        h.update(t.SerializeToString())
    for f in cal.files:
        h.update(Path(f).name.encode())
        h.update(Path(f).read_bytes())
    h.update(repr(([u.name for u in units], passes)).encode())
    package = Path(__file__).resolve().parents[1]
    for source in _PROFILE_SOURCES:  # a change of the profiling code invalidates the cache
        h.update((package / source).read_bytes())
    return h.hexdigest()[:24]


#: The code a profile depends on (relative to the package).
_PROFILE_SOURCES = ("profiling/ranges.py", "graph/precision.py", "graph/emulate.py",
                    "graph/units.py", "graph/sanitize.py", "graph/_index.py")  # fmt: skip


def _cached_profile(key: str | None) -> Profile | None:
    """The cached profile of ``key`` (None: none, or unreadable: it is profiled again)."""
    if key is None:
        return None
    path = profile_cache_dir() / f"{key}.pkl"
    try:
        with open(path, "rb") as f:  # our own cache, written by _keep_profile
            prof = pickle.load(f)  # noqa: S301
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
        return None
    return prof if isinstance(prof, Profile) else None


def _keep_profile(key: str | None, prof: Profile) -> None:
    """Keeps ``prof`` for a rerun; a cache that cannot be written is skipped, not an error."""
    if key is None:
        return
    folder = profile_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(prof, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, folder / f"{key}.pkl")
    except OSError as exc:
        logger.debug("inspect: profile not cached (%s)", exc)
