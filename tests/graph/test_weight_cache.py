"""The rewriter without its weight cache, and the weightless and streamed rewrites (issue 10).

A model whose float weights exceed ``WEIGHT_CACHE_LIMIT`` is rewritten without keeping the
FP16/BF16 copies between rewrites; every rewrite must be byte for byte the cached one's. The
skeleton (``apply_skeleton``) and the streamed rewrite (``apply_streamed``, saved one weight
at a time) must be ``apply``'s model without, and with, its weights.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from amp_search.calibration import CalibrationData, model_inputs
from amp_search.demo import build_demo_model
from amp_search.graph import MixedPrecisionRewriter, sanitize
from amp_search.graph import precision as precision_module
from amp_search.graph.io import save_model
from amp_search.latency_model import LatencyEstimator
from amp_search.profiling.ranges import profile_model
from amp_search.types import Precision, PrecisionAssignment


@pytest.fixture(scope="module")
def demo() -> onnx.ModelProto:
    return sanitize(build_demo_model())


def _assignments(rw: MixedPrecisionRewriter) -> list[PrecisionAssignment]:
    """All-FP32, all-FP16, all-BF16 and random mixes of the three."""
    names = [u.name for u in rw.units]
    rng = random.Random(3)
    picks = [Precision.FP32, Precision.FP16, Precision.BF16]
    mixed = [PrecisionAssignment.from_mapping({n: rng.choice(picks) for n in names})
             for _ in range(4)]  # fmt: skip
    return [*(PrecisionAssignment.uniform(names, p) for p in picks), *mixed]


def test_uncached_rewrites_are_byte_identical(demo):
    cached = MixedPrecisionRewriter(demo, cache_weights=True)
    uncached = MixedPrecisionRewriter(demo, cache_weights=False)
    for a in [*_assignments(cached), *_assignments(cached)]:  # twice: the cache is used
        want, want_report = cached.apply(a)
        got, got_report = uncached.apply(a)
        assert got.SerializeToString() == want.SerializeToString()
        assert got_report.to_json() == want_report.to_json()
        assert b"".join(uncached.apply_serialized(a)[0]) == b"".join(cached.apply_serialized(a)[0])
    assert not uncached._low_init and not uncached._encoded_inits
    assert cached._low_init


def test_the_cache_is_left_off_above_the_limit(demo, monkeypatch):
    assert MixedPrecisionRewriter(demo).cache_weights
    monkeypatch.setattr(precision_module, "WEIGHT_CACHE_LIMIT", 1024)
    assert not MixedPrecisionRewriter(demo).cache_weights


def test_skeleton_is_the_rewrite_without_weights(demo):
    rw = MixedPrecisionRewriter(demo, cache_weights=False)
    for a in _assignments(rw):
        full, report = rw.apply(a)
        skeleton, report2 = rw.apply_skeleton(a)
        assert not skeleton.graph.initializer
        del full.graph.initializer[:]
        assert skeleton.SerializeToString() == full.SerializeToString()
        assert report2.to_json() == report.to_json()
    assert not rw._low_init


def test_streamed_rewrite_saves_the_same_files(demo, tmp_path: Path):
    rw = MixedPrecisionRewriter(demo, cache_weights=False)
    for k, a in enumerate(_assignments(rw)):
        full, _ = rw.apply(a)
        skeleton, weights, _ = rw.apply_streamed(a)
        inits = full.graph.initializer
        want = save_model(full, tmp_path / f"want{k}" / "m.onnx", initializers=inits)
        got = save_model(skeleton, tmp_path / f"got{k}" / "m.onnx", initializers=weights)
        for suffix in ("", ".data"):
            assert Path(f"{got}{suffix}").read_bytes() == Path(f"{want}{suffix}").read_bytes()
        back = onnx.load(str(got))
        assert [t.name for t in back.graph.initializer] == [t.name for t in inits]
        for b, t in zip(back.graph.initializer, inits, strict=True):
            want_values, got_values = numpy_helper.to_array(t), numpy_helper.to_array(b)
            assert got_values.dtype == want_values.dtype
            assert np.array_equal(got_values, want_values)


def test_estimate_of_an_assignment_reads_only_the_graph(demo):
    rw = MixedPrecisionRewriter(demo, cache_weights=False)
    est = LatencyEstimator(demo, {"image": (8, 3, 64, 64)}, target="h100")
    for a in _assignments(rw):
        assert est.estimate_assignment(rw, a) == est.estimate(rw.apply(a)[0])
    assert not rw._low_init


def test_profile_is_the_same_without_the_cache(demo):
    rng = np.random.default_rng(0)
    batches = [{"image": rng.standard_normal((2, 3, 64, 64)).astype(np.float32)}
               for _ in range(2)]  # fmt: skip
    data = CalibrationData(model_inputs(demo), synthetic=batches)
    profiles = []
    for cache in (True, False):
        rw = MixedPrecisionRewriter(demo, cache_weights=cache)
        profiles.append(profile_model(demo, rw.units, data, bf16_pass=True, rewriter=rw,
                                      keep_reference=True))  # fmt: skip
    want, got = profiles
    assert {k: v.to_json() for k, v in got.deviations.items()} == {
        k: v.to_json() for k, v in want.deviations.items()
    }
    assert {k: v.to_json() for k, v in got.bf16_deviations.items()} == {
        k: v.to_json() for k, v in want.bf16_deviations.items()
    }
    assert got.tensors == want.tensors
    for r, w in zip(got.reference_outputs, want.reference_outputs, strict=True):
        assert all(np.array_equal(r[k], w[k]) for k in w)
