"""The ONNX Runtime backend: CPU EP (accuracy estimate, runs anywhere) and CUDA EP.

Options (all recorded with the candidate; they change both speed and correctness):

- ``graph_optimization_level``: ``"disable_all"`` (CPU default) keeps the Casts ONNX Runtime
  inserts around its FP32-only CPU kernels, so FP16 *storage* between nodes is emulated
  (rounding, overflow to inf, flush to zero); at ``"all"`` (CUDA default) the CPU EP removes
  them again and only weight rounding shows. CPU arithmetic stays FP32 inside nodes either
  way: a CPU figure estimates accuracy, it cannot show a GPU kernel's failures, and its FP16
  latency means nothing for a GPU.
- ``emulate_fp16_storage`` (CPU, default 1): ONNX Runtime CPU runs most FP16 nodes as FP32
  *islands* between the Casts it inserts, and merges those Casts across a chain of nodes
  (Conv -> Relu -> Mul), so an FP16 tensor inside the chain never holds FP16 values and an
  overflow there stays invisible (measured: x*1000*1e-3 in FP16 gives 100, not inf). With
  this option the session runs an FP32 twin of the candidate in which every FP16 tensor is
  rounded through an explicit Cast pair, which ONNX Runtime keeps: FP16 storage (rounding,
  overflow to inf, flush to zero) is emulated at every node boundary, as a GPU that runs each
  node in FP16 stores it (the twin: :mod:`amp_search.graph.emulate`). The candidate's ONNX
  itself is not changed.
- ``intra_op_num_threads``: CPU threads (0: ONNX Runtime's default).
- CUDA EP: ``prefer_nhwc`` (0/1), ``use_tf32`` (0/1; 0 gives a strict FP32 reference),
  ``cudnn_conv_algo_search`` (``EXHAUSTIVE``/``HEURISTIC``/``DEFAULT``), ``device_id`` from
  the device string ``cuda:N``.
- ``enable_cuda_graph`` (CUDA, default 1): timed runs replay one CUDA graph captured from an
  IO-bound run (inputs and outputs at fixed device addresses), as a model should then be
  deployed: it removes per-node launch overhead, most of a small model's latency and most of
  its run-to-run noise (H200: 14-44% faster, p90/p10 from 1.3-1.6 to 1.03). Accuracy runs skip
  the graph (run option ``gpu_graph_id=-1``), so every calibration batch is computed afresh.
  Where the model does not allow a graph (a node ONNX Runtime places on the CPU, a capture
  that fails, a replay that differs from a plain run) the candidate runs without one and says
  why (:attr:`~amp_search.backends.base.Runner.execution`).

On the CUDA EP, :meth:`~OnnxRuntimeBackend.low_precision_gaps` runs the all-FP16 rewrite
once, profiled, and names the FP16 nodes ONNX Runtime placed on the CPU (an op without a
float16 CUDA kernel: opset 11's Clip, say); the search keeps them FP32, since each costs a copy
each way and the CUDA graph. (ONNX Runtime's kernel registry, ``get_all_opkernel_def``, would
answer without a run, but on onnxruntime-gpu it loads every provider library and crashes where
TensorRT's is missing.)

:meth:`~OnnxRuntimeBackend.bf16_gaps` does the same for BF16 (the CUDA EP has BF16 kernels for
some ops only, and for some none on any provider: BatchNormalization, MaxPool, Resize, LSTM
in 1.31), by :func:`bf16_probe`: the model with every unit that admits BF16 in BF16, opened;
a node no provider has a kernel for fails the session, so the units holding nodes of that op
are taken back to FP32 and the probe repeats (an op ONNX Runtime expands into its function body
fails on a tensor, or a nameless node: it is found by probing op types one at a time); once the
session opens, the BF16 nodes placed on the CPU are named too.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from amp_search._optional import require
from amp_search.backends.base import Backend, BuildConfig, Candidate, Runner, gpu_name
from amp_search.errors import BackendUnavailableError, CandidateBuildError, UserInputError

if TYPE_CHECKING:
    import onnxruntime
    from onnx import ModelProto

    from amp_search.graph.precision import ConversionReport, MixedPrecisionRewriter
    from amp_search.types import PrecisionAssignment

__all__ = ["CPU_DEFAULTS", "CUDA_DEFAULTS", "OnnxRuntimeBackend", "OnnxRuntimeRunner"]

logger = logging.getLogger(__name__)

CPU_DEFAULTS: dict[str, Any] = {
    "graph_optimization_level": "disable_all",
    "intra_op_num_threads": 0,
    "emulate_fp16_storage": 1,
}
CUDA_DEFAULTS: dict[str, Any] = {
    "graph_optimization_level": "all",
    "prefer_nhwc": 0,
    "use_tf32": 1,
    "cudnn_conv_algo_search": "EXHAUSTIVE",
    "enable_cuda_graph": 1,
}
_CUDA_EP_KEYS = ("prefer_nhwc", "use_tf32", "cudnn_conv_algo_search", "enable_cuda_graph")
#: Run option that keeps a run out of the CUDA graph (ONNX Runtime's kCudaGraphAnnotationSkip).
_SKIP_GRAPH = ("gpu_graph_id", "-1")
_LEVELS = {"disable_all": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
           "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}  # fmt: skip


def _ort() -> Any:
    return require("onnxruntime", extra="gpu", what="The ONNX Runtime backend")


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on the CPU EP or the CUDA EP."""

    name = "onnxruntime"
    requires = ("onnxruntime",)
    extra = "gpu"
    builds_from_memory = True

    def devices(self) -> list[str]:  # noqa: D102
        ort = _ort()
        out = ["cpu"]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            out.append("cuda")
        return out

    def device_hint(self, device: str) -> str:  # noqa: D102
        if device.split(":")[0] == "cuda":
            return "For the CUDA EP install onnxruntime-gpu (pip install 'amp-search[gpu]')."
        return ""

    def resolve_options(self, config: BuildConfig) -> dict[str, Any]:
        """The configuration's options completed with the device's defaults."""
        defaults = CUDA_DEFAULTS if config.device_type == "cuda" else CPU_DEFAULTS
        unknown = set(config.options) - set(defaults)
        if unknown:
            raise UserInputError(
                f"Unknown onnxruntime option(s) {sorted(unknown)} for device "
                f"{config.device!r}; known: {sorted(defaults)}."
            )
        opts = {**defaults, **config.options}
        if opts["graph_optimization_level"] not in _LEVELS:
            raise UserInputError(
                f"graph_optimization_level must be one of {sorted(_LEVELS)}, "
                f"got {opts['graph_optimization_level']!r}."
            )
        return opts

    def identity(self, config: BuildConfig) -> dict[str, Any]:  # noqa: D102
        ort = _ort()
        ident: dict[str, Any] = {
            "backend": self.name,
            "onnxruntime": ort.__version__,
            "device": config.device,
            "options": self.resolve_options(config),
        }
        if config.device_type == "cuda":
            ident["gpu"] = gpu_name(config.device_id)
        return ident

    def low_precision_gaps(  # noqa: D102
        self,
        rewriter: MixedPrecisionRewriter,
        feeds: Mapping[str, np.ndarray],
        config: BuildConfig,
    ) -> dict[str, str]:
        if config.device_type != "cuda":  # the CPU backend emulates FP16 storage: no gaps
            return {}
        nodes = {n.name: n for n in rewriter.low_precision_nodes()}
        opts = {**self.resolve_options(config), "graph_optimization_level": "disable_all"}
        try:
            probe, _ = _probe(rewriter, rewriter.all_fp16())
            on_cpu = cpu_placed_nodes(
                probe.SerializeToString(), self._session_options(opts),
                self._providers(config, opts, graph=False), feeds,
            )  # fmt: skip
        except Exception as exc:  # a check, not a requirement: the search goes on without it
            logger.warning(
                "Could not check which FP16 nodes onnxruntime would run on the CPU (%s); "
                "none is kept FP32 for it.", _first_line(exc),
            )  # fmt: skip
            return {}
        return {
            name: f"{n.op_type}-{n.since_version} in FP16 runs on the CPU under the CUDA EP "
            "(no float16 kernel there)"
            for name, n in nodes.items()
            if name in on_cpu
        }

    def bf16_gaps(  # noqa: D102
        self,
        rewriter: MixedPrecisionRewriter,
        feeds: Mapping[str, np.ndarray],
        config: BuildConfig,
    ) -> dict[str, str]:
        if config.device_type != "cuda":  # the CPU backend emulates BF16 storage: no gaps
            return {}
        opts = {**self.resolve_options(config), "graph_optimization_level": "disable_all"}
        return bf16_probe(
            rewriter, feeds, lambda: self._session_options(opts),
            self._providers(config, opts, graph=False), placement=True,
        )  # fmt: skip

    def _session_options(self, opts: Mapping[str, Any]) -> onnxruntime.SessionOptions:
        ort = _ort()
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, _LEVELS[opts["graph_optimization_level"]]
        )
        if opts.get("intra_op_num_threads"):
            so.intra_op_num_threads = int(opts["intra_op_num_threads"])
        so.log_severity_level = 3
        return so

    def _providers(
        self, config: BuildConfig, opts: Mapping[str, Any], *, graph: bool = True
    ) -> list[Any]:
        if config.device_type == "cpu":
            return ["CPUExecutionProvider"]
        ort = _ort()
        if hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()
            except Exception as exc:  # preload is best effort
                logger.debug("onnxruntime.preload_dlls failed: %s", exc)
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailableError(
                "The CUDA EP is not available in this onnxruntime build "
                f"(providers: {ort.get_available_providers()}). Install onnxruntime-gpu "
                "(pip install 'amp-search[gpu]') or use --device cpu."
            )
        cuda_opts = {k: str(opts[k]) for k in _CUDA_EP_KEYS}
        cuda_opts["enable_cuda_graph"] = "1" if graph and _wants_graph(opts) else "0"
        cuda_opts["device_id"] = str(config.device_id)
        return [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]

    def _build(self, model_path: Path, config: BuildConfig) -> Candidate:
        return self._build_from_memory(model_path, config, None)

    def _build_from_memory(
        self, model_path: Path, config: BuildConfig, model_bytes: Sequence[bytes] | None
    ) -> Candidate:
        ort = _ort()
        opts = self.resolve_options(config)
        providers = self._providers(config, opts)  # an EP missing here: said before building
        t0 = time.perf_counter()
        source: str | bytes = str(model_path)
        if model_bytes is not None:
            source = model_bytes[0] if len(model_bytes) == 1 else b"".join(model_bytes)
        graph_refused: str | None = None
        try:
            if config.device_type == "cpu" and int(opts.get("emulate_fp16_storage", 0)):
                from amp_search.graph.emulate import emulating_fp16_storage

                source = emulating_fp16_storage(
                    model_path, source if isinstance(source, bytes) else None
                )
            so = self._session_options(opts)
            graph = config.device_type == "cuda" and _wants_graph(opts)
            if graph:  # a refusal is recorded with the candidate, not logged by ORT as an error
                so.log_severity_level = 4
            try:
                sess = ort.InferenceSession(source, so, providers=providers)
            except Exception as exc:
                if not graph:
                    raise
                # Most often a node ONNX Runtime places on the CPU: no graph, say why.
                graph_refused = _first_line(exc)
                so.log_severity_level = 3
                sess = ort.InferenceSession(
                    source, so, providers=self._providers(config, opts, graph=False)
                )
        except Exception as exc:  # ORT raises its own exception types
            raise CandidateBuildError(
                f"onnxruntime could not create a session for {model_path.name}: {_first_line(exc)}"
            ) from exc
        finally:
            if isinstance(source, str) and source != str(model_path):  # a twin over 2 GiB
                shutil.rmtree(Path(source).parent, ignore_errors=True)
        build_time = time.perf_counter() - t0
        used = sess.get_providers()
        if config.device_type == "cuda" and "CUDAExecutionProvider" not in used:
            raise CandidateBuildError(
                f"onnxruntime fell back to {used} for {model_path.name}; the CUDA EP refused it."
            )
        info: dict[str, Any] = {"providers": used, "options": opts}
        if graph:
            info["cuda_graph"] = graph_refused is None
            if graph_refused is not None:
                info["cuda_graph_reason"] = f"session refused a CUDA graph: {graph_refused}"
        return Candidate(
            backend=self.name,
            model_path=model_path,
            config=config,
            identity=self.identity(config),
            build_time_s=build_time,
            info=info,
            handle=sess,
        )

    def _open(self, candidate: Candidate) -> Runner:
        sess = candidate.handle
        if sess is None:
            rebuilt = self._build(candidate.model_path, candidate.config)
            candidate.handle, candidate.info = rebuilt.handle, rebuilt.info
            sess = candidate.handle
        return OnnxRuntimeRunner(
            sess, candidate.config, graph=bool(candidate.info.get("cuda_graph")),
            refused=candidate.info.get("cuda_graph_reason"),
        )  # fmt: skip


class OnnxRuntimeRunner(Runner):
    """Runs an ``onnxruntime.InferenceSession``; on CUDA, timed runs use IO binding.

    With ``graph`` (a session built with ``enable_cuda_graph``), :meth:`bind` binds inputs and
    preallocated outputs at fixed device addresses, lets ONNX Runtime capture the graph, and
    checks that a replay gives what a plain run gives; timed runs then replay it. Any failure
    there turns the graph off for this runner (the reason in :attr:`execution`).
    """

    def __init__(
        self,
        session: onnxruntime.InferenceSession,
        config: BuildConfig,
        *,
        graph: bool = False,
        refused: str | None = None,
    ) -> None:
        super().__init__()
        self._sess = session
        self._config = config
        self._inputs = [i.name for i in session.get_inputs()]
        self._outputs = [o.name for o in session.get_outputs()]
        self._feeds: dict[str, np.ndarray] = {}
        self._binding: Any = None
        self._graph = graph
        self._plain: Any = None  # run options that keep a run out of the graph
        self._timed_options: Any = None
        self.source = f"measured:onnxruntime-{config.device_type}"
        if config.device_type == "cuda":
            self.execution = {"cuda_graph": False}
            if refused:
                self.execution["cuda_graph_reason"] = refused
            if graph:
                self._plain = _ort().RunOptions()
                self._plain.add_run_config_entry(*_SKIP_GRAPH)

    @property
    def input_names(self) -> list[str]:  # noqa: D102
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:  # noqa: D102
        return list(self._outputs)

    def _deactivate(self) -> None:
        self._binding = None
        self._feeds = {}

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._sess.run(None, {k: feeds[k] for k in self._inputs}, self._plain)
        return dict(zip(self._outputs, values, strict=True))

    def _bind(self, feeds: Mapping[str, np.ndarray]) -> None:
        self._feeds = {k: np.ascontiguousarray(feeds[k]) for k in self._inputs}
        if self._config.device_type != "cuda":
            return
        ort = _ort()
        binding = self._sess.io_binding()
        dev = self._config.device_id
        for name, arr in self._feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr, "cuda", dev))
        if not self._graph:
            for name in self._outputs:
                binding.bind_output(name, "cuda", dev)
            self._binding = binding
            return
        # A graph reads and writes fixed addresses: outputs preallocated at their real shapes.
        expected = self._sess.run(None, self._feeds, self._plain)
        for name, value in zip(self._outputs, expected, strict=True):
            out = ort.OrtValue.ortvalue_from_shape_and_type(
                value.shape, value.dtype.type, "cuda", dev
            )
            binding.bind_ortvalue_output(name, out)
        self._binding = binding
        reason = self._capture(expected)
        self.execution["cuda_graph"] = reason is None
        if reason is not None:
            self.execution["cuda_graph_reason"] = reason
            self._timed_options = self._plain
            logger.warning("CUDA graph off for this candidate: %s", reason)

    def _capture(self, expected: list[np.ndarray]) -> str | None:
        """Lets ONNX Runtime capture the graph; None, or why timed runs cannot replay it."""
        try:
            for _ in range(3):  # ONNX Runtime runs plainly first, then captures, then replays
                self._sess.run_with_iobinding(self._binding)
            replayed = self._binding.copy_outputs_to_cpu()
        except Exception as exc:
            return f"capture failed: {_first_line(exc)}"
        for name, want, got in zip(self._outputs, expected, replayed, strict=True):
            want, got = np.asarray(want), np.asarray(got)
            scale = float(np.nanmax(np.abs(want))) if want.size and want.dtype.kind == "f" else 0
            if not np.allclose(got, want, rtol=1e-3, atol=1e-3 * scale, equal_nan=True):
                return f"a graph replay differs from a plain run (output {name!r})"
        return None

    def _run_once(self) -> None:
        if self._binding is not None:
            self._sess.run_with_iobinding(self._binding, self._timed_options)
        else:
            self._sess.run(None, self._feeds)


def cpu_placed_nodes(
    source: str | bytes,
    options: onnxruntime.SessionOptions,
    providers: Sequence[Any],
    feeds: Mapping[str, np.ndarray],
) -> set[str]:
    """Names of the nodes ONNX Runtime runs on the CPU EP, from one profiled run.

    Use ``graph_optimization_level="disable_all"`` in ``options``: fused nodes get new names.
    """
    ort = _ort()
    with tempfile.TemporaryDirectory(prefix="amp_placement_") as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "placement")
        sess = ort.InferenceSession(source, options, providers=list(providers))
        sess.run(None, dict(feeds))
        events = json.loads(Path(sess.end_profiling()).read_text())
        del sess
    return {
        str(e["name"]).removesuffix("_kernel_time")
        for e in events
        if e.get("cat") == "Node" and e.get("args", {}).get("provider") == "CPUExecutionProvider"
    }


#: ONNX Runtime's "no kernel" errors name the node: "... for Conv(22) node with name 'x'". An op
#: it has no kernel for but a function body (Clip) is expanded, and a type error inside names
#: only the tensor: "Type 'tensor(bfloat16)' of input parameter (t) of operator (Where) in
#: node ()".
_NODE_NAMED = re.compile(r"node with name '([^']*)'")
_TENSOR_NAMED = re.compile(r"parameter \(([^()]+)\)")


def bf16_probe(
    rewriter: MixedPrecisionRewriter,
    feeds: Mapping[str, np.ndarray],
    options: Callable[[], onnxruntime.SessionOptions],
    providers: Sequence[Any],
    *,
    placement: bool,
) -> dict[str, str]:
    """BF16 nodes ``providers`` cannot run (node -> reason), by opening the all-BF16 model.

    Every unit that admits BF16 is BF16 in the probe. A session that fails names the node
    (or a tensor it reads): every unit holding a node of that op type goes back to FP32 and the
    probe repeats (once per op type at most). A failure that names no BF16 node is isolated
    by op type (:func:`_isolate`: one probe per op type of the BF16 units). With
    ``placement``, the BF16 nodes of the session that opens and are placed on the CPU EP are
    named too (:func:`cpu_placed_nodes`). If nothing can be blamed the probe stops with what it
    found (the candidates that fail then fail as trials).
    """
    from amp_search.types import Precision, PrecisionAssignment

    kind = {n.name: n.op_type for n in rewriter.model.graph.node}
    offered = {u.name: set(u.nodes) for u in rewriter.units if rewriter.admits_bf16_unit(u.name)}
    eps = ", ".join(map(_ep, providers))
    gaps: dict[str, str] = {}

    def opens(units: Iterable[str]) -> tuple[ModelProto, ConversionReport, set[str] | Exception]:
        probe, report = _probe(rewriter, PrecisionAssignment.uniform(units, Precision.BF16))
        data = probe.SerializeToString()
        try:
            if not placement:
                _ort().InferenceSession(data, options(), providers=list(providers))
                return probe, report, set()
            return probe, report, cpu_placed_nodes(data, options(), providers, feeds)
        except Exception as exc:
            return probe, report, exc

    def withhold(ops: Mapping[str, str]) -> None:
        for unit, ns in list(offered.items()):
            hit = [n for n in ns if kind.get(n) in ops]
            if hit:
                gaps.update({n: ops[kind[n]] for n in hit})
                del offered[unit]

    while offered:
        probe, report, result = opens(list(offered))
        if not isinstance(result, Exception):
            for name in set(report.bf16_nodes) & result:
                gaps[name] = f"{kind[name]} in BF16 runs on the CPU under the CUDA EP"
            return gaps
        held = set().union(*offered.values())
        blamed = {kind[n] for n in _blamed(result, probe) & held}
        ops = dict.fromkeys(blamed, "") or _isolate(offered, kind, opens)
        if not ops:
            logger.warning("BF16 probe stopped: %s", _first_line(result))
            return gaps
        withhold({op: why or f"{op} has no bfloat16 kernel on {eps}" for op, why in ops.items()})
    return gaps


def _blamed(exc: Exception, model: ModelProto) -> set[str]:
    """Nodes of ``model`` a session error names: by name, or as readers of a named tensor."""
    text = str(exc)
    names = {m.group(1) for m in _NODE_NAMED.finditer(text)}
    tensors = {m.group(1) for m in _TENSOR_NAMED.finditer(text)}
    if tensors:
        names |= {n.name for n in model.graph.node if tensors.intersection(n.input)}
    return names


def _isolate(
    offered: Mapping[str, set[str]],
    kind: Mapping[str, str],
    opens: Callable[[Iterable[str]], tuple[Any, Any, set[str] | Exception]],
) -> dict[str, str]:
    """Op types whose BF16 units alone fail to open (op -> reason): one probe per op type."""
    failing: dict[str, str] = {}
    for op in sorted({kind[n] for ns in offered.values() for n in ns}):
        units = [u for u, ns in offered.items() if any(kind.get(n) == op for n in ns)]
        result = opens(units)[2]
        if isinstance(result, Exception):
            failing[op] = f"a BF16 {op} does not open on the target: {_first_line(result)}"
    return failing


def _probe(
    rewriter: MixedPrecisionRewriter, assignment: PrecisionAssignment
) -> tuple[ModelProto, ConversionReport]:
    """The rewrite of ``assignment`` as a placement probe opens it: no declared shapes.

    Declared intermediate and output shapes are not what a probe asks about, and a stale one
    would fail the session for another reason than a missing kernel.
    """
    probe, report = rewriter.apply(assignment)
    del probe.graph.value_info[:]
    for out in probe.graph.output:
        out.type.tensor_type.ClearField("shape")
    return probe, report


def _ep(provider: Any) -> str:
    return str(provider[0] if isinstance(provider, tuple) else provider)


def _wants_graph(opts: Mapping[str, Any]) -> bool:
    return str(opts.get("enable_cuda_graph", 0)) in ("1", "True", "true")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
