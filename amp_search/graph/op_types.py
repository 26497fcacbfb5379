"""Typing rules of the ops ONNX's own schemas do not know: ONNX Runtime's fused operators.

ONNX Runtime's transformer optimizer (``onnxruntime.transformers.optimizer``) rewrites a
transformer into fused ``com.microsoft`` operators (Attention, SkipLayerNormalization,
BiasGelu, EmbedLayerNormalization, ...) and two ops it registers in the default domain
(SimplifiedLayerNormalization, and LayerNormalization below opset 17); a model saved by its
graph optimizer holds FusedConv and FusedGemm. ``onnx.defs`` has no
schema for them, so the rewrite could not tell which inputs and outputs switch to FP16 with
the node, and ONNX shape inference leaves their outputs (and everything after them) untyped.

:data:`OP_TYPING` holds, per op, the type variable of every input and output position as the
op's contrib schema states it (``onnxruntime/core/graph/contrib_ops``; a test checks this
table against ``onnxruntime.capi.onnxruntime_pybind11_state.get_all_operator_schema()``):

- the *switching* variables (``T``; also ``V`` of the layer norms, ``T_CACHE`` of
  GroupQueryAttention) follow the node: FP16 inputs, weights and outputs when it runs FP16;
- the *fixed* ones keep their type whatever the node runs in: ``U`` (the FP32 statistics
  ``mean``/``inv_std_var`` of the layer norms), ``M``/``T1`` (int32 ``mask_index``,
  ``past_sequence_length``, ``seqlens_k``, token ids), GroupQueryAttention's FP32 ``k_scale``/
  ``v_scale`` and int64 ``position_ids``, MultiHeadAttention's ``qk`` (kept FP32).

:func:`infer_shapes` is ONNX shape inference completed with these rules: it gives the
outputs of these ops their element types (and shapes where the rule is certain) and runs
ONNX inference again so that what follows them is typed too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import onnx
from onnx import TensorProto

__all__ = [
    "OP_TYPING",
    "OpTyping",
    "infer_shapes",
    "op_typing",
    "since_version",
]

FLOAT, FLOAT16, INT32, INT64 = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT32,
                                TensorProto.INT64)  # fmt: skip
_DEFAULT_DOMAINS = ("", "ai.onnx")
MS = "com.microsoft"

#: A dimension as shape inference states it: a size, a symbolic name, or unknown (None).
Dim = int | str | None
#: Shape rule: (node, shapes of its inputs by position (None: unknown)) -> the shape of
#: output 0 (None: unknown), or of several outputs by position.
ShapeRule = Callable[
    [onnx.NodeProto, Sequence["list[Dim] | None"]],
    "list[Dim] | dict[int, list[Dim]] | None",
]


@dataclass(frozen=True)
class OpTyping:
    """The typing of one op: a type variable per input and output position.

    Attributes:
        inputs: The type variable of each input position.
        outputs: The type variable of each output position.
        switch: Variables that follow the node's precision (FP32 or FP16 together).
        fixed: Variables with one type whatever the node runs in -> that element type.
        same_shape: Output positions shaped like input 0 (elementwise ops, norms).
        shape: Output 0's shape (or several outputs') from the inputs' shapes, where other
            rules apply.
    """

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    switch: frozenset[str] = frozenset({"T"})
    fixed: Mapping[str, int] = field(default_factory=dict)
    same_shape: tuple[int, ...] = ()
    shape: ShapeRule | None = None

    def switched(self, in_types: Sequence[int], out_types: Sequence[int]) -> tuple[
        tuple[int, ...], tuple[int, ...]
    ]:  # fmt: skip
        """Positions of FP32 inputs and outputs that switch to FP16 with the node."""
        outs = tuple(
            k for k, t in enumerate(out_types)
            if t == FLOAT and k < len(self.outputs) and self.outputs[k] in self.switch
        )  # fmt: skip
        if not outs:
            return (), ()
        ins = tuple(
            k for k, t in enumerate(in_types)
            if t == FLOAT and k < len(self.inputs) and self.inputs[k] in self.switch
        )  # fmt: skip
        return ins, outs

    def output_type(self, k: int, in_types: Sequence[int]) -> int:
        """Element type of output ``k`` given the inputs' types (0: unknown)."""
        if k >= len(self.outputs):
            return 0
        var = self.outputs[k]
        if var in self.fixed:
            return self.fixed[var]
        same = [t for v, t in zip(self.inputs, in_types, strict=False) if v == var and t > 0]
        if same:
            return same[0]
        # A switching variable seen only on outputs (T_CACHE without a past): the node's type.
        tied = [t for v, t in zip(self.inputs, in_types, strict=False)
                if v in self.switch and t > 0]  # fmt: skip
        return tied[0] if var in self.switch and tied else 0


def _attr(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    """An int attribute."""
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _ints(node: onnx.NodeProto, name: str) -> list[int]:
    """An ints attribute (empty when absent)."""
    return next((list(a.ints) for a in node.attribute if a.name == name), [])


def _product(*dims: Dim) -> Dim:
    """The product of sizes, None unless every one is known."""
    out = 1
    for d in dims:
        if not isinstance(d, int):
            return None
        out *= d
    return out


def _attention_shape(node: onnx.NodeProto, shapes: Sequence[list[Dim] | None]) -> list[Dim] | None:
    """Attention: [batch, sequence, v_hidden], v_hidden from qkv_hidden_sizes or weights / 3."""
    x = shapes[0] if shapes else None
    w = shapes[1] if len(shapes) > 1 else None
    if x is None or len(x) != 3:
        return None
    sizes = _ints(node, "qkv_hidden_sizes")
    if len(sizes) == 3:
        return [x[0], x[1], sizes[2]]
    if w is not None and len(w) == 2 and isinstance(w[1], int):
        return [x[0], x[1], w[1] // 3]
    return None


def _mha_shape(node: onnx.NodeProto, shapes: Sequence[list[Dim] | None]) -> list[Dim] | None:
    """MultiHeadAttention: [batch, sequence, v_hidden] (packed QKV, 3D or 4D value)."""
    q = shapes[0] if shapes else None
    v = shapes[2] if len(shapes) > 2 else None
    if q is None:
        return None
    hidden: Dim
    if len(q) == 5:  # packed QKV [B, S, N, 3, H]
        hidden = _product(q[2], q[4])
    elif len(q) != 3:
        return None
    elif v is not None and len(v) == 3:
        hidden = v[2]
    elif v is not None and len(v) == 4:  # [B, N, L, H]
        hidden = _product(v[1], v[3])
    else:
        hidden = q[2]
    return None if hidden is None else [q[0], q[1], hidden]


def _gqa_shape(node: onnx.NodeProto, shapes: Sequence[list[Dim] | None]) -> list[Dim] | None:
    """GroupQueryAttention: [batch, sequence, num_heads * head_size] (packed QKV or not)."""
    q = shapes[0] if shapes else None
    k = shapes[1] if len(shapes) > 1 else None
    if q is None or len(q) != 3:
        return None
    if k is not None:
        return [q[0], q[1], q[2]]
    n, kv = _attr(node, "num_heads"), _attr(node, "kv_num_heads")
    if not (isinstance(q[2], int) and n and kv):
        return None
    return [q[0], q[1], q[2] * n // (n + 2 * kv)]


def _fused_matmul_shape(
    node: onnx.NodeProto, shapes: Sequence[list[Dim] | None]
) -> list[Dim] | None:
    """FusedMatMul: MatMul's shape with transA/transB (not with the batch transposes)."""
    if len(shapes) < 2 or shapes[0] is None or shapes[1] is None:
        return None
    if _attr(node, "transBatchA", 0) or _attr(node, "transBatchB", 0):
        return None
    a, b = list(shapes[0]), list(shapes[1])
    if len(a) < 2 or len(b) < 2:
        return None
    if _attr(node, "transA", 0):
        a[-1], a[-2] = a[-2], a[-1]
    if _attr(node, "transB", 0):
        b[-1], b[-2] = b[-2], b[-1]
    n = max(len(a), len(b)) - 2
    ones: list[Dim] = [1] * n
    ba, bb = (ones + a[:-2])[-n:] if n else [], (ones + b[:-2])[-n:] if n else []
    batch: list[Dim] = []
    for x, y in zip(ba, bb, strict=True):
        if x == 1:
            batch.append(y)
        elif y == 1 or x == y:
            batch.append(x)
        else:
            return None
    return [*batch, a[-2], b[-1]]


def _fused_gemm_shape(
    node: onnx.NodeProto, shapes: Sequence[list[Dim] | None]
) -> list[Dim] | None:
    """FusedGemm: Gemm's [M, N] with transA/transB."""
    if len(shapes) < 2 or shapes[0] is None or shapes[1] is None:
        return None
    a, b = shapes[0], shapes[1]
    if len(a) != 2 or len(b) != 2:
        return None
    return [a[1] if _attr(node, "transA", 0) else a[0], b[0] if _attr(node, "transB", 0) else b[1]]


def _split_gelu_shape(
    node: onnx.NodeProto, shapes: Sequence[list[Dim] | None]
) -> list[Dim] | None:
    """BiasSplitGelu: input 0 with its last dimension halved."""
    x = shapes[0] if shapes else None
    if x is None or not x or not isinstance(x[-1], int):
        return None
    return [*x[:-1], x[-1] // 2]


def _embed_shape(
    node: onnx.NodeProto, shapes: Sequence[list[Dim] | None]
) -> dict[int, list[Dim]] | None:
    """EmbedLayerNormalization: [batch, sequence, hidden] outputs, mask_index [batch].

    ``hidden`` is the word embedding table's width.
    """
    ids = shapes[0] if shapes else None
    word = shapes[2] if len(shapes) > 2 else None
    if ids is None or len(ids) != 2 or word is None or len(word) != 2:
        return None
    hidden = [ids[0], ids[1], word[1]]
    return {0: hidden, 1: [ids[0]], 2: hidden}


_I32 = {"M": INT32}
_NORM = {"U": FLOAT}

#: (domain, op) -> its typing. ``("", op)`` entries apply only where ``onnx.defs`` has no
#: schema for the model's opset (LayerNormalization before 17).
# fmt: off
OP_TYPING: dict[tuple[str, str], OpTyping] = {
    (MS, "Attention"): OpTyping(
        ("T", "T", "T", "M", "T", "T", "M"), ("T", "T"), fixed=_I32, shape=_attention_shape
    ),
    (MS, "MultiHeadAttention"): OpTyping(
        ("T", "T", "T", "T", "M", "T", "T", "T", "M", "M"), ("T", "T", "T", "QK"),
        fixed={"M": INT32, "QK": FLOAT}, shape=_mha_shape,
    ),
    (MS, "GroupQueryAttention"): OpTyping(
        ("T", "T", "T", "T_CACHE", "T_CACHE", "M", "M", "T", "T", "I64", "T", "T",
         "T_KV_SCALE", "T_KV_SCALE", "T", "T", "M"),
        ("T", "T_CACHE", "T_CACHE", "T"),
        switch=frozenset({"T", "T_CACHE"}),
        fixed={"M": INT32, "I64": INT64, "T_KV_SCALE": FLOAT}, shape=_gqa_shape,
    ),
    (MS, "SkipLayerNormalization"): OpTyping(
        ("T", "T", "T", "T", "T"), ("T", "U", "U", "T"), fixed=_NORM, same_shape=(0, 3)
    ),
    (MS, "SkipSimplifiedLayerNormalization"): OpTyping(
        ("T", "T", "T", "T"), ("T", "U", "U", "T"), fixed=_NORM, same_shape=(0, 3)
    ),
    ("", "SimplifiedLayerNormalization"): OpTyping(
        ("T", "V"), ("V", "U"), switch=frozenset({"T", "V"}), fixed=_NORM, same_shape=(0,)
    ),
    ("", "LayerNormalization"): OpTyping(
        ("T", "V", "V"), ("V", "U", "U"), switch=frozenset({"T", "V"}), fixed=_NORM,
        same_shape=(0,),
    ),
    (MS, "EmbedLayerNormalization"): OpTyping(
        ("T1", "T1", "T", "T", "T", "T", "T", "T1", "T1"), ("T", "T1", "T"),
        fixed={"T1": INT32}, shape=_embed_shape,
    ),
    (MS, "FastGelu"): OpTyping(("T", "T"), ("T",), same_shape=(0,)),
    (MS, "BiasGelu"): OpTyping(("T", "T"), ("T",), same_shape=(0,)),
    (MS, "Gelu"): OpTyping(("T",), ("T",), same_shape=(0,)),
    (MS, "QuickGelu"): OpTyping(("T",), ("T",), same_shape=(0,)),
    (MS, "BiasSplitGelu"): OpTyping(("T", "T"), ("T",), shape=_split_gelu_shape),
    (MS, "BiasAdd"): OpTyping(("T", "T", "T"), ("T",), same_shape=(0,)),
    (MS, "FusedMatMul"): OpTyping(("T", "T"), ("T",), shape=_fused_matmul_shape),
    (MS, "TransposeMatMul"): OpTyping(("T", "T"), ("T",), shape=_fused_matmul_shape),
    # What ONNX Runtime's own graph optimizer saves (Conv/Gemm with the activation folded in).
    (MS, "FusedConv"): OpTyping(("T", "T", "T", "T"), ("T",)),
    (MS, "FusedGemm"): OpTyping(("T", "T", "T"), ("T",), shape=_fused_gemm_shape),
    (MS, "RotaryEmbedding"): OpTyping(
        ("T", "I64", "T", "T"), ("T",), fixed={"I64": INT64}, same_shape=(0,)
    ),
}
# fmt: on


def op_typing(op_type: str, domain: str, opset: int) -> OpTyping | None:
    """The typing of an op ``onnx.defs`` does not know at ``opset``, or None.

    Default-domain ops are looked up here only when ONNX has no schema for them.
    """
    if domain in _DEFAULT_DOMAINS:
        typing = OP_TYPING.get(("", op_type))
        if typing is None:
            return None
        try:
            onnx.defs.get_schema(op_type, opset, "")
        except onnx.defs.SchemaError:
            return typing
        return None
    return OP_TYPING.get((domain, op_type))


def since_version(op_type: str, domain: str, opset: int) -> int:
    """The version of the op's schema that ``opset`` selects (1 for ONNX Runtime's ops)."""
    if domain in _DEFAULT_DOMAINS:
        try:
            return int(onnx.defs.get_schema(op_type, opset, "").since_version)
        except onnx.defs.SchemaError:
            pass
    return 1


def _opset(model: onnx.ModelProto) -> int:
    return next((int(i.version) for i in model.opset_import if i.domain in _DEFAULT_DOMAINS), 0)


def _dims(vi: onnx.ValueInfoProto) -> list[Dim] | None:
    t = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in t.shape.dim]  # fmt: skip


def _value_info(name: str, elem_type: int, shape: list[Dim] | None) -> onnx.ValueInfoProto:
    vi = onnx.ValueInfoProto()
    vi.name = name
    vi.type.tensor_type.elem_type = elem_type
    if shape is not None:
        vi.type.tensor_type.shape.SetInParent()
        for d in shape:
            dim = vi.type.tensor_type.shape.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            elif d:
                dim.dim_param = d
    return vi


def _typed_outputs(model: onnx.ModelProto, opset: int) -> list[onnx.ValueInfoProto]:
    """New value_info for the untyped outputs of table ops whose inputs are typed (in order)."""
    known: dict[str, onnx.ValueInfoProto] = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            known[vi.name] = vi
    for t in model.graph.initializer:
        known[t.name] = _value_info(t.name, t.data_type, [int(d) for d in t.dims])
    untyped_outputs = {o.name: o for o in model.graph.output if o.name not in known}
    added: list[onnx.ValueInfoProto] = []
    for node in model.graph.node:
        typing = op_typing(node.op_type, node.domain, opset)
        if typing is None:
            continue
        in_types = [known[x].type.tensor_type.elem_type if x in known else 0 for x in node.input]
        shapes = [_dims(known[x]) if x in known else None for x in node.input]
        ruled = typing.shape(node, shapes) if typing.shape is not None else None
        if not isinstance(ruled, dict):
            ruled = {} if ruled is None else {0: ruled}
        for k, out in enumerate(node.output):
            declared = known.get(out)
            if not out or (declared is not None and _dims(declared) is not None):
                continue
            shape = shapes[0] if k in typing.same_shape and shapes else ruled.get(k)
            if declared is not None:  # typed (a graph output, say) without a shape
                if shape is not None:
                    found = _value_info(out, 0, shape).type.tensor_type.shape
                    declared.type.tensor_type.shape.CopyFrom(found)
                    added.append(declared)
                continue
            elem = typing.output_type(k, in_types)
            if not elem:
                continue
            vi = _value_info(out, elem, shape)
            if out in untyped_outputs:  # a graph output declared without a type
                untyped_outputs[out].type.CopyFrom(vi.type)
                vi = untyped_outputs[out]
            known[out] = vi
            added.append(vi)
    return added


def infer_shapes(model: onnx.ModelProto, *, data_prop: bool = True) -> onnx.ModelProto:
    """ONNX shape inference, completed for the ops of :data:`OP_TYPING`.

    Runs ``onnx.shape_inference.infer_shapes`` (not strict), then, while an op of the table
    has untyped outputs, states their types (and shapes where certain) as ``value_info`` and
    infers again, so what follows them is typed too. Declared types are never changed.

    Args:
        model: A model small enough to serialize (a weightless skeleton for large ones).
        data_prop: ONNX's data propagation (shape computations).

    Returns:
        A new, inferred model.
    """
    opset = _opset(model)
    out = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=data_prop)
    if not any(op_typing(n.op_type, n.domain, opset) for n in model.graph.node):
        return out
    for _ in range(len(out.graph.node)):
        added = _typed_outputs(out, opset)  # new entries, and declared ones given a shape
        if not added:
            break
        have = {id(vi) for vi in [*out.graph.input, *out.graph.value_info, *out.graph.output]}
        out.graph.value_info.extend(vi for vi in added if id(vi) not in have)
        out = onnx.shape_inference.infer_shapes(out, strict_mode=False, data_prop=data_prop)
    return out
