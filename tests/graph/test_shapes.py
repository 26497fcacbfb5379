"""Declared shapes a real FP32 run contradicts are relaxed or dropped before any candidate."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from amp_search.graph import find_units, load_model, reconcile_shapes, sanitize
from amp_search.search import SearchConfig, run_search


def _wrong_rank(demo_model_path, to):
    """The demo model declaring its output ``logits`` [N, 10] as rank 3, plus a stale
    value_info of a rank the tensor never has (what converters leave behind)."""
    model = onnx.load(str(demo_model_path))
    out = model.graph.output[0]
    out.CopyFrom(helper.make_tensor_value_info(out.name, TensorProto.FLOAT, ["N", 1, 10]))
    inner = model.graph.node[0].output[0]
    model.graph.value_info.append(helper.make_tensor_value_info(inner, TensorProto.FLOAT, [7]))
    onnx.save(model, str(to))
    return to, inner


def test_reconcile_drops_only_what_the_run_contradicts(demo_model_path, tmp_path):
    # What a run sees and shape inference may not (a rank that depends on the data): checked
    # here on the declared shapes as loaded, with correct value_info from the clean model.
    path, inner = _wrong_rank(demo_model_path, tmp_path / "wrong.onnx")
    model = load_model(path)
    clean = onnx.shape_inference.infer_shapes(onnx.load(str(demo_model_path)))
    good = [vi for vi in clean.graph.value_info if vi.name != inner][:3]
    model.graph.value_info.extend(good)
    observed = {"logits": (8, 10), inner: (8, 32, 64, 64)}
    for vi in good:  # what shape inference found stays
        observed[vi.name] = tuple(d.dim_value or 8 for d in vi.type.tensor_type.shape.dim)
    changes = reconcile_shapes(model, observed)
    assert changes == ["logits (declared [N, 1, 10], ran [8, 10])",
                       f"{inner} (declared [7], ran [8, 32, 64, 64])"]  # fmt: skip
    out = model.graph.output[0]  # the rank that ran, sizes left free
    assert [d.dim_param for d in out.type.tensor_type.shape.dim] == ["logits_dim0", "logits_dim1"]
    assert out.type.tensor_type.elem_type == TensorProto.FLOAT
    onnx.checker.check_model(model, full_check=True)  # every graph output has a shape
    names = {vi.name for vi in model.graph.value_info}
    assert inner not in names and {vi.name for vi in good} <= names
    assert reconcile_shapes(model, observed) == []  # nothing left to drop


def test_sanitize_drops_declared_shapes_that_inference_contradicts(demo_model_path, tmp_path,
                                                                   caplog):  # fmt: skip
    # Left in place, the stale value_info stopped inference at the first Conv: the tensors
    # after it had no element type, and the search saw 2 units instead of 12 (on the CUDA EP,
    # the rewrite then fed a Gemm FP16 and FP32 inputs).
    path, inner = _wrong_rank(demo_model_path, tmp_path / "wrong.onnx")
    model = sanitize(load_model(path))
    assert "contradict ONNX shape inference" in caplog.text and "differ in rank" in caplog.text
    assert len(find_units(model)) == len(find_units(sanitize(load_model(demo_model_path)))) == 12
    dims = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in model.graph.value_info}
    assert dims[inner] == 4
    out = model.graph.output[0].type.tensor_type
    assert [d.dim_param or d.dim_value for d in out.shape.dim] == ["N", 10]
    caplog.clear()
    sanitize(load_model(demo_model_path))
    assert "contradict" not in caplog.text


@pytest.mark.slow
def test_search_of_a_model_with_a_wrong_output_rank(demo_model_path, demo_data_path, tmp_path):
    path, inner = _wrong_rank(demo_model_path, tmp_path / "wrong.onnx")
    out = tmp_path / "out"
    outcome = run_search(SearchConfig(
        model=path, out=out, data=demo_data_path, n_trials=4,
        storage=f"sqlite:///{tmp_path / 's.db'}", study_name="w", seed=0,
    ))  # fmt: skip
    assert outcome.n_complete >= 4 and outcome.front and outcome.n_failed == 0
    assert len(json.loads((out / "run.json").read_text())["units"]) == 12
    for candidate in (out / "candidates").glob("*/model.onnx"):
        m = onnx.load(str(candidate), load_external_data=False)
        assert len(m.graph.output[0].type.tensor_type.shape.dim) == 2
        for vi in m.graph.value_info:
            assert not (vi.name == inner and len(vi.type.tensor_type.shape.dim) == 1)


@pytest.mark.gpu
def test_a_wrong_output_rank_searches_on_the_cuda_ep(demo_model_path, demo_data_path, tmp_path):
    """The CUDA EP refuses to bind an output of the declared wrong rank; reconciled, it runs."""
    path, _ = _wrong_rank(demo_model_path, tmp_path / "wrong.onnx")
    outcome = run_search(SearchConfig(
        model=path, out=tmp_path / "out", data=demo_data_path, n_trials=4, device="cuda",
        storage=f"sqlite:///{tmp_path / 's.db'}", study_name="w", seed=0, timing_max_s=0.5,
    ))  # fmt: skip
    assert outcome.n_failed == 0 and outcome.front
    assert np.isfinite(outcome.front[0].latency_ms)
