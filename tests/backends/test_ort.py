"""The ONNX Runtime backend: conformance on CPU (and CUDA where present), options, emulation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from amp_search.backends import BuildConfig, get_backend
from amp_search.backends.ort import OnnxRuntimeBackend
from amp_search.errors import UserInputError
from amp_search.testing.backend_suite import BackendConformance


class TestOrtCpu(BackendConformance):
    @pytest.fixture
    def backend_config(self):
        return OnnxRuntimeBackend(), BuildConfig(device="cpu")


@pytest.mark.gpu
class TestOrtCuda(BackendConformance):
    @pytest.fixture
    def backend_config(self):
        return OnnxRuntimeBackend(), BuildConfig(device="cuda", options={"use_tf32": 0})


def _chain(tmp_path):
    """x(fp16) * 1000 * 1e-3: the intermediate overflows FP16 storage when x = 100."""
    a = numpy_helper.from_array(np.array(1000, np.float16), "a")
    b = numpy_helper.from_array(np.array(1e-3, np.float16), "b")
    g = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16),
            helper.make_node("Mul", ["xh", "a"], ["t"]),
            helper.make_node("Mul", ["t", "b"], ["yh"]),
            helper.make_node("Cast", ["yh"], ["y"], to=TensorProto.FLOAT),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [a, b],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / "chain.onnx"
    onnx.save(m, path)
    return path


def test_cpu_emulation_sees_an_activation_overflow_that_plain_ort_hides(tmp_path):
    """ORT CPU merges its own Casts across FP32 islands; the emulating twin does not."""
    path = _chain(tmp_path)
    backend = OnnxRuntimeBackend()
    feeds = {"x": np.array([100.0], np.float32)}
    plain = backend.build(path, BuildConfig("cpu", {"emulate_fp16_storage": 0}))
    with backend.open(plain) as r:
        assert np.isfinite(r.infer(feeds)["y"]).all()  # the overflow is invisible
    emulated = backend.build(path, BuildConfig("cpu"))
    with backend.open(emulated) as r:
        assert np.isinf(r.infer(feeds)["y"]).all()  # 100 * 1000 = 1e5 > 65504 -> inf


def test_options_are_validated_and_recorded():
    backend = get_backend("onnxruntime")
    ident = backend.identity(BuildConfig("cpu", {"intra_op_num_threads": 1}))
    assert ident["options"]["intra_op_num_threads"] == 1
    assert ident["options"]["graph_optimization_level"] == "disable_all"
    with pytest.raises(UserInputError, match="Unknown onnxruntime option"):
        backend.identity(BuildConfig("cpu", {"prefer_nchw": 1}))
    with pytest.raises(UserInputError, match="graph_optimization_level"):
        backend.identity(BuildConfig("cpu", {"graph_optimization_level": "max"}))


def test_unknown_backend_name_is_a_user_error():
    with pytest.raises(UserInputError, match="Unknown backend"):
        get_backend("tensorflow")


def test_cuda_device_without_cuda_ep_says_what_to_install(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA EP")
    from amp_search.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
        OnnxRuntimeBackend().build(_chain(tmp_path), BuildConfig("cuda"))
