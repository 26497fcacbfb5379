"""The search on every real model with the CPU backend, and resume after ``kill -9``.

Usage: python benchmarks/cpu_search.py [--trials 60] [--out benchmarks/results/cpu_search.json]

For each real model: ``amp-search search`` as a real subprocess (ONNX Runtime CPU for
accuracy, the H100 roofline estimate for latency), killed with SIGKILL once a third of the
trials are done, then the same command again, which resumes. Reports the trials kept across
the kill, the front, and where all-FP32 and all-FP16 stand (on the front, or why not).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amp_search.cli.search import baseline_lines  # noqa: E402
from amp_search.results.report import load_results  # noqa: E402
from amp_search.testing import realmodels  # noqa: E402


def count(db: Path, state: str) -> int:
    try:
        con = sqlite3.connect(db, timeout=30)
        try:
            q = "SELECT COUNT(*) FROM trials WHERE state = ?"
            return int(con.execute(q, (state,)).fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def run_model(name: str, trials: int, work: Path) -> dict:
    model = realmodels.fetch(name)
    data = realmodels.write_npz(name, work / f"{name}.npz")
    db = work / f"{name}.db"
    cmd = [sys.executable, "-m", "amp_search", "search", str(model), "--data", str(data),
           "--n-trials", str(trials), "--out", str(work / name), "--storage",
           f"sqlite:///{db}", "--study", name]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while count(db, "COMPLETE") < trials // 3 and proc.poll() is None:
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = count(db, "COMPLETE")
    running = count(db, "RUNNING")
    r = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{name}: resume failed: {r.stderr[-500:]}")
    res = load_results(work / name)
    return {
        "model": name,
        "units": res.front[0].n_units if res.front else None,
        "complete_before_kill": before,
        "running_at_kill": running,
        "complete_after_resume": count(db, "COMPLETE"),
        "failed": count(db, "FAIL"),
        "seconds": round(seconds, 1),
        "front": [
            {
                "trial": p.trial,
                "latency_ms": p.latency_ms,
                "deviation": p.deviation,
                "n_fp32": p.n_fp32,
            }
            for p in res.front
        ],  # fmt: skip
        "baselines": dict(baseline_lines(res)),
        "latency_source": res.meta.get("latency_source"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--models", default=",".join(realmodels.MODEL_NAMES))
    ap.add_argument("--out", default="benchmarks/results/cpu_search.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="amp-cpu-search-"))
    rows = []
    for name in args.models.split(","):
        row = run_model(name, args.trials, work)
        rows.append(row)
        print(f"{name}: {row['complete_before_kill']} done at kill -9 "
              f"({row['running_at_kill']} running), {row['complete_after_resume']} after "
              f"resume, {row['failed']} failed, {row['seconds']} s, front {len(row['front'])}",
              flush=True)  # fmt: skip
        for k, v in row["baselines"].items():
            print(f"   {k}: {v}", flush=True)
        Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"),
                                              "cpu_count": os.cpu_count(), "rows": rows},
                                             indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
