"""CandidateEvaluator on the demo model, set up as a search sets it up (``search/prepare.py``).

Real ONNX Runtime (CPU), the real rel_l2 metric, a real results directory. Deviations are
checked against an independent computation: the candidate's ONNX file and the original model
run here with plain ONNX Runtime sessions, and ``||y - ref|| / ||ref||`` taken with numpy. The
demo model overflows FP16 by design (its ``amp*`` convolutions), so the all-FP16 assignment
scores an infinite deviation and a mixed one a finite positive deviation.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from amp_search.backends import BuildConfig, get_backend
from amp_search.calibration import load_calibration, model_inputs
from amp_search.demo import DEMO_INPUT, build_demo_model
from amp_search.graph import MixedPrecisionRewriter, find_units, sanitize
from amp_search.latency_model import LatencyEstimator
from amp_search.objective import load_metric
from amp_search.profiling.ranges import profile_model
from amp_search.results.store import ResultsStore
from amp_search.search.evaluate import CandidateEvaluator, LatencySettings
from amp_search.timing import TimingPlan
from amp_search.types import Precision, PrecisionAssignment

#: Well-scaled units of the demo model: FP16 there leaves a small, finite deviation.
SAFE_FP16 = ("stem/Conv", "head1/Conv")


@pytest.fixture(scope="module")
def prepared(demo_data_path):
    """What ``_run_search`` prepares before it builds the evaluator."""
    model = sanitize(build_demo_model())
    units = find_units(model)
    data = load_calibration(demo_data_path, model_inputs(model))
    rewriter = MixedPrecisionRewriter(model, units)
    prof = profile_model(model, units, data, fp16_pass=True, keep_reference=True,
                         rewriter=rewriter)  # fmt: skip
    shapes = {k: tuple(v.shape) for k, v in data.first().items()}
    observed = {n: t.shape for n, t in prof.tensors.items() if t.shape is not None}
    estimator = LatencyEstimator(model, shapes, target="h100", known_shapes=observed)
    return {"units": [u.name for u in units], "data": data, "rewriter": rewriter,
            "reference": prof.reference_outputs, "estimator": estimator}  # fmt: skip


def _evaluator(prepared, out, latency=None):
    latency = latency or LatencySettings(source="estimated", target="h100")
    return CandidateEvaluator(
        prepared["rewriter"], get_backend("onnxruntime"), BuildConfig(device="cpu"),
        prepared["data"], prepared["reference"], load_metric("rel_l2"), ResultsStore(out),
        latency, estimator=prepared["estimator"] if latency.source == "estimated" else None,
    )  # fmt: skip


def _rel_l2_by_hand(candidate_path, demo_data_path):
    """rel_l2 of a candidate file against the unsanitized demo model, over every batch."""
    batches = np.load(demo_data_path)[DEMO_INPUT]
    fp32 = ort.InferenceSession(build_demo_model().SerializeToString(),
                                providers=["CPUExecutionProvider"])  # fmt: skip
    cand = ort.InferenceSession(str(candidate_path), providers=["CPUExecutionProvider"])
    ref = np.concatenate([fp32.run(None, {DEMO_INPUT: b})[0].ravel() for b in batches])
    got = np.concatenate([cand.run(None, {DEMO_INPUT: b})[0].ravel() for b in batches])
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def test_all_fp32_scores_no_deviation_and_a_finite_latency(prepared, tmp_path):
    ev = _evaluator(prepared, tmp_path / "out")
    result = ev.evaluate(PrecisionAssignment.uniform(prepared["units"], Precision.FP32))
    assert result.finite
    assert result.deviation <= 1e-6
    assert result.deviations["rel_l2"] == result.deviation
    assert sorted(result.fp32_units) == sorted(prepared["units"])
    assert not result.cached
    assert math.isfinite(result.latency.median_ms) and result.latency.median_ms > 0
    assert result.latency.source == "estimated:h100"


def test_a_mixed_assignment_deviates_as_onnxruntime_says(prepared, tmp_path, demo_data_path):
    ev = _evaluator(prepared, tmp_path / "out")
    mixed = PrecisionAssignment.with_fp16(prepared["units"], SAFE_FP16)
    result = ev.evaluate(mixed)
    assert result.finite
    assert 0 < result.deviation < 1e-2
    by_hand = _rel_l2_by_hand(ev.store.candidate_dir(result.digest) / "model.onnx",
                              demo_data_path)  # fmt: skip
    # Close, not equal: on the CPU the backend emulates FP16 storage at every node boundary
    # (``emulate_fp16_storage``), which a plain session of the file does not.
    assert result.deviation == pytest.approx(by_hand, rel=0.05)
    assert sorted(result.fp32_units) == sorted(set(prepared["units"]) - set(SAFE_FP16))


def test_all_fp16_overflows_to_an_infinite_deviation(prepared, tmp_path, demo_data_path):
    # Independently: the FP32 model's activations after the amplifying stack pass the FP16
    # maximum, so FP16 storage of them is inf.
    probe = build_demo_model()
    probe.graph.output.append(onnx.helper.make_tensor_value_info("amp4/out", 1, None))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    batches = np.load(demo_data_path)[DEMO_INPUT]
    peak = max(float(np.abs(sess.run(["amp4/out"], {DEMO_INPUT: b})[0]).max()) for b in batches)
    assert peak > float(np.finfo(np.float16).max)

    ev = _evaluator(prepared, tmp_path / "out")
    fp32 = ev.evaluate(PrecisionAssignment.uniform(prepared["units"], Precision.FP32))
    result = ev.evaluate(PrecisionAssignment.uniform(prepared["units"], Precision.FP16))
    assert not result.finite
    assert result.deviation == math.inf
    assert result.fp32_units == []
    assert math.isfinite(result.latency.median_ms) and result.latency.median_ms > 0
    # The roofline prices the all-FP16 model below the all-FP32 one.
    assert result.latency.median_ms < fp32.latency.median_ms


def test_the_second_evaluation_is_served_from_the_store(prepared, tmp_path):
    ev = _evaluator(prepared, tmp_path / "out")
    assignment = PrecisionAssignment.with_fp16(prepared["units"], SAFE_FP16)
    first = ev.evaluate(assignment)
    folder = ev.store.candidate_dir(first.digest)
    model_stat = (folder / "model.onnx").stat()
    second = ev.evaluate(PrecisionAssignment.from_mapping(assignment.to_json()))
    assert second.cached and not first.cached
    assert second.digest == first.digest == assignment.digest()
    assert second.deviation == first.deviation
    assert second.latency.median_ms == first.latency.median_ms
    assert second.seconds == {}  # nothing rewritten, built, run or timed
    after = (folder / "model.onnx").stat()
    assert (after.st_ino, after.st_mtime_ns) == (model_stat.st_ino, model_stat.st_mtime_ns)
    # Served from the results directory, not from memory: another evaluator on the same
    # folder (another worker, a resumed search) answers with what metrics.json says.
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["deviation"] = metrics["deviations"]["rel_l2"] = 0.125
    (folder / "metrics.json").write_text(json.dumps(metrics))
    other = _evaluator(prepared, tmp_path / "out").evaluate(assignment)
    assert other.cached
    assert other.deviation == 0.125


def test_candidate_files_land_in_the_candidate_folder(prepared, tmp_path):
    ev = _evaluator(prepared, tmp_path / "out")
    assignment = PrecisionAssignment.with_fp16(prepared["units"], SAFE_FP16)
    result = ev.evaluate(assignment)
    folder = tmp_path / "out" / "candidates" / assignment.digest()
    assert ev.store.candidate_dir(result.digest) == folder
    assert sorted(p.name for p in (tmp_path / "out" / "candidates").iterdir()) == [
        assignment.digest()
    ]
    # No claim left behind, no temporary files.
    assert sorted(p.name for p in folder.iterdir()) == [
        "metrics.json", "model.onnx", "precision.json"
    ]  # fmt: skip
    precision = json.loads((folder / "precision.json").read_text())
    assert precision["units"] == {
        u: ("fp16" if u in SAFE_FP16 else "fp32") for u in prepared["units"]
    }
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["digest"] == assignment.digest()
    assert metrics["deviation"] == result.deviation
    assert metrics["n_fp32"] == len(prepared["units"]) - len(SAFE_FP16)
    model = onnx.load(folder / "model.onnx")
    onnx.checker.check_model(model)
    half = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    assert {"stem.weight", "head1.weight"} <= {n.split("__")[0] for n in half}
    assert not any(n.startswith("block1.") for n in half)
    assert any(n.op_type == "Cast" for n in model.graph.node)


def test_measured_latency_on_the_cpu(prepared, tmp_path):
    plan = TimingPlan(window_ms=2.0, min_pairs=2, max_pairs=3, max_time_s=0.5,
                      warmup_max_s=0.2, bootstrap=100)  # fmt: skip
    ev = _evaluator(prepared, tmp_path / "out", LatencySettings(source="measured", plan=plan))
    calls = []
    result = ev.evaluate(
        PrecisionAssignment.uniform(prepared["units"], Precision.FP32),
        before_timing=lambda: calls.append(1),
    )
    assert calls == [1]
    assert result.deviation <= 1e-6
    stats = result.latency
    assert stats.source.startswith("measured")
    assert stats.n_runs >= 1
    assert math.isfinite(stats.median_ms) and stats.median_ms > 0
    assert stats.low_ms <= stats.median_ms <= stats.high_ms
    assert result.seconds["time"] > 0
