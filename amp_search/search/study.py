"""Creating or loading the Optuna study, and recovering trials a dead worker left RUNNING.

Storage defaults to SQLite under ``studies/`` (one database per study name); any Optuna
storage URL works (``postgresql://...``), a path ending in ``.journal`` or ``.log`` uses
Optuna's ``JournalFileBackend``, and ``:memory:`` keeps the study in memory (tests). The
database opens in optuna-dashboard as is.

Every trial records the host and process that runs it. When a study is opened again, a
RUNNING trial whose process is gone on this host (``kill -9``, a crash) is marked FAIL, and,
if it was an enqueued seed, enqueued again, so nothing but that one trial's work is lost.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amp_search.errors import UserInputError
from amp_search.search.sampler import make_sampler

if TYPE_CHECKING:
    import optuna

__all__ = [
    "DEFAULT_STUDIES_DIR",
    "default_storage",
    "mark_trial_owner",
    "open_study",
    "recover_dead_trials",
]

logger = logging.getLogger(__name__)

DEFAULT_STUDIES_DIR = Path("studies")
OWNER_ATTR = "amp_search:owner"


def default_storage(study_name: str, studies_dir: Path = DEFAULT_STUDIES_DIR) -> str:
    """``sqlite:///studies/<study_name>.db``."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in study_name)
    studies_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(studies_dir / f'{safe}.db').as_posix()}"


def _storage(url: str) -> Any:
    import optuna

    if url == ":memory:":
        return optuna.storages.InMemoryStorage()
    if url.endswith((".journal", ".log")) and "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
    except Exception as exc:  # sqlalchemy raises many types for bad URLs / dead servers
        raise UserInputError(
            f"Cannot open the study storage {url!r}: {str(exc).splitlines()[0][:200]}. "
            "Check the URL and that the database server is reachable."
        ) from exc


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite:///"):
        return {"creator": _sqlite_connector(url[len("sqlite:///") :])}
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True}


def _sqlite_connector(path: str) -> Any:
    """SQLite in WAL mode with ``synchronous=NORMAL``.

    Optuna writes every suggested parameter in its own transaction (one per unit per trial).
    In SQLite's default rollback-journal mode each commit syncs the file several times, which
    made storage the largest per-trial cost. In WAL mode with ``synchronous=NORMAL`` a commit
    is an append to the log: it survives a crash or ``kill -9`` of the process (what a search
    must survive), though not a power cut in the last moments before a checkpoint.
    """
    import sqlite3

    def connect() -> sqlite3.Connection:
        con = sqlite3.connect(path, timeout=60, check_same_thread=False)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        return con

    return connect


def open_study(
    storage: str, study_name: str, *, seed: int | None = None, sampler: str = "tpe"
) -> optuna.Study:
    """Creates the two-objective study (latency, deviation), or loads it to resume."""
    import optuna

    smp = make_sampler(sampler, seed)
    study = optuna.create_study(
        storage=_storage(storage),
        study_name=study_name,
        directions=["minimize", "minimize"],
        sampler=smp,
        load_if_exists=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["latency_ms", "deviation"])
    return study


def mark_trial_owner(trial: optuna.Trial) -> None:
    """Records which host/process runs the trial (for :func:`recover_dead_trials`)."""
    trial.set_user_attr(OWNER_ATTR, {"host": socket.gethostname(), "pid": os.getpid()})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dead_trials(study: optuna.Study) -> int:
    """Fails RUNNING trials whose process on this host is gone; re-enqueues seeds among them."""
    import optuna
    from optuna.trial import TrialState

    host = socket.gethostname()
    storage = study._storage  # noqa: SLF001 - Optuna has no public API to fail a stale trial
    recovered = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(OWNER_ATTR) or {}
        owner_host, pid = owner.get("host"), owner.get("pid")
        if owner_host != host or pid is None or _alive(int(pid)) and int(pid) != os.getpid():
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "error", "worker died during this trial")  # noqa: SLF001
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)  # noqa: SLF001
        except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue
        if "seed" in t.user_attrs:
            params = t.system_attrs.get("fixed_params") or dict(t.params)
            study.enqueue_trial(dict(params), user_attrs={"seed": t.user_attrs["seed"]})
        recovered += 1
    if recovered:
        logger.warning("Marked %d trial(s) of a dead worker as failed", recovered)
    return recovered
