"""Several workers on one study (PostgreSQL, journal file), and the faults they must survive.

Real processes (``python -m amp_search``), a real PostgreSQL server on loopback (``.ci/run``
installs it from Debian's packages), a real model (PP-OCR's text-direction classifier, its
units merged to 8 so a search is seconds of work per trial).
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from amp_search.errors import UserInputError
from amp_search.keys import OWNER_ATTR
from amp_search.record import TrialRecord
from amp_search.results.pareto import compute_front
from amp_search.search import SearchConfig, run_search
from amp_search.search.study import open_or_create_study

pytestmark = pytest.mark.slow

MODEL = "ppocr_cls"
SLOW_METRIC = '''
import time

import numpy as np


def slow_rel_l2(reference, output):
    """rel. L2 with a second of extra work per call (to catch workers mid-trial)."""
    time.sleep(1.0)
    d = output.astype(np.float64) - reference
    return float(np.sqrt((d * d).sum() / max(float((reference.astype(np.float64) ** 2).sum()),
                                              1e-30)))
'''


@pytest.fixture(scope="module")
def cls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from amp_search.testing import realmodels

    root = tmp_path_factory.mktemp("cls")
    metric = root / "slow_metric.py"
    metric.write_text(SLOW_METRIC)
    return realmodels.fetch(MODEL), realmodels.write_npz(MODEL, root / "cls.npz", n=8), metric


def _search(files, storage, study, out, n_trials, *extra):
    model, data, _ = files
    return [
        sys.executable, "-m", "amp_search", "search", str(model), "--data", str(data),
        "--max-units", "8", "--n-trials", str(n_trials), "--storage", storage,
        "--study", study, "--out", str(out), *extra,
    ]  # fmt: skip


def _worker(storage, study, *extra):
    return [sys.executable, "-m", "amp_search", "worker", "--storage", storage, "--study", study,
            *extra]  # fmt: skip


def _study(storage: str, study: str) -> optuna.Study:
    return open_or_create_study(storage, study, must_exist=True)[0]


def _trials(storage: str, study: str) -> list[optuna.trial.FrozenTrial]:
    return _study(storage, study).get_trials(deepcopy=False)


def _trials_or_empty(storage: str, study: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return _trials(storage, study)
    except UserInputError:  # the study does not exist yet
        return []


def _wait(cond, procs, timeout=300.0, what="condition"):
    t0 = time.time()
    while not cond():
        for p in procs:
            assert p.poll() is None, f"a worker ended before the {what}: {p.stderr.read()}"
        assert time.time() - t0 < timeout, f"timed out waiting for the {what}"
        time.sleep(0.3)


def _check_accounting(trials, target):
    """Every trial finished, every assignment built once, every seed enqueued once."""
    states = Counter(t.state for t in trials)
    assert states[TrialState.RUNNING] == 0 and states[TrialState.WAITING] == 0, states
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    records = [TrialRecord.from_trial(t) for t in complete]
    digests = Counter(r.digest for r in records)
    built = Counter(r.digest for r in records if not r.cached)
    assert len(digests) >= target
    assert all(n == 1 for n in built.values()), built.most_common(3)  # never evaluated twice
    # A seed is enqueued once, not once per worker (a seed whose worker died is enqueued
    # again, and that failed trial is not counted).
    seeds = Counter(t.user_attrs["seed"] for t in trials
                    if "seed" in t.user_attrs and t.state != TrialState.FAIL)  # fmt: skip
    assert seeds["all-fp32"] == 1 and seeds["all-fp16"] == 1, seeds
    assert all(n == 1 for n in seeds.values()), seeds
    return complete


@pytest.mark.parametrize("kind", ["postgresql", "journal"])
def test_three_workers_share_one_study(kind, request, tmp_path, cls_files):
    if kind == "postgresql":
        storage = request.getfixturevalue("postgres_url")
    else:
        storage = str(tmp_path / "study.journal")
    study = f"three-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "out"
    target = 24
    # Two workers start the same search command at once (one creates and seeds the study);
    # a third joins with 'amp-search worker', which reads the settings from the study.
    procs = [
        subprocess.Popen(
            _search(cls_files, storage, study, out, target),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for _ in range(2)
    ]
    _wait(lambda: len(_trials_or_empty(storage, study)) > 0, procs, what="study")
    procs.append(subprocess.Popen(_worker(storage, study), text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE))  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        assert "Traceback" not in err

    trials = _trials(storage, study)
    complete = _check_accounting(trials, target)
    owners = {t.user_attrs[OWNER_ATTR]["pid"] for t in complete}
    assert len(owners) >= 2  # the work was shared
    metrics = list((out / "candidates").glob("*/metrics.json"))
    assert len(metrics) == len({TrialRecord.from_trial(t).digest for t in complete})
    assert not list((out / "candidates").glob("*/.claim"))  # every claim released

    # The same assignments run by one worker give the same front.
    solo, _ = open_or_create_study(str(tmp_path / "one.journal"), "solo")
    seen = set()
    for t in complete:
        if TrialRecord.from_trial(t).digest not in seen:
            seen.add(TrialRecord.from_trial(t).digest)
            solo.enqueue_trial(dict(t.params))
    model, data, _ = cls_files
    outcome = run_search(SearchConfig(
        model=model, data=data, out=tmp_path / "one", n_trials=len(seen), max_units=8,
        storage=str(tmp_path / "one.journal"), study_name="solo"))  # fmt: skip
    shared = {(p.digest, p.latency_ms, p.deviation) for p in compute_front(_study(storage, study))}
    alone = {(p.digest, p.latency_ms, p.deviation) for p in outcome.front}
    assert shared == alone


def test_kill_9_one_worker_the_others_go_on(postgres_url, tmp_path, cls_files):
    study = f"kill-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "out"
    target = 16
    metric = f"{cls_files[2]}:slow_rel_l2"
    cmd = _search(cls_files, postgres_url, study, out, target, "--metric", metric)
    a = subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    b = subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def b_mid_trial() -> bool:
        trials = _trials_or_empty(postgres_url, study)
        now = datetime.datetime.now()
        running = [t for t in trials if t.state == TrialState.RUNNING
                   and (t.user_attrs.get(OWNER_ATTR) or {}).get("pid") == b.pid
                   and (now - t.datetime_start).total_seconds() < 0.5]  # fmt: skip
        # Started moments ago (a trial here takes over a second): killed mid-trial.
        return bool(running) and sum(t.state.is_finished() for t in trials) >= 3

    _wait(b_mid_trial, [a, b], what="second worker's trial")
    os.kill(b.pid, signal.SIGKILL)
    b.wait()
    _, err = a.communicate(timeout=600)
    assert a.returncode == 0, err  # the survivor finished the search alone

    # Rerunning the command resumes: the killed trial ends failed with its reason.
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    trials = _trials(postgres_url, study)
    # The trial b ran when it was killed: usually the one seen running, but that one may
    # have finished between the look and the kill; then b was killed in its next trial,
    # possibly before that trial recorded its owner.
    killed = [t for t in trials if t.state == TrialState.FAIL
              and (t.user_attrs.get(OWNER_ATTR) or {}).get("pid", b.pid) == b.pid]  # fmt: skip
    assert len(killed) == 1, [(t.number, t.state, t.user_attrs) for t in trials]
    # Failed by the survivor or the rerun (same host: the pid is gone), or by the heartbeat.
    assert killed[0].user_attrs.get("error", "worker died") == "worker died during this trial"
    assert all(t.state == TrialState.COMPLETE for t in trials
               if (t.user_attrs.get(OWNER_ATTR) or {}).get("pid") == b.pid
               and t.number != killed[0].number)  # fmt: skip
    complete = _check_accounting(trials, target)
    assert len(complete) >= target


def test_storage_outage_is_retried_then_reported(tmp_path, cls_files):
    from amp_search.testing.postgres import PostgresServer, find_bindir

    if find_bindir() is None and os.environ.get("AMP_SEARCH_REQUIRE_POSTGRES") != "1":
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    server = PostgresServer(tmp_path / "pg")
    url = server.start()
    try:
        out = tmp_path / "out"
        metric = f"{cls_files[2]}:slow_rel_l2"
        cmd = _search(cls_files, url, "outage", out, 18, "--metric", metric,
                      "--storage-retry", "60")  # fmt: skip
        proc = subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def finished(n: int):
            return lambda: sum(t.state.is_finished() for t in _trials_or_empty(url, "outage")) >= n

        # 1. Down for a few seconds: the worker waits, reconnects and finishes.
        _wait(finished(4), [proc], what="first trials")
        server.stop()
        time.sleep(4)
        server.start()
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert "Lost the study storage" in err and "answers again" in err
        trials = _trials(url, "outage")
        _check_accounting(trials, 18)

        # 2. Down for longer than --storage-retry: one clear line, exit 5, nothing lost.
        cmd = _search(cls_files, url, "outage", out, 30, "--metric", metric,
                      "--storage-retry", "3")  # fmt: skip
        proc = subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _wait(finished(len(trials) + 2), [proc], what="more trials")
        server.stop()
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 5, err  # StorageUnavailableError
        errors = [ln for ln in err.splitlines() if ln.startswith("amp-search search: error:")]
        assert len(errors) == 1 and "did not answer for 3 s" in errors[0], err
        assert "rerun the same command" in errors[0] and "Traceback" not in err
        server.start()
        before = [t for t in _trials(url, "outage") if t.state == TrialState.COMPLETE]
        assert len(before) >= len(trials) + 1  # finished trials are still there
        r = subprocess.run(cmd[:-2] + ["--storage-retry", "60"], capture_output=True, text=True,
                           timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stderr
        _check_accounting(_trials(url, "outage"), 30)
    finally:
        server.stop(remove=True)
