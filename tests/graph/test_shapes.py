"""Declared shapes that a real FP32 run contradicts are dropped before any candidate exists."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from amp_search.graph import load_model, reconcile_shapes, sanitize
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
    path, inner = _wrong_rank(demo_model_path, tmp_path / "wrong.onnx")
    model = sanitize(load_model(path))
    good = [vi.name for vi in model.graph.value_info if vi.name != inner][:3]
    observed = {"logits": (8, 10), inner: (8, 32, 64, 64)}
    for name in good:  # what shape inference found stays
        vi = next(v for v in model.graph.value_info if v.name == name)
        observed[name] = tuple(d.dim_value or 8 for d in vi.type.tensor_type.shape.dim)
    changes = reconcile_shapes(model, observed)
    assert changes == ["logits (declared [N, 1, 10], ran [8, 10])",
                       f"{inner} (declared [7], ran [8, 32, 64, 64])"]  # fmt: skip
    out = model.graph.output[0]
    assert not out.type.tensor_type.HasField("shape")
    assert out.type.tensor_type.elem_type == TensorProto.FLOAT
    names = {vi.name for vi in model.graph.value_info}
    assert inner not in names and set(good) <= names
    assert reconcile_shapes(model, observed) == []  # nothing left to drop


def test_search_of_a_model_with_a_wrong_output_rank(demo_model_path, demo_data_path, tmp_path):
    path, inner = _wrong_rank(demo_model_path, tmp_path / "wrong.onnx")
    out = tmp_path / "out"
    outcome = run_search(SearchConfig(
        model=path, out=out, data=demo_data_path, n_trials=4,
        storage=f"sqlite:///{tmp_path / 's.db'}", study_name="w", seed=0,
    ))  # fmt: skip
    assert outcome.n_complete >= 4 and outcome.front
    notes = json.loads((out / "front.json").read_text())["notes"]
    assert any("logits (declared [N, 1, 10], ran [8, 10])" in n for n in notes)
    for candidate in (out / "candidates").glob("*/model.onnx"):
        m = onnx.load(str(candidate), load_external_data=False)
        assert not m.graph.output[0].type.tensor_type.HasField("shape")
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
