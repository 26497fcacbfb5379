"""Atomic file writes: everything amp-search writes goes to a temp file, then os.replace."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from amp_search.errors import UserInputError

__all__ = ["write_bytes_atomic", "write_json_atomic"]


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes | list[bytes]) -> Path:
    """Writes ``data`` (bytes, or chunks written in order) to ``path`` atomically.

    The data goes to a temporary file in the same folder, is synced, then renamed over
    ``path``: readers see the old file or the new one, never a partial write.
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as exc:
        raise UserInputError(
            f"Cannot write {p}: {exc.strerror or exc}. Choose a writable location."
        ) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, list):
                f.writelines(data)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, p)
    except OSError as exc:
        raise UserInputError(f"Cannot write {p}: {exc.strerror or exc}.") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Writes ``obj`` as indented JSON atomically (non-finite floats become strings)."""
    text = json.dumps(_finite(obj), indent=2, sort_keys=False)
    return write_bytes_atomic(path, text.encode() + b"\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
