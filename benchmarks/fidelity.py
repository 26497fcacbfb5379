"""Fidelity of the CPU stand-ins: CPU vs CUDA EP deviation, estimated vs measured latency.

Usage: python benchmarks/fidelity.py MODEL.onnx DATA.npz OUT.json [--n 30] [--target h200]

For the same assignments of one model (all-FP32, all-FP16, the risk ladder's shape: k units
FP32, and random ones; 30 or more), it measures the deviation from strict FP32 on ONNX
Runtime CPU (FP16 storage emulated) and on the CUDA EP, the CUDA EP latency, and the roofline
estimate, then reports Spearman rank correlations and every assignment that CPU calls fine
(rel. L2 < 1e-2) while the GPU calls it broken (non-finite or > 1e-1).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amp_search.backends import BuildConfig, get_backend  # noqa: E402
from amp_search.calibration import load_calibration, model_inputs  # noqa: E402
from amp_search.graph import MixedPrecisionRewriter, load_model, sanitize, save_model  # noqa: E402
from amp_search.latency_model import LatencyEstimator  # noqa: E402
from amp_search.profiling import profile_model  # noqa: E402
from amp_search.timing import measure  # noqa: E402
from amp_search.types import PrecisionAssignment  # noqa: E402
from benchmarks._common import rel_l2  # noqa: E402


def spearman(a: list[float], b: list[float]) -> float:
    x, y = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3:
        return float("nan")
    rx = np.argsort(np.argsort(x)).astype(float)
    ry = np.argsort(np.argsort(y)).astype(float)
    return float(np.corrcoef(rx, ry)[0, 1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--target", default="h200")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    model = sanitize(load_model(args.model))
    rw = MixedPrecisionRewriter(model)
    names = [u.name for u in rw.units]
    data = load_calibration(args.data, model_inputs(model))
    shapes = {k: tuple(v.shape) for k, v in data.first().items()}
    prof = profile_model(model, rw.units, data, fp16_pass=False)  # observed tensor shapes
    known = {n: t.shape for n, t in prof.tensors.items() if t.shape is not None}
    est = LatencyEstimator(model, shapes, target=args.target, known_shapes=known)
    backend = get_backend("onnxruntime")
    rng = random.Random(0)
    assignments = [PrecisionAssignment.with_fp16(names, []),
                   PrecisionAssignment.with_fp16(names, names)]  # fmt: skip
    for frac in (0.1, 0.25, 0.5, 0.75, 0.9):
        assignments.append(PrecisionAssignment.with_fp16(names, names[: int(frac * len(names))]))
    while len(assignments) < args.n:
        p = rng.choice((0.3, 0.5, 0.7, 0.9))
        assignments.append(
            PrecisionAssignment.with_fp16(names, [u for u in names if rng.random() < p])
        )
    tmp = Path(tempfile.mkdtemp(prefix="amp-fid-"))
    cpu_cfg, gpu_cfg = BuildConfig("cpu"), BuildConfig(args.device)

    def outputs(path: Path, cfg: BuildConfig, time_it: bool):
        cand = backend.build(path, cfg)
        with backend.open(cand) as r:
            outs = [r.infer(b) for b in data]
            stats = None
            if time_it:
                r.bind(data.first())
                stats = measure(r.run_once, source=r.source, timer=r.timer())
        return outs, stats

    ref = None
    rows = []
    for i, a in enumerate(assignments):
        m, rep = rw.apply(a)
        path = save_model(m, tmp / f"{i}.onnx")
        cpu_out, _ = outputs(path, cpu_cfg, False)
        if ref is None:
            ref = cpu_out  # all-FP32 on the CPU: the strict FP32 reference
        gpu_out, stats = outputs(path, gpu_cfg, True)
        rows.append({
            "fp16_units": len(a.fp16_units), "casts": rep.casts_inserted,
            "cpu_rel_l2": rel_l2(cpu_out, ref), "gpu_rel_l2": rel_l2(gpu_out, ref),
            "gpu_ms": stats.median_ms, "estimated_ms": est.estimate(m),
        })  # fmt: skip
        print(i, rows[-1], flush=True)
    dev_rho = spearman([r["cpu_rel_l2"] for r in rows], [r["gpu_rel_l2"] for r in rows])
    lat_rho = spearman([r["estimated_ms"] for r in rows], [r["gpu_ms"] for r in rows])
    surprises = [r for r in rows if r["cpu_rel_l2"] < 1e-2
                 and not (r["gpu_rel_l2"] <= 1e-1)]  # fmt: skip
    result = {
        "model": Path(args.model).name, "n": len(rows), "target": args.target,
        "spearman_deviation_cpu_vs_gpu": dev_rho, "spearman_latency_est_vs_gpu": lat_rho,
        "cpu_fine_gpu_broken": surprises, "rows": rows,
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2, default=float))
    print(f"spearman deviation CPU vs GPU {dev_rho:.3f}; latency estimate vs GPU {lat_rho:.3f}; "
          f"CPU-fine/GPU-broken: {len(surprises)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
