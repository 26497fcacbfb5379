"""Reading a results directory back: the front table, the plots, and picking a point."""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amp_search.errors import UserInputError
from amp_search.keys import ALL_FP32
from amp_search.record import decode_float
from amp_search.results.pareto import FrontPoint, check_max_deviation, latency_tie
from amp_search.results.store import ResultsStore
from amp_search.results.validation import (
    decisive_deviation,
    holds,
    refusal,
    unmeasured_note,
    validation_label,
)

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["Choice", "Results", "choose", "copy_candidate", "load_results", "pick_point"]

#: The figures of a baseline (``front.json``'s ``baselines``) that may be non-finite.
_FIGURES = ("latency_ms", "deviation")


@dataclass
class Results:
    """A results directory as read back."""

    store: ResultsStore
    meta: dict[str, Any]
    front: list[FrontPoint]

    @property
    def baselines(self) -> dict[str, dict[str, Any]]:
        """all-FP32 / all-FP16 (/ all-BF16) figures, if evaluated; latency and deviation floats.

        ``front.json`` holds a non-finite figure as a string (``"inf"``): decoded here.
        """
        return {
            name: {k: decode_float(v) if k in _FIGURES else v for k, v in row.items()}
            for name, row in dict(self.meta.get("baselines") or {}).items()
        }

    def render(self, console: Console) -> None:
        """Prints the front as a table, fastest first."""
        from rich.table import Table

        m = self.meta
        table = Table(
            title=f"Pareto front: {Path(m.get('model', '?')).name} on {m.get('backend')} "
            f"({m.get('device')}), {len(self.front)} point(s)",
            title_justify="left",
        )
        measured = any(p.latency_interval for p in self.front)
        validated = any(p.validation_deviation is not None for p in self.front)
        bf16 = any(p.bf16_units for p in self.front)
        for col in ("trial", "latency ms (95% interval)" if measured else "latency ms",
                    "deviation", *(("validation dev.",) if validated else ()), "FP32 units",
                    "speedup vs FP32", "candidate", "FP32 fallback set",
                    *(("BF16 set",) if bf16 else ())):  # fmt: skip
            table.add_column(col, overflow="fold")
        fp32 = self.baselines.get(ALL_FP32, {}).get("latency_ms")
        fp32 = float(fp32) if fp32 is not None else None
        for p in self.front:
            speed = p.speedup(fp32)
            v = p.validation_deviation
            table.add_row(
                str(p.trial),
                p.latency_text(),
                f"{p.deviation:.3g}",
                *((("-" if v is None else f"{v:.3g}"),) if validated else ()),
                f"{p.n_fp32}/{p.n_units}",
                "-"
                if speed is None
                else f"{speed[0]:.2f}x"
                + (f" [{speed[1]:.2f}, {speed[2]:.2f}]" if speed[1] != speed[2] else ""),
                f"candidates/{p.digest}",
                p.fallback_text(),
                *((p.bf16_text() or "-",) if bf16 else ()),
            )
        console.print(table)
        console.print(
            f"latency: {m.get('latency_source')}; deviation: {m.get('metric')} vs strict FP32"
            + (f"; budget {m['max_deviation']:g}" if m.get("max_deviation") else "")
        )
        if bf16:
            console.print("units in neither set run FP16; the BF16 set runs BF16")
        if validated:
            console.print(
                f"validation dev.: the same metric on {validation_label(m)}, never searched "
                "on; a budget is checked against it ('amp-search pick')"
            )
        unmeasured = unmeasured_note(self.front, m)
        if unmeasured:
            console.print(unmeasured)
        for note in m.get("notes", []):
            console.print(f"Note: {note}", style="dim")


def load_results(path: str | os.PathLike[str]) -> Results:
    """Reads ``front.json`` of a results directory."""
    store = ResultsStore(path) if Path(path).is_dir() else None
    if store is None:
        raise UserInputError(f"Results directory not found: {path}. Pass a search's --out.")
    data = store.read_json(store.root / "front.json")
    if not isinstance(data, dict):
        raise UserInputError(
            f"{path} has no front.json: run 'amp-search search ... --out {path}' first."
        )
    front = [FrontPoint.from_row(row) for row in data.get("front", [])]
    meta = {k: v for k, v in data.items() if k != "front"}
    return Results(store, meta, front)


@dataclass(frozen=True)
class Choice:
    """What :func:`choose` picked, and why.

    Attributes:
        point: The chosen point.
        fastest: The fastest point within the budget (``point`` unless a tie moved the choice).
        tied: Points within the budget whose latency intervals overlap the fastest's.
        refused: Faster points within the budget on the calibration data but over it on the
            validation data, fastest first (:func:`~amp_search.results.validation.refusal`).
    """

    point: FrontPoint
    fastest: FrontPoint
    tied: tuple[FrontPoint, ...] = ()
    refused: tuple[FrontPoint, ...] = ()


def choose(
    results: Results, *, max_deviation: float | None = None, trial: int | None = None
) -> Choice:
    """The front point to ship: the fastest within ``max_deviation``, ties going to accuracy.

    Points whose latency intervals overlap the fastest's are not distinguishably slower; the
    most accurate of them is chosen. With ``trial``, that front point. Where the front was
    measured on validation data, that deviation decides (:func:`pick_point`).
    """
    fastest = pick_point(results, max_deviation=max_deviation, trial=trial)
    if trial is not None:
        return Choice(fastest, fastest)
    dev = decisive_deviation
    tied = tuple(
        p for p in results.front
        if p is not fastest and holds(p, max_deviation)
        and dev(p) < dev(fastest) and latency_tie(p, fastest)
    )  # fmt: skip
    point = min(tied, key=lambda p: (dev(p), p.latency_ms)) if tied else fastest
    refused = tuple(sorted(
        (p for p in results.front if p.latency_ms < point.latency_ms
         and _refused(p, max_deviation)), key=lambda p: p.latency_ms,
    ))  # fmt: skip
    return Choice(point, fastest, tied, refused)


def _refused(point: FrontPoint, budget: float | None) -> bool:
    """Within ``budget`` on the calibration data, over it on the validation data."""
    return budget is not None and point.deviation <= budget and not holds(point, budget)


def pick_point(
    results: Results, *, max_deviation: float | None = None, trial: int | None = None
) -> FrontPoint:
    """The fastest front point within ``max_deviation``, or the front point of ``trial``.

    A point measured on validation data is within the budget if its deviation there is (the
    calibration figure is what the search optimized; the validation one is the estimate of
    what ships).
    """
    if trial is not None:
        for p in results.front:
            if p.trial == trial:
                return p
        raise UserInputError(
            f"Trial {trial} is not on the front of {results.store.root}; front trials: "
            f"{[p.trial for p in results.front]}."
        )
    if max_deviation is None:
        raise UserInputError("Give --max-deviation X (or --trial N) to pick a candidate.")
    check_max_deviation(max_deviation)
    within = [p for p in results.front if holds(p, max_deviation)]
    refused = [p for p in results.front if _refused(p, max_deviation)]
    if not within and refused:
        best = min(decisive_deviation(p) for p in results.front)
        raise UserInputError(
            f"No front point holds --max-deviation {max_deviation:g} on the validation data "
            f"({validation_label(results.meta)}; the most accurate there has {best:.3g}): "
            f"{refusal(refused[0], max_deviation, results.meta)}. Loosen --max-deviation, "
            "or search with more varied calibration data."
        )
    if not within:
        best = min((p.deviation for p in results.front), default=math.inf)
        raise UserInputError(
            f"No front point has deviation <= {max_deviation:g} (the most accurate has "
            f"{best:.3g}). Loosen --max-deviation or search longer."
        )
    return min(within, key=lambda p: (p.latency_ms, decisive_deviation(p)))


def copy_candidate(results: Results, point: FrontPoint, to: str | os.PathLike[str]) -> list[Path]:
    """Copies the point's ONNX (and engine, if any) to ``to`` (a folder, or a .onnx path)."""
    src = results.store.candidate_dir(point.digest)
    model = src / "model.onnx"
    if not model.is_file():
        if (src / "precision.json").is_file():  # pruned: beaten in a study over this folder
            raise UserInputError(
                f"The model of candidate {point.digest} was removed by --keep-models front "
                "(another study over this folder found it beaten). Run the search again "
                "with --keep-models all and a new --study to rebuild it."
            )
        raise UserInputError(
            f"Candidate folder {src} has no model.onnx (was the results directory moved "
            "without its candidates/ folder?)."
        )
    dest = Path(to)
    if dest.suffix == ".onnx":  # m.onnx -> m.onnx, m.plan, m.precision.json, m.metrics.json
        folder, stem = dest.parent, dest.stem
    else:  # a folder -> model.onnx, model.plan, ...
        folder, stem = dest, "model"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"Cannot create {folder}: {exc.strerror or exc}.") from exc
    names = {"model.onnx": ".onnx", "engine.plan": ".plan",
             "precision.json": ".precision.json", "metrics.json": ".metrics.json"}  # fmt: skip
    targets = [
        (src / name, folder / f"{stem}{suffix}")
        for name, suffix in names.items()
        if (src / name).is_file()
    ]
    out = []
    for s, d in targets:
        tmp = d.with_name(f".{d.name}.tmp")
        shutil.copyfile(s, tmp)
        os.replace(tmp, d)
        out.append(d)
    return out
