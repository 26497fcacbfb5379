"""Nodes the target cannot run in FP16 stay FP32 in every candidate (pinned).

On the H200 the PP-OCR classifier's all-FP16 rewrite had nodes that ONNX Runtime ran on the
CPU (11 ms instead of 1 ms, no CUDA graph): the CUDA EP lacks float16 kernels for some ops at
the model's opset 11. The CUDA EP finds them by one profiled run; here the rewrite with pins
and the placement reading are checked on the CPU EP.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from amp_search.backends import BuildConfig
from amp_search.backends.ort import OnnxRuntimeBackend, cpu_placed_nodes
from amp_search.graph import MixedPrecisionRewriter, load_model, sanitize, summarize_pinned


@pytest.fixture(scope="module")
def cls_model(real_model):
    path, feeds = real_model("ppocr_cls", 4)
    return sanitize(load_model(path)), feeds


def test_placement_is_read_by_node_name_from_one_profiled_run(cls_model):
    import onnxruntime as ort

    model, feeds = cls_model
    rewriter = MixedPrecisionRewriter(model)
    chunks, _, _ = rewriter.apply_serialized(rewriter.all_fp16())
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    placed = cpu_placed_nodes(b"".join(chunks), so, ["CPUExecutionProvider"], feeds)
    # Every FP16 node runs on the CPU EP here, under its own name (nothing fused or renamed).
    fp16 = {n.name for n in rewriter.low_precision_nodes()}
    assert fp16 and fp16 <= placed
    ops = {n.op_type for n in rewriter.low_precision_nodes()}
    assert {"Conv", "Clip", "HardSigmoid", "MaxPool"} <= ops


def test_pinned_nodes_stay_fp32_and_the_rewrite_stays_valid(cls_model, tmp_path):
    model, feeds = cls_model
    plain = MixedPrecisionRewriter(model)
    nodes = {n.name: n for n in plain.low_precision_nodes()}
    pinned = {n: "test" for n, node in nodes.items() if node.op_type in ("Clip", "MaxPool")}
    assert any(nodes[n].op_type == "MaxPool" for n in pinned)  # a follower, not a unit's node
    rewriter = MixedPrecisionRewriter(model, pinned=pinned)
    out, report = rewriter.apply(rewriter.all_fp16())
    assert set(report.fp16_nodes) == set(nodes) - set(pinned)
    assert {n.name for n in rewriter.low_precision_nodes()} == set(nodes) - set(pinned)
    ops = {n.name: n for n in out.graph.node}
    for name in pinned:  # the pinned node reads and writes FP32 tensors, through Casts
        assert not any(t.endswith("__fp16") for t in [*ops[name].input, *ops[name].output])
    onnx.checker.check_model(out, full_check=True)
    backend = OnnxRuntimeBackend()
    outputs = []
    for name, m in (("pinned", out), ("fp32", model)):
        onnx.save(m, str(tmp_path / f"{name}.onnx"))
        with backend.open(backend.build(tmp_path / f"{name}.onnx", BuildConfig("cpu"))) as r:
            outputs.append(r.infer(feeds))
    for k, want in outputs[1].items():
        assert np.linalg.norm(outputs[0][k] - want) / np.linalg.norm(want) < 2e-2
    assert summarize_pinned({"a": "r1", "b": "r1", "c": "r2"}) == (
        "3 node(s) stay FP32 in every candidate (2 node(s): r1; 1 node(s): r2)"
    )
    with pytest.raises(KeyError, match="not in the model"):
        MixedPrecisionRewriter(model, pinned={"no_such_node": "x"})


def test_the_cpu_backend_pins_nothing_since_it_emulates_fp16(cls_model):
    model, feeds = cls_model
    rewriter = MixedPrecisionRewriter(model)
    assert OnnxRuntimeBackend().low_precision_gaps(rewriter, feeds, BuildConfig("cpu")) == {}


@pytest.mark.gpu
def test_on_the_cuda_ep_the_pinned_all_fp16_model_keeps_every_node_on_the_gpu(cls_model, tmp_path):
    model, feeds = cls_model
    backend = OnnxRuntimeBackend()
    config = BuildConfig("cuda")
    unpinned = MixedPrecisionRewriter(model)
    pinned = backend.low_precision_gaps(unpinned, feeds, config)
    rewriter = MixedPrecisionRewriter(model, pinned=pinned)
    for name, rw in (("plain", unpinned), ("pinned", rewriter)):
        onnx.save(rw.apply(rw.all_fp16())[0], str(tmp_path / f"{name}.onnx"))
    print("pinned on the CUDA EP:", summarize_pinned(pinned) if pinned else "none")
    cand = backend.build(tmp_path / "pinned.onnx", config)
    assert cand.info["cuda_graph"] is True, cand.info.get("cuda_graph_reason")
    if pinned:  # what the pins are for: without them, the session refuses a graph
        assert backend.build(tmp_path / "plain.onnx", config).info["cuda_graph"] is False
    with backend.open(cand) as r:
        r.bind(feeds)
        r.run_once()
        assert r.execution["cuda_graph"] is True
