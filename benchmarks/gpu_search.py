"""The whole search on the GPU (ONNX Runtime CUDA EP, measured latency) for real models.

Usage: python benchmarks/gpu_search.py MODELS_DIR OUT_DIR [--trials 40] [--models a,b]

MODELS_DIR holds ``<name>.onnx`` and ``<name>.npz`` (benchmarks/prepare_gpu.py writes them).
For each model: a 40-trial search on ``cuda`` with default CUDA EP options, then a summary:
the front (latency, deviation, FP32 units), all-FP32 and all-FP16, and the fastest front point
within the model's deviation budget with its speedup over all-FP32. Writes
``OUT_DIR/gpu_search.json`` and ``OUT_DIR/<name>.png`` (the Pareto plot).
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
    args = ap.parse_args()
    models, out, work = Path(args.models_dir), Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for name in args.models.split(","):
        t0 = time.perf_counter()
        cfg = SearchConfig(
            model=models / f"{name}.onnx", data=models / f"{name}.npz", out=work / name,
            backend="onnxruntime", device="cuda", n_trials=args.trials, timeout=args.timeout,
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
        (out / "gpu_search.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
