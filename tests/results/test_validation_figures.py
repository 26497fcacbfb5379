"""The validation figure decides a budget; refusals name both figures; files keep it."""

from __future__ import annotations

import csv
import math

import pytest

from amp_search.errors import UserInputError
from amp_search.results.pareto import FrontPoint, write_front
from amp_search.results.refined import Refinement, load_refinement, summarize
from amp_search.results.report import Results, choose, load_results, pick_point
from amp_search.results.store import ResultsStore
from amp_search.results.validation import decisive_deviation, holds, refusal

META = {"validation": {"label": "val.npz"}}


def _point(trial, lat, dev, val=None):
    return FrontPoint(trial=trial, digest=f"d{trial}", latency_ms=lat, latency_source="t",
                      deviation=dev, metric="rel_l2", n_fp32=trial, n_units=9,
                      validation_deviation=val)  # fmt: skip


# Fastest first: #1 holds on calibration only (inf on validation: it overflows there), #2 is
# over the budget on validation by a little, #3 holds on both, #4 is all-FP32.
FRONT = [_point(1, 1.0, 0.004, math.inf), _point(2, 2.0, 0.002, 0.006),
         _point(3, 3.0, 0.001, 0.003), _point(4, 4.0, 0.0, 0.0)]  # fmt: skip


def test_the_validation_figure_decides_and_refused_points_are_named(tmp_path):
    results = Results(ResultsStore(tmp_path), META, FRONT)
    choice = choose(results, max_deviation=0.005)
    assert choice.point.trial == 3  # the fastest that holds on the validation data
    assert [p.trial for p in choice.refused] == [1, 2]  # within on calibration, faster
    line = refusal(choice.refused[1], 0.005, META)
    assert line == (
        "trial 2 refused: deviation 0.002 on the calibration data but 0.006 on the validation "
        "data (val.npz), over the budget 0.005"
    )
    assert "inf on the validation data" in refusal(choice.refused[0], 0.005, META)
    # A budget both hold: nothing refused. Without validation figures: as before.
    assert choose(results, max_deviation=0.01).point.trial == 2
    assert choose(results, max_deviation=0.01).refused == (FRONT[0],)
    plain = Results(ResultsStore(tmp_path), {}, [_point(1, 1.0, 0.004), _point(2, 2.0, 0.001)])
    assert choose(plain, max_deviation=0.005).point.trial == 1
    assert decisive_deviation(_point(5, 1.0, 0.1, math.nan)) == math.inf
    assert holds(_point(5, 1.0, 0.1), None)


def test_no_point_holding_on_validation_is_one_line_naming_both_figures(tmp_path):
    results = Results(ResultsStore(tmp_path), META, FRONT[:2])
    with pytest.raises(UserInputError) as info:
        pick_point(results, max_deviation=0.005)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("No front point holds --max-deviation 0.005 on the validation "
                              "data (val.npz; the most accurate there has 0.006)")  # fmt: skip
    assert "trial 1 refused: deviation 0.004 on the calibration data but inf" in message


def test_front_files_and_refined_json_keep_the_validation_figure(tmp_path):
    store = ResultsStore(tmp_path)
    write_front(store, FRONT, {**META, "model": "m.onnx"})
    back = load_results(tmp_path)
    assert [p.validation_deviation for p in back.front] == [math.inf, 0.006, 0.003, 0.0]
    rows = list(csv.DictReader((tmp_path / "front.csv").open()))
    assert [r["validation_deviation"] for r in rows] == ["inf", "0.006", "0.003", "0"]
    write_front(store, [_point(1, 1.0, 0.004)], {})  # not measured: an empty cell, None back
    assert next(csv.DictReader((tmp_path / "front.csv").open()))["validation_deviation"] == ""
    assert load_results(tmp_path).front[0].validation_deviation is None
    from amp_search._atomic import write_json_atomic

    points = [_point(2, 2.0, 0.002, math.inf), _point(3, 3.0, 0.001, 0.003)]
    ref = Refinement(points, points, {**META, "data": {}})
    write_json_atomic(tmp_path / "refined.json", ref.to_json())
    loaded = load_refinement(tmp_path)
    assert loaded is not None
    assert [p.validation_deviation for p in loaded.points] == [math.inf, 0.003]
    assert summarize(loaded, 0.005)[0].startswith("fastest within 0.005: #3 3 ms at 0.001 "
                                                  "(0.003 on the validation data)")  # fmt: skip


def test_points_not_yet_measured_on_validation_data_are_said(tmp_path, capsys):
    from rich.console import Console

    from amp_search.results.validation import unmeasured_note

    # A search stopped before its end measured nothing on the validation data it was given.
    front = [_point(1, 1.0, 0.004), _point(2, 2.0, 0.002, 0.003)]
    note = unmeasured_note(front, META)
    assert note is not None and note.startswith("1 front point(s) (trials 1) have no deviation")
    assert unmeasured_note(front, {}) is None and unmeasured_note(FRONT, META) is None
    Results(ResultsStore(tmp_path), META, front).render(Console(width=200))
    assert "have no deviation on the validation data yet" in capsys.readouterr().out
