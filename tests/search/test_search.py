"""The search end to end on the demo model: front, seeds, cache, failures, pick, resume."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amp_search.results.report import copy_candidate, load_results, pick_point
from amp_search.search import SearchConfig, run_search


def _config(tmp_path, demo_model_path, demo_data_path, **kw):
    base = dict(
        model=demo_model_path, out=tmp_path / "out", data=demo_data_path, n_trials=14,
        storage=":memory:", study_name="t", latency="measured", seed=0,
    )  # fmt: skip
    base.update(kw)
    return SearchConfig(**base)


@pytest.mark.slow
def test_demo_search_front_seeds_and_pick(tmp_path, demo_model_path, demo_data_path):
    outcome = run_search(_config(tmp_path, demo_model_path, demo_data_path))
    assert outcome.n_complete >= 14 and outcome.n_failed == 0
    assert len({p.digest for p in outcome.front}) == len(outcome.front)  # no duplicates
    results = load_results(outcome.out)
    base = results.baselines
    # All-FP32 is exact; all-FP16 overflows (inf) and is infeasible, so never on the front.
    assert base["all-fp32"]["deviation"] == 0.0
    assert base["all-fp16"]["feasible"] is False
    assert all(p.digest != base["all-fp16"]["digest"] for p in results.front)
    assert any(p.n_fp32 == p.n_units for p in results.front)  # all-FP32: the accurate end
    # Every front point keeps the overflowing unit FP32 and has finite outputs.
    assert all("amp4/Conv" in p.fp32_units for p in results.front)
    lat = [p.latency_ms for p in results.front]
    dev = [p.deviation for p in results.front]
    assert lat == sorted(lat) and dev == sorted(dev, reverse=True)  # a real front
    for name in ("front.json", "front.csv", "pareto.png", "pareto.html", "inspect.json"):
        assert (outcome.out / name).is_file(), name
    point = pick_point(results, max_deviation=1e-3)
    assert point.deviation <= 1e-3
    assert point.latency_ms == min(p.latency_ms for p in results.front if p.deviation <= 1e-3)
    written = copy_candidate(results, point, tmp_path / "picked.onnx")
    assert written[0].name == "picked.onnx" and written[0].stat().st_size > 0
    precision = json.loads(
        (outcome.out / "candidates" / point.digest / "precision.json").read_text()
    )
    assert sorted(precision["fp32_fallback"]) == sorted(point.fp32_units)


@pytest.mark.slow
def test_repeated_assignment_is_never_rebuilt(tmp_path, demo_model_path, demo_data_path):
    cfg = _config(tmp_path, demo_model_path, demo_data_path, n_trials=6)
    run_search(cfg)
    stamps = {p: p.stat().st_mtime_ns for p in (cfg.out / "candidates").glob("*/model.onnx")}
    # A second study over the same results directory re-meets the seeds: all cached.
    run_search(_config(tmp_path, demo_model_path, demo_data_path, n_trials=6, study_name="u"))
    after = {p: p.stat().st_mtime_ns for p in (cfg.out / "candidates").glob("*/model.onnx")}
    assert all(after[p] == t for p, t in stamps.items())


@pytest.mark.slow
def test_only_the_chosen_metric_unless_more_are_recorded(
    tmp_path, demo_model_path, demo_data_path
):
    out = run_search(_config(tmp_path, demo_model_path, demo_data_path, n_trials=2)).out
    metrics = [json.loads(p.read_text()) for p in out.glob("candidates/*/metrics.json")]
    assert metrics and all(list(m["deviations"]) == ["rel_l2"] for m in metrics)
    cfg = _config(tmp_path / "b", demo_model_path, demo_data_path, n_trials=2,
                  record_metrics=("max_abs", "cosine"))  # fmt: skip
    out = run_search(cfg).out
    metrics = [json.loads(p.read_text()) for p in out.glob("candidates/*/metrics.json")]
    assert all(sorted(m["deviations"]) == ["cosine", "max_abs", "rel_l2"] for m in metrics)


@pytest.mark.slow
def test_failing_candidate_is_a_failed_trial_and_the_study_goes_on(
    tmp_path, demo_model_path, demo_data_path
):
    metric = tmp_path / "picky.py"
    metric.write_text(
        "import numpy as np\n"
        "def picky(reference, output):\n"
        "    if np.array_equal(reference, output):\n"
        "        raise ValueError('refusing exact outputs')\n"
        "    return float(np.abs(reference - output).max())\n"
    )
    outcome = run_search(
        _config(tmp_path, demo_model_path, demo_data_path, n_trials=8,
                metric=f"{metric}:picky")
    )  # fmt: skip
    assert outcome.n_failed >= 1 and outcome.n_complete >= 8


@pytest.mark.slow
def test_budget_nothing_meets_still_writes_front(tmp_path, demo_model_path, demo_data_path):
    outcome = run_search(
        _config(tmp_path, demo_model_path, demo_data_path, n_trials=5, max_deviation=1e-30)
    )
    front = json.loads((outcome.out / "front.json").read_text())
    feasible_exact = [p for p in front["front"] if p["deviation"] <= 1e-30]
    assert front["front"] == feasible_exact  # only the exact all-FP32 can meet it
    assert outcome.front == [] or all(p.deviation == 0 for p in outcome.front)


@pytest.mark.slow
def test_results_dir_of_another_model_is_refused(tmp_path, demo_model_path, demo_data_path):
    from amp_search.errors import UserInputError

    run_search(_config(tmp_path, demo_model_path, demo_data_path, n_trials=2))
    other = tmp_path / "other.npz"
    import numpy as np

    from amp_search.demo import demo_data

    np.savez(other, **demo_data(n_batches=1, seed=7))
    with pytest.raises(UserInputError, match="different"):
        run_search(_config(tmp_path, demo_model_path, other, n_trials=2))


# --- persistence: kill -9 and Ctrl-C with a real subprocess -------------------------------------


def _count(db: Path, state: str) -> int:
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(db, timeout=30)
        try:
            return con.execute("SELECT COUNT(*) FROM trials WHERE state = ?", (state,)).fetchone()[
                0
            ]
        finally:
            con.close()
    except sqlite3.OperationalError:
        return 0


def _search_cmd(tmp_path, model, data, n_trials):
    return [
        sys.executable, "-m", "amp_search", "search", str(model), "--data", str(data),
        "--latency", "measured", "--n-trials", str(n_trials), "--out", str(tmp_path / "out"),
        "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--study", "persist",
    ]  # fmt: skip


def _wait_complete(db: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while _count(db, "COMPLETE") < n:
        assert proc.poll() is None, "search ended before the kill"
        assert time.time() - t0 < timeout
        time.sleep(0.2)


@pytest.mark.slow
def test_kill_9_loses_at_most_the_running_trial(tmp_path, demo_model_path, demo_data_path):
    db = tmp_path / "study.db"
    cmd = _search_cmd(tmp_path, demo_model_path, demo_data_path, 200)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_complete(db, 5, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _count(db, "COMPLETE")
    assert done >= 5 and _count(db, "RUNNING") <= 1
    r = subprocess.run(
        _search_cmd(tmp_path, demo_model_path, demo_data_path, done + 3), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert _count(db, "COMPLETE") >= done + 3  # every finished trial kept, resumed to target
    assert _count(db, "FAIL") <= 1  # at most the killed trial
    assert _count(db, "RUNNING") == 0  # the killed one is marked failed, not left hanging


@pytest.mark.slow
def test_ctrl_c_stops_after_the_running_trial(tmp_path, demo_model_path, demo_data_path):
    """Piped to a log, the search prints progress lines as it goes (stdout and --log-file);
    Ctrl-C ends it after the running trial with an honest last line and exit code 130."""
    db, log = tmp_path / "study.db", tmp_path / "search.log"
    proc = subprocess.Popen(
        [*_search_cmd(tmp_path, demo_model_path, demo_data_path, 500), "--log-file", str(log)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait_complete(db, 3, proc)
    t0 = time.time()
    while "complete: " not in (log.read_text() if log.exists() else ""):  # written as it runs
        assert proc.poll() is None and time.time() - t0 < 60, "no trial line in the log"
        time.sleep(0.2)
    assert select.select([proc.stdout], [], [], 60)[0], "nothing on stdout while running"
    first = proc.stdout.readline()
    assert re.match(r"\[ *\d+\.\ds\] profile: 1/", first), first  # a progress line, live
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "search done" not in out
    end = out.strip().splitlines()[-1]
    ran = int(re.match(r"interrupted by Ctrl-C after (\d+) trial\(s\) in ", end).group(1))
    assert ran == _count(db, "COMPLETE") >= 3  # every trial ran here, none failed
    assert f"the front so far is in {tmp_path / 'out'}" in end
    assert "run the same command to resume: " in end
    assert re.search(r"trial #\d+ complete: \d+/500 candidates, front \d+", out)
    text = log.read_text()
    assert re.search(r"progress INFO: \[ *[\d.]+s\] trial #\d+ complete: ", text)
    assert "interrupted by Ctrl-C after" in text and "Stopping after the running trial" in text
    assert _count(db, "RUNNING") == 0 and _count(db, "FAIL") == 0
    assert (tmp_path / "out" / "front.json").is_file()


@pytest.mark.slow
def test_front_is_optunas_best_trials(tmp_path, demo_model_path, demo_data_path):
    """compute_front (no deep copies) holds exactly the assignments of study.best_trials."""
    import optuna

    from amp_search.record import TrialRecord
    from amp_search.results.pareto import compute_front

    storage = f"sqlite:///{tmp_path / 's.db'}"
    run_search(_config(tmp_path, demo_model_path, demo_data_path, n_trials=20, storage=storage,
                       latency="estimated", max_deviation=1e-3))  # fmt: skip
    study = optuna.load_study(study_name="t", storage=storage)
    want = {TrialRecord.from_trial(t).digest for t in study.best_trials}
    front = compute_front(study)
    assert {p.digest for p in front} == want and len(front) == len(want) >= 2
    assert all(p.deviation <= 1e-3 for p in front)  # the budget is a constraint
