"""Profiling and risk: the demo's planted failures, and a by-hand cross-check on the detector."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from amp_search.calibration import load_calibration, model_inputs
from amp_search.graph import find_units, sanitize
from amp_search.profiling import profile_model
from amp_search.profiling.inspection import inspect_model
from amp_search.profiling.sensitivity import RiskLevel
from amp_search.types import Precision

FP16, BF16 = Precision.FP16, Precision.BF16


def test_demo_overflow_and_flush_are_found(demo_model_path, demo_data_path):
    report = inspect_model(demo_model_path, demo_data_path)
    by_name = {r.unit.name: r for r in report.risks}
    amp4 = by_name["amp4/Conv"]
    assert amp4.level == RiskLevel.CRITICAL and amp4.max_abs > 65504
    assert amp4.deviation is not None and amp4.deviation.nonfinite > 0  # inf seen on CPU
    assert by_name["amp3/Conv"].level == RiskLevel.HIGH  # 10000 < |x| < 65504
    assert by_name["tiny/Conv"].weight_flush > 0
    # Downstream units inherit the inf rather than being blamed for it.
    assert "inherits" in by_name["head1/Conv"].reason
    assert by_name["stem/Conv"].level == RiskLevel.NONE
    assert report.risks[0].unit.name == "amp4/Conv"


def test_memory_is_per_batch_not_per_dataset(demo_model_path, tmp_path):
    """Profiling a folder streams files: n batches give the same ranges as one stacked file."""
    from amp_search.demo import demo_data

    stacked = demo_data(n_batches=3, batch=2)["image"]
    np.savez(tmp_path / "all.npz", image=stacked)
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(3):
        np.savez(folder / f"{i}.npz", image=stacked[i])
    model = sanitize(onnx.load(demo_model_path))
    units = find_units(model)
    a = profile_model(model, units, load_calibration(tmp_path / "all.npz", model_inputs(model)))
    b = profile_model(model, units, load_calibration(folder, model_inputs(model)))
    assert a.n_batches == b.n_batches == 3
    for name, t in a.tensors.items():
        assert t.max_abs == b.tensors[name].max_abs and t.n_flush == b.tensors[name].n_flush


def _by_hand_mark_all(path, feeds, threshold):
    """What people do today: every tensor as output, max |x| by hand, weights by hand."""
    model = onnx.load(path)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    outs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if types.get(name) == onnx.TensorProto.FLOAT and name not in outs:
                model.graph.output.append(helper.make_tensor_value_info(name, types[name], None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    hot = {n for n, v in values.items() if v.size and np.abs(v).max() > threshold}
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            weights[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    weights = {
        k: np.abs(v.astype(np.float32)) for k, v in weights.items() if v.dtype == np.float32
    }
    overflow_w = {k for k, a in weights.items() if (a > 65504).any()}
    flush_w = {k for k, a in weights.items() if ((a > 0) & (a < 2.98e-8)).any()}
    return hot, overflow_w, flush_w


@pytest.mark.slow
def test_detector_cross_check_with_by_hand_mark_all(real_model, tmp_path):
    """inspect flags exactly the layers a by-hand mark-all analysis finds on a real page."""
    path, feeds = real_model("ppocr_det")
    np.savez(tmp_path / "page.npz", **feeds)
    report = inspect_model(path, tmp_path / "page.npz")  # its time: benchmarks/RESULTS.md
    hot, overflow_w, flush_w = _by_hand_mark_all(path, feeds, threshold=10000)

    def rules(r):
        return {rule for _, rule, _ in r.findings}

    # Activations above the threshold: the same units, both ways.
    by_hand_units = {r.unit.name for r in report.risks if set(r.unit.tensors) & hot}
    range_units = {r.unit.name for r in report.risks if "activation-range" in rules(r)}
    assert by_hand_units == range_units
    # Weights above 65504 (the BatchNorm variance of 9.8e7): locked FP32, both ways.
    assert overflow_w, "the detector has a BatchNorm variance above 65504"
    locked = [r for r in report.risks if r.locked_fp32]
    assert {w for r in locked for w in r.unit.weights} & overflow_w == overflow_w
    assert all(set(r.unit.weights) & overflow_w for r in locked)
    # Weights that flush to zero: the same units, both ways.
    by_hand_flush = {r.unit.name for r in report.risks if set(r.unit.weights) & flush_w}
    flagged_flush = {r.unit.name for r in report.risks if "weight-flush" in rules(r)}
    assert by_hand_flush and by_hand_flush == flagged_flush


def test_a_rerun_on_the_same_model_and_data_reuses_the_profile(
    demo_model_path, demo_data_path, tmp_path, monkeypatch
):
    """The second inspect of one model and data profiles nothing (only the rules run again,
    so another threshold still applies); other data, or cache=False, profile again."""
    monkeypatch.setenv("AMP_SEARCH_CACHE", str(tmp_path / "cache"))
    stages: list[str] = []

    def progress(stage: str, done: int, total: int) -> None:
        stages.append(stage)

    first = inspect_model(demo_model_path, demo_data_path, progress=progress)
    assert stages and "cached_profile" not in first.extra
    assert len(list((tmp_path / "cache" / "inspect").glob("*.pkl"))) == 1
    stages.clear()
    again = inspect_model(demo_model_path, demo_data_path, progress=progress)
    assert not stages and again.extra["cached_profile"].endswith(".pkl")
    strip = lambda r: {k: v for k, v in r.to_json().items() if k != "seconds"}  # noqa: E731
    assert strip(again) == strip(first)
    # The rules run again on the cached profile: a lower threshold flags more.
    low = inspect_model(demo_model_path, demo_data_path, threshold=1e-3, progress=progress)
    assert not stages and low.counts() != first.counts()
    # Other data (one batch less) and cache=False profile again.
    data = dict(np.load(demo_data_path))
    other = tmp_path / "other.npz"
    np.savez(other, **{k: v[:-1] for k, v in data.items()})
    inspect_model(demo_model_path, other, progress=progress)
    assert stages
    stages.clear()
    inspect_model(demo_model_path, demo_data_path, progress=progress, cache=False)
    assert stages


# --- BF16 (issue 11 item 3): the all-BF16 pass, its column, the rescue rule ------------------


@pytest.fixture(scope="module")
def demo22_path(tmp_path_factory):
    """The demo at opset 22, where Conv and GlobalAveragePool admit bfloat16.

    The demo itself is opset 17, where the rewrite withholds BF16 from its Conv units.
    """
    from onnx import version_converter

    from amp_search.demo import build_demo_model

    path = tmp_path_factory.mktemp("demo22") / "demo22.onnx"
    onnx.save(version_converter.convert_version(build_demo_model(), 22), path)
    return path


def test_bf16_is_finite_where_fp16_overflows_and_the_rescue_rule_says_so(
    demo22_path, demo_data_path
):
    from rich.console import Console

    report = inspect_model(demo22_path, demo_data_path, precisions=(FP16, BF16), cache=False)
    by_name = {r.unit.name: r for r in report.risks}
    for r in report.risks:  # every unit measured in BF16, none withheld, all finite
        b = r.bf16_deviation
        assert b is not None and b.numel and r.bf16_withheld is None
        assert b.nonfinite == 0 and 0 < b.rel_l2 < 0.05, r.unit.name
    overflowing = [r for r in report.risks if r.deviation.nonfinite]
    assert len(overflowing) >= 5  # amp4 and all it feeds
    # The rule fires where FP16 itself overflows (critical), not where the inf is inherited.
    rescued = {r.unit.name for r in report.risks if r.bf16_rescue}
    assert rescued == {r.unit.name for r in report.risks if r.level == RiskLevel.CRITICAL}
    amp4 = by_name["amp4/Conv"]
    assert rescued == {"amp4/Conv"} and amp4.level == RiskLevel.CRITICAL
    assert f"{amp4.bf16_deviation.rel_l2:.2g}" in amp4.bf16_rescue
    assert "--precisions fp16,bf16" in amp4.bf16_rescue
    data = report.to_json()
    assert data["precisions"] == ["fp16", "bf16"] and data["bf16_rescued"] == ["amp4/Conv"]
    unit = data["units_by_risk"][0]
    assert unit["bf16"]["rel_l2"] == amp4.bf16_deviation.rel_l2 and unit["bf16_withheld"] is None
    console = Console(width=250, record=True)
    report.render(console, top=0)
    text = console.export_text()
    assert "BF16 rel.L2" in text and f"{amp4.bf16_deviation.rel_l2:.2e}" in text
    assert "amp4/Conv: BF16 rescues the FP16 overflow" in text


def test_fp16_only_report_is_as_before(demo_model_path, demo_data_path):
    """The default: no BF16 pass, column, rule or JSON key."""
    from rich.console import Console

    report = inspect_model(demo_model_path, demo_data_path)
    assert all(r.bf16_deviation is None and r.bf16_withheld is None for r in report.risks)
    assert not any(r.bf16_rescue for r in report.risks)
    data = report.to_json()
    assert not {"precisions", "bf16_rescued"} & set(data)
    assert not {"bf16", "bf16_withheld"} & set(data["units_by_risk"][0])
    console = Console(width=250, record=True)
    report.render(console)
    assert "BF16" not in console.export_text()


def _bf16(a):
    return a.astype(ml_dtypes.bfloat16).astype(np.float32)


def test_bf16_deviation_of_one_mul_matches_hand_rounding(tmp_path):
    """y = x * w: the BF16 rel. L2 is that of bf16(bf16(x) * bf16(w)) against x * w."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal(16) * 300).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"], name="mul")], "one",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 16])],
        [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "mul.onnx")
    x = (rng.standard_normal((3, 4, 16)) * 100).astype(np.float32)  # 3 batches
    np.savez(tmp_path / "x.npz", x=x)
    report = inspect_model(tmp_path / "mul.onnx", tmp_path / "x.npz", precisions=(FP16, BF16))
    (risk,) = report.risks
    ref = (x * w).astype(np.float64)
    hand = _bf16(_bf16(x) * _bf16(w)).astype(np.float64)
    rel_l2 = np.sqrt(np.sum((hand - ref) ** 2) / np.sum(ref**2))
    assert np.abs(ref).max() > 65504  # FP16 overflows here ...
    assert risk.deviation.nonfinite > 0 and risk.level == RiskLevel.CRITICAL
    b = risk.bf16_deviation  # ... BF16 does not, by the hand figure
    assert b.nonfinite == 0 and b.numel == x.size
    assert b.rel_l2 == pytest.approx(rel_l2, rel=1e-6) and 1e-4 < rel_l2 < 1e-2
    assert f"all-BF16 rel. L2 {rel_l2:.2g} here" in risk.bf16_rescue


def _demo_at_opset(version: int, tmp_path) -> str:
    """The demo declaring another opset: its ops (Conv, Relu, Mul, GlobalAveragePool,
    Flatten, Gemm) mean the same from opset 11 to 17, and the checker agrees."""
    from amp_search.demo import build_demo_model

    model = build_demo_model()
    model.opset_import[0].version = version
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / f"demo{version}.onnx"
    onnx.save(model, path)
    return str(path)


def test_bf16_is_withheld_from_every_unit_at_opset_11(tmp_path, demo_data_path):
    """Below opset 13 Cast has no bfloat16: every unit shows BF16 withheld, with the reason."""
    from rich.console import Console

    report = inspect_model(_demo_at_opset(11, tmp_path), demo_data_path,
                           precisions=(FP16, BF16))  # fmt: skip
    for r in report.risks:
        assert r.bf16_deviation is None and not r.bf16_rescue
        assert r.bf16_withheld.startswith("opset 11 has no bfloat16 Cast (from opset 13)")
    by_name = {r.unit.name: r for r in report.risks}
    assert "Conv (from opset 22)" in by_name["amp4/Conv"].bf16_withheld
    assert by_name["amp4/Conv"].level == RiskLevel.CRITICAL  # FP16 findings unchanged
    unit = report.to_json()["units_by_risk"][0]
    assert unit["bf16"] is None and unit["bf16_withheld"].startswith("opset 11")
    console = Console(width=250, record=True)
    report.render(console, top=0)
    text = console.export_text()
    assert text.count("withheld") >= len(report.risks)
    assert "BF16 withheld, opset 11 has no bfloat16 Cast" in text


def test_bf16_is_withheld_from_the_demo_conv_units_at_its_own_opset(
    demo_model_path, demo_data_path
):
    """Opset 17 (the demo's) types Conv bfloat16 only from 22: those units are withheld,
    the Gemm is measured."""
    report = inspect_model(demo_model_path, demo_data_path, precisions=(BF16,))
    by_name = {r.unit.name: r for r in report.risks}
    assert not report.fp16_pass and all(r.deviation is None for r in report.risks)
    conv = [r for r in report.risks if "Conv" in r.unit.op_types]
    assert conv and all(
        r.bf16_withheld == "opset 17 has no bfloat16 Conv (from opset 22)" for r in conv
    )
    fc = by_name["fc/Gemm"]
    assert fc.bf16_withheld is None and fc.bf16_deviation.numel and fc.bf16_deviation.rel_l2 < 0.05


def test_a_bf16_run_does_not_reuse_an_fp16_only_profile(
    demo_model_path, demo_data_path, tmp_path, monkeypatch
):
    """The precisions are part of the cache key: fp16 and fp16,bf16 profiles live apart."""
    monkeypatch.setenv("AMP_SEARCH_CACHE", str(tmp_path / "cache"))

    def units(**kw):
        report = inspect_model(demo_model_path, demo_data_path, **kw)
        return report.extra.get("cached_profile"), report.to_json()["units_by_risk"]

    cached, fp16 = units()
    assert cached is None
    cached, both = units(precisions=(FP16, BF16))
    assert cached is None and any(u["bf16_withheld"] for u in both)  # the BF16 pass ran
    cached, again = units(precisions=(BF16, FP16))  # in any order: that profile
    assert cached and again == both
    cached, again = units()
    assert cached and again == fp16
