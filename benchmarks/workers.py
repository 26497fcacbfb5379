"""Scale-out: 1, 2, 3 ... workers on one study, trials per hour and per-trial overhead.

Usage:
    python benchmarks/workers.py --name ppocr_rec --workers 1,2,3 --trials 30 \\
        --storage journal --option intra_op_num_threads=4 --tag cpu16
    python benchmarks/workers.py --model M.onnx --data D.npz --device cuda --gpus 2 \\
        --workers 1,2 --trials 40 --tag h200x2          # worker i on cuda:(i % gpus)

For each worker count: a fresh study and results folder; every worker is a real
``amp-search search`` process started at the same moment with the same command (exactly one
creates and seeds the study). When all exit, the study is read back:

- trials per hour = distinct evaluated candidates / wall time from launch to the last exit
  (startup and profiling included), and in steady state (first trial start to last trial end);
- per-trial overhead = (trial time - build - run - latency estimate or timing) / trial time,
  the median over trials, as in ``search_quality.py``;
- accounting: no trial left RUNNING or WAITING, no failed trial, every candidate evaluated
  once (``cached: false`` once per digest), every seed once.

Storage: ``journal`` (a JournalFileBackend file), ``sqlite``, or ``postgres`` (a throwaway
server from :mod:`amp_search.testing.postgres`, or ``--storage-url``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amp_search.keys import OWNER_ATTR  # noqa: E402
from amp_search.record import TrialRecord  # noqa: E402
from amp_search.search.study import open_or_create_study  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def run_once(args: argparse.Namespace, k: int, work: Path, storage: str) -> dict[str, Any]:
    study = f"workers-{k}-{os.getpid()}-{int(time.time())}"
    out = work / f"out-{k}"
    base = [sys.executable, "-m", "amp_search", "search", str(args.model), "--data",
            str(args.data), "--n-trials", str(args.trials), "--storage", storage, "--study",
            study, "--out", str(out), "--latency", args.latency]  # fmt: skip
    for opt in args.option:
        base += ["--option", opt]
    if args.max_units:
        base += ["--max-units", str(args.max_units)]
    procs = []
    t0 = time.time()
    for i in range(k):
        device = args.device if args.device == "cpu" else f"cuda:{i % args.gpus}"
        log = open(work / f"worker-{k}-{i}.log", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen([*base, "--device", device], stdout=log,
                                       stderr=subprocess.STDOUT), log))  # fmt: skip
    codes = []
    for p, log in procs:
        codes.append(p.wait())
        log.close()
    wall = time.time() - t0
    logs = [(work / f"worker-{k}-{i}.log").read_text()[-2000:] for i in range(k)]
    trials = open_or_create_study(storage, study, must_exist=True)[0].get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    records = [TrialRecord.from_trial(t) for t in complete]
    digests = {r.digest for r in records}
    built = Counter(r.digest for r in records if not r.cached)
    seeds = Counter(t.user_attrs["seed"] for t in trials
                    if "seed" in t.user_attrs and t.state.name != "FAIL")  # fmt: skip
    starts = [t.datetime_start for t in complete if t.datetime_start]
    ends = [t.datetime_complete for t in complete if t.datetime_complete]
    steady = (max(ends) - min(starts)).total_seconds() if starts else float("nan")
    rows = []
    for t in complete:
        secs = TrialRecord.from_trial(t).seconds
        if "build" not in secs:
            continue  # answered from the cache
        total = (t.datetime_complete - t.datetime_start).total_seconds()
        backend = (secs["build"] + secs["run"] + secs.get("time", 0.0) + secs.get("release", 0.0)
                   + secs.get("estimate", 0.0))  # fmt: skip
        rows.append({"total_s": total, "backend_s": backend, "overhead_s": total - backend})
    per_worker = Counter(t.user_attrs.get(OWNER_ATTR, {}).get("pid") for t in complete)
    return {
        "workers": k,
        "exit_codes": codes,
        "wall_s": wall,
        "steady_s": steady,
        "distinct": len(digests),
        "trials_per_hour": 3600 * len(digests) / wall,
        "trials_per_hour_steady": 3600 * len(digests) / steady if steady > 0 else None,
        "median_trial_s": statistics.median(r["total_s"] for r in rows) if rows else None,
        "median_overhead_pct": statistics.median(
            100 * r["overhead_s"] / r["total_s"] for r in rows
        )
        if rows
        else None,  # fmt: skip
        "states": dict(states),
        "lost": states.get("RUNNING", 0) + states.get("WAITING", 0),
        "failed": states.get("FAIL", 0),
        "duplicated_builds": sum(n - 1 for n in built.values() if n > 1),
        "seeds_once": all(n == 1 for n in seeds.values()),
        "trials_per_worker": sorted(per_worker.values(), reverse=True),
        "log_tails": logs if any(codes) else [],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="ppocr_rec", help="real model (amp_search.testing)")
    ap.add_argument("--model", type=Path, help="ONNX file (instead of --name)")
    ap.add_argument("--data", type=Path, help="calibration .npz (with --model)")
    ap.add_argument("--workers", default="1,2,3")
    ap.add_argument("--trials", type=int, default=30, help="distinct candidates per study")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--latency", default=None, help="measured | estimated (default by device)")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--max-units", type=int)
    ap.add_argument("--storage", default="journal", choices=("journal", "sqlite", "postgres"))
    ap.add_argument("--storage-url", help="PostgreSQL URL (default: a throwaway server)")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.latency = args.latency or ("estimated" if args.device == "cpu" else "measured")
    work = Path(tempfile.mkdtemp(prefix="amp-workers-"))
    if args.model is None:
        from amp_search.testing import realmodels

        args.model = realmodels.fetch(args.name)
        args.data = realmodels.write_npz(args.name, work / f"{args.name}.npz")
    server = None
    rows = []
    try:
        for k in [int(x) for x in args.workers.split(",")]:
            if args.storage == "journal":
                storage = str(work / f"study-{k}.journal")
            elif args.storage == "sqlite":
                storage = f"sqlite:///{work / f'study-{k}.db'}"
            elif args.storage_url:
                storage = args.storage_url
            else:
                if server is None:
                    from amp_search.testing.postgres import PostgresServer

                    server = PostgresServer(work / "pg")
                    server.start()
                storage = server.url
            print(f"{k} worker(s), {args.storage} ...", flush=True)
            row = run_once(args, k, work, storage)
            rows.append(row)
            print(f"  {row['distinct']} candidates in {row['wall_s']:.0f} s: "
                  f"{row['trials_per_hour']:.0f}/h ({row['trials_per_hour_steady']:.0f}/h steady)"
                  f", overhead {row['median_overhead_pct']:.1f}%, lost {row['lost']}, failed "
                  f"{row['failed']}, duplicated builds {row['duplicated_builds']}, per worker "
                  f"{row['trials_per_worker']}", flush=True)  # fmt: skip
    finally:
        if server is not None:
            server.stop(remove=True)
    one = rows[0]["trials_per_hour_steady"] if rows else None
    print(
        "\n| workers | candidates | wall s | trials/h | trials/h steady | speedup (steady) "
        "| overhead % | lost | failed | duplicated builds |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        sp = r["trials_per_hour_steady"] / one if one else float("nan")
        print(f"| {r['workers']} | {r['distinct']} | {r['wall_s']:.0f} | "
              f"{r['trials_per_hour']:.0f} | {r['trials_per_hour_steady']:.0f} | {sp:.2f}x | "
              f"{r['median_overhead_pct']:.1f} | {r['lost']} | {r['failed']} | "
              f"{r['duplicated_builds']} |")  # fmt: skip
    try:
        import onnxruntime as ort

        ort_version = f"{ort.__version__} {ort.get_available_providers()}"
    except ImportError:
        ort_version = "-"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"workers_{args.tag}.json"
    path.write_text(json.dumps({
        "command": " ".join(["python benchmarks/workers.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpus": os.cpu_count(),
        "onnxruntime": ort_version, "model": str(args.model), "storage": args.storage,
        "device": args.device, "gpus": args.gpus, "options": args.option, "rows": rows,
    }, indent=2, default=str))  # fmt: skip
    print(f"wrote {path}")
    return 0 if all(not any(r["exit_codes"]) and r["lost"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
