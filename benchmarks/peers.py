"""Peer tools' FP16 answers for the real models, produced on CPU for a later GPU timing run.

Run (project venv): ``python benchmarks/peers.py --models ppocr_cls ppocr_rec ppocr_det minilm
--out-dir .gpu/peers``. Options: ``--peers`` (default all three), ``--data-dir`` (the ``.npz``
calibration files that ``benchmarks/prepare_gpu.py`` wrote, default ``.gpu/models``),
``--timeout`` (wall limit per conversion, default 600 s), ``--autocast-python`` (the
interpreter of a separate venv holding ``nvidia-modelopt[onnx]``, default
``/tmp/movenv/bin/python``), ``--name-nodes`` (``auto``: default, see below; ``all``;
``none``), ``--json`` (default
``benchmarks/results/peers_cpu.json``; rows for other (peer, model) pairs already there are
kept).

Peers, each run as it is with its documented defaults, on the very ``.npz`` feeds the GPU run
uses (48 crops for cls/rec, one 736x1472 page for det, 8x32 tokens for MiniLM), and on the
model as shipped, except that ``auto_mixed`` (which keys everything on node names) gets a copy
whose unnamed nodes (the Paddle exports' weight Constants) got unique names, nothing else
changed: as shipped, its block list holds ``""`` for all of them at once and its own Casts
collide (``two nodes with same node name (_output_cast0)``, an invalid model at its first
attempt). That as-shipped run is recorded too, as ``auto_mixed_shipped`` (only for models that
have unnamed nodes).

- ``whole_fp16``: onnxconverter-common ``float16.convert_float_to_float16(model,
  keep_io_types=True)``. It evaluates nothing: one candidate, recorded as 1 evaluation.
- ``auto_mixed``: onnxconverter-common ``auto_mixed_precision.auto_convert_mixed_precision(
  model, feeds, rtol=1e-2, atol=1e-3, keep_io_types=True)``. Evaluations = ONNX Runtime
  ``InferenceSession`` creations in its process (``__init__`` is wrapped with a counter, for
  measurement only; the count includes the sessions it uses to find missing dtypes), printed
  to stderr as they happen so a run killed at the wall limit still reports its count.
- ``autocast`` (``autocast_bf16``): NVIDIA ModelOpt AutoCast ``convert_to_mixed_precision(
  onnx_path=..., low_precision_type="fp16" ("bf16"), keep_io_types=True,
  calibration_data=<npz>)``, run with the
  interpreter of a separate venv so the project venv stays clean; its ``InferenceSession``
  creations and ``run`` calls are counted the same way.

Each conversion runs in its own subprocess; the wall time is that of the peer's call alone
(model already loaded, saving excluded) and the limit applies to that call. Each answer is
saved to ``<out-dir>/<peer>_<model>.onnx``; one above 45 MB (MiniLM) is also split into two
byte halves ``.gpu/peers_<model>/<peer>_<model>.onnx.part0`` / ``.part1`` so that each can be
carried alone (join with ``cat``). Each answer is then checked here (project venv, ONNX Runtime
CPU): ``onnx.checker.check_model`` (and with ``full_check``), load and run at the default
optimization level and with optimizations disabled, relative L2 of all outputs together
against the original model's FP32 output at the default level (float64 math; inf if
non-finite), for AutoCast also a load and run in its own venv's ONNX Runtime at the default
level, and a precision census (Cast nodes, FP16/FP32 initializers and Constant values,
compute nodes whose float outputs are FP32 vs FP16, by shape inference) as the proxy for the
nodes kept in FP32. Logs of every subprocess lie in ``<out-dir>/logs``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PEERS = ("whole_fp16", "auto_mixed", "auto_mixed_shipped", "autocast", "autocast_bf16")
#: AutoCast's peers, by their low_precision_type (all run in AutoCast's own venv).
AUTOCAST = {"autocast": "fp16", "autocast_bf16": "bf16"}
MODELS = ("ppocr_cls", "ppocr_rec", "ppocr_det", "minilm", "layout_picodet", "demo22")
SPLIT_BYTES = 45_000_000
PEER_CALLS = {
    "whole_fp16": "onnxconverter_common.float16.convert_float_to_float16(model, "
    "keep_io_types=True)",
    "auto_mixed": "onnxconverter_common.auto_mixed_precision.auto_convert_mixed_precision("
    "model, feeds, rtol=1e-2, atol=1e-3, keep_io_types=True)",
    "auto_mixed_shipped": "the same call as auto_mixed, on the model as shipped (unnamed nodes)",
    "autocast": "modelopt.onnx.autocast.convert_to_mixed_precision(onnx_path=..., "
    "low_precision_type='fp16', keep_io_types=True, calibration_data=<npz>)",
    "autocast_bf16": "modelopt.onnx.autocast.convert_to_mixed_precision(onnx_path=..., "
    "low_precision_type='bf16', keep_io_types=True, calibration_data=<npz>)",
}
MARK = "[peers]"
COUNT_RE = re.compile(r"^\[peers\] sessions=(\d+) runs=(\d+)", re.M)
START_RE = re.compile(r"^\[peers\] start (\d+\.\d+)", re.M)


# ------------------------------------------------------------------------------------------
# Child: one peer on one model, in its own process
# ------------------------------------------------------------------------------------------


class _DropLists:
    """A stdout that drops auto_mixed's per-attempt node lists (lines starting with '[')."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.buf = ""

    def write(self, text: str) -> int:
        self.buf += text
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            if not line.startswith("["):
                self.sink.write(line[:100_000] + "\n")
        return len(text)

    def flush(self) -> None:
        self.sink.flush()


def _install_counters() -> dict[str, int]:
    """Counts ``InferenceSession`` creations and ``run`` calls; reports each to stderr."""
    import onnxruntime as ort

    counts = {"sessions": 0, "runs": 0}
    init, run = ort.InferenceSession.__init__, ort.InferenceSession.run

    def report() -> None:
        sys.stderr.write(
            f"{MARK} sessions={counts['sessions']} runs={counts['runs']} t={time.time():.3f}\n"
        )
        sys.stderr.flush()

    def counting_init(self: Any, *args: Any, **kwargs: Any) -> None:
        counts["sessions"] += 1
        report()
        init(self, *args, **kwargs)

    def counting_run(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts["runs"] += 1
        report()
        return run(self, *args, **kwargs)

    ort.InferenceSession.__init__ = counting_init  # type: ignore[method-assign]
    ort.InferenceSession.run = counting_run  # type: ignore[method-assign]
    return counts


def ortcheck(args: argparse.Namespace) -> int:
    """Loads and runs a model in this interpreter's ONNX Runtime (default level); prints JSON."""
    import onnxruntime as ort

    res: dict[str, Any] = {"onnxruntime": ort.__version__}
    try:
        sess = ort.InferenceSession(args.ortcheck, providers=["CPUExecutionProvider"])
        sess.run(None, {k: v for k, v in np.load(args.npz).items()})
        res["loads_runs"] = True
    except Exception as exc:
        res["loads_runs"] = False
        res["error"] = str(exc).strip().splitlines()[0][:500]
    print(json.dumps(res))
    return 0


def tool_env_check(python: str, path: Path, npz: Path) -> dict[str, Any]:
    """:func:`ortcheck` run with the tool's own interpreter (its ONNX Runtime version)."""
    cmd = [python, str(Path(__file__).resolve()), "--ortcheck", str(path), "--npz", str(npz)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(ROOT))
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception as exc:
        return {"loads_runs": None, "error": f"check failed: {exc}"[:500]}


def child(args: argparse.Namespace) -> int:
    """Runs one peer; writes the answer and a status JSON (the parent reads both)."""
    import onnx

    status: dict[str, Any] = {"peer": args.child, "python": sys.version.split()[0]}
    counts = _install_counters()
    with contextlib.suppress(Exception):
        import onnxruntime as ort

        status["onnxruntime"] = ort.__version__
    status["onnx"] = onnx.__version__
    feeds = {k: v for k, v in np.load(args.npz).items()}
    model = None
    if args.child not in AUTOCAST:
        model = onnx.load(args.model)
    out_model = None
    log_out = open(args.stdout_log, "w", encoding="utf-8", buffering=1)  # noqa: SIM115
    t0 = time.perf_counter()
    sys.stderr.write(f"{MARK} start {time.time():.3f}\n")
    sys.stderr.flush()
    try:
        with contextlib.redirect_stdout(_DropLists(log_out)):
            if args.child == "whole_fp16":
                from onnxconverter_common import float16

                status["tool_version"] = _version("onnxconverter-common")
                out_model = float16.convert_float_to_float16(model, keep_io_types=True)
            elif args.child in ("auto_mixed", "auto_mixed_shipped"):
                from onnxconverter_common import auto_mixed_precision

                status["tool_version"] = _version("onnxconverter-common")
                out_model = auto_mixed_precision.auto_convert_mixed_precision(
                    model, feeds, rtol=1e-2, atol=1e-3, keep_io_types=True
                )
            elif args.child in AUTOCAST:
                from modelopt.onnx.autocast import convert_to_mixed_precision

                status["tool_version"] = _version("nvidia-modelopt")
                out_model = convert_to_mixed_precision(
                    onnx_path=args.model,
                    low_precision_type=AUTOCAST[args.child],
                    keep_io_types=True,
                    calibration_data=args.npz,
                )
            else:
                raise ValueError(f"unknown peer {args.child}")
        status["wall_s"] = time.perf_counter() - t0
    except BaseException as exc:  # the tool's own failure is a result
        status["wall_s"] = time.perf_counter() - t0
        status["error"] = f"{type(exc).__name__}: {str(exc)[:1500]}"
        status["traceback_tail"] = traceback.format_exc()[-3000:]
    finally:
        log_out.close()
    status.update(counts)
    if out_model is not None:
        onnx.save(out_model, args.out)
        status["saved"] = args.out
    Path(args.status).write_text(json.dumps(status, indent=1), encoding="utf-8")
    return 0


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------
# Parent: run the children under a wall limit, check their answers
# ------------------------------------------------------------------------------------------


def run_peer(
    peer: str, name: str, model_path: Path, npz: Path, out: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Runs one peer's child process, killed ``args.timeout`` s after the peer's call began."""
    logs = out.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    status_path = logs / f"{peer}_{name}.status.json"
    err_path = logs / f"{peer}_{name}.stderr"
    out_log = logs / f"{peer}_{name}.stdout"
    for p in (status_path, out):
        p.unlink(missing_ok=True)
    python = args.autocast_python if peer in AUTOCAST else sys.executable
    row: dict[str, Any] = {"peer": peer, "model": name, "call": PEER_CALLS[peer]}
    if not Path(python).exists():
        row.update(answer=False, error=f"interpreter {python} not found (install failed?)")
        return row
    cmd = [python, str(Path(__file__).resolve()), "--child", peer, "--model", str(model_path),
           "--npz", str(npz), "--out", str(out), "--status", str(status_path),
           "--stdout-log", str(out_log)]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t_spawn = time.time()
    timed_out = False
    with open(err_path, "w", encoding="utf-8") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=err, env=env, cwd=str(ROOT))
        started: float | None = None
        while proc.poll() is None:
            time.sleep(1.0)
            if started is None:
                m = START_RE.search(err_path.read_text(encoding="utf-8", errors="replace"))
                started = float(m.group(1)) if m else None
            limit_from = started if started is not None else t_spawn
            if time.time() - limit_from > args.timeout + (0 if started else 120):
                timed_out = True
                proc.kill()
                proc.wait()
                break
    row["process_s"] = time.time() - t_spawn
    row["returncode"] = proc.returncode
    err_text = err_path.read_text(encoding="utf-8", errors="replace")
    counts = COUNT_RE.findall(err_text)
    sessions, runs = (int(counts[-1][0]), int(counts[-1][1])) if counts else (0, 0)
    stdout_text = out_log.read_text(encoding="utf-8", errors="replace") if out_log.exists() else ""
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    for key in ("python", "onnxruntime", "onnx", "tool_version", "error", "traceback_tail"):
        if key in status:
            row[key if key not in ("onnxruntime", "onnx") else f"tool_env_{key}"] = status[key]
    row["ort_sessions"] = sessions
    row["ort_runs"] = runs
    if timed_out:
        m = START_RE.search(err_text)
        row["wall_s"] = time.time() - float(m.group(1)) if m else None
        row["answer"] = False
        row["error"] = f"no answer within {args.timeout:g} s (killed)"
    else:
        row["wall_s"] = status.get("wall_s")
        row["answer"] = bool(status.get("saved")) and out.exists()
        if not status:
            row["error"] = "child died without a status: " + err_text[-1500:]
    if peer == "whole_fp16":
        row["evaluations"] = 1
        row["evaluations_note"] = "one candidate; the tool runs no model evaluation itself"
    elif peer.startswith("auto_mixed"):
        row["evaluations"] = sessions
        row["attempts"] = stdout_text.count("Running attempt")
        m = re.search(r"Adding missing dtypes for (\d+) outputs", stdout_text)
        if m:  # one reference session, ceil(n/100) dtype sessions, then one per attempt
            row["attempts_started"] = sessions - 1 - -(-int(m.group(1)) // 100)
        row["evaluations_note"] = (
            "ONNX Runtime sessions created (= its attempts + its final validation + the "
            "reference and missing-dtype sessions); each session runs the whole feed once"
        )
        done = next((ln for ln in stdout_text.splitlines() if ln.startswith("Done:")), None)
        if done is not None:
            import ast

            blocked = ast.literal_eval(done[len("Done:") :].strip())
            row["tool_blocked_nodes"] = len(blocked)
            row["tool_blocked_unnamed"] = sum(1 for b in blocked if not b)
            row["tool_blocked_names"] = blocked[:200]
    else:
        row["evaluations"] = runs if sessions else "n/a"
        row["evaluations_note"] = (
            f"ONNX Runtime InferenceSession.run calls in the tool's process ({sessions} "
            "session(s)): its reference runner (Polygraphy, every tensor marked as an output) "
            "splits the .npz into batch-1 samples and runs each once"
        )
        row.update(_autocast_summary(stdout_text + "\n" + err_text))
    tail = [ln for ln in err_text.splitlines() if not ln.startswith(MARK)]
    row["stderr_tail"] = "\n".join(tail[-15:])[-2000:]
    return row


def _autocast_summary(text: str) -> dict[str, Any]:
    """AutoCast's own log lines about nodes kept in high precision (if it printed any)."""
    pattern = re.compile(r"(?i)high precision|low precision|fp32|blocked|converted")
    keep = [ln.strip()[:300] for ln in text.splitlines() if pattern.search(ln)]
    return {"tool_log_lines": keep[-20:]} if keep else {}


def precision_census(model: Any) -> dict[str, Any]:
    """Counts Casts, FP16/FP32 weights and compute nodes by the dtype of their float outputs."""
    import onnx
    from onnx import TensorProto

    fp32, fp16 = TensorProto.FLOAT, TensorProto.FLOAT16
    res: dict[str, Any] = {}
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:
        res["shape_inference_error"] = str(exc).splitlines()[0][:300]
    g = model.graph
    types: dict[str, int] = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        types[vi.name] = vi.type.tensor_type.elem_type
    weights = {"fp32": 0, "fp16": 0, "fp32_elems": 0, "fp16_elems": 0}

    def weight(t: Any) -> None:
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        if t.data_type == fp32:
            weights["fp32"] += 1
            weights["fp32_elems"] += n
        elif t.data_type == fp16:
            weights["fp16"] += 1
            weights["fp16_elems"] += n

    for t in g.initializer:
        types[t.name] = t.data_type
        weight(t)
    casts = {"to_fp16": 0, "to_fp32": 0, "other": 0}
    compute = {"fp16": 0, "fp32": 0, "non_float": 0, "unknown": 0}
    fp32_ops: dict[str, int] = {}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
                    weight(a.t)
            continue
        if n.op_type == "Cast":
            to = next((a.i for a in n.attribute if a.name == "to"), None)
            casts["to_fp16" if to == fp16 else "to_fp32" if to == fp32 else "other"] += 1
            continue
        out_types = [types.get(o) for o in n.output if o]
        if fp16 in out_types:
            compute["fp16"] += 1
        elif fp32 in out_types:
            compute["fp32"] += 1
            fp32_ops[n.op_type] = fp32_ops.get(n.op_type, 0) + 1
        elif any(t in (None, 0) for t in out_types):
            compute["unknown"] += 1
        else:
            compute["non_float"] += 1
    res.update(
        nodes=len(g.node),
        casts=casts,
        weights=weights,
        compute_nodes_by_output_dtype=compute,
        fp32_compute_ops=dict(sorted(fp32_ops.items(), key=lambda kv: -kv[1])),
    )
    return res


def rel_l2(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    """Relative L2 of all outputs together (float64); inf if anything is non-finite."""
    num = den = 0.0
    for g, r in zip(got, ref, strict=True):
        a, b = np.asarray(g, np.float64), np.asarray(r, np.float64)
        if a.shape != b.shape or not np.isfinite(a).all():
            return float("inf")
        num += float(np.sum((a - b) ** 2))
        den += float(np.sum(b**2))
    return (num / den) ** 0.5 if den > 0 else float("inf")


def ort_run(path: Path, feeds: dict[str, np.ndarray], optimize: bool) -> list[np.ndarray]:
    """Runs a model file once on ONNX Runtime CPU (default level, or optimizations off)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return sess.run(names, feeds)


def check_answer(path: Path, feeds: dict[str, np.ndarray], ref: list[np.ndarray]) -> dict:
    """Checker, ONNX Runtime CPU load/run at both levels, deviation, precision census."""
    import onnx

    res: dict[str, Any] = {"bytes": path.stat().st_size}
    for full in (False, True):
        key = "onnx_check_full" if full else "onnx_check"
        try:
            onnx.checker.check_model(str(path), full_check=full)
            res[key] = True
        except Exception as exc:
            res[key] = False
            res[key + "_error"] = str(exc).strip().splitlines()[0][:400]
    for optimize, key in ((True, "cpu_default"), (False, "cpu_opt_disabled")):
        t0 = time.perf_counter()
        try:
            outs = ort_run(path, feeds, optimize)
            per_output = [rel_l2([o], [r]) for o, r in zip(outs, ref, strict=True)]
            res[key] = {"loads_runs": True, "rel_l2": rel_l2(outs, ref),
                        "per_output_rel_l2": per_output,
                        "seconds": time.perf_counter() - t0}  # fmt: skip
        except Exception as exc:
            res[key] = {"loads_runs": False, "rel_l2": None,
                        "error": str(exc).strip().splitlines()[0][:500]}  # fmt: skip
    res["census"] = precision_census(onnx.load(str(path)))
    return res


def split_halves(path: Path, name: str, peer: str) -> list[str]:
    """Writes the file's two byte halves under ``.gpu/peers_<model>/`` (beside out-dir)."""
    data = path.read_bytes()
    half = len(data) // 2
    folder = path.parent.parent / f"peers_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, chunk in enumerate((data[:half], data[half:])):
        p = folder / f"{peer}_{name}.onnx.part{i}"
        p.write_bytes(chunk)
        parts.append(str(p))
    return parts


def count_unnamed(path: Path) -> int:
    """How many nodes of the model have no name."""
    import onnx

    return sum(1 for n in onnx.load(str(path)).graph.node if not n.name)


def name_nodes(src: Path, dst: Path) -> Path:
    """A copy of the model whose unnamed nodes got unique names (nothing else changes)."""
    import onnx

    m = onnx.load(str(src))
    used = {n.name for n in m.graph.node if n.name}
    for i, n in enumerate(m.graph.node):
        if not n.name:
            cand = f"{n.op_type}_{i}"
            while cand in used:
                cand += "_"
            n.name = cand
            used.add(cand)
    onnx.save(m, str(dst))
    return dst


def write_json(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Merges rows into the results file (rows for other (peer, model) pairs are kept)."""
    old: list[dict[str, Any]] = []
    if path.exists():
        with contextlib.suppress(Exception):
            old = json.loads(path.read_text())["rows"]
    keys = {(r["peer"], r["model"]) for r in rows}
    merged = [r for r in old if (r["peer"], r["model"]) not in keys] + rows
    order = {p: i for i, p in enumerate(PEERS)}
    mo = {m: i for i, m in enumerate(MODELS)}
    merged.sort(key=lambda r: (mo.get(r["model"], 9), order.get(r["peer"], 9)))
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"meta": meta, "rows": merged}, indent=1, default=str)
    path.write_text(text.replace("Infinity", '"inf"') + "\n", encoding="utf-8")


def summary_line(r: dict[str, Any]) -> str:
    c = r.get("check", {})
    d = c.get("cpu_default", {})
    dz = c.get("cpu_opt_disabled", {})
    comp = c.get("census", {}).get("compute_nodes_by_output_dtype", {})
    wall = r.get("wall_s")
    return (f"{r['peer']:11s} {r['model']:10s} wall={wall if wall is None else round(wall, 1)}s "
            f"evals={r.get('evaluations')} answer={r.get('answer')} "
            f"check={c.get('onnx_check')} default={d.get('loads_runs')} "
            f"dev={d.get('rel_l2')} optoff_dev={dz.get('rel_l2')} fp32_nodes={comp.get('fp32')} "
            f"err={str(r.get('error'))[:120]}")  # fmt: skip


def _demo22(folder: Path) -> tuple[Path, Path]:
    """The demo model at opset 22 and its data (what ``gpu_bf16.py`` builds on the device)."""
    import onnx

    from amp_search.demo import build_demo_model, demo_data

    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(build_demo_model(opset=22), folder / "demo22.onnx")
    np.savez(folder / "demo22.npz", **{k: v[0] for k, v in demo_data().items()})  # one batch
    return folder / "demo22.onnx", folder / "demo22.npz"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    ap.add_argument("--out-dir", default=str(ROOT / ".gpu" / "peers"))
    ap.add_argument("--data-dir", default=str(ROOT / ".gpu" / "models"))
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--autocast-python", default="/tmp/movenv/bin/python")
    ap.add_argument("--name-nodes", choices=("auto", "all", "none"), default="auto")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "peers_cpu.json"))
    # child mode (internal)
    ap.add_argument("--child", choices=PEERS, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--npz", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--status", help=argparse.SUPPRESS)
    ap.add_argument("--stdout-log", help=argparse.SUPPRESS)
    ap.add_argument("--ortcheck", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ortcheck:
        return ortcheck(args)
    if args.child:
        return child(args)

    import onnxruntime as ort

    sys.path.insert(0, str(ROOT))
    from amp_search.testing import realmodels

    out_dir = Path(args.out_dir).resolve()
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    meta = {
        "what": "peer tools' FP16 answers for the real models, produced and checked on CPU",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "python": sys.version.split()[0],
        "onnxruntime_check": ort.__version__,
        "onnxconverter_common": _version("onnxconverter-common"),
        "autocast_python": args.autocast_python,
        "timeout_s": args.timeout,
        "calls": PEER_CALLS,
        "models_input": {
            "auto": "as shipped, except auto_mixed: unnamed nodes named (auto_mixed_shipped: "
            "as shipped)",
            "all": "unnamed nodes named for every peer",
            "none": "as shipped for every peer",
        }[args.name_nodes],
        "feeds": "the .npz in --data-dir, the GPU run's inputs",
        "wall_s": "the peer's call only (model loaded, saving excluded), 2 shared CPU cores",
        "deviation": "relative L2 of all outputs together vs the original FP32 model on ONNX "
        "Runtime CPU at the default optimization level, float64; cpu_opt_disabled keeps the "
        "inserted Casts (FP16 storage emulated)",
        "fp32_kept_proxy": "census.compute_nodes_by_output_dtype.fp32: non-Cast, non-Constant "
        "nodes whose float outputs are FP32 after shape inference",
    }
    rows: list[dict[str, Any]] = []
    for name in args.models:
        if name == "demo22":  # the demo at opset 22 (benchmarks/gpu_bf16.py), built here
            src, npz = _demo22(out_dir / "logs")
        else:
            src, npz = Path(realmodels.fetch(name)), Path(args.data_dir) / f"{name}.npz"
        unnamed = count_unnamed(src)
        named = src
        if unnamed and args.name_nodes != "none":
            named = name_nodes(src, out_dir / "logs" / f"{name}_named.onnx")
        feeds = {k: v for k, v in np.load(npz).items()}
        ref = ort_run(src, feeds, optimize=True)
        print(f"{name}: {src} ({src.stat().st_size} bytes), feeds "
              f"{ {k: v.shape for k, v in feeds.items()} }", flush=True)  # fmt: skip
        for peer in args.peers:
            if peer == "auto_mixed_shipped" and not unnamed:
                continue  # identical to auto_mixed
            use_named = args.name_nodes == "all" or (
                args.name_nodes == "auto" and peer == "auto_mixed"
            )
            model_path = named if use_named else src
            out = out_dir / f"{peer}_{name}.onnx"
            for stale in (out_dir.parent / f"peers_{name}").glob(f"{peer}_{name}.onnx.part*"):
                stale.unlink()
            row = run_peer(peer, name, model_path, npz, out, args)
            row["model_path"] = str(model_path)
            renamed = f"{unnamed} unnamed nodes given unique names"
            row["model_input"] = renamed if model_path != src else "as shipped"
            row["npz"] = str(npz)
            row["feeds"] = {k: list(v.shape) for k, v in feeds.items()}
            if row.get("answer"):
                row["output"] = str(out)
                row["check"] = check_answer(out, feeds, ref)
                if peer in AUTOCAST:  # its venv's ONNX Runtime, default optimization level
                    row["check"]["tool_env_ort_default"] = tool_env_check(
                        args.autocast_python, out, npz
                    )
                if out.stat().st_size > SPLIT_BYTES:
                    row["output_parts"] = split_halves(out, name, peer)
            rows.append(row)
            print(summary_line(row), flush=True)
            write_json(Path(args.json), meta, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
