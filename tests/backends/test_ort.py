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


def _maxpool22(tmp_path):
    """Conv then MaxPool at opset 22, where MaxPool has no CUDA kernel: it runs on the CPU."""
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32) / 27, "w")
    g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node(
                "MaxPool", ["c"], ["y"], name="pool", kernel_shape=[2, 2], strides=[2, 2]
            ),  # fmt: skip
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8, 8])],
        [w],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 22)])
    m.ir_version = 10
    path = tmp_path / "pool22.onnx"
    onnx.save(m, path)
    return path


@pytest.mark.gpu
def test_cuda_graph_replays_what_a_plain_run_computes(demo_model_path):
    from amp_search.demo import demo_data
    from amp_search.timing import TimingPlan, measure

    feeds = {"image": demo_data(n_batches=1)["image"][0]}
    backend = OnnxRuntimeBackend()
    graph = backend.build(demo_model_path, BuildConfig("cuda"))
    plain = backend.build(demo_model_path, BuildConfig("cuda", {"enable_cuda_graph": 0}))
    assert graph.info["cuda_graph"] is True and "cuda_graph" not in plain.info
    with backend.open(graph) as g, backend.open(plain) as p:
        g.bind(feeds)
        p.bind(feeds)
        assert g.execution == {"cuda_graph": True} and p.execution == {"cuda_graph": False}
        other = {"image": feeds["image"][::-1].copy()}  # accuracy runs skip the graph
        np.testing.assert_allclose(g.infer(other)["logits"], p.infer(other)["logits"],
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
        plan = TimingPlan(min_pairs=3, max_pairs=5)
        t_g = measure(g.run_once, source=g.source, plan=plan)
        t_p = measure(p.run_once, source=p.source, plan=plan)
    assert t_g.median_ms > 0 and t_p.median_ms > 0


@pytest.mark.gpu
def test_a_model_that_refuses_a_cuda_graph_runs_without_one_and_says_why(tmp_path):
    path = _maxpool22(tmp_path)
    backend = OnnxRuntimeBackend()
    cand = backend.build(path, BuildConfig("cuda"))
    feeds = {"x": np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)}
    with backend.open(cand) as r:
        r.bind(feeds)
        r.run_once()
        assert r.execution["cuda_graph"] is False
        assert r.execution["cuda_graph_reason"]
        assert r.infer(feeds)["y"].shape == (2, 4, 8, 8)


def _demo22_rewriter():
    from amp_search.demo import build_demo_model, demo_data
    from amp_search.graph import MixedPrecisionRewriter, sanitize

    rewriter = MixedPrecisionRewriter(sanitize(build_demo_model(opset=22)))
    return rewriter, {"image": demo_data(n_batches=1)["image"][0]}


def test_bf16_probe_takes_back_each_op_without_a_bfloat16_kernel():
    # ONNX Runtime's CPU EP has no bfloat16 Conv, GlobalAveragePool or Gemm: the probe opens
    # the all-BF16 demo, and each failing op's units go back to FP32 until none is left
    import onnxruntime as ort

    from amp_search.backends.ort import bf16_probe

    rewriter, feeds = _demo22_rewriter()
    sessions = []

    def options():
        sessions.append(1)
        return ort.SessionOptions()

    gaps = bf16_probe(rewriter, feeds, options, ["CPUExecutionProvider"], placement=False)
    ops = {n.name: n.op_type for n in rewriter.model.graph.node}
    assert {ops[n] for n in gaps} == {"Conv", "GlobalAveragePool", "Gemm"}
    assert all(r == f"{ops[n]} has no bfloat16 kernel on CPUExecutionProvider"
               for n, r in gaps.items())  # fmt: skip
    assert len(sessions) == 3  # one per op type, not one per unit (12)
    # the CPU backend emulates BF16 storage: it has no gaps
    assert OnnxRuntimeBackend().bf16_gaps(rewriter, feeds, BuildConfig("cpu")) == {}


@pytest.mark.gpu
def test_bf16_gaps_on_the_cuda_ep_name_what_has_no_bfloat16_kernel():
    # measured in ../shared/gpu/README.md (1.31.1): Conv, Relu, Mul, Gemm run BF16 on the GPU;
    # GlobalAveragePool has no BF16 kernel on any provider
    rewriter, feeds = _demo22_rewriter()
    gaps = OnnxRuntimeBackend().bf16_gaps(rewriter, feeds, BuildConfig("cuda"))
    ops = {n.name: n.op_type for n in rewriter.model.graph.node}
    assert "pool/GAP" in gaps and not any(ops[n] == "Conv" for n in gaps)


@pytest.mark.slow
def test_bf16_probe_blames_an_op_onnx_runtime_expands_and_isolates_unnamed_failures(real_model):
    # MiniLM (opset 14) on the CPU EP: Clip has no bfloat16 kernel, so ONNX Runtime expands its
    # function body, whose Where-9 types no bfloat16: the error names a tensor, not a node.
    # Softmax's body fails on a node with no name: found by probing op types one at a time.
    import onnxruntime as ort

    from amp_search.backends.ort import _probe, bf16_probe
    from amp_search.graph import MixedPrecisionRewriter, sanitize
    from amp_search.testing.graphs import cpu_session
    from amp_search.types import Precision, PrecisionAssignment

    path, _ = real_model("minilm")
    rewriter = MixedPrecisionRewriter(sanitize(onnx.load(path)))
    gaps = bf16_probe(rewriter, {}, ort.SessionOptions, ["CPUExecutionProvider"], placement=False)
    assert gaps["/pooling/Clip"] == "Clip has no bfloat16 kernel on CPUExecutionProvider"
    softmax = [n for n in gaps if n.endswith("/Softmax")]
    assert softmax and all(gaps[n].startswith("a BF16 Softmax does not open") for n in softmax)
    # what the probe leaves BF16 opens
    rest = [u.name for u in rewriter.units
            if rewriter.admits_bf16_unit(u.name) and not set(u.nodes) & set(gaps)]  # fmt: skip
    probe, report = _probe(rewriter, PrecisionAssignment.uniform(rest, Precision.BF16))
    cpu_session(probe)
    assert bool(rest) == bool(report.bf16_nodes)
