"""Tiny ONNX graphs for tests, and running them on ONNX Runtime CPU as the rewrite tests do.

One home for what the rewrite's tests (``tests/graph``) all need: a model from a few nodes,
its inputs' and outputs' element types, and a run with graph optimizations off, directly or
through the FP32 twin that emulates FP16/BF16 storage (:mod:`amp_search.graph.emulate`: what
ONNX Runtime CPU can run of a BF16 model).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper

if TYPE_CHECKING:
    import onnxruntime

__all__ = ["cpu_session", "io_types", "run_cpu", "run_twin", "tiny_model", "value_info"]


def tiny_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: Iterable[onnx.TensorProto] = (),
    opset: int = 17,
) -> onnx.ModelProto:
    """A one-graph model at ``opset`` (IR 8, or 10 from opset 21, which needs it)."""
    g = helper.make_graph(nodes, "t", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8 if opset < 21 else 10
    return m


def value_info(
    name: str, shape: list[int | str], elem: int = TensorProto.FLOAT
) -> onnx.ValueInfoProto:
    """A tensor's value info."""
    return helper.make_tensor_value_info(name, elem, shape)


def io_types(model: onnx.ModelProto) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(name, element type) of the graph inputs that are no initializers, and of the outputs."""
    inits = {i.name for i in model.graph.initializer}
    ins = [
        (i.name, i.type.tensor_type.elem_type) for i in model.graph.input if i.name not in inits
    ]
    outs = [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output]
    return ins, outs


def cpu_session(model: onnx.ModelProto | bytes | str) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session of ``model`` with graph optimizations off."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def run_cpu(
    model: onnx.ModelProto | bytes | str, feeds: dict[str, np.ndarray]
) -> list[np.ndarray]:
    """Every output of one run of :func:`cpu_session`."""
    return list(cpu_session(model).run(None, feeds))


def run_twin(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Runs the FP32 twin that emulates FP16/BF16 storage (what ORT CPU can run)."""
    from amp_search.graph.emulate import emulating_fp16_storage

    return run_cpu(emulating_fp16_storage(Path("unused.onnx"), model.SerializeToString()), feeds)
