"""Refining the front: rebuilt, measured again on the device, timed in rounds; pick prefers it."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from amp_search.backends.ort import OnnxRuntimeBackend
from amp_search.backends.trt.backend import TensorRTBackend
from amp_search.calibration import load_calibration, model_inputs
from amp_search.cli import main
from amp_search.errors import BackendUnavailableError, UserInputError
from amp_search.graph import load_model, sanitize
from amp_search.results.report import Results, choose, load_results
from amp_search.search import SearchConfig, run_search
from amp_search.search.refine import (
    REFINED_FILE,
    _final_options,
    is_current,
    load_refinement,
    refine_front,
)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, demo_model_path, demo_data_path):
    """A finished 16-trial search of the demo model (CPU, estimated latency)."""
    out = tmp_path_factory.mktemp("refine") / "out"
    config = SearchConfig(
        model=demo_model_path, out=out, data=demo_data_path, n_trials=16,
        storage=f"sqlite:///{out.parent / 's.db'}", study_name="r", seed=0,
    )  # fmt: skip
    run_search(config)
    return out


def _data(demo_model_path, demo_data_path):
    return load_calibration(demo_data_path, model_inputs(sanitize(load_model(demo_model_path))))


@pytest.mark.slow
def test_refine_measures_every_front_point_and_both_baselines(
    searched, demo_model_path, demo_data_path
):
    results = load_results(searched)
    ref = refine_front(results, data=_data(demo_model_path, demo_data_path), device="cpu",
                       pairs=6, rounds=3, max_time_s=1.0, compare=[demo_model_path])  # fmt: skip
    # The model itself, compared alike: the FP32 graph, so deviation 0; never on the front.
    (same,) = ref.compared
    assert same.metrics["label"] == f"compare:{demo_model_path.name}"
    assert same.deviation == 0 and same.metrics["windows"] >= 6 and same not in ref.front
    labels = {ref.label(p) for p in ref.points}
    assert {"all-fp32", "all-fp16"} <= labels
    assert {p.digest for p in results.front} <= {p.digest for p in ref.points}
    assert not ref.failed
    search = {p.digest: p for p in results.front}
    for p in ref.points:
        # Six paired windows at least (more where the interval was still wide), each figure
        # with its interval and its ratio to the resident all-FP32 reference.
        assert 6 <= p.metrics["windows"] <= 12
        lo, hi = p.latency_interval
        assert 0 < lo <= p.latency_ms <= hi
        assert p.metrics["ratio_low"] <= p.metrics["ratio"] <= p.metrics["ratio_high"]
        assert p.latency_ms == pytest.approx(p.metrics["ratio"] * ref.meta["reference"]["ms"])
        assert p.latency_source == "measured:onnxruntime-cpu, refined"
        # Same device and options as the search: the deviation measured again is the same.
        if p.digest in search:
            assert p.deviation == pytest.approx(search[p.digest].deviation, rel=1e-6, abs=1e-12)
    fp16 = next(p for p in ref.points if ref.label(p) == "all-fp16")
    assert math.isinf(fp16.deviation) and not fp16.feasible  # the demo's overflow
    fp32 = next(p for p in ref.points if ref.label(p) == "all-fp32")
    assert fp32.deviation == 0 and fp32.n_fp32 == fp32.n_units == 12
    # The refined front: feasible, non-dominated, fastest first.
    assert ref.front and all(p.feasible for p in ref.front)
    for a, b in zip(ref.front, ref.front[1:], strict=False):
        assert a.latency_ms <= b.latency_ms and a.deviation > b.deviation
    on_front = {p.digest for p in ref.front}
    for p in ref.points:
        if p.feasible and p.digest not in on_front:  # dominated by a front point
            assert any(q.latency_ms <= p.latency_ms and q.deviation <= p.deviation
                       for q in ref.front)  # fmt: skip
    doc = json.loads((searched / REFINED_FILE).read_text())
    assert doc["device"] == "cpu" and doc["timing"]["rounds"] == 3
    assert any("CPU" in n for n in doc["notes"])  # CPU timings are said to mean nothing
    assert (searched / "refined.png").stat().st_size > 10_000  # one plot, one timing run
    back = load_refinement(searched)
    assert back is not None and [p.digest for p in back.front] == [p.digest for p in ref.front]
    assert [p.metrics["path"] for p in back.compared] == [str(demo_model_path)]
    assert is_current(back, results)
    assert not is_current(back, replace(results, front=results.front[1:]))


@pytest.mark.slow
def test_refine_within_a_budget_and_a_broken_candidate(
    searched, demo_model_path, demo_data_path, tmp_path
):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(searched, out)
    results = load_results(out)
    budget = sorted(p.deviation for p in results.front)[len(results.front) // 2]
    within = [p for p in results.front if p.deviation <= budget]
    broken = next(p for p in within if p.n_fp32 not in (0, p.n_units))
    (results.store.candidate_dir(broken.digest) / "model.onnx").write_bytes(b"not onnx")
    # A model to compare whose output is named otherwise: reported as failed, nothing else.
    import onnx

    other = onnx.load(str(demo_model_path))
    old_name = other.graph.output[0].name
    for node in other.graph.node:
        node.output[:] = ["renamed" if o == old_name else o for o in node.output]
    other.graph.output[0].name = "renamed"
    onnx.save(other, str(tmp_path / "renamed.onnx"))
    ref = refine_front(results, data=_data(demo_model_path, demo_data_path), device="cpu",
                       pairs=2, rounds=1, max_time_s=0.5, max_deviation=budget,
                       compare=[tmp_path / "renamed.onnx"])  # fmt: skip
    assert [f["digest"] for f in ref.failed] == [broken.digest, ""]
    assert ref.failed[1]["label"] == "compare:renamed.onnx" and not ref.compared
    refined = {p.digest for p in ref.points}
    assert refined == ({p.digest for p in within} - {broken.digest}) | {
        str(b["digest"]) for b in results.baselines.values()
    }
    assert all(p.deviation <= budget for p in ref.front)


def test_final_options_restore_build_speed_options():
    run = {"device": "cuda", "options": {"builder_optimization_level": 0, "workspace_mb": 512,
                                         "shapes": {"x": [1, 3]}}}  # fmt: skip
    trt = TensorRTBackend()
    assert _final_options(trt, run, "cuda:1", None) == {"workspace_mb": 512}
    assert _final_options(trt, run, "cuda", {"builder_optimization_level": 5}) == {
        "workspace_mb": 512, "builder_optimization_level": 5,
    }  # fmt: skip
    cpu_run = {"device": "cpu", "options": {"emulate_fp16_storage": 1}}
    assert _final_options(OnnxRuntimeBackend(), cpu_run, "cuda", None) == {}
    assert _final_options(OnnxRuntimeBackend(), cpu_run, "cpu", None) == {
        "emulate_fp16_storage": 1
    }


def test_refine_refuses_a_device_that_is_not_here(searched, demo_model_path, demo_data_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("the CUDA EP is here")
    with pytest.raises(BackendUnavailableError, match="cannot use device 'cuda'"):
        refine_front(load_results(searched), data=_data(demo_model_path, demo_data_path),
                     device="cuda")  # fmt: skip
    with pytest.raises(UserInputError, match="--pairs"):
        refine_front(load_results(searched), data=_data(demo_model_path, demo_data_path),
                     device="cpu", pairs=2, rounds=3)  # fmt: skip


@pytest.mark.slow
def test_cli_refine_then_pick_ranks_by_refined_figures(searched, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(searched, out)
    # The data path comes from the study (its config), as a user reruns it.
    assert main(["refine", str(out), "--device", "cpu", "--pairs", "4", "--rounds", "2"]) == 0
    printed = capsys.readouterr().out
    assert "all-fp32" in printed and "refined" in printed and "wrote" in printed
    ref = load_refinement(out)
    assert ref is not None
    # On the CPU the all-FP32 graph may time fastest of all (FP16 storage is emulated with
    # Casts), leaving it alone on the refined front with deviation 0: budget the largest
    # feasible deviation measured, so the budget is positive whatever the timings were.
    budget = max(p.deviation for p in ref.points if p.feasible)
    assert budget > 0
    # The fastest within the budget, or a more accurate point whose interval overlaps it.
    want = choose(Results(load_results(out).store, {}, ref.front), max_deviation=budget).point
    # A CPU refinement ranks nothing by default (CPU timings say nothing about a GPU) ...
    assert main(["pick", str(out), "--max-deviation", str(budget), "--to",
                 str(tmp_path / "c.onnx")]) == 0  # fmt: skip
    assert "measured on the CPU" in capsys.readouterr().out
    # ... only when asked for.
    assert main(["pick", str(out), "--max-deviation", str(budget), "--to",
                 str(tmp_path / "m.onnx"), "--refined"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "ranking by refined figures" in printed
    assert f"picked trial {want.trial}:" in printed
    assert (tmp_path / "m.onnx").is_file()
    assert main(["pick", str(out), "--max-deviation", str(budget), "--to",
                 str(tmp_path / "s.onnx"), "--search-figures"]) == 0  # fmt: skip
    assert "ranking by refined" not in capsys.readouterr().out
    # A stale refinement (the front changed since) is not used.
    doc = json.loads((out / REFINED_FILE).read_text())
    doc["front_digests"] = doc["front_digests"][1:]
    (out / REFINED_FILE).write_text(json.dumps(doc))
    assert main(["pick", str(out), "--max-deviation", str(budget), "--to",
                 str(tmp_path / "t.onnx"), "--refined"]) == 0  # fmt: skip
    assert "older than the front" in capsys.readouterr().out
    assert main(["report", str(out), "--no-plots"]) == 0
    assert "Refined on onnxruntime (cpu)" in capsys.readouterr().out


def test_cli_refine_of_a_folder_without_a_search(tmp_path, capsys):
    assert main(["refine", str(tmp_path), "--device", "cpu"]) != 0
    err = capsys.readouterr().err
    assert "no front.json" in err and "Traceback" not in err


@pytest.mark.slow
def test_pick_beyond_the_refined_budget_uses_search_figures(searched, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(searched, out)
    devs = sorted(p.deviation for p in load_results(out).front)
    small, large = devs[1], devs[-1] * 2
    assert main(["refine", str(out), "--device", "cpu", "--pairs", "2", "--rounds", "1",
                 "--max-deviation", str(small)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["pick", str(out), "--max-deviation", str(small), "--to",
                 str(tmp_path / "a.onnx"), "--refined"]) == 0  # fmt: skip
    assert "ranking by refined figures" in capsys.readouterr().out
    assert main(["pick", str(out), "--max-deviation", str(large), "--to",
                 str(tmp_path / "b.onnx"), "--refined"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert f"covers front points within {small:g} only" in printed
    want = min((p for p in load_results(out).front if p.deviation <= large),
               key=lambda p: (p.latency_ms, p.deviation))  # fmt: skip
    assert f"picked trial {want.trial}:" in printed
