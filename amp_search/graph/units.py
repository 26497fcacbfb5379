"""Units: the decision variables of the search.

A unit is a group of main-graph nodes that switch precision together. By default one unit is
one layer: a compute node (Conv, MatMul, Gemm, a normalization, Softmax, a reduction, an
LSTM/GRU/RNN) with the pointwise nodes that follow it and read nothing else but constants
(bias Add, BatchNormalization, activation, HardSwish's Mul), which TensorRT fuses anyway. A
pointwise node fed by several units (a residual Add) is a unit of its own. A unit is named
after its first node, a stable name the Optuna parameter reuses across runs.

Shape and index computations are never units and never change type. Data-movement nodes
(Reshape, Transpose, Concat, Resize, pooling, ...) are not units: they *follow* their inputs
and run in FP16 when every float input they read is produced in FP16 (see
``graph/precision.py``). Nodes that own subgraphs (If/Loop/Scan) and everything inside them
stay as they are.

Nothing stays FP32 silently: :func:`not_searched` lists the float computation that is no
decision variable (an op the search does not switch, a subgraph, a node pinned FP32 for the
target), grouped by op and reason, with the share of the model's float weights it holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from amp_search.errors import UserInputError
from amp_search.graph._index import FLOAT, GraphIndex, subgraphs
from amp_search.graph.op_types import OP_TYPING

__all__ = [
    "COMPUTE_OPS",
    "FOLLOWER_OPS",
    "POINTWISE_OPS",
    "NotSearched",
    "Unit",
    "find_units",
    "group_units",
    "load_units",
    "not_searched",
]

#: Ops that read or write floats without computing on them (never reported as left out).
_NOT_COMPUTE = frozenset({"Shape", "Size", "Cast", "CastLike", "Constant", "ConstantOfShape",
                          "NonZero", "Range", "EyeLike", "RandomNormalLike", "RandomUniformLike",
                          "IsNaN", "IsInf", "Equal", "Less", "Greater", "LessOrEqual",
                          "GreaterOrEqual", "ArgMax", "ArgMin", "TopK"})  # fmt: skip
#: A reader in :attr:`Unit.readers` that is no unit's (a non-unit node, a graph output).
_NO_UNIT = ""

#: Ops that start a unit.
COMPUTE_OPS = frozenset(
    {
        "Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum",
        "InstanceNormalization", "LayerNormalization",
        "GroupNormalization", "LpNormalization", "MeanVarianceNormalization", "LRN",
        "Softmax", "LogSoftmax", "Hardmax",
        "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2",
        "ReduceLogSum", "ReduceLogSumExp", "ReduceProd", "ReduceMax", "ReduceMin",
        "GlobalAveragePool", "AveragePool", "GlobalLpPool", "LpPool", "CumSum",
        "Attention", "RMSNormalization",
        # Recurrent layers: W, R, B and initial states switch with X (type T); sequence_lens
        # (T1, int32) stays. ONNX Runtime's CUDA EP and TensorRT run them in FP16.
        "LSTM", "GRU", "RNN",
        # ONNX Runtime's fused transformer ops (typed by graph/op_types.py): attention,
        # the fused layer norms, the embedding, and MatMul with transposes folded in.
        "MultiHeadAttention", "GroupQueryAttention", "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
        "EmbedLayerNormalization", "FusedMatMul", "TransposeMatMul", "FusedConv", "FusedGemm",
    }
)  # fmt: skip

#: Element-wise math: joins the unit that feeds it, or forms its own.
POINTWISE_OPS = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Exp", "Log", "Reciprocal", "Neg", "Abs",
        "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip",
        "Erf", "Gelu", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "ThresholdedRelu",
        "Min", "Max", "Sum", "Mean", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "Where",
        "Swish", "BatchNormalization",
        # ONNX Runtime's fused activations (com.microsoft; Gelu is also ONNX's, opset 20).
        "FastGelu", "BiasGelu", "QuickGelu", "BiasSplitGelu", "BiasAdd", "RotaryEmbedding",
    }
)  # fmt: skip

#: Data movement: runs FP16 when every float input it reads is FP16, never a unit.
FOLLOWER_OPS = frozenset(
    {
        "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Split",
        "Slice", "Gather", "GatherElements", "GatherND", "Expand", "Tile", "Pad", "Identity",
        "Resize", "Upsample", "MaxPool", "GlobalMaxPool", "DepthToSpace", "SpaceToDepth",
        "ReverseSequence", "Dropout",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Unit:
    """One decision variable.

    Attributes:
        name: Stable name (the first node's name); the Optuna parameter name.
        nodes: Names of the nodes it switches, in graph order.
        op_types: Their op types, in the same order.
        outputs: Float tensors the unit produces that something outside it reads (or graph
            outputs): what the profiler compares between FP32 and FP16.
        weights: Float initializers the unit reads through switchable inputs.
        tensors: Every float tensor its nodes produce, internal ones included (an overflow
            inside a fused chain matters as much as one at its end).
        inputs: Float tensors it reads from outside (not weights).
        feeders: Units whose outputs reach it, directly or through non-unit nodes.
        readers: For each of ``outputs``, what reads it outside the unit: the names of the
            units whose nodes read it directly, and ``""`` for a reader that is no unit's (a
            non-unit node, a node owning a subgraph) or for a graph output. What
            :func:`group_units` needs to keep only the tensors that cross a group's boundary;
            empty when not known (a unit built by hand), every output then counting as read
            outside.
    """

    name: str
    nodes: tuple[str, ...]
    op_types: tuple[str, ...]
    outputs: tuple[str, ...]
    weights: tuple[str, ...]
    tensors: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    feeders: tuple[str, ...] = ()
    readers: tuple[tuple[str, ...], ...] = ()

    @property
    def kind(self) -> str:
        """The op type of its first node (``Conv``, ``MatMul``, ``Add``, ...)."""
        return self.op_types[0]


def find_units(model: onnx.ModelProto, index: GraphIndex | None = None) -> list[Unit]:
    """Lists the units of a sanitized model, in graph order.

    Args:
        model: A model returned by :func:`amp_search.graph.sanitize`.
        index: Its :class:`GraphIndex`, if already built.
    """
    idx = index or GraphIndex.build(model)
    nodes = model.graph.node
    unit_of: dict[int, int] = {}  # node position -> unit id
    groups: list[list[int]] = []
    for i, node in enumerate(nodes):
        if node.op_type not in COMPUTE_OPS and node.op_type not in POINTWISE_OPS:
            continue
        params = idx.params(i)
        if not params.convertible:
            continue
        if node.op_type in POINTWISE_OPS:
            feeding = {
                unit_of.get(idx.producer.get(node.input[k], -1), -1)
                for k in params.inputs
                if not idx.is_initializer(node.input[k])
            }
            if len(feeding) == 1 and -1 not in feeding:
                (u,) = feeding
                if _only_feeds_unit(idx, groups[u], i, unit_of, u):
                    unit_of[i] = u
                    groups[u].append(i)
                    continue
        unit_of[i] = len(groups)
        groups.append([i])

    # Which units each tensor comes from, looking through non-unit nodes.
    source: dict[str, frozenset[int]] = {}
    for i, node in enumerate(nodes):
        if i in unit_of:
            src = frozenset({unit_of[i]})
        else:
            src = frozenset().union(*(source.get(x, frozenset()) for x in node.input if x))
        for o in node.output:
            if o:
                source[o] = src

    names = [nodes[members[0]].name for members in groups]
    units: list[Unit] = []
    feeder_ids: list[list[int]] = []
    for uid, members in enumerate(groups):
        member_set = set(members)
        outputs: list[str] = []
        readers: list[tuple[str, ...]] = []
        weights: list[str] = []
        tensors: list[str] = []
        inputs: list[str] = []
        produced = {o for i in members for o in nodes[i].output}
        for i in members:
            node = nodes[i]
            params = idx.params(i)
            for k in params.outputs:
                name = node.output[k]
                tensors.append(name)
                outside = [r for r in idx.consumers.get(name, []) if r not in member_set]
                if name in idx.graph_outputs or outside:
                    outputs.append(name)
                    who = [names[unit_of[r]] if r in unit_of else _NO_UNIT for r in outside]
                    if name in idx.graph_outputs:
                        who.append(_NO_UNIT)
                    readers.append(tuple(dict.fromkeys(who)))
            for k in params.inputs:
                name = node.input[k]
                if idx.is_initializer(name):
                    if name not in weights:
                        weights.append(name)
                elif name not in produced and name not in inputs:
                    inputs.append(name)
        units.append(
            Unit(
                name=nodes[members[0]].name,
                nodes=tuple(nodes[i].name for i in members),
                op_types=tuple(nodes[i].op_type for i in members),
                outputs=tuple(outputs),
                weights=tuple(weights),
                tensors=tuple(tensors),
                inputs=tuple(inputs),
                readers=tuple(readers),
            )
        )
        feeder_ids.append(sorted({g for x in inputs for g in source.get(x, frozenset())} - {uid}))
    return [
        Unit(**{**u.__dict__, "feeders": tuple(names[g] for g in ids)})
        for u, ids in zip(units, feeder_ids, strict=True)
    ]


def _only_feeds_unit(
    idx: GraphIndex, members: list[int], candidate: int, unit_of: dict[int, int], u: int
) -> bool:
    """Whether the unit's tensors the candidate reads are read by nothing outside the unit.

    Keeps a unit a chain (Conv -> Add -> Relu, or x -> HardSigmoid -> Mul(x, .)) rather than
    swallowing a pointwise node that sits beside a branch.
    """
    node = idx.model.graph.node[candidate]
    for name in node.input:
        p = idx.producer.get(name)
        if p is None or unit_of.get(p) != u:
            continue
        for reader in idx.consumers.get(name, []):
            if reader == candidate or unit_of.get(reader) == u:
                continue
            # A reader later in the graph that is not (yet) in the unit: allowed only if it
            # too is a pointwise node fed by this unit alone (HardSwish's two readers).
            r_node = idx.model.graph.node[reader]
            if r_node.op_type not in POINTWISE_OPS:
                return False
            others = {
                unit_of.get(idx.producer.get(x, -1), -1)
                for x in r_node.input
                if x and not idx.is_initializer(x) and x != name
            }
            if others - {u, -1} or (reader not in (candidate,) and reader < candidate):
                return False
    return True


def group_units(units: list[Unit], max_units: int) -> list[Unit]:
    """Merges consecutive units (graph order) into at most ``max_units`` groups.

    Coarser decision variables keep models with hundreds of layers searchable. Groups are
    contiguous runs of units of about equal size; a group is named ``g<k>:<first unit>``
    (stable for a given model and ``max_units``).

    A group is a unit like any other: its ``inputs`` are its members' inputs that no member
    produces, its ``outputs`` its members' outputs that something outside the group reads
    (a unit of another group, a non-unit node) or that are graph outputs, as the members'
    ``readers`` tell; the tensors passed between members stay in ``tensors`` only. (A member
    without ``readers`` keeps all its outputs.)
    """
    if max_units < 1:
        raise ValueError(f"max_units must be at least 1, got {max_units}")
    if len(units) <= max_units:
        return list(units)
    bounds = [round(i * len(units) / max_units) for i in range(max_units + 1)]
    group_of = {
        u.name: f"g{k:02d}:{units[bounds[k]].name}"
        for k in range(max_units)
        for u in units[bounds[k] : bounds[k + 1]]
    }
    groups: list[Unit] = []
    for k in range(max_units):
        members = units[bounds[k] : bounds[k + 1]]
        if not members:
            continue
        name = f"g{k:02d}:{members[0].name}"
        outputs: list[str] = []
        readers: list[tuple[str, ...]] = []
        for u in members:
            known = len(u.readers) == len(u.outputs)
            for j, o in enumerate(u.outputs):
                who = u.readers[j] if known else (_NO_UNIT,)
                # Readers as groups; a reader of no unit is outside every group.
                outside = tuple(
                    dict.fromkeys(
                        _NO_UNIT if r == _NO_UNIT else group_of.get(r, _NO_UNIT) for r in who
                    )
                )
                outside = tuple(r for r in outside if r != name)
                if outside:
                    outputs.append(o)
                    readers.append(outside)
        produced = {t for u in members for t in u.tensors}
        groups.append(
            Unit(
                name=name,
                nodes=tuple(n for u in members for n in u.nodes),
                op_types=tuple(o for u in members for o in u.op_types),
                outputs=tuple(outputs),
                weights=tuple(dict.fromkeys(w for u in members for w in u.weights)),
                tensors=tuple(t for u in members for t in u.tensors),
                inputs=tuple(
                    dict.fromkeys(i for u in members for i in u.inputs if i not in produced)
                ),
                feeders=tuple(
                    dict.fromkeys(
                        group_of[f] for u in members for f in u.feeders if group_of[f] != name
                    )
                ),
                readers=tuple(readers),
            )
        )
    return groups


@dataclass(frozen=True)
class NotSearched:
    """Float computation of one op and one reason that no unit covers.

    Attributes:
        op_type: The op (``domain:op`` outside the default domain).
        reason: Why it is not searched.
        nodes: How many nodes.
        weights: Float weight elements they read (subgraph bodies included).
        weight_share: That as a share of the model's float weight elements.
        flops: Their FLOPs for the calibration shapes (None: not worked out).
        flops_share: That as a share of the model's FLOPs (None: not worked out).
    """

    op_type: str
    reason: str
    nodes: int
    weights: int
    weight_share: float
    flops: float | None = None
    flops_share: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain-data form."""
        out: dict[str, Any] = {"op_type": self.op_type, "reason": self.reason,
                               "nodes": self.nodes, "weights": self.weights,
                               "weight_share": round(self.weight_share, 6)}  # fmt: skip
        if self.flops is not None and self.flops_share is not None:
            out["flops"] = self.flops
            out["flops_share"] = round(self.flops_share, 6)
        return out

    def __str__(self) -> str:
        share = f"{self.weight_share:.1%} of the weights"
        if self.flops_share is not None:
            share += f", {self.flops_share:.1%} of the FLOPs"
        return f"{self.nodes} {self.op_type} ({share}): {self.reason}"


def not_searched(
    model: onnx.ModelProto,
    units: list[Unit],
    pinned: dict[str, str] | None = None,
    index: GraphIndex | None = None,
    flops: Mapping[str, float] | None = None,
) -> list[NotSearched]:
    """The float computation of ``model`` that no unit switches, largest share first.

    Grouped by op and reason: an op the search does not switch, a node pinned FP32 for the
    target, or a node inside the subgraph of an If/Loop/Scan (bodies are walked, nested ones
    too; such a node is reported under the main-graph node that owns its body).

    Args:
        model: The sanitized model.
        units: Its units (grouped or not).
        pinned: Nodes kept FP32 for the target, with the reason.
        index: Its :class:`GraphIndex`, if already built.
        flops: FLOPs by node name, subgraph bodies' nodes included
            (:func:`amp_search.latency_model.node_flops`): adds each group's share of the
            model's FLOPs (the main graph's nodes, a body's owner counting its body).
    """
    idx = index or GraphIndex.build(model)
    pinned = pinned or {}
    in_units = {n for u in units for n in u.nodes}
    sizes = {name: _numel(t) for name, t in idx.initializers.items() if t.data_type == FLOAT}
    total = sum(sizes.values()) + sum(
        _body_weights(g) for n in model.graph.node for g in subgraphs(n)
    )
    # (op, reason or owner op) -> [nodes, weights, flops, owners of the bodies]
    groups: dict[tuple[str, str], list[Any]] = {}

    def add(op: str, key: str, node: onnx.NodeProto, weights: int, owner: str = "") -> None:
        entry = groups.setdefault((op, key), [0, 0, 0.0, []])
        entry[0] += 1
        entry[1] += weights
        entry[2] += flops.get(node.name, 0.0) if flops is not None else 0.0
        if owner and owner not in entry[3]:
            entry[3].append(owner)

    for node in model.graph.node:
        op = _op_name(node)
        bodies = subgraphs(node)
        floats = any(idx.is_float(x) for x in [*node.input, *node.output] if x)
        plain = node.op_type in FOLLOWER_OPS or op in _NOT_COMPUTE or not floats
        if node.name in pinned:
            reason = f"pinned FP32: {pinned[node.name]}"
        elif bodies:
            outer = {n: int(FLOAT) for n in idx.elem_type if idx.is_float(n)}
            for inner, weights in _body_compute(node, outer, sizes):
                add(_op_name(inner), f"{_SUBGRAPH}{node.op_type}", inner, weights, node.name)
            continue
        elif node.name in in_units or plain:
            continue
        elif node.domain not in ("", "ai.onnx") and (node.domain, node.op_type) not in OP_TYPING:
            reason = f"ops of domain {node.domain} are not searched"
            if node.domain == "com.microsoft":
                reason = "an ONNX Runtime op with no typing rule here (graph/op_types.py)"
        elif node.op_type in COMPUTE_OPS or node.op_type in POINTWISE_OPS:
            reason = "its schema at this opset has no FP16 form"
        else:
            reason = "not a searched op"
        add(op, reason, node, sum(sizes.get(x, 0) for x in node.input))
    total_flops = sum(flops.get(n.name, 0.0) for n in model.graph.node) if flops else 0.0
    out = []
    for (op, key), (n, w, f, owners) in groups.items():
        reason = _subgraph_reason(key[len(_SUBGRAPH) :], owners) if owners else key
        share = f / total_flops if total_flops > 0 else (0.0 if flops is not None else None)
        out.append(NotSearched(op, reason, n, w, w / max(total, 1),
                               f if flops is not None else None, share))  # fmt: skip
    return sorted(out, key=lambda x: (-max(x.weight_share, x.flops_share or 0.0), -x.nodes,
                                      x.op_type, x.reason))  # fmt: skip


_SUBGRAPH = "subgraph:"


def _op_name(node: onnx.NodeProto) -> str:
    """The op as reported: ``domain:op`` outside the default domain."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"


def _subgraph_reason(owner_op: str, owners: list[str]) -> str:
    if len(owners) == 1:
        return f"inside a subgraph of {owner_op} {owners[0]!r}: bodies stay as they are"
    shown = ", ".join(repr(o) for o in owners[:3]) + (", ..." if len(owners) > 3 else "")
    return f"inside subgraphs of {len(owners)} {owner_op} nodes ({shown}): bodies stay as they are"


def _body_compute(
    owner: onnx.NodeProto, outer: Mapping[str, int], sizes: Mapping[str, int]
) -> list[tuple[onnx.NodeProto, int]]:
    """The float compute nodes in a node's subgraphs (nested ones too), with their weights.

    A body tensor's type comes from the body's declarations (shape inference states them),
    else from the enclosing scopes; a compute op whose tensors are all untyped counts as float
    (MatMul, Conv, ... on integers are rare).
    """
    found: list[tuple[onnx.NodeProto, int]] = []
    for g in subgraphs(owner):
        types: dict[str, int] = dict(outer)
        weights: dict[str, int] = dict(sizes)
        for t in g.initializer:
            types[t.name] = t.data_type
            if t.data_type == FLOAT:
                weights[t.name] = _numel(t)
        for vi in [*g.input, *g.output, *g.value_info]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types[vi.name] = vi.type.tensor_type.elem_type
        for node in g.node:
            if subgraphs(node):
                found.extend(_body_compute(node, types, weights))
                continue
            tensors = [x for x in [*node.input, *node.output] if x]
            known = [types[x] for x in tensors if x in types]
            floats = FLOAT in known
            compute = node.op_type in COMPUTE_OPS or node.op_type in POINTWISE_OPS
            plain = node.op_type in FOLLOWER_OPS or _op_name(node) in _NOT_COMPUTE
            if not plain and (floats or (compute and not known)):
                found.append((node, sum(weights.get(x, 0) for x in node.input)))
    return found


def _numel(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= int(d)
    return n


def _body_weights(graph: onnx.GraphProto) -> int:
    """The FP32 weights a subgraph holds, nested subgraphs' included (element count)."""
    total = sum(_numel(t) for t in graph.initializer if t.data_type == FLOAT)
    for n in graph.node:
        total += sum(_body_weights(g) for g in subgraphs(n))
    return total


def load_units(
    path: Path, max_units: int | None = None, *, purpose: str = "search"
) -> tuple[onnx.ModelProto, list[Unit]]:
    """The model as the search sees it: loaded, sanitized, its units (grouped to ``max_units``).

    The one way ``search``, ``inspect`` and the benchmarks prepare a model, before any data is
    read.

    Raises:
        UserInputError: The model has no unit (no float computation to run in FP16); the
            message ends "nothing to ``purpose``".
    """
    from amp_search.graph.io import load_model
    from amp_search.graph.sanitize import sanitize

    model = sanitize(load_model(path))
    units = find_units(model)
    if not units:
        raise UserInputError(
            f"{path.name} has no float computation that could run in FP16: nothing to {purpose}."
        )
    if max_units:
        units = group_units(units, max_units)
    return model, units
