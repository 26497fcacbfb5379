"""Failures stay local: a candidate that raises while run or timed fails its trial (or its refine
entry) only; a model that does not run on the target stops the search before anything is seeded.

The backend here is ONNX Runtime itself, extended the way a third-party backend plugs in: its
runner raises what a CUDA error raises (a plain ``RuntimeError``) while timing the candidates
it is told to fail. Real sessions, real data, real Optuna.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import optuna
import pytest
from onnx import helper

import amp_search.backends
import amp_search.search.prepare
from amp_search.backends.ort import OnnxRuntimeBackend
from amp_search.calibration import load_calibration, model_inputs
from amp_search.errors import UserInputError
from amp_search.graph import load_model, sanitize
from amp_search.results.report import load_results
from amp_search.search import SearchConfig, run_search
from amp_search.search.refine import refine_front

CUDA_ERROR = "CUDA failure 700: an illegal memory access was encountered"


class FailingBackend(OnnxRuntimeBackend):
    """ONNX Runtime whose timed runs raise for the candidate folders ``fails`` selects."""

    def __init__(self, fails):
        self.fails = fails

    def _open(self, candidate):
        runner = super()._open(candidate)
        if self.fails(Path(candidate.model_path)):

            def broken():
                raise RuntimeError(CUDA_ERROR)

            runner._run_once = broken
        return runner


def _half_the_candidates(path: Path) -> bool:
    folder = path.parent.name  # a candidate's digest, or "reference"
    return folder != "reference" and folder[0] in "89abcdef"  # all-FP32 is 4f53cda1...


def _config(tmp_path, demo_model_path, demo_data_path, n_trials=10):
    return SearchConfig(
        model=demo_model_path, out=tmp_path / "out", data=demo_data_path, n_trials=n_trials,
        storage=f"sqlite:///{tmp_path / 's.db'}", study_name="f", seed=0, latency="measured",
        timing_max_s=0.2,
    )  # fmt: skip


@pytest.mark.slow
def test_a_candidate_that_raises_while_timed_fails_its_trial_only(
    tmp_path, demo_model_path, demo_data_path, monkeypatch
):
    backend = FailingBackend(_half_the_candidates)
    monkeypatch.setattr(amp_search.search.prepare, "get_backend", lambda name: backend)
    outcome = run_search(_config(tmp_path, demo_model_path, demo_data_path))
    trials = outcome.study.get_trials(deepcopy=False)
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert failed and complete  # the study went on past every failure
    for t in failed:
        assert t.user_attrs["error"].startswith(
            f"the candidate failed: RuntimeError: {CUDA_ERROR}"
        )
    errors = list((outcome.out / "candidates").glob("*/error.json"))
    assert len(errors) == len({e.parent.name for e in errors}) >= 1
    assert all(json.loads(e.read_text())["kind"] == "CandidateRunError" for e in errors)
    assert all(e.parent.name[0] in "89abcdef" for e in errors)
    # Every completed measured trial carries its paired figure and interval; one that joined
    # the front when it was evaluated (the first, all-FP32, always does) got 6 more windows.
    for t in complete:
        m = t.user_attrs["amp_search"]["metrics"]
        assert m["latency_low_ms"] <= t.values[0] <= m["latency_high_ms"]
        assert m["ratio_low"] <= m["ratio"] <= m["ratio_high"]
        assert m["windows"] >= (12 if m["front_retimed"] else 6)
    first = min(complete, key=lambda t: t.number)
    assert first.user_attrs["seed"] == "all-fp32"
    assert first.user_attrs["amp_search"]["metrics"]["front_retimed"]
    assert load_results(outcome.out).front


def test_a_model_that_does_not_run_on_the_target_stops_before_seeding(
    tmp_path, demo_model_path, demo_data_path, monkeypatch
):
    class Broken(OnnxRuntimeBackend):
        def _open(self, candidate):
            runner = super()._open(candidate)

            def infer(feeds):
                raise RuntimeError(
                    "Non-zero status code returned while running Conv node. "
                    "Name:'conv0' Status Message: CUDNN_STATUS_BAD_PARAM"
                )

            runner._infer = infer
            return runner

    monkeypatch.setattr(amp_search.search.prepare, "get_backend", lambda name: Broken())
    config = _config(tmp_path, demo_model_path, demo_data_path)
    with pytest.raises(UserInputError) as info:
        run_search(config)
    message = str(info.value)
    assert "The model itself does not run on onnxruntime (cpu)" in message
    assert "Name:'conv0'" in message and "\n" not in message
    study = optuna.load_study(study_name="f", storage=config.storage)
    assert study.get_trials() == []  # nothing was seeded


def _failing_at_run_time(demo_model_path: Path, to: Path) -> Path:
    """The demo model whose output goes through a Reshape that no batch of 8 can satisfy.

    The batch is dynamic, so the model loads and builds; it fails when run (80 values into
    rows of 3).
    """
    model = onnx.load(str(demo_model_path))
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = ["pre" if o == out else o for o in node.output]
    model.graph.initializer.append(
        helper.make_tensor("rows_of_3", onnx.TensorProto.INT64, [2], [-1, 3])
    )
    model.graph.node.append(helper.make_node("Reshape", ["pre", "rows_of_3"], [out], name="r"))
    model.graph.output[0].type.tensor_type.shape.Clear()
    onnx.save(model, str(to))
    return to


@pytest.mark.slow
def test_refine_keeps_going_when_entries_fail_at_run_time_or_while_timed(
    tmp_path, demo_model_path, demo_data_path, monkeypatch
):
    run_search(_config(tmp_path, demo_model_path, demo_data_path, n_trials=8))
    results = load_results(tmp_path / "out")
    data = load_calibration(demo_data_path, model_inputs(sanitize(load_model(demo_model_path))))
    victim = results.front[0]  # (CPU timings: the front may be all-FP32 alone)
    backend = FailingBackend(lambda path: path.parent.name == victim.digest)
    monkeypatch.setattr(amp_search.backends, "get_backend", lambda name: backend)
    bad = _failing_at_run_time(demo_model_path, tmp_path / "bad.onnx")
    ref = refine_front(results, data=data, device="cpu", pairs=4, rounds=2, max_time_s=0.5,
                       compare=[bad, demo_model_path])  # fmt: skip
    by_label = {f["label"]: f["error"] for f in ref.failed}
    assert "reshape" in by_label["compare:bad.onnx"].lower()
    (timed,) = [f["error"] for f in ref.failed if f["digest"] == victim.digest]
    assert CUDA_ERROR in timed and "timing it" in timed
    assert [c.metrics["label"] for c in ref.compared] == [f"compare:{demo_model_path.name}"]
    assert victim.digest not in {p.digest for p in ref.points} and ref.points
    doc = json.loads((tmp_path / "out" / "refined.json").read_text())
    assert {f["label"] for f in doc["failed"]} == set(by_label)
