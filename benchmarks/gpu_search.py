"""The whole search on the GPU (ONNX Runtime CUDA EP, measured latency) for real models.

Usage: python benchmarks/gpu_search.py MODELS_DIR OUT_DIR [--trials 40] [--models a,b]

MODELS_DIR holds ``<name>.onnx`` and ``<name>.npz`` (benchmarks/prepare_gpu.py writes them).
For each model: a 40-trial search on ``cuda`` with default CUDA EP options, then a summary:
the front (latency, deviation, FP32 units), all-FP32 and all-FP16, and the fastest front point
within the model's deviation budget with its speedup over all-FP32. Writes
``OUT_DIR/gpu_search.json`` and ``OUT_DIR/<name>.png`` (the Pareto plot).

With ``--peers DIR`` (files ``<peer>_<model>.onnx`` from benchmarks/peers.py), the same
process then times, on the same EP and data, every peer answer and, again, all-FP32, all-FP16
and the best front point within budget (``--retime-runs`` timed runs each, interleaved in
rounds so drift hits all alike), and draws the peers on the plot.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amp_search.results.report import load_results  # noqa: E402
from amp_search.search import SearchConfig, run_search  # noqa: E402

#: rel. L2 budgets: what a user would accept for each model (stated in RESULTS.md).
BUDGETS = {"ppocr_cls": 1e-2, "ppocr_det": 1e-2, "ppocr_rec": 5e-2, "minilm": 1e-2}


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
    """Times peers and our key points in one process, same EP and data; redraws the plot."""
    import numpy as np
    import optuna

    from amp_search.backends import BuildConfig, get_backend
    from amp_search.calibration import load_calibration, model_inputs
    from amp_search.graph import load_model
    from amp_search.results.plots import PlotPoint
    from amp_search.search.run import draw_plots
    from amp_search.search.study import _storage
    from amp_search.timing import measure
    from benchmarks._common import rel_l2

    backend = get_backend("onnxruntime")
    data = load_calibration(cfg.data, model_inputs(load_model(cfg.model)))
    ref_cand = backend.build(cfg.model, BuildConfig("cpu", {"emulate_fp16_storage": 0}))
    with backend.open(ref_cand) as r:
        ref = [r.infer(b) for b in data]

    res = load_results(outcome.out)
    entries: list[tuple[str, Path, str]] = []
    for key in ("all-fp32", "all-fp16"):
        b = res.baselines.get(key)
        if b:
            entries.append((key, res.store.candidate_dir(b["digest"]) / "model.onnx", "ours"))
    budget = BUDGETS.get(name, 1e-2)
    within = [p for p in res.front if p.deviation <= budget]
    if within:
        best = min(within, key=lambda p: p.latency_ms)
        entries.append((f"amp-search #{best.trial}", res.store.candidate_dir(best.digest) /
                        "model.onnx", "ours"))  # fmt: skip
    for f in sorted(peers.glob(f"*_{name}.onnx")):
        entries.append((f.name[: -len(f"_{name}.onnx")], f, "peer"))
    config = BuildConfig(cfg.device)
    runners = []
    rows: list[dict] = []
    for label, path, kind in entries:
        try:
            cand = backend.build(path, config)
            runner = backend.open(cand).__enter__()
            outs = [runner.infer(b) for b in data]
            runner.bind(data.first())
            runners.append((label, kind, runner, rel_l2(outs, ref), []))
        except Exception as exc:  # a peer's file that does not build is a result too
            rows.append({"label": label, "kind": kind, "latency_ms": float("nan"),
                         "deviation": float("nan"), "note": f"failed: {exc}"[:300]})  # fmt: skip
    for _ in range(5):  # interleaved rounds
        for _, _, runner, _, samples in runners:
            st = measure(runner.run_once, source=runner.source, warmup=3, runs=runs // 5)
            samples.extend(st.samples_ms)
    for label, kind, runner, dev, samples in runners:
        runner.__exit__(None, None, None)
        rows.append({"label": label, "kind": kind, "latency_ms": float(np.median(samples)),
                     "p90_ms": float(np.percentile(samples, 90)), "deviation": dev,
                     "runs": len(samples)})  # fmt: skip
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
