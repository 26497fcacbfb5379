"""One FP32 pass with every tensor exposed, and all-FP16 (all-BF16) passes unit by unit.

This automates the by-hand workflow (Polygraphy's ``--onnx-outputs mark all``): every float
tensor of the main graph becomes a graph output, calibration batches run through ONNX
Runtime CPU one at a time, and per-tensor statistics accumulate (max |x|, FP16 subnormal and
flush-to-zero counts, overflow, NaN/Inf), so memory is bounded by one batch's activations.

The second pass runs the all-FP16 rewrite with every unit output exposed and compares it to
the FP32 pass on the same batch: each unit's relative L2 error and the fraction of its output
elements more than 10% off (relative to ``max(|ref|, 1e-3 * max|ref|)``, so exact zeros do
not count every tiny difference). These are accumulated errors at that point of the network,
which is what the by-hand per-layer table shows too.

An all-BF16 pass, when asked, does the same with the all-BF16 rewrite (BF16 storage emulated
at node boundaries by the twin, as FP16's is). Units whose ops the model's opset does not
type bfloat16 are withheld by the rewrite; they are recorded with the reason
(:func:`bf16_withheld`) instead of measured.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterable
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
from amp_search.graph.io import copy_without_initializers, save_model
from amp_search.graph.precision import (
    FP16_MAX,
    FP16_MIN_NORMAL,
    FP16_MIN_SUBNORMAL,
    LOW_PRECISION_SUFFIX,
    MixedPrecisionRewriter,
)
from amp_search.graph.units import Unit
from amp_search.types import Precision, PrecisionAssignment, TensorRanges

__all__ = [
    "OFF_TOLERANCE",
    "Profile",
    "UnitDeviation",
    "bf16_withheld",
    "mark_outputs",
    "profile_model",
]

logger = logging.getLogger(__name__)

#: An FP16 element is "off" when it differs from FP32 by more than this fraction.
OFF_TOLERANCE = 0.10

_ELEM = {Precision.FP16: onnx.TensorProto.FLOAT16, Precision.BF16: onnx.TensorProto.BFLOAT16}


@dataclass
class UnitDeviation:
    """How far a unit's outputs in the all-FP16 (all-BF16) model are from FP32 (accumulated).

    Attributes:
        unit: Unit name.
        rel_l2: ||y16 - y32|| / ||y32|| over all its outputs and batches (inf if non-finite).
        off_fraction: Fraction of output elements more than 10% off.
        nonfinite: Non-finite elements in the FP16 (BF16) outputs.
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
        bf16_deviations: Per-unit BF16 deviation (empty without the BF16 pass; units BF16 is
            withheld from are left out).
        bf16_withheld: Unit -> why the rewrite withholds BF16 from it (:func:`bf16_withheld`).
    """

    tensors: dict[str, TensorRanges] = field(default_factory=dict)
    deviations: dict[str, UnitDeviation] = field(default_factory=dict)
    n_batches: int = 0
    reference_outputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    bf16_deviations: dict[str, UnitDeviation] = field(default_factory=dict)
    bf16_withheld: dict[str, str] = field(default_factory=dict)


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


def _session(
    model: onnx.ModelProto,
    outputs: list[str],
    types: dict[str, int],
    tmp: Path,
    tag: str,
    threads: int,
    initializers: Iterable[onnx.TensorProto] | None = None,
) -> Any:
    """A CPU session of ``model`` with ``outputs`` (of ``types``) marked as graph outputs.

    The outputs are marked on a weightless copy, and the weights are written from ``model``
    (or from ``initializers``, a rewrite's made one at a time) with external data: no second
    copy of them is held while the session is built.

    Args:
        model: The model (or a rewrite's skeleton, with ``initializers``).
        outputs: Tensors to expose.
        types: Their element types.
        tmp: The temporary folder it is written to.
        tag: The file's stem.
        threads: ONNX Runtime intra-op threads (0: default).
        initializers: The weights, when not ``model``'s own.
    """
    marked = mark_outputs(copy_without_initializers(model), outputs, types)
    weights = model.graph.initializer if initializers is None else initializers
    path = save_model(marked, tmp / f"{tag}.onnx", initializers=weights)
    backend = OnnxRuntimeBackend()
    opts = {"graph_optimization_level": "disable_all", "intra_op_num_threads": threads}
    cand = backend.build(path, BuildConfig(device="cpu", options=opts))
    return backend.open(cand)


@dataclass
class _LowPass:
    """One all-FP16 or all-BF16 run beside the FP32 one, and where its deviations go.

    Attributes:
        runner: The session of the rewrite with every compared unit output exposed.
        names: Unit output -> the tensor holding its low-precision value.
        outputs: Unit -> its outputs compared (the units measured).
        deviations: Unit -> its accumulating deviation (in the :class:`Profile`).
    """

    runner: Any
    names: dict[str, str]
    outputs: dict[str, list[str]]
    deviations: dict[str, UnitDeviation]

    def compare(self, ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
        """Accumulates one batch: each measured unit's outputs against FP32."""
        for unit, names in self.outputs.items():
            for name in names:
                self.deviations[unit].add(ref[name], got[self.names[name]])


def _low_pass(
    low: onnx.ModelProto,
    weights: Iterable[onnx.TensorProto],
    units: list[Unit],
    precision: Precision,
    deviations: dict[str, UnitDeviation],
    tmp: Path,
    threads: int,
) -> _LowPass:
    """The session of the all-``precision`` rewrite ``low`` with ``units``' outputs exposed.

    ``low`` is the rewrite's skeleton and ``weights`` its initializers
    (:meth:`~MixedPrecisionRewriter.apply_streamed`): the rewrite is never held whole.

    A unit output the rewrite produced low is read under its low name (``<name>__fp16``,
    ``<name>__bf16``); the emulating twin (:mod:`amp_search.graph.emulate`) rounds it.
    """
    suffix, elem = LOW_PRECISION_SUFFIX[precision], _ELEM[precision]
    produced = {o for n in low.graph.node for o in n.output}
    outputs = {u.name: list(u.outputs) for u in units}
    names: dict[str, str] = {}
    types: dict[str, int] = {}
    for unit_outputs in outputs.values():
        for name in unit_outputs:
            alt = name + suffix
            pick = alt if alt in produced else name
            names[name] = pick
            types[pick] = elem if pick == alt else FLOAT
    runner = _session(low, list(names.values()), types, tmp, str(precision), threads,
                      weights)  # fmt: skip
    for u in units:
        deviations[u.name] = UnitDeviation(unit=u.name)
    return _LowPass(runner, names, outputs, deviations)


def bf16_withheld(
    rewriter: MixedPrecisionRewriter, units: list[Unit], nodes: list[str]
) -> dict[str, str]:
    """Unit -> why BF16 is withheld from it: ``nodes`` (the rewrite's ``bf16_unsupported``).

    A unit any of whose nodes the opset does not type BF16 counts as withheld as a whole:
    the rest of it in BF16 around an FP32 Conv would measure mostly FP32 and promise a BF16
    the model cannot run. The reason names the model's opset and, per op, the opset from
    which it would admit bfloat16 (:meth:`GraphIndex.bf16_opset`).
    """
    idx = rewriter.index
    position = {n.name: i for i, n in enumerate(idx.model.graph.node)}
    withheld = {position[n] for n in nodes if n in position}
    out: dict[str, str] = {}
    for u in units:
        mine = sorted(position[n] for n in u.nodes if position.get(n) in withheld)
        if not mine:
            continue
        needs = {idx.model.graph.node[i].op_type: idx.bf16_opset(i) for i in mine}
        parts = [f"{op} (from opset {v})" if v else f"{op} (in no opset)"
                 for op, v in needs.items()]  # fmt: skip
        if idx.opset < 13:
            parts.insert(0, "Cast (from opset 13)")
        out[u.name] = f"opset {idx.opset} has no bfloat16 {', '.join(parts)}"
    return out


def _fp16_pass(rw: MixedPrecisionRewriter, units: list[Unit], prof: Profile, tmp: Path,
               threads: int) -> _LowPass:  # fmt: skip
    """The all-FP16 pass: every unit measured."""
    all_fp16 = PrecisionAssignment.uniform([u.name for u in units], Precision.FP16)
    half, weights, _ = rw.apply_streamed(all_fp16)
    return _low_pass(half, weights, units, Precision.FP16, prof.deviations, tmp, threads)


def _bf16_pass(rw: MixedPrecisionRewriter, units: list[Unit], prof: Profile, tmp: Path,
               threads: int) -> _LowPass | None:  # fmt: skip
    """The all-BF16 pass: the units BF16 is not withheld from (None: it is from every one)."""
    all_bf16 = PrecisionAssignment.uniform([u.name for u in units], Precision.BF16)
    low, weights, report = rw.apply_streamed(all_bf16)
    prof.bf16_withheld = bf16_withheld(rw, units, report.bf16_unsupported)
    measured = [u for u in units if u.name not in prof.bf16_withheld]
    if not measured or not report.bf16_nodes:
        return None
    return _low_pass(low, weights, measured, Precision.BF16, prof.bf16_deviations, tmp,
                     threads)  # fmt: skip


def _init_ranges(model: onnx.ModelProto, idx: GraphIndex, prof: Profile) -> list[str]:
    """Empty ranges of every float activation (their names returned) and full ones of weights."""
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
    return activations


def profile_model(
    model: onnx.ModelProto,
    units: list[Unit],
    data: CalibrationData,
    *,
    fp16_pass: bool = True,
    bf16_pass: bool = False,
    keep_reference: bool = False,
    rewriter: MixedPrecisionRewriter | None = None,
    threads: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> Profile:
    """Profiles a sanitized model on calibration data (ONNX Runtime CPU, strict FP32).

    The pipeline: the ranges of every weight; the all-FP16 session (``fp16_pass``) and the
    all-BF16 one (``bf16_pass``: BF16 withheld from some units is recorded, not measured);
    the FP32 session with every float activation exposed; then, batch by batch, the FP32
    ranges and each low-precision pass's unit deviations.

    Args:
        model: A sanitized model.
        units: Its units.
        data: Calibration batches.
        fp16_pass: Also run the all-FP16 model and measure each unit's deviation.
        bf16_pass: Also run the all-BF16 model (BF16 storage emulated, as FP16's is) and
            measure each unit's BF16 deviation (``Profile.bf16_deviations``).
        keep_reference: Keep the FP32 graph outputs of every batch in the profile.
        rewriter: A rewriter of ``model`` to reuse.
        threads: ONNX Runtime intra-op threads (0: default).
        progress: Called with (stage, done, total) after each batch.
    """
    idx = rewriter.index if rewriter is not None else GraphIndex.build(model)
    prof = Profile()
    activations = _init_ranges(model, idx, prof)
    graph_outputs = [o.name for o in model.graph.output]
    with tempfile.TemporaryDirectory(prefix="amp-search-profile-") as tmpdir, \
            contextlib.ExitStack() as stack:  # fmt: skip
        tmp = Path(tmpdir)
        passes: list[_LowPass | None] = []
        if (fp16_pass or bf16_pass) and units:
            rw = rewriter or MixedPrecisionRewriter(model, units)
            if fp16_pass:
                passes.append(_fp16_pass(rw, units, prof, tmp, threads))
            if bf16_pass:
                passes.append(_bf16_pass(rw, units, prof, tmp, threads))
        low_passes = [p for p in passes if p is not None]
        fp32_runner = stack.enter_context(
            _session(model, activations, idx.elem_type, tmp, "fp32", threads)
        )
        for p in low_passes:
            stack.enter_context(p.runner)
        for b, batch in enumerate(data):
            ref = fp32_runner.infer(batch)
            for name in activations:
                _accumulate(prof.tensors[name], ref[name])
            if keep_reference:
                prof.reference_outputs.append({k: ref[k] for k in graph_outputs})
            for p in low_passes:
                p.compare(ref, p.runner.infer(batch))
            del ref
            prof.n_batches += 1
            if progress:
                progress("profile", b + 1, data.n_batches)
    return prof
