"""Nothing stays FP32 silently: float computation no unit covers is listed with its reason and
its shares of the weights and FLOPs, subgraph bodies walked. And recurrent layers are units: an
LSTM switches to FP16 with its weights and stays valid."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from amp_search.graph import find_units, sanitize
from amp_search.graph.units import not_searched


def _mixed_model() -> onnx.ModelProto:
    """MatMul (a unit) -> LSTM (a unit), com.microsoft FusedMatMul (a unit), com.microsoft
    Inverse (no typing rule) and an If whose branch holds a MatMul and its weight (the kinds of
    computation a search leaves alone)."""
    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32) * 0.1, name)

    hidden = 6
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["b", "w3"], ["c_then"], name="body/MatMul")],
        "then", [], [helper.make_tensor_value_info("c_then", TensorProto.FLOAT, [2, 4, 8])],
        [w("w3", 8, 8)],
    )  # fmt: skip
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["b"], ["c_else"], name="body/Identity")],
        "else", [], [helper.make_tensor_value_info("c_else", TensorProto.FLOAT, [2, 4, 8])],
    )  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm"),
        helper.make_node("LSTM", ["a", "W", "R", "B"], ["Y", "Y_h"], name="lstm",
                         hidden_size=hidden),
        helper.make_node("FusedMatMul", ["a", "w2"], ["b"], name="fused", domain="com.microsoft",
                         alpha=1.0),
        helper.make_node("If", ["cond"], ["c"], name="branch", then_branch=then_branch,
                         else_branch=else_branch),
        helper.make_node("Inverse", ["sq"], ["inv"], name="inverse", domain="com.microsoft"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "mixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("sq", TensorProto.FLOAT, [3, 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("inv", TensorProto.FLOAT, [3, 3])],
        [w("w1", 8, 8), w("w2", 8, 8), w("W", 1, 4 * hidden, 8), w("R", 1, 4 * hidden, hidden),
         w("B", 1, 8 * hidden)],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


_FEEDS = {"x": np.ones((2, 4, 8), np.float32), "cond": np.array(True),
          "sq": np.eye(3, dtype=np.float32) * 2}  # fmt: skip
_SHAPES = {k: v.shape for k, v in _FEEDS.items()}


def test_each_kind_of_left_out_computation_is_named_with_its_share():
    from amp_search.latency_model import node_flops

    raw = _mixed_model()
    sess = ort.InferenceSession(raw.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, _FEEDS)[1].shape == (2, 4, 8)  # it runs
    model = sanitize(raw)
    units = find_units(model)
    assert [u.name for u in units] == ["mm", "lstm", "fused"]  # FusedMatMul: a unit
    flops = node_flops(model, _SHAPES)
    found = {(x.op_type, x.reason.split(":")[0]): x
             for x in not_searched(model, units, pinned={"mm": "no FP16 kernel"}, flops=flops)}
    total = 64 + 64 + 64 + 24 * 8 + 24 * 6 + 48  # every float weight, the If's body included
    assert set(found) == {("com.microsoft:Inverse", "an ONNX Runtime op with no typing rule "
                           "here (graph/op_types.py)"), ("MatMul", "inside a subgraph of If "
                           "'branch'"), ("MatMul", "pinned FP32")}  # fmt: skip
    inverse = found["com.microsoft:Inverse", "an ONNX Runtime op with no typing rule here "
                    "(graph/op_types.py)"]  # fmt: skip
    assert inverse.weights == 0 and inverse.nodes == 1
    body = found["MatMul", "inside a subgraph of If 'branch'"]
    assert body.reason == "inside a subgraph of If 'branch': bodies stay as they are"
    assert body.weights == 64 and body.weight_share == pytest.approx(64 / total)
    # FLOPs: the body's MatMul [2, 4, 8] x [8, 8]; the If itself counts its body's work.
    assert body.flops == 2 * 2 * 4 * 8 * 8 and flops["branch"] == body.flops
    model_flops = sum(flops[n.name] for n in model.graph.node)
    assert body.flops_share == pytest.approx(body.flops / model_flops)
    pinned = found["MatMul", "pinned FP32"]
    assert pinned.reason == "pinned FP32: no FP16 kernel" and pinned.flops == flops["mm"]
    assert str(body).startswith("1 MatMul (11.1% of the weights, ") and "of the FLOPs" in str(body)
    assert body.to_json()["flops_share"] == pytest.approx(body.flops_share, abs=1e-6)
    # Without pins the unit's own node is not listed; without FLOPs no FLOPs share is claimed.
    plain = not_searched(model, units)
    assert [x.reason.split(":")[0] for x in plain if x.op_type == "MatMul"] == [
        "inside a subgraph of If 'branch'"
    ]
    assert all(x.flops is None and "flops_share" not in x.to_json() for x in plain)


def test_an_lstm_unit_runs_fp16_with_its_weights_and_stays_valid(tmp_path):
    from amp_search.backends import BuildConfig
    from amp_search.backends.ort import OnnxRuntimeBackend
    from amp_search.graph import MixedPrecisionRewriter
    from amp_search.types import PrecisionAssignment

    model = sanitize(_mixed_model())
    rewriter = MixedPrecisionRewriter(model)
    out, report = rewriter.apply(PrecisionAssignment.with_fp16(["mm", "lstm"], ["lstm"]))
    assert report.fp16_nodes == ["lstm"]
    lstm = next(n for n in out.graph.node if n.name == "lstm")
    assert list(lstm.input[1:4]) == ["W__fp16", "R__fp16", "B__fp16"]  # FP16 weights
    onnx.checker.check_model(out, full_check=True)
    feeds = {**_FEEDS, "x": np.random.default_rng(1).normal(size=(2, 4, 8)).astype(np.float32)}
    backend = OnnxRuntimeBackend()
    got = []
    for name, m in (("fp16", out), ("fp32", model)):
        onnx.save(m, str(tmp_path / f"{name}.onnx"))
        with backend.open(backend.build(tmp_path / f"{name}.onnx", BuildConfig("cpu"))) as r:
            got.append(r.infer(feeds))
    err = np.linalg.norm(got[0]["Y"] - got[1]["Y"]) / np.linalg.norm(got[1]["Y"])
    assert 0 < err < 5e-3  # FP16 weights and storage: close, not identical


def test_the_latency_estimate_prices_an_lstm_by_its_gemms():
    from amp_search.latency_model import LatencyEstimator

    estimator = LatencyEstimator(sanitize(_mixed_model()), _SHAPES, target="h200")
    # Every one of 2 steps x 4 sequences: gates (4 x 6) x (input 8 + hidden 6), 2 FLOPs each.
    assert estimator.flops("lstm") == 2 * 2 * 4 * (24 * 8 + 24 * 6)
