"""Rewrite and session-creation cost per trial on every real model.

Usage: python benchmarks/rewrite.py [--n 20] [--out benchmarks/results/rewrite.json]

For each real model: nodes and units, then over ``n`` random assignments (half the units
FP16), the median time of the per-trial rewrite the search uses
(``MixedPrecisionRewriter.apply_serialized``: the graph work, weights reused as cached
encodings), of the functional ``apply`` (which copies every weight into a new ModelProto),
and of creating an ONNX Runtime CPU session from the bytes (the default candidate build).
The first call, which converts and caches the FP16 weights, is reported apart. Goal: the
rewrite under 50 ms per 1000 nodes.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxruntime as ort  # noqa: E402

from amp_search.graph import MixedPrecisionRewriter, load_model, sanitize  # noqa: E402
from amp_search.testing import realmodels  # noqa: E402
from amp_search.types import Precision, PrecisionAssignment  # noqa: E402


def bench(name: str, n: int) -> dict:
    t0 = time.perf_counter()
    model = sanitize(load_model(realmodels.fetch(name)))
    sanitize_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rw = MixedPrecisionRewriter(model)
    setup_s = time.perf_counter() - t0
    names = [u.name for u in rw.units]
    t0 = time.perf_counter()
    rw.apply(PrecisionAssignment.uniform(names, Precision.FP16))
    first_s = time.perf_counter() - t0
    rng = random.Random(0)
    rewrite, apply_full, session = [], [], []
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for _ in range(n):
        a = PrecisionAssignment.with_fp16(names, [u for u in names if rng.random() < 0.5])
        t0 = time.perf_counter()
        parts, _, _ = rw.apply_serialized(a)
        rewrite.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rw.apply(a)
        apply_full.append(time.perf_counter() - t0)
        data = b"".join(parts)
        t0 = time.perf_counter()
        ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        session.append(time.perf_counter() - t0)
    nodes = len(model.graph.node)
    med = statistics.median(rewrite)
    return {
        "model": name,
        "nodes": nodes,
        "units": len(names),
        "sanitize_ms": sanitize_s * 1e3,
        "rewriter_setup_ms": setup_s * 1e3,
        "first_apply_ms": first_s * 1e3,
        "rewrite_ms": med * 1e3,
        "rewrite_ms_per_1000_nodes": med * 1e3 * 1000 / nodes,
        "apply_full_ms": statistics.median(apply_full) * 1e3,
        "ort_cpu_session_ms": statistics.median(session) * 1e3,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/rewrite.json")
    args = ap.parse_args()
    rows = [bench(name, args.n) for name in realmodels.MODEL_NAMES]
    cols = ["model", "nodes", "units", "first_apply_ms", "rewrite_ms",
            "rewrite_ms_per_1000_nodes", "apply_full_ms", "ort_cpu_session_ms"]  # fmt: skip
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) if isinstance(r[c], str | int) else f"{r[c]:.1f}"
                         for c in cols))  # fmt: skip
    info = {
        "host": platform.node(),
        "cpu_count": __import__("os").cpu_count(),
        "onnxruntime": ort.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
