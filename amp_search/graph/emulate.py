"""Emulating FP16 storage in FP32: the twin that ONNX Runtime CPU runs for a candidate.

ONNX Runtime CPU runs most FP16 nodes as FP32 *islands* between the Casts it inserts, and
merges those Casts across a chain of nodes, so an FP16 tensor inside the chain never holds
FP16 values. :func:`emulating_fp16_storage` rewrites a mixed-precision model into an FP32 twin
in which every FP16 tensor is rounded through an explicit Cast pair, which ONNX Runtime keeps
(the ONNX Runtime backend's ``emulate_fp16_storage`` option,
:mod:`amp_search.backends.ort`). It is a graph rewrite, so it lives here; the candidate's own
ONNX is never changed.

BF16 tensors are emulated the same way, through ``Cast(to=BFLOAT16)`` pairs. ONNX Runtime
CPU has BF16 kernels for few ops beyond Cast, so the BF16 candidate itself often does not
load there; its twin, all FP32 with Cast pairs to BF16, is what runs, and it gives BF16's
deviation: one BF16 rounding of every BF16 tensor and weight, FP32 arithmetic in between.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import TensorProto, helper, numpy_helper

from amp_search.graph.io import (
    NamedArray,
    save_model,
    serialize_within_limit,
    tensor_nbytes,
    typed_skeleton,
    within_protobuf_limit,
)
from amp_search.graph.op_types import infer_shapes

__all__ = ["emulating_fp16_storage"]


def emulating_fp16_storage(model_path: Path, model_bytes: bytes | None = None) -> str | bytes:
    """An FP32 twin of the model that rounds every FP16/BF16 tensor through a Cast pair.

    FP16 (BF16) initializers become FP32 initializers holding the rounded values; every FP16
    (BF16) tensor a node produces is written FP32, then passed through ``Cast(to=FLOAT16)``
    (``Cast(to=BFLOAT16)``) and ``Cast(to=FLOAT)``. ONNX Runtime keeps such explicit pairs
    (it only merges the casts it inserts itself), so rounding, overflow to inf and flush to
    zero happen at every node boundary, while each node computes in FP32 as ONNX Runtime CPU
    does anyway.

    Returns the twin's bytes, or, when it is over the protobuf limit or the model keeps its
    weights in external data, the path of the twin saved with external data in a new folder
    beside the model (the caller removes it). Such a twin is written one weight at a time:
    neither the model's weights nor the twin's are ever held whole.
    ``model_bytes``, when given, is the model (its file may not be written yet).
    """
    if model_bytes is None:  # external weights are read one at a time, when written
        model = onnx.load(str(model_path), load_external_data=False)
    else:
        model = onnx.load_from_string(model_bytes)
    f16, bf16, f32 = TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.FLOAT
    low = (f16, bf16)
    has_fp16 = any(t.data_type in low for t in model.graph.initializer) or any(
        a.name == "to" and a.i in low
        for n in model.graph.node
        if n.op_type == "Cast"
        for a in n.attribute
    )
    if not has_fp16:
        return str(model_path) if model_bytes is None else model_bytes
    try:
        typed = infer_shapes(typed_skeleton(model), data_prop=False)  # fused ops typed too
    except Exception:  # fall back to the types the model states
        typed = model
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in [*typed.graph.value_info, *typed.graph.input, *typed.graph.output]
    }
    g = model.graph
    fp16_graph_outputs = {o.name for o in g.output if o.type.tensor_type.elem_type in low}

    def round_pair(src: str, dst: str, to: int = f16) -> list[onnx.NodeProto]:
        half = f"{dst}__amp_half"
        return [
            helper.make_node("Cast", [src], [half], name=f"amp_emulate/{dst}/h", to=to),
            helper.make_node("Cast", [half], [dst], name=f"amp_emulate/{dst}/f", to=f32),
        ]

    nodes: list[onnx.NodeProto] = []
    for node in g.node:
        to_attr = next((a for a in node.attribute if a.name == "to"), None)
        if node.op_type == "Cast" and to_attr is not None and to_attr.i in low:
            raw = f"{node.output[0]}__amp_raw"
            nodes.append(helper.make_node("Identity", [node.input[0]], [raw], name=node.name))
            if types.get(node.input[0]) not in (f16, bf16, f32):
                nodes[-1] = helper.make_node(
                    "Cast", [node.input[0]], [raw], name=node.name, to=f32
                )
            nodes.extend(round_pair(raw, node.output[0], to_attr.i))
            continue
        extra: list[onnx.NodeProto] = []
        if node.op_type not in ("Cast", "Shape", "Size"):
            for k, name in enumerate(node.output):
                if name and types.get(name) in low:
                    raw = f"{name}__amp_raw"
                    node.output[k] = raw
                    extra.extend(round_pair(raw, name, types[name]))
        nodes.append(node)
        nodes.extend(extra)
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    for o in g.output:
        if o.name in fp16_graph_outputs:
            o.type.tensor_type.elem_type = f32
    # Graph outputs declared FP16 are produced FP32 (rounded): the runner reads them as is.
    return _twin_weights(model, model_path)


def _twin_weights(model: onnx.ModelProto, model_path: Path) -> str | bytes:
    """The twin (``model``'s graph, rewritten) with its weights in FP32: bytes, or a path.

    In memory when the model holds its weights and the twin fits one protobuf message;
    else saved with external data, converting one weight at a time.
    """
    g, low = model.graph, (TensorProto.FLOAT16, TensorProto.BFLOAT16)
    external = any(t.data_location == TensorProto.EXTERNAL for t in g.initializer)
    twin_bytes = sum(
        4 * math.prod(t.dims) if t.data_type in low else tensor_nbytes(t) for t in g.initializer
    )
    if not external and within_protobuf_limit(twin_bytes):
        for i, t in enumerate(g.initializer):
            if t.data_type in low:
                g.initializer[i].CopyFrom(
                    numpy_helper.from_array(numpy_helper.to_array(t).astype("float32"), t.name)
                )
        data = serialize_within_limit(model)
        if data is not None:
            return data
    scratch = tempfile.mkdtemp(prefix=".emulated-", dir=model_path.parent)
    weights = _fp32_weights(model, model_path.parent)
    return str(save_model(model, Path(scratch) / model_path.name, initializers=weights))


def _fp32_weights(model: onnx.ModelProto, folder: Path) -> Iterator[onnx.TensorProto | NamedArray]:
    """The twin's initializers, one at a time.

    FP16/BF16 ones as FP32 arrays, external ones read from ``folder`` (the model's), the
    others as they are.
    """
    low = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
    for t in model.graph.initializer:
        if t.data_type not in low and t.data_location != TensorProto.EXTERNAL:
            yield t
            continue
        values = numpy_helper.to_array(t, str(folder))  # reads only this tensor's bytes
        yield t.name, values.astype("float32", copy=False) if t.data_type in low else values
