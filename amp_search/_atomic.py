"""Atomic file writes: everything amp-search writes goes to a temp file, then os.replace.

A write that fails (disk full, read-only file system, no permission, a file where a folder
should be) raises :class:`~amp_search.errors.UserInputError` with one line saying what to do
(:func:`os_error_message`); the temp file is removed and the previous file stays in place.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from amp_search.errors import UserInputError
from amp_search.record import encode_float

__all__ = [
    "BackgroundWrite",
    "check_writable",
    "disk_full_message",
    "os_error_message",
    "write_bytes_atomic",
    "write_json_atomic",
]

_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


def write_bytes_atomic(
    path: str | os.PathLike[str], data: bytes | list[bytes], *, sync: bool = True
) -> Path:
    """Writes ``data`` (bytes, or chunks written in order) to ``path`` atomically.

    The data goes to a temporary file in the same folder, is synced, then renamed over
    ``path``: readers see the old file or the new one, never a partial write. Without
    ``sync`` that still holds against a killed process, not against a power cut; it is for
    files whose loss costs only their recomputation (a candidate's metrics: an unreadable
    one is evaluated again). Under a large write elsewhere on the disk, a sync can take tens
    of milliseconds.
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as exc:
        raise UserInputError(os_error_message(p, exc)) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, list):
                f.writelines(data)
            else:
                f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, p)
    except OSError as exc:
        raise UserInputError(os_error_message(p, exc)) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


class BackgroundWrite:
    """:func:`write_bytes_atomic` in a thread: the caller goes on, then waits for it.

    Writing a large candidate costs as much as copying it into the page cache (50-200 ms for
    MiniLM's 80 MB here, synced or not); a backend that builds from the bytes in memory
    overlaps that with its build.
    """

    def __init__(self, path: str | os.PathLike[str], data: bytes | list[bytes]) -> None:
        self.path = Path(path)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(data,), daemon=True)
        self._thread.start()

    def _run(self, data: bytes | list[bytes]) -> None:
        try:
            write_bytes_atomic(self.path, data)
        except BaseException as exc:  # raised by wait(), in the caller's thread
            self._error = exc

    def wait(self) -> Path:
        """Returns once the file is in place; raises what the write raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.path


def os_error_message(path: str | os.PathLike[str], exc: OSError) -> str:
    """One line for a failed write of ``path``: what failed, why, and what to do."""
    p = Path(path)
    why = exc.strerror or str(exc)
    if exc.errno in _DISK_FULL or exc.errno == errno.EFBIG:
        return (
            f"Cannot write {p}: {why}. Free space on that disk (or write elsewhere) and run "
            "again; a search resumes where it stopped."
        )
    if exc.errno == errno.EROFS:
        return f"Cannot write {p}: {why}. Pass --out (or the output path) on a writable disk."
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = next((q for q in [p, *p.parents] if q.exists() and not q.is_dir()), None)
        if blocker is not None and blocker != p:
            return f"Cannot write {p}: {blocker} is a file, not a folder. Choose another path."
    return f"Cannot write {p}: {why}. Choose a location you can write to."


def check_writable(path: str | os.PathLike[str], *, folder: bool = False) -> None:
    """Fails early, with one line, where ``path`` could not be written later.

    Checks that no existing part of the path is a file, that an existing ``path`` is a file
    (or a folder, with ``folder``), and that the nearest existing folder is writable. A full
    disk shows only when writing.
    """
    p = Path(path).absolute()
    existing = p
    while not existing.exists():
        existing = existing.parent
    if existing != p and not existing.is_dir():
        raise UserInputError(
            f"Cannot write {path}: {existing} is a file, not a folder. Choose another path."
        )
    if existing == p and p.is_dir() != folder:
        want, got = ("folder", "file") if folder else ("file", "folder")
        raise UserInputError(f"Cannot write {path}: it is a {got}, not a {want}. Choose another "
                             "path.")  # fmt: skip
    where = existing if existing.is_dir() else existing.parent
    if not os.access(where, os.W_OK):
        raise UserInputError(
            f"Cannot write {path}: {where} is not writable. Choose a location you can write to."
        )


def disk_full_message(exc: BaseException) -> str | None:
    """One line if ``exc`` was caused (anywhere in its chain) by a full disk, else None.

    Catches what no write helper translated: the study database filling up (SQLite says
    "database or disk is full"), or a library writing a file itself.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in _DISK_FULL:
            return os_error_message(cause.filename or "a file", cause)
        if "database or disk is full" in str(cause):
            return (
                "The study database cannot grow: its disk is full. Free space there (or pass "
                "--storage on another disk) and rerun the same command: finished trials are kept."
            )
        cause = cause.__cause__ or cause.__context__
    return None


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, sync: bool = True) -> Path:
    """Writes ``obj`` as indented JSON atomically (non-finite floats as :func:`encode_float`'s).

    :func:`~amp_search.record.decode_float` reads them back.
    """
    text = json.dumps(_finite(obj), indent=2, sort_keys=False)
    return write_bytes_atomic(path, text.encode() + b"\n", sync=sync)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return encode_float(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
