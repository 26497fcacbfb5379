"""--storage on a real PostgreSQL server: a password reaches the server and nothing else.

The server (``postgres_password``) asks one role for its password, so a search that finishes
proves the password got there, while its stdout, stderr, log file, results files and the study
itself must never hold it. ``${VAR}`` in --storage is read from the environment and kept
unexpanded wherever the storage is shown or recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest

from amp_search.cli.refine import _search_config
from amp_search.keys import CONFIG_ATTR
from amp_search.results.report import load_results
from amp_search.search.study import open_or_create_study

VAR = "AMP_TEST_DB_PASSWORD"


def _cli(*args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m amp_search``; ``password`` goes into the environment as ``$VAR``."""
    env = {k: v for k, v in os.environ.items() if k != VAR}
    if password is not None:
        env[VAR] = password
    return subprocess.run([sys.executable, "-m", "amp_search", *args], capture_output=True,
                          text=True, timeout=600, env=env)  # fmt: skip


def _search(
    model: Path, data: Path, storage: str, study: str, out: Path, *extra: str
) -> list[str]:
    return ["search", str(model), "--data", str(data), "--n-trials", "4", "--storage", storage,
            "--study", study, "--out", str(out), *extra]  # fmt: skip


def _study(url: str, study_name: str) -> optuna.Study:
    return open_or_create_study(url, study_name, must_exist=True)[0]


def _database_text(url: str) -> str:
    """Every row of every table of the study database, as text (studies, trials, attributes)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(url) as con:
        tables = [
            r[0]
            for r in con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
        ]
        assert "study_user_attributes" in tables  # Optuna's schema: the check sees its data
        return "\n".join(
            str(con.execute(sql.SQL("SELECT string_agg(t::text, E'\\n') FROM {} t").format(
                sql.Identifier(name))).fetchone())
            for name in tables
        )  # fmt: skip


def _files_text(folder: Path) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_password_never_shown_logged_or_stored(postgres_password, demo_model_path, demo_data_path,
                                               tmp_path):  # fmt: skip
    url, password = postgres_password
    assert url.startswith("postgresql://")  # the README's form (psycopg 3)
    shown, by_name = url.replace(password, "***"), url.replace(password, f"${{{VAR}}}")
    study, out, logs = f"secret-{uuid.uuid4().hex[:8]}", tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    args = _search(demo_model_path, demo_data_path, url, study, out,
                   "-v", "--log-file", str(logs / "search.log"))  # fmt: skip
    args[args.index("--storage") : args.index("--storage") + 2] = [f"--storage={url}"]
    search = _cli(*args)
    assert search.returncode == 0, search.stderr
    assert f"in {shown} (opens in optuna-dashboard)" in search.stdout
    assert search.stdout.strip().splitlines()[-1].startswith("search done: ")
    assert _study(url, study).user_attrs[CONFIG_ATTR]["storage"] == shown

    # 'report' reopens the study from front.json, where the password is hidden: one line
    # that says how to give it, then --storage does.
    assert json.loads((out / "front.json").read_text())["storage"] == shown
    hidden = _cli("report", str(out))
    assert hidden.returncode == 2 and "Traceback" not in hidden.stderr
    first, *notes = hidden.stderr.strip().splitlines()
    assert first.startswith(f"amp-search report: error: Cannot open the study storage '{shown}'")
    assert "password authentication failed" in first
    assert len(notes) == 1 and notes[0].startswith("Note:") and "--storage" in notes[0]
    report = _cli("report", str(out), "--storage", url)
    assert report.returncode == 0, report.stderr
    assert "wrote" in report.stdout
    # 'refine' reads the calibration data from the study's recorded settings the same way.
    results = load_results(out)
    assert _search_config(results, None) == {}  # then it asks for --data or --storage
    assert _search_config(results, url)["data"] == str(demo_data_path.resolve())

    # A worker names the password as an environment variable. The study's copy of the
    # storage has it hidden: the worker opens its own --storage, and records it unexpanded.
    n_before = len(_study(url, study).trials)
    worker = _cli("worker", "--storage", by_name, "--study", study, "-v", "--log-file",
                  str(logs / "worker.log"), "--n-trials", str(n_before + 2),
                  password=password)  # fmt: skip
    assert worker.returncode == 0, worker.stderr
    assert len(_study(url, study).trials) > n_before
    assert f"in {by_name} (opens in optuna-dashboard)" in worker.stdout
    assert json.loads((out / "front.json").read_text())["storage"] == by_name
    # ...so a later command reopens it as recorded, from its own environment.
    again = _cli("report", str(out), password=password)
    assert again.returncode == 0, again.stderr

    runs = (search, hidden, report, worker, again)
    outputs = [r.stdout + r.stderr for r in runs]
    stored = _database_text(url)
    assert shown in stored  # the recorded settings are in what is checked
    for text in [*outputs, _files_text(logs), _files_text(out), stored]:
        assert password not in text
    assert (logs / "search.log").stat().st_size > 0  # the log was checked, not absent


@pytest.mark.slow
def test_unset_variable_in_storage_is_one_line():
    by_name = f"postgresql://amp:${{{VAR}}}@127.0.0.1:1/amp"
    r = _cli("worker", "--storage", by_name, "--study", "s")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"amp-search worker: error: The study storage '{by_name}' names the environment "
        f"variable {VAR}, which is not set. Export it (export {VAR}=...) and rerun, or write a "
        "literal '$' in the URL as %24."
    ]


@pytest.mark.slow
def test_missing_driver_says_what_to_install():
    code = ("import sys\nsys.modules['psycopg'] = None\nfrom amp_search.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-c", code, "worker", "--storage",
         "postgresql://amp:hunter2secret@127.0.0.1:1/amp", "--study", "s"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "amp-search worker: error: Cannot open the study storage "
        "'postgresql://amp:***@127.0.0.1:1/amp': its database driver is not installed "
        "(import of psycopg halted; None in sys.modules). For PostgreSQL install it with: pip "
        "install 'amp-search[postgres]' (or name an installed driver: postgresql+psycopg2://...)."
    ]
