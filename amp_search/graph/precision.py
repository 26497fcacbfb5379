"""The mixed-precision rewrite: one assignment in, one new ONNX model out.

:func:`apply_assignment` (and :class:`MixedPrecisionRewriter`, which keeps per-model work
between calls) never mutates its input. For the nodes of FP16 units it:

- switches the node's float inputs/outputs that its op schema types together (the type
  variable of its outputs) to FP16, leaving spec-typed inputs alone (Resize scales/roi,
  LayerNormalization's FP32-only statistics, index inputs); ONNX Runtime's fused ops
  (``com.microsoft`` Attention, SkipLayerNormalization, ...) by the table in
  ``graph/op_types.py``;
- reads FP16 copies of its float initializers (converted once and cached, unless the
  model's float weights exceed :data:`WEIGHT_CACHE_LIMIT`: then converted again per rewrite;
  the conversion reports values that overflow, fall in the subnormal range, or flush to
  zero; a node whose weights overflow FP16 stays FP32);
- renames each FP16 output ``<name>__fp16``; the original name is materialized by a Cast
  back to FP32 only where an FP32 reader, a graph output or a subgraph needs it, and FP16
  readers use the FP16 tensor directly, so no Cast pair round-trips;
- lets data-movement nodes (Reshape, Transpose, Concat, Resize, pooling, ...) run FP16 when
  every float input they read is already FP16, and lets Shape/Size/Cast read FP16 tensors
  directly instead of through a Cast;
- keeps *pinned* nodes FP32 whatever their unit says: nodes the target cannot run in FP16
  (``Backend.low_precision_gaps`` names them from the all-FP16 rewrite), so that no
  candidate sends a node to the CPU.

BF16 units are rewritten the same way, with BF16 weights and outputs named ``<name>__bf16``
(one naming contract: :data:`LOW_PRECISION_SUFFIX`). A tensor produced in one low precision
and read in the other goes through FP32 (a Cast back, then a Cast to the reader's type), and
a follower runs low only when every live float input it reads has one and the same low
precision. Where the model's opset does not admit ``tensor(bfloat16)`` for a node's op
(ONNX added BF16 to many ops late: Conv and MaxPool only at opset 22), BF16 is *withheld*
from that node: it stays FP32, the unit's other nodes run BF16 as their ops allow, and the
node is listed in ``report.bf16_unsupported`` (below opset 13, where Cast has no bfloat16,
that is every node). An input-only type variable the opset does not type BF16 (Pow-13's
exponent) stays FP32 while the node runs BF16. The model's opset is never upgraded for BF16:
``onnx.version_converter`` would change every node's schema, not only the BF16 ones, and on
the ONNX Runtime CUDA EP opset 22 moves MaxPool to the CPU in every precision (measured on
the H200, ``shared/gpu/README.md``), so an upgrade would silently change what FP32 and FP16
candidates run too. Every output passes ``onnx.checker.check_model(full_check=True)``.

Graph inputs and outputs keep their names and types. The all-FP32 assignment returns an
unchanged copy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from amp_search.graph._index import (
    BFLOAT16,
    FLOAT,
    FLOAT16,
    GraphIndex,
    NodeParams,
    subgraphs,
)
from amp_search.graph.io import copy_without_initializers, tensor_nbytes
from amp_search.graph.op_types import since_version
from amp_search.graph.units import FOLLOWER_OPS, Unit, find_units
from amp_search.types import Precision, PrecisionAssignment

__all__ = [
    "BF16_MAX",
    "BF16_MIN_NORMAL",
    "BF16_MIN_SUBNORMAL",
    "FP16_MAX",
    "FP16_MIN_NORMAL",
    "FP16_MIN_SUBNORMAL",
    "ConversionReport",
    "CAST_PREFIX",
    "CAST_SUFFIX",
    "LOW_PRECISION_SUFFIX",
    "InitializerLoss",
    "LowPrecisionNode",
    "MixedPrecisionRewriter",
    "WEIGHT_CACHE_LIMIT",
    "apply_assignment",
]

logger = logging.getLogger(__name__)

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 6.103515625e-05
FP16_MIN_SUBNORMAL = 5.960464477539063e-08

BF16_MAX = 3.3895313892515355e38
BF16_MIN_NORMAL = 1.1754943508222875e-38
BF16_MIN_SUBNORMAL = 9.183549615799121e-41

#: The suffix of a tensor's low-precision version (``<name>__fp16``, ``<name>__bf16``).
LOW_PRECISION_SUFFIX: dict[Precision, str] = {Precision.FP16: "__fp16", Precision.BF16: "__bf16"}
_ELEM: dict[Precision, int] = {Precision.FP16: FLOAT16, Precision.BF16: BFLOAT16}
#: Inserted Casts are named ``<CAST_PREFIX><source tensor><CAST_SUFFIX[to]>`` (the latency
#: estimator reads a mixed model by these names and the suffixes above, without protos).
CAST_PREFIX = "amp_cast/"
CAST_SUFFIX: dict[int, str] = {FLOAT16: "/to_fp16", BFLOAT16: "/to_bf16", FLOAT: "/to_fp32"}
_SUFFIX: dict[int, str] = {
    _ELEM[p]: suffix for p, suffix in LOW_PRECISION_SUFFIX.items()
}  # by element type
_PRECISION: dict[int, Precision] = {elem: p for p, elem in _ELEM.items()}
_TYPE_AGNOSTIC_READERS = frozenset({"Shape", "Size", "Cast"})
#: A rewriter keeps its FP16/BF16 copies of the weights between rewrites (a measured speed
#: win) unless the model's float weights exceed this many bytes: then the copies, half as
#: large again, would stay resident for the whole search (issue 10).
WEIGHT_CACHE_LIMIT = 2**30


@dataclass(frozen=True)
class InitializerLoss:
    """What converting one float initializer to FP16 (or BF16) loses.

    Attributes:
        name: Initializer name.
        numel: Number of elements.
        n_overflow: Elements above the type's maximum (65504 for FP16) in magnitude (they
            would become inf).
        n_subnormal: Nonzero elements below its smallest normal (6.1e-5 for FP16), kept with
            reduced precision.
        n_flush: Nonzero elements below half its smallest subnormal (5.96e-8 for FP16):
            they become zero.
    """

    name: str
    numel: int
    n_overflow: int
    n_subnormal: int
    n_flush: int


@dataclass
class ConversionReport:
    """What one rewrite did.

    Attributes:
        fp16_nodes: Nodes that run in FP16 (units' nodes and followers).
        casts_inserted: Number of Cast nodes added.
        initializers: Loss of every initializer converted to FP16.
        forced_fp32: Nodes of FP16 (BF16) units kept FP32 because a weight overflows.
        bf16_nodes: Nodes that run in BF16.
        bf16_initializers: Loss of every initializer converted to BF16.
        bf16_unsupported: Nodes of BF16 units kept FP32 because the model's opset does not
            admit ``tensor(bfloat16)`` for their op (BF16 withheld, not the opset upgraded).
    """

    fp16_nodes: list[str] = field(default_factory=list)
    casts_inserted: int = 0
    initializers: list[InitializerLoss] = field(default_factory=list)
    forced_fp32: list[str] = field(default_factory=list)
    bf16_nodes: list[str] = field(default_factory=list)
    bf16_initializers: list[InitializerLoss] = field(default_factory=list)
    bf16_unsupported: list[str] = field(default_factory=list)

    @property
    def low_precision_nodes(self) -> list[str]:
        """Nodes that run in FP16 or BF16."""
        return [*self.fp16_nodes, *self.bf16_nodes]

    def to_json(self) -> dict[str, Any]:
        """Plain-data form (the BF16 keys only where BF16 was asked for)."""
        out = self._fp16_json()
        if self.bf16_nodes or self.bf16_unsupported or self.bf16_initializers:
            out.update(
                bf16_nodes=len(self.bf16_nodes),
                bf16_unsupported=self.bf16_unsupported,
                bf16_initializers_converted=len(self.bf16_initializers),
                bf16_weights_flushed_to_zero=sum(x.n_flush for x in self.bf16_initializers),
                bf16_weights_overflowing=sum(x.n_overflow for x in self.bf16_initializers),
            )
        return out

    def _fp16_json(self) -> dict[str, Any]:
        return {
            "fp16_nodes": len(self.fp16_nodes),
            "casts_inserted": self.casts_inserted,
            "forced_fp32": self.forced_fp32,
            "initializers_converted": len(self.initializers),
            "weights_flushed_to_zero": sum(x.n_flush for x in self.initializers),
            "weights_subnormal": sum(x.n_subnormal for x in self.initializers),
            "weights_overflowing": sum(x.n_overflow for x in self.initializers),
        }


@dataclass(frozen=True)
class LowPrecisionNode:
    """A node that the all-FP16 rewrite runs in FP16.

    Attributes:
        name: Node name.
        op_type: Its op.
        since_version: The version of the op's schema that the model's opset selects.
    """

    name: str
    op_type: str
    since_version: int


def summarize_pinned(pinned: dict[str, str]) -> str:
    """One line for pinned nodes: how many, grouped by reason."""
    counts: dict[str, int] = {}
    for reason in pinned.values():
        counts[reason] = counts.get(reason, 0) + 1
    parts = [f"{n} node(s): {reason}" for reason, n in sorted(counts.items())]
    return f"{len(pinned)} node(s) stay FP32 in every candidate ({'; '.join(parts)})"


def initializer_loss(
    name: str, values: np.ndarray, precision: Precision = Precision.FP16
) -> InitializerLoss:
    """Counts what conversion to ``precision`` (FP16 or BF16) loses in ``values``."""
    if precision is Precision.BF16:
        top, normal, sub = BF16_MAX, BF16_MIN_NORMAL, BF16_MIN_SUBNORMAL
    else:
        top, normal, sub = FP16_MAX, FP16_MIN_NORMAL, FP16_MIN_SUBNORMAL
    a = np.abs(values.astype(np.float32, copy=False)).ravel()
    nz = a[a > 0]
    return InitializerLoss(
        name=name,
        numel=int(a.size),
        n_overflow=int(np.count_nonzero(a > top)),
        n_subnormal=int(np.count_nonzero(nz < normal)),
        n_flush=int(np.count_nonzero(nz < sub / 2)),
    )


class MixedPrecisionRewriter:
    """Rewrites one sanitized model for many assignments, caching what does not change.

    Args:
        model: A model returned by :func:`amp_search.graph.sanitize` (not modified).
        units: Its units; found with :func:`find_units` when omitted.
        pinned: Node name -> why it stays FP32 in every assignment (a unit's node or a
            follower the target cannot run in FP16).
        cache_weights: Keep the FP16/BF16 copies of the weights (and their encodings)
            between rewrites; by default, unless the float weights exceed
            :data:`WEIGHT_CACHE_LIMIT`. The rewrites are the same either way.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        units: list[Unit] | None = None,
        pinned: dict[str, str] | None = None,
        cache_weights: bool | None = None,
    ) -> None:
        self.model = model
        self.index = GraphIndex.build(model)
        self.units = units if units is not None else find_units(model, self.index)
        self.pinned = dict(pinned or {})
        self._unit_nodes = {u.name: u.nodes for u in self.units}
        self._pos = {n.name: i for i, n in enumerate(model.graph.node)}
        unknown = [n for n in self.pinned if n not in self._pos]
        if unknown:
            raise KeyError(f"Pinned node(s) not in the model: {', '.join(unknown[:5])}")
        self._pinned_pos = frozenset(self._pos[n] for n in self.pinned)
        self._params = [self.index.params(i) for i in range(len(model.graph.node))]
        if cache_weights is None:
            cache_weights = _float_weight_bytes(model) <= WEIGHT_CACHE_LIMIT
        self.cache_weights = cache_weights
        self._low_init: dict[tuple[str, int], onnx.TensorProto] = {}  # when cache_weights
        self._loss: dict[tuple[str, int], InitializerLoss] = {}  # always: small
        self._bf16_params: dict[int, NodeParams | None] = {}
        # Never a full copy: upb keeps deleted weights in the copy's arena (2x memory at 2 GiB).
        template = copy_without_initializers(model)
        del template.graph.node[:]
        del template.graph.value_info[:]
        self._template = template
        self._value_info = {vi.name: vi for vi in model.graph.value_info}
        self._encoded_inits: dict[str, bytes] = {}  # when cache_weights
        # Plain-Python copies of what the per-trial loop reads (protobuf field access is slow).
        nodes = model.graph.node
        self._ins = [tuple(n.input) for n in nodes]
        self._outs = [tuple(n.output) for n in nodes]
        self._ops = [n.op_type for n in nodes]
        self._names = [n.name for n in nodes]
        self._is_init = {n for n in self.index.initializers if self.index.is_initializer(n)}
        self._sub_refs = [frozenset().union(*map(_all_refs, subgraphs(n))) for n in nodes]
        self._graph_input_names = {i.name for i in model.graph.input}

    def _low_initializer(self, name: str, elem: int) -> onnx.TensorProto:
        """The FP16 or BF16 (``elem``) copy of float initializer ``name`` (its loss noted)."""
        key = (name, elem)
        tensor = self._low_init.get(key)
        if tensor is None:
            values = numpy_helper.to_array(self.index.initializers[name])
            if key not in self._loss:  # one read of the values for both
                self._loss[key] = initializer_loss(name, values, _PRECISION[elem])
            if elem == BFLOAT16:
                import ml_dtypes  # onnx's own dependency: numpy's bfloat16

                with np.errstate(over="ignore"):
                    low = values.astype(ml_dtypes.bfloat16)
            else:
                with np.errstate(over="ignore"):
                    low = values.astype(np.float16)
            del values
            tensor = numpy_helper.from_array(low, name + _SUFFIX[elem])
            if self.cache_weights:
                self._low_init[key] = tensor
        return tensor

    def _low_loss(self, name: str, elem: int) -> InitializerLoss:
        """What converting float initializer ``name`` to ``elem`` loses (computed once)."""
        key = (name, elem)
        if key not in self._loss:
            if self.cache_weights:  # the copy is wanted soon: made with it
                self._low_initializer(name, elem)
            else:
                values = numpy_helper.to_array(self.index.initializers[name])
                self._loss[key] = initializer_loss(name, values, _PRECISION[elem])
        return self._loss[key]

    def _weight(self, name: str) -> onnx.TensorProto:
        """Initializer ``name`` of a rewrite: the model's own, or a weight's FP16/BF16 copy."""
        tensor = self.index.initializers.get(name)
        if tensor is None:
            elem, suffix = next((e, s) for e, s in _SUFFIX.items() if name.endswith(s))
            tensor = self._low_initializer(name[: -len(suffix)], elem)
        return tensor

    def admits_bf16(self, i: int) -> bool:
        """Whether node ``i`` may run BF16 at the model's opset (its schema's type sets)."""
        return self.bf16_params(i) is not None

    def admits_bf16_unit(self, unit: str) -> bool:
        """Whether every node of ``unit`` may run BF16 at the model's opset.

        A unit with a node the opset does not type ``bfloat16`` (Conv below opset 22) is not
        offered BF16: that node would stay FP32 behind Casts, costing more than it saves.
        """
        nodes = self._unit_nodes[unit]
        return bool(nodes) and all(self.admits_bf16(self._pos[n]) for n in nodes)

    def bf16_params(self, i: int) -> NodeParams | None:
        """The inputs/outputs of node ``i`` that switch to BF16 (None: the opset forbids it)."""
        if i not in self._bf16_params:
            self._bf16_params[i] = self.index.bf16_params(i)
        return self._bf16_params[i]

    def weight_loss(self, name: str) -> InitializerLoss:
        """The FP16 conversion loss of float initializer ``name``."""
        return self._low_loss(name, FLOAT16)

    def all_fp16(self) -> PrecisionAssignment:
        """The assignment that puts every unit in FP16."""
        return PrecisionAssignment.uniform([u.name for u in self.units], Precision.FP16)

    def low_precision_nodes(self) -> list[LowPrecisionNode]:
        """Every node the all-FP16 assignment runs in FP16 (pinned ones excluded)."""
        _, report = self.apply_skeleton(self.all_fp16())
        out = []
        for name in report.fp16_nodes:
            node = self.model.graph.node[self._pos[name]]
            since = since_version(node.op_type, node.domain, self.index.opset)
            out.append(LowPrecisionNode(name, node.op_type, since))
        return out

    def fp16_node_positions(self, assignment: PrecisionAssignment) -> set[int]:
        """Positions of the nodes the assignment's units put in FP16 (not pinned ones)."""
        return self.node_positions(assignment, Precision.FP16)

    def node_positions(self, assignment: PrecisionAssignment, precision: Precision) -> set[int]:
        """Positions of the nodes the assignment's units put in ``precision`` (not pinned)."""
        out: set[int] = set()
        for unit in assignment.units_at(precision):
            nodes = self._unit_nodes.get(unit)
            if nodes is None:
                known = ", ".join(list(self._unit_nodes)[:5])
                raise KeyError(
                    f"Unknown unit {unit!r} in the assignment (units look like: {known}, ...)"
                )
            out.update(self._pos[n] for n in nodes)
        return out - self._pinned_pos

    def apply(self, assignment: PrecisionAssignment) -> tuple[onnx.ModelProto, ConversionReport]:
        """Returns the mixed-precision model for ``assignment`` and what the rewrite did.

        The pipeline, one pass over the nodes in graph order:

        1. :meth:`_low_positions`: the nodes the assignment's units put in FP16 or BF16, less
           pinned ones, BF16 ones whose op the opset does not type BF16
           (``report.bf16_unsupported``) and those whose weights overflow
           (``report.forced_fp32``);
        2. :meth:`_runs_low`, for each node: its unit says so, or it is a data-movement
           follower whose live float inputs all have one low precision already (reading
           weights only: whose readers all run in one low precision);
        3. a low-precision node is written by :meth:`_write_low_node` (the inputs its schema
           types with the outputs read FP16/BF16, the outputs renamed ``<name>__fp16`` or
           ``<name>__bf16``, their value_info copied so typed), any other by
           :meth:`_write_fp32_node` (Shape, Size and Cast read a low-precision tensor
           directly). Both ask the call's :class:`_Rewrite` for each input in the precision
           they need; it inserts a Cast, or a low-precision copy of a weight, the first time
           a tensor is needed in another precision;
        4. every graph output is materialized in FP32 again;
        5. :meth:`_assemble`: the new model from the weightless template, with the
           initializers the new graph reads (their FP16 copies included); an unchanged copy
           when no node runs FP16.
        """
        model, report, _ = self._rewrite(assignment, weights=True)
        return model, report

    def apply_skeleton(
        self, assignment: PrecisionAssignment
    ) -> tuple[onnx.ModelProto, ConversionReport]:
        """Like :meth:`apply`, without the initializers: for what reads only the graph.

        The skeleton has every node and value_info of the rewrite; no weight is copied or
        converted for it (only their conversion losses are computed, once).
        """
        model, report, _ = self._rewrite(assignment, weights=False)
        return model, report

    def apply_streamed(
        self, assignment: PrecisionAssignment
    ) -> tuple[onnx.ModelProto, Iterator[onnx.TensorProto], ConversionReport]:
        """Like :meth:`apply`, as the skeleton and its initializers made one at a time.

        For :func:`~amp_search.graph.save_model`'s ``initializers``: the rewrite is written
        without ever being held whole (the same file as ``save_model`` of :meth:`apply`'s
        model when that goes to external data, as models over 2 GiB do).
        """
        model, report, names = self._rewrite(assignment, weights=False)
        return model, (self._weight(n) for n in names), report

    def _rewrite(
        self, assignment: PrecisionAssignment, *, weights: bool
    ) -> tuple[onnx.ModelProto, ConversionReport, list[str]]:
        """:meth:`apply`'s pipeline; also the names of the rewrite's initializers, in order."""
        report = ConversionReport()
        low_pos = self._low_positions(assignment, report)
        rw = _Rewrite(self, report)
        for i, node in enumerate(self.model.graph.node):
            elem = self._runs_low(i, low_pos, rw)
            if elem and self._params[i].convertible:
                self._write_low_node(i, node, rw, elem)
            else:
                self._write_fp32_node(i, node, rw)
        for name in self.index.graph_outputs:
            rw.need_fp32(name)
        return self._assemble(rw, weights)

    def _low_positions(
        self, assignment: PrecisionAssignment, report: ConversionReport
    ) -> dict[int, int]:
        """Node position -> FP16/BF16 element type, for the assignment's low-precision nodes.

        BF16 is withheld from nodes whose op the opset does not type BF16; weights that
        overflow the node's type keep it FP32.
        """
        low_pos: dict[int, int] = dict.fromkeys(
            self.node_positions(assignment, Precision.FP16), FLOAT16
        )
        if assignment.bf16_units:
            for i in self.node_positions(assignment, Precision.BF16):
                low_pos.setdefault(i, BFLOAT16)
        idx = self.index
        graph = self.model.graph
        for i in sorted(low_pos):
            elem = low_pos[i]
            node = graph.node[i]
            if elem == BFLOAT16 and self._params[i].convertible and not self.admits_bf16(i):
                del low_pos[i]
                report.bf16_unsupported.append(node.name)
                continue
            params = self._params[i] if elem == FLOAT16 else self.bf16_params(i) or NodeParams()
            # Weights that overflow the node's type keep it FP32.
            for k in params.inputs:
                name = node.input[k]
                if idx.is_initializer(name) and self._low_loss(name, elem).n_overflow:
                    del low_pos[i]
                    report.forced_fp32.append(node.name)
                    break
        return low_pos

    def _runs_low(self, i: int, low_pos: dict[int, int], rw: _Rewrite) -> int:
        """Node ``i``'s low-precision type (0: FP32): its unit's, or a follower's data's."""
        params = self._params[i]
        ins, outs, op = self._ins[i], self._outs[i], self._ops[i]
        elem = low_pos.get(i, 0)
        follows = op in FOLLOWER_OPS and i not in self._pinned_pos
        if not elem and follows and params.convertible:
            live = [ins[k] for k in params.inputs if ins[k] not in self._is_init]
            if live:  # every live input native in one low precision
                kinds = {rw.native.get(n, 0) for n in live}
            else:  # constant data movement (Reshape of a weight): low if read so
                readers = [r for o in outs for r in self.index.consumers.get(o, [])]
                kinds = {low_pos.get(r, 0) for r in readers} or {0}
            elem = kinds.pop() if len(kinds) == 1 else 0
            if elem == BFLOAT16 and not self.admits_bf16(i):
                elem = 0
        return elem

    def _write_low_node(self, i: int, node: onnx.NodeProto, rw: _Rewrite, elem: int) -> None:
        """Node ``i`` in FP16/BF16: switched inputs read so, outputs renamed with the suffix."""
        params = self._params[i] if elem == FLOAT16 else self.bf16_params(i) or NodeParams()
        ins, outs = self._ins[i], self._outs[i]
        new = onnx.NodeProto()
        new.CopyFrom(node)
        switch_in = set(params.inputs)
        names = rw.low_name[elem]
        for k, name in enumerate(ins):
            if not name:
                continue
            got = rw.need_low(name, elem) if k in switch_in else rw.need_fp32(name)
            new.input[k] = got
            rw.read.add(got)
        for k in params.outputs:
            name = outs[k]
            if not name:
                continue
            low = name + _SUFFIX[elem]
            new.output[k] = low
            names[name] = low
            rw.native[name] = elem
            vi = self._value_info.get(name)
            if vi is not None:
                hvi = onnx.ValueInfoProto()
                hvi.CopyFrom(vi)
                hvi.name = low
                hvi.type.tensor_type.elem_type = elem
                rw.new_vi.append(hvi)
        for i_out, name in enumerate(outs):
            if name and i_out not in params.outputs and name in self._value_info:
                rw.new_vi.append(self._value_info[name])
        for ref in self.index.outer_refs.get(i, ()):
            rw.need_fp32(ref)
        rw.read |= self._sub_refs[i]
        rw.new_nodes.append(new)
        if elem == FLOAT16:
            rw.report.fp16_nodes.append(self._names[i])
        else:
            rw.report.bf16_nodes.append(self._names[i])

    def _write_fp32_node(self, i: int, node: onnx.NodeProto, rw: _Rewrite) -> None:
        """Node ``i`` as it is (FP32, or nothing to switch); Shape/Size/Cast may read FP16."""
        ins, outs, op = self._ins[i], self._outs[i], self._ops[i]
        elem = rw.native.get(ins[0], 0) if ins else 0
        # Shape, Size and Cast type bfloat16 from opset 13 on.
        if op in _TYPE_AGNOSTIC_READERS and elem and (elem == FLOAT16 or self.index.opset >= 13):
            new = onnx.NodeProto()
            new.CopyFrom(node)
            new.input[0] = rw.low_name[elem][ins[0]]
            rw.read.add(new.input[0])
            for name in ins[1:]:
                if name:
                    rw.read.add(rw.need_fp32(name))
            rw.new_nodes.append(new)
        else:
            for name in ins:
                if name:
                    rw.read.add(rw.need_fp32(name))
            for ref in self.index.outer_refs.get(i, ()):
                rw.need_fp32(ref)
            rw.read |= self._sub_refs[i]
            rw.new_nodes.append(node)
        for name in outs:
            if name in self._value_info:
                rw.new_vi.append(self._value_info[name])

    def _assemble(
        self, rw: _Rewrite, weights: bool
    ) -> tuple[onnx.ModelProto, ConversionReport, list[str]]:
        """The new model (without ``weights``: a skeleton), the report, the initializers' names."""
        report, graph = rw.report, self.model.graph
        if not report.fp16_nodes and not report.bf16_nodes:
            names = [t.name for t in graph.initializer]
            if not weights:
                return copy_without_initializers(self.model), report, names
            out = onnx.ModelProto()
            out.CopyFrom(self.model)
            return out, report, names

        out = self._skeleton(rw.new_nodes, rw.new_vi)
        names = [*(t.name for t in graph.initializer if t.name in rw.read), *rw.new_inits]
        if weights:
            out.graph.initializer.extend(t for t in graph.initializer if t.name in rw.read)
            out.graph.initializer.extend(self._low_initializer(*rw.new_inits[n])
                                         for n in rw.new_inits)  # fmt: skip
        return out, report, names

    def apply_serialized(
        self, assignment: PrecisionAssignment
    ) -> tuple[list[bytes], onnx.ModelProto, ConversionReport]:
        """Like :meth:`apply`, but returns the model as byte chunks plus a weightless skeleton.

        Joined (or written one after the other), the chunks are the serialized model. They
        reuse cached encodings of the initializers (protobuf merges a repeated ``graph``
        field), so no weight is copied per trial: for MiniLM's 90 MB of weights the graph
        work stays ~15 ms instead of ~60 ms of message copies (without ``cache_weights``,
        each is encoded again). The skeleton is :meth:`apply_skeleton`'s. Models above
        2 GiB cannot be serialized this way: use :meth:`apply_streamed` and
        :func:`~amp_search.graph.save_model` (external data).
        """
        model, report, names = self._rewrite(assignment, weights=False)
        if not report.fp16_nodes and not report.bf16_nodes:
            return [self.model.SerializeToString()], model, report
        body = [self._encoded(n) for n in names]
        header = _field_header(7, sum(len(b) for b in body))
        return [model.SerializeToString(), header, *body], model, report

    def _encoded(self, name: str) -> bytes:
        enc = self._encoded_inits.get(name)
        if enc is None:
            enc = _field(5, self._weight(name).SerializeToString())
            if self.cache_weights:
                self._encoded_inits[name] = enc
        return enc

    def _skeleton(
        self, nodes: list[onnx.NodeProto], value_info: list[onnx.ValueInfoProto]
    ) -> onnx.ModelProto:
        out = onnx.ModelProto()
        out.CopyFrom(self._template)
        out.graph.node.extend(nodes)
        seen: set[str] = set()
        for vi in value_info:
            if vi.name not in seen and vi.name not in self.index.graph_outputs:
                seen.add(vi.name)
                out.graph.value_info.append(vi)
        return out


class _Rewrite:
    """The graph one :meth:`MixedPrecisionRewriter.apply` call is writing, and its Casts."""

    def __init__(self, rewriter: MixedPrecisionRewriter, report: ConversionReport) -> None:
        self.rewriter = rewriter
        self.report = report
        self.new_nodes: list[onnx.NodeProto] = []
        # element type -> {tensor -> its FP16/BF16 version (native, a weight's copy or a Cast)}
        self.low_name: dict[int, dict[str, str]] = {FLOAT16: {}, BFLOAT16: {}}
        self.fp16_name = self.low_name[FLOAT16]
        self.native: dict[str, int] = {}  # tensor -> the low type an FP16/BF16 node made it in
        self.materialized: set[str] = set()  # low-produced tensors whose FP32 name exists again
        self.new_inits: dict[str, tuple[str, int]] = {}  # weight copy -> (weight, type)
        self.new_vi: list[onnx.ValueInfoProto] = []
        self.read: set[str] = set(rewriter._graph_input_names)  # names the new graph reads

    def need_fp32(self, name: str) -> str:
        """``name`` as an FP32 tensor (a Cast back from FP16/BF16 the first time it is needed)."""
        elem = self.native.get(name)
        if elem and name not in self.materialized:
            self.new_nodes.append(_cast(self.low_name[elem][name], name, FLOAT))
            self.report.casts_inserted += 1
            self.materialized.add(name)
        return name

    def need_fp16(self, name: str) -> str:
        """The FP16 version of ``name``: native, a weight's FP16 copy, or a new Cast."""
        return self.need_low(name, FLOAT16)

    def need_low(self, name: str, elem: int) -> str:
        """The FP16 or BF16 (``elem``) version of ``name``: native, a weight's copy, or Casts.

        A tensor native in the other low precision goes through its FP32 name first.
        """
        names = self.low_name[elem]
        if name in names:
            return names[name]
        low = name + _SUFFIX[elem]
        if self.rewriter.index.is_initializer(name):  # the copy is made when assembled
            loss = self.rewriter._low_loss(name, elem)
            self.new_inits[low] = (name, elem)
            if elem == FLOAT16:
                self.report.initializers.append(loss)
            else:
                self.report.bf16_initializers.append(loss)
            names[name] = low
            return low
        self.new_nodes.append(_cast(self.need_fp32(name), low, elem))
        self.report.casts_inserted += 1
        names[name] = low
        return low


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field: tag, varint length, payload."""
    return _field_header(number, len(payload)) + payload


def _field_header(number: int, size: int) -> bytes:
    """The tag and varint length of a length-delimited protobuf field of ``size`` bytes."""
    key = (number << 3) | 2
    n = size
    length = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            length.append(byte | 0x80)
        else:
            length.append(byte)
            break
    return bytes([key]) + bytes(length)


def _all_refs(graph: onnx.GraphProto) -> set[str]:
    """Every name a subgraph's nodes read, nested subgraphs' included."""
    refs: set[str] = set()
    for n in graph.node:
        refs.update(n.input)
        for g in subgraphs(n):
            refs |= _all_refs(g)
    return refs


def _cast(src: str, dst: str, to: int) -> onnx.NodeProto:
    suffix = CAST_SUFFIX.get(to, CAST_SUFFIX[FLOAT])
    return helper.make_node("Cast", [src], [dst], name=f"{CAST_PREFIX}{src}{suffix}", to=to)


def apply_assignment(
    model: onnx.ModelProto,
    assignment: PrecisionAssignment | dict[str, Precision | str],
) -> onnx.ModelProto:
    """Returns a new mixed-precision model; ``model`` is not modified.

    Args:
        model: A sanitized model (:func:`amp_search.graph.sanitize`).
        assignment: Unit name -> precision; units not named stay FP32.
    """
    if not isinstance(assignment, PrecisionAssignment):
        assignment = PrecisionAssignment.from_mapping(assignment)
    return MixedPrecisionRewriter(model).apply(assignment)[0]


def _float_weight_bytes(model: onnx.ModelProto) -> int:
    """The bytes of ``model``'s FP32 initializers, from their shapes (no data read)."""
    return sum(tensor_nbytes(t) for t in model.graph.initializer if t.data_type == FLOAT)
