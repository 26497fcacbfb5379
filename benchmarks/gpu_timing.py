"""Can the search's GPU speed figures be banked on? Search, then refine twice, per real model.

Usage (on the GPU machine, one command):
    python benchmarks/gpu_timing.py MODELS_DIR OUT_DIR [--models cls,det,...] [--trials 16]
        [--peers DIR] [--times 1,4] [--graph-off]
    python benchmarks/gpu_timing.py --report OUT_DIR [...]   # here: the tables for RESULTS.md

MODELS_DIR holds ``<name>.onnx`` and ``<name>.npz`` (``benchmarks/prepare_gpu.py``). For each
model and batch (``--times 4``: the calibration batch repeated 4 times, a larger batch of the
same real inputs), on the ONNX Runtime CUDA EP with default options (CUDA graphs on):

1. a search with measured latency (paired with the resident all-FP32 reference);
2. ``amp-search refine`` of the front within the model's budget, all-FP32, all-FP16 and every
   peer answer in ``--peers`` (``<peer>_<model>.onnx``, from ``benchmarks/peers.py``), then the
   same refine again at once (``--graph-off``: a third one with CUDA graphs off).

It checks what issue 9 asks: (a) the search's speedup of its answer over all-FP32 within 5% of
refine's for the same point; (b) the two refines agree within 3% on every point's ratio to
all-FP32; (c) the search's answer is refine's, or inside its interval; (d) no window timed
below 90% of the steady SM clock (the windows under it were retaken); (e) the refined speedup
of the answer beside AutoCast's. Each model's figures are written to
``OUT_DIR/gpu_timing_<model>_x<times>.json`` as soon as they are measured.
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

import numpy as np  # noqa: E402

#: rel. L2 budgets: what a user would accept for each model (stated in RESULTS.md).
BUDGETS = {"ppocr_cls": 1e-2, "ppocr_det": 1e-2, "ppocr_rec": 5e-2, "minilm": 1e-2,
           "layout_picodet": 1e-2}  # fmt: skip


def _tiled(npz: Path, times: int, work: Path) -> Path:
    """The calibration batch repeated ``times`` times along the batch axis."""
    if times == 1:
        return npz
    with np.load(npz) as f:
        arrays = {k: np.concatenate([f[k]] * times, axis=0) for k in f.files}
    out = work / f"{npz.stem}_x{times}.npz"
    np.savez(out, **arrays)
    return out


def _answer(points, budget):
    within = [p for p in points if p.feasible and p.deviation <= budget]
    return min(within, key=lambda p: (p.latency_ms, p.deviation)) if within else None


def _row(p) -> dict:
    s = p.speedup()
    m = p.metrics
    return {
        "label": str(m.get("label") or f"#{p.trial}"), "trial": p.trial, "digest": p.digest,
        "latency_ms": p.latency_ms, "interval_ms": p.latency_interval,
        "ratio": m.get("ratio"), "ratio_interval": [m.get("ratio_low"), m.get("ratio_high")],
        "speedup": None if s is None else list(s), "deviation": p.deviation,
        "windows": m.get("windows"), "clock_mhz_min": m.get("clock_mhz_min"),
        "cuda_graph": (m.get("execution") or {}).get("cuda_graph"),
        "graph_reason": (m.get("execution") or {}).get("cuda_graph_reason"),
        "fp32_units": list(p.fp32_units), "bf16_units": list(p.bf16_units),
    }  # fmt: skip


def run_one(name: str, times: int, args: argparse.Namespace, out: Path) -> dict:
    import optuna

    from amp_search.calibration import load_calibration, model_inputs
    from amp_search.graph import load_model, sanitize
    from amp_search.results.pareto import latency_tie
    from amp_search.results.report import load_results
    from amp_search.search import SearchConfig, run_search
    from amp_search.search.refine import refine_front

    models, work = Path(args.models_dir), Path(args.work) / f"{name}_x{times}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data_path = _tiled(models / f"{name}.npz", times, work)
    budget = BUDGETS.get(name, 1e-2)
    t0 = time.perf_counter()
    cfg = SearchConfig(
        model=models / f"{name}.onnx", data=data_path, out=work / "out", backend="onnxruntime",
        device=args.device, n_trials=args.trials, storage=f"sqlite:///{work / 's.db'}",
        study_name=name, seed=0, latency="measured", timing_max_s=args.timing_max_s,
    )  # fmt: skip
    outcome = run_search(cfg)
    search_s = time.perf_counter() - t0
    res = load_results(outcome.out)
    study = outcome.study
    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    clocks = [(t.user_attrs["amp_search"]["metrics"].get("clock_mhz_min"),
               t.user_attrs["amp_search"]["metrics"].get("clock_mhz_steady"))
              for t in trials if "amp_search" in t.user_attrs]  # fmt: skip
    reference = study.user_attrs.get("amp_search:reference_ms", {})
    search_answer = min((p for p in res.front if p.deviation <= budget),
                        key=lambda p: (p.latency_ms, p.deviation), default=None)  # fmt: skip
    data = load_calibration(data_path, model_inputs(sanitize(load_model(cfg.model))))
    peers = sorted(Path(args.peers).glob(f"*_{name}.onnx")) if args.peers else []
    batch = int(next(iter(data.first().values())).shape[0])
    doc: dict = {
        "model": name, "batch_times": times, "batch": batch,
        "budget": budget, "trials": len(trials), "failed": outcome.n_failed,
        "search_s": round(search_s, 1), "reference": reference,
        "pinned_fp32": (json.loads((outcome.out / "run.json").read_text())
                        .get("pinned_fp32") or {}),
        "front": [_row(p) for p in res.front],
        "search_answer": None if search_answer is None else _row(search_answer),
        "clock_min_fraction": min((a / b for a, b in clocks if a and b), default=None),
        "refines": [],
    }  # fmt: skip

    def save() -> None:
        (out / f"gpu_timing_{name}_x{times}.json").write_text(
            json.dumps(doc, indent=2, default=str)
        )

    save()
    runs = [("graph on", None), ("graph on, again", None)]
    if args.graph_off and args.device.startswith("cuda"):
        runs.append(("graph off", {"enable_cuda_graph": 0}))
    refined = []
    for label, options in runs:
        t1 = time.perf_counter()
        ref = refine_front(res, data=data, device=args.device, options=options, pairs=args.pairs,
                           rounds=max(1, min(4, args.pairs // 2)), max_deviation=budget,
                           compare=peers)  # fmt: skip
        refined.append(ref)
        answer = _answer(ref.points, budget)
        doc["refines"].append({
            "label": label, "seconds": round(time.perf_counter() - t1, 1),
            "reference": ref.meta.get("reference"),
            "points": [_row(p) for p in ref.points], "compared": [_row(p) for p in ref.compared],
            "failed": ref.failed, "answer": None if answer is None else _row(answer),
        })  # fmt: skip
        shutil.copyfile(outcome.out / "refined.json", work / f"refined_{len(refined)}.json")
        save()
    # The checks (a)-(e), on the two graph-on refines.
    first, second = refined[0], refined[1]
    by_digest = {p.digest: p for p in first.points}
    checks: dict = {}
    if search_answer is not None and search_answer.digest in by_digest:
        s_search = search_answer.speedup()
        s_refine = by_digest[search_answer.digest].speedup()
        if s_search and s_refine:
            checks["a_speedup_search_over_refine"] = s_search[0] / s_refine[0]
    pairs = [(p, next((q for q in second.points if q.digest == p.digest), None))
             for p in first.points]  # fmt: skip
    checks["b_ratio_agreement_max_dev"] = max(
        (abs(p.metrics["ratio"] / q.metrics["ratio"] - 1) for p, q in pairs if q is not None),
        default=None)  # fmt: skip
    answer = _answer(first.points, budget)
    if answer is not None and search_answer is not None:
        mine = by_digest.get(search_answer.digest)
        checks["c_same_answer"] = answer.digest == search_answer.digest
        checks["c_inside_interval"] = bool(mine is not None and latency_tie(mine, answer))
    refine_clocks = [p.metrics.get("clock_mhz_min") for r in refined for p in r.points]
    checks["d_clock_min_fraction_search"] = doc["clock_min_fraction"]
    checks["d_clock_min_mhz_refine"] = min((c for c in refine_clocks if c), default=None)
    fp32 = next((p for p in first.points if first.label(p) == "all-fp32"), None)
    for c in first.compared:
        if "autocast" in str(c.metrics.get("label")):
            checks["e_autocast_speedup"] = c.speedup()
            checks["e_autocast_deviation"] = c.deviation
    if answer is not None:
        checks["e_answer_speedup"] = answer.speedup()
        checks["e_answer_deviation"] = answer.deviation
        checks["e_answer_label"] = first.label(answer)
    checks["fp32_ms"] = None if fp32 is None else fp32.latency_ms
    doc["checks"] = checks
    save()
    return doc


def agreement(doc: dict) -> tuple[float | None, float | None, str]:
    """(b) from the stored refines: the largest ratio disagreement over every point, over the
    points timed with a CUDA graph, and which point disagreed most."""
    first, second = doc["refines"][0], doc["refines"][1]
    again = {p["digest"] or p["label"]: p for p in second["points"] + second["compared"]}
    worst, worst_graph, label = None, None, ""
    for p in first["points"] + first["compared"]:
        q = again.get(p["digest"] or p["label"])
        if q is None or not p.get("ratio") or not q.get("ratio"):
            continue
        d = abs(p["ratio"] / q["ratio"] - 1)
        if worst is None or d > worst:
            worst, label = d, p["label"] + ("" if p.get("cuda_graph") else " (no graph)")
        if p.get("cuda_graph") and (worst_graph is None or d > worst_graph):
            worst_graph = d
    return worst, worst_graph, label


def report(out: Path) -> str:
    """The RESULTS.md tables from every ``gpu_timing_*.json`` in ``out``."""
    lines = [
        "| model | batch | trials (failed) | CUDA graph | all-FP32 ms | search answer: speedup "
        "(search / refine) | (b) max ratio disagreement, 2 refines: all points (graph-replayed) "
        "| (c) answer | (d) clock | "
        "(e) answer refined: speedup, dev. | AutoCast: speedup, dev. |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for path in sorted(out.glob("gpu_timing_*.json")):
        d = json.loads(path.read_text())
        c = d.get("checks", {})
        sa = d.get("search_answer") or {}

        def sp(s):
            return "-" if not s else f"{s[0]:.2f}x [{s[1]:.2f}, {s[2]:.2f}]"

        graph = (d.get("reference") or {}).get("execution", {}).get("cuda_graph")
        a = c.get("a_speedup_search_over_refine")
        b, b_graph, b_label = agreement(d)
        clock = c.get("d_clock_min_fraction_search")
        answer = ("same" if c.get("c_same_answer")
                  else "tied" if c.get("c_inside_interval") else "differs")  # fmt: skip
        cells = [
            d["model"],
            d["batch"],
            f"{d['trials']} ({d['failed']})",
            "on" if graph else "off",
            f"{c.get('fp32_ms') or math.nan:.4g}",
            f"{sa.get('label', '-')} {sp(sa.get('speedup'))} ({'-' if a is None else f'{a:.3f}'})",
            "-" if b is None else f"{b:.1%} ({b_graph:.1%}; worst: {b_label})",
            answer,
            "-" if clock is None else f"{clock:.0%}",
            f"{c.get('e_answer_label', '-')} {sp(c.get('e_answer_speedup'))}, "
            f"{c.get('e_answer_deviation', math.nan):.3g}",
            f"{sp(c.get('e_autocast_speedup'))}, {c.get('e_autocast_deviation', math.nan):.3g}",
        ]
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("models_dir", nargs="?")
    ap.add_argument("out")
    ap.add_argument("--models", default="ppocr_cls,ppocr_det,ppocr_rec,minilm,layout_picodet")
    ap.add_argument("--times", default="1", help="batch multipliers, e.g. 1,4")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--timing-max-s", type=float, default=4.0)
    ap.add_argument("--peers", help="folder of <peer>_<model>.onnx answers to refine beside")
    ap.add_argument("--graph-off", action="store_true", help="a third refine, graphs off")
    ap.add_argument("--work", default="/tmp/amp-gpu-timing")
    ap.add_argument("--device", default="cuda", help="cuda (cpu only to try the script)")
    ap.add_argument("--report", action="store_true", help="print the tables of OUT's JSONs")
    args = ap.parse_args()
    out = Path(args.out)
    if args.report:
        print(report(out))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        for times in map(int, args.times.split(",")):
            t0 = time.perf_counter()
            try:
                doc = run_one(name, times, args, out)
            except Exception as exc:  # one model's failure must not lose the others
                print(f"{name} x{times}: FAILED {type(exc).__name__}: {exc}", flush=True)
                continue
            print(f"{name} x{times}: {time.perf_counter() - t0:.0f} s; {doc.get('checks')}",
                  flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
