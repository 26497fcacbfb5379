"""The trial record and the float codec: stored forms as written today, and as written before."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest

from amp_search.keys import ALL_FP16, ALL_FP32, RECORD_ATTR
from amp_search.record import TrialRecord, decode_float, decode_metrics, encode_float
from amp_search.search._optimize import _answer_from_trial, _record
from amp_search.search.evaluate import Evaluation
from amp_search.types import LatencyStats

# A record of a measured FP16 trial as the search writes it today (key order included).
MEASURED = {
    "digest": "ab12cd34",
    "latency_source": "measured:onnxruntime-cpu",
    "metric": "rel_l2",
    "n_fp32": 2,
    "n_units": 5,
    "fp32_units": ["a/Conv", "b/MatMul"],
    "cached": False,
    "metrics": {
        "p90_ms": 1.5,
        "deviations": {"rel_l2": 0.01, "max_abs": "inf", "cosine": "nan"},
        "seconds": {"rewrite": 0.01, "build": 0.2, "run": 0.05},
        "casts": 4,
        "latency_low_ms": 1.1,
        "latency_high_ms": 1.3,
        "windows": 6,
        "runs": 60,
        "front_retimed": False,
        "steady": True,
        "own_median_ms": 1.21,
        "ratio": 0.8,
        "ratio_low": 0.78,
        "ratio_high": 0.82,
        "reference_ms": 1.5,
        "clock_mhz_min": 1980.0,
        "clock_mhz_steady": 1980.0,
        "execution": {"providers": ["CPUExecutionProvider"]},
    },
}
# An estimated BF16 trial: bf16_units first, no timing figures.
ESTIMATED_BF16 = {
    "bf16_units": ["c/Gemm"],
    "digest": "ef56",
    "latency_source": "estimated:h100",
    "metric": "rel_l2",
    "n_fp32": 0,
    "n_units": 3,
    "fp32_units": [],
    "cached": True,
    "metrics": {"p90_ms": 0.4, "deviations": {"rel_l2": 0.002}, "seconds": {}, "casts": None},
}


# --- the codec ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "stored"),
    [(math.inf, "inf"), (-math.inf, "-inf"), (None, None), (1.5, 1.5), (0.0, 0.0), (3, 3)],
)
def test_encode_then_decode(value: float | None, stored: Any) -> None:
    assert encode_float(value) == stored
    assert decode_float(encode_float(value)) == value


def test_nan_is_the_string_nan_and_reads_back_as_nan() -> None:
    assert encode_float(math.nan) == "nan"
    got = decode_float("nan")
    assert got is not None and math.isnan(got)


@pytest.mark.parametrize(
    ("text", "want"),
    [("Infinity", math.inf), ("-Infinity", -math.inf), ("inf", math.inf), ("2.5", 2.5), (7, 7.0)],
)
def test_decode_reads_python_json_and_earlier_versions(text: Any, want: float) -> None:
    assert decode_float(text) == want
    assert decode_float(json.loads(json.dumps(float(want)))) == want  # NaN/Infinity tokens


@pytest.mark.parametrize("bad", ["fast", [1.0], {}])
def test_decode_refuses_what_is_no_number(bad: Any) -> None:
    with pytest.raises(ValueError, match="Expected a number"):
        decode_float(bad)


def test_decode_metrics_decodes_the_deviations_only() -> None:
    got = decode_metrics(MEASURED["metrics"])
    assert got["deviations"]["max_abs"] == math.inf and math.isnan(got["deviations"]["cosine"])
    assert got["seconds"] == MEASURED["metrics"]["seconds"]
    assert MEASURED["metrics"]["deviations"]["max_abs"] == "inf"  # the input is not changed


# --- the record -----------------------------------------------------------------------------


@pytest.mark.parametrize("stored", [MEASURED, ESTIMATED_BF16])
def test_a_record_as_written_today_round_trips_byte_for_byte(stored: dict[str, Any]) -> None:
    record = TrialRecord.from_attr(json.loads(json.dumps(stored)))
    assert json.dumps(record.to_attr()) == json.dumps(stored)


def test_a_record_reads_as_typed_floats() -> None:
    record = TrialRecord.from_attr(MEASURED)
    assert record.fp32_units == ("a/Conv", "b/MatMul") and record.bf16_units == ()
    assert record.deviations["max_abs"] == math.inf
    assert record.p90_ms == 1.5 and record.casts == 4
    assert record.timing["ratio"] == 0.8 and "p90_ms" not in record.timing
    metrics = record.metrics  # as a front point carries them: floats, same key order
    assert list(metrics) == list(MEASURED["metrics"])
    assert metrics["deviations"]["max_abs"] == math.inf


def test_a_record_without_bf16_units_omits_them_when_stored() -> None:
    record = TrialRecord.from_attr(MEASURED)
    assert "bf16_units" not in record.to_attr()
    assert list(replace(record, bf16_units=("x",)).to_attr())[0] == "bf16_units"


def test_an_old_record_loads_with_defaults() -> None:
    # Before BF16, casts and the measured figures: what an early study holds.
    old = {"digest": "d", "latency_source": "estimated:h100", "metric": "rel_l2", "n_fp32": 1,
           "n_units": 2, "fp32_units": ["u"],
           "metrics": {"p90_ms": 1.0, "deviations": {"rel_l2": math.inf}}}  # fmt: skip
    record = TrialRecord.from_attr(old)
    assert record.bf16_units == () and record.cached is False and record.casts is None
    assert record.deviations == {"rel_l2": math.inf} and record.seconds == {}
    assert record.timing == {}
    assert TrialRecord.from_attr({"digest": "d"}) == TrialRecord(digest="d")


@pytest.mark.parametrize("attr", [None, "text", 3, []])
def test_no_record_reads_as_an_empty_one(attr: Any) -> None:
    assert TrialRecord.from_attr(attr) == TrialRecord()
    assert TrialRecord.from_trial(SimpleNamespace(user_attrs={})) == TrialRecord()


def _evaluation(measured: bool) -> Evaluation:
    timing: dict[str, Any] = {}
    if measured:
        timing = dict(low_ms=1.1, high_ms=1.3, windows=6, own_median_ms=1.21, ratio=0.8,
                      ratio_low=0.78, ratio_high=0.82, reference_ms=1.5, steady=True,
                      clock_mhz_min=1980.0, clock_mhz_steady=1980.0)  # fmt: skip
    stats = LatencyStats(1.2, 1.5, 1.25, 1.0, 60, 5,
                         "measured:onnxruntime-cpu" if measured else "estimated:h100",
                         **timing)  # fmt: skip
    return Evaluation(
        digest="ab12cd34", latency=stats, deviation=0.01,
        deviations={"rel_l2": 0.01, "max_abs": math.inf}, finite=True,
        fp32_units=["a/Conv", "b/MatMul"], seconds={"build": 0.2},
        extra={"conversion": {"casts_inserted": 4},
               **({"execution": {"providers": ["CPU"]}} if measured else {})},
    )  # fmt: skip


def _legacy_record(ev: Evaluation, metric: str, n_units: int, bf16: list[str]) -> dict[str, Any]:
    """What ``_record`` wrote before :class:`TrialRecord` (its body, verbatim)."""
    from amp_search.search._optimize import _timing_record

    deviations = {k: (v if v != float("inf") else "inf") for k, v in ev.deviations.items()}
    return {
        **({"bf16_units": bf16} if bf16 else {}),
        "digest": ev.digest,
        "latency_source": ev.latency.source,
        "metric": metric,
        "n_fp32": len(ev.fp32_units),
        "n_units": n_units,
        "fp32_units": ev.fp32_units,
        "cached": ev.cached,
        "metrics": {
            "p90_ms": ev.latency.p90_ms,
            "deviations": deviations,
            "seconds": ev.seconds,
            "casts": ev.extra.get("conversion", {}).get("casts_inserted"),
            **_timing_record(ev),
        },
    }


class _Trial:
    def __init__(self) -> None:
        self.user_attrs: dict[str, Any] = {}
        self.constraints: dict[str, float] = {}
        self.values = (1.2, 0.01)

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = json.loads(json.dumps(value))  # as a storage keeps it

    def set_constraint(self, key: str, value: float) -> None:
        self.constraints[key] = value


@pytest.mark.parametrize("measured", [False, True])
@pytest.mark.parametrize("bf16", [[], ["c/Gemm"]])
def test_the_search_stores_what_it_stored_before(measured: bool, bf16: list[str]) -> None:
    ev = _evaluation(measured)
    trial = _Trial()
    _record(trial, ev, "rel_l2", 5, bf16)
    want = json.dumps(_legacy_record(ev, "rel_l2", 5, bf16))
    assert json.dumps(trial.user_attrs[RECORD_ATTR]) == want


def test_a_reproposed_assignment_is_answered_from_its_record_marked_cached() -> None:
    prior, again = _Trial(), _Trial()
    _record(prior, _evaluation(True), "rel_l2", 5, [])
    assert _answer_from_trial(again, prior) == (1.2, 0.01)
    stored = again.user_attrs[RECORD_ATTR]
    assert stored == {**prior.user_attrs[RECORD_ATTR], "cached": True}


def test_an_optuna_study_keeps_the_record(tmp_path: Any) -> None:
    import optuna

    from amp_search.results.pareto import point_from_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}",
                                directions=["minimize", "minimize"])  # fmt: skip
    study.add_trial(
        optuna.trial.create_trial(values=[1.2, 0.01], user_attrs={RECORD_ATTR: MEASURED})
    )
    (trial,) = study.get_trials()
    assert json.dumps(TrialRecord.from_trial(trial).to_attr()) == json.dumps(MEASURED)
    point = point_from_trial(trial)
    assert point is not None and point.digest == "ab12cd34" and point.n_fp32 == 2
    assert point.metrics["deviations"]["max_abs"] == math.inf


def test_baselines_and_points_read_back_from_front_json_are_floats(tmp_path: Any) -> None:
    from amp_search.results.pareto import FrontPoint, write_front
    from amp_search.results.report import load_results
    from amp_search.results.store import ResultsStore

    store = ResultsStore(tmp_path)
    point = FrontPoint(trial=3, digest="d", latency_ms=1.0, latency_source="estimated:h100",
                       deviation=0.01, metric="rel_l2", n_fp32=1, n_units=2,
                       metrics=TrialRecord.from_attr(MEASURED).metrics)  # fmt: skip
    baselines = {
        ALL_FP32: {"trial": 0, "latency_ms": 2.0, "deviation": 0.0, "feasible": True,
                   "digest": "a"},
        ALL_FP16: {"trial": 1, "latency_ms": 1.0, "deviation": math.inf, "feasible": False,
                   "digest": "b"},
    }  # fmt: skip
    write_front(store, [point], {"baselines": baselines})
    text = (tmp_path / "front.json").read_text()
    assert '"deviation": "inf"' in text and "Infinity" not in text
    results = load_results(tmp_path)
    assert results.baselines == baselines
    assert isinstance(results.baselines[ALL_FP16]["deviation"], float)
    (back,) = results.front
    assert back.metrics["deviations"]["max_abs"] == math.inf
    assert back.deviation == 0.01 and back.latency_ms == 1.0
