"""Unseen data: a validation set the search never optimizes on, and the front measured on it.

Calibration deviation is not shipped deviation: a search optimizes (and overfits) on its
calibration batches. A validation set is kept out of it:

- ``--validation-data PATH``: a second data set, loaded and checked as ``--data`` is;
- ``--holdout-fraction F`` (0 < F < 1; default 0, off): the last ``ceil(F * n)`` of the ``n``
  calibration batches (in file-name order, then stack order) are held out and the search
  optimizes on the others. Deterministic, so a rerun of the same command resumes.

Its identity (:func:`prepare_validation`: file names and SHA-256 digests, or the batches
held out) goes into ``run.json`` (:func:`run_identity`): a resumed search with other
validation data is refused, as one with other calibration data is.

At the end of the search :func:`measure_front` measures every front point on it: the point's
candidate is built again with the search's backend, device and options (in a scratch folder,
so no artifact of the search's build is overwritten), run over the validation batches, and its
deviation from the FP32 outputs there (computed once, on ONNX Runtime CPU as for the
calibration data) is taken with the search's metric. The figure is cached in the candidate's
folder (``validation.json``, keyed by the data's digest and the metric), so a resumed search
measures only new front points. ``amp-search refine`` measures every refined point alike
(:class:`ValidationRun`). What the figures mean for a budget is
:mod:`amp_search.results.validation`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from amp_search.backends.base import BuildConfig
from amp_search.calibration import CalibrationData, InputSpec, load_calibration
from amp_search.errors import UserInputError
from amp_search.objective import EvalContext
from amp_search.record import decode_float
from amp_search.results.validation import VALIDATION_FILE

if TYPE_CHECKING:
    import onnx

    from amp_search.backends.base import Backend, Runner
    from amp_search.objective import Objective
    from amp_search.results.pareto import FrontPoint
    from amp_search.results.store import ResultsStore

__all__ = [
    "ValidationRun",
    "ValidationSet",
    "check_holdout_fraction",
    "data_identity",
    "measure_front",
    "output_deviation",
    "prepare_validation",
    "run_identity",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationSet:
    """The validation data and its identity.

    Attributes:
        data: Its batches.
        identity: ``kind`` (``file`` or ``holdout``), ``label`` (``val.npz``, ``holdout of
            calib.npz batches 6..7``), ``description``, ``files`` (name and SHA-256 each),
            ``batches`` (``[start, stop)`` of the files' batches) and ``digest``.
    """

    data: CalibrationData
    identity: dict[str, Any]

    @property
    def digest(self) -> str:
        """What a rerun must match (``run.json``'s ``validation_digest``)."""
        return str(self.identity["digest"])


def check_holdout_fraction(fraction: float) -> None:
    """Refuses a ``--holdout-fraction`` outside (0, 1); 0 is off."""
    if not (fraction == 0 or 0 < fraction < 1):
        raise UserInputError(
            f"--holdout-fraction must be in (0, 1), e.g. 0.25 (0: no holdout), got {fraction:g}."
        )


def prepare_validation(
    data: CalibrationData,
    inputs: list[InputSpec],
    validation_data: str | os.PathLike[str] | None,
    holdout_fraction: float = 0.0,
) -> tuple[CalibrationData, ValidationSet | None]:
    """The calibration data to search on, and the validation set (None: none asked for).

    Args:
        data: The calibration data (``--data``).
        inputs: The model's inputs.
        validation_data: ``--validation-data``: an ``.npz`` file or a folder of them.
        holdout_fraction: ``--holdout-fraction``: hold out the last ``ceil(F * n)`` batches.
    """
    check_holdout_fraction(holdout_fraction)
    if validation_data is not None and holdout_fraction:
        raise UserInputError(
            "Give either --validation-data or --holdout-fraction, not both: the holdout is "
            "taken from --data when no validation data is given."
        )
    if validation_data is not None:
        vdata = load_validation(validation_data, inputs)
        identity = data_identity(vdata)
        label = Path(validation_data).name
        validation = ValidationSet(vdata, {"kind": "file", "label": label, **identity,
                                           "digest": _digest("file", identity)})  # fmt: skip
        if not data.is_synthetic and identity["files"] == data_identity(data)["files"]:
            logger.warning("--validation-data is the calibration data itself: its figures "
                           "say nothing about unseen data.")  # fmt: skip
        return data, validation
    if not holdout_fraction:
        return data, None
    n = data.n_batches
    k = math.ceil(holdout_fraction * n)
    if k >= n:
        raise UserInputError(
            f"--holdout-fraction {holdout_fraction:g} holds out {k} of the {n} calibration "
            f"batch(es) of {data.source}, leaving none to search on: give more batches (one "
            "extra leading axis stacks them) or pass --validation-data."
        )
    searched, held = data.subset(0, n - k), data.subset(n - k, n)
    identity = data_identity(held)
    label = f"holdout of {held.source} batches {n - k}..{n - 1}"
    return searched, ValidationSet(held, {"kind": "holdout", "label": label, **identity,
                                          "digest": _digest("holdout", identity)})  # fmt: skip


def load_validation(path: str | os.PathLike[str], inputs: list[InputSpec]) -> CalibrationData:
    """``--validation-data``, checked as ``--data`` is; errors name the flag."""
    p = Path(path)
    if not p.exists():
        raise UserInputError(
            f"--validation-data {p}: not found. Give an .npz (or a folder of them) with "
            "arrays named after the model inputs, as for --data."
        )
    try:
        return load_calibration(p, inputs)
    except UserInputError as exc:
        raise UserInputError(f"--validation-data: {exc.message}", notes=exc.notes) from exc


def data_identity(data: CalibrationData) -> dict[str, Any]:
    """Which data: a description, each file's name and SHA-256, the batches taken of them."""
    return {
        "description": data.describe(),
        "files": [{"name": f.name, "sha256": _sha256(f)} for f in data.files],
        "batches": list(data.batches),
        **({"synthetic": True} if data.is_synthetic else {}),
    }


def run_identity(data: CalibrationData, validation: ValidationSet | None) -> dict[str, Any]:
    """What ``run.json`` records of the data: the calibration's and the validation's identity.

    ``validation_digest`` is compared on a rerun (:meth:`ResultsStore.check_run
    <amp_search.results.store.ResultsStore.check_run>`).
    """
    return {
        "calibration": data_identity(data) if not data.is_synthetic else None,
        "validation": None if validation is None else validation.identity,
        "validation_digest": None if validation is None else validation.digest,
    }


_SHA256: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    """The file's SHA-256 (read once per process while it is unchanged)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


def _digest(kind: str, identity: dict[str, Any]) -> str:
    what = [kind, [f["sha256"] for f in identity["files"]], identity["batches"]]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def output_deviation(
    metric: Objective,
    reference: list[dict[str, np.ndarray]],
    outputs: list[dict[str, np.ndarray]],
    output_names: list[str],
) -> float:
    """``metric`` over a candidate's ``outputs`` against ``reference`` (one dict per batch).

    inf when an output holds inf/NaN (the metric is not asked) or the metric gives NaN.
    """
    if not all(np.isfinite(v).all() for out in outputs for v in out.values()):
        return math.inf
    ctx = EvalContext(reference=reference, outputs=outputs, output_names=output_names)
    value = float(metric.evaluate(ctx))
    return math.inf if math.isnan(value) else value


class ValidationRun:
    """The validation data with its FP32 reference outputs (computed once); measures candidates.

    Args:
        validation: The validation set.
        model: The searched model (sanitized, as the search runs it): the FP32 reference.
        backend: The backend candidates run on.
        device: Their device.
        options: The backend options before any data completed them (TensorRT: its shapes
            are taken from the validation data's first batch).
        metric: The deviation metric.
    """

    def __init__(self, validation: ValidationSet, model: onnx.ModelProto, backend: Backend,
                 device: str, options: dict[str, Any], metric: Objective) -> None:  # fmt: skip
        from amp_search.profiling import profile_model

        self.validation = validation
        self.backend = backend
        self.metric = metric
        prof = profile_model(model, [], validation.data, fp16_pass=False, keep_reference=True)
        self.reference = list(prof.reference_outputs)
        self.output_names = [o.name for o in model.graph.output]
        first = validation.data.first()
        self.config = BuildConfig(device=device, options=backend.options_for_data(options, first))

    def deviation(self, outputs: list[dict[str, np.ndarray]]) -> float:
        """The metric over ``outputs`` (one dict per validation batch); inf if not finite."""
        return output_deviation(self.metric, self.reference, outputs, self.output_names)

    def run(self, runner: Runner) -> float:
        """The deviation of an open candidate (built with :attr:`config`'s options)."""
        return self.deviation([runner.infer(batch) for batch in self.validation.data])

    def measure(self, model_path: Path, scratch: Path) -> float:
        """Builds the candidate at ``model_path`` in ``scratch`` and measures it there."""
        folder = Path(tempfile.mkdtemp(dir=scratch))
        try:
            local = folder / "model.onnx"
            _link(model_path, local)
            data = model_path.with_name(model_path.name + ".data")  # a model above 2 GiB
            if data.is_file():
                _link(data, folder / data.name)
            candidate = self.backend.build(local, self.config)
            try:
                with self.backend.open(candidate) as runner:
                    return self.run(runner)
            finally:
                self.backend.release(candidate)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or no hard links there
        shutil.copyfile(src, dst)


def measure_front(
    front: list[FrontPoint],
    meta: dict[str, Any],
    validation: ValidationSet,
    *,
    store: ResultsStore,
    model: onnx.ModelProto,
    backend: Backend,
    device: str,
    options: dict[str, Any],
    metric: Objective,
) -> list[FrontPoint]:
    """Every front point with its deviation on the validation data (see the module docstring).

    ``meta`` (``front.json``'s) gets the validation set's identity, and a note for each point
    that could not be measured there (its figure is inf: no budget holds for it).
    """
    from amp_search.search.evaluate import local_failure

    meta["validation"] = validation.identity
    key = {"validation_digest": validation.digest, "metric": metric.name}
    run: ValidationRun | None = None
    out: list[FrontPoint] = []
    with contextlib.ExitStack() as stack:
        for p in front:
            folder = store.candidate_dir(p.digest)
            cached = store.read_json(folder / VALIDATION_FILE)
            if isinstance(cached, dict) and all(cached.get(k) == v for k, v in key.items()):
                out.append(replace(p, validation_deviation=decode_float(cached["deviation"])))
                continue
            if run is None:
                logger.info("Measuring the front on the validation data (%s)",
                            validation.identity["label"])  # fmt: skip
                run = ValidationRun(validation, model, backend, device, options, metric)
                scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(
                    prefix=".validation-", dir=store.root)))  # fmt: skip
            try:
                value = run.measure(folder / "model.onnx", scratch)
            except Exception as exc:  # this point fails here; the others are still measured
                reason = str(local_failure(exc, "running it on the validation data"))
                reason = (reason.splitlines() or [""])[0]
                logger.warning("Trial %d: %s", p.trial, reason)
                meta.setdefault("notes", []).append(
                    f"trial {p.trial} has no validation figure (taken as inf): {reason}"
                )
                out.append(replace(p, validation_deviation=math.inf))
                continue
            store.write_json(folder / VALIDATION_FILE, {**key, "deviation": value,
                             "data": validation.identity["label"]}, sync=False)  # fmt: skip
            out.append(replace(p, validation_deviation=value))
    return out
