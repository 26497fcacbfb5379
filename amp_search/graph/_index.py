"""A read-only index over a sanitized ONNX graph: types, producers, consumers, schemas.

Everything the unit finder, the rewrite and the profiler need to ask about the main graph,
computed once per model. Nested subgraphs (If/Loop/Scan bodies) are opaque: the nodes that
own them are indexed with the outer names their bodies read.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx
from onnx import TensorProto

from amp_search.graph.op_types import op_typing

__all__ = ["BFLOAT16", "FLOAT", "FLOAT16", "GraphIndex", "NodeParams", "subgraphs"]

FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16
BFLOAT16 = TensorProto.BFLOAT16

_FP16_TYPE = "tensor(float16)"
_FP32_TYPE = "tensor(float)"
_BF16_TYPE = "tensor(bfloat16)"

# Type variables that appear only on auxiliary inputs and stay FP32 even when the node runs
# in FP16 (the spec allows FP16 there, but kernels rarely have it).
_AUX_TYPE_VARS: dict[str, frozenset[str]] = {
    "Resize": frozenset({"T2"}),
    "Dropout": frozenset({"T1"}),
    "Upsample": frozenset(),
}


@dataclass(frozen=True)
class NodeParams:
    """Which inputs and outputs of a node switch to FP16 when the node does.

    Attributes:
        inputs: Positions of inputs that become FP16.
        outputs: Positions of outputs that become FP16.
    """

    inputs: tuple[int, ...] = ()
    outputs: tuple[int, ...] = ()

    @property
    def convertible(self) -> bool:
        """Whether the node has anything to convert."""
        return bool(self.outputs)


@dataclass
class GraphIndex:
    """Index of the main graph of a (sanitized, shape-inferred) model."""

    model: onnx.ModelProto
    elem_type: dict[str, int] = field(default_factory=dict)
    producer: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    initializers: dict[str, TensorProto] = field(default_factory=dict)
    graph_inputs: set[str] = field(default_factory=set)
    graph_outputs: list[str] = field(default_factory=list)
    outer_refs: dict[int, frozenset[str]] = field(default_factory=dict)
    opset: int = 0

    @classmethod
    def build(cls, model: onnx.ModelProto) -> GraphIndex:
        """Indexes ``model``'s main graph."""
        idx = cls(model=model)
        g = model.graph
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                idx.opset = int(imp.version)
        for vi in [*g.input, *g.output, *g.value_info]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                idx.elem_type[vi.name] = vi.type.tensor_type.elem_type
        for init in g.initializer:
            idx.initializers[init.name] = init
            idx.elem_type[init.name] = init.data_type
        idx.graph_inputs = {i.name for i in g.input if i.name not in idx.initializers}
        idx.graph_outputs = [o.name for o in g.output]
        for i, node in enumerate(g.node):
            for name in node.output:
                if name:
                    idx.producer[name] = i
            for name in node.input:
                if name:
                    idx.consumers[name].append(i)
            refs = _subgraph_outer_refs(node)
            if refs:
                idx.outer_refs[i] = refs
                for name in refs:
                    idx.consumers[name].append(i)
        return idx

    @property
    def nodes(self) -> list[onnx.NodeProto]:
        """The main graph's nodes, in order."""
        return list(self.model.graph.node)

    def is_float(self, name: str) -> bool:
        """Whether tensor ``name`` is float32."""
        return self.elem_type.get(name) == FLOAT

    def is_initializer(self, name: str) -> bool:
        """Whether ``name`` is a constant initializer (not overridable by a graph input)."""
        return name in self.initializers and name not in self.graph_inputs

    def params(self, i: int) -> NodeParams:
        """The FP16-convertible inputs/outputs of node ``i`` (by its op schema).

        ONNX's schemas type the default-domain ops; :mod:`amp_search.graph.op_types` types
        ONNX Runtime's fused ops (``com.microsoft`` Attention, SkipLayerNormalization, ...).
        """
        node = self.model.graph.node[i]
        return _node_params(
            node.op_type,
            node.domain,
            self.opset,
            tuple(self.elem_type.get(n, 0) if n else -1 for n in node.input),
            tuple(self.elem_type.get(n, 0) if n else -1 for n in node.output),
        )

    def bf16_params(self, i: int) -> NodeParams | None:
        """Which inputs/outputs of node ``i`` switch to BF16; None if the opset forbids it.

        Read from the op's schema at the model's opset (ONNX admitted ``tensor(bfloat16)``
        late for many ops: Conv and MaxPool only at opset 22). The outputs, and the inputs
        typed with them, must admit BF16; an input-only type variable that does not (Pow's
        exponent before opset 15) stays FP32. Below opset 13, where Cast has no bfloat16, and
        for ONNX Runtime's fused ops (no ONNX schema here) nothing is admitted.
        """
        node = self.model.graph.node[i]
        params = self.params(i)
        return _bf16_params(node.op_type, node.domain, self.opset, params)

    def bf16_opset(self, i: int) -> int | None:
        """The lowest opset, from the model's own on, at which node ``i`` would admit BF16.

        What a user must upgrade the model to for BF16 here (the rewrite never upgrades it);
        None where no opset this onnx knows admits it (ONNX Runtime's fused ops).
        """
        node = self.model.graph.node[i]
        params = self.params(i)
        for opset in range(max(self.opset, 13), onnx.defs.onnx_opset_version() + 1):
            if _bf16_params(node.op_type, node.domain, opset, params) is not None:
                return opset
        return None


@functools.lru_cache(maxsize=4096)
def _bf16_params(op_type: str, domain: str, opset: int, params: NodeParams) -> NodeParams | None:
    # Cast types bfloat16 from opset 13 on: below it no BF16 tensor can be made or read back.
    if not params.outputs or domain not in ("", "ai.onnx") or opset < 13:
        return None
    try:
        schema = onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return None
    constraints = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}

    def var_of(formals: Sequence[onnx.defs.OpSchema.FormalParameter], pos: int) -> str | None:
        if pos < len(formals):
            return formals[pos].type_str
        if formals and formals[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
            return formals[-1].type_str
        return None

    def admitted(var: str | None) -> bool:
        if var is None:
            return False
        allowed = constraints.get(var)
        return _BF16_TYPE in (allowed if allowed is not None else {var})

    out_vars = {var_of(schema.outputs, k) for k in params.outputs}
    if not all(admitted(v) for v in out_vars):
        return None
    ins: list[int] = []
    for k in params.inputs:
        var = var_of(schema.inputs, k)
        if admitted(var):
            ins.append(k)
        elif var in out_vars:
            return None
    return NodeParams(inputs=tuple(ins), outputs=params.outputs)


@functools.lru_cache(maxsize=4096)
def _node_params(
    op_type: str,
    domain: str,
    opset: int,
    in_types: tuple[int, ...],
    out_types: tuple[int, ...],
) -> NodeParams:
    if op_type in ("Cast", "CastLike"):
        return NodeParams()
    typing = op_typing(op_type, domain, opset)  # ONNX Runtime's fused ops: a table of ours
    if typing is not None:
        ins, outs = typing.switched(in_types, out_types)
        return NodeParams(inputs=ins, outputs=outs)
    if domain not in ("", "ai.onnx"):
        return NodeParams()
    try:
        schema = onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return NodeParams()
    constraints = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    aux = _AUX_TYPE_VARS.get(op_type, frozenset())

    def var_of(formals: Sequence[onnx.defs.OpSchema.FormalParameter], pos: int) -> str | None:
        if not formals:
            return None
        if pos < len(formals):
            return formals[pos].type_str
        last = formals[-1]
        if last.option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
            return last.type_str
        return None

    def switchable(var: str | None) -> bool:
        if var is None or var in aux:
            return False
        allowed = constraints.get(var) or set()
        return _FP16_TYPE in allowed and _FP32_TYPE in allowed

    out_vars = {var_of(schema.outputs, k) for k, t in enumerate(out_types) if t == FLOAT}
    out_vars = {v for v in out_vars if switchable(v)}
    if not out_vars:
        return NodeParams()
    ins = tuple(
        k for k, t in enumerate(in_types) if t == FLOAT and var_of(schema.inputs, k) in out_vars
    )
    # Switch every float input bound to a switchable type variable that also appears only
    # on inputs (e.g. BatchNormalization's T1/T2), so the node stays homogeneous.
    extra = tuple(
        k
        for k, t in enumerate(in_types)
        if t == FLOAT and k not in ins and switchable(var_of(schema.inputs, k))
    )
    outs = tuple(
        k for k, t in enumerate(out_types) if t == FLOAT and var_of(schema.outputs, k) in out_vars
    )
    return NodeParams(inputs=tuple(sorted(ins + extra)), outputs=outs)


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The subgraphs a node owns (If's branches, Loop's and Scan's body), in attribute order."""
    graphs: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attr.graphs)
    return graphs


def _subgraph_outer_refs(node: onnx.NodeProto) -> frozenset[str]:
    """Names a node's subgraphs read from enclosing scopes."""
    refs: set[str] = set()
    for g in subgraphs(node):
        defined = {i.name for i in g.input} | {i.name for i in g.initializer}
        for n in g.node:
            for name in n.input:
                if name and name not in defined:
                    refs.add(name)
            refs |= _subgraph_outer_refs(n) - defined
            defined.update(o for o in n.output if o)
    return frozenset(refs)
