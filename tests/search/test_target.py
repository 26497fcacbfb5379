"""Fitting the model to the target: what it cannot run in FP16 is pinned FP32, after an opset
upgrade where that spares nodes.

The backend is ONNX Runtime (CPU) told the rule measured on the H200's CUDA EP (onnxruntime-gpu
1.31.1): a float16 Clip of opset 11 has no kernel there and runs on the CPU. Real model (the
PP-OCR classifier, opset 11, 18 Clips), real data, real sessions.
"""

from __future__ import annotations

import json

import onnx
import pytest

import amp_search.search.prepare
from amp_search.backends import BuildConfig
from amp_search.backends.ort import OnnxRuntimeBackend
from amp_search.graph import MixedPrecisionRewriter, find_units, load_model, sanitize
from amp_search.search import SearchConfig, run_search
from amp_search.search.target import UPGRADE_OPSET, fit_to_target


class NoOldFp16Clip(OnnxRuntimeBackend):
    """ONNX Runtime, with the CUDA EP's gap: no float16 Clip before opset 12."""

    def low_precision_gaps(self, rewriter, feeds, config):
        return {n.name: f"Clip-{n.since_version} has no float16 kernel"
                for n in rewriter.low_precision_nodes()
                if n.op_type == "Clip" and n.since_version < 12}  # fmt: skip


@pytest.fixture(scope="module")
def cls(real_model):
    path, feeds = real_model("ppocr_cls", 4)
    return path, feeds


def test_an_opset_upgrade_that_spares_every_gap_is_kept(cls):
    path, feeds = cls
    model = sanitize(load_model(path))
    units = find_units(model)
    fitted = fit_to_target(model, units, NoOldFp16Clip(), feeds, BuildConfig("cpu"))
    assert fitted.upgraded_from == 11 and fitted.pinned == {}
    assert fitted.model.opset_import[0].version == UPGRADE_OPSET
    assert [u.name for u in fitted.units] == [u.name for u in units]
    assert "upgraded from opset 11 to 13" in fitted.notes[0]
    # Without the upgrade, the 18 Clips would be pinned: the rewrite keeps them FP32.
    plain = NoOldFp16Clip().low_precision_gaps(MixedPrecisionRewriter(model, units), feeds,
                                               BuildConfig("cpu"))  # fmt: skip
    assert len(plain) == 18


def test_without_gaps_the_model_is_left_as_it_is(cls):
    path, feeds = cls
    model = sanitize(load_model(path))
    fitted = fit_to_target(model, find_units(model), OnnxRuntimeBackend(), feeds,
                           BuildConfig("cpu"))  # fmt: skip
    assert fitted.model is model and fitted.upgraded_from is None and fitted.notes == []


def test_the_search_records_the_upgrade_and_writes_candidates_at_the_new_opset(
    cls, tmp_path, monkeypatch
):
    import numpy as np

    path, feeds = cls
    np.savez(tmp_path / "cal.npz", **feeds)
    monkeypatch.setattr(amp_search.search.prepare, "get_backend", lambda name: NoOldFp16Clip())
    outcome = run_search(SearchConfig(
        model=path, data=tmp_path / "cal.npz", out=tmp_path / "out", n_trials=3, max_units=6,
        storage=f"sqlite:///{tmp_path / 's.db'}", study_name="t", seed=0,
    ))  # fmt: skip
    run = json.loads((outcome.out / "run.json").read_text())
    assert run["opset_upgraded_from"] == 11 and run["pinned_fp32"] == {}
    front = json.loads((outcome.out / "front.json").read_text())
    assert any("upgraded from opset 11" in n for n in front["notes"])
    written = list((outcome.out / "candidates").glob("*/model.onnx"))
    assert written
    for f in written:
        assert onnx.load(str(f), load_external_data=False).opset_import[0].version == 13
