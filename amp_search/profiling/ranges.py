"""One FP32 pass with every tensor exposed, and one all-FP16 pass compared unit by unit.

This automates the by-hand workflow (Polygraphy's ``--onnx-outputs mark all``): every float
tensor of the main graph becomes a graph output, calibration batches run through ONNX
Runtime CPU one at a time, and per-tensor statistics accumulate (max |x|, FP16 subnormal and
flush-to-zero counts, overflow, NaN/Inf), so memory is bounded by one batch's activations.

The second pass runs the all-FP16 rewrite with every unit output exposed and compares it to
the FP32 pass on the same batch: each unit's relative L2 error and the fraction of its output
elements more than 10% off (relative to ``max(|ref|, 1e-3 * max|ref|)``, so exact zeros do
not count every tiny difference). These are accumulated errors at that point of the network,
which is what the by-hand per-layer table shows too.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from amp_search.backends.base import BuildConfig
from amp_search.backends.ort import OnnxRuntimeBackend
from amp_search.calibration import CalibrationData
from amp_search.graph._index import FLOAT, GraphIndex
from amp_search.graph.io import save_model
from amp_search.graph.precision import (
    FP16_MAX,
    FP16_MIN_NORMAL,
    FP16_MIN_SUBNORMAL,
    MixedPrecisionRewriter,
)
from amp_search.graph.units import Unit
from amp_search.types import Precision, PrecisionAssignment, TensorRanges

__all__ = ["OFF_TOLERANCE", "Profile", "UnitDeviation", "mark_outputs", "profile_model"]

logger = logging.getLogger(__name__)

#: An FP16 element is "off" when it differs from FP32 by more than this fraction.
OFF_TOLERANCE = 0.10


@dataclass
class UnitDeviation:
    """How far a unit's outputs in the all-FP16 model are from FP32 (accumulated error).

    Attributes:
        unit: Unit name.
        rel_l2: ||y16 - y32|| / ||y32|| over all its outputs and batches (inf if non-finite).
        off_fraction: Fraction of output elements more than 10% off.
        nonfinite: Non-finite elements in the FP16 outputs.
        numel: Elements compared.
    """

    unit: str
    rel_l2: float = 0.0
    off_fraction: float = 0.0
    nonfinite: int = 0
    numel: int = 0
    _sq_diff: float = field(default=0.0, repr=False)
    _sq_ref: float = field(default=0.0, repr=False)
    _off: int = field(default=0, repr=False)

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        """Accumulates one output tensor of one batch."""
        r = ref.astype(np.float64, copy=False)
        g = got.astype(np.float64, copy=False)
        finite = np.isfinite(g)
        self.nonfinite += int(g.size - np.count_nonzero(finite))
        d = np.where(finite, g - r, 0.0)
        self._sq_diff += float(np.sum(d * d))
        self._sq_ref += float(np.sum(r * r))
        scale = np.maximum(np.abs(r), 1e-3 * (float(np.max(np.abs(r))) if r.size else 0.0))
        self._off += int(np.count_nonzero((np.abs(d) > OFF_TOLERANCE * scale) | ~finite))
        self.numel += int(r.size)
        self._finish()

    def _finish(self) -> None:
        if self.nonfinite:
            self.rel_l2 = float("inf")
        elif self._sq_ref > 0:
            self.rel_l2 = float(np.sqrt(self._sq_diff / self._sq_ref))
        else:
            self.rel_l2 = float(np.sqrt(self._sq_diff))
        self.off_fraction = self._off / self.numel if self.numel else 0.0

    def to_json(self) -> dict[str, Any]:
        """Plain-data form."""
        return {
            "rel_l2": self.rel_l2,
            "off_fraction": self.off_fraction,
            "nonfinite": self.nonfinite,
            "numel": self.numel,
        }


@dataclass
class Profile:
    """What profiling found.

    Attributes:
        tensors: Range statistics of every float activation (main graph) and weight.
        deviations: Per-unit FP16 deviation (empty when the FP16 pass was skipped).
        n_batches: Batches profiled.
        reference_outputs: The model's FP32 outputs of each batch (only when asked).
    """

    tensors: dict[str, TensorRanges] = field(default_factory=dict)
    deviations: dict[str, UnitDeviation] = field(default_factory=dict)
    n_batches: int = 0
    reference_outputs: list[dict[str, np.ndarray]] = field(default_factory=list)


def _accumulate(stats: TensorRanges, a: np.ndarray) -> None:
    if stats.shape is None:
        stats.shape = tuple(int(d) for d in a.shape)
    x = np.abs(a.astype(np.float32, copy=False)).ravel()
    finite = np.isfinite(x)
    n_nonfinite = int(x.size - np.count_nonzero(finite))
    if n_nonfinite:
        x = x[finite]
    nz = x[x > 0]
    stats.numel += int(a.size)
    stats.nonzero += int(nz.size)
    stats.n_nonfinite += n_nonfinite
    if x.size:
        stats.max_abs = max(stats.max_abs, float(x.max()))
    stats.n_overflow += int(np.count_nonzero(nz > FP16_MAX))
    stats.n_subnormal += int(np.count_nonzero(nz < FP16_MIN_NORMAL))
    stats.n_flush += int(np.count_nonzero(nz < FP16_MIN_SUBNORMAL / 2))


def mark_outputs(
    model: onnx.ModelProto, names: list[str], types: dict[str, int]
) -> onnx.ModelProto:
    """A copy of ``model`` with ``names`` added as graph outputs (Polygraphy's mark all)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    existing = {o.name for o in out.graph.output}
    for name in names:
        if name not in existing:
            out.graph.output.append(helper.make_tensor_value_info(name, types[name], None))
            existing.add(name)
    return out


def _session(model: onnx.ModelProto, tmp: Path, tag: str, threads: int) -> Any:
    path = save_model(model, tmp / f"{tag}.onnx")
    backend = OnnxRuntimeBackend()
    opts = {"graph_optimization_level": "disable_all", "intra_op_num_threads": threads}
    cand = backend.build(path, BuildConfig(device="cpu", options=opts))
    return backend.open(cand)


def profile_model(
    model: onnx.ModelProto,
    units: list[Unit],
    data: CalibrationData,
    *,
    fp16_pass: bool = True,
    keep_reference: bool = False,
    rewriter: MixedPrecisionRewriter | None = None,
    threads: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> Profile:
    """Profiles a sanitized model on calibration data (ONNX Runtime CPU, strict FP32).

    Args:
        model: A sanitized model.
        units: Its units.
        data: Calibration batches.
        fp16_pass: Also run the all-FP16 model and measure each unit's deviation.
        keep_reference: Keep the FP32 graph outputs of every batch in the profile.
        rewriter: A rewriter of ``model`` to reuse.
        threads: ONNX Runtime intra-op threads (0: default).
        progress: Called with (stage, done, total) after each batch.
    """
    idx = rewriter.index if rewriter is not None else GraphIndex.build(model)
    prof = Profile()
    activations = [
        name
        for node in model.graph.node
        for name in node.output
        if name and idx.elem_type.get(name) == FLOAT
    ]
    for name in activations:
        prof.tensors[name] = TensorRanges(name=name)
    for init in model.graph.initializer:
        if init.data_type == FLOAT:
            stats = TensorRanges(name=init.name, is_weight=True)
            _accumulate(stats, numpy_helper.to_array(init))
            prof.tensors[init.name] = stats
    graph_outputs = [o.name for o in model.graph.output]

    unit_outputs: dict[str, list[str]] = {u.name: list(u.outputs) for u in units}
    fp16_runner = None
    fp16_names: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="amp-search-profile-") as tmpdir:
        tmp = Path(tmpdir)
        if fp16_pass and units:
            rw = rewriter or MixedPrecisionRewriter(model, units)
            half, _ = rw.apply(PrecisionAssignment.uniform(unit_outputs, Precision.FP16))
            produced = {o for n in half.graph.node for o in n.output}
            wanted: list[str] = []
            half_types: dict[str, int] = {}
            for names in unit_outputs.values():
                for name in names:
                    alt = name + "__fp16"
                    pick = alt if alt in produced else name
                    fp16_names[name] = pick
                    wanted.append(pick)
                    half_types[pick] = onnx.TensorProto.FLOAT16 if pick == alt else FLOAT
            fp16_runner = _session(mark_outputs(half, wanted, half_types), tmp, "fp16", threads)
            del half  # the session holds its own copy of the weights
            for u in units:
                prof.deviations[u.name] = UnitDeviation(unit=u.name)
        # The marked copy lives only while saved (a second copy of the weights otherwise).
        fp32_runner = _session(mark_outputs(model, activations, idx.elem_type), tmp, "fp32",
                               threads)  # fmt: skip
        total = data.n_batches
        with fp32_runner:
            if fp16_runner is not None:
                fp16_runner.__enter__()
            try:
                for b, batch in enumerate(data):
                    ref = fp32_runner.infer(batch)
                    for name in activations:
                        _accumulate(prof.tensors[name], ref[name])
                    if keep_reference:
                        prof.reference_outputs.append({k: ref[k] for k in graph_outputs})
                    if fp16_runner is not None:
                        got = fp16_runner.infer(batch)
                        for unit, names in unit_outputs.items():
                            for name in names:
                                prof.deviations[unit].add(ref[name], got[fp16_names[name]])
                    del ref
                    prof.n_batches += 1
                    if progress:
                        progress("profile", b + 1, total)
            finally:
                if fp16_runner is not None:
                    fp16_runner.__exit__(None, None, None)
    return prof
