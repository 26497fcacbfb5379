"""Where a model's latency sits in its recurrent and fused nodes, and whether FP16 there pays.

Issue 12 asks, on the GPU, for the share of latency in recurrent/fused units and whether FP16
there pays. The "recurrent or fused" nodes are LSTM, GRU and RNN, and every node of the
``com.microsoft`` domain (ONNX Runtime's fused transformer ops: Attention,
SkipLayerNormalization, FastGelu, BiasGelu, ...). Two views, one command per side:

``--prepare MODELS_DIR PEERS_DIR [--models a,b]`` (CPU; here, or on the GPU machine when the
files would not fit the carry) reads ``<model>.onnx``/``<model>.npz`` (``prepare_gpu.py``'s
files; also looked for in MODELS_DIR's sibling folders) as the search sees the model (load,
sanitize, units; declared shapes that one FP32 run contradicts relaxed, as the search does),
and writes:

1. the model in context, two variants from the project's own rewriter for ``gpu_timing.py
   --peers PEERS_DIR`` to refine beside all-FP32 and all-FP16 (paired, interval-bounded):
   ``recfp16_<model>.onnx`` (only the units holding a recurrent/fused node FP16) and
   ``allbutrec_<model>.onnx`` (every unit FP16 except those);
2. each recurrent/fused node alone, in ``PEERS_DIR/recurrent/<model>/``: the node extracted
   with its weights (``onnx.utils.Extractor``) as ``nodeK_<op>_fp32.onnx``, its FP16 rewrite
   (``_fp16``: FP32 inputs and outputs, Casts at the edges, as the node runs when it alone
   is FP16) and the same without the edge Casts (``_fp16io``: FP16 in and out, the node's
   own kernel), ``nodeK.npz`` with its real input and output tensors from a strict FP32 run
   of the whole model (ONNX Runtime CPU) on every calibration batch, and ``manifest.json``.

Sizes are printed: one device call carries the repository plus at most 64 MiB. Silero VAD's
files (2.4 MiB) carry easily; ddddocr's (78 MiB of variants, 34 MiB of node) and a fused
MiniLM's do not, so run ``--prepare`` for them on the GPU machine itself (it needs only onnx,
ONNX Runtime's CPU EP and numpy; about 15 s for ddddocr here on 2 cores), writing to /tmp
there, from the models ``prepare_gpu.py`` carried.

``MODELS_DIR PEERS_DIR OUT [--models a,b] [--device cuda]`` (the GPU machine: ONNX Runtime
CUDA EP, default options, CUDA graphs on as the search times) builds, per model, the whole
all-FP32 model as the search's resident reference (``ResidentReference``: settled, its level
measured), opens every node variant, measures each one's deviation on its captured inputs
against the strict FP32 outputs, and times with ``amp_search.timing.PairedTiming`` (windows
interleaved A B A B, 95% bootstrap intervals, retaken under a low SM clock), in interleaved
rounds as ``refine`` does:

- node FP32 paired with the whole FP32 model: the ratio *is* the node's share of the model's
  latency, with its interval;
- node FP16 (and FP16-IO) paired with node FP32: its FP16/FP32 ratio, with its interval;
- a one-Identity model paired with the whole model: the per-call floor (a standalone node
  pays a session call and a graph launch the node inside the model does not), so a share
  can be read less that floor. The saving estimate, count x share x (1 - FP16/FP32 ratio),
  needs no floor: it cancels in the difference.

Nodes of one signature (op, attributes, input shapes and types) run the same kernels, so only
the first of each is timed (``--time-all``: every one); every node's deviation is measured.
``OUT/gpu_recurrent_<model>.json`` is written after each stage of each model (the machine can
be taken back mid-call). ``--device cpu`` runs the same on ONNX Runtime CPU to try the
script: its figures are marked as CPU figures and say nothing about a GPU (ONNX Runtime CPU
computes FP16 nodes in FP32 behind casts).

``--report OUT`` prints the Markdown tables for ``benchmarks/RESULTS.md``, with the refined
speedups of ``recfp16_``/``allbutrec_``/all-FP16 from ``OUT/gpu_timing_<model>_x1.json``
beside the estimate where ``gpu_timing.py`` wrote them to the same OUT.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from benchmarks._common import rel_l2  # noqa: E402

RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})
FUSED_DOMAIN = "com.microsoft"
MODELS = "ddddocr_rec,silero_vad"
CARRY_MIB = 64
CPU_NOTE = ("CPU figures (ONNX Runtime CPU, FP16 nodes computed in FP32 behind casts): they "
            "try the script and say nothing about a GPU.")  # fmt: skip
_NP_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
             np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
             np.dtype(np.bool_): TensorProto.BOOL}  # fmt: skip


def is_target(node: onnx.NodeProto) -> bool:
    """Whether ``node`` is recurrent (LSTM/GRU/RNN) or an ONNX Runtime fused op."""
    if node.domain == FUSED_DOMAIN:
        return True
    return node.domain in ("", "ai.onnx") and node.op_type in RECURRENT_OPS


def _find(models_dir: Path, name: str, ext: str) -> Path:
    """``<name><ext>`` in ``models_dir``, else in one of its sibling folders (own carries)."""
    for folder in [models_dir, *sorted(p for p in models_dir.parent.iterdir() if p.is_dir())]:
        if (folder / f"{name}{ext}").is_file():
            return folder / f"{name}{ext}"
    raise FileNotFoundError(f"{name}{ext} not in {models_dir} nor beside it")


def _mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def _searched(models_dir: Path, name: str) -> tuple[onnx.ModelProto, Any, list[Any]]:
    """The model as the search prepares it (sanitized), its calibration data and units."""
    from amp_search.calibration import load_calibration, model_inputs
    from amp_search.graph import find_units, load_model, sanitize

    model = sanitize(load_model(_find(models_dir, name, ".onnx")))
    data = load_calibration(_find(models_dir, name, ".npz"), model_inputs(model))
    return model, data, find_units(model)


def _cpu_runner(model: onnx.ModelProto, tmp: Path, held: contextlib.ExitStack) -> Any:
    """An open ONNX Runtime CPU runner of ``model`` (strict FP32, optimizations off)."""
    from amp_search.backends import BuildConfig, get_backend
    from amp_search.graph import save_model

    backend = get_backend("onnxruntime")
    path = save_model(model, tmp / "capture.onnx")
    config = BuildConfig(device="cpu", options={"graph_optimization_level": "disable_all"})
    return held.enter_context(backend.open(backend.build(path, config)))


def capture(
    model: onnx.ModelProto, data: Any, keep: list[str], tmp: Path
) -> tuple[dict[str, tuple[int, ...]], list[dict[str, np.ndarray]]]:
    """One strict FP32 run with every tensor marked as an output (``mark_outputs``).

    Returns the shapes of every marked tensor on the first batch (what the search reconciles
    declared shapes with) and, per batch, the arrays of ``keep``.
    """
    from amp_search.graph._index import GraphIndex
    from amp_search.profiling.ranges import mark_outputs

    idx = GraphIndex.build(model)
    floats = [o for n in model.graph.node for o in n.output
              if o and idx.elem_type.get(o) == TensorProto.FLOAT]  # fmt: skip
    typed = [n for n in keep if idx.elem_type.get(n)]
    marked = mark_outputs(model, list(dict.fromkeys(floats + typed)), idx.elem_type)
    have = {o.name for o in marked.graph.output}
    for name in keep:  # no type known (a contrib op's output): ONNX Runtime infers it
        if name not in have:
            marked.graph.output.append(onnx.ValueInfoProto(name=name))
    shapes: dict[str, tuple[int, ...]] = {}
    kept: list[dict[str, np.ndarray]] = []
    with contextlib.ExitStack() as held:
        runner = _cpu_runner(marked, tmp, held)
        for b, batch in enumerate(data):
            got = runner.infer(batch)
            if b == 0:
                shapes = {k: tuple(np.shape(v)) for k, v in got.items()}
            kept.append({k: got[k] for k in keep})
    return shapes, kept


def _value_info(name: str, arrays: list[np.ndarray]) -> onnx.ValueInfoProto:
    """A typed value_info with the sizes every batch agrees on (others left free)."""
    first = arrays[0]
    dims: list[int | str] = [
        d if all(a.shape[k] == d for a in arrays) else f"{name}_dim{k}"
        for k, d in enumerate(first.shape)
    ]
    return helper.make_tensor_value_info(name, _NP_TYPES[first.dtype], dims)


def extract_node(
    model: onnx.ModelProto, node: onnx.NodeProto, batches: list[dict[str, np.ndarray]]
) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """``node`` alone with its weights (``onnx.utils.Extractor``), typed from the run.

    Returns the model, its inputs (the node's non-constant inputs) and outputs.
    """
    inits = {i.name for i in model.graph.initializer}
    ins = list(dict.fromkeys(x for x in node.input if x and x not in inits))
    outs = [y for y in node.output if y]
    src = onnx.ModelProto()
    src.CopyFrom(model)
    infos = {n: _value_info(n, [b[n] for b in batches]) for n in ins + outs}
    keep = [vi for vi in src.graph.value_info if vi.name not in infos]
    del src.graph.value_info[:]
    src.graph.value_info.extend([*keep, *infos.values()])
    for io in (src.graph.input, src.graph.output):  # the run's types and sizes win
        for vi in io:
            if vi.name in infos:
                vi.CopyFrom(infos[vi.name])
    sub = onnx.utils.Extractor(src).extract_model(ins, outs)
    sub.graph.name = f"{node.op_type}:{node.name}"
    return sub, ins, outs


def fp16_node(sub: onnx.ModelProto) -> onnx.ModelProto | None:
    """The project's all-FP16 rewrite of an extracted node (None: the node is no unit)."""
    from amp_search.graph import MixedPrecisionRewriter, find_units, sanitize

    model = sanitize(sub)
    units = find_units(model)
    if not units:
        return None
    rewriter = MixedPrecisionRewriter(model, units)
    return rewriter.apply(rewriter.all_fp16())[0]


def strip_edge_casts(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with FP16 graph inputs/outputs instead of the Casts at its edges.

    A graph input read only by a Cast to FP16 becomes an FP16 input; a graph output written by
    a Cast to FP32 of an FP16 tensor read by nothing else becomes that FP16 tensor.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inputs = {i.name: i for i in g.input}
    outputs = {o.name: o for o in g.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    producer = {y: n for n in g.node for y in n.output}
    drop: list[onnx.NodeProto] = []
    rename: dict[str, str] = {}

    def to(n: onnx.NodeProto) -> int:
        return next((a.i for a in n.attribute if a.name == "to"), -1)

    for n in g.node:
        if n.op_type != "Cast":
            continue
        src, dst = n.input[0], n.output[0]
        if src in inputs and to(n) == TensorProto.FLOAT16 and len(readers[src]) == 1:
            inputs[src].type.tensor_type.elem_type = TensorProto.FLOAT16
            rename[dst] = src
            drop.append(n)
        elif (dst in outputs and to(n) == TensorProto.FLOAT and src in producer
              and len(readers.get(src, [])) == 1 and src not in outputs):  # fmt: skip
            outputs[dst].type.tensor_type.elem_type = TensorProto.FLOAT16
            p = producer[src]
            p.output[list(p.output).index(src)] = dst
            drop.append(n)
    kept = [n for n in g.node if all(n is not d for d in drop)]
    for n in kept:
        for k, x in enumerate(n.input):
            if x in rename:
                n.input[k] = rename[x]
    del g.node[:]
    g.node.extend(kept)
    del g.value_info[:]
    return out


def _signature(node: onnx.NodeProto, arrays: dict[str, np.ndarray],
               model: onnx.ModelProto) -> str:  # fmt: skip
    """Op, attributes and the shapes/types of every input: equal signatures, equal kernels."""
    inits = {i.name: i for i in model.graph.initializer}
    shapes = []
    for x in node.input:
        if x in arrays:
            shapes.append(f"{arrays[x].dtype}{list(arrays[x].shape)}")
        elif x in inits:
            shapes.append(f"w{list(inits[x].dims)}:{inits[x].data_type}")
        else:
            shapes.append("-")
    attrs = sorted((a.name, str(helper.get_attribute_value(a))) for a in node.attribute)
    return json.dumps([node.domain, node.op_type, attrs, shapes])


def _check_variant(model: onnx.ModelProto, data: Any, ref: list[dict[str, np.ndarray]],
                   tmp: Path) -> float:  # fmt: skip
    """The variant's rel. L2 on ONNX Runtime CPU (the search's emulated FP16 storage)."""
    from amp_search.backends import BuildConfig, get_backend
    from amp_search.graph import save_model

    if all(o.domain in ("", "ai.onnx") for o in model.opset_import):
        onnx.checker.check_model(model, full_check=True)
    backend = get_backend("onnxruntime")
    path = save_model(model, tmp / "variant.onnx")
    with backend.open(backend.build(path, BuildConfig(device="cpu"))) as runner:
        got = [runner.infer(batch) for batch in data]
    return rel_l2(got, ref)


def prepare(name: str, models_dir: Path, peers_dir: Path, tmp: Path) -> dict[str, Any]:
    """Writes ``name``'s two variants and its extracted nodes (see the module docstring)."""
    from amp_search.graph import MixedPrecisionRewriter, reconcile_shapes, save_model
    from amp_search.types import PrecisionAssignment

    model, data, units = _searched(models_dir, name)
    targets = [n for n in model.graph.node if is_target(n)]
    if not targets:
        raise ValueError(f"{name} has no recurrent or com.microsoft node")
    inits = {i.name for i in model.graph.initializer}
    io = [x for n in targets for x in [*n.input, *n.output] if x and x not in inits]
    graph_outputs = [o.name for o in model.graph.output]
    shapes, batches = capture(model, data, list(dict.fromkeys(io + graph_outputs)), tmp)
    stale = reconcile_shapes(model, shapes)  # as the search does before any candidate
    names = {n.name for n in targets}
    rec_units = [u.name for u in units if names & set(u.nodes)]
    in_units = {n for u in units for n in u.nodes}
    all_units = [u.name for u in units]
    rewriter = MixedPrecisionRewriter(model, units)
    ref = [{k: b[k] for k in graph_outputs} for b in batches]
    doc: dict[str, Any] = {
        "model": name, "n_nodes": len(model.graph.node), "n_units": len(units),
        "recurrent_units": rec_units, "relaxed_shapes": stale,
        "not_units": sorted(names - in_units), "variants": {}, "nodes": [],
    }  # fmt: skip
    peers_dir.mkdir(parents=True, exist_ok=True)
    variants = [("recfp16", rec_units), ("allbutrec", set(all_units) - set(rec_units))]
    for label, fp16 in variants if rec_units else []:  # no such unit: both would be baselines
        variant = rewriter.apply(PrecisionAssignment.with_fp16(all_units, fp16))[0]
        path = save_model(variant, peers_dir / f"{label}_{name}.onnx")
        doc["variants"][label] = {
            "file": path.name, "fp16_units": len(fp16), "mib": round(_mib(path), 2),
            "cpu_rel_l2": _check_variant(variant, data, ref, tmp),
        }  # fmt: skip
    node_dir = peers_dir / "recurrent" / name
    node_dir.mkdir(parents=True, exist_ok=True)
    signatures: dict[str, str] = {}
    for k, node in enumerate(targets):
        sub, ins, outs = extract_node(model, node, batches)
        stem = f"node{k}_{node.op_type}"
        files = {"fp32": save_model(sub, node_dir / f"{stem}_fp32.onnx").name}
        half = fp16_node(sub) if node.name in in_units else None
        if half is not None:
            files["fp16"] = save_model(half, node_dir / f"{stem}_fp16.onnx").name
            files["fp16io"] = save_model(strip_edge_casts(half),
                                         node_dir / f"{stem}_fp16io.onnx").name  # fmt: skip
        arrays = {f"b{b}_x{i}": batch[x] for b, batch in enumerate(batches)
                  for i, x in enumerate(ins)}  # fmt: skip
        arrays.update({f"b{b}_y{j}": batch[y] for b, batch in enumerate(batches)
                       for j, y in enumerate(outs)})  # fmt: skip
        np.savez(node_dir / f"node{k}.npz", **arrays)  # type: ignore[arg-type]
        sig = _signature(node, batches[0], model)
        rep = signatures.setdefault(sig, node.name)
        n_weights = sum(int(np.prod(i.dims)) for i in sub.graph.initializer
                        if i.data_type == TensorProto.FLOAT)  # fmt: skip
        doc["nodes"].append({
            "index": k, "name": node.name, "op_type": node.op_type, "domain": node.domain,
            "unit": next((u.name for u in units if node.name in u.nodes), None),
            "inputs": ins, "outputs": outs, "files": files, "data": f"node{k}.npz",
            "n_batches": len(batches), "float_weights": n_weights, "same_as": rep,
            "fp16_reason": None if half is not None else "not a unit in this branch",
            "input_shapes": [list(batches[0][x].shape) for x in ins],
        })  # fmt: skip
    for n in doc["nodes"]:
        n["count"] = sum(1 for m in doc["nodes"] if m["same_as"] == n["name"])
    doc["nodes_mib"] = round(_mib(node_dir), 2)
    (node_dir / "manifest.json").write_text(json.dumps(doc, indent=2))
    return doc


# --- the GPU side -------------------------------------------------------------------------


def _feeds(path: Path, npz: Any, names: list[str], n: int) -> list[dict[str, np.ndarray]]:
    """The ``n`` captured batches of inputs, cast to the types the model's inputs declare."""
    model = onnx.load(str(path), load_external_data=False)
    want = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    half = {x for x in names if want.get(x) == TensorProto.FLOAT16}
    return [
        {x: (npz[f"b{b}_x{i}"].astype(np.float16) if x in half else npz[f"b{b}_x{i}"])
         for i, x in enumerate(names)}
        for b in range(n)
    ]  # fmt: skip


def _identity_model(name: str, a: np.ndarray, opset: int) -> onnx.ModelProto:
    """One Identity of a tensor like ``a``: what a standalone call costs around any node."""
    from amp_search.testing.graphs import tiny_model  # its IR version ONNX Runtime reads

    vi = helper.make_tensor_value_info("x", _NP_TYPES[a.dtype], list(a.shape))
    vo = helper.make_tensor_value_info("y", _NP_TYPES[a.dtype], list(a.shape))
    node = helper.make_node("Identity", ["x"], ["y"], name=f"floor_{name}")
    return tiny_model([node], [vi], [vo], opset=opset)


def _ratio(stats: Any) -> list[float] | None:
    if stats is None or stats.ratio is None:
        return None
    return [stats.ratio, stats.ratio_low, stats.ratio_high]


def measure_model(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Times one model's nodes against the whole model on the device (module docstring)."""
    from amp_search.backends import BuildConfig, get_backend
    from amp_search.graph import reconcile_shapes, save_model
    from amp_search.search.evaluate import ResidentReference, local_failure
    from amp_search.timing import PairedTiming, Step, TimingPlan, nvml_clock

    models_dir, peers_dir = Path(args.paths[0]), Path(args.paths[1])
    node_dir = peers_dir / "recurrent" / name
    manifest = json.loads((node_dir / "manifest.json").read_text())
    work = Path(args.work) / name
    work.mkdir(parents=True, exist_ok=True)
    backend = get_backend("onnxruntime")
    config = BuildConfig(device=args.device)
    plan = TimingPlan(target=args.target, min_pairs=2, max_pairs=args.pairs,
                      max_time_s=args.max_time_s)  # fmt: skip
    clock = nvml_clock(config.device_id) if config.device_type == "cuda" else None
    model, data, _ = _searched(models_dir, name)
    graph_outputs = [o.name for o in model.graph.output]
    shapes, _ = capture(model, data, graph_outputs, work)
    reconcile_shapes(model, shapes)
    doc: dict[str, Any] = {
        "model": name, "device": args.device, "identity": backend.identity(config),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "notes": [CPU_NOTE] if config.device_type == "cpu" else [],
        "timing": {"pairs": args.pairs, "rounds": args.rounds, "target": args.target,
                   "max_time_s": args.max_time_s},
        "not_units": manifest.get("not_units", []), "nodes": [],
    }  # fmt: skip
    path = out / f"gpu_recurrent_{name}.json"

    def save() -> None:
        path.write_text(json.dumps(doc, indent=2, default=str))

    t0 = time.perf_counter()
    timings: list[tuple[dict[str, Any], str, PairedTiming]] = []
    with contextlib.ExitStack() as held:
        resident = ResidentReference(
            backend, config, work / "fp32" / "model.onnx", model, data.first(), plan, clock
        )
        held.enter_context(contextlib.closing(resident))
        resident.open()  # settled, its level measured: the scale every share is read on
        assert resident.level is not None and resident.step is not None
        doc["full_fp32"] = {"ms": resident.level.median_ms, "low_ms": resident.level.low_ms,
                            "high_ms": resident.level.high_ms,
                            "execution": resident.execution}  # fmt: skip
        save()

        def open_step(file: Path, npz: Any, ins: list[str], n: int) -> tuple[Any, Step]:
            cfg = config
            if config.device_type == "cpu" and file.stem.endswith("_fp16io"):
                # The CPU backend's FP16-storage twin expects FP32 graph inputs; without it
                # ONNX Runtime CPU inserts its own Casts around the FP16 node.
                cfg = BuildConfig(device="cpu", options={"emulate_fp16_storage": 0})
            cand = backend.build(file, cfg)
            runner = held.enter_context(backend.open(cand))
            feeds = _feeds(file, npz, ins, n)
            outs = [runner.infer(f) for f in feeds]
            runner.bind(feeds[0])
            return (outs, runner), Step(runner.run_once, runner.timer())

        first_node = manifest["nodes"][0]
        with np.load(node_dir / first_node["data"]) as npz:
            x0 = npz["b0_x0"]
        floor_path = save_model(_identity_model(name, x0, 17), work / "floor.onnx")
        runner = held.enter_context(backend.open(backend.build(floor_path, config)))
        runner.bind({"x": x0})
        floor = PairedTiming(Step(runner.run_once, runner.timer()), resident.step, plan, clock)
        doc["floor"] = {"execution": dict(runner.execution)}
        timings.append((doc["floor"], "vs_full", floor))
        for entry in manifest["nodes"]:
            row: dict[str, Any] = {k: entry[k] for k in (
                "name", "op_type", "domain", "unit", "count", "same_as", "float_weights",
                "input_shapes", "fp16_reason")}  # fmt: skip
            doc["nodes"].append(row)
            timed = args.time_all or entry["same_as"] == entry["name"]
            row["timed"] = timed
            npz = dict(np.load(node_dir / entry["data"]))
            n_batches = int(entry["n_batches"])
            ref = [{y: npz[f"b{b}_y{j}"] for j, y in enumerate(entry["outputs"])}
                   for b in range(n_batches)]  # fmt: skip
            steps: dict[str, Step] = {}
            for variant, file in entry["files"].items():
                try:
                    (outs, runner), step = open_step(
                        node_dir / file, npz, entry["inputs"], n_batches
                    )
                except Exception as exc:  # a variant that fails is a finding, not the end
                    row[f"{variant}_error"] = str(local_failure(exc, f"{variant} node"))
                    continue
                row[f"dev_{variant}"] = rel_l2(outs, ref)
                row[f"execution_{variant}"] = dict(runner.execution)
                steps[variant] = step
            if timed and "fp32" in steps:
                share = PairedTiming(steps["fp32"], resident.step, plan, clock)
                timings.append((row, "share", share))
                for variant in ("fp16", "fp16io"):
                    if variant in steps:
                        timings.append((row, f"{variant}_ratio",
                                        PairedTiming(steps[variant], steps["fp32"], plan,
                                                     clock)))  # fmt: skip
            save()
        doc["open_s"] = round(time.perf_counter() - t0, 1)
        t1 = time.perf_counter()
        per_round = max(1, args.pairs // args.rounds)
        for r in range(args.rounds + 1):
            for i in range(len(timings)):
                row, key, timing = timings[(i + r) % len(timings)]
                if f"{key}_error" in row:
                    continue
                try:
                    if r < args.rounds:
                        timing.run(min_pairs=per_round, max_pairs=per_round, until_sure=False)
                    else:  # more windows only where the interval is still wide
                        timing.run(min_pairs=0, max_pairs=args.pairs)
                except Exception as exc:
                    row[f"{key}_error"] = str(local_failure(exc, key))
        doc["timing_s"] = round(time.perf_counter() - t1, 1)
    source = f"measured:onnxruntime-{config.device_type}"
    own = {
        "vs_full": "ms",
        "share": "fp32_ms",
        "fp16_ratio": "fp16_ms",
        "fp16io_ratio": "fp16io_ms",
    }  # the timed side's own median
    for row, key, timing in timings:
        if not timing.pairs:
            continue
        stats = timing.stats(source=source)
        row[key] = _ratio(stats)
        row[own[key]] = stats.own_median_ms
        row[f"{key}_windows"] = stats.windows
        row[f"{key}_clock_mhz_min"] = stats.clock_mhz_min
    doc["summary"] = summarize(doc)
    save()
    return doc


def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    """Whole-model figures from the timed rows (shares summed over each signature's count)."""
    floor = (doc.get("floor") or {}).get("vs_full")
    f = floor[0] if floor else 0.0
    share = corrected = saving = saving_io = 0.0
    complete = True
    for row in doc["nodes"]:
        if not row.get("timed"):
            continue
        s = row.get("share")
        if s is None:
            complete = False
            continue
        n = row.get("count", 1)
        share += n * s[0]
        corrected += n * max(0.0, s[0] - f)
        r16, r16io = row.get("fp16_ratio"), row.get("fp16io_ratio")
        saving += n * s[0] * (1 - r16[0]) if r16 else 0.0
        saving_io += n * s[0] * (1 - r16io[0]) if r16io else 0.0
    return {
        "share": share,
        "share_less_floor": corrected,
        "floor_share": f,
        "est_saving_fp16": saving,
        "est_saving_fp16io": saving_io,
        "complete": complete,
    }


# --- report ---------------------------------------------------------------------------------


def _r(x: list[float] | None, pct: bool = False) -> str:
    if not x:
        return "-"
    if pct:
        return f"{x[0]:.1%} [{x[1]:.1%}, {x[2]:.1%}]"
    return f"{x[0]:.2f} [{x[1]:.2f}, {x[2]:.2f}]"


def _g(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2g}"


def _graph(execution: dict[str, Any] | None) -> str:
    """on/off for a runner's CUDA graph ('-' off the GPU or not run)."""
    if not execution or "cuda_graph" not in execution:
        return "-"
    return "on" if execution["cuda_graph"] else "off"


def _refined(out: Path, name: str) -> dict[str, str]:
    """Speedup and deviation of recfp16/allbutrec/all-FP16 from gpu_timing's first refine."""
    path = out / f"gpu_timing_{name}_x1.json"
    if not path.is_file():
        return {}
    ref = (json.loads(path.read_text()).get("refines") or [{}])[0]
    got = {}
    for p in ref.get("points", []) + ref.get("compared", []):
        label = str(p.get("label", ""))
        key = next((k for k in ("recfp16", "allbutrec") if label == f"compare:{k}_{name}.onnx"),
                   "all-fp16" if label == "all-fp16" else None)  # fmt: skip
        s = p.get("speedup")
        if key and s:
            got[key] = f"{s[0]:.2f}x [{s[1]:.2f}, {s[2]:.2f}], {_g(p.get('deviation'))}"
    return got


def report(out: Path) -> str:
    """The RESULTS.md tables from every ``gpu_recurrent_*.json`` in ``out``."""
    docs = [json.loads(p.read_text()) for p in sorted(out.glob("gpu_recurrent_*.json"))]
    lines = [
        "| model | device | whole FP32 ms | node (op) | x | node FP32 ms | share of whole "
        "[95%] | share less call floor | FP16/FP32 node [95%] | FP16-IO/FP32 [95%] | est. "
        "saving of whole (FP16) | dev. FP16 node alone (FP16-IO) | dev. FP32 node on device | "
        "CUDA graph: whole, node FP32/FP16/FP16-IO |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for d in docs:
        dev = d["device"] + (" (CPU figures!)" if d["device"] == "cpu" else "")
        whole = d.get("full_fp32", {}).get("ms")
        floor = (d.get("floor") or {}).get("vs_full")
        f = floor[0] if floor else 0.0
        for row in d["nodes"]:
            if not row.get("timed"):
                continue
            s, r16 = row.get("share"), row.get("fp16_ratio")
            cells = [
                d["model"], dev, _g(whole), f"{row['name']} ({row['op_type']})", row["count"],
                _g(row.get("fp32_ms")), _r(s, pct=True),
                "-" if not s else f"{max(0.0, s[0] - f):.1%}", _r(r16),
                _r(row.get("fp16io_ratio")),
                "-" if not (s and r16) else f"{row['count'] * s[0] * (1 - r16[0]):+.1%}",
                f"{_g(row.get('dev_fp16'))} ({_g(row.get('dev_fp16io'))})",
                _g(row.get("dev_fp32")),
                ", ".join([_graph(d.get("full_fp32", {}).get("execution")),
                           "/".join(_graph(row.get(f"execution_{v}"))
                                    for v in ("fp32", "fp16", "fp16io"))]),
            ]  # fmt: skip
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        untimed = [r["name"] for r in d["nodes"] if not r.get("timed")]
        if untimed:
            devs = [r["dev_fp16"] for r in d["nodes"] if r.get("dev_fp16") is not None]
            span = f"{_g(min(devs))} to {_g(max(devs))}" if devs else "- (no FP16 variant)"
            notes.append(f"{d['model']}: {len(untimed)} more node(s) of a timed signature "
                         f"(counted in x); FP16 deviation of each node alone: "
                         f"{span}.")  # fmt: skip
        if d.get("not_units"):
            notes.append(f"{d['model']}: not units in this branch (no FP16 variant): "
                         f"{', '.join(d['not_units'])}.")  # fmt: skip
        notes += [f"{d['model']}: {n}" for n in d.get("notes", [])]
    lines += [
        "",
        "| model | device | call floor (share of whole) | recurrent/fused share of whole | "
        "less call floor | est. saving, FP16 there (FP16-IO) | refined recfp16_: speedup, dev. "
        "| refined allbutrec_ | refined all-FP16 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for d in docs:
        s = d.get("summary", {})
        got = _refined(out, d["model"])
        cells = [
            d["model"], d["device"], f"{s.get('floor_share', math.nan):.1%}",
            f"{s.get('share', math.nan):.1%}", f"{s.get('share_less_floor', math.nan):.1%}",
            f"{s.get('est_saving_fp16', math.nan):+.1%} "
            f"({s.get('est_saving_fp16io', math.nan):+.1%})",
            got.get("recfp16", "-"), got.get("allbutrec", "-"), got.get("all-fp16", "-"),
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", help="MODELS_DIR PEERS_DIR [OUT], or OUT (--report)")
    ap.add_argument("--prepare", action="store_true", help="write variants and nodes (CPU)")
    ap.add_argument("--report", action="store_true", help="print the tables of OUT's JSONs")
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--device", default="cuda", help="cuda (cpu only to try the script)")
    ap.add_argument("--pairs", type=int, default=12, help="paired windows per timing")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--target", type=float, default=0.02)
    ap.add_argument("--max-time-s", type=float, default=3.0)
    ap.add_argument("--time-all", action="store_true", help="time every node, not one a kind")
    ap.add_argument("--work", default="/tmp/amp-gpu-recurrent")
    args = ap.parse_args()
    if args.report:
        if len(args.paths) != 1:
            ap.error("--report takes OUT")
        print(report(Path(args.paths[0])))
        return 0
    names = [n for n in args.models.split(",") if n]
    if args.prepare:
        if len(args.paths) != 2:
            ap.error("--prepare takes MODELS_DIR PEERS_DIR")
        models_dir, peers_dir = map(Path, args.paths)
        work = Path(args.work) / "prepare"
        work.mkdir(parents=True, exist_ok=True)
        for name in names:
            t0 = time.perf_counter()
            doc = prepare(name, models_dir, peers_dir, work)
            v = doc["variants"]
            units = doc["recurrent_units"]
            more = " ..." if len(units) > 4 else ""
            print(f"{name}: {len(doc['nodes'])} recurrent/fused node(s) "
                  f"({', '.join(sorted({n['op_type'] for n in doc['nodes']}))}), units "
                  f"{units[:4]}{more}; not units: {doc['not_units'] or 'none'}; relaxed "
                  f"shapes: {len(doc['relaxed_shapes'])}; {time.perf_counter() - t0:.0f} s",
                  flush=True)  # fmt: skip
            if not v:
                print("  no recurrent/fused unit: no recfp16_/allbutrec_ variant written")
            for info in v.values():
                print(f"  {info['file']}: {info['mib']:.1f} MiB, {info['fp16_units']} FP16 "
                      f"unit(s), CPU rel. L2 {info['cpu_rel_l2']:.3g}")  # fmt: skip
            print(f"  recurrent/{name}/: {doc['nodes_mib']:.1f} MiB "
                  f"({len(doc['nodes'])} node(s) x fp32/fp16/fp16io + npz)")  # fmt: skip
        total = _mib(peers_dir)
        print(f"{peers_dir}: {total:.1f} MiB in all "
              f"({'fits' if total < CARRY_MIB - 4 else 'over'} one carry of {CARRY_MIB} MiB "
              "with the repository)")  # fmt: skip
        return 0
    if len(args.paths) != 3:
        ap.error("give MODELS_DIR PEERS_DIR OUT")
    out = Path(args.paths[2])
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        t0 = time.perf_counter()
        try:
            doc = measure_model(name, args, out)
        except Exception as exc:  # one model's failure must not lose the others
            print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            continue
        s = doc["summary"]
        print(f"{name}: {time.perf_counter() - t0:.0f} s; whole FP32 "
              f"{doc['full_fp32']['ms']:.4g} ms; recurrent/fused share {s['share']:.1%} "
              f"(less floor {s['share_less_floor']:.1%}); est. FP16 saving "
              f"{s['est_saving_fp16']:+.1%}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
