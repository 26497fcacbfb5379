"""Calibration data: forms accepted and each kind of bad data refused with a fix."""

from __future__ import annotations

import numpy as np
import pytest

from amp_search.calibration import InputSpec, load_calibration, parse_shapes
from amp_search.errors import UserInputError

SPEC = [InputSpec("x", np.dtype(np.float32), ("N", 3, 8, 8))]


def _save(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_one_batch_and_stack_of_batches(tmp_path):
    one = _save(tmp_path / "one.npz", x=np.zeros((2, 3, 8, 8), np.float32))
    data = load_calibration(one, SPEC)
    assert data.n_batches == 1 and data.first()["x"].shape == (2, 3, 8, 8)
    stack = _save(tmp_path / "stack.npz", x=np.zeros((5, 2, 3, 8, 8), np.float32))
    data = load_calibration(stack, SPEC)
    assert data.n_batches == 5
    assert [b["x"].shape for b in data] == [(2, 3, 8, 8)] * 5


def test_rank_equal_array_is_fed_as_is_for_non_batch_first_inputs(tmp_path):
    seq = [InputSpec("feats", np.dtype(np.float32), ("T", 40))]
    path = _save(tmp_path / "s.npz", feats=np.ones((100, 40), np.float32))
    assert load_calibration(path, seq).first()["feats"].shape == (100, 40)


def test_folder_of_files_is_read_in_order(tmp_path):
    for i in range(3):
        _save(tmp_path / f"b{i}.npz", x=np.full((1, 3, 8, 8), i, np.float32))
    data = load_calibration(tmp_path, SPEC)
    assert [float(b["x"][0, 0, 0, 0]) for b in data] == [0.0, 1.0, 2.0]


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"y": np.zeros((1, 3, 8, 8), np.float32)}, r"missing \['x'\]"),
        ({"x": np.zeros((1, 3, 8, 8), np.float64)}, r"float64.*astype\(np.float32\)"),
        ({"x": np.zeros((3, 8, 8), np.float32)}, "rank 4"),
        ({"x": np.zeros((1, 3, 9, 8), np.float32)}, "axis 2.*Resize"),
        # Channels last (N,H,W,C) where the model takes N,C,H,W: a transpose, not a resize.
        (
            {"x": np.zeros((2, 8, 8, 3), np.float32)},
            r"channels last.*Transpose it to N,C,H,W \(e.g. x.transpose\(0, 3, 1, 2\)\)",
        ),
        ({"x": np.zeros((4, 2, 8, 8, 3), np.float32)}, r"x.transpose\(0, 1, 4, 2, 3\)"),
        ({"x": np.full((1, 3, 8, 8), np.nan, np.float32)}, "NaN"),
        ({"x": np.zeros((0, 3, 8, 8), np.float32)}, "empty"),
    ],
)
def test_bad_data_is_refused_with_one_line(tmp_path, arrays, match):
    from amp_search.errors import UserInputError

    path = _save(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserInputError, match=match) as info:
        load_calibration(path, SPEC)
    assert "\n" not in info.value.message


def test_empty_npz_empty_folder_and_missing_path(tmp_path):
    from amp_search.errors import UserInputError

    empty = tmp_path / "empty.npz"
    np.savez(empty)
    with pytest.raises(UserInputError, match="no arrays"):
        load_calibration(empty, SPEC)
    folder = tmp_path / "none"
    folder.mkdir()
    with pytest.raises(UserInputError, match="no .npz"):
        load_calibration(folder, SPEC)
    with pytest.raises(UserInputError, match="not found"):
        load_calibration(tmp_path / "nope.npz", SPEC)
    with pytest.raises(UserInputError, match="--synthetic"):
        load_calibration(None, SPEC)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(UserInputError, match="Cannot read"):
        load_calibration(garbage, SPEC)


def test_synthetic_is_explicit_and_warns(caplog):
    data = load_calibration(None, SPEC, synthetic=True, n_synthetic=2)
    assert data.is_synthetic and data.n_batches == 2
    assert data.first()["x"].shape == (1, 3, 8, 8)
    assert "SYNTHETIC" in caplog.text


def test_synthetic_refuses_to_guess_dynamic_sizes_and_takes_shape():
    spec = [InputSpec("x", np.dtype(np.float32), ("N", 3, "H", "W"))]
    with pytest.raises(UserInputError, match=r"axis 2 \(H\), axis 3 \(W\).*--shape x:1x3xSxS"):
        load_calibration(None, spec, synthetic=True)
    data = load_calibration(None, spec, synthetic=True, shapes=parse_shapes(["x:2x3x64x96"]))
    assert data.first()["x"].shape == (2, 3, 64, 96)
    with pytest.raises(UserInputError, match="keep its rank and its fixed sizes"):
        load_calibration(None, spec, synthetic=True, shapes={"x": (2, 4, 64, 96)})
    with pytest.raises(UserInputError, match="no inputs of the model"):
        load_calibration(None, spec, synthetic=True, shapes={"y": (1,)})
    with pytest.raises(UserInputError, match="NAME:DxDx"):
        parse_shapes(["x:1x0x3"])
    with pytest.raises(UserInputError, match="with --synthetic"):
        load_calibration("d.npz", spec, shapes={"x": (1, 3, 8, 8)})


def test_synthetic_on_the_real_detector_needs_its_image_size(real_model, capsys):
    """PP-OCRv4 det declares x [?, 3, ?, ?]: sizes of 1 failed inside the model before."""
    from amp_search.cli import main

    path, _ = real_model("ppocr_det")
    assert main(["inspect", str(path), "--synthetic", "--no-fp16-pass"]) == 2
    err = capsys.readouterr().err
    assert "cannot guess the dynamic sizes of input x" in err and "--shape x:" in err
    assert "Traceback" not in err
    assert main(["inspect", str(path), "--synthetic", "--no-fp16-pass",
                 "--shape", "x:1x3x96x128"]) == 0  # fmt: skip
    assert "units by risk" in capsys.readouterr().out
