"""FP32 vs all-FP16 on the ONNX Runtime CUDA EP, with prefer_nhwc off and on.

Usage (on a machine with onnxruntime-gpu; see benchmarks/README.md for the device machine):

    python benchmarks/ort_cuda.py --model M.onnx --data D.npz [--out results.json]

For each CUDA EP setting it builds the all-FP32 and the all-FP16 rewrite of the model, runs
the calibration data, and reports median/p90 latency (IO binding, inputs on the GPU) and the
relative L2 deviation against two references: strict FP32 on the CPU, and FP32 on the same
EP setting. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amp_search.backends import BuildConfig, get_backend  # noqa: E402
from amp_search.calibration import load_calibration, model_inputs  # noqa: E402
from amp_search.graph import MixedPrecisionRewriter, load_model, sanitize, save_model  # noqa: E402
from amp_search.timing import TimingPlan, measure  # noqa: E402
from amp_search.types import Precision, PrecisionAssignment  # noqa: E402
from benchmarks._common import rel_l2  # noqa: E402


def run(backend, path: Path, config: BuildConfig, data, runs: int) -> tuple[list, object, float]:
    t0 = time.perf_counter()
    cand = backend.build(path, config)
    build_s = time.perf_counter() - t0
    with backend.open(cand) as runner:
        outs = [runner.infer(b) for b in data]
        runner.bind(data.first())
        stats = measure(
            runner.run_once,
            source=runner.source,
            timer=runner.timer(),
            plan=TimingPlan(max_pairs=max(2, runs // 10)),
        )
    return outs, stats, build_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    model = sanitize(load_model(args.model))
    rw = MixedPrecisionRewriter(model)
    names = [u.name for u in rw.units]
    data = load_calibration(args.data, model_inputs(model))
    backend = get_backend("onnxruntime")
    tmp = Path(tempfile.mkdtemp(prefix="amp-bench-"))
    paths = {}
    for label, prec in (("fp32", Precision.FP32), ("fp16", Precision.FP16)):
        m, _ = rw.apply(PrecisionAssignment.uniform(names, prec))
        paths[label] = save_model(m, tmp / f"{label}.onnx")
    cpu_ref, _, _ = run(backend, paths["fp32"], BuildConfig("cpu"), data, 3)

    rows = []
    settings = [
        {"prefer_nhwc": 0, "use_tf32": 1},
        {"prefer_nhwc": 1, "use_tf32": 1},
        {"prefer_nhwc": 0, "use_tf32": 0},
        {"prefer_nhwc": 1, "use_tf32": 0},
    ]
    for opts in settings:
        config = BuildConfig(args.device, opts)
        ep_ref, fp32_stats, fp32_build = run(backend, paths["fp32"], config, data, args.runs)
        fp16_out, fp16_stats, fp16_build = run(backend, paths["fp16"], config, data, args.runs)
        rows.append(
            {
                "options": opts,
                "fp32_ms": fp32_stats.median_ms,
                "fp32_p90_ms": fp32_stats.p90_ms,
                "fp16_ms": fp16_stats.median_ms,
                "fp16_p90_ms": fp16_stats.p90_ms,
                "speedup": fp32_stats.median_ms / fp16_stats.median_ms,
                "fp32_vs_cpu_rel_l2": rel_l2(ep_ref, cpu_ref),
                "fp16_vs_cpu_rel_l2": rel_l2(fp16_out, cpu_ref),
                "fp16_vs_same_ep_rel_l2": rel_l2(fp16_out, ep_ref),
                "build_s": [fp32_build, fp16_build],
            }
        )
    import onnxruntime as ort

    info = {
        "model": Path(args.model).name,
        "data": data.describe(),
        "batch_shapes": {k: list(v.shape) for k, v in data.first().items()},
        "units": len(names),
        "onnxruntime": ort.__version__,
        "gpu": backend.identity(BuildConfig(args.device)).get("gpu"),
        "host": platform.node(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    print(
        f"{info['model']} on {info['gpu']} (onnxruntime {info['onnxruntime']}), "
        f"{info['data']}, {len(names)} units"
    )
    print(
        f"{'CUDA EP options':34s} {'FP32 ms':>8s} {'FP16 ms':>8s} {'speedup':>8s} "
        f"{'FP32 vs CPU':>12s} {'FP16 vs CPU':>12s} {'FP16 vs EP':>11s}"
    )
    for r in rows:
        print(
            f"{json.dumps(r['options']):34s} {r['fp32_ms']:8.3f} {r['fp16_ms']:8.3f} "
            f"{r['speedup']:8.2f} {r['fp32_vs_cpu_rel_l2']:12.2e} "
            f"{r['fp16_vs_cpu_rel_l2']:12.2e} {r['fp16_vs_same_ep_rel_l2']:11.2e}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
