"""ONNX Runtime's fused operators are units, typed by their contrib schemas.

The typing table (graph/op_types.py) is checked against ONNX Runtime's own schemas; each fused
op, alone, switches exactly the inputs and outputs its schema types ``T`` and runs in FP16 on
ONNX Runtime CPU; MiniLM fused by ``onnxruntime.transformers.optimizer`` gets a unit per fused
op, and its all-FP16 and mixed rewrites load and run, close to FP32. ONNX's checker does not
know these ops: loading and running them in ONNX Runtime is the check.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from amp_search.backends import BuildConfig
from amp_search.backends.ort import OnnxRuntimeBackend
from amp_search.graph import MixedPrecisionRewriter, find_units, sanitize
from amp_search.graph._index import GraphIndex
from amp_search.graph.op_types import OP_TYPING
from amp_search.graph.units import COMPUTE_OPS, POINTWISE_OPS, not_searched
from amp_search.testing import realmodels
from amp_search.types import Precision, PrecisionAssignment

MS = "com.microsoft"
I32, I64 = TensorProto.INT32, TensorProto.INT64
_RNG = np.random.default_rng(0)


def _f(*shape: int) -> np.ndarray:
    return _RNG.normal(size=shape).astype(np.float32)


def test_the_typing_table_agrees_with_onnx_runtime_schemas():
    """Every position's type variable: a switching one allows float and float16 in ONNX
    Runtime's schema, a fixed one allows its type; positions sharing a schema variable share
    the table's (and the number of inputs and outputs match)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    schemas = {}  # the oldest version: ("", LayerNormalization) is ONNX Runtime's before 17
    for s in sorted(ort_c.get_all_operator_schema(), key=lambda s: -s.since_version):
        schemas[s.domain, s.name] = s
    names = {1: "tensor(float)", 6: "tensor(int32)", 7: "tensor(int64)"}
    for (domain, op), typing in OP_TYPING.items():
        schema = schemas[(MS if domain == MS else "", op)]
        allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
        for formals, ours in ((schema.inputs, typing.inputs), (schema.outputs, typing.outputs)):
            assert len(formals) == len(ours), (op, [p.name for p in formals], ours)
            pairs: dict[str, str] = {}
            for p, var in zip(formals, ours, strict=True):
                types = allowed.get(p.typeStr, {p.typeStr})  # a literal type: itself
                if var in typing.switch:
                    assert {"tensor(float)", "tensor(float16)"} <= types, (op, p.name)
                else:
                    assert names[typing.fixed[var]] in types, (op, p.name)
                assert pairs.setdefault(p.typeStr, var) == var, (op, p.name)
        assert op in COMPUTE_OPS or op in POINTWISE_OPS or op == "Gelu", op


@dataclass
class _Case:
    """One fused node alone: its graph, feeds, what FP16 switches, and whether CPU runs it."""

    op: str
    inputs: list[str]
    outputs: list[str]
    graph_inputs: dict[str, tuple[int, list[int]]]
    weights: dict[str, np.ndarray]
    feeds: dict[str, np.ndarray]
    fp16_inputs: set[int]
    fp16_outputs: set[int]
    attrs: dict[str, object] = field(default_factory=dict)
    domain: str = MS
    runs_on_cpu: bool = True

    def model(self) -> onnx.ModelProto:
        node = helper.make_node(self.op, self.inputs, self.outputs, name="op",
                                domain=self.domain, **self.attrs)  # fmt: skip
        graph = helper.make_graph(
            [node], self.op,
            [helper.make_tensor_value_info(n, t, s) for n, (t, s) in self.graph_inputs.items()],
            [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None)
             for n in self.outputs if n],
            [numpy_helper.from_array(v, k) for k, v in self.weights.items()],
        )  # fmt: skip
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
        )
        model.ir_version = 8
        return model


_X = _f(2, 4, 8)
F = TensorProto.FLOAT
CASES = [
    _Case("SkipLayerNormalization", ["x", "s", "g", "b", "bias"], ["y", "mean", "isv", "sum"],
          {"x": (F, [2, 4, 8]), "s": (F, [2, 4, 8])}, {"g": _f(8), "b": _f(8), "bias": _f(8)},
          {"x": _X, "s": _f(2, 4, 8)}, {0, 1, 2, 3, 4}, {0, 3}, {"epsilon": 1e-5}),
    _Case("SkipSimplifiedLayerNormalization", ["x", "s", "g", "bias"], ["y", "mean", "isv", "sum"],
          {"x": (F, [2, 4, 8]), "s": (F, [2, 4, 8])}, {"g": _f(8), "bias": _f(8)},
          {"x": _X, "s": _f(2, 4, 8)}, {0, 1, 2, 3}, {0, 3}, {"epsilon": 1e-5}),
    _Case("SimplifiedLayerNormalization", ["x", "g"], ["y", "isv"], {"x": (F, [2, 4, 8])},
          {"g": _f(8)}, {"x": _X}, {0, 1}, {0}, {"epsilon": 1e-5, "axis": -1}, domain=""),
    _Case("Attention", ["x", "w", "bias", "mask"], ["y"],
          {"x": (F, [2, 4, 8]), "mask": (I32, [2])}, {"w": _f(8, 24) * 0.3, "bias": _f(24)},
          {"x": _X, "mask": np.array([4, 3], np.int32)}, {0, 1, 2}, {0}, {"num_heads": 2}),
    _Case("MultiHeadAttention", ["q", "k", "v"], ["y"],
          {"q": (F, [2, 3, 8]), "k": (F, [2, 5, 8]), "v": (F, [2, 5, 8])}, {},
          {"q": _f(2, 3, 8), "k": _f(2, 5, 8), "v": _f(2, 5, 8)}, {0, 1, 2}, {0},
          {"num_heads": 2}),
    _Case("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens", "total"], ["y", "pk", "pv"],
          {"q": (F, [2, 3, 16]), "k": (F, [2, 3, 8]), "v": (F, [2, 3, 8]),
           "seqlens": (I32, [2]), "total": (I32, [])}, {},
          {"q": _f(2, 3, 16), "k": _f(2, 3, 8), "v": _f(2, 3, 8),
           "seqlens": np.full(2, 2, np.int32), "total": np.array(3, np.int32)},
          {0, 1, 2}, {0, 1, 2}, {"num_heads": 2, "kv_num_heads": 1}),
    _Case("EmbedLayerNormalization", ["ids", "seg", "we", "pe", "se", "g", "b"], ["y", "mi"],
          {"ids": (I32, [2, 4]), "seg": (I32, [2, 4])},
          {"we": _f(10, 8), "pe": _f(16, 8), "se": _f(2, 8), "g": _f(8), "b": _f(8)},
          {"ids": _RNG.integers(0, 10, (2, 4)).astype(np.int32),
           "seg": np.zeros((2, 4), np.int32)}, {2, 3, 4, 5, 6}, {0}, {"epsilon": 1e-5}),
    _Case("FastGelu", ["x", "b"], ["y"], {"x": (F, [2, 4, 8])}, {"b": _f(8)}, {"x": _X},
          {0, 1}, {0}),
    _Case("BiasGelu", ["x", "b"], ["y"], {"x": (F, [2, 4, 8])}, {"b": _f(8)}, {"x": _X},
          {0, 1}, {0}),
    _Case("Gelu", ["x"], ["y"], {"x": (F, [2, 4, 8])}, {}, {"x": _X}, {0}, {0}),
    _Case("QuickGelu", ["x"], ["y"], {"x": (F, [2, 4, 8])}, {}, {"x": _X}, {0}, {0},
          {"alpha": 1.702}),
    _Case("FusedMatMul", ["x", "w"], ["y"], {"x": (F, [2, 4, 8])}, {"w": _f(6, 8)}, {"x": _X},
          {0, 1}, {0}, {"transB": 1, "alpha": 0.5}),
    _Case("RotaryEmbedding", ["x", "pos", "cos", "sin"], ["y"],
          {"x": (F, [2, 4, 8]), "pos": (I64, [2, 4])}, {"cos": _f(16, 2), "sin": _f(16, 2)},
          {"x": _X, "pos": np.tile(np.arange(4), (2, 1)).astype(np.int64)}, {0, 2, 3}, {0},
          {"num_heads": 2}),
    _Case("FusedConv", ["x", "w", "b"], ["y"], {"x": (F, [1, 2, 5, 5])},
          {"w": _f(3, 2, 3, 3), "b": _f(3)}, {"x": _f(1, 2, 5, 5)}, {0, 1, 2}, {0},
          {"activation": "Relu", "pads": [1, 1, 1, 1]}),
    _Case("FusedGemm", ["a", "b", "c"], ["y"], {"a": (F, [2, 4])}, {"b": _f(4, 3), "c": _f(3)},
          {"a": _f(2, 4)}, {0, 1, 2}, {0}, {"activation": "Relu"}),
    # CUDA-only kernels: typed and rewritten, not run here.
    _Case("BiasSplitGelu", ["x", "b"], ["y"], {"x": (F, [2, 4, 8])}, {"b": _f(8)}, {"x": _X},
          {0, 1}, {0}, runs_on_cpu=False),
    _Case("BiasAdd", ["x", "b", "s"], ["y"], {"x": (F, [2, 4, 8]), "s": (F, [2, 4, 8])},
          {"b": _f(8)}, {"x": _X, "s": _f(2, 4, 8)}, {0, 1, 2}, {0}, runs_on_cpu=False),
]  # fmt: skip


def _session_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _backend_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tmp_path) -> list:
    """Through the CPU backend: FP16 storage emulated at every node boundary (the default)."""
    path = tmp_path / "candidate.onnx"
    onnx.save(model, str(path))
    backend = OnnxRuntimeBackend()
    with backend.open(backend.build(path, BuildConfig("cpu"))) as runner:
        out = runner.infer(feeds)
    return [out[o.name] for o in model.graph.output]


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12))


@pytest.mark.parametrize("case", CASES, ids=[c.op for c in CASES])
def test_a_fused_op_switches_what_its_schema_types_t_and_runs_fp16(case, tmp_path):
    model = sanitize(case.model())
    idx = GraphIndex.build(model)
    assert all(idx.elem_type.get(o) for o in case.outputs if o)  # every output typed
    units = find_units(model, idx)
    assert [u.name for u in units] == ["op"] and not not_searched(model, units)
    rewriter = MixedPrecisionRewriter(model, units)
    out, report = rewriter.apply(rewriter.all_fp16())
    assert report.fp16_nodes == ["op"]
    (node,) = [n for n in out.graph.node if n.name == "op"]
    switched_in = {k for k, x in enumerate(node.input) if x.endswith("__fp16")}
    switched_out = {k for k, x in enumerate(node.output) if x.endswith("__fp16")}
    assert switched_in == case.fp16_inputs and switched_out == case.fp16_outputs
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    if not case.runs_on_cpu:
        return
    want = _session_run(model, case.feeds)
    plain, emulated = _session_run(out, case.feeds), _backend_run(out, case.feeds, tmp_path)
    for got in (plain, emulated):
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape
            if w.dtype.kind != "f":  # mask_index and the like: exact
                np.testing.assert_array_equal(g, w)
            else:
                assert np.isfinite(g).all() and _rel(g, w) < 1e-2, case.op
    # ONNX Runtime CPU may drop an explicit Cast pair around its FP32 kernel (then FP16 changes
    # nothing); with FP16 storage emulated the rounding always shows.
    assert _rel(emulated[0], want[0]) > 0


def test_the_cpu_emulation_rounds_a_fused_ops_fp16_output(tmp_path):
    """FP16 storage is emulated at a fused node's output too: a FusedMatMul whose result
    exceeds 65504 gives inf, as a GPU storing it in FP16 would (not the FP32 island's value)."""
    case = _Case("FusedMatMul", ["x", "w"], ["y"], {"x": (F, [2, 4, 8])},
                 {"w": np.ones((6, 8), np.float32)}, {}, {0, 1}, {0}, {"transB": 1})  # fmt: skip
    model = sanitize(case.model())
    rewriter = MixedPrecisionRewriter(model)
    out, _ = rewriter.apply(rewriter.all_fp16())
    big = {"x": np.full((2, 4, 8), 10000.0, np.float32)}  # FP16 holds 10000; 8 x 10000 not
    (ref,) = _session_run(model, big)
    assert np.abs(ref).max() > 65504
    (got,) = _backend_run(out, big, tmp_path)
    assert np.isinf(got).any()


# --- MiniLM fused by ONNX Runtime's transformer optimizer -------------------------------------

FUSED = {
    "attention": {"EmbedLayerNormalization": 1, "Attention": 6, "SkipLayerNormalization": 12,
                  "BiasGelu": 6},
    "mha": {"MultiHeadAttention": 6, "SkipLayerNormalization": 12, "FastGelu": 6,
            "LayerNormalization": 1},
}  # fmt: skip


@pytest.fixture(scope="module", params=realmodels.FUSED_MINILM_VARIANTS)
def fused_minilm(request):
    path = realmodels.fetch_fused_minilm(request.param)
    return request.param, sanitize(onnx.load(path)), realmodels.calibration("minilm")


def test_every_fused_op_of_the_optimized_minilm_is_a_unit(fused_minilm):
    variant, model, _ = fused_minilm
    fused = [n for n in model.graph.node if n.op_type in FUSED[variant]]
    assert {op: sum(n.op_type == op for n in fused) for op in FUSED[variant]} == FUSED[variant]
    assert any(n.domain == MS for n in fused)
    idx = GraphIndex.build(model)
    assert all(idx.elem_type.get(o) for n in model.graph.node for o in n.output if o)
    units = find_units(model, idx)
    in_units = {n for u in units for n in u.nodes}
    assert {n.name for n in fused} <= in_units
    assert not not_searched(model, units)  # nothing left out: every float op is searched
    if variant == "attention":  # FP16 weights: the embedding tables and the QKV weights
        rewriter = MixedPrecisionRewriter(model, units)
        out, _ = rewriter.apply(rewriter.all_fp16())
        embed = next(n for n in out.graph.node if n.op_type == "EmbedLayerNormalization")
        assert [x.endswith("__fp16") for x in embed.input] == [False, False] + [True] * 5 + [
            False
        ]  # int32 ids and mask stay
        attention = next(n for n in out.graph.node if n.op_type == "Attention")
        assert [x.endswith("__fp16") for x in attention.input] == [True, True, True, False]


@pytest.mark.slow
def test_fused_minilm_rewrites_load_and_run_close_to_fp32(fused_minilm, tmp_path):
    """All-FP32 (bit-exact), all-FP16 and four random mixed assignments, on ONNX Runtime CPU
    (as the optimizer leaves the Casts ONNX Runtime inserts, and with FP16 storage emulated)."""
    variant, model, feeds = fused_minilm
    rewriter = MixedPrecisionRewriter(model)
    names = [u.name for u in rewriter.units]
    rng = random.Random(0)
    assignments = [
        PrecisionAssignment.uniform(names, Precision.FP32),
        rewriter.all_fp16(),
        *(PrecisionAssignment.with_fp16(names, [n for n in names if rng.random() < 0.5])
          for _ in range(4)),
    ]  # fmt: skip
    want = _session_run(model, feeds)
    for k, assignment in enumerate(assignments):
        out, report = rewriter.apply(assignment)
        runs = [_session_run(out, feeds)] + ([_backend_run(out, feeds, tmp_path)] if k < 3 else [])
        for got in runs:
            for g, w in zip(got, want, strict=True):
                assert g.dtype == w.dtype and g.shape == w.shape
                if k == 0:
                    np.testing.assert_array_equal(g, w)
                else:
                    assert np.isfinite(g).all() and _rel(g, w) < 5e-3, (variant, k)
        fused = {n.name for n in model.graph.node if n.op_type in FUSED[variant]}
        assert (k != 1) or fused <= set(report.fp16_nodes)  # all-FP16: every fused op FP16


def test_the_latency_model_prices_fused_ops_as_the_work_they_replace(fused_minilm):
    """The fused graph's FLOPs are the unfused graph's (within 1%); fused attention counts its
    QKV projection, Q K^T, P V and the softmax; every tensor has a size; FP16 estimates faster."""
    from amp_search.latency_model import LatencyEstimator, node_flops

    variant, model, feeds = fused_minilm
    shapes = {k: v.shape for k, v in feeds.items()}
    plain = node_flops(sanitize(onnx.load(realmodels.fetch("minilm"))), shapes)
    fused = node_flops(model, shapes)
    top = [n.name for n in model.graph.node]
    assert sum(fused[n] for n in top) == pytest.approx(sum(plain.values()), rel=0.01)
    b, s, hidden, heads = 8, 32, 384, 12
    if variant == "attention":
        attention = next(n.name for n in model.graph.node if n.op_type == "Attention")
        projection = 2 * b * s * hidden * 3 * hidden
        assert fused[attention] == projection + 4 * b * s * s * hidden + 5 * b * heads * s * s
    estimator = LatencyEstimator(model, shapes, target="h100")
    assert not estimator.unknown_shapes or variant == "mha"  # mha: the position ids' Slice
    rewriter = MixedPrecisionRewriter(model)
    assert estimator.estimate(rewriter.apply(rewriter.all_fp16())[0]) < estimator.estimate(model)


@pytest.mark.slow
def test_a_short_cpu_search_on_fused_minilm_searches_its_fused_ops(tmp_path):
    """End to end on the CPU: every candidate loads and runs, the fused ops are units on the
    front's fallback sets (all FP32 at one end, all FP16 at the other), nothing is left out."""
    import json

    from amp_search.results.report import load_results
    from amp_search.search import SearchConfig, run_search

    path = realmodels.fetch_fused_minilm("attention")
    data = realmodels.write_npz("minilm", tmp_path / "minilm.npz", n=4)
    outcome = run_search(SearchConfig(
        model=path, out=tmp_path / "out", data=data, n_trials=4, storage=":memory:",
        study_name="fused", seed=0,
    ))  # fmt: skip
    assert outcome.n_complete == 4 and outcome.n_failed == 0
    results = load_results(outcome.out)
    model = sanitize(onnx.load(path))
    fused_nodes = {n.name for n in model.graph.node if n.domain == MS}
    fused = {u.name for u in find_units(model) if fused_nodes & set(u.nodes)}
    assert len(fused) == 1 + 6 + 12 + 6  # embedding, attention, skip norms, MatMul+BiasGelu
    inspect = json.loads((outcome.out / "inspect.json").read_text())
    assert fused <= {u["unit"] for u in inspect["units_by_risk"]}
    assert inspect["not_searched"] == []
    fallbacks = [set(p.fp32_units) for p in results.front]
    assert any(fused <= f for f in fallbacks)  # all FP32: every fused op in the fallback set
    assert any(not (fused & f) for f in fallbacks)  # and a point runs every one in FP16
    assert all(np.isfinite(p.deviation) for p in results.front)
    assert results.meta["not_searched"] == []
    assert not any(n.startswith("Not searched") for n in results.meta["notes"])
