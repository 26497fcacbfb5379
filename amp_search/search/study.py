"""Creating or loading the Optuna study, and recovering trials a dead worker left RUNNING.

Storage defaults to SQLite under ``studies/`` (one database per study name); any Optuna
storage URL works (``postgresql://...``), a path ending in ``.journal`` or ``.log`` uses
Optuna's ``JournalFileBackend``, and ``:memory:`` keeps the study in memory (tests). The
database opens in optuna-dashboard as is.

A storage is kept as given, ``$VAR``/``${VAR}`` references and all, and expanded from the
environment only where it is opened (:func:`expand_storage`), so a password can stay off the
command line: ``postgresql://amp:${AMP_DB_PASSWORD}@db/amp``. Wherever a storage reaches a
message, a log line, the console, a results file or the study's recorded settings it goes
through :func:`redact_storage`, which hides a literal password.

Every trial records the host and process that runs it. When a study is opened again, and
after every trial while workers run, a RUNNING trial whose process is gone on this host
(``kill -9``, a crash) is marked FAIL, and, if it was an enqueued seed, enqueued again, so
nothing but that one trial's work is lost. On a database server (PostgreSQL, MySQL), where
workers run on several hosts, Optuna's heartbeat does the same across hosts: a trial whose
worker stopped beating for :data:`GRACE_PERIOD_S` is failed by the next worker that starts one.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amp_search._owner import owner_is_dead, this_owner
from amp_search.errors import UserInputError
from amp_search.keys import ERROR_ATTR, OWNER_ATTR, SEED_ATTR, SEED_PARAMS_ATTR
from amp_search.search.sampler import make_sampler

if TYPE_CHECKING:
    from collections.abc import Collection

    import optuna

__all__ = [
    "DEFAULT_STUDIES_DIR",
    "WorkerLock",
    "default_storage",
    "expand_storage",
    "mark_trial_owner",
    "open_study",
    "open_or_create_study",
    "recover_dead_trials",
    "redact_storage",
    "storage_errors",
]

logger = logging.getLogger(__name__)

DEFAULT_STUDIES_DIR = Path("studies")
#: Age after which a RUNNING trial that never recorded its owner counts as dead.
UNOWNED_STALE_S = 120
#: Seconds between a running trial's heartbeats on a database server.
HEARTBEAT_INTERVAL_S = 20
#: Seconds without a heartbeat after which a running trial counts as dead.
GRACE_PERIOD_S = 90
#: What :func:`redact_storage` shows instead of a password (SQLAlchemy's marker).
HIDDEN = "***"
#: ``$NAME`` or ``${NAME}``: an environment variable named in a storage.
_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def storage_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean the study storage is unreachable (retry, then give up)."""
    import optuna

    errors: list[type[BaseException]] = [optuna.exceptions.StorageInternalError]
    try:
        import sqlalchemy.exc

        errors += [sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                   sqlalchemy.exc.DisconnectionError]  # fmt: skip
    except ImportError:
        pass
    return tuple(errors)


def default_storage(study_name: str, studies_dir: Path = DEFAULT_STUDIES_DIR) -> str:
    """``sqlite:///studies/<study_name>.db``."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in study_name)
    studies_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(studies_dir / f'{safe}.db').as_posix()}"


def redact_storage(storage: str) -> str:
    """``storage`` as amp-search shows and records it: a literal password hidden (``***``).

    A password that only names environment variables (``${AMP_DB_PASSWORD}``) is no secret
    and is kept, so a later command can expand it again. A storage that is no URL (a journal
    file, ``:memory:``) or has no password comes back unchanged.
    """
    url = _parsed(storage)
    if url is None:
        return storage
    hide = _secret(url.password)
    if _secret(url.query.get("password")):  # libpq also takes it as a query parameter
        url = url.update_query_dict({"password": HIDDEN})
    elif not hide:
        return storage
    return str(url.render_as_string(hide_password=hide))


def _parsed(storage: str) -> Any:
    """``storage`` as a SQLAlchemy URL, or None where it is none (a journal file)."""
    if "://" not in storage:
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(storage)
    except (ArgumentError, ValueError):
        return None


def _secret(password: object) -> bool:
    """A password that is more than references to environment variables."""
    if isinstance(password, tuple):  # a repeated query parameter
        return any(_secret(p) for p in password)
    return isinstance(password, str) and bool(_VARIABLE.sub("", password))


def expand_storage(storage: str) -> str:
    """``storage`` with the environment variables it names (``$NAME``, ``${NAME}``) expanded.

    Raises:
        UserInputError: It names a variable that is not set.
    """
    unset = sorted({a or b for a, b in _VARIABLE.findall(storage)} - set(os.environ))
    if unset:
        raise UserInputError(
            f"The study storage {redact_storage(storage)!r} names the environment variable "
            f"{unset[0]}, which is not set. Export it (export {unset[0]}=...) and rerun, or "
            "write a literal '$' in the URL as %24."
        )
    return os.path.expandvars(storage)


def _storage(storage: str) -> Any:
    import optuna

    url = expand_storage(storage)
    if url == ":memory:":
        return optuna.storages.InMemoryStorage()
    if url.endswith((".journal", ".log")) and "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    server = not url.startswith("sqlite")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=_engine_kwargs(url),
                heartbeat_interval=HEARTBEAT_INTERVAL_S if server else None,
                grace_period=GRACE_PERIOD_S if server else None,
                heartbeat_stale_trial_callback=_requeue_seed if server else None,
            )
    except Exception as exc:  # sqlalchemy raises many types for bad URLs / dead servers
        raise _open_error(storage, exc) from exc


def _open_error(storage: str, exc: Exception) -> UserInputError:
    """Why the storage did not open, in one line that shows no password."""
    shown = redact_storage(storage)
    if isinstance(exc, ImportError) and isinstance(exc.__cause__, ImportError):
        return UserInputError(
            f"Cannot open the study storage {shown!r}: its database driver is not installed "
            f"({exc.__cause__}). For PostgreSQL install it with: pip install "
            "'amp-search[postgres]' (or name an installed driver: postgresql+psycopg2://...)."
        )
    reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    url = _parsed(storage)
    hidden = url is not None and url.password == HIDDEN
    return UserInputError(
        f"Cannot open the study storage {shown!r}: {reason}. "
        "Check the URL and that the database server is reachable.",
        notes=[
            "amp-search records and prints a storage URL with its password hidden: give the "
            "URL with its password (--storage), or name an environment variable in it "
            "('postgresql://user:${AMP_DB_PASSWORD}@host/db') so it reopens as recorded."
        ] if hidden else None,
    )  # fmt: skip


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
    return open_or_create_study(storage, study_name, seed=seed, sampler=sampler)[0]


def open_or_create_study(
    storage: str,
    study_name: str,
    *,
    seed: int | None = None,
    sampler: str = "tpe",
    must_exist: bool = False,
) -> tuple[optuna.Study, bool]:
    """The study and whether this call created it (exactly one of several racing workers does).

    Args:
        storage: Storage URL or journal path (see the module docstring).
        study_name: The study.
        seed: Sampler seed (a worker that loads an existing study mixes in its process id).
        sampler: ``tpe``, ``nsga2`` or ``random``.
        must_exist: Join an existing study only (``amp-search worker``).
    """
    import optuna

    backend = _storage(storage)
    smp = make_sampler(sampler, seed)
    created = False
    try:
        if must_exist:
            study = optuna.load_study(study_name=study_name, storage=backend, sampler=smp)
        else:
            try:
                study = optuna.create_study(
                    storage=backend, study_name=study_name, sampler=smp,
                    directions=["minimize", "minimize"],
                )  # fmt: skip
                created = True
            except optuna.exceptions.DuplicatedStudyError:
                study = optuna.load_study(study_name=study_name, storage=backend, sampler=smp)
    except KeyError as exc:
        raise UserInputError(
            f"No study {study_name!r} in {redact_storage(storage)}. Start it with 'amp-search "
            "search' (same --storage and --study), then add workers."
        ) from exc
    if len(study.directions) != 2:
        raise UserInputError(
            f"Study {study_name!r} in {redact_storage(storage)} is not an amp-search study (it "
            f"has {len(study.directions)} objective(s)). Pass another --study name."
        )
    if not created and seed is not None:
        # Workers joining one study must not draw the same proposals in lockstep.
        study.sampler = make_sampler(sampler, (seed * 1_000_003 + os.getpid()) % 2**32)
    if created:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(["latency_ms", "deviation"])
    return study, created


def mark_trial_owner(trial: optuna.Trial) -> None:
    """Records which host/process runs the trial (for :func:`recover_dead_trials`)."""
    trial.set_user_attr(OWNER_ATTR, this_owner())


def _requeue_seed(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A failed seed trial is enqueued again (seeds are the front's anchors)."""
    if SEED_ATTR in trial.user_attrs:
        params = trial.system_attrs.get("fixed_params") or dict(trial.params)
        attrs = {SEED_ATTR: trial.user_attrs[SEED_ATTR], SEED_PARAMS_ATTR: dict(params)}
        study.enqueue_trial(dict(params), user_attrs=attrs)


class WorkerLock:
    """Whether this is the only live worker of a study in a local file (SQLite, journal).

    Every worker holds a shared ``flock`` on ``<storage file>.workers`` while it runs; one that
    can first take it exclusively is alone. Then a RUNNING trial without an owner belongs to
    a dead worker (killed between Optuna creating the trial and the trial recording its
    owner), however young it is. Elsewhere (a database server, no ``fcntl``, a read-only
    folder) ``alone`` stays False and such a trial waits :data:`UNOWNED_STALE_S`.
    """

    def __init__(self, storage: str) -> None:
        self.path = _local_storage_file(storage)
        self.alone = False
        self._fd: int | None = None

    def __enter__(self) -> WorkerLock:
        try:
            import fcntl
        except ImportError:  # not POSIX
            return self
        if self.path is None:
            return self
        try:
            self._fd = os.open(f"{self.path}.workers", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return self
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.alone = True
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_SH)  # held until the worker ends (or dies)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


def _local_storage_file(storage: str) -> str | None:
    storage = expand_storage(storage)
    if storage.startswith("sqlite:///") and storage != "sqlite:///:memory:":
        return storage[len("sqlite:///") :]
    if storage.endswith((".journal", ".log")) and "://" not in storage:
        return storage
    return None


def recover_dead_trials(
    study: optuna.Study, mine: Collection[int] = (), *, alone: bool = False
) -> int:
    """Fails RUNNING trials whose process on this host is gone; re-enqueues seeds among them.

    This process's own RUNNING trials count as dead too: call it only between trials.
    ``mine`` names trials (by number) this process ran and lost, owner recorded or not: a
    storage outage can hit the very write that records the owner. With ``alone`` (see
    :class:`WorkerLock`) a RUNNING trial without an owner is dead whatever its age.
    """
    import optuna
    from optuna.trial import TrialState

    host = socket.gethostname()
    storage = study._storage  # noqa: SLF001 - Optuna has no public API to fail a stale trial
    recovered = 0
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(OWNER_ATTR) or {}
        owner_host, pid = owner.get("host"), owner.get("pid")
        if t.number in mine:
            pass
        elif not owner:
            # A worker killed between Optuna creating the trial and the trial recording its
            # owner (milliseconds): dead once it is older than any live start could be, or
            # at once where no other worker of the study lives.
            started = t.datetime_start or now
            if not alone and (now - started).total_seconds() < UNOWNED_STALE_S:
                continue
        elif (
            owner_host != host
            or pid is None
            or (not owner_is_dead(owner) and int(pid) != os.getpid())
        ):
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, ERROR_ATTR, "worker died during this trial")  # noqa: SLF001
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)  # noqa: SLF001
        except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue
        _requeue_seed(study, t)
        recovered += 1
    if recovered:
        logger.warning("Marked %d trial(s) of a dead worker as failed", recovered)
    return recovered
