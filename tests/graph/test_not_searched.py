"""Nothing stays FP32 silently: float computation no unit covers is listed with its reason.
And recurrent layers are units: an LSTM switches to FP16 with its weights and stays valid."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from amp_search.graph import find_units, sanitize
from amp_search.graph.units import not_searched


def _mixed_model() -> onnx.ModelProto:
    """MatMul (a unit) -> LSTM (a unit), com.microsoft FusedMatMul and an If whose branch holds
    a MatMul weight (the kinds of computation a search leaves alone)."""
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
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "mixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, None)],
        [w("w1", 8, 8), w("w2", 8, 8), w("W", 1, 4 * hidden, 8), w("R", 1, 4 * hidden, hidden),
         w("B", 1, 8 * hidden)],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def test_each_kind_of_left_out_computation_is_named_with_its_share():
    raw = _mixed_model()
    sess = ort.InferenceSession(raw.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.ones((2, 4, 8), np.float32)
    assert sess.run(None, {"x": x, "cond": np.array(True)})[1].shape == (2, 4, 8)  # it runs
    model = sanitize(raw)
    units = find_units(model)
    assert [u.name for u in units] == ["mm", "lstm"]
    found = {x.op_type: x for x in not_searched(model, units, pinned={"mm": "no FP16 kernel"})}
    total = 64 + 64 + 64 + 24 * 8 + 24 * 6 + 48  # every float weight, the If's body included
    assert set(found) == {"com.microsoft:FusedMatMul", "If", "MatMul"}
    fused = found["com.microsoft:FusedMatMul"]
    assert fused.reason == "ops of domain com.microsoft are not searched"
    assert fused.weights == 64 and fused.weight_share == pytest.approx(64 / total)
    assert found["If"].reason.startswith("owns a subgraph") and found["If"].weights == 64
    assert found["MatMul"].reason == "pinned FP32: no FP16 kernel"
    assert str(fused).startswith("1 com.microsoft:FusedMatMul (") and "not searched" in str(fused)
    # Without pins the unit's own node is not listed.
    assert "MatMul" not in {x.op_type for x in not_searched(model, units)}


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
    feeds = {"x": np.random.default_rng(1).normal(size=(2, 4, 8)).astype(np.float32),
             "cond": np.array(True)}  # fmt: skip
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

    estimator = LatencyEstimator(sanitize(_mixed_model()), {"x": (2, 4, 8), "cond": ()},
                                 target="h200")  # fmt: skip
    # Every one of 2 steps x 4 sequences: gates (4 x 6) x (input 8 + hidden 6), 2 FLOPs each.
    assert estimator.flops("lstm") == 2 * 2 * 4 * (24 * 8 + 24 * 6)
