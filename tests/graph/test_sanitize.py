"""Sanitize: names, Constant lifting, opset checks, load errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from amp_search.errors import UserInputError
from amp_search.graph import find_units, load_model, sanitize, save_model


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _paddle_like(opset=13):
    """Unnamed nodes, weights arriving through Constant nodes."""
    const = helper.make_node(
        "Constant", [], ["w"], value=numpy_helper.from_array(np.full(3, 2.0, np.float32))
    )
    nodes = [
        const,
        helper.make_node("Mul", ["x", "w"], ["m"]),
        helper.make_node("Relu", ["m"], ["y"]),
    ]
    m = helper.make_model(
        helper.make_graph(nodes, "g", [_vi("x", [3])], [_vi("y", [3])]),
        opset_imports=[helper.make_opsetid("", opset)],
    )
    m.ir_version = 8
    return m


def test_names_unique_stable_and_constants_lifted():
    a, b = sanitize(_paddle_like()), sanitize(_paddle_like())
    names = [n.name for n in a.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert names == [n.name for n in b.graph.node]  # stable across runs
    assert "Constant" not in [n.op_type for n in a.graph.node]
    assert [i.name for i in a.graph.initializer] == ["w"]
    (unit,) = find_units(a)
    assert unit.weights == ("w",)  # the Constant's weight now converts with its unit


@pytest.mark.parametrize("opset", [5, 30])
def test_unsupported_opset_is_refused_with_a_fix(opset):
    m = _paddle_like(opset=13)
    m.opset_import[0].version = opset
    with pytest.raises(UserInputError, match=f"Unsupported opset {opset}"):
        sanitize(m)


def test_load_errors_are_user_errors(tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(UserInputError, match="not found"):
        load_model(missing)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(UserInputError, match="empty"):
        load_model(empty)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(UserInputError, match="ONNX"):
        load_model(junk)
    truncated = tmp_path / "trunc.onnx"
    good = _paddle_like().SerializeToString()
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserInputError):
        load_model(truncated)


def test_external_data_round_trip_and_missing_data(tmp_path):
    m = _paddle_like()
    m = sanitize(m)
    big = numpy_helper.from_array(np.ones((64, 64), np.float32), "big")
    m.graph.initializer.append(big)
    path = tmp_path / "ext.onnx"
    onnx.save_model(m, path, save_as_external_data=True, location="ext.data", size_threshold=0)
    loaded = load_model(path)
    assert (
        numpy_helper.to_array(next(i for i in loaded.graph.initializer if i.name == "big")).sum()
        == 4096
    )
    (tmp_path / "ext.data").unlink()
    with pytest.raises(UserInputError, match="External data"):
        load_model(path)


def test_save_model_is_atomic_and_loadable(tmp_path):
    path = save_model(_paddle_like(), tmp_path / "sub" / "m.onnx")
    assert load_model(path).graph.node
    assert [p.name for p in path.parent.iterdir()] == ["m.onnx"]  # no temp files left
