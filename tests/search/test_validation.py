"""Unseen data: the holdout split, the front measured on validation data, pick and refine.

The validation set of the searches here is the demo's images at 8x the amplitude: the
demo's mixed candidates that keep only the overflowing layer FP32 (within any budget on the
calibration data) overflow on it, as a detector's did on unseen photos (issue 12).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import numpy as np
import onnx
import pytest

from amp_search.backends import BuildConfig
from amp_search.backends.ort import OnnxRuntimeBackend
from amp_search.calibration import load_calibration, model_inputs
from amp_search.cli import main
from amp_search.demo import demo_data
from amp_search.errors import UserInputError
from amp_search.objective import EvalContext, load_metric
from amp_search.results.report import load_results
from amp_search.search import SearchConfig, run_search
from amp_search.search.refine import refine_front
from amp_search.search.validation import prepare_validation


def _inputs(model_path):
    return model_inputs(onnx.load(str(model_path)))


def _batches(path):
    with np.load(path) as z:
        return list(z["image"])


# --- the split: fast ------------------------------------------------------------------------


def test_holdout_takes_the_last_batches_over_files_and_refuses_what_it_cannot_split(tmp_path):
    from amp_search.demo import build_demo_model

    model = tmp_path / "m.onnx"
    onnx.save(build_demo_model(), model)
    folder = tmp_path / "calib"
    folder.mkdir()
    images = demo_data(n_batches=6, batch=1)["image"]
    for k in range(3):  # 3 files of 2 batches: the holdout crosses a file boundary
        np.savez(folder / f"{k}.npz", image=images[2 * k : 2 * k + 2])
    data = load_calibration(folder, _inputs(model))
    searched, held = prepare_validation(data, data.inputs, None, 0.5)
    assert held is not None and searched.n_batches == held.data.n_batches == 3
    np.testing.assert_array_equal(np.stack([b["image"] for b in searched]), images[:3])
    np.testing.assert_array_equal(np.stack([b["image"] for b in held.data]), images[3:])
    assert held.identity["label"] == "holdout of 3 files batches 3..5"
    assert held.identity["batches"] == [3, 6] and len(held.identity["files"]) == 3
    assert searched.describe() == "3 batch(es) from 3 files (batches 0..2 of 6)"
    np.testing.assert_array_equal(held.data.first()["image"], images[3])
    # ceil(0.25 * 6) = 2 held out; the same fraction twice: the same split and digest.
    again, held2 = prepare_validation(data, data.inputs, None, 0.25)
    assert (again.n_batches, held2.data.batches) == (4, (4, 6))
    assert prepare_validation(data, data.inputs, None, 0.25)[1].digest == held2.digest
    assert prepare_validation(data, data.inputs, None, 0.0) == (data, None)  # off
    for bad in (1.0, -0.1, 1.5, math.nan):
        with pytest.raises(UserInputError, match=r"must be in \(0, 1\)"):
            prepare_validation(data, data.inputs, None, bad)
    one = load_calibration(folder / "0.npz", data.inputs).subset(0, 1)
    with pytest.raises(UserInputError, match="holds out 1 of the 1 calibration batch"):
        prepare_validation(one, data.inputs, None, 0.25)
    with pytest.raises(UserInputError, match="not found"):
        prepare_validation(data, data.inputs, tmp_path / "nope.npz")


# --- searches: slow -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unseen(tmp_path_factory):
    """A path to 8x-amplitude demo images (other samples than the calibration data)."""
    path = tmp_path_factory.mktemp("unseen") / "val.npz"
    np.savez(path, image=demo_data(seed=7)["image"] * 8)
    return path


@pytest.fixture(scope="module")
def validated(tmp_path_factory, demo_model_path, demo_data_path, unseen):
    """An 8-trial search of the demo model with --validation-data."""
    out = tmp_path_factory.mktemp("validated") / "out"
    config = SearchConfig(
        model=demo_model_path, out=out, data=demo_data_path, validation_data=unseen,
        n_trials=8, storage=f"sqlite:///{out.parent / 's.db'}", study_name="v",
    )  # fmt: skip
    return config, run_search(config)


def _deviation(model_path, candidate_path, batches, metric="rel_l2"):
    """The candidate's deviation from the FP32 model on ``batches``, computed apart."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # strict FP32
    fp32 = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in fp32.get_outputs()]
    reference = [dict(zip(names, fp32.run(None, {"image": b}), strict=True)) for b in batches]
    backend = OnnxRuntimeBackend()
    with backend.open(backend.build(candidate_path, BuildConfig(device="cpu"))) as runner:
        outputs = [runner.infer({"image": b}) for b in batches]
    if not all(np.isfinite(v).all() for out in outputs for v in out.values()):
        return math.inf
    return load_metric(metric).evaluate(EvalContext(reference=reference, outputs=outputs))


@pytest.mark.slow
def test_every_front_point_is_measured_on_the_validation_data(validated, demo_model_path, unseen):
    config, outcome = validated
    results = load_results(config.out)
    assert results.front and [p.digest for p in results.front] == [p.digest for p in outcome.front]
    assert results.meta["validation"]["label"] == "val.npz"
    batches = _batches(unseen)
    for p in results.front:
        assert p.validation_deviation is not None
        folder = config.out / "candidates" / p.digest
        expected = _deviation(demo_model_path, folder / "model.onnx", batches)
        assert p.validation_deviation == pytest.approx(expected, rel=1e-6, abs=1e-12)
        cached = json.loads((folder / "validation.json").read_text())
        assert cached["metric"] == "rel_l2"
    # Within any budget on the calibration data, inf on the unseen images.
    assert any(math.isinf(p.validation_deviation) and math.isfinite(p.deviation)
               for p in results.front)  # fmt: skip
    run = json.loads((config.out / "run.json").read_text())
    digest = hashlib.sha256(unseen.read_bytes()).hexdigest()
    assert run["validation"]["files"] == [{"name": "val.npz", "sha256": digest}]
    assert run["validation_digest"] == run["validation"]["digest"]
    assert not list(config.out.glob(".validation-*"))  # the scratch builds are gone


@pytest.mark.slow
def test_pick_refuses_a_point_over_budget_on_validation(validated, tmp_path, capsys):
    config, _ = validated
    front = load_results(config.out).front
    over = next(p for p in front if p.validation_deviation > 10 * p.deviation > 0)
    budget = 2 * over.deviation  # it holds on the calibration data, not on the unseen data
    holding = [p for p in front if p.validation_deviation <= budget]
    expected = min(holding, key=lambda p: p.latency_ms)
    assert over.latency_ms < expected.latency_ms
    assert main(["pick", str(config.out), "--max-deviation", f"{budget:.6g}",
                 "--to", str(tmp_path / "m.onnx")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert (
        f"trial {over.trial} refused: deviation {over.deviation:.3g} on the calibration data but "
        f"inf on the validation data (val.npz), over the budget {budget:.6g}"
    ) in " ".join(out.split())
    assert f"picked trial {expected.trial}:" in out
    assert f"{expected.validation_deviation:.3g} on val.npz" in out
    picked = onnx.load(str(tmp_path / "m.onnx"))
    assert picked == onnx.load(str(config.out / "candidates" / expected.digest / "model.onnx"))
    assert main(["report", str(config.out), "--no-plots"]) == 0
    assert "validation dev." in capsys.readouterr().out


@pytest.mark.slow
def test_a_rerun_with_other_validation_data_is_refused(validated, demo_data_path, tmp_path):
    config, _ = validated
    other = tmp_path / "val.npz"
    np.savez(other, image=demo_data(seed=9)["image"])
    before = (config.out / "run.json").read_text()
    for change in ({"validation_data": other}, {"validation_data": None},
                   {"validation_data": None, "holdout_fraction": 0.25}):  # fmt: skip
        with pytest.raises(UserInputError, match="different validation_digest"):
            run_search(SearchConfig(**{**config.__dict__, **change}))
    assert (config.out / "run.json").read_text() == before


@pytest.mark.slow
def test_refined_json_records_the_data_of_every_figure(
    validated, demo_model_path, demo_data_path, unseen, tmp_path
):
    config, _ = validated
    out = tmp_path / "copy"
    shutil.copytree(config.out, out)
    results = load_results(out)
    inputs = _inputs(demo_model_path)
    data, validation = prepare_validation(load_calibration(demo_data_path, inputs), inputs,
                                          unseen)  # fmt: skip
    ref = refine_front(results, data=data, validation=validation, device="cpu", pairs=2,
                       rounds=1, max_time_s=0.5)  # fmt: skip
    doc = json.loads((out / "refined.json").read_text())
    sha = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (demo_data_path, unseen)}
    figures = doc["data"]
    assert figures["deviation"]["files"] == [{"name": "demo.npz", "sha256": sha["demo.npz"]}]
    assert figures["validation_deviation"]["files"] == [
        {"name": "val.npz", "sha256": sha["val.npz"]}
    ]
    assert figures["search_deviation"]["files"] == figures["deviation"]["files"]
    assert figures["search_validation_deviation"]["digest"] == validation.digest
    search = {p.digest: p for p in results.front}
    for p in ref.points:  # same device and options: the same figures as the search's
        assert p.validation_deviation is not None
        if p.digest in search:
            assert p.validation_deviation == pytest.approx(
                search[p.digest].validation_deviation, rel=1e-6, abs=1e-12
            )


@pytest.mark.slow
def test_holdout_searches_on_the_first_batches_and_measures_on_the_last(
    tmp_path, demo_model_path, demo_data_path
):
    out = tmp_path / "out"
    config = SearchConfig(model=demo_model_path, out=out, data=demo_data_path, n_trials=4,
                          holdout_fraction=0.25, storage=f"sqlite:///{tmp_path / 's.db'}",
                          study_name="h")  # fmt: skip
    run_search(config)
    run = json.loads((out / "run.json").read_text())
    assert run["validation"]["label"] == "holdout of demo.npz batches 3..3"
    assert run["calibration"]["batches"] == [0, 3] and run["validation"]["batches"] == [3, 4]
    assert run["data"] == "3 batch(es) from demo.npz (batches 0..2 of 4)"
    batches = _batches(demo_data_path)
    front = load_results(out).front
    mixed = next(p for p in front if 0 < p.n_fp32 < p.n_units)
    model = out / "candidates" / mixed.digest / "model.onnx"
    assert mixed.deviation == pytest.approx(_deviation(demo_model_path, model, batches[:3]),
                                            rel=1e-6)  # fmt: skip
    assert mixed.validation_deviation == pytest.approx(
        _deviation(demo_model_path, model, batches[3:]), rel=1e-6
    )
    # The split is deterministic: the same command resumes, from the cached figures.
    assert run_search(config).front[0].validation_deviation == front[0].validation_deviation
    # refine on the search's own data splits it again: the same figures, recorded as such.
    assert main(["refine", str(out), "--device", "cpu", "--pairs", "2", "--rounds", "1"]) == 0
    doc = json.loads((out / "refined.json").read_text())
    assert doc["data"]["deviation"]["batches"] == [0, 3]
    assert doc["data"]["validation_deviation"]["label"] == "holdout of demo.npz batches 3..3"
    refined = {p["digest"]: p for p in doc["points"]}
    assert refined[mixed.digest]["validation_deviation"] == pytest.approx(
        mixed.validation_deviation, rel=1e-6
    )
