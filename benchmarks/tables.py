"""Exhaustive tables of the real models, and recorded answers for models with many units.

Each table (``benchmarks/tables/<model>.json.gz``, read by :mod:`amp_search.testing.replay`)
holds the (latency, deviation) of assignments of one real model as the search's own
deterministic objectives give them (deviation: relative L2 against the FP32 reference on
ONNX Runtime CPU, FP16 storage emulated; latency: the H100 roofline estimate), plus what the
search knows before its first trial (its guide, risk order, critical and locked units, from a
short real ``run_search``) and the provenance (model, data and sources digests, versions).

Here (fetches the model, computes every row in ``--workers`` processes)::

    python benchmarks/tables.py --model ppocr_cls --workers 2

Elsewhere (a machine with onnx, onnxruntime and numpy, no network; onnx-ir if missing there
travels as a wheel): prepare here, carry the folder, compute there, bring the file back into
``benchmarks/tables/``::

    python benchmarks/tables.py --prepare .gpu/tables --model ppocr_det,ppocr_rec,minilm
    python benchmarks/tables.py --from .gpu/tables --model ppocr_det,ppocr_rec --workers 16 \\
        --out-dir OUT --time-limit 540

``--prepare`` writes ``<model>/`` for each model: the model sanitized (``<model>.onnx``; a
file above ``--split-mib`` goes into ``<model>-part<k>/`` pieces beside it instead, joined
again by ``--from``), its calibration data (``<model>.npz``, compressed) and
``<model>.context.json``: what a short
real search here knew (guide, risk order, critical and locked units) and the trials it
evaluated, which the rows are checked against. ``--time-limit`` counts from the start: at
the limit the running rows finish, the table is written as it is (``"complete": false``) and
the exit code is 3; the same command continues it once that file is in ``benchmarks/tables/``
(or named by ``--resume``), if made from the same model, data, sources and versions.

Recorded answers (a model with more units than can be enumerated: every evaluation that real
searches made, each sampler, as data; ``--units 0``: ungrouped)::

    python benchmarks/tables.py --record --model ppocr_cls --units 0
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amp_search.testing.replay import (  # noqa: E402
    FORMAT,
    ModelEvaluator,
    Table,
    replay,
    search_context,
    sources_digest,
    versions,
)

ROOT = Path(__file__).resolve().parents[1]
TABLES = ROOT / "benchmarks" / "tables"
DEFAULT_UNITS = 12
#: Exit code of a run stopped by --time-limit (the partial table is written).
PARTIAL = 3
#: What must agree for a partial table to be resumed.
RESUME_KEYS = ("model_sha256", "data_sha256", "max_units", "sources_sha256")
RESUME_VERSIONS = ("onnx", "onnxruntime", "numpy")
CHUNK = 4
SAVE_EVERY_S = 60.0
#: --time-limit counts from here.
STARTED = time.monotonic()

# ------------------------------------------------------------------------------------------
# Preparing a model (here) and reading a prepared one (anywhere)
# ------------------------------------------------------------------------------------------


def prepare(name: str, max_units: int | None, folder: Path, split_mib: float) -> Path:
    """Writes ``<name>/``: ``<name>.onnx`` (sanitized), ``<name>.npz``, ``<name>.context.json``.

    A model file larger than ``split_mib`` is written as ``<name>-part<k>/<name>.onnx.part<k>``
    pieces instead, one folder each, so that each can travel alone.
    """
    from amp_search.graph import load_model, sanitize
    from amp_search.testing import realmodels

    home = folder / name
    home.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{name}-part*"):
        shutil.rmtree(old)
    raw = realmodels.fetch(name)
    plain = realmodels.write_npz(name, home / f"{name}.plain.npz")
    with np.load(plain) as z:  # compressed to travel (the data digest is of the arrays)
        np.savez_compressed(home / f"{name}.npz", **{k: z[k] for k in z.files})
    blob = sanitize(load_model(raw)).SerializeToString()
    limit = int(split_mib * (1 << 20))
    (home / f"{name}.onnx").unlink(missing_ok=True)
    if len(blob) <= limit:
        (home / f"{name}.onnx").write_bytes(blob)
    else:
        for k, start in enumerate(range(0, len(blob), limit)):
            part = folder / f"{name}-part{k}" / f"{name}.onnx.part{k}"
            part.parent.mkdir()
            part.write_bytes(blob[start : start + limit])
    with tempfile.TemporaryDirectory(prefix=f"amp-tables-{name}-") as tmp:
        context = search_context(raw, plain, max_units, Path(tmp))
    plain.unlink()
    context["max_units"] = max_units
    out = home / f"{name}.context.json"
    out.write_text(json.dumps(context, indent=1) + "\n")
    return home


def prepared_model(name: str, folder: Path) -> Path:
    """The prepared model file (joining its pieces, if it travelled in parts)."""
    whole = folder / name / f"{name}.onnx"
    if whole.is_file():
        return whole
    parts = sorted(
        folder.glob(f"{name}-part*/{name}.onnx.part*"),
        key=lambda p: int(p.name.rpartition("part")[2]),
    )
    if not parts or len(parts) != int(parts[-1].name.rpartition("part")[2]) + 1:
        raise SystemExit(
            f"{folder} holds neither {name}/{name}.onnx nor all its {name}-part<k>/ pieces "
            f"(found {[p.parent.name for p in parts]}): run --prepare, carry every piece."
        )
    tmp = whole.with_name(f".{whole.name}.tmp")
    with open(tmp, "wb") as out:
        for p in parts:
            out.write(p.read_bytes())
    os.replace(tmp, whole)
    return whole


# ------------------------------------------------------------------------------------------
# Computing every row, in worker processes
# ------------------------------------------------------------------------------------------

_WORKER: ModelEvaluator | None = None


def _init_worker(model_path: str, data: str, max_units: int | None) -> None:
    global _WORKER
    logging.disable(logging.WARNING)
    from amp_search.graph import load_model

    _WORKER = ModelEvaluator(load_model(model_path), Path(data), max_units, threads=1)


def _eval_chunk(masks: list[int]) -> list[tuple[int, float, float]]:
    assert _WORKER is not None
    return [(m, *_WORKER.evaluate(m)) for m in masks]


def identity(ev: ModelEvaluator, max_units: int | None) -> dict[str, Any]:
    """What a table's rows depend on."""
    return {
        "model_sha256": ev.model_sha256,
        "data_sha256": ev.data_sha256,
        "max_units": max_units,
        "units_before_grouping": len(ev.all_units),
        "sources_sha256": sources_digest(),
        "versions": versions(),
    }


def resumable(table: Table, ident: dict[str, Any], sources: bool = True) -> str | None:
    """Why ``table`` cannot be continued with ``ident`` (None: it can).

    ``sources=False`` lets other sources pass (a recording grows across commits that do not
    change the objectives; each run records its sources digest).
    """
    meta = table.meta
    for k in RESUME_KEYS:
        if k == "sources_sha256" and not sources:
            continue
        if meta.get(k) != ident[k]:
            return f"{k} differs ({meta.get(k)} there, {ident[k]} here)"
    for k in RESUME_VERSIONS:
        if meta.get("versions", {}).get(k) != ident["versions"][k]:
            return f"{k} version differs"
    return None


def compute(
    table: Table,
    model_path: Path,
    data: Path,
    max_units: int | None,
    workers: int,
    out: Path,
    deadline: float,
) -> bool:
    """Fills the table's missing rows; True when complete (saved every minute and at the end)."""
    # Rows with a locked unit FP16 are outside the search's space: not computed.
    skip = table.computed | ~table.reachable
    todo = [int(m) for m, ok in zip(table.masks, skip, strict=True) if not ok]
    chunks = [todo[i : i + CHUNK] for i in range(0, len(todo), CHUNK)]
    t0 = time.perf_counter()
    spent = float(table.meta.get("seconds", 0.0))
    done = int(np.sum(table.computed))
    first = done
    last_save = t0
    total = first + len(todo)
    print(f"{table.model}: {len(todo)} of {total} rows to compute, {workers} workers", flush=True)
    with ProcessPoolExecutor(
        max_workers=workers,
        initializer=_init_worker,
        initargs=(str(model_path), str(data), max_units),
    ) as pool:
        queue = iter(chunks)
        running: set[Future[list[tuple[int, float, float]]]] = set()
        stopping = False
        while True:
            while not stopping and len(running) < 2 * workers:
                chunk = next(queue, None)
                if chunk is None:
                    break
                running.add(pool.submit(_eval_chunk, chunk))
            if not running:
                break
            finished, running = wait(running, timeout=5.0, return_when=FIRST_COMPLETED)
            for fut in finished:
                for m, lat, dev in fut.result():
                    table.add(m, lat, dev)
                    done += 1
            now = time.perf_counter()
            if not stopping and time.monotonic() >= deadline:
                stopping = True
                print(f"  time limit: finishing {len(running)} running chunk(s)", flush=True)
            if now - last_save >= SAVE_EVERY_S or (finished and not running):
                table.meta["seconds"] = spent + now - t0
                table.save(out)
                last_save = now
                rate = (now - t0) / max(1, done - first)
                print(
                    f"  {done}/{total} in {now - t0:.0f} s ({rate * workers:.2f} s "
                    "per row per worker)",
                    flush=True,
                )
    table.meta["seconds"] = spent + time.perf_counter() - t0
    table.meta["workers"] = max(workers, int(table.meta.get("workers", 0)))
    check(table)
    table.save(out)
    return table.complete


def check(table: Table) -> None:
    """Compares the rows with the short real search's own evaluations (``meta["check"]``)."""
    worst, n = 0.0, 0
    for c in table.context.get("checks", []):
        mask = table.mask(set(table.units) - set(c["fp32_units"]))
        got = table.lookup(mask)
        if got is None:
            continue
        dev = float(c["deviation"])
        n += 1
        worst = max(worst, abs(got[0] - c["latency_ms"]) / c["latency_ms"])
        if np.isfinite(dev) or np.isfinite(got[1]):
            worst = max(worst, abs(got[1] - dev) / max(dev, 1e-7))
    table.meta["check"] = {
        "search_trials_compared": n,
        "max_rel_diff_vs_search": worst,
        "note": "the context's trials were evaluated by run_search where the context was made",
    }


def build_table(
    name: str,
    max_units: int,
    workers: int,
    out: Path,
    *,
    resume: Path | None = None,
    from_dir: Path | None = None,
    time_limit: float | None = None,
) -> int:
    """One model's exhaustive table, here or from a prepared folder; 0, or :data:`PARTIAL`.

    Args:
        name: The real model.
        max_units: Group its units to this many.
        workers: Processes.
        out: The table file to write.
        resume: A partial table to continue, if it was made from the same inputs (``out``
            itself is tried too).
        from_dir: A folder written by :func:`prepare` (else the model is fetched here).
        time_limit: Seconds from the start of the program; then the table is written as it
            is.
    """
    from amp_search.graph import load_model, sanitize, save_model
    from amp_search.testing import realmodels

    workdir = Path(tempfile.mkdtemp(prefix=f"amp-tables-{name}-"))
    try:
        context: dict[str, Any] | None = None
        if from_dir is not None:
            model_path = prepared_model(name, from_dir)
            data = from_dir / name / f"{name}.npz"
            context = json.loads((from_dir / name / f"{name}.context.json").read_text())
            if context.get("max_units") != max_units:
                raise SystemExit(f"{name} was prepared with --units {context.get('max_units')}")
        else:
            data = realmodels.write_npz(name, workdir / f"{name}.npz")
            model_path = workdir / f"{name}.onnx"
            save_model(sanitize(load_model(realmodels.fetch(name))), model_path)
        ev = ModelEvaluator(load_model(model_path), data, max_units)
        ident = identity(ev, max_units)
        tried = [p for p in (resume, out, TABLES / f"{name}.json.gz") if p]
        table = _resumed(name, ev.names, ident, list(dict.fromkeys(tried)))
        if table is None:
            if context is None:
                print(f"{name}: a short real search for the guide and risk order", flush=True)
                context = search_context(realmodels.fetch(name), data, max_units, workdir)
            free = [u for u in ev.names if u not in set(context["locked"])]
            if context["guide"] is not None and context["guide"]["units"] != free:
                raise SystemExit(f"{name}: the search's units differ from the table's")
            context.pop("max_units", None)
            meta = {
                **ident,
                "objectives": "deviation = rel. L2 vs the FP32 reference on ONNX Runtime CPU "
                "(FP16 storage emulated, graph optimizations off, 1 intra-op thread); latency "
                "= roofline estimate for an H100 (ms)",
                "machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.machine()}",
                "command": " ".join(["python benchmarks/tables.py", *sys.argv[1:]]),
                "date": time.strftime("%Y-%m-%d"),
                "seconds": 0.0,
            }
            table = Table.exhaustive(name, ev.names, context=context, meta=meta)
        del ev
        deadline = STARTED + (time_limit or float("inf"))
        complete = compute(table, model_path, data, max_units, workers, out, deadline)
        c = table.meta["check"]
        print(
            f"{name}: {'complete' if complete else 'PARTIAL'} -> {out} "
            f"({table.meta['seconds']:.0f} s of compute; vs the search's own "
            f"{c['search_trials_compared']} trials: max rel. diff "
            f"{c['max_rel_diff_vs_search']:.2g})",
            flush=True,
        )
        return 0 if complete else PARTIAL
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _resumed(
    name: str, units: list[str], ident: dict[str, Any], paths: list[Path]
) -> Table | None:
    """The first of ``paths`` that is a table of the same inputs (partial or not)."""
    for path in paths:
        if not Path(path).is_file():
            continue
        old = Table.load(path)
        why = resumable(old, ident) or (None if old.units == units else "other units")
        if why is None:
            done = int(np.sum(~np.isnan(old.deviation)))
            print(f"{name}: resuming {path} ({done} rows done)", flush=True)
            return old
        print(f"{name}: not resuming {path}: {why}", flush=True)
    return None


# ------------------------------------------------------------------------------------------
# Recorded answers (models with more units than can be enumerated)
# ------------------------------------------------------------------------------------------


def record(args: argparse.Namespace, name: str) -> int:
    """Every evaluation of real searches (sampler:budget[:seeds] runs), as a recorded table."""
    max_units = args.units or None
    out = Path(args.out or TABLES / f"{name}-{max_units or 'ungrouped'}.json.gz")
    workdir = Path(tempfile.mkdtemp(prefix=f"amp-record-{name}-"))
    try:
        ev = ModelEvaluator.from_real_model(name, max_units, workdir)
        ident = identity(ev, max_units)
        table = Table.load(out) if out.is_file() else None
        why = None if table is None else resumable(table, ident, sources=False)
        if table is not None and (why or table.units != ev.names):
            print(f"{name}: {out} was made from other inputs ({why}): starting again", flush=True)
            table = None
        if table is None:
            from amp_search.testing import realmodels

            context = search_context(
                Path(realmodels.fetch(name)),
                workdir / f"{name}.npz",
                max_units,
                workdir / "context",
            )
            meta = {
                **ident,
                "runs": [],
                "seconds": 0.0,
                "date": time.strftime("%Y-%m-%d"),
                "command": " ".join(["python benchmarks/tables.py", *sys.argv[1:]]),
            }
            table = Table(
                name, ev.names, np.zeros(0, dtype=object), np.zeros(0), np.zeros(0), context, meta
            )
            table.row(0)  # builds the index
        for spec in args.budgets.split(","):
            sampler, budget, *rest = spec.split(":")
            for seed in range(int(rest[0]) if rest else 1):
                t0 = time.perf_counter()
                r = replay(table, sampler, int(budget), seed, evaluate=ev.evaluate)
                new = set(r.misses)
                for m, (lat, dev) in zip(r.masks, r.values, strict=True):
                    if m in new:
                        table.add(m, lat, dev)
                spent = time.perf_counter() - t0
                table.meta["seconds"] += spent
                table.meta["runs"].append(
                    {
                        "sampler": sampler,
                        "budget": int(budget),
                        "seed": seed,
                        "new_rows": len(r.misses),
                        "sources_sha256": ident["sources_sha256"],
                    }
                )
                table.save(out)
                print(
                    f"  {sampler}:{budget} seed {seed}: {len(r.misses)} new rows, "
                    f"{len(table.masks)} in all ({spent:.0f} s)",
                    flush=True,
                )
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ppocr_cls", help="real model(s), comma-separated")
    ap.add_argument(
        "--units",
        type=int,
        default=DEFAULT_UNITS,
        help="group the units to this many (0: ungrouped; --record only)",
    )
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", help="the table file (default benchmarks/tables/<model>.json.gz)")
    ap.add_argument("--out-dir", help="write <model>.json.gz here instead")
    ap.add_argument("--resume", help="a partial table to continue (if it matches)")
    ap.add_argument("--time-limit", type=float, help="seconds; then write what is done, exit 3")
    ap.add_argument("--prepare", metavar="DIR", help="write the models' inputs into DIR")
    ap.add_argument(
        "--split-mib",
        type=float,
        default=40.0,
        help="--prepare: model files above this travel in pieces",
    )
    ap.add_argument("--from", dest="from_dir", metavar="DIR", help="compute from a prepared DIR")
    ap.add_argument("--record", action="store_true", help="record real searches' answers")
    ap.add_argument(
        "--budgets",
        default="guided:120:1,tpe:1000:1,nsga2:1000:1,random:500:1,guided:1000:1",
        help="--record: sampler:evaluations[:seeds], ...",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    names = [m for m in args.model.split(",") if m]
    if args.out and len(names) > 1:
        ap.error("--out takes one --model")
    if args.prepare:
        for name in names:
            t0 = time.perf_counter()
            path = prepare(name, args.units or None, Path(args.prepare), args.split_mib)
            print(f"{name}: prepared in {time.perf_counter() - t0:.0f} s -> {path}", flush=True)
        return 0
    if args.record:
        return max(record(args, name) for name in names)
    if not args.units or args.units > 16:
        ap.error("an exhaustive table needs --units between 1 and 16 (use --record beyond)")
    print(f"{FORMAT}: {', '.join(names)}", flush=True)
    codes = [
        build_table(
            name,
            args.units,
            args.workers,
            Path(args.out or Path(args.out_dir or TABLES) / f"{name}.json.gz"),
            resume=Path(args.resume) if args.resume else None,
            from_dir=Path(args.from_dir) if args.from_dir else None,
            time_limit=args.time_limit,
        )
        for name in names
    ]
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
