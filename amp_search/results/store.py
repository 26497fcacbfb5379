"""Results-directory layout and atomic reads/writes.

::

    OUT/
      run.json                      what was searched: model, backend, device, options, metric,
                                    latency source, units, calibration and validation data
                                    (the identity a rerun must match)
      inspect.json                  the FP16 risk report of the model on the same data
      candidates/<digest>/          one folder per evaluated assignment (digest of its FP16 set)
          model.onnx                the mixed-precision ONNX
          engine.plan               the engine, where the backend makes one
          precision.json            unit -> fp16/fp32, and the FP32 fallback set
          metrics.json              latency (with its source), deviations, feasibility
          error.json                why it failed to build or run (instead of metrics.json)
          validation.json           its deviation on the validation data (front points)
          .claim                    while a worker evaluates it: that worker's host and pid
                                    (--keep-models front: a beaten one keeps precision.json
                                    only; see amp_search.results.prune)
      front.json, front.csv         the Pareto front (feasible, non-dominated trials)
      pareto.png, pareto.html       the plots

Every file is written to a temporary name in the same folder and renamed into place, so a
crash never leaves a half-written file and concurrent workers never see one. Workers sharing
the folder claim a candidate before evaluating it (:meth:`ResultsStore.claim`): a second
worker that draws the same assignment waits for the first one's result instead of building
it again.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from amp_search._atomic import write_json_atomic
from amp_search._owner import owner_is_dead, this_owner
from amp_search.errors import UserInputError

__all__ = ["ResultsStore", "removed_if_left_empty"]


class ResultsStore:
    """One results directory.

    Args:
        root: The directory (created if missing).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise UserInputError(
                f"Results directory {self.root} is not writable ({exc.strerror or exc}). "
                "Pass --out with a folder you can write to."
            ) from exc

    @property
    def run_file(self) -> Path:
        """``run.json``."""
        return self.root / "run.json"

    def candidate_dir(self, digest: str) -> Path:
        """The folder of one candidate."""
        return self.root / "candidates" / digest

    def read_json(self, path: Path) -> Any | None:
        """Parsed JSON, or None if missing or unreadable (a partial write never exists)."""
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def write_json(self, path: Path, obj: Any, *, sync: bool = True) -> Path:
        """Atomic JSON write (for ``sync``, see :func:`amp_search._atomic.write_bytes_atomic`)."""
        return write_json_atomic(path, obj, sync=sync)

    def check_run(self, identity: dict[str, Any]) -> None:
        """Records the run identity, or checks it matches the one already there."""
        existing = self.read_json(self.run_file)
        if existing is None:
            self.write_json(self.run_file, identity)
            return
        keys = ("model_digest", "backend", "device", "options", "data_digest",
                "validation_digest", "latency_source", "units", "precisions")  # fmt: skip
        # What a run.json written before a key existed meant by its absence.
        absent = {"precisions": ["fp16"]}
        diff = [k for k in keys
                if existing.get(k, absent.get(k)) != identity.get(k, absent.get(k))]  # fmt: skip
        if diff:
            raise UserInputError(
                f"{self.root} holds a search with a different {', '.join(diff)}. Use another "
                "--out folder (or delete this one) for a different model, data, validation data, "
                "backend or --precisions."
            )

    def cached_metrics(self, digest: str) -> dict[str, Any] | None:
        """A candidate's metrics if it was fully evaluated before."""
        found = self.read_json(self.candidate_dir(digest) / "metrics.json")
        return found if isinstance(found, dict) else None

    def cached_error(self, digest: str, since: float = 0.0) -> str | None:
        """Why the candidate failed, if an evaluation that ended after ``since`` failed."""
        path = self.candidate_dir(digest) / "error.json"
        try:
            if path.stat().st_mtime < since:
                return None
        except OSError:
            return None
        found = self.read_json(path)
        return str(found.get("error")) if isinstance(found, dict) else None

    @contextlib.contextmanager
    def claim(self, digest: str, poll_s: float = 0.2) -> Iterator[bool]:
        """Claims one candidate for evaluation; yields False if another worker finished it.

        The claim is a file created exclusively (``O_EXCL``) in the candidate folder. While
        another live worker holds it, this waits; a claim whose owner died on this host is
        taken over. A failure recorded before this call started does not count as finished
        (failed candidates are tried again by a new evaluation). On exit the claim is removed.
        """
        since = time.time()
        folder = self.candidate_dir(digest)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / ".claim"
        me = this_owner()
        while True:
            if self.cached_metrics(digest) is not None or self.cached_error(digest, since):
                yield False
                return
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if _claim_is_dead(path):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    continue
                time.sleep(poll_s)
                continue
            except OSError as exc:
                raise UserInputError(
                    f"Cannot write in {folder}: {exc.strerror or exc}. Pass --out with a "
                    "folder you can write to."
                ) from exc
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            break
        try:
            # The holder before us may have finished between our check and our claim.
            done = self.cached_metrics(digest) is not None or self.cached_error(digest, since)
            yield not done
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def run_info(self) -> dict[str, Any]:
        """The run identity (``run.json``)."""
        found = self.read_json(self.run_file)
        if not isinstance(found, dict):
            raise UserInputError(
                f"{self.root} is not an amp-search results directory (no run.json). "
                "Pass the --out folder of a search."
            )
        return found


def _claim_is_dead(path: Path) -> bool:
    """Whether a claim's owner is a process on this host that no longer runs."""
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        # Being written right now, or left empty by a crash between create and write.
        try:
            return time.time() - path.stat().st_mtime > 10
        except FileNotFoundError:
            return True
    return owner_is_dead(owner)


@contextlib.contextmanager
def removed_if_left_empty(root: str | os.PathLike[str]) -> Iterator[None]:
    """Removes the folders made for ``root`` if the work inside fails before writing a file.

    A search that stops at its inputs (a missing model, bad data) leaves no empty results
    folder behind. Only folders that did not exist before are removed, and only while the
    tree holds no file at all (another worker may be writing into it).
    """
    top = None
    p = Path(root).absolute()
    while not p.exists() and p != p.parent:
        top, p = p, p.parent
    try:
        yield
    except BaseException:
        if top is not None and top.is_dir() and not any(f for _, _, f in os.walk(top)):
            for folder, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
        raise
