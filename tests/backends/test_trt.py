"""The TensorRT backend.

Everywhere: the engine-inspector JSON parser (10.x and 11.x samples written from the documented
schemas), the optional-import contract (no tensorrt, no tensorrt_rtx, no cuda-python), options,
option validation (``tf32`` and the other 0/1 options, optimization-profile shapes), ``tf32`` in
the candidate's identity, the CUDA-graph capture fallback (:class:`CudaGraph`, our own decision
logic, over a recording stand-in for the runner's stream) and the driver/bindings version check.
No stand-in TensorRT or cuda-python: what needs them runs only where they import.

Where ``tensorrt`` or ``tensorrt_rtx`` imports (``@pytest.mark.tensorrt``): a real strongly typed
build of a mixed-precision demo model, the layer precisions it reports, the shared timing cache;
and where plain ``tensorrt`` and a GPU are present, a run compared with ONNX Runtime CPU.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from amp_search.backends import BuildConfig, get_backend
from amp_search.backends.trt import TensorRTBackend, layer_precisions
from amp_search.backends.trt import _cuda as trt_cuda
from amp_search.backends.trt import backend as trt_backend
from amp_search.backends.trt import builder as trt_builder
from amp_search.backends.trt.runner import CudaGraph
from amp_search.errors import (
    BackendUnavailableError,
    CandidateRunError,
    UserInputError,
)


def _findable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


TRT_MODULE = next((m for m in ("tensorrt", "tensorrt_rtx") if _findable(m)), None)
NO_TRT_REASON = (
    "TensorRT is not installable in this workplace (PyPI libs are stubs); runs where tensorrt "
    "imports"
)
NO_RUN_REASON = (
    "needs plain tensorrt, cuda-python and a CUDA GPU (TensorRT-RTX builds on an H100/H200 "
    "but cannot run engines there)"
)
requires_trt = pytest.mark.skipif(TRT_MODULE is None, reason=NO_TRT_REASON)


# --- engine-inspector JSON samples -------------------------------------------------------------
# TensorRT 10.x, ProfilingVerbosity.DETAILED (developer guide, "Engine Inspector"): each layer a
# dict; each tensor's type inside its "Format/Datatype" description; "Bindings" lists the I/O.
INSPECTOR_10X = json.dumps(
    {
        "Layers": [
            {
                "Name": "stem/Conv + stem/Relu",
                "LayerType": "CaskConvolution",
                "Inputs": [
                    {
                        "Name": "image",
                        "Location": "Device",
                        "Dimensions": [8, 3, 48, 48],
                        "Format/Datatype": "Row major linear FP32",
                    }
                ],
                "Outputs": [
                    {
                        "Name": "stem/out",
                        "Location": "Device",
                        "Dimensions": [8, 16, 48, 48],
                        "Format/Datatype": "Row major linear FP32",
                    }
                ],
                "ParameterType": "Convolution",
                "Kernel": [3, 3],
                "Weights": {"Type": "Float", "Count": 432},
                "TacticName": "sm90_xmma_fprop_implicit_gemm_f32f32_tf32f32_f32_nchwkcrs_nchw",
                "TacticValue": "0x0000000000020318",
            },
            {
                "Name": "tiny/Conv + tiny/Mul + amp_cast/tiny/out/to_fp16",
                "LayerType": "CaskConvolution",
                "Inputs": [
                    {
                        "Name": "rescale/out",
                        "Location": "Device",
                        "Dimensions": [8, 16, 12, 12],
                        "Format/Datatype": "Row major linear FP32",
                    }
                ],
                "Outputs": [
                    {
                        "Name": "tiny/out__fp16",
                        "Location": "Device",
                        "Dimensions": [8, 16, 12, 12],
                        "Format/Datatype": "Channel major FP16 format where channel % 8 == 0",
                    }
                ],
                "ParameterType": "Convolution",
                "TacticName": "sm90_xmma_fprop_implicit_gemm_f32f32_f32f32_f32_nchwkcrs_nchw",
            },
            {
                "Name": "head1/Conv + head1/Relu + amp_cast/head1/out__fp16/to_fp32",
                "LayerType": "CaskConvolution",
                "Inputs": [
                    {
                        "Name": "tiny/out__fp16",
                        "Location": "Device",
                        "Dimensions": [8, 16, 12, 12],
                        "Format/Datatype": "Channel major FP16 format where channel % 8 == 0",
                    }
                ],
                "Outputs": [
                    {
                        "Name": "head1/out",
                        "Location": "Device",
                        "Dimensions": [8, 32, 12, 12],
                        "Format/Datatype": "Row major linear FP32",
                    }
                ],
                "ParameterType": "Convolution",
                "Weights": {"Type": "Half", "Count": 4608},
                "TacticName": "sm90_xmma_fprop_implicit_gemm_f16f16_f16f16_f16_nhwckrsc_nhwc",
            },
            {
                "Name": "Reformatting CopyNode for Input Tensor 0 to fc/Gemm",
                "LayerType": "Reformat",
                "Inputs": [{"Name": "flat/out", "Dimensions": [8, 32], "Format/Datatype": "Half"}],
                "Outputs": [{"Name": "fc_in", "Dimensions": [8, 32], "Format/Datatype": "Float"}],
            },
            {
                "Name": "shape_of_image",
                "LayerType": "Shape",
                "Inputs": [],
                "Outputs": [
                    {
                        "Name": "s",
                        "Dimensions": [4],
                        "Format/Datatype": "Row major linear Int64 format",
                    }
                ],
            },
        ],
        "Bindings": ["image", "logits"],
    }
)

# Below DETAILED verbosity (LAYER_NAMES_ONLY, the default), layers are plain name strings.
INSPECTOR_NAMES_ONLY = json.dumps(
    {"Layers": ["stem/Conv + stem/Relu", "head1/Conv + head1/Relu"], "Bindings": ["image"]}
)

# TensorRT 11.x ("Migrating IEngineInspector Usage from TensorRT 10.x to 11.x"): "I/O Tensors"
# objects replace "Bindings"; a tensor's format and data type are separate keys.
INSPECTOR_11X = json.dumps(
    {
        "Layers": [
            {
                "Name": "stem/Conv + stem/Relu",
                "LayerType": "gemm",
                "Inputs": [
                    {
                        "Name": "image",
                        "Dimensions": [8, 3, 48, 48],
                        "Location": "Device",
                        "Format": "Row major linear FP32 format (kLINEAR)",
                        "Datatype": "Float",
                    }
                ],
                "Outputs": [
                    {
                        "Name": "stem/out",
                        "Dimensions": [8, 16, 48, 48],
                        "Location": "Device",
                        "Format": "kLINEAR",
                        "Datatype": "Float",
                    }
                ],
                "TacticName": "sm90_fixture_tactic_fp32",
            },
            {
                "Name": "head1/Conv + head1/Relu",
                "LayerType": "gemm",
                "Inputs": [
                    {
                        "Name": "t",
                        "Dimensions": [8, 16, 12, 12],
                        "Format": "kHWC8",
                        "Datatype": "Half",
                    }
                ],
                "Outputs": [
                    {
                        "Name": "u",
                        "Dimensions": [8, 32, 12, 12],
                        "Format": "kHWC8",
                        "DataType": "FP16",
                    }
                ],
                "TacticName": "sm90_fixture_tactic_fp16",
            },
            {"Name": "__myl_fused_head2", "LayerType": "kgen", "Precision": "FP16"},
            {
                "Name": "fc/Gemm",
                "LayerType": "gemm",
                "Inputs": [{"Name": "v", "DataType": "BFloat16"}],
            },
        ],
        "I/O Tensors": [
            {
                "Name": "image",
                "IOMode": "Input",
                "DataType": "Float",
                "Dimensions": [-1, 3, 48, 48],
                "Location": "Device",
                "IsShapeInferenceIO": False,
                "ProfileInfo": [
                    {
                        "MinShape": [8, 3, 48, 48],
                        "OptShape": [8, 3, 48, 48],
                        "MaxShape": [8, 3, 48, 48],
                        "Format": "Row major linear FP32 format (kLINEAR)",
                    }
                ],
            }
        ],
    }
)


def test_layer_precisions_reads_the_10x_schema():
    got = layer_precisions(INSPECTOR_10X)
    assert list(got) == [
        "stem/Conv + stem/Relu",
        "tiny/Conv + tiny/Mul + amp_cast/tiny/out/to_fp16",
        "head1/Conv + head1/Relu + amp_cast/head1/out__fp16/to_fp32",
        "Reformatting CopyNode for Input Tensor 0 to fc/Gemm",
        "shape_of_image",
    ]
    assert got["stem/Conv + stem/Relu"] == "fp32"
    # A fused layer runs in its inputs' type; its output is already cast for the next layer.
    assert got["tiny/Conv + tiny/Mul + amp_cast/tiny/out/to_fp16"] == "fp32"
    assert got["head1/Conv + head1/Relu + amp_cast/head1/out__fp16/to_fp32"] == "fp16"
    assert got["Reformatting CopyNode for Input Tensor 0 to fc/Gemm"] == "fp16"  # "Half"
    assert got["shape_of_image"] == "int64"  # no inputs: its output's type


def test_layer_precisions_reads_the_11x_schema():
    got = layer_precisions(json.loads(INSPECTOR_11X))  # a parsed document works too
    assert got == {
        "stem/Conv + stem/Relu": "fp32",
        "head1/Conv + head1/Relu": "fp16",
        "__myl_fused_head2": "fp16",  # an explicit layer-level "Precision" key
        "fc/Gemm": "bf16",
    }


def test_layer_precisions_without_detailed_verbosity_are_unknown():
    assert layer_precisions(INSPECTOR_NAMES_ONLY.encode()) == {
        "stem/Conv + stem/Relu": "unknown",
        "head1/Conv + head1/Relu": "unknown",
    }


def test_layer_precisions_single_layer_duplicates_and_bad_input():
    one = json.loads(INSPECTOR_10X)["Layers"][2]  # get_layer_information's shape: one layer
    assert layer_precisions(one) == {one["Name"]: "fp16"}
    dup = {"Layers": [{"Name": "a", "Precision": "FP32"}, {"Name": "a", "Precision": "Half"}]}
    assert layer_precisions(dup) == {"a": "fp32", "a_2": "fp16"}
    assert layer_precisions({"Layers": [{"Name": "x", "Inputs": [{"Format": "kLINEAR"}]}]}) == {
        "x": "unknown"
    }
    with pytest.raises(ValueError, match="Not engine-inspector JSON"):
        layer_precisions("{not json")
    with pytest.raises(TypeError, match="ICudaEngine"):
        layer_precisions(3.5)


def test_import_without_tensorrt_or_cuda_python():
    code = (
        "import sys\n"
        "for m in ('tensorrt', 'tensorrt_rtx', 'cuda'): sys.modules[m] = None\n"
        "import amp_search.backends.trt as t\n"
        "from amp_search.backends import get_backend, available_backends\n"
        "b = get_backend('tensorrt')\n"
        "assert type(b) is t.TensorRTBackend, type(b)\n"
        "assert not b.is_available()\n"
        "assert 'amp-search[tensorrt]' in available_backends()['tensorrt']\n"
        "assert all(sys.modules.get(m) is None for m in ('tensorrt', 'tensorrt_rtx', 'cuda'))\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def _without_trt(monkeypatch):
    for name in ("tensorrt", "tensorrt_rtx", "cuda"):
        monkeypatch.setitem(sys.modules, name, None)


def test_unavailable_backend_says_how_to_install(monkeypatch):
    _without_trt(monkeypatch)
    assert TensorRTBackend.is_available() is False
    reason = TensorRTBackend.unavailable_reason()
    assert reason is not None
    assert "pip install 'amp-search[tensorrt]'" in reason
    assert "tensorrt_rtx" in reason


def _import_path(monkeypatch, folder):
    """Python finds top-level modules in ``folder`` only (none loaded yet)."""
    for name in ("tensorrt", "tensorrt_rtx", "cuda"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "path", [str(folder)])
    importlib.invalidate_caches()


def test_backend_is_unavailable_where_tensorrt_is_not_installed(monkeypatch, tmp_path):
    # Not installed (nothing on the import path), as opposed to an import blocked above.
    _import_path(monkeypatch, tmp_path)
    assert TensorRTBackend.is_available() is False
    assert "pip install 'amp-search[tensorrt]'" in (TensorRTBackend.unavailable_reason() or "")


# Ids that are not marker names: an id "tensorrt" would read as the tensorrt marker (conftest).
@pytest.mark.parametrize("module", trt_builder.MODULES, ids=["plain", "rtx"])
def test_an_installed_tensorrt_is_found_without_importing_it(monkeypatch, tmp_path, module):
    package = tmp_path / module
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")
    _import_path(monkeypatch, tmp_path)
    assert TensorRTBackend.is_available() is True
    assert TensorRTBackend.unavailable_reason() is None
    assert module not in sys.modules


def test_build_without_tensorrt_raises_a_typed_error(monkeypatch, tmp_path):
    _without_trt(monkeypatch)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"not read")
    with pytest.raises(BackendUnavailableError, match=r"amp-search\[tensorrt\]"):
        get_backend("tensorrt").build(path, BuildConfig("cuda"))


def test_module_imports_raise_typed_errors_without_the_packages(monkeypatch):
    _without_trt(monkeypatch)
    with pytest.raises(BackendUnavailableError, match="tensorrt_rtx") as err:
        trt_builder.import_trt("auto")
    assert "pip install 'amp-search[tensorrt]'" in str(err.value)
    with pytest.raises(BackendUnavailableError, match="'tensorrt_rtx' package"):
        trt_builder.import_trt("tensorrt_rtx")
    with pytest.raises(UserInputError, match="module"):
        trt_builder.import_trt("onnxruntime")
    trt_cuda.runtime.cache_clear()
    try:
        with pytest.raises(BackendUnavailableError, match="cuda-python"):
            trt_cuda.stream_create()
    finally:
        trt_cuda.runtime.cache_clear()


# --- options -----------------------------------------------------------------------------------


def test_options_are_validated():
    backend = TensorRTBackend()
    with pytest.raises(UserInputError, match="CUDA devices only"):
        backend.resolve_options(BuildConfig("cpu"))
    with pytest.raises(UserInputError, match="Unknown tensorrt option"):
        backend.resolve_options(BuildConfig("cuda", {"fp16": 1}))
    with pytest.raises(UserInputError, match="module"):
        backend.resolve_options(BuildConfig("cuda", {"module": "trt"}))
    opts = backend.resolve_options(BuildConfig("cuda:1", {"builder_optimization_level": 1}))
    assert opts["builder_optimization_level"] == 1
    assert opts["module"] == "auto"
    assert opts["tf32"] == 0  # FP32 layers are FP32 unless asked (TensorRT's default is on)


@pytest.mark.parametrize("value", [0, 1, True, False, "0", "1"])
def test_tf32_accepts_0_and_1(value):
    opts = TensorRTBackend().resolve_options(BuildConfig("cuda", {"tf32": value}))
    assert opts["tf32"] == int(value)
    assert type(opts["tf32"]) is int  # stored as an int: tf32=True and tf32=1 are one identity


@pytest.mark.parametrize("value", [2, -1, 0.5, "yes", "true", None, [1]])
@pytest.mark.parametrize("key", ["tf32", "cuda_graph", "timing_cache"])
def test_flag_options_reject_anything_but_0_and_1(key, value):
    with pytest.raises(UserInputError, match=f"TensorRT option {key} must be 0 or 1") as err:
        TensorRTBackend().resolve_options(BuildConfig("cuda", {key: value}))
    assert "\n" not in str(err.value)


def test_tf32_is_part_of_the_identity(monkeypatch):
    # identity() asks TensorRT for its version and nvidia-smi for the GPU; both are fixed here
    # (our own lookups, not TensorRT) so the options part can be compared without either.
    monkeypatch.setattr(TensorRTBackend, "_module", lambda self, opts: ("tensorrt", "10.13.3"))
    monkeypatch.setattr(trt_backend, "gpu_name", lambda device_id: "NVIDIA H200")
    backend = TensorRTBackend()
    base = {"shapes": {"image": [8, 3, 48, 48]}, "timing_cache_dir": "/tmp/a"}
    off = backend.identity(BuildConfig("cuda", base))
    on = backend.identity(BuildConfig("cuda", {**base, "tf32": 1}))
    assert off["options"]["tf32"] == 0
    assert on["options"]["tf32"] == 1
    assert json.dumps(off, sort_keys=True) != json.dumps(on, sort_keys=True)
    assert {k for k in on["options"] if on["options"][k] != off["options"][k]} == {"tf32"}
    # The same engine however it is spelled, and wherever the timing cache lives.
    same = backend.identity(BuildConfig("cuda", {**base, "tf32": True, "timing_cache_dir": "/b"}))
    assert same == on
    assert "timing_cache_dir" not in on["options"]


def test_profile_shapes_for_dynamic_inputs():
    inputs = [("image", (-1, 3, 48, 48)), ("scale", (1,))]
    got = trt_builder._profile_shapes(inputs, {"shapes": {"image": [8, 3, 48, 48]}})
    assert got == {"image": ((8, 3, 48, 48),) * 3}  # static inputs need no profile
    got = trt_builder._profile_shapes(
        inputs, {"shapes": {"image": [8, 3, 48, 48]}, "max_shapes": {"image": [16, 3, 48, 48]}}
    )
    assert got["image"] == ((8, 3, 48, 48), (8, 3, 48, 48), (16, 3, 48, 48))
    with pytest.raises(UserInputError, match="dynamic shape"):
        trt_builder._profile_shapes(inputs, {})
    with pytest.raises(UserInputError, match="does not fit"):
        trt_builder._profile_shapes(inputs, {"shapes": {"image": [8, 1, 48, 48]}})
    with pytest.raises(UserInputError, match="unknown input"):
        trt_builder._profile_shapes(inputs, {"shapes": {"img": [8, 3, 48, 48]}})


_DYNAMIC = [("image", (-1, 3, -1, 48))]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (  # min > opt
            {"shapes": {"image": [8, 3, 48, 48]}, "min_shapes": {"image": [16, 3, 48, 48]}},
            r"min <= opt <= max .*dimension 0: 16, 8, 8\); fix options min_shapes",
        ),
        (  # opt > max, in the second dynamic dimension
            {"shapes": {"image": [8, 3, 64, 48]}, "max_shapes": {"image": [8, 3, 32, 48]}},
            r"min <= opt <= max .*dimension 2: 64, 64, 32\)",
        ),
        (  # a rank that differs between the bounds
            {"shapes": {"image": [8, 3, 48, 48]}, "max_shapes": {"image": [8, 3, 48]}},
            r"must all have its rank 4 .*max \[8, 3, 48\]; fix options",
        ),
        (  # a rank that differs from the input's
            {"shapes": {"image": [8, 3, 48, 48, 1]}},
            r"must all have its rank 4",
        ),
        (  # a static dimension changed
            {"shapes": {"image": [8, 4, 48, 48]}},
            r"given as min for input 'image' does not fit .*change only its -1 dimensions",
        ),
    ],
)
def test_profile_shapes_are_checked_up_front(options, message):
    with pytest.raises(UserInputError, match=message) as err:
        trt_builder._profile_shapes(_DYNAMIC, options)
    assert "\n" not in str(err.value)  # one line, saying what to do


def test_profile_shapes_accept_a_range():
    got = trt_builder._profile_shapes(
        _DYNAMIC,
        {
            "min_shapes": {"image": [1, 3, 32, 48]},
            "opt_shapes": {"image": [8, 3, 48, 48]},
            "max_shapes": {"image": [16, 3, 64, 48]},
        },
    )
    assert got == {"image": ((1, 3, 32, 48), (8, 3, 48, 48), (16, 3, 64, 48))}


# --- CUDA graph capture fallback (our decision logic; no CUDA here) ------------------------------


class RecordingStream:
    """Stands in for the runner's stream operations (``_RunnerStream``): records the calls."""

    def __init__(self, fail_at=None, error=None):
        self.calls = []
        self.fail_at = fail_at
        self.error = error or CandidateRunError(
            "CUDA call cudaStreamEndCapture failed with cudaErrorStreamCaptureInvalidated; "
            "the GPU could not run the candidate.",
            notes=["cuda-python runtime.cudaStreamEndCapture(...)"],
        )

    def _step(self, name, result=None):
        self.calls.append(name)
        if name == self.fail_at:
            raise self.error
        return result

    def begin_capture(self):
        self._step("begin")

    def end_capture(self):
        return self._step("end", "graph-exec")

    def abort_capture(self):
        self.calls.append("abort")

    def launch(self, graph_exec):
        self.calls.append(f"launch {graph_exec}")

    def destroy(self, graph_exec):
        self.calls.append(f"destroy {graph_exec}")

    def enqueue(self):
        self._step("enqueue")


def test_cuda_graph_captures_launches_and_recaptures_after_a_drop(caplog):
    graph, stream = CudaGraph(True), RecordingStream()
    assert graph.wanted
    assert graph.describe() == {
        "requested": True, "used": False, "reason": "not captured yet (no timed run)",
    }  # fmt: skip
    assert graph.capture(stream, stream.enqueue) is True
    assert stream.calls == ["begin", "enqueue", "end"]
    assert graph.used
    assert not graph.wanted
    assert graph.describe() == {"requested": True, "used": True, "reason": None}
    graph.launch(stream)
    graph.drop(stream)  # new shapes or buffers: the next timed run captures again
    assert stream.calls[-2:] == ["launch graph-exec", "destroy graph-exec"]
    assert graph.wanted
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize("fail_at", ["begin", "enqueue", "end"])
def test_failed_capture_ends_it_warns_once_and_falls_back(caplog, fail_at):
    graph = CudaGraph(True)
    refused = CandidateRunError(
        "TensorRT execute_async_v3 failed on the candidate.",
        notes=["operation not permitted when stream is capturing"],
    )
    stream = RecordingStream(fail_at=fail_at, error=refused)
    with caplog.at_level("WARNING", logger="amp_search.backends.trt.runner"):
        assert graph.capture(stream, stream.enqueue) is False
        assert graph.capture(stream, stream.enqueue) is False  # never tried again
    assert stream.calls[-1] == "abort"  # the capture is ended, whatever step failed
    assert stream.calls.count("begin") == 1
    assert not graph.used
    assert not graph.wanted
    info = graph.describe()
    assert info["requested"] is True
    assert info["used"] is False
    assert info["reason"].startswith("capture failed: TensorRT execute_async_v3 failed")
    assert "not permitted when stream is capturing" in info["reason"]
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "without a graph" in warnings[0].getMessage()
    graph.drop(stream)  # nothing to destroy
    assert not any(c.startswith("destroy") for c in stream.calls)


def test_a_bug_during_capture_ends_it_and_propagates():
    graph = CudaGraph(True)
    stream = RecordingStream(fail_at="enqueue", error=TypeError("a bug, not a refusal"))
    with pytest.raises(TypeError, match="a bug"):
        graph.capture(stream, stream.enqueue)
    assert stream.calls == ["begin", "enqueue", "abort"]
    assert graph.failure is None


def test_cuda_graph_not_requested_does_nothing():
    graph, stream = CudaGraph(False), RecordingStream()
    assert not graph.wanted
    assert graph.capture(stream, stream.enqueue) is False
    assert stream.calls == []
    assert graph.describe() == {
        "requested": False, "used": False, "reason": "option cuda_graph is 0",
    }  # fmt: skip
    with pytest.raises(RuntimeError, match="without a captured graph"):
        graph.launch(stream)


# --- cuda-python against the driver ------------------------------------------------------------


@pytest.mark.parametrize(
    ("driver", "bindings"),
    [(13000, 13050), (12080, 12090), (12020, 12090), (13000, 12090), (13010, 13000)],
)
def test_driver_check_passes_when_the_major_is_supported(driver, bindings):
    trt_cuda.check_driver_version(driver, bindings)


def test_driver_check_says_which_cuda_python_to_install():
    with pytest.raises(BackendUnavailableError, match="CUDA 13.*CUDA 12.8") as err:
        trt_cuda.check_driver_version(12080, 13050)
    message = str(err.value)
    assert "pip install 'cuda-python<13'" in message
    assert "580.65" in message
    assert "\n" not in message


# --- real TensorRT -----------------------------------------------------------------------------


def _mixed_demo(folder: Path, fp16_units):
    from amp_search.demo import build_demo_model
    from amp_search.graph import MixedPrecisionRewriter, find_units, sanitize
    from amp_search.types import PrecisionAssignment

    model = sanitize(build_demo_model())
    units = find_units(model)
    mixed, _ = MixedPrecisionRewriter(model, units).apply(
        PrecisionAssignment.with_fp16([u.name for u in units], fp16_units)
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(mixed, path)
    return path


def _layers_mentioning(layers_json: Path, node: str) -> list[str]:
    """Engine layers whose name or metadata names the ONNX node."""
    doc = json.loads(layers_json.read_text())
    names = []
    for layer in doc.get("Layers", []):
        if isinstance(layer, dict):
            text = f"{layer.get('Name', '')} {layer.get('Metadata', '')}"
            if node in text:
                names.append(str(layer.get("Name")))
    return names


def _trt_config(tmp_path, **extra):
    return BuildConfig(
        "cuda",
        {
            "shapes": {"image": [8, 3, 48, 48]},
            "builder_optimization_level": 0,
            "timing_cache_dir": str(tmp_path / "caches"),
            **extra,
        },
    )


@pytest.mark.tensorrt
@requires_trt
def test_real_build_is_strongly_typed_and_reports_layer_precisions(tmp_path):
    backend = get_backend("tensorrt")
    config = _trt_config(tmp_path)
    cand = backend.build(_mixed_demo(tmp_path / "a", ["head1/Conv"]), config)
    assert cand.artifacts["engine"].stat().st_size > 0
    assert cand.identity["module"] == TRT_MODULE
    assert cand.info["settings"]["profile"] == {"image": [[8, 3, 48, 48]] * 3}
    assert cand.identity["options"]["tf32"] == 0
    assert cand.info["settings"]["tf32"] in (False, "not supported by this module")
    if cand.info["layer_info_error"]:
        pytest.skip(f"no layer information here: {cand.info['layer_info_error']}")
    precisions = cand.info["layer_precisions"]
    fp16 = _layers_mentioning(cand.artifacts["layer_info"], "head1/Conv")
    fp32 = _layers_mentioning(cand.artifacts["layer_info"], "stem/Conv")
    assert fp16, sorted(precisions)
    assert fp32, sorted(precisions)
    assert {precisions[n] for n in fp16} == {"fp16"}
    assert {precisions[n] for n in fp32} == {"fp32"}


@pytest.mark.tensorrt
@requires_trt
def test_real_builds_share_the_timing_cache(tmp_path):
    backend = get_backend("tensorrt")
    config = _trt_config(tmp_path)
    first = backend.build(_mixed_demo(tmp_path / "a", []), config)
    assert first.info["settings"]["timing_cache_loaded"] is False
    cache = backend.timing_cache_path(config)
    if first.identity["module"] == "tensorrt_rtx":  # its timing cache is a no-op since 1.2
        assert cache is None
        assert first.info["timing_cache"] is None
        return
    assert cache is not None
    assert cache.is_file()
    assert cache.stat().st_size > 0
    second = backend.build(_mixed_demo(tmp_path / "b", ["head2/Conv"]), config)
    assert second.info["settings"]["timing_cache_loaded"] is True
    assert second.info["timing_cache"] == str(cache)


def _can_run_tensorrt() -> bool:
    return (
        TRT_MODULE == "tensorrt"
        and shutil.which("nvidia-smi") is not None
        and (_findable("cuda.bindings") or _findable("cuda.cudart"))
    )


@pytest.mark.tensorrt  # the GPU is checked below: the gpu marker means the CUDA EP here
@pytest.mark.skipif(
    not _can_run_tensorrt(),
    reason=NO_TRT_REASON if TRT_MODULE is None else NO_RUN_REASON,
)
@pytest.mark.parametrize("cuda_graph", [0, 1])
def test_real_engine_matches_onnxruntime_cpu(tmp_path, cuda_graph):
    from amp_search.demo import demo_data
    from amp_search.timing import TimingPlan, measure

    path = _mixed_demo(tmp_path / "a", ["head1/Conv", "head2/Conv"])
    feeds = {"image": demo_data(n_batches=1, batch=8)["image"][0]}
    ort = get_backend("onnxruntime")
    with ort.open(ort.build(path, BuildConfig("cpu"))) as runner:
        expected = runner.infer(feeds)["logits"]
    trt = get_backend("tensorrt")
    cand = trt.build(path, _trt_config(tmp_path, cuda_graph=cuda_graph))
    with trt.open(cand) as runner:
        got = runner.infer(feeds)["logits"]
        runner.bind(feeds)
        stats = measure(runner.run_once, source=runner.source, timer=runner.event_timer,
                        plan=TimingPlan(min_pairs=3, max_pairs=3))  # fmt: skip
        again = runner.infer(feeds)["logits"]
    assert runner.info is cand.info["runner"]  # recorded with the candidate
    assert runner.info["nvtx_verbosity"] == "LAYER_NAMES_ONLY"
    assert runner.info["cuda_graph"]["used"] is bool(cuda_graph), runner.info["cuda_graph"]
    assert got.shape == expected.shape
    assert got.dtype == np.float32
    rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert rel < 2e-2, rel
    np.testing.assert_array_equal(got, again)
    assert stats.source == "measured:tensorrt-cuda"
    assert stats.n_runs == 5
    assert 0 < stats.median_ms < 1000


def test_engines_are_built_for_the_calibration_shapes_unless_given():
    feeds = {"x": np.zeros((4, 3, 48, 192), np.float32)}
    backend = TensorRTBackend()
    assert backend.options_for_data({}, feeds) == {"shapes": {"x": [4, 3, 48, 192]}}
    given = {"shapes": {"x": [1, 3, 48, 192]}, "tf32": 0}
    assert backend.options_for_data(given, feeds) == given
    assert backend.timer_name == "cuda events"
