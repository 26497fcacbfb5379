"""The study: which RUNNING trials count as dead (real Optuna, journal storage), and storage
URLs (passwords hidden where shown, ``${VAR}`` expanded, the README's PostgreSQL form)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from amp_search.errors import UserInputError
from amp_search.keys import OWNER_ATTR
from amp_search.search.study import (
    WorkerLock,
    _storage,
    expand_storage,
    open_or_create_study,
    recover_dead_trials,
    redact_storage,
)

DIST = CategoricalDistribution(("fp32", "fp16"))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has it (pids are not reused this fast)


def _running(study: optuna.Study, owner: dict | None, seed: str | None = None) -> int:
    if seed is not None:
        study.enqueue_trial({"u0": "fp16"}, user_attrs={"seed": seed})
    trial = study.ask()
    trial.suggest_categorical("u0", DIST.choices)
    if owner is not None:
        trial.set_user_attr(OWNER_ATTR, owner)
    return trial.number


def test_dead_and_lost_trials_fail_live_ones_stay(tmp_path):
    study, _ = open_or_create_study(str(tmp_path / "s.journal"), "s")
    host = socket.gethostname()
    live_other = _running(study, {"host": host, "pid": os.getppid()})
    other_host = _running(study, {"host": host + "-elsewhere", "pid": 1})
    dead = _running(study, {"host": host, "pid": _dead_pid()})
    unowned = _running(study, None)  # its owner write was lost: young, so maybe still alive
    lost = _running(study, None, seed="all-fp16")  # the same, but this process knows it ran it

    assert recover_dead_trials(study) == 1
    assert recover_dead_trials(study, mine=[lost]) == 1
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    for n in (live_other, other_host, unowned):
        assert by_number[n].state == TrialState.RUNNING, n
    for n in (dead, lost):
        assert by_number[n].state == TrialState.FAIL, n
        assert by_number[n].user_attrs["error"] == "worker died during this trial"
    # A lost seed is enqueued again, with its parameters (seeds anchor the front).
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert [(t.user_attrs["seed"], t.system_attrs["fixed_params"]) for t in waiting] == [
        ("all-fp16", {"u0": "fp16"})
    ]
    assert recover_dead_trials(study, mine=[lost]) == 0  # already failed: nothing twice


HOLD_LOCK = """
import sys, time
from amp_search.search.study import WorkerLock
with WorkerLock(sys.argv[1]) as lock:
    print(lock.alone, flush=True)
    time.sleep(60)
"""


def test_worker_lock_knows_whether_another_worker_lives(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    with WorkerLock(storage) as lock:
        assert lock.alone
    other = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, storage], text=True,
                             stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert other.stdout.readline().strip() == "True"
        with WorkerLock(storage) as lock:
            assert not lock.alone  # the other worker holds its share
    finally:
        other.kill()
        other.wait()
    with WorkerLock(storage) as lock:
        assert lock.alone  # killed: the kernel released its lock
    with WorkerLock("postgresql://u@localhost/db") as lock:
        assert not lock.alone  # workers on other hosts cannot be seen


def test_alone_an_unowned_trial_is_dead_at_once(tmp_path):
    study, _ = open_or_create_study(str(tmp_path / "s.journal"), "s")
    unowned = _running(study, None)
    assert recover_dead_trials(study) == 0  # young: its worker may be writing its owner
    assert recover_dead_trials(study, alone=True) == 1
    assert study.get_trials(deepcopy=False)[unowned].state == TrialState.FAIL


@pytest.mark.parametrize(
    ("storage", "shown"),
    [
        ("postgresql://amp:s3cret@db:5432/amp", "postgresql://amp:***@db:5432/amp"),
        (
            "mysql+pymysql://amp:p%40ss@db/amp?charset=utf8",
            "mysql+pymysql://amp:***@db/amp?charset=utf8",
        ),
        ("postgresql://amp@db/amp?password=s3cret", "postgresql://amp@db/amp?password=%2A%2A%2A"),
        ("postgresql://amp:pre${AMP_DB_PASSWORD}@db/amp", "postgresql://amp:***@db/amp"),
        # Nothing to hide: unchanged, character for character.
        (
            "postgresql://amp:${AMP_DB_PASSWORD}@db/amp",
            "postgresql://amp:${AMP_DB_PASSWORD}@db/amp",
        ),
        ("postgresql://amp:$AMP_DB_PASSWORD@db/amp", "postgresql://amp:$AMP_DB_PASSWORD@db/amp"),
        ("postgresql://amp@db/amp", "postgresql://amp@db/amp"),
        ("sqlite:///studies/a b.db", "sqlite:///studies/a b.db"),
        ("runs/study.journal", "runs/study.journal"),
        (":memory:", ":memory:"),
    ],
)
def test_redact_storage_hides_literal_passwords_only(storage, shown):
    assert redact_storage(storage) == shown


def test_expand_storage_reads_the_environment(monkeypatch):
    monkeypatch.setenv("AMP_TEST_PW", "s3cret")
    monkeypatch.delenv("AMP_TEST_UNSET", raising=False)
    assert expand_storage("postgresql://amp:${AMP_TEST_PW}@db/amp") == (
        "postgresql://amp:s3cret@db/amp"
    )
    assert expand_storage("postgresql://amp:p%24ss@db/amp") == "postgresql://amp:p%24ss@db/amp"
    with pytest.raises(UserInputError, match="environment variable AMP_TEST_UNSET, which is"):
        expand_storage("postgresql://amp:$AMP_TEST_UNSET@db/amp")


def test_readme_url_opens_with_psycopg3_and_psycopg2_still_works(postgres_url):
    assert postgres_url.startswith("postgresql://")  # the README's form, no driver named
    assert _storage(postgres_url).engine.dialect.driver == "psycopg"
    name = f"drivers-{uuid.uuid4().hex[:8]}"
    study, created = open_or_create_study(postgres_url, name)
    assert created
    pytest.importorskip("psycopg2")
    explicit = postgres_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    assert _storage(explicit).engine.dialect.driver == "psycopg2"
    again, created = open_or_create_study(explicit, name, must_exist=True)
    assert not created and again._study_id == study._study_id  # noqa: SLF001
