"""Does BF16 buy anything? FP16-only and FP16+BF16 searches side by side, refined together.

Usage (on the GPU machine, one command):
    python benchmarks/gpu_bf16.py MODELS_DIR OUT_DIR [--models demo22,minilm,ppocr_det]
        [--trials 40] [--peers DIR]
    python benchmarks/gpu_bf16.py --report OUT_DIR    # here: the table for RESULTS.md

Issue 11 asks, on the ONNX Runtime CUDA EP, for a search with ``--precisions fp16,bf16`` on
the demo model, the PP-OCRv4 detector and MiniLM, refined side by side with the FP16-only
search's answer, all-FP32, all-FP16, all-BF16 and AutoCast ``--low_precision_type bf16``: for
each model the fastest point within its budget of each, and whether BF16 bought anything (a
point holding BF16 units that no FP32/FP16-only point beats: see :func:`verdict`). Per model:

1. ``amp-search search --precisions fp16`` and ``--precisions fp16,bf16`` (measured latency,
   default options, CUDA graphs on; the same trials and seed);
2. ``amp-search refine`` of the FP16+BF16 search (its front within the budget and the
   all-FP32, all-FP16 and all-BF16 baselines) with, compared in the same interleaved timing,
   the FP16-only search's answer (its fastest front point within the budget) and every peer in
   ``--peers`` (``<peer>_<model>.onnx``: ``autocast_bf16`` and ``autocast`` from
   ``benchmarks/peers.py``);
3. ``OUT_DIR/gpu_bf16_<model>.json``: each row's refined latency, speedup over all-FP32 with
   its interval, deviation, BF16 set size; the search's notes (BF16 withheld by the opset or by
   the CUDA EP's missing kernels: why BF16 may buy nothing); and the verdict.

``demo22`` is the demo model at opset 22 (ONNX types Conv ``bfloat16`` from there), built here
when MODELS_DIR has no ``demo22.onnx``. The PP-OCR models are opset 11/12: no op there is typed
``bfloat16`` (Cast has it from 13), so their BF16 search holds no BF16 unit and says so.
``--device cpu --latency estimated`` runs both searches on ONNX Runtime CPU with the H100
roofline estimate instead of timing (deviation from FP16/BF16 storage emulated) and judges the
searches' own points, without refining: the estimate's answer, no GPU figure.
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

from gpu_timing import BUDGETS  # noqa: E402

MODELS = "demo22,minilm,ppocr_det"


def _model_files(models: Path, name: str, work: Path) -> tuple[Path, Path]:
    """``<name>.onnx`` and ``<name>.npz`` in ``models``; demo22 is built if absent."""
    onnx_path, npz = models / f"{name}.onnx", models / f"{name}.npz"
    if name == "demo22" and not onnx_path.is_file():
        import numpy as np
        import onnx

        from amp_search.demo import build_demo_model, demo_data

        onnx_path, npz = work / "demo22.onnx", work / "demo22.npz"
        onnx.save(build_demo_model(opset=22), onnx_path)
        np.savez(npz, **demo_data())
    return onnx_path, npz


def _row(label: str, p, fp32_ms: float | None) -> dict:
    s = p.speedup(fp32_ms)
    return {
        "label": label, "latency_ms": p.latency_ms, "interval_ms": p.latency_interval,
        "speedup": None if s is None else list(s), "deviation": p.deviation,
        "bf16_units": len(p.bf16_units), "fp32_units": p.n_fp32, "n_units": p.n_units,
        "digest": p.digest,
    }  # fmt: skip


def _fastest(points, budget: float):
    within = [p for p in points
              if math.isfinite(p.deviation) and p.deviation <= budget]  # fmt: skip
    return min(within, key=lambda p: (p.latency_ms, p.deviation)) if within else None


def run_one(name: str, args: argparse.Namespace, out: Path) -> dict:
    from amp_search.calibration import load_calibration, model_inputs
    from amp_search.graph import load_model, sanitize
    from amp_search.keys import ERROR_ATTR
    from amp_search.results.report import load_results
    from amp_search.search import SearchConfig, run_search
    from amp_search.search.refine import refine_front

    work = Path(args.work) / name
    shutil.rmtree(work, ignore_errors=True)
    (work / "compare").mkdir(parents=True)
    model, npz = _model_files(Path(args.models_dir), name, work)
    budget = BUDGETS.get(name, 1e-2)
    doc: dict = {"model": name, "budget": budget, "device": args.device, "searches": {}}

    def save() -> None:
        (out / f"gpu_bf16_{name}.json").write_text(json.dumps(doc, indent=2, default=str))

    results = {}
    for label, precisions in (("fp16", ("fp16",)), ("fp16,bf16", ("fp16", "bf16"))):
        t0 = time.perf_counter()
        cfg = SearchConfig(
            model=model, data=npz, out=work / label.replace(",", "_"), device=args.device,
            n_trials=args.trials, storage=f"sqlite:///{work / (label.replace(',', '_') + '.db')}",
            study_name=f"{name}-{label}", seed=0, latency=args.latency, precisions=precisions,
            timing_max_s=args.timing_max_s,
        )  # fmt: skip
        outcome = run_search(cfg)
        results[label] = load_results(outcome.out)
        doc["searches"][label] = {
            "seconds": round(time.perf_counter() - t0, 1), "failed": outcome.n_failed,
            "front": len(outcome.front), "notes": outcome.notes,
            "front_with_bf16": sum(1 for p in outcome.front if p.bf16_units),
            "failures": [  # why each failed candidate failed (trial number, first 400 chars)
                [t.number, str(t.user_attrs.get(ERROR_ATTR, ""))[:400]]
                for t in outcome.study.get_trials(deepcopy=False) if t.state.name == "FAIL"
            ],
        }  # fmt: skip
        save()
    answer16 = _fastest(results["fp16"].front, budget)
    if args.latency == "estimated":  # the searches' own points, on the roofline's scale
        doc["rows"] = _estimated_rows(results["fp16,bf16"], answer16)
        doc["verdict"] = verdict(doc["rows"], budget)
        save()
        return doc
    compare = []
    if answer16 is not None:
        src = results["fp16"].store.candidate_dir(answer16.digest) / "model.onnx"
        dst = work / "compare" / "fp16search.onnx"
        shutil.copyfile(src, dst)
        compare.append(dst)
    if args.peers:
        compare += sorted(Path(args.peers).glob(f"*_{name}.onnx"))
    data = load_calibration(npz, model_inputs(sanitize(load_model(model))))
    t0 = time.perf_counter()
    ref = refine_front(results["fp16,bf16"], data=data, device=args.device, pairs=args.pairs,
                       rounds=max(1, min(4, args.pairs // 2)), max_deviation=budget,
                       compare=compare)  # fmt: skip
    doc["refine_s"] = round(time.perf_counter() - t0, 1)
    fp32 = next((p for p in ref.points if ref.label(p) == "all-fp32"), None)
    fp32_ms = None if fp32 is None else fp32.latency_ms
    rows = [_row(ref.label(p), p, fp32_ms) for p in ref.points]
    rows += [_row(str(c.metrics.get("label")), c, fp32_ms) for c in ref.compared]
    doc["rows"] = rows
    doc["failed"] = [{"label": f["label"], "error": f["error"][:400]} for f in ref.failed]
    doc["verdict"] = verdict(rows, budget)
    save()
    return doc


def _estimated_rows(results, answer16) -> list[dict]:
    """The BF16 search's front and baselines, and the FP16-only answer, as estimated."""
    fp32 = results.baselines.get("all-fp32", {}).get("latency_ms")
    named = {b["digest"]: key for key, b in results.baselines.items()}
    rows = [_row(named.get(p.digest, f"#{p.trial}"), p, fp32) for p in results.front]
    for key, b in results.baselines.items():
        if any(q.digest == b["digest"] for q in results.front):
            continue
        prec = results.store.read_json(results.store.candidate_dir(b["digest"]) / "precision.json")
        units = (prec or {}).get("units", {})
        rows.append({
            "label": key, "latency_ms": b["latency_ms"], "interval_ms": None,
            "speedup": None if not fp32 else [fp32 / b["latency_ms"]] * 3,
            "deviation": float(b["deviation"]), "digest": b["digest"], "n_units": len(units),
            "bf16_units": sum(v == "bf16" for v in units.values()),
            "fp32_units": sum(v == "fp32" for v in units.values()),
        })  # fmt: skip
    if answer16 is not None:
        rows.append(_row("compare:fp16search.onnx", answer16, fp32))
    return rows


def verdict(rows: list[dict], budget: float) -> dict:
    """The fastest row within the budget of each kind, and whether BF16 bought anything.

    BF16 bought something when a row holding BF16 units (the FP16+BF16 search's points and
    all-BF16) within the budget is beaten by no FP32/FP16-only row (the search's FP32/FP16
    points, the baselines, the FP16-only search's answer): none is at least as fast and at
    least as accurate. (Beating *every* such row at once cannot happen: all-FP32 has deviation
    0.) ``speed_at_budget`` is the fastest BF16 row's latency over the fastest FP32/FP16-only
    row's, both within the budget.
    """

    def ok(r: dict) -> bool:
        return (
            r["deviation"] is not None
            and math.isfinite(r["deviation"])
            and (r["deviation"] <= budget)
        )

    ours = [r for r in rows if not r["label"].startswith("compare:")]
    fp16_search = [r for r in rows if r["label"] == "compare:fp16search.onnx"]
    plain = [r for r in ours if not r["bf16_units"]] + fp16_search
    bf16 = [r for r in ours if r["bf16_units"] and ok(r)]

    def beats(a: dict, b: dict) -> bool:
        return a["latency_ms"] <= b["latency_ms"] and a["deviation"] <= b["deviation"]

    winners = [r for r in bf16 if not any(beats(q, r) for q in plain if ok(q))]

    def fastest(group: list[dict]) -> dict | None:
        inside = [r for r in group if ok(r)]
        return min(inside, key=lambda r: r["latency_ms"]) if inside else None

    a, b = fastest(bf16), fastest(plain)
    return {
        "fastest_with_bf16": a,
        "fastest_fp32_fp16_only": b,
        "bf16_unbeaten": [r["label"] for r in winners],
        "bought": bool(winners),
        "speed_at_budget": None if a is None or b is None else b["latency_ms"] / a["latency_ms"],
    }


def _why(error: str) -> str:
    """A failure's reason in a table cell: ONNX Runtime's "Provider type ... not set" as the
    op without a kernel, else the first line, short."""
    import re

    found = re.search(r"Provider type for (\w+) node", error)
    if found:
        return f"no BF16 {found.group(1)} kernel"
    return error.splitlines()[0][:120] if error else "?"


def report(out: Path) -> str:
    """The RESULTS.md table from every ``gpu_bf16_*.json`` in ``out``."""

    def cell(r: dict | None) -> str:
        if r is None:
            return "none within budget"
        s = r["speedup"]
        sp = "" if not s else f" {s[0]:.2f}x [{s[1]:.2f}, {s[2]:.2f}]"
        return f"{r['label']}{sp}, {r['deviation']:.3g} ({r['bf16_units']} BF16)"

    lines = [
        "| model | budget | fastest with BF16 | fastest FP32/FP16 only | all-BF16 | "
        "AutoCast bf16 | BF16 bought? | why not (notes) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for path in sorted(out.glob("gpu_bf16_*.json")):
        d = json.loads(path.read_text())
        v = d.get("verdict") or {}
        rows = {r["label"]: r for r in d.get("rows", [])}
        autocast = next((r for k, r in rows.items() if "autocast_bf16" in k), None)
        failed = {f["label"]: f["error"] for f in d.get("failed", [])}

        def absent(label: str, failed: dict[str, str] = failed) -> str:
            why = next((e for k, e in failed.items() if label in k), None)
            return "not run" if why is None else f"failed: {_why(why)}"

        notes = [n for n in d["searches"].get("fp16,bf16", {}).get("notes", [])
                 if n.startswith("BF16 withheld")]  # fmt: skip
        lines.append("| " + " | ".join([
            d["model"], f"{d['budget']:g}", cell(v.get("fastest_with_bf16")),
            cell(v.get("fastest_fp32_fp16_only")),
            cell(rows["all-bf16"]) if "all-bf16" in rows else absent("all-bf16"),
            cell(autocast) if autocast else absent("autocast_bf16"),
            (f"yes: {', '.join(v['bf16_unbeaten'])} unbeaten; fastest within budget "
             f"{v['speed_at_budget']:.3f}x" if v.get("bought") else "no"),
            " ".join(notes) or "-",
        ]) + " |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models_dir", nargs="?")
    ap.add_argument("out")
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--timing-max-s", type=float, default=4.0)
    ap.add_argument("--peers", help="folder of <peer>_<model>.onnx answers to compare")
    ap.add_argument("--work", default="/tmp/amp-gpu-bf16")
    ap.add_argument("--device", default="cuda", help="cuda (cpu only to try the script)")
    ap.add_argument("--latency", default="measured", choices=("measured", "estimated"))
    ap.add_argument("--report", action="store_true", help="print the table of OUT's JSONs")
    args = ap.parse_args()
    out = Path(args.out)
    if args.report:
        print(report(out))
        return 0
    if not args.models_dir:
        ap.error("give MODELS_DIR OUT")
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        doc = run_one(name, args, out)
        print(f"{name}: {json.dumps(doc['verdict'], default=str)}", flush=True)
    print(report(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
