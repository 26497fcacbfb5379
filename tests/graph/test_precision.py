"""The mixed-precision rewrite: validity, IO preservation, FP32 identity, FP16 effects.

The real-model property runs with FP16 and with BF16 (the BF16 specifics: test_bf16.py).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper, version_converter

from amp_search.graph import MixedPrecisionRewriter, apply_assignment, find_units, sanitize
from amp_search.graph.emulate import emulating_fp16_storage
from amp_search.testing.graphs import io_types as _io
from amp_search.testing.graphs import run_cpu as _run
from amp_search.testing.graphs import run_twin as _run_twin
from amp_search.testing.graphs import tiny_model as _model
from amp_search.testing.graphs import value_info as _vi
from amp_search.types import Precision, PrecisionAssignment


def test_all_fp16_conv_relu_switches_types_and_keeps_io():
    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w"
    )
    m = sanitize(
        _model(
            [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])],
            [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 4, 8, 8])], [w],
        )
    )  # fmt: skip
    units = find_units(m)
    assert [u.op_types for u in units] == [("Conv", "Relu")]
    out = apply_assignment(m, {units[0].name: "fp16"})
    onnx.checker.check_model(out, full_check=True)
    assert _io(out) == _io(m)
    init_types = {i.name: i.data_type for i in out.graph.initializer}
    assert init_types == {"w__fp16": TensorProto.FLOAT16}
    casts = [n for n in out.graph.node if n.op_type == "Cast"]
    assert [c.attribute[0].i for c in casts] == [TensorProto.FLOAT16, TensorProto.FLOAT]
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    (ref,) = _run(m, {"x": x})
    (got,) = _run(out, {"x": x})
    assert got.dtype == np.float32
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 0 < rel < 5e-3  # FP16 rounding happened, and only rounding


def test_input_model_not_mutated_and_fp32_assignment_is_identity():
    m = sanitize(
        _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [2])], [_vi("y", [2])])
    )
    before = m.SerializeToString()
    unit = find_units(m)[0].name
    apply_assignment(m, {unit: Precision.FP16})
    assert m.SerializeToString() == before
    same = apply_assignment(m, {unit: Precision.FP32})
    assert same.SerializeToString() == before


def test_resize_scales_stay_fp32_and_model_stays_valid():
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    roi = numpy_helper.from_array(np.array([], np.float32), "roi")
    m = sanitize(
        _model(
            [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Resize", ["r", "roi", "scales"], ["z"], mode="linear"),
             helper.make_node("Sigmoid", ["z"], ["y"])],
            [_vi("x", [1, 2, 4, 4])], [_vi("y", [1, 2, 8, 8])], [scales, roi],
        )
    )  # fmt: skip
    names = [u.name for u in find_units(m)]
    out = apply_assignment(m, PrecisionAssignment.uniform(names, Precision.FP16))
    onnx.checker.check_model(out, full_check=True)
    resize = next(n for n in out.graph.node if n.op_type == "Resize")
    assert resize.input[0].endswith("__fp16")  # the follower runs FP16 between FP16 units
    assert resize.input[1:] == ["roi", "scales"]  # spec-typed inputs untouched
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(out, {"x": x})[0], _run(m, {"x": x})[0], atol=2e-3)


def test_layernorm_fp32_only_outputs_stay_fp32():
    scale = numpy_helper.from_array(np.ones(8, np.float32), "s")
    bias = numpy_helper.from_array(np.zeros(8, np.float32), "b")
    ln = helper.make_node("LayerNormalization", ["x", "s", "b"], ["y", "mean", "inv"], axis=-1)
    outs = [_vi("y", [2, 8]), _vi("mean", [2, 1]), _vi("inv", [2, 1])]
    m = sanitize(_model([ln], [_vi("x", [2, 8])], outs, [scale, bias]))
    out = apply_assignment(m, {find_units(m)[0].name: "fp16"})
    onnx.checker.check_model(out, full_check=True)
    ln = next(n for n in out.graph.node if n.op_type == "LayerNormalization")
    assert ln.output[0].endswith("__fp16") and list(ln.output[1:]) == ["mean", "inv"]
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    assert _run(out, {"x": x})[0].dtype == np.float32


def test_weight_that_overflows_fp16_keeps_its_node_fp32():
    big = numpy_helper.from_array(np.array([1e6], np.float32), "big")
    m = sanitize(
        _model(
            [helper.make_node("Mul", ["x", "big"], ["y"])], [_vi("x", [3])], [_vi("y", [3])], [big]
        )
    )
    rw = MixedPrecisionRewriter(m)
    out, report = rw.apply(PrecisionAssignment.uniform([u.name for u in rw.units], Precision.FP16))
    assert report.forced_fp32 == [m.graph.node[0].name]
    assert not report.fp16_nodes
    assert all(i.data_type == TensorProto.FLOAT for i in out.graph.initializer)


def test_initializer_loss_counts_subnormal_and_flush():
    w = numpy_helper.from_array(np.array([1.0, 1e-5, 1e-9, 0.0, 7e4], np.float32), "w")
    m = sanitize(
        _model([helper.make_node("Add", ["x", "w"], ["y"])], [_vi("x", [5])], [_vi("y", [5])], [w])
    )
    loss = MixedPrecisionRewriter(m).weight_loss("w")
    assert (loss.n_subnormal, loss.n_flush, loss.n_overflow) == (2, 1, 1)


def test_no_cast_round_trip_between_fp16_units():
    """FP16 -> FP16 through a Reshape needs no Cast at all."""
    shape = numpy_helper.from_array(np.array([2, 4], np.int64), "shape")
    m = sanitize(
        _model(
            [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Reshape", ["a", "shape"], ["r"]),
             helper.make_node("Softmax", ["r"], ["y"], axis=-1)],
            [_vi("x", [8])], [_vi("y", [2, 4])], [shape],
        )
    )  # fmt: skip
    names = [u.name for u in find_units(m)]
    out = apply_assignment(m, PrecisionAssignment.uniform(names, Precision.FP16))
    casts = [n for n in out.graph.node if n.op_type == "Cast"]
    assert len(casts) == 2  # one in, one out: nothing in between
    # Mixed: Relu FP16, Softmax FP32 -> Reshape stays FP32 and one Cast back suffices.
    out2 = apply_assignment(m, {names[0]: "fp16"})
    onnx.checker.check_model(out2, full_check=True)
    assert sum(n.op_type == "Cast" for n in out2.graph.node) == 2


def test_if_subgraph_passes_through_and_reads_fp32_names():
    then_g = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["o"])], "then", [], [_vi("o", [3])]
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["a"], ["o2"])], "else", [], [_vi("o2", [3])]
    )
    m = sanitize(
        _model(
            [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
            [_vi("x", [3]), _vi("c", [], TensorProto.BOOL)], [_vi("y", [3])],
        )
    )  # fmt: skip
    units = find_units(m)
    assert [u.kind for u in units] == ["Relu"]  # the If and its body are no units
    out = apply_assignment(m, {units[0].name: "fp16"})
    onnx.checker.check_model(out, full_check=True)
    x = np.array([-1, 2, 3], np.float32)
    for c in (True, False):
        got = _run(out, {"x": x, "c": np.array(c)})[0]
        np.testing.assert_allclose(got, _run(m, {"x": x, "c": np.array(c)})[0])


# --- every real model of ../shared/models: the rewrite property -------------------------------

REAL = ["ppocr_cls", "ppocr_det", "ppocr_rec", "minilm"]
PPOCR = REAL[:-1]
FP16, BF16 = Precision.FP16, Precision.BF16


def _real_cases() -> list[Any]:
    """(model, low precision, opset converted to or None): FP16 at the model's opset; BF16
    there (PP-OCR's 11/12 type no op BF16) and, for PP-OCR, at 22, where its convolutions do."""
    slow = pytest.mark.slow
    return [
        *(pytest.param(n, FP16, None, marks=slow, id=f"{n}-fp16") for n in REAL),
        *(pytest.param(n, BF16, None, id=f"{n}-bf16") for n in PPOCR),
        pytest.param("minilm", BF16, None, marks=slow, id="minilm-bf16"),  # MiniLM: ~5 s
        *(pytest.param(n, BF16, 22, marks=slow, id=f"{n}-bf16-opset22") for n in PPOCR),
    ]


def _real(name: str, real_model, low: Precision, opset: int | None):
    """The original model (converted to ``opset``) and feeds small enough for many runs."""
    path, feeds = real_model(name)
    original = onnx.load(path)
    if opset is not None:
        original = version_converter.convert_version(original, opset)
    if name == "ppocr_det":  # a smaller page keeps the runs quick; the model is the same
        side = 320 if low is FP16 else 160  # the BF16 twin runs slower
        feeds = {k: v[:, :, :side, :side] for k, v in feeds.items()}
    if name == "minilm" and low is BF16:
        feeds = {k: v[:1] for k, v in feeds.items()}
    return original, feeds


def _real_assignments(
    names: list[str], low: Precision, opset: int | None
) -> list[PrecisionAssignment]:
    """All-FP32, all-``low``, then random mixes: FP32/FP16 (20), or FP32/FP16/BF16 (1; 3 at
    a converted opset)."""
    fixed = [PrecisionAssignment.uniform(names, Precision.FP32),
             PrecisionAssignment.uniform(names, low)]  # fmt: skip
    if low is FP16:
        rng = random.Random(0)
        return fixed + [
            PrecisionAssignment.with_fp16(names, [n for n in names if rng.random() < 0.5])
            for _ in range(20)
        ]
    mixes = []
    for seed in range(1 if opset is None else 3):
        three = random.Random(seed)
        mixes.append(PrecisionAssignment.from_mapping(
            {n: three.choice([Precision.FP32, FP16, BF16]) for n in names}
        ))  # fmt: skip
    return fixed + mixes


@pytest.mark.parametrize(("name", "low", "opset"), _real_cases())
def test_rewrite_property_on_real_model(name, low, opset, real_model):
    """All-FP32, all-FP16/BF16 and random mixes: valid under full_check, IO kept, runnable
    (BF16 through the FP32 twin ORT CPU runs), all-FP32 bit-exact."""
    original, feeds = _real(name, real_model, low, opset)
    ref = _run(original, feeds)
    rw = MixedPrecisionRewriter(sanitize(original))
    run = _run if low is FP16 else _run_twin
    reports = []
    for k, a in enumerate(_real_assignments([u.name for u in rw.units], low, opset)):
        out, report = rw.apply(a)
        reports.append(report)
        onnx.checker.check_model(out, full_check=True)
        assert _io(out) == _io(original), f"assignment {k} changed graph inputs/outputs"
        got = run(out, feeds)
        assert [g.dtype for g in got] == [r.dtype for r in ref]
        assert [g.shape for g in got] == [r.shape for r in ref]
        if k == 0:
            assert not report.low_precision_nodes
            for g, r in zip(got, ref, strict=True):
                assert np.array_equal(g, r), "all-FP32 must reproduce the original bit for bit"
        elif low is FP16:
            assert report.fp16_nodes or not a.fp16_units
    if low is BF16:
        _check_bf16_coverage(rw, reports[1], opset)


def _check_bf16_coverage(rw: MixedPrecisionRewriter, all_bf16: Any, opset: int | None) -> None:
    """Which nodes the all-BF16 rewrite ran BF16: none below opset 13, as FP16's otherwise."""
    if opset is not None:  # PP-OCR at 22: its convolutions run BF16
        assert not all_bf16.bf16_unsupported and all_bf16.bf16_nodes
    elif rw.index.opset < 13:  # PP-OCR (11, 12): Cast has no bfloat16 yet, BF16 withheld
        assert not all_bf16.bf16_nodes and all_bf16.bf16_unsupported
    else:  # MiniLM (14): every node the all-FP16 rewrite runs low runs BF16
        _, r16 = rw.apply(rw.all_fp16())
        assert sorted(all_bf16.bf16_nodes) == sorted(r16.fp16_nodes)


@pytest.mark.parametrize("name", ["ppocr_cls", "minilm"])
def test_serialized_rewrite_is_the_same_model(name, real_model):
    """apply_serialized's chunks parse to exactly what apply returns, weights included."""
    path, _ = real_model(name)
    rw = MixedPrecisionRewriter(sanitize(onnx.load(path)))
    names = [u.name for u in rw.units]
    rng = random.Random(1)
    for _ in range(3):
        a = PrecisionAssignment.with_fp16(names, [n for n in names if rng.random() < 0.5])
        full, report = rw.apply(a)
        parts, skeleton, report2 = rw.apply_serialized(a)
        back = onnx.load_from_string(b"".join(parts))
        assert back.graph.node == full.graph.node
        key = onnx.TensorProto.SerializeToString
        assert sorted(map(key, back.graph.initializer)) == sorted(map(key, full.graph.initializer))
        assert not skeleton.graph.initializer and skeleton.graph.node == full.graph.node
        assert report2.fp16_nodes == report.fp16_nodes


def test_twin_of_a_model_with_external_data_is_written_a_weight_at_a_time(tmp_path):
    """Weights in external data: the FP32 twin is saved beside the model, its weights read
    and written one at a time, and it computes exactly what the in-memory twin does."""
    rng = np.random.default_rng(0)
    w1, w2 = (numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), n)
              for n in ("w1", "w2"))  # fmt: skip
    m = sanitize(
        _model(
            [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])],
            [_vi("x", [2, 16])], [_vi("y", [2, 16])], [w1, w2],
        )
    )  # fmt: skip
    first = find_units(m)[0].name  # w1 goes FP16, w2 stays FP32: both kinds of weight
    out = apply_assignment(m, {first: "fp16"})
    x = {"x": rng.standard_normal((2, 16)).astype(np.float32)}
    (want,) = _run_twin(out, x)  # in memory (onnx.save_model below empties out's weights)
    path = tmp_path / "m.onnx"
    onnx.save_model(out, path, save_as_external_data=True, location="m.onnx.data",
                    size_threshold=0)  # fmt: skip
    twin = emulating_fp16_storage(path)
    assert isinstance(twin, str) and Path(twin).parent.name.startswith(".emulated-")
    saved = onnx.load(twin)
    assert {t.name: t.data_type for t in saved.graph.initializer} == {
        "w1__fp16": TensorProto.FLOAT,
        "w2": TensorProto.FLOAT,
    }
    np.testing.assert_array_equal(_run(saved, x)[0], want)
