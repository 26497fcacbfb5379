"""A thin, checked wrapper over the CUDA runtime API of cuda-python, for the TensorRT runner.

Every call goes through :func:`_call`, which raises
:class:`~amp_search.errors.CandidateRunError` naming the CUDA error (``cudaErrorMemoryAllocation``,
...) instead of returning cuda-python's ``(err, value)`` tuples. Handles are plain ints (device
pointers) or cuda-python's own handle objects (streams, events, graphs), passed back unchanged.

cuda-python is imported only when a function here is first called (``cuda.bindings.runtime`` in
cuda-python 12.6+ and 13.x, ``cuda.cudart`` in older 12.x releases); without it the functions
raise :class:`~amp_search.errors.BackendUnavailableError` with the install command. On import the
driver is checked against the bindings' CUDA major (cuda-python 13.x needs a CUDA 13 driver,
580.65 or newer): an older driver raises the same error, saying to install ``cuda-python<13``.

API reference: the cuda-python "cuda.bindings.runtime" module docs (12.x/13.x); each function
returns a tuple whose first item is a ``cudaError_t`` (``cudaSuccess`` is 0), followed by the
C function's out-parameters.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from amp_search._optional import require
from amp_search.errors import BackendUnavailableError, CandidateRunError

__all__ = [
    "check_driver_version",
    "compute_capability",
    "event_create",
    "event_destroy",
    "event_elapsed_ms",
    "event_record",
    "event_synchronize",
    "free",
    "graph_capture_abort",
    "graph_capture_begin",
    "graph_capture_end",
    "graph_destroy",
    "graph_exec_destroy",
    "graph_instantiate",
    "graph_launch",
    "malloc",
    "memcpy_dtoh_async",
    "memcpy_htod_async",
    "runtime",
    "set_device",
    "stream_create",
    "stream_destroy",
    "stream_handle",
    "stream_synchronize",
]

logger = logging.getLogger(__name__)

_WHAT = "The TensorRT backend's CUDA calls (cuda-python)"


@functools.lru_cache(maxsize=1)
def runtime() -> Any:
    """The cuda-python runtime module (``cuda.bindings.runtime``, else ``cuda.cudart``).

    Raises:
        BackendUnavailableError: cuda-python is missing, or built for a newer CUDA major than
            the driver supports.
    """
    try:
        rt = require("cuda.bindings.runtime", extra="tensorrt", what=_WHAT)
    except BackendUnavailableError as first:
        try:  # cuda-python < 12.6 only has the old module name
            rt = require("cuda.cudart", extra="tensorrt", what=_WHAT)
        except BackendUnavailableError:
            raise first from None
    _check_driver(rt)
    return rt


def check_driver_version(driver_version: int, runtime_version: int) -> None:
    """Raises unless the driver supports the CUDA major the bindings were built for.

    Args:
        driver_version: ``cudaDriverGetVersion``'s value, 1000 * major + 10 * minor (12080).
        runtime_version: ``cudaRuntimeGetVersion``'s value: the bindings' CUDA version (13000).

    Raises:
        BackendUnavailableError: The driver's CUDA major is below the bindings' (a CUDA 12
            driver under cuda-python 13.x, which needs driver 580.65 or newer).
    """
    need, have = runtime_version // 1000, driver_version // 1000
    if have >= need:
        return
    raise BackendUnavailableError(
        f"cuda-python here is built for CUDA {need}, but the NVIDIA driver supports only CUDA "
        f"{have}.{driver_version % 1000 // 10}; install bindings for this driver with: "
        f"pip install 'cuda-python<{have + 1}' (or update the driver"
        + (", to 580.65 or newer for CUDA 13" if need == 13 else "")
        + ")."
    )


def _check_driver(rt: Any) -> None:
    """:func:`check_driver_version` on this machine (cudaDriverGetVersion/cudaRuntimeGetVersion).

    ``cudaDriverGetVersion`` reports what the driver's ``cuDriverGetVersion`` does, and 0 where no
    driver is installed: that case is left to the first real call, which names it.
    """
    try:
        err, driver_version = rt.cudaDriverGetVersion()
        err2, runtime_version = rt.cudaRuntimeGetVersion()
    except Exception as exc:  # a query that fails must not hide the real call's error
        logger.debug("Could not read the CUDA driver/runtime versions: %s", exc)
        return
    if int(err) or int(err2) or not driver_version:
        return
    check_driver_version(int(driver_version), int(runtime_version))


def _error_name(rt: Any, err: Any) -> str:
    name = getattr(err, "name", None)
    if isinstance(name, str):
        return name
    try:
        res = rt.cudaGetErrorName(err)
        text = res[1] if isinstance(res, tuple) else res
        return text.decode() if isinstance(text, bytes) else str(text)
    except Exception:  # the name is only for the message
        return f"cudaError {int(err)}"


def _call(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Calls ``fn(*args)``; raises CandidateRunError unless it returned cudaSuccess."""
    rt = runtime()
    result = fn(*args)
    err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if int(err) != 0:
        name = _error_name(rt, err)
        raise CandidateRunError(
            f"CUDA call {what} failed with {name}; the GPU could not run the candidate.",
            notes=[f"cuda-python {getattr(rt, '__name__', 'runtime')}.{fn.__name__}{args!r}"],
        )
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def set_device(device_id: int) -> None:
    """Makes ``device_id`` the current device of this thread (``cudaSetDevice``)."""
    rt = runtime()
    _call("cudaSetDevice", rt.cudaSetDevice, int(device_id))


def compute_capability(device_id: int) -> tuple[int, int]:
    """The device's compute capability, e.g. ``(9, 0)`` (``cudaDeviceGetAttribute``)."""
    rt = runtime()
    attr = rt.cudaDeviceAttr
    major = _call(
        "cudaDeviceGetAttribute", rt.cudaDeviceGetAttribute,
        attr.cudaDevAttrComputeCapabilityMajor, int(device_id),
    )  # fmt: skip
    minor = _call(
        "cudaDeviceGetAttribute", rt.cudaDeviceGetAttribute,
        attr.cudaDevAttrComputeCapabilityMinor, int(device_id),
    )  # fmt: skip
    return int(major), int(minor)


def malloc(nbytes: int) -> int:
    """Allocates ``nbytes`` of device memory (at least 1 byte); returns the pointer."""
    rt = runtime()
    return int(_call("cudaMalloc", rt.cudaMalloc, max(1, int(nbytes))))


def free(ptr: int) -> None:
    """Frees device memory from :func:`malloc`."""
    rt = runtime()
    _call("cudaFree", rt.cudaFree, int(ptr))


def memcpy_htod_async(dst: int, src_host_ptr: int, nbytes: int, stream: Any) -> None:
    """Copies ``nbytes`` from host address ``src_host_ptr`` to device ``dst`` on ``stream``."""
    rt = runtime()
    kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
    _call("cudaMemcpyAsync(H2D)", rt.cudaMemcpyAsync, int(dst), int(src_host_ptr),
          int(nbytes), kind, stream)  # fmt: skip


def memcpy_dtoh_async(dst_host_ptr: int, src: int, nbytes: int, stream: Any) -> None:
    """Copies ``nbytes`` from device ``src`` to host address ``dst_host_ptr`` on ``stream``."""
    rt = runtime()
    kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
    _call("cudaMemcpyAsync(D2H)", rt.cudaMemcpyAsync, int(dst_host_ptr), int(src),
          int(nbytes), kind, stream)  # fmt: skip


def stream_create() -> Any:
    """A new non-default stream (``cudaStreamCreate``); TensorRT must not run on stream 0."""
    rt = runtime()
    return _call("cudaStreamCreate", rt.cudaStreamCreate)


def stream_synchronize(stream: Any) -> None:
    """Waits until everything queued on ``stream`` has finished."""
    rt = runtime()
    _call("cudaStreamSynchronize", rt.cudaStreamSynchronize, stream)


def stream_destroy(stream: Any) -> None:
    """Destroys a stream from :func:`stream_create`."""
    rt = runtime()
    _call("cudaStreamDestroy", rt.cudaStreamDestroy, stream)


def stream_handle(stream: Any) -> int:
    """The stream as the integer handle TensorRT's ``execute_async_v3`` takes."""
    return int(stream)


def event_create() -> Any:
    """A new timing-capable event (``cudaEventCreate``, default flags)."""
    rt = runtime()
    return _call("cudaEventCreate", rt.cudaEventCreate)


def event_record(event: Any, stream: Any) -> None:
    """Records ``event`` on ``stream`` (``cudaEventRecord``)."""
    rt = runtime()
    _call("cudaEventRecord", rt.cudaEventRecord, event, stream)


def event_synchronize(event: Any) -> None:
    """Waits until ``event`` has completed (``cudaEventSynchronize``)."""
    rt = runtime()
    _call("cudaEventSynchronize", rt.cudaEventSynchronize, event)


def event_elapsed_ms(start: Any, end: Any) -> float:
    """Milliseconds between two completed events (``cudaEventElapsedTime``, ~0.5 us resolution)."""
    rt = runtime()
    return float(_call("cudaEventElapsedTime", rt.cudaEventElapsedTime, start, end))


def event_destroy(event: Any) -> None:
    """Destroys an event from :func:`event_create`."""
    rt = runtime()
    _call("cudaEventDestroy", rt.cudaEventDestroy, event)


def graph_capture_begin(stream: Any) -> None:
    """Starts capturing ``stream`` into a CUDA graph.

    In ``cudaStreamCaptureModeThreadLocal``, as trtexec does: only this thread's unsafe calls
    (a ``cudaMalloc`` say) invalidate the capture, not those of another thread building or
    running another candidate meanwhile.
    """
    rt = runtime()
    mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    _call("cudaStreamBeginCapture", rt.cudaStreamBeginCapture, stream, mode)


def graph_capture_end(stream: Any) -> Any:
    """Ends the capture started by :func:`graph_capture_begin`; returns the graph."""
    rt = runtime()
    return _call("cudaStreamEndCapture", rt.cudaStreamEndCapture, stream)


def graph_capture_abort(stream: Any) -> None:
    """Ends a failed capture and drops what it captured (trtexec's ``endCaptureOnError``).

    If ``stream`` is still capturing (``cudaStreamIsCapturing``), ``cudaStreamEndCapture`` ends
    it: an invalidated capture returns ``cudaErrorStreamCaptureInvalidated`` and no graph, any
    graph it does return is destroyed unused. ``cudaGetLastError`` then clears the error the
    failed capture left. Never raises: the caller is already handling the failure.
    """
    rt = runtime()
    try:
        err, status = rt.cudaStreamIsCapturing(stream)
        none = rt.cudaStreamCaptureStatus.cudaStreamCaptureStatusNone
        if int(err) != 0 or status != none:
            err, graph = rt.cudaStreamEndCapture(stream)
            if int(err) == 0 and graph is not None:
                rt.cudaGraphDestroy(graph)
        rt.cudaGetLastError()
    except Exception as exc:  # cleanup after a failure: the first error is the one to report
        logger.debug("Ending the failed CUDA graph capture failed too: %s", exc)


def graph_instantiate(graph: Any) -> Any:
    """Instantiates a captured graph (``cudaGraphInstantiate(graph, flags=0)``, CUDA 12+)."""
    rt = runtime()
    return _call("cudaGraphInstantiate", rt.cudaGraphInstantiate, graph, 0)


def graph_launch(graph_exec: Any, stream: Any) -> None:
    """Launches an instantiated graph on ``stream`` (``cudaGraphLaunch``)."""
    rt = runtime()
    _call("cudaGraphLaunch", rt.cudaGraphLaunch, graph_exec, stream)


def graph_exec_destroy(graph_exec: Any) -> None:
    """Destroys an instantiated graph (``cudaGraphExecDestroy``)."""
    rt = runtime()
    _call("cudaGraphExecDestroy", rt.cudaGraphExecDestroy, graph_exec)


def graph_destroy(graph: Any) -> None:
    """Destroys a captured graph (``cudaGraphDestroy``)."""
    rt = runtime()
    _call("cudaGraphDestroy", rt.cudaGraphDestroy, graph)
