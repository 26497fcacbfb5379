"""BF16 units in the rewrite and the FP32 twin (issue 11): validity, Casts, deviation, digests."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper, version_converter

from amp_search.demo import build_demo_model, demo_data
from amp_search.graph import MixedPrecisionRewriter, find_units, sanitize
from amp_search.graph.precision import LOW_PRECISION_SUFFIX
from amp_search.testing.graphs import io_types as _io
from amp_search.testing.graphs import run_cpu as _run
from amp_search.testing.graphs import run_twin as _run_twin
from amp_search.testing.graphs import tiny_model as _model
from amp_search.testing.graphs import value_info as _vi
from amp_search.types import Precision, PrecisionAssignment

BF16, FP16, FP32 = Precision.BF16, Precision.FP16, Precision.FP32


def _casts(model: onnx.ModelProto) -> list[tuple[str, str, int]]:
    return [
        (n.input[0], n.output[0], n.attribute[0].i)
        for n in model.graph.node
        if n.op_type == "Cast"
    ]


def _bf16_round(a: np.ndarray) -> np.ndarray:
    return a.astype(ml_dtypes.bfloat16).astype(np.float32)


def _conv_relu(opset: int) -> onnx.ModelProto:
    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w"
    )
    return sanitize(
        _model(
            [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])],
            [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 4, 8, 8])], [w], opset=opset,
        )
    )  # fmt: skip


# --- digests --------------------------------------------------------------------------------


def test_digests_of_fp32_fp16_assignments_are_unchanged():
    """Regression pin: the values main computed before BF16 existed."""
    pa = PrecisionAssignment
    assert pa.from_mapping({"a": "fp16", "b": "fp32", "c": "fp16"}).digest() == "300afc4d195ef414"
    assert pa.from_mapping({"a": "fp32"}).digest() == "4f53cda18c2baa0c"
    assert pa.from_mapping({}).digest() == "4f53cda18c2baa0c"
    assert pa.uniform(["conv1", "conv2", "gemm"], FP16).digest() == "1ca66af45ad30e93"


def test_bf16_units_change_the_digest():
    base = {"a": FP16, "b": FP32, "c": FP16}
    d0 = PrecisionAssignment.from_mapping(base).digest()
    with_bf16 = PrecisionAssignment.from_mapping({**base, "b": BF16})
    assert with_bf16.bf16_units == {"b"}
    assert with_bf16.fp16_units == {"a", "c"}
    assert with_bf16.low_precision_units == {"a", "b", "c"}
    assert with_bf16.units_at(BF16) == {"b"}
    assert with_bf16.to_json()["b"] == "bf16"
    digests = {
        d0,
        with_bf16.digest(),
        PrecisionAssignment.from_mapping({**base, "a": BF16}).digest(),
        PrecisionAssignment.from_mapping({"a": BF16, "b": BF16, "c": BF16}).digest(),
        PrecisionAssignment.from_mapping({"a": FP16, "b": FP16, "c": FP16}).digest(),
    }
    assert len(digests) == 5
    assert with_bf16.digest() == PrecisionAssignment.from_mapping({**base, "b": "bf16"}).digest()


# --- the rewrite on small models --------------------------------------------------------------


def test_bf16_conv_relu_gets_bf16_weights_and_names_at_opset_22():
    m = _conv_relu(22)
    unit = find_units(m)[0].name
    out, report = MixedPrecisionRewriter(m).apply(PrecisionAssignment.from_mapping({unit: BF16}))
    onnx.checker.check_model(out, full_check=True)
    assert _io(out) == _io(m)
    assert {i.name: i.data_type for i in out.graph.initializer} == {
        "w__bf16": TensorProto.BFLOAT16
    }
    assert _casts(out) == [
        ("x", "x" + LOW_PRECISION_SUFFIX[BF16], TensorProto.BFLOAT16),
        ("y__bf16", "y", TensorProto.FLOAT),
    ]
    assert len(report.bf16_nodes) == 2 and not report.fp16_nodes and not report.bf16_unsupported
    assert report.to_json()["bf16_nodes"] == 2
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    (ref,) = _run(m, {"x": x})
    (got,) = _run_twin(out, {"x": x})
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 1e-4 < rel < 2e-2  # BF16 rounding happened, and only rounding


def test_bf16_withheld_from_ops_the_opset_does_not_type_bf16():
    """Conv admits tensor(bfloat16) only from opset 22: at 17 it stays FP32, Relu runs BF16."""
    m = _conv_relu(17)
    unit = find_units(m)[0].name
    out, report = MixedPrecisionRewriter(m).apply(PrecisionAssignment.from_mapping({unit: BF16}))
    onnx.checker.check_model(out, full_check=True)
    conv = next(n.name for n in m.graph.node if n.op_type == "Conv")
    assert report.bf16_unsupported == [conv]
    assert report.bf16_nodes == [next(n.name for n in m.graph.node if n.op_type == "Relu")]
    assert [i.data_type for i in out.graph.initializer] == [TensorProto.FLOAT]
    assert [o.version for o in out.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert "bf16_unsupported" in report.to_json()


def test_fp16_only_report_json_has_no_bf16_keys():
    m = _conv_relu(22)
    unit = find_units(m)[0].name
    _, report = MixedPrecisionRewriter(m).apply(PrecisionAssignment.from_mapping({unit: FP16}))
    assert not any(k.startswith("bf16") for k in report.to_json())


def _chain() -> onnx.ModelProto:
    """Softmax -> Softmax -> Softmax, three units."""
    return sanitize(
        _model(
            [helper.make_node("Softmax", ["x"], ["a"], axis=-1),
             helper.make_node("Softmax", ["a"], ["b"], axis=-1),
             helper.make_node("Softmax", ["b"], ["y"], axis=-1)],
            [_vi("x", [6])], [_vi("y", [6])],
        )
    )  # fmt: skip


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return (e / e.sum()).astype(np.float32)


def test_fp16_bf16_boundaries_go_through_fp32():
    m = _chain()
    first, second, third = (u.name for u in find_units(m))
    a = PrecisionAssignment.from_mapping({first: FP16, second: BF16, third: FP16})
    out, report = MixedPrecisionRewriter(m).apply(a)
    onnx.checker.check_model(out, full_check=True)
    assert _io(out) == _io(m)
    f16, bf16, f32 = TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.FLOAT
    assert _casts(out) == [
        ("x", "x__fp16", f16),
        ("a__fp16", "a", f32),  # FP16 -> FP32 -> BF16
        ("a", "a__bf16", bf16),
        ("b__bf16", "b", f32),  # BF16 -> FP32 -> FP16
        ("b", "b__fp16", f16),
        ("y__fp16", "y", f32),
    ]
    assert len(report.fp16_nodes) == 2 and len(report.bf16_nodes) == 1
    x = np.linspace(-3, 3, 6, dtype=np.float32)
    (got,) = _run_twin(out, {"x": x})

    def r16(v: np.ndarray) -> np.ndarray:
        return v.astype(np.float16).astype(np.float32)

    hand = r16(_softmax(r16(_softmax(_bf16_round(r16(_softmax(r16(x))))))))
    np.testing.assert_allclose(got, hand, rtol=1e-3)


def test_no_cast_between_bf16_units_and_shape_reads_bf16():
    shape = numpy_helper.from_array(np.array([2, 3], np.int64), "shape")
    m = sanitize(
        _model(
            [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Reshape", ["a", "shape"], ["r"]),
             helper.make_node("Softmax", ["r"], ["y"], axis=-1),
             helper.make_node("Shape", ["a"], ["s"])],
            [_vi("x", [6])], [_vi("y", [2, 3]), _vi("s", [1], TensorProto.INT64)], [shape],
        )
    )  # fmt: skip
    names = [u.name for u in find_units(m)]
    out, report = MixedPrecisionRewriter(m).apply(PrecisionAssignment.uniform(names, BF16))
    onnx.checker.check_model(out, full_check=True)
    assert len(_casts(out)) == 2  # one in, one out; the Reshape follows in BF16
    assert "Reshape" in {n.op_type for n in out.graph.node if n.name in report.bf16_nodes}
    assert next(n for n in out.graph.node if n.op_type == "Shape").input[0] == "a__bf16"
    got = _run_twin(out, {"x": np.arange(6, dtype=np.float32)})
    assert got[1].tolist() == [6]


def test_bf16_weight_overflowing_bf16_keeps_node_fp32():
    big = numpy_helper.from_array(np.array([3.4e38, 1e38], np.float32), "big")
    m = sanitize(
        _model([helper.make_node("Mul", ["x", "big"], ["y"])], [_vi("x", [2])], [_vi("y", [2])],
               [big])
    )  # fmt: skip
    rw = MixedPrecisionRewriter(m)
    _, report = rw.apply(PrecisionAssignment.uniform([u.name for u in rw.units], BF16))
    assert report.forced_fp32 == [m.graph.node[0].name] and not report.bf16_nodes
    # FP16 overflows here too; 1e6 does not overflow BF16
    ok = numpy_helper.from_array(np.array([1e6, 2.0], np.float32), "ok")
    m2 = sanitize(
        _model([helper.make_node("Mul", ["x", "ok"], ["y"])], [_vi("x", [2])], [_vi("y", [2])],
               [ok])
    )  # fmt: skip
    rw2 = MixedPrecisionRewriter(m2)
    names = [u.name for u in rw2.units]
    _, r16 = rw2.apply(PrecisionAssignment.uniform(names, FP16))
    out, r = rw2.apply(PrecisionAssignment.uniform(names, BF16))
    assert r16.forced_fp32 and not r.forced_fp32 and r.bf16_nodes
    assert r.bf16_initializers[0].n_overflow == 0


def test_serialized_bf16_rewrite_is_the_same_model():
    m = _conv_relu(22)
    rw = MixedPrecisionRewriter(m)
    a = PrecisionAssignment.uniform([u.name for u in rw.units], BF16)
    full, _ = rw.apply(a)
    parts, _, _ = rw.apply_serialized(a)
    back = onnx.load_from_string(b"".join(parts))
    assert back.graph.node == full.graph.node
    key = onnx.TensorProto.SerializeToString
    assert sorted(map(key, back.graph.initializer)) == sorted(map(key, full.graph.initializer))


# --- the emulated deviation against a hand computation ------------------------------------------


def test_emulated_bf16_matmul_matches_hand_rounding():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 5)).astype(np.float32)
    m = sanitize(
        _model(
            [helper.make_node("MatMul", ["x", "w"], ["y"])],
            [_vi("x", [4, 16])], [_vi("y", [4, 5])], [numpy_helper.from_array(w, "w")],
        )
    )  # fmt: skip
    unit = find_units(m)[0].name
    out, report = MixedPrecisionRewriter(m).apply(PrecisionAssignment.from_mapping({unit: BF16}))
    onnx.checker.check_model(out, full_check=True)
    assert report.bf16_nodes == [m.graph.node[0].name]
    x = rng.standard_normal((4, 16)).astype(np.float32)
    (got,) = _run_twin(out, {"x": x})
    (ref,) = _run(m, {"x": x})
    hand = _bf16_round(_bf16_round(x) @ _bf16_round(w))
    # Equal up to FP32 summation order before the final BF16 rounding (one BF16 step at most).
    step = np.abs(hand) * 2.0**-7
    assert np.all(np.abs(got - hand) <= step)
    assert np.mean(got == hand) > 0.9
    dev, hand_dev = np.abs(got - ref).max(), np.abs(hand - ref).max()
    assert dev > 0 and abs(dev - hand_dev) <= 2.0**-7 * np.abs(ref).max()


# --- the demo: FP16 overflows, BF16 does not ---------------------------------------------------


def _demo_at(opset: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    m = build_demo_model()
    if opset != 17:
        m = version_converter.convert_version(m, opset)
    image = demo_data(n_batches=1, batch=2)["image"][0]
    return sanitize(m), {"image": image}


def test_demo_fp16_overflows_and_bf16_stays_finite():
    """Opset 22 (BF16 Conv): all-FP16 gives inf/NaN, all-BF16 stays finite and near FP32."""
    m, feeds = _demo_at(22)
    rw = MixedPrecisionRewriter(m)
    names = [u.name for u in rw.units]
    (ref,) = _run(m, feeds)
    out16, _ = rw.apply(PrecisionAssignment.uniform(names, FP16))
    out_bf, report = rw.apply(PrecisionAssignment.uniform(names, BF16))
    onnx.checker.check_model(out_bf, full_check=True)
    assert not report.bf16_unsupported and not report.fp16_nodes
    (got16,) = _run_twin(out16, feeds)
    (got_bf,) = _run_twin(out_bf, feeds)
    assert not np.isfinite(got16).all()
    assert np.isfinite(got_bf).all()
    assert np.abs(got_bf - ref).max() < 0.1 * np.abs(ref).max()


def test_demo_at_its_own_opset_withholds_bf16_conv():
    m, feeds = _demo_at(17)
    rw = MixedPrecisionRewriter(m)
    names = [u.name for u in rw.units]
    out, report = rw.apply(PrecisionAssignment.uniform(names, BF16))
    onnx.checker.check_model(out, full_check=True)
    ops = {n.op_type for n in m.graph.node if n.name in report.bf16_unsupported}
    assert "Conv" in ops and report.bf16_nodes
    (got,) = _run_twin(out, feeds)
    assert got.shape == _run(m, feeds)[0].shape


def test_demo_mixed_fp16_bf16_is_valid_and_runs():
    m, feeds = _demo_at(22)
    rw = MixedPrecisionRewriter(m)
    names = [u.name for u in rw.units]
    a = PrecisionAssignment.from_mapping(
        {n: (BF16, FP16, FP32)[k % 3] for k, n in enumerate(names)}
    )
    out, report = rw.apply(a)
    onnx.checker.check_model(out, full_check=True)
    assert _io(out) == _io(m)
    assert report.fp16_nodes and report.bf16_nodes
    (got,) = _run_twin(out, feeds)
    assert got.shape == _run(m, feeds)[0].shape


# (Every real model with BF16: test_precision.py's real-model test, parametrized.)


def test_bf16_pow_keeps_its_fp32_exponent_where_the_opset_types_it_so():
    """Pow-13 types the exponent (T1) without bfloat16: the base goes BF16, the exponent stays."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    m = sanitize(
        _model(
            [helper.make_node("Pow", ["x", "two"], ["y"])], [_vi("x", [4])], [_vi("y", [4])],
            [two], opset=14,
        )
    )  # fmt: skip
    unit = find_units(m)[0].name
    out, report = MixedPrecisionRewriter(m).apply(PrecisionAssignment.from_mapping({unit: BF16}))
    onnx.checker.check_model(out, full_check=True)
    assert report.bf16_nodes and not report.bf16_unsupported
    pow_node = next(n for n in out.graph.node if n.op_type == "Pow")
    assert list(pow_node.input) == ["x__bf16", "two"]
    x = np.array([1.5, -3.0, 0.1, 100.0], np.float32)
    (got,) = _run_twin(out, {"x": x})
    np.testing.assert_array_equal(got, _bf16_round(_bf16_round(x) ** 2))


def test_ort_cpu_backend_runs_a_bf16_candidate_through_its_twin(tmp_path):
    """The ORT backend's CPU default (emulate_fp16_storage=1) runs the BF16 candidate's twin."""
    from amp_search.backends import BuildConfig
    from amp_search.backends.ort import OnnxRuntimeBackend

    m, feeds = _demo_at(22)
    rw = MixedPrecisionRewriter(m)
    out, _ = rw.apply(PrecisionAssignment.uniform([u.name for u in rw.units], BF16))
    path = tmp_path / "bf16.onnx"
    onnx.save(out, path)
    backend = OnnxRuntimeBackend()
    cand = backend.build(path, BuildConfig("cpu"))
    with backend.open(cand) as r:
        got = r.infer(feeds)
    (want,) = _run_twin(out, feeds)
    (name,) = got
    assert np.isfinite(got[name]).all()
    np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6)


def test_the_latency_estimator_prices_bf16_as_fp16():
    """Every target the roofline knows has BF16 Tensor Cores at FP16's rate: all-BF16 and
    all-FP16 of the demo at opset 22 (the same nodes low precision) estimate alike, and both
    below all-FP32; the estimator reads BF16 nodes by the rewriter's naming contract."""
    from amp_search.latency_model import LatencyEstimator

    model, feeds = _demo_at(22)
    units = find_units(model)
    names = [u.name for u in units]
    rewriter = MixedPrecisionRewriter(model, units)
    est = LatencyEstimator(model, {k: v.shape for k, v in feeds.items()}, target="h100")
    fp16 = est.estimate_assignment(rewriter, PrecisionAssignment.uniform(names, Precision.FP16))
    bf16 = est.estimate_assignment(rewriter, PrecisionAssignment.uniform(names, Precision.BF16))
    fp32 = est.estimate_assignment(rewriter, PrecisionAssignment.uniform(names, Precision.FP32))
    assert bf16 == pytest.approx(fp16, rel=1e-9)
    assert bf16 < fp32
