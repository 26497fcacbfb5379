"""The TensorRT backend.

Everywhere: the engine-inspector JSON parser (10.x and 11.x samples written from the documented
schemas), the optional-import contract (no tensorrt, no tensorrt_rtx, no cuda-python), options,
and option validation. No stand-in TensorRT: what needs TensorRT runs only where it imports.

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
from amp_search.backends.trt import builder as trt_builder
from amp_search.errors import (
    BackendUnavailableError,
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


@pytest.mark.skipif(TRT_MODULE is not None, reason="TensorRT imports here")
def test_backend_is_unavailable_in_this_workplace():
    assert TensorRTBackend.is_available() is False
    assert "pip install 'amp-search[tensorrt]'" in (TensorRTBackend.unavailable_reason() or "")


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
    from amp_search.timing import measure

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
        stats = measure(runner.run_once, source=runner.source, timer=runner.event_timer, runs=5)
        again = runner.infer(feeds)["logits"]
    assert got.shape == expected.shape
    assert got.dtype == np.float32
    rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert rel < 2e-2, rel
    np.testing.assert_array_equal(got, again)
    assert stats.source == "measured:tensorrt-cuda"
    assert stats.n_runs == 5
    assert 0 < stats.median_ms < 1000
