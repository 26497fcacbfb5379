"""Profiling and risk: the demo's planted failures, and a by-hand cross-check on the detector."""

from __future__ import annotations

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
