"""Results-directory layout and atomic reads/writes.

::

    OUT/
      run.json                      what was searched: model, backend, device, options, metric,
                                    latency source, units (the identity a rerun must match)
      inspect.json                  the FP16 risk report of the model on the same data
      candidates/<digest>/          one folder per evaluated assignment (digest of its FP16 set)
          model.onnx                the mixed-precision ONNX
          engine.plan               the engine, where the backend makes one
          precision.json            unit -> fp16/fp32, and the FP32 fallback set
          metrics.json              latency (with its source), deviations, feasibility
      front.json, front.csv         the Pareto front (feasible, non-dominated trials)
      pareto.png, pareto.html       the plots

Every file is written to a temporary name in the same folder and renamed into place, so a
crash never leaves a half-written file and concurrent workers never see one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from amp_search._atomic import write_json_atomic
from amp_search.errors import UserInputError

__all__ = ["ResultsStore"]


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

    def write_json(self, path: Path, obj: Any) -> Path:
        """Atomic JSON write."""
        return write_json_atomic(path, obj)

    def check_run(self, identity: dict[str, Any]) -> None:
        """Records the run identity, or checks it matches the one already there."""
        existing = self.read_json(self.run_file)
        if existing is None:
            self.write_json(self.run_file, identity)
            return
        keys = ("model_digest", "backend", "device", "options", "data_digest", "latency_source",
                "units")  # fmt: skip
        diff = [k for k in keys if existing.get(k) != identity.get(k)]
        if diff:
            raise UserInputError(
                f"{self.root} holds a search with a different {', '.join(diff)}. Use another "
                "--out folder (or delete this one) for a different model, data or backend."
            )

    def cached_metrics(self, digest: str) -> dict[str, Any] | None:
        """A candidate's metrics if it was fully evaluated before."""
        found = self.read_json(self.candidate_dir(digest) / "metrics.json")
        return found if isinstance(found, dict) else None

    def run_info(self) -> dict[str, Any]:
        """The run identity (``run.json``)."""
        found = self.read_json(self.run_file)
        if not isinstance(found, dict):
            raise UserInputError(
                f"{self.root} is not an amp-search results directory (no run.json). "
                "Pass the --out folder of a search."
            )
        return found
