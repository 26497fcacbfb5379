"""A throwaway PostgreSQL server on loopback, for multi-worker tests and benchmarks.

Uses Debian's server binaries (``apt-get install postgresql``; ``.ci/run`` installs them).
The cluster lives in a folder of its own, listens on 127.0.0.1 on a free port with trust
authentication, and is stopped and removed by :meth:`PostgresServer.stop`. Run as root, the
server runs as the ``postgres`` user (PostgreSQL refuses root). Its URL is the README's
plain ``postgresql://`` form (psycopg 3 under SQLAlchemy 2.1).

One role, :data:`PASSWORD_USER`, must give its password (``scram-sha-256``):
:func:`password_url` creates it, so tests can show that a password reaches the server and
never the output.

Command line (``.ci/run`` uses it to start the server the tests share)::

    python -m amp_search.testing.postgres start DIR   # prints the storage URL
    python -m amp_search.testing.postgres stop DIR
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["PASSWORD_USER", "PostgresServer", "find_bindir", "password_url"]

USER = "amp"
#: The one role the server asks for a password (it owns a database of the same name).
PASSWORD_USER = "amp_secret"


def find_bindir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl`` (newest installed major), or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit()
        else 0,
    )  # fmt: skip
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One cluster in ``root`` (created on first :meth:`start`).

    Args:
        root: Folder for the data directory, socket and log.
        port: TCP port on 127.0.0.1 (a free one by default; kept across restarts).
    """

    def __init__(self, root: str | os.PathLike[str], port: int | None = None) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.home = self._home()
        self.data = self.home / "data"
        self.log = self.home / "server.log"
        port_file = self.root / "port"
        if port is None and port_file.exists():
            port = int(port_file.read_text())
        self.port = port or _free_port()
        bindir = find_bindir()
        if bindir is None:
            raise RuntimeError(
                "PostgreSQL server binaries not found; install them with "
                "'apt-get install postgresql' (Debian)."
            )
        self.bindir = bindir

    def _home(self) -> Path:
        """Where the cluster lives.

        As root the server runs as ``postgres``, which must reach it: pytest's and many other
        temp folders are private (0700) to root, so the cluster goes to a folder of its own
        under the system temp dir, recorded in ``root``.
        """
        if os.geteuid() != 0:
            return self.root
        record = self.root / "home"
        if record.exists():
            return Path(record.read_text())
        home = Path(tempfile.mkdtemp(prefix="amp-search-pg-"))
        pw = pwd.getpwnam("postgres")
        os.chown(home, pw.pw_uid, pw.pw_gid)
        record.write_text(str(home))
        return home

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``postgres`` database."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def start(self) -> str:
        """Initializes the cluster if needed, starts the server, waits until it accepts."""
        (self.root / "port").write_text(str(self.port))
        if not (self.data / "PG_VERSION").exists():
            self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8",
                      "--no-sync")  # fmt: skip
            hba = self.data / "pg_hba.conf"
            hba.write_text(f"host all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n"
                           + hba.read_text())  # fmt: skip
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.home} -c fsync=off -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w",
                  "start")  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self.url
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"PostgreSQL did not start; see {self.log}")

    def stop(self, *, remove: bool = False) -> None:
        """Stops the server (fast shutdown); removes the cluster folder with ``remove``."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)
        if remove:
            shutil.rmtree(self.home, ignore_errors=True)
            shutil.rmtree(self.root, ignore_errors=True)


def password_url(url: str, password: str) -> str:
    """The URL of :data:`PASSWORD_USER` with ``password``, on the server of ``url``.

    Creates the role (or sets its password) and its database, connecting as ``url``'s
    trusted superuser with psycopg 3.

    Args:
        url: A superuser's storage URL (:attr:`PostgresServer.url`).
        password: The role's password, put into the URL as is (no characters to escape).
    """
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    admin = make_url(url).set(drivername="postgresql")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as con:
        exists = con.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                             (PASSWORD_USER,)).fetchone()  # fmt: skip
        verb = sql.SQL("ALTER" if exists else "CREATE")
        con.execute(sql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(
            verb, sql.Identifier(PASSWORD_USER), sql.Literal(password)))  # fmt: skip
        if not con.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                           (PASSWORD_USER,)).fetchone():  # fmt: skip
            con.execute(sql.SQL("CREATE DATABASE {0} OWNER {0}").format(
                sql.Identifier(PASSWORD_USER)))  # fmt: skip
    return (
        f"postgresql://{PASSWORD_USER}:{password}@{admin.host}:{admin.port or 5432}/"
        f"{PASSWORD_USER}"
    )


def main(argv: list[str] | None = None) -> int:
    """``start DIR`` (prints the URL) or ``stop DIR``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("start", "stop"):
        print("usage: python -m amp_search.testing.postgres start|stop DIR", file=sys.stderr)
        return 2
    server = PostgresServer(args[1])
    if args[0] == "start":
        print(server.start())
    else:
        server.stop(remove=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
