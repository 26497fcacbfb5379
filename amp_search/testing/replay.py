"""Replays the search's sampling loop over a recorded table: the real sampler, recorded answers.

A :class:`Table` holds, for one real model, the (latency, deviation) of assignments as the
search's own deterministic objectives give them (deviation: relative L2 against the FP32
reference on ONNX Runtime CPU with FP16 storage emulated; latency: the H100 roofline
estimate), plus what the search knows before its first trial (the guided sampler's guide, the
risk order, critical and locked units), all as plain data in a ``.json.gz`` file:

- an exhaustive table has every assignment of a model grouped to a few units (2**12 rows from
  ``benchmarks/tables.py``): its non-dominated set is the true front;
- a recorded table has the assignments some searches evaluated on a model with more units
  than can be enumerated (``benchmarks/tables.py --record``): its front is the best known.

:func:`replay` runs an in-memory study with the real sampler (``--sampler``), the seed trials
the search enqueues for it, the search's stop rule (distinct evaluations) and its
``finite_outputs`` constraint, and answers every trial from the table; an assignment the table
lacks goes to ``evaluate`` (the same objectives, run for real: :class:`ModelEvaluator`) and is
reported as a miss. :class:`ObjectiveSpace` scores the result: the hypervolume of the evaluated
points over the table front's, in latency ms x log10 deviation (see :data:`NORMALIZATION`).

Bit ``i`` of an assignment's mask is ``table.units[i]`` running FP16.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import platform
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from amp_search.record import TrialRecord, decode_float, encode_float
from amp_search.results.pareto import front_order, hypervolume

if TYPE_CHECKING:
    import onnx
    import optuna

__all__ = [
    "DEV_FLOOR",
    "FORMAT",
    "NORMALIZATION",
    "SOURCES",
    "ModelEvaluator",
    "ObjectiveSpace",
    "Replay",
    "Table",
    "data_digest",
    "replay",
    "search_context",
    "sources_digest",
    "versions",
]

#: The table file format.
FORMAT = "amp-search-table/1"
#: Deviations below this count as this (all-FP32 has deviation 0).
DEV_FLOOR = 1e-7
#: What the objectives depend on: a table records the digest of these files.
SOURCES = (
    "amp_search/graph",
    "amp_search/backends",
    "amp_search/profiling",
    "amp_search/latency_model.py",
    "amp_search/calibration.py",
    "amp_search/testing/realmodels.py",
    "objectives",
)
NORMALIZATION = (
    "Objectives (both minimized): x = estimated H100 latency in ms, y = log10(max(rel. L2, "
    f"{DEV_FLOOR:g})) (all-FP32 has deviation 0). Points with non-finite deviation are left "
    "out. Reference point: x = 1.05 * the largest latency among the table's assignments, y = "
    "log10 of their largest finite deviation + 0.5. Hypervolume = area dominated by the points "
    "inside the box below the reference point (exact 2-D sweep); ratio = found / the table's "
    "front (the true front of an exhaustive table, the best known of a recorded one). "
    "Distances use the same axes scaled to [0, 1] by the min and max over the assignments."
)
_ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------


@dataclass
class Table:
    """(latency ms, deviation) of assignments of one model, and the search's prior knowledge.

    Attributes:
        model: The real model's name (:data:`amp_search.testing.realmodels.MODEL_NAMES`).
        units: The units, in graph order (bit ``i`` of a mask is ``units[i]`` FP16).
        masks: The recorded assignments; ``arange(2**len(units))`` for an exhaustive table.
        latency: Latency in ms per row (nan: not computed yet).
        deviation: Deviation per row (inf: non-finite outputs; nan: not computed yet).
        context: What the search knows before any trial: ``guide`` (the guided sampler's, as
            the search builds it), ``risk_order`` (riskiest first), ``critical`` and
            ``locked`` (unit names).
        meta: Provenance (model and data digests, sources digest, versions, machine, timing,
            the check against the search's own evaluations).
        n_units: Units before grouping (the model's), for the record.
    """

    model: str
    units: list[str]
    masks: np.ndarray
    latency: np.ndarray
    deviation: np.ndarray
    context: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    _index: dict[int, int] | None = field(default=None, repr=False)

    @classmethod
    def exhaustive(cls, model: str, units: Sequence[str], **kwargs: Any) -> Table:
        """An empty table of every assignment of ``units``."""
        n = 1 << len(units)
        return cls(
            model,
            list(units),
            np.arange(n, dtype=object),
            np.full(n, np.nan),
            np.full(n, np.nan),
            **kwargs,
        )

    @property
    def is_exhaustive(self) -> bool:
        """Whether the rows are every assignment, in mask order."""
        n = 1 << len(self.units) if len(self.units) < 63 else 0
        return len(self.masks) == n and all(int(m) == k for k, m in enumerate(self.masks))

    @property
    def reachable(self) -> np.ndarray:
        """Rows the search can propose: no locked unit FP16 (locked units are no parameters)."""
        locked = self.mask(self.context.get("locked", ()))
        return np.array([int(m) & locked == 0 for m in self.masks], dtype=bool)

    @property
    def computed(self) -> np.ndarray:
        """Rows that have both values."""
        return np.asarray(~np.isnan(self.latency) & ~np.isnan(self.deviation))

    @property
    def complete(self) -> bool:
        """Whether every row the search can propose has both values."""
        return bool(np.all(self.computed | ~self.reachable))

    def row(self, mask: int) -> int | None:
        """The row of ``mask``, or None if the table lacks it."""
        if self._index is None:
            self._index = {int(m): k for k, m in enumerate(self.masks)}
        return self._index.get(int(mask))

    def lookup(self, mask: int) -> tuple[float, float] | None:
        """(latency ms, deviation) of ``mask``, or None if not recorded."""
        k = self.row(mask)
        if k is None or math.isnan(self.latency[k]) or math.isnan(self.deviation[k]):
            return None
        return float(self.latency[k]), float(self.deviation[k])

    def add(self, mask: int, latency: float, deviation: float) -> None:
        """Records one assignment (a new row unless it is there)."""
        k = self.row(mask)
        if k is None:
            assert self._index is not None
            self._index[int(mask)] = len(self.masks)
            self.masks = np.append(self.masks, np.array([int(mask)], dtype=object))
            self.latency = np.append(self.latency, latency)
            self.deviation = np.append(self.deviation, deviation)
        else:
            self.latency[k], self.deviation[k] = latency, deviation

    def mask(self, fp16_units: Iterable[str]) -> int:
        """The mask of an assignment given by its FP16 units."""
        bit = {u: 1 << i for i, u in enumerate(self.units)}
        return sum(bit[u] for u in set(fp16_units))

    def fp32_units(self, mask: int) -> list[str]:
        """The units ``mask`` keeps FP32."""
        return [u for i, u in enumerate(self.units) if not int(mask) >> i & 1]

    def space(self, floor: float = DEV_FLOOR) -> ObjectiveSpace:
        """The objective space of the computed rows the search can propose.

        Its row positions are the table's (a mask's row in an exhaustive table).
        """
        return ObjectiveSpace(self.latency, self.deviation, floor, self.computed & self.reachable)

    # --- file form ------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """Plain data (non-finite deviation as ``"inf"``, not computed as None)."""
        obj: dict[str, Any] = {
            "format": FORMAT,
            "model": self.model,
            "units": self.units,
            "bits": "bit i of a mask set: units[i] runs FP16",
            "exhaustive": self.is_exhaustive,
            "complete": self.complete,
            "latency_ms": [_enc(v) for v in self.latency],
            "deviation": [_enc(v) for v in self.deviation],
            "context": self.context,
            "meta": self.meta,
        }
        if not obj["exhaustive"]:
            obj["masks"] = [format(int(m), "x") for m in self.masks]
        return obj

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Table:
        """The table of :meth:`to_json`'s data."""
        if obj.get("format") != FORMAT:
            raise ValueError(f"Not a {FORMAT} table (format {obj.get('format')!r}).")
        units = list(obj["units"])
        if "masks" in obj:
            masks = np.array([int(m, 16) for m in obj["masks"]], dtype=object)
        else:
            masks = np.arange(1 << len(units), dtype=object)
        return cls(
            obj["model"],
            units,
            masks,
            np.array([_dec(v) for v in obj["latency_ms"]], dtype=np.float64),
            np.array([_dec(v) for v in obj["deviation"]], dtype=np.float64),
            dict(obj.get("context") or {}),
            dict(obj.get("meta") or {}),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the table as gzipped JSON (atomically; the gzip header carries no time)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(self.to_json(), separators=(",", ":")).encode()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            gz.write(data)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Table:
        """Reads a table written by :meth:`save`."""
        with gzip.open(path, "rb") as f:
            return cls.from_json(json.loads(f.read()))


def _enc(v: float) -> float | str | None:
    """A table figure as stored: NaN (not computed) as None, inf as ``"inf"``."""
    return None if math.isnan(v) else encode_float(float(v))


def _dec(v: float | str | None) -> float:
    """A stored table figure (None: not computed, NaN)."""
    got = decode_float(v)
    return math.nan if got is None else got


# ------------------------------------------------------------------------------------------
# The objective space and hypervolume
# ------------------------------------------------------------------------------------------


class ObjectiveSpace:
    """The 2-D objective space of a set of assignments (see :data:`NORMALIZATION`).

    Args:
        latency: Latency in ms of every assignment.
        deviation: Their deviation (inf: non-finite outputs).
        floor: Deviations below it count as it.
        include: The assignments the space spans (default all); the others keep their row
            positions but count nowhere.
    """

    def __init__(
        self,
        latency: np.ndarray,
        deviation: np.ndarray,
        floor: float = DEV_FLOOR,
        include: np.ndarray | None = None,
    ) -> None:
        self.lat = np.asarray(latency, dtype=np.float64)
        self.dev = np.asarray(deviation, dtype=np.float64)
        inc = np.ones(len(self.lat), bool) if include is None else np.asarray(include, bool)
        ok = inc & np.isfinite(self.dev)
        self.include = inc
        self.ok = ok
        self.floor = floor
        self.y = np.log10(np.maximum(np.where(ok, self.dev, 1.0), floor))
        lat = self.lat[inc]
        self.ref = (float(lat.max()) * 1.05, float(self.y[ok].max()) + 0.5)
        self.xmin, self.xmax = float(lat.min()), float(lat.max())
        self.ymin, self.ymax = float(self.y[ok].min()), float(self.y[ok].max())
        ids = np.flatnonzero(ok)
        #: Row positions of the front (non-dominated rows), fastest first.
        self.front_idx = [
            int(ids[k]) for k in front_order(self.lat[ok].tolist(), self.y[ok].tolist())
        ]
        self.true_hv = hypervolume(self.points(self.front_idx), self.ref)

    def point(self, lat: float, dev: float) -> tuple[float, float]:
        """The (x, y) of an assignment."""
        return lat, math.log10(max(dev, self.floor))

    def points(self, idx: Iterable[int]) -> list[tuple[float, float]]:
        """The (x, y) of rows with finite deviation."""
        return [(float(self.lat[i]), float(self.y[i])) for i in idx if self.ok[i]]

    def norm(self, p: tuple[float, float]) -> tuple[float, float]:
        """``p`` scaled to [0, 1] by the space's min and max."""
        return (
            (p[0] - self.xmin) / (self.xmax - self.xmin),
            (p[1] - self.ymin) / (self.ymax - self.ymin),
        )

    def ratio(self, pts: Iterable[tuple[float, float]]) -> float:
        """Hypervolume of (x, y) points over the front's."""
        return hypervolume(pts, self.ref) / self.true_hv

    def ratio_of(self, evaluated: Iterable[tuple[float, float]]) -> float:
        """Hypervolume ratio of (latency, deviation) pairs (non-finite ones left out)."""
        return self.ratio([self.point(a, b) for a, b in evaluated if math.isfinite(b)])


# ------------------------------------------------------------------------------------------
# The replay
# ------------------------------------------------------------------------------------------


@dataclass
class Replay:
    """What one replayed search evaluated.

    Attributes:
        sampler: The sampler's name.
        seed: The sampler's seed.
        budget: Distinct evaluations asked for.
        masks: The distinct assignments evaluated, in order.
        values: Their (latency ms, deviation).
        trials: Trials run (duplicates included).
        misses: Masks the table lacked (answered by ``evaluate``).
        study: The in-memory study (for a closer look).
        missed: The replay ended at an assignment the table lacks (``stop_on_miss``).
    """

    sampler: str
    seed: int
    budget: int
    masks: list[int] = field(default_factory=list)
    values: list[tuple[float, float]] = field(default_factory=list)
    trials: int = 0
    misses: list[int] = field(default_factory=list)
    study: Any = field(default=None, repr=False)
    missed: bool = False

    def ratio(self, space: ObjectiveSpace, k: int | None = None) -> float:
        """Hypervolume ratio of the first ``k`` evaluations (all by default)."""
        return space.ratio_of(self.values[: len(self.values) if k is None else k])

    def curve(self, space: ObjectiveSpace) -> list[float]:
        """The ratio after each evaluation."""
        return [self.ratio(space, k + 1) for k in range(len(self.values))]


def seed_trials(table: Table, sampler: str) -> list[tuple[str, dict[str, str]]]:
    """(label, params) of the seeds the search enqueues for ``sampler`` on this model.

    As :func:`amp_search.search.seeds.enqueue_seeds` does with the profile's risks: the
    prefix sweep with the critical units FP32 for the guided sampler, the risk ladder for
    the others.
    """
    from amp_search.search.seeds import PREFIXES, seed_params
    from amp_search.search.space import SearchSpace

    ctx = table.context
    space = SearchSpace(table.units, locked=ctx.get("locked", ()))
    if sampler == "guided" and ctx.get("guide") is not None:
        return seed_params(
            space, list(ctx["risk_order"]), prefixes=PREFIXES, critical=ctx.get("critical", ())
        )
    return seed_params(space, list(ctx["risk_order"]))


def replay(
    table: Table,
    sampler: str,
    budget: int,
    seed: int = 0,
    *,
    evaluate: Callable[[int], tuple[float, float]] | None = None,
    make_sampler: Callable[[int], optuna.samplers.BaseSampler] | None = None,
    stop_on_miss: bool = False,
) -> Replay:
    """Runs the search's sampling loop over ``table`` until ``budget`` distinct evaluations.

    Args:
        table: The recorded answers and the search's prior knowledge.
        sampler: A ``--sampler`` name (:data:`amp_search.search.sampler.SAMPLERS`).
        budget: Distinct evaluations (seeds included), the search's stop rule.
        seed: The sampler's seed (``--seed``).
        evaluate: Answers a mask the table lacks, ``mask -> (latency ms, deviation)``; None
            raises ``KeyError`` on a miss (or stops, with ``stop_on_miss``).
        make_sampler: Builds the sampler from the seed instead of ``sampler``'s (an
            experiment); the study is otherwise the search's.
        stop_on_miss: Without ``evaluate``, end the replay at the first miss (what a recorded
            table holds of a run: ``Replay.missed`` is then True).

    Returns:
        What was evaluated, in order, and which answers the table lacked.
    """
    import optuna

    from amp_search.keys import GUIDE_ATTR, SEED_ATTR, SEED_PARAMS_ATTR
    from amp_search.search.space import SearchSpace
    from amp_search.search.study import open_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ctx = table.context
    space = SearchSpace(table.units, locked=ctx.get("locked", ()))
    study = open_study(":memory:", "replay", seed=seed, sampler=sampler)
    if make_sampler is not None:
        study.sampler = make_sampler(seed)
    if sampler == "guided" and ctx.get("guide") is not None:
        study.set_user_attr(GUIDE_ATTR, ctx["guide"])
    for label, params in seed_trials(table, sampler):
        study.enqueue_trial(params, user_attrs={SEED_ATTR: label, SEED_PARAMS_ATTR: params})
    out = Replay(sampler, seed, budget)
    answers: dict[int, tuple[float, float]] = {}

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        mask = table.mask(space.suggest(trial).fp16_units)
        got = answers.get(mask)
        if got is None:
            got = table.lookup(mask)
            if got is None:
                if evaluate is None and stop_on_miss:
                    out.missed = True
                    trial.study.stop()
                    return math.inf, math.inf
                if evaluate is None:
                    raise KeyError(f"assignment {mask:#x} is not in the {table.model} table")
                got = evaluate(mask)
                out.misses.append(mask)
            answers[mask] = got
            out.masks.append(mask)
            out.values.append(got)
        trial.set_constraint("finite_outputs", 0.0 if math.isfinite(got[1]) else 1.0)
        return got

    def stop(study: optuna.Study, trial: Any) -> None:
        if len(out.masks) >= budget or out.missed:
            study.stop()

    study.optimize(objective, n_trials=3 * budget + 10, callbacks=[stop])
    out.trials = len(study.trials)
    out.study = study
    return out


# ------------------------------------------------------------------------------------------
# The objectives, run for real
# ------------------------------------------------------------------------------------------


class ModelEvaluator:
    """A real model prepared as ``run_search`` prepares it on the CPU backend, and its objectives.

    Deviation is the relative L2 against the strict FP32 reference on ONNX Runtime CPU (FP16
    storage emulated, graph optimizations off: the backend's defaults), latency the roofline
    estimate for an H100, both as :class:`~amp_search.search.evaluate.CandidateEvaluator`
    computes them, without writing any file.

    Args:
        model: The sanitized model (see :meth:`from_real_model`).
        data: Path of the calibration ``.npz``.
        max_units: Group the units to this many (``--max-units``); None: ungrouped.
        threads: ONNX Runtime intra-op threads (0: its default).
    """

    def __init__(
        self, model: onnx.ModelProto, data: Path, max_units: int | None, threads: int = 0
    ) -> None:
        from amp_search.backends import BuildConfig, get_backend
        from amp_search.calibration import load_calibration, model_inputs
        from amp_search.graph import (
            MixedPrecisionRewriter,
            find_units,
            group_units,
            reconcile_shapes,
        )
        from amp_search.latency_model import LatencyEstimator
        from amp_search.objective import load_metric
        from amp_search.profiling import profile_model

        self.model = model
        self.model_sha256 = hashlib.sha256(model.SerializeToString()).hexdigest()
        self.data_path = Path(data)
        self.data_sha256 = data_digest(self.data_path)
        self.all_units = find_units(model)
        self.units = group_units(self.all_units, max_units) if max_units else self.all_units
        self.names = [u.name for u in self.units]
        self.data = load_calibration(self.data_path, model_inputs(model))
        self.rewriter = MixedPrecisionRewriter(model, self.units)
        prof = profile_model(
            model,
            self.units,
            self.data,
            fp16_pass=False,
            keep_reference=True,
            rewriter=self.rewriter,
        )
        observed = {n: t.shape for n, t in prof.tensors.items() if t.shape is not None}
        if reconcile_shapes(model, observed):  # as the search does
            self.rewriter = MixedPrecisionRewriter(model, self.units)
        self.reference = prof.reference_outputs
        shapes = {k: tuple(v.shape) for k, v in self.data.first().items()}
        self.estimator = LatencyEstimator(model, shapes, target="h100", known_shapes=observed)
        self.backend = get_backend("onnxruntime")
        self.config = BuildConfig("cpu", options={"intra_op_num_threads": threads})
        self.metric = load_metric("rel_l2")
        self.output_names = [o.name for o in model.graph.output]
        self._scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"amp-table-{os.getpid()}.onnx"

    @classmethod
    def from_real_model(
        cls, name: str, max_units: int | None, workdir: Path, threads: int = 0
    ) -> ModelEvaluator:
        """A real model (fetched, sanitized) with its realistic calibration data."""
        from amp_search.graph import load_model, sanitize
        from amp_search.testing import realmodels

        workdir.mkdir(parents=True, exist_ok=True)
        npz = realmodels.write_npz(name, workdir / f"{name}.npz")
        return cls(sanitize(load_model(realmodels.fetch(name))), npz, max_units, threads)

    def assignment(self, mask: int) -> Any:
        """The assignment of a mask (bit i: unit i FP16)."""
        from amp_search.types import PrecisionAssignment

        return PrecisionAssignment.with_fp16(
            self.names, [u for i, u in enumerate(self.names) if int(mask) >> i & 1]
        )

    def evaluate(self, mask: int) -> tuple[float, float]:
        """(estimated latency ms, deviation) of one assignment."""
        from amp_search.search.validation import output_deviation

        parts, skeleton, _ = self.rewriter.apply_serialized(self.assignment(mask))
        candidate = self.backend.build(self._scratch, self.config, model_bytes=parts)
        try:
            with self.backend.open(candidate) as runner:
                outputs = [runner.infer(batch) for batch in self.data]
        finally:
            self.backend.release(candidate)
        dev = output_deviation(self.metric, self.reference, outputs, self.output_names)
        return float(self.estimator.estimate(skeleton)), dev


def search_context(
    model_path: Path, data: Path, max_units: int | None, workdir: Path, n_trials: int = 8
) -> dict[str, Any]:
    """What ``run_search`` knows before its first proposal, from a short real search.

    Runs the search (guided sampler, estimated H100 latency, CPU backend) for ``n_trials``
    trials and returns its guide, risk order, critical and locked units, and the trials it
    evaluated (``checks``: units kept FP32, latency, deviation) to compare a table with.
    """
    from optuna.trial import TrialState

    from amp_search.keys import GUIDE_ATTR
    from amp_search.search.run import SearchConfig, run_search

    outcome = run_search(
        SearchConfig(
            model=model_path,
            data=data,
            out=workdir / "search",
            n_trials=n_trials,
            storage=f"sqlite:///{workdir / 'context.db'}",
            study_name="context",
            seed=0,
            latency="estimated",
            target="h100",
            max_units=max_units,
            sampler="guided",
        )
    )
    import optuna

    study = optuna.load_study(study_name=outcome.study_name, storage=outcome.storage)
    inspect = json.loads((outcome.out / "inspect.json").read_text())
    risks = inspect["units_by_risk"]
    checks = [
        {
            "fp32_units": sorted(TrialRecord.from_trial(t).fp32_units),
            "latency_ms": float(t.values[0]),
            "deviation": _enc(float(t.values[1])),
        }
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ]
    return {
        "guide": study.user_attrs.get(GUIDE_ATTR),
        "risk_order": [r["unit"] for r in risks],
        "critical": [r["unit"] for r in risks if r["risk"] == "critical"],
        "locked": list(inspect.get("locked_fp32", [])),
        "checks": checks,
    }


def data_digest(npz: Path) -> str:
    """SHA-256 of a calibration file's arrays (names, dtypes, shapes, values).

    Not of its bytes: the same data saved compressed or not has one digest.
    """
    h = hashlib.sha256()
    with np.load(npz) as z:
        for key in sorted(z.files):
            a = np.ascontiguousarray(z[key])
            h.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def sources_digest(root: Path = _ROOT) -> str:
    """SHA-256 of the files the objectives depend on (:data:`SOURCES`)."""
    h = hashlib.sha256()
    for src in sorted(SOURCES):
        path = root / src
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Python and the versions of the packages the objectives run on."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("onnx", "onnxruntime", "numpy", "onnx-ir", "optuna"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
