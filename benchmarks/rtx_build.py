"""Build every candidate ONNX of finished searches strongly typed with TensorRT(-RTX).

Usage: python benchmarks/rtx_build.py RESULTS_DIR [RESULTS_DIR ...] --out OUT.json

For each ``candidates/<digest>/model.onnx`` of each results directory: parse and build it
with the TensorRT backend (``module`` auto: ``tensorrt`` if importable, else
``tensorrt_rtx``; strongly typed; builder optimization level 0 as a search would use), with
the calibration batch's shapes, and record success, build seconds, engine size, and the
layer precisions the engine inspector reports (TensorRT-RTX cannot deserialize engines on
an H100/H200, so there the inspector's answer is recorded as unavailable, with its reason).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amp_search.backends import BuildConfig, get_backend  # noqa: E402
from amp_search.errors import AmpSearchError  # noqa: E402


def _shapes(res: Path) -> dict[str, list[int]] | None:
    """The calibration batch's input shapes, from the search's risk report data."""
    import numpy as np

    run = json.loads((res / "run.json").read_text())
    for npz in (
        Path(str(run.get("model", ""))).with_suffix(".npz"),
        res.parent / f"{res.name}.npz",
    ):
        if npz.is_file():
            import onnx

            with np.load(npz) as z:
                shapes = {k: list(z[k].shape) for k in z.files}
            # a stack of batches (the demo's npz) gives one batch's shape: drop the stack axis
            graph = onnx.load(str(run["model"]), load_external_data=False).graph
            ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in graph.input}
            return {k: s[1:] if len(s) == ranks.get(k, len(s)) + 1 else s
                    for k, s in shapes.items()}  # fmt: skip
    return None


def build_one(job: tuple[str, str, dict[str, list[int]] | None, int]) -> dict[str, object]:
    """Builds one candidate (runs in a worker process)."""
    model_name, path_str, shapes, level = job
    path = Path(path_str)
    backend = get_backend("tensorrt")
    opts: dict[str, object] = {"builder_optimization_level": level, "module": "auto"}
    if shapes:
        opts["shapes"] = shapes
    t0 = time.perf_counter()
    row: dict[str, object] = {"model": model_name, "candidate": path.parent.name}
    try:
        cand = backend.build(path, BuildConfig("cuda", opts))
        row.update(
            ok=True,
            seconds=round(time.perf_counter() - t0, 3),
            engine_bytes=cand.artifacts["engine"].stat().st_size,
            module=cand.info.get("module"),
            layer_precisions=cand.info.get("layer_precisions"),
            layer_info_error=cand.info.get("layer_info_error"),
        )
    except AmpSearchError as exc:
        row.update(ok=False, seconds=round(time.perf_counter() - t0, 3), error=str(exc))
    return row


def main() -> int:
    from concurrent.futures import ProcessPoolExecutor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--level", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="candidates per model (0: all)")
    ap.add_argument("--jobs", type=int, default=1, help="builds in parallel")
    args = ap.parse_args()
    jobs = []
    for res in map(Path, args.results):
        shapes = _shapes(res)
        cands = sorted((res / "candidates").glob("*/model.onnx"))
        if args.limit:
            cands = cands[: args.limit]
        label = (
            res.name if res.name not in ("fp16", "fp16_bf16") else f"{res.parent.name}/{res.name}"
        )
        jobs += [(label, str(p), shapes, args.level) for p in cands]
    rows = []
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for row in pool.map(build_one, jobs):
            rows.append(row)
            print(row["model"], row["candidate"], row["ok"], row["seconds"],
                  str(row.get("error", ""))[:200], flush=True)  # fmt: skip
    Path(args.out).write_text(json.dumps(rows, indent=2, default=str))
    ok = sum(bool(r["ok"]) for r in rows)
    print(f"{ok}/{len(rows)} candidates built")
    return 0


if __name__ == "__main__":
    sys.exit(main())
