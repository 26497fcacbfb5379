"""The whole search on the GPU (ONNX Runtime CUDA EP, measured latency) for real models.

Usage: python benchmarks/gpu_search.py MODELS_DIR OUT_DIR [--trials 40] [--models a,b]

MODELS_DIR holds ``<name>.onnx`` and ``<name>.npz`` (benchmarks/prepare_gpu.py writes them).
For each model: a 40-trial search on ``cuda`` with default CUDA EP options, then a summary:
the front (latency, deviation, FP32 units), all-FP32 and all-FP16, and the fastest front point
within the model's deviation budget with its speedup over all-FP32. Writes
``OUT_DIR/gpu_search.json`` and ``OUT_DIR/<name>.png`` (the Pareto plot).

With ``--peers DIR`` (files ``<peer>_<model>.onnx`` from benchmarks/peers.py), the same
process then runs ``amp-search refine`` on the front within the budget with every peer answer
compared alike: all-FP32, all-FP16, each front point within budget and each peer, on the same
EP and data, ``--retime-runs`` timed runs each in 5 interleaved rounds; amp-search's answer is
the fastest refined point within budget (what ``pick`` copies). The peers go on the plot.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amp_search.results.report import load_results  # noqa: E402
from amp_search.search import SearchConfig, run_search  # noqa: E402

#: rel. L2 budgets: what a user would accept for each model (stated in RESULTS.md).
BUDGETS = {"ppocr_cls": 1e-2, "ppocr_det": 1e-2, "ppocr_rec": 5e-2, "minilm": 1e-2,
           # CPU all-FP16: ddddocr 2.3e-3 (same text 6/6), Silero VAD 1.3e-2 (same speech frames).
           "ddddocr_rec": 1e-2, "silero_vad": 2e-2}  # fmt: skip


def summarize(name: str, out: Path, seconds: float) -> dict:
    res = load_results(out)
    base = res.baselines
    fp32 = float(base.get("all-fp32", {}).get("latency_ms", "nan"))
    budget = BUDGETS.get(name, 1e-2)
    within = [p for p in res.front if p.deviation <= budget]
    best = min(within, key=lambda p: p.latency_ms) if within else None
    return {
        "model": name,
        "seconds": round(seconds, 1),
        "budget_rel_l2": budget,
        "all_fp32": base.get("all-fp32"),
        "all_fp16": base.get("all-fp16"),
        "front": [
            {
                "trial": p.trial,
                "latency_ms": p.latency_ms,
                "deviation": p.deviation,
                "n_fp32": p.n_fp32,
                "n_units": p.n_units,
            }
            for p in res.front
        ],  # fmt: skip
        "best_within_budget": None
        if best is None
        else {
            "trial": best.trial,
            "latency_ms": best.latency_ms,
            "deviation": best.deviation,
            "n_fp32": best.n_fp32,
            "speedup_vs_fp32": fp32 / best.latency_ms,
        },  # fmt: skip
        "latency_source": res.meta.get("latency_source"),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("models_dir")
    ap.add_argument("out")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--models", default="ppocr_cls,ppocr_rec,ppocr_det,minilm")
    ap.add_argument("--work", default="/tmp/amp-gpu")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per model")
    ap.add_argument("--peers", help="folder of <peer>_<model>.onnx answers to time alike")
    ap.add_argument("--retime-runs", type=int, default=100)
    ap.add_argument("--device", default="cuda", help="cuda (cpu only to try the script)")
    args = ap.parse_args()
    models, out, work = Path(args.models_dir), Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for name in args.models.split(","):
        t0 = time.perf_counter()
        cfg = SearchConfig(
            model=models / f"{name}.onnx", data=models / f"{name}.npz", out=work / name,
            backend="onnxruntime", device=args.device, n_trials=args.trials, timeout=args.timeout,
            storage=f"sqlite:///{work / (name + '.db')}", study_name=name, seed=0,
        )  # fmt: skip
        outcome = run_search(cfg)
        s = summarize(name, outcome.out, time.perf_counter() - t0)
        s["trials_complete"] = outcome.n_complete
        s["trials_failed"] = outcome.n_failed
        summary.append(s)
        if (outcome.out / "pareto.png").is_file():
            shutil.copyfile(outcome.out / "pareto.png", out / f"{name}.png")
        b = s["best_within_budget"]
        print(f"{name}: {outcome.n_complete} trials in {s['seconds']} s; all-FP32 "
              f"{s['all_fp32']}; all-FP16 {s['all_fp16']}; best within {s['budget_rel_l2']}: {b}",
              flush=True)  # fmt: skip
        if args.peers:
            s["same_run"] = retime(name, cfg, outcome, Path(args.peers), args.retime_runs)

            for row in s["same_run"]:
                print(f"   {row['label']}: {row['latency_ms']:.4g} ms @ {row['deviation']:.3g}"
                      f" ({row.get('note', '')})", flush=True)  # fmt: skip
            if (outcome.out / "pareto.png").is_file():
                shutil.copyfile(outcome.out / "pareto.png", out / f"{name}.png")
        (out / "gpu_search.json").write_text(json.dumps(summary, indent=2, default=str))
    return 0


def retime(name: str, cfg: SearchConfig, outcome, peers: Path, runs: int) -> list[dict]:
    """``amp-search refine`` of the front within budget, with every peer answer compared alike.

    One process, same EP, options and data: all-FP32, all-FP16, every front point within the
    budget and every peer, timed in interleaved rounds; amp-search's answer is the fastest
    refined point within budget (what ``amp-search pick`` then copies). Redraws the plot.
    """
    import optuna

    from amp_search.calibration import load_calibration, model_inputs
    from amp_search.graph import load_model
    from amp_search.results.plots import PlotPoint, draw_plots
    from amp_search.search.refine import refine_front
    from amp_search.search.study import _storage

    budget = BUDGETS.get(name, 1e-2)
    res = load_results(outcome.out)
    data = load_calibration(cfg.data, model_inputs(load_model(cfg.model)))
    files = sorted(peers.glob(f"*_{name}.onnx"))
    ref = refine_front(res, data=data, device=cfg.device, runs=runs, rounds=5,
                       max_deviation=budget, compare=files)  # fmt: skip
    rows: list[dict] = []
    for p in [*ref.points, *ref.compared]:
        label = str(p.metrics["label"])
        peer = label.startswith("compare:")
        if peer:
            label = label[len("compare:") : -len(f"_{name}.onnx")]
        rows.append({"label": label, "kind": "peer" if peer else "ours",
                     "trial": None if peer else p.trial, "n_fp32": None if peer else p.n_fp32,
                     "latency_ms": p.latency_ms, "p90_ms": p.metrics["p90_ms"],
                     "deviation": p.deviation, "runs": p.metrics["runs"],
                     "search_latency_ms": p.metrics.get("search_latency_ms"),
                     "on_front": any(q.digest == p.digest for q in ref.front)})  # fmt: skip
    for f in ref.failed:
        rows.append({"label": f["label"], "kind": "failed", "latency_ms": math.nan,
                     "deviation": math.nan, "note": f"failed: {f['error']}"[:290]})  # fmt: skip
    within = [p for p in ref.front if p.deviation <= budget]
    if within:
        best = min(within, key=lambda p: (p.latency_ms, p.deviation))
        rows.append({"label": f"amp-search best (#{best.trial})", "kind": "answer",
                     "trial": best.trial, "n_fp32": best.n_fp32, "latency_ms": best.latency_ms,
                     "p90_ms": best.metrics["p90_ms"], "deviation": best.deviation})  # fmt: skip
    fp32 = next((r["latency_ms"] for r in rows if r["label"] == "all-fp32"), None)
    for r in rows:
        if fp32 and r["latency_ms"] == r["latency_ms"]:
            r["speedup_vs_fp32"] = fp32 / r["latency_ms"]
            r["within_budget"] = r["deviation"] <= budget
    refs = [
        PlotPoint(r["latency_ms"], r["deviation"], f"{r['label']} (peer)", kind="reference")
        for r in rows
        if r["kind"] == "peer" and r["latency_ms"] == r["latency_ms"]
    ]
    study = optuna.load_study(study_name=outcome.study_name, storage=_storage(outcome.storage))
    draw_plots(res.store, study, res.front, res.meta, references=refs)
    return rows


if __name__ == "__main__":
    sys.exit(main())
