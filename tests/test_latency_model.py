"""The roofline latency estimate: FLOPs, precision, fusion, Casts, targets, speed."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from amp_search.demo import build_demo_model
from amp_search.errors import UserInputError
from amp_search.graph import MixedPrecisionRewriter, sanitize
from amp_search.latency_model import (
    KERNEL_OVERHEAD_US,
    MEMORY_EFFICIENCY,
    TARGETS,
    LatencyEstimator,
)
from amp_search.types import LatencyStats, Precision, PrecisionAssignment

SHAPE = {"image": (8, 3, 64, 64)}


@pytest.fixture(scope="module")
def demo() -> onnx.ModelProto:
    return sanitize(build_demo_model())


@pytest.fixture(scope="module")
def rewriter(demo: onnx.ModelProto) -> MixedPrecisionRewriter:
    return MixedPrecisionRewriter(demo)


@pytest.fixture(scope="module")
def est(demo: onnx.ModelProto) -> LatencyEstimator:
    return LatencyEstimator(demo, SHAPE, target="h100")


def _units(rw: MixedPrecisionRewriter) -> list[str]:
    return [u.name for u in rw.units]


def _all(rw: MixedPrecisionRewriter, p: Precision) -> PrecisionAssignment:
    return PrecisionAssignment.uniform(_units(rw), p)


def _checkerboard(rw: MixedPrecisionRewriter) -> PrecisionAssignment:
    names = _units(rw)
    return PrecisionAssignment.with_fp16(names, names[::2])


def test_figures_match_the_datasheets():
    h100, h200 = TARGETS["h100"], TARGETS["h200"]
    assert (h100.fp32_tflops, h100.tf32_tensor_tflops, h100.fp16_tensor_tflops) == (
        66.9,
        494.7,
        989.4,
    )
    assert h100.memory_tbps == 3.35
    assert h200.memory_tbps == 4.8
    assert h200.fp16_tensor_tflops == h100.fp16_tensor_tflops


def test_conv_flops_match_the_hand_formula(est: LatencyEstimator):
    # 2 * N * Cout * H_out * W_out * Cin/group * kH * kW
    assert est.flops("block1/Conv") == 2 * 8 * 32 * 64 * 64 * 32 * 3 * 3
    assert est.flops("stem/Conv") == 2 * 8 * 32 * 64 * 64 * 3 * 3 * 3
    assert est.flops("amp1/Conv") == 2 * 8 * 32 * 32 * 32 * 32 * 3 * 3  # stride 2
    assert est.flops("head1/Conv") == 2 * 8 * 64 * 16 * 16 * 32 * 3 * 3
    # Gemm [8, 64] x [64, 10]
    assert est.flops("fc/Gemm") == 2 * 8 * 10 * 64


def test_views_are_free_and_pointwise_nodes_fuse(est: LatencyEstimator, demo, rewriter):
    costs = {c.name: c for c in est.costs}
    assert costs["flat/Flatten"].free
    assert costs["stem/Relu"].fuse_parent == list(costs).index("stem/Conv")
    assert costs["rescale/Mul"].fuse_parent == list(costs).index("amp4/Relu")  # a chain
    assert costs["pool/GAP"].fuse_parent == -1  # not pointwise
    # 10 Conv chains + GlobalAveragePool + Gemm, Flatten free.
    details = est.estimate_details(demo)
    assert details.kernels == 12
    assert details.casts == 0


def test_all_fp16_is_faster_than_all_fp32(est: LatencyEstimator, rewriter):
    fp32 = est.estimate(rewriter.apply(_all(rewriter, Precision.FP32))[0])
    fp16 = est.estimate(rewriter.apply(_all(rewriter, Precision.FP16))[0])
    assert 0 < fp16 < fp32
    h200 = LatencyEstimator(rewriter.model, SHAPE, target="h200")
    fp16_h200 = h200.estimate_assignment(rewriter, _all(rewriter, Precision.FP16))
    assert fp16_h200 < h200.estimate_assignment(rewriter, _all(rewriter, Precision.FP32))


def test_fp32_math_without_tf32_is_slower_on_compute_bound_models():
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2048, 2048])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2048, 2048])
    w = numpy_helper.from_array(np.zeros((2048, 2048), np.float32), "w")
    node = helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")
    model = helper.make_model(
        helper.make_graph([node], "g", [a], [y], [w]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    model = sanitize(model)
    tf32 = LatencyEstimator(model, {"a": (2048, 2048)}, fp32_math="tf32").estimate(model)
    fp32 = LatencyEstimator(model, {"a": (2048, 2048)}, fp32_math="fp32").estimate(model)
    flops = 2 * 2048**3
    assert fp32 == pytest.approx(flops / (66.9e12 * 0.6) * 1e3 + KERNEL_OVERHEAD_US * 1e-3)
    assert tf32 < fp32


def test_checkerboard_pays_for_its_casts(est: LatencyEstimator, rewriter):
    all16_model, all16_report = rewriter.apply(_all(rewriter, Precision.FP16))
    checker_model, checker_report = rewriter.apply(_checkerboard(rewriter))
    all16 = est.estimate_details(all16_model)
    checker = est.estimate_details(checker_model)
    assert checker_report.casts_inserted > all16_report.casts_inserted
    assert checker.casts == checker_report.casts_inserted
    assert all16.casts == all16_report.casts_inserted
    assert checker.cast_ms > all16.cast_ms > 0
    assert checker.total_ms > all16.total_ms
    # The graph-input Cast is a kernel of its own; the Gemm's output Cast fuses into it.
    assert all16.fused_casts == 1
    assert all16.kernels == 12 + 1


def test_every_cast_adds_its_bytes_and_launch(est: LatencyEstimator, rewriter):
    model, _ = rewriter.apply(_checkerboard(rewriter))
    before = est.estimate(model)
    # One more Cast of a tensor an FP32 node also reads: not fused, so bytes + a kernel.
    extra = onnx.ModelProto()
    extra.CopyFrom(model)
    extra.graph.node.append(
        helper.make_node(
            "Cast", ["image"], ["image__fp16_extra"], name="amp_cast/image/to_fp16", to=10
        )
    )
    after = est.estimate(extra)
    numel = 8 * 3 * 64 * 64
    bw = TARGETS["h100"].memory_tbps * 1e12 * MEMORY_EFFICIENCY
    expected = (numel * 6 / bw + KERNEL_OVERHEAD_US * 1e-6) * 1e3
    assert after - before == pytest.approx(expected, rel=1e-9)
    # Two more: twice that.
    extra.graph.node.append(
        helper.make_node(
            "Cast", ["image"], ["image__fp16_extra2"], name="amp_cast/image/to_fp16", to=10
        )
    )
    assert est.estimate(extra) - before == pytest.approx(2 * expected, rel=1e-9)


def test_h200_is_not_slower_and_wins_on_memory_bound_models(demo, rewriter):
    h100 = LatencyEstimator(demo, SHAPE, target="h100")
    h200 = LatencyEstimator(demo, SHAPE, target="h200")
    for a in (_all(rewriter, Precision.FP32), _all(rewriter, Precision.FP16)):
        model = rewriter.apply(a)[0]
        assert h200.estimate(model) <= h100.estimate(model)

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1024, 1024])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1024, 1024])
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["s"], name="sig"),
        helper.make_node("Tanh", ["s"], ["y"], name="tanh"),
    ]
    pw = helper.make_model(
        helper.make_graph(nodes, "pw", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    pw.ir_version = 8
    pw = sanitize(pw)
    shapes = {"x": (64, 1024, 1024)}
    t100 = LatencyEstimator(pw, shapes, target="h100").estimate(pw)
    t200 = LatencyEstimator(pw, shapes, target="h200").estimate(pw)
    assert t200 < t100
    # Memory-bound: the bandwidth ratio shows through almost entirely.
    assert t100 / t200 == pytest.approx(4.8 / 3.35, rel=0.01)


def test_estimates_are_deterministic_and_labelled(est: LatencyEstimator, rewriter):
    model, _ = rewriter.apply(_checkerboard(rewriter))
    assert est.estimate(model) == est.estimate(model)
    again, _ = rewriter.apply(_checkerboard(rewriter))
    assert est.estimate(again) == est.estimate(model)
    assert est.source == "estimated:h100"
    stats = est.stats(model)
    assert isinstance(stats, LatencyStats)
    assert stats.source == "estimated:h100"
    assert stats.median_ms == est.estimate(model)
    assert est.estimate_details(model).source == "estimated:h100"


def test_estimate_prices_every_node_and_cast_of_a_1000_node_model():
    """Its speed is a benchmark (benchmarks/rewrite.py), not a timed test."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(500):
        w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), f"w{i}")
        inits.append(w)
        nodes.append(helper.make_node("MatMul", [x, w.name], [f"m{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 64])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model = sanitize(model)
    rw = MixedPrecisionRewriter(model)
    est = LatencyEstimator(model, {"x": (32, 64)})
    # Worst case: every other unit FP16, so 500 Casts on top of the 1000 nodes.
    names = [u.name for u in rw.units]
    mixed, report = rw.apply(PrecisionAssignment.with_fp16(names, names[::2]))
    assert len(mixed.graph.node) == 1000 + report.casts_inserted
    details = est.estimate_details(mixed)
    assert details.casts == report.casts_inserted
    assert details.fp16_nodes + details.fp32_nodes == 1000
    assert details.total_ms > est.estimate(model)  # 500 Casts cost more than none


def test_input_shapes_are_checked(demo):
    with pytest.raises(UserInputError, match="missing: image"):
        LatencyEstimator(demo, {})
    with pytest.raises(UserInputError, match="does not take"):
        LatencyEstimator(demo, {"image": (8, 3, 64, 64), "other": (1,)})
    with pytest.raises(UserInputError, match="static shape"):
        LatencyEstimator(demo, {"image": (8, 3, 32, 32)})
    with pytest.raises(UserInputError, match="rank 4"):
        LatencyEstimator(demo, {"image": (8, 3, 48)})
    with pytest.raises(UserInputError, match="Unknown latency target 'a100'"):
        LatencyEstimator(demo, SHAPE, target="a100")


def test_foreign_nodes_are_refused(est: LatencyEstimator, demo):
    other = onnx.ModelProto()
    other.CopyFrom(demo)
    other.graph.node[0].name = "somebody_else/Conv"
    with pytest.raises(ValueError, match="somebody_else/Conv"):
        est.estimate(other)


def test_batch_scales_the_memory_bound_part(demo, rewriter):
    small = LatencyEstimator(demo, {"image": (8, 3, 64, 64)})
    big = LatencyEstimator(demo, {"image": (64, 3, 64, 64)})
    model = rewriter.apply(_all(rewriter, Precision.FP32))[0]
    assert big.estimate(model) > small.estimate(model)
    assert big.flops("block1/Conv") == 8 * small.flops("block1/Conv")


def test_tensors_of_unknown_size_are_explained_in_plain_words(caplog):
    """A data-dependent size (NonZero) cannot be priced: the warning says what that means."""
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
         helper.make_node("NonZero", ["m"], ["nz"], name="nz"),
         helper.make_node("Cast", ["nz"], ["y"], to=TensorProto.FLOAT, name="c")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with caplog.at_level("WARNING", logger="amp_search.latency_model"):
        est = LatencyEstimator(sanitize(model), {"x": (1, 4)})
    assert est.unknown_shapes == ("nz", "y")
    assert "size of 2 tensor(s)" in caplog.text and "may read low" in caplog.text
    assert "static shape" not in caplog.text and "count as empty" not in caplog.text
