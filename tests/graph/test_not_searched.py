"""Nothing stays FP32 silently: float computation no unit covers is listed with its reason and
its shares of the weights and FLOPs, subgraph bodies walked. And recurrent layers are units: an
LSTM switches to FP16 with its weights and stays valid."""

from __future__ import annotations

import json

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
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
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
    found = {
        (x.op_type, x.reason.split(":")[0]): x
        for x in not_searched(model, units, pinned={"mm": "no FP16 kernel"}, flops=flops)
    }
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


def _subgraph_model() -> onnx.ModelProto:
    """x -> MatMul (a unit) -> Loop (3 runs of MatMul + Tanh on the carried state) and, on an
    image, an If whose branches each hold a Conv: compute the search cannot switch."""
    rng = np.random.default_rng(2)

    def w(name, *shape):
        return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32) * 0.3, name)

    vi = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="loop/cond"),
         helper.make_node("MatMul", ["v_in", "w_loop"], ["v_mm"], name="loop/MatMul"),
         helper.make_node("Tanh", ["v_mm"], ["v_out"], name="loop/Tanh")],
        "loop_body",
        [vi("i", TensorProto.INT64, []), vi("cond_in", TensorProto.BOOL, []),
         vi("v_in", TensorProto.FLOAT, [2, 8])],
        [vi("cond_out", TensorProto.BOOL, []), vi("v_out", TensorProto.FLOAT, [2, 8])],
        [w("w_loop", 8, 8)],
    )  # fmt: skip

    def branch(name):
        return helper.make_graph(
            [helper.make_node("Conv", ["img", f"w_{name}"], [f"y_{name}"], name=f"{name}/Conv",
                              pads=[1, 1, 1, 1])],
            name, [], [vi(f"y_{name}", TensorProto.FLOAT, [1, 3, 5, 5])],
            [w(f"w_{name}", 3, 2, 3, 3)],
        )  # fmt: skip

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w0"], ["h"], name="mm"),
         helper.make_node("Loop", ["trips", "keep_going", "h"], ["v"], name="loop", body=body),
         helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=branch("then"),
                          else_branch=branch("else"))],
        "subgraphs",
        [vi("x", TensorProto.FLOAT, [2, 8]), vi("img", TensorProto.FLOAT, [1, 2, 5, 5]),
         vi("cond", TensorProto.BOOL, [])],
        [vi("v", TensorProto.FLOAT, [2, 8]), vi("y", TensorProto.FLOAT, [1, 3, 5, 5])],
        [w("w0", 8, 8), numpy_helper.from_array(np.array(3, np.int64), "trips"),
         numpy_helper.from_array(np.array(True), "keep_going")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


_SUB_FEEDS = {"x": np.random.default_rng(3).normal(size=(2, 8)).astype(np.float32),
              "img": np.random.default_rng(4).normal(size=(1, 2, 5, 5)).astype(np.float32),
              "cond": np.array(True)}  # fmt: skip


def test_compute_inside_loop_and_if_bodies_is_listed_with_its_flops_share():
    from amp_search.latency_model import node_flops

    raw = _subgraph_model()
    onnx.checker.check_model(raw, full_check=True)
    ort.InferenceSession(raw.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, _SUB_FEEDS
    )
    model = sanitize(raw)
    units = find_units(model)
    assert [u.name for u in units] == ["mm"]
    flops = node_flops(model, {k: v.shape for k, v in _SUB_FEEDS.items()})
    mm = 2 * 2 * 8 * 8
    conv = 2 * 3 * 5 * 5 * 2 * 3 * 3
    # The Loop's body runs 3 times (a constant trip count); each If branch counts in full.
    assert flops["loop/MatMul"] == 3 * mm and flops["loop/Tanh"] == 3 * 4 * 16
    assert flops["loop"] == 3 * mm + 3 * 4 * 16 and flops["branch"] == 2 * conv
    found = {x.op_type: x for x in not_searched(model, units, flops=flops)}
    assert set(found) == {"MatMul", "Tanh", "Conv"}  # the Identity moves data: not listed
    assert found["MatMul"].reason == "inside a subgraph of Loop 'loop': bodies stay as they are"
    assert found["Conv"].reason == "inside a subgraph of If 'branch': bodies stay as they are"
    assert found["Conv"].nodes == 2 and found["Conv"].weights == 2 * 54
    total = mm + flops["loop"] + flops["branch"]
    assert sum(flops[n.name] for n in model.graph.node) == total
    assert found["MatMul"].flops_share == pytest.approx(3 * mm / total)
    assert found["Conv"].flops_share == pytest.approx(2 * conv / total)
    # Shares add up: what is listed plus the searched unit is the whole model.
    listed = sum(x.flops_share for x in found.values())
    assert listed + mm / total == pytest.approx(1.0)
    weights = sum(x.weight_share for x in found.values())
    assert weights + 64 / (64 * 2 + 2 * 54) == pytest.approx(1.0)
    # Largest share first.
    assert [x.op_type for x in not_searched(model, units, flops=flops)][0] == "Conv"


def test_inspect_search_and_report_show_the_flops_share(tmp_path, capsys):
    from amp_search.cli import main

    path = tmp_path / "subgraphs.onnx"
    onnx.save(_subgraph_model(), str(path))
    data = tmp_path / "data.npz"
    np.savez(data, **_SUB_FEEDS)
    report = tmp_path / "inspect.json"
    assert main(["inspect", str(path), "--data", str(data), "--json", str(report)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "not searched, stays FP32: 2 Conv (" in text
    assert "of the FLOPs): inside a subgraph of If 'branch'" in text
    listed = json.loads(report.read_text())["not_searched"]
    assert {x["op_type"] for x in listed} == {"Conv", "MatMul", "Tanh"}
    assert all(0 < x["flops_share"] < 1 and x["flops"] > 0 for x in listed)
    out = tmp_path / "out"
    assert main(["search", str(path), "--data", str(data), "--out", str(out), "--n-trials", "3",
                 "--storage", ":memory:"]) == 0  # fmt: skip
    front = json.loads((out / "front.json").read_text())
    assert {x["op_type"] for x in front["not_searched"]} == {"Conv", "MatMul", "Tanh"}
    notes = [n for n in front["notes"] if n.startswith("Not searched")]
    assert len(notes) == 3 and all("of the FLOPs)" in n for n in notes)
    capsys.readouterr()
    assert main(["report", str(out), "--no-plots"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "Not searched, stays FP32: 1 MatMul (" in shown and "inside a subgraph of Loop" in shown
