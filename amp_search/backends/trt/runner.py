"""Runs a serialized TensorRT engine on one CUDA device, and times it with CUDA events.

:class:`TensorRTRunner` follows the runner life cycle of :mod:`amp_search.backends.base`: the
constructor only keeps the engine bytes; ``with runner:`` deserializes the engine, creates the
execution context, a stream and two timing events; leaving the block frees all of them.

- ``infer`` copies the inputs host to device, runs ``execute_async_v3`` on the runner's stream,
  copies every output back and synchronizes.
- ``bind`` uploads the inputs once and keeps them on the device; ``run_once`` then runs
  ``execute_async_v3`` (or, with ``cuda_graph``, replays a graph captured from it) and
  synchronizes the stream. An ``infer`` in between reuses the device buffers, so the bound inputs
  are uploaded again before the next ``run_once``.
- A graph that cannot be captured (an engine with work CUDA graphs do not allow) does not fail
  the candidate: :class:`CudaGraph` ends the capture, warns once and falls back to plain
  enqueues, as trtexec does; :attr:`TensorRTRunner.info` records whether the graph is used and
  why not.
- :meth:`TensorRTRunner.event_timer` is a timer for :func:`amp_search.timing.measure`: given the
  runner's own ``run_once`` it records CUDA events around the enqueue alone, so the figure is the
  device time of one inference without the host synchronization.
- Engines are built with ``ProfilingVerbosity.DETAILED`` for the engine inspector; the execution
  context's ``nvtx_verbosity`` is set back to ``LAYER_NAMES_ONLY`` before anything runs, since
  DETAILED "will generally increase latency in enqueueV3()" (``IExecutionContext.nvtx_verbosity``,
  10.0+).

API references: TensorRT Python API docs (10.x/11.x "Runtime", "ICudaEngine",
"IExecutionContext"): ``Runtime.deserialize_cuda_engine``, ``ICudaEngine.num_io_tensors``,
``get_tensor_name``, ``get_tensor_mode``, ``get_tensor_dtype``, ``create_execution_context``,
``IExecutionContext.set_input_shape``, ``get_tensor_shape``, ``set_tensor_address`` (returns
False on failure), ``nvtx_verbosity``, ``execute_async_v3(stream_handle)``; ``tensorrt.nptype``.
CUDA calls go through :mod:`amp_search.backends.trt._cuda`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, Protocol

import numpy as np

from amp_search.backends.base import Runner
from amp_search.backends.trt import _cuda
from amp_search.backends.trt.builder import import_trt, make_logger
from amp_search.errors import AmpSearchError, CandidateRunError

__all__ = ["CudaGraph", "GraphStream", "TensorRTRunner"]

logger = logging.getLogger(__name__)


class GraphStream(Protocol):
    """The stream operations :class:`CudaGraph` uses (the runner's call :mod:`._cuda`)."""

    def begin_capture(self) -> None:
        """Starts capturing the stream (thread-local mode)."""

    def end_capture(self) -> Any:
        """Ends the capture; returns the instantiated graph."""

    def abort_capture(self) -> None:
        """Ends a failed capture if one is open, drops it and clears the error; never raises."""

    def launch(self, graph_exec: Any) -> None:
        """Launches an instantiated graph on the stream."""

    def destroy(self, graph_exec: Any) -> None:
        """Destroys an instantiated graph."""


class CudaGraph:
    """One inference captured into a CUDA graph, or why inferences are enqueued plainly.

    The decision logic alone, over a :class:`GraphStream`. A capture that fails at any step
    (begin, the enqueue under capture, end, instantiate) is ended and dropped, logged once as a
    warning, and ends the graph's use for this runner: later runs enqueue without a graph.
    TensorRT cannot tell up front whether an engine is capturable (``is_stream_capturable`` is
    TensorRT-RTX only), so trying is the test, as in trtexec (``sampleInference.cpp``).

    Args:
        requested: Whether option ``cuda_graph`` asked for a graph.
    """

    def __init__(self, requested: bool) -> None:
        self.requested = bool(requested)
        self.graph_exec: Any = None
        self.failure: str | None = None

    @property
    def used(self) -> bool:
        """Whether runs replay a captured graph now."""
        return self.graph_exec is not None

    @property
    def wanted(self) -> bool:
        """Whether the next timed run should capture first."""
        return self.requested and self.failure is None and self.graph_exec is None

    def describe(self) -> dict[str, Any]:
        """``{"requested", "used", "reason"}``: the reason is why no graph is used, or None."""
        reason = None
        if not self.requested:
            reason = "option cuda_graph is 0"
        elif self.failure is not None:
            reason = self.failure
        elif not self.used:
            reason = "not captured yet (no timed run)"
        return {"requested": self.requested, "used": self.used, "reason": reason}

    def capture(self, stream: GraphStream, enqueue: Callable[[], None]) -> bool:
        """Captures one ``enqueue()`` on ``stream``; True if a graph is now in use.

        On an :class:`~amp_search.errors.AmpSearchError` at any step the capture is ended
        (``stream.abort_capture``), a warning is logged and the graph is given up for good.
        Other exceptions (bugs) end the capture too, then propagate.
        """
        if not self.wanted:
            return self.used
        try:
            try:
                stream.begin_capture()
                enqueue()
                graph_exec = stream.end_capture()
            except BaseException:
                stream.abort_capture()
                raise
        except AmpSearchError as exc:
            # The failed call's first clause ("CUDA call cudaMalloc failed with ...") and the
            # last note (TensorRT's own error), not the error's advice for a failed candidate.
            what = exc.message.split(";", 1)[0].rstrip(".")
            detail = what + (f" ({exc.notes[-1]})" if exc.notes else "")
            self.failure = f"capture failed: {detail}"
            logger.warning(
                "CUDA graph capture failed; running this candidate without a graph: %s", detail
            )
            return False
        self.graph_exec = graph_exec
        return True

    def launch(self, stream: GraphStream) -> None:
        """Replays the captured graph on ``stream``."""
        if self.graph_exec is None:
            raise RuntimeError("CudaGraph.launch called without a captured graph")
        stream.launch(self.graph_exec)

    def drop(self, stream: GraphStream) -> None:
        """Destroys the graph (its shapes or buffers changed); the next timed run captures anew."""
        graph_exec, self.graph_exec = self.graph_exec, None
        if graph_exec is not None:
            stream.destroy(graph_exec)


class _RunnerStream:
    """:class:`GraphStream` over one CUDA stream, through :mod:`amp_search.backends.trt._cuda`."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def begin_capture(self) -> None:
        _cuda.graph_capture_begin(self.stream)

    def end_capture(self) -> Any:
        graph = _cuda.graph_capture_end(self.stream)
        try:
            return _cuda.graph_instantiate(graph)
        finally:  # the instantiated graph does not need it (trtexec destroys it alike)
            with contextlib.suppress(AmpSearchError):
                _cuda.graph_destroy(graph)

    def abort_capture(self) -> None:
        _cuda.graph_capture_abort(self.stream)

    def launch(self, graph_exec: Any) -> None:
        _cuda.graph_launch(graph_exec, self.stream)

    def destroy(self, graph_exec: Any) -> None:
        _cuda.graph_exec_destroy(graph_exec)


class TensorRTRunner(Runner):
    """Runs one TensorRT engine; GPU resources are held only inside ``with``.

    Args:
        engine: The serialized engine (plan) bytes.
        input_names: The model's input names (the ONNX graph's, which TensorRT keeps).
        output_names: The model's output names.
        module: ``"tensorrt"`` or ``"tensorrt_rtx"``: the module that built the engine.
        device_id: The CUDA device to run on.
        cuda_graph: Capture one inference into a CUDA graph on the first timed run and replay
            it with ``cudaGraphLaunch`` (less launch overhead for small models); if the capture
            fails, runs go without a graph (see :class:`CudaGraph`).
        info: A dict to record into (the backend passes ``Candidate.info["runner"]``): the
            NVTX verbosity set and ``cuda_graph`` (:meth:`CudaGraph.describe`).
    """

    source = "measured:tensorrt-cuda"

    def __init__(
        self,
        engine: bytes,
        *,
        input_names: Sequence[str],
        output_names: Sequence[str],
        module: str = "tensorrt",
        device_id: int = 0,
        cuda_graph: bool = False,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self._engine_bytes = engine
        self._inputs = list(input_names)
        self._outputs = list(output_names)
        self._module = module
        self._device_id = int(device_id)
        self._graph = CudaGraph(cuda_graph)
        self._info: dict[str, Any] = info if info is not None else {}
        self._info["cuda_graph"] = self._graph.describe()
        self._describe_execution()
        self._log: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._graph_stream = _RunnerStream(None)
        self._events: tuple[Any, Any] | None = None
        self._dtypes: dict[str, np.dtype[Any]] = {}
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._bound: dict[str, np.ndarray] = {}
        self._bound_on_device = False

    @property
    def info(self) -> dict[str, Any]:
        """What this runner did that the figures depend on: NVTX verbosity, CUDA graph use."""
        return self._info

    @property
    def input_names(self) -> list[str]:  # noqa: D102
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:  # noqa: D102
        return list(self._outputs)

    # --- life cycle ----------------------------------------------------------------------

    def _activate(self) -> None:
        try:
            self._open_engine()
        except BaseException as exc:
            self._deactivate()
            if isinstance(exc, AmpSearchError) or not isinstance(exc, Exception):
                raise
            raise CandidateRunError(f"TensorRT could not load the engine: {exc}") from exc

    def _open_engine(self) -> None:
        trt, _ = import_trt(self._module)
        _cuda.set_device(self._device_id)
        self._log = make_logger(trt)
        self._runtime = trt.Runtime(self._log)
        engine = self._runtime.deserialize_cuda_engine(self._engine_bytes)
        if engine is None:
            self._raise_not_deserialized()
        self._engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if set(inputs) != set(self._inputs) or set(outputs) != set(self._outputs):
            logger.warning(
                "Engine I/O %s/%s differs from the ONNX graph's %s/%s; using the engine's.",
                inputs, outputs, self._inputs, self._outputs,
            )  # fmt: skip
            self._inputs, self._outputs = inputs, outputs
        for name in names:
            dtype = engine.get_tensor_dtype(name)
            try:
                self._dtypes[name] = np.dtype(trt.nptype(dtype))
            except TypeError as exc:  # BF16/FP8 I/O: numpy has no such type
                raise CandidateRunError(
                    f"Engine I/O tensor {name!r} has type {dtype}, which numpy cannot hold; "
                    "keep the model's inputs and outputs FP32 or FP16."
                ) from exc
        self._context = engine.create_execution_context()
        if self._context is None:
            raise CandidateRunError(
                "TensorRT could not create an execution context (out of device memory?).",
                notes=self._log.errors()[-3:],
            )
        # The engine was built with DETAILED verbosity for the inspector; time it at the default
        # LAYER_NAMES_ONLY (IExecutionContext.nvtx_verbosity, 10.0+: may only be lowered).
        names_only = getattr(getattr(trt, "ProfilingVerbosity", None), "LAYER_NAMES_ONLY", None)
        if names_only is not None and hasattr(self._context, "nvtx_verbosity"):
            self._context.nvtx_verbosity = names_only
            now = self._context.nvtx_verbosity
            self._info["nvtx_verbosity"] = str(getattr(now, "name", now))
        else:
            self._info["nvtx_verbosity"] = "not supported by this module"
        self._stream = _cuda.stream_create()
        self._graph_stream = _RunnerStream(self._stream)
        self._events = (_cuda.event_create(), _cuda.event_create())

    def _raise_not_deserialized(self) -> NoReturn:
        logged = self._log.errors() if self._log is not None else []
        if self._module == "tensorrt_rtx":
            try:
                major, minor = _cuda.compute_capability(self._device_id)
                cc = f"{major}.{minor}"
            except AmpSearchError:
                cc = "unknown"
            if not logged or any("capabilit" in m.lower() or "support" in m for m in logged):
                raise CandidateRunError(
                    f"TensorRT-RTX cannot run engines on this GPU (compute capability {cc}): "
                    "here it is build-only. Run candidates with the 'tensorrt' module, or on a "
                    "GPU TensorRT-RTX supports.",
                    notes=logged[-3:],
                )
        raise CandidateRunError(
            f"{self._module} could not deserialize the engine (built by another version or for "
            "another GPU?). Rebuild the candidate on this machine.",
            notes=logged[-3:],
        )

    @staticmethod
    def _quietly(what: str, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # release everything else even if one call fails
            logger.debug("TensorRT runner cleanup (%s) failed: %s", what, exc)

    def _deactivate(self) -> None:
        self._drop_graph(quietly=True)
        for ptr, _ in self._buffers.values():
            self._quietly("free", _cuda.free, ptr)
        self._buffers.clear()
        self._shapes.clear()
        self._bound_on_device = False
        if self._events is not None:
            for event in self._events:
                self._quietly("event", _cuda.event_destroy, event)
            self._events = None
        if self._stream is not None:
            self._quietly("stream", _cuda.stream_destroy, self._stream)
            self._stream = None
            self._graph_stream = _RunnerStream(None)
        # Release in reverse order of creation: context, engine, runtime, then the logger.
        self._context = None
        self._engine = None
        self._runtime = None
        self._log = None

    def _drop_graph(self, *, quietly: bool = False) -> None:
        if quietly:
            self._quietly("graph", self._graph.drop, self._graph_stream)
        else:
            self._graph.drop(self._graph_stream)

    # --- buffers ---------------------------------------------------------------------------

    def _check_ready(self) -> None:
        self._check_active()
        if self._context is None:
            raise RuntimeError("TensorRTRunner has no execution context")

    def _ensure_buffer(self, name: str, nbytes: int) -> int:
        ptr, capacity = self._buffers.get(name, (0, -1))
        if nbytes > capacity:
            if ptr:
                _cuda.free(ptr)
                del self._buffers[name]
            ptr = _cuda.malloc(nbytes)
            self._buffers[name] = (ptr, max(nbytes, 1))
            self._drop_graph()  # a captured graph holds the old addresses
        return ptr

    def _prepare(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Sets input shapes, sizes the buffers and binds their addresses; returns the inputs."""
        arrays: dict[str, np.ndarray] = {}
        for name in self._inputs:
            arr = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])
            shape = tuple(int(d) for d in arr.shape)
            if shape != self._shapes.get(name):
                if not self._context.set_input_shape(name, shape):
                    raise CandidateRunError(
                        f"Input {name!r} of shape {list(shape)} is outside the engine's "
                        "optimization profile; rebuild with options shapes/min_shapes/"
                        "max_shapes covering it.",
                        notes=self._log.errors()[-3:],
                    )
                self._shapes[name] = shape
                self._drop_graph()  # a graph replays one set of shapes
            arrays[name] = arr
            self._set_address(name, self._ensure_buffer(name, arr.nbytes))
        for name in self._outputs:
            shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise CandidateRunError(
                    f"Output {name!r} has a data-dependent shape {list(shape)}; the TensorRT "
                    "runner needs output shapes known from the input shapes."
                )
            self._shapes[name] = shape
            nbytes = int(np.prod(shape, dtype=np.int64)) * self._dtypes[name].itemsize
            self._set_address(name, self._ensure_buffer(name, nbytes))
        return arrays

    def _set_address(self, name: str, ptr: int) -> None:
        # IExecutionContext.set_tensor_address returns False on failure (an unknown tensor name,
        # a null or misaligned address); TensorRT logs why.
        if not self._context.set_tensor_address(name, ptr):
            raise CandidateRunError(
                f"TensorRT refused the device address of I/O tensor {name!r} "
                "(set_tensor_address returned False); rebuild the candidate on this machine.",
                notes=self._log.errors()[-3:],
            )

    def _upload(self, arrays: Mapping[str, np.ndarray]) -> None:
        for name, arr in arrays.items():
            ptr = self._buffers[name][0]
            _cuda.memcpy_htod_async(ptr, arr.ctypes.data, arr.nbytes, self._stream)

    # --- running ---------------------------------------------------------------------------

    def _execute(self) -> None:
        # execute_async_v3(stream_handle) returns False on failure (10.x "IExecutionContext").
        if not self._context.execute_async_v3(_cuda.stream_handle(self._stream)):
            raise CandidateRunError(
                "TensorRT execute_async_v3 failed on the candidate.",
                notes=self._log.errors()[-3:],
            )

    def _capture(self) -> None:
        # Run once outside capture first so TensorRT finishes its deferred per-shape setup, then
        # capture one enqueue (TensorRT developer guide, "CUDA Graphs": enqueueV3 once before
        # cudaStreamBeginCapture; cudaGraphInstantiate/cudaGraphLaunch from the CUDA runtime).
        self._execute()
        _cuda.stream_synchronize(self._stream)
        self._log.quiet = True  # a refused capture is reported once, by CudaGraph's warning
        try:
            self._graph.capture(self._graph_stream, self._execute)
        finally:
            self._log.quiet = False
            self._info["cuda_graph"] = self._graph.describe()
            self._describe_execution()

    def _describe_execution(self) -> None:
        """``execution`` as every runner states it: whether timed runs replay a CUDA graph."""
        graph = self._graph.describe()
        self.execution = {"cuda_graph": graph["used"]}
        if graph["reason"] and graph["requested"]:
            self.execution["cuda_graph_reason"] = graph["reason"]

    def _ensure_bound(self) -> None:
        """Uploads the bound inputs again if an ``infer`` overwrote the device buffers."""
        if self._bound_on_device:
            return
        if not self._bound:
            raise RuntimeError("TensorRTRunner.run_once called before bind()")
        self._upload(self._prepare(self._bound))
        _cuda.stream_synchronize(self._stream)
        self._bound_on_device = True

    def _enqueue(self) -> None:
        """Queues one inference on the bound inputs (no synchronization)."""
        self._ensure_bound()
        if self._graph.wanted:
            self._capture()
        if self._graph.used:
            self._graph.launch(self._graph_stream)
        else:
            self._execute()

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_ready()
        self._bound_on_device = False  # the device buffers are about to hold these inputs
        arrays = self._prepare(feeds)
        self._upload(arrays)
        self._execute()
        outputs = {
            name: np.empty(self._shapes[name], dtype=self._dtypes[name]) for name in self._outputs
        }
        for name, out in outputs.items():
            ptr = self._buffers[name][0]
            _cuda.memcpy_dtoh_async(out.ctypes.data, ptr, out.nbytes, self._stream)
        _cuda.stream_synchronize(self._stream)  # `arrays` must live until here (async H2D)
        return outputs

    def _bind(self, feeds: Mapping[str, np.ndarray]) -> None:
        self._check_ready()
        self._bound = {name: np.ascontiguousarray(feeds[name]) for name in self._inputs}
        self._upload(self._prepare(self._bound))
        _cuda.stream_synchronize(self._stream)
        self._bound_on_device = True

    def _run_once(self) -> None:
        self._check_ready()
        self._enqueue()
        _cuda.stream_synchronize(self._stream)

    def timer(self) -> Callable[[Callable[[], None]], float]:
        """CUDA events (:meth:`event_timer`): the figure every search and refine records."""
        return self.event_timer

    def event_timer(self, step: Callable[[], None]) -> float:
        """One step's elapsed milliseconds, measured with CUDA events on the runner's stream.

        For :func:`amp_search.timing.measure`'s ``timer``. Given this runner's ``run_once``, the
        events bracket the enqueue alone (the stream's own work, without the host-side
        synchronization); any other step is bracketed whole and then synchronized.
        """
        self._check_ready()
        if self._events is None:
            raise RuntimeError("TensorRTRunner has no timing events")
        start, end = self._events
        if step == self.run_once:
            self._ensure_bound()  # any upload stays outside the timed interval
            if self._graph.wanted:
                self._capture()
                _cuda.stream_synchronize(self._stream)
            _cuda.event_record(start, self._stream)
            self._enqueue()
            _cuda.event_record(end, self._stream)
        else:
            _cuda.event_record(start, self._stream)
            step()
            _cuda.event_record(end, self._stream)
        _cuda.event_synchronize(end)
        return _cuda.event_elapsed_ms(start, end)
