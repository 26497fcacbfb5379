"""Backend conformance suite (in the style of Optuna's ``StorageTestCase``).

Subclass :class:`BackendConformance` in a test module and provide a ``backend_config``
fixture returning ``(backend, BuildConfig)``; every backend that passes it honours the
contract in :mod:`amp_search.backends.base`. Needs pytest (a test dependency).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from amp_search.backends.base import Backend, BuildConfig
from amp_search.demo import DEMO_INPUT, build_demo_model, demo_data
from amp_search.errors import CandidateBuildError
from amp_search.graph import MixedPrecisionRewriter, sanitize, save_model
from amp_search.timing import TimingPlan, measure
from amp_search.types import PrecisionAssignment

__all__ = ["BackendConformance"]

# Units of the demo model FP16 handles well (the overflowing stack and the tiny-weight layer
# stay FP32).
SAFE_FP16 = ("stem/Conv", "block1/Conv", "head1/Conv", "head2/Conv", "pool/GAP", "fc/Gemm")


class BackendConformance:
    """Contract tests every backend must pass."""

    @pytest.fixture
    def models(self, tmp_path: Path) -> dict[str, Path]:
        """The demo model all-FP32 and with its safe units FP16, as files."""
        model = sanitize(build_demo_model())
        rw = MixedPrecisionRewriter(model)
        names = [u.name for u in rw.units]
        fp32, _ = rw.apply(PrecisionAssignment.with_fp16(names, []))
        mixed, _ = rw.apply(PrecisionAssignment.with_fp16(names, SAFE_FP16))
        return {
            "fp32": save_model(fp32, tmp_path / "fp32" / "model.onnx"),
            "mixed": save_model(mixed, tmp_path / "mixed" / "model.onnx"),
        }

    @pytest.fixture
    def feeds(self) -> dict[str, np.ndarray]:
        """One calibration batch of the demo model."""
        return {DEMO_INPUT: demo_data(n_batches=1, batch=4)[DEMO_INPUT][0]}

    @staticmethod
    def reference(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Strict FP32 outputs from the ONNX reference evaluator."""
        from onnx.reference import ReferenceEvaluator

        outputs: Any = ReferenceEvaluator(onnx.load(path)).run(None, feeds)
        return np.asarray(outputs[0])

    def test_fp32_candidate_matches_reference(
        self, backend_config: tuple[Backend, BuildConfig], models: dict[str, Path],
        feeds: dict[str, np.ndarray],
    ) -> None:  # fmt: skip
        """An all-FP32 candidate reproduces strict FP32 outputs."""
        backend, config = backend_config
        cand = backend.build(models["fp32"], config)
        with backend.open(cand) as runner:
            out = runner.infer(feeds)
        assert list(out) == runner.output_names
        ref = self.reference(models["fp32"], feeds)
        got = out[runner.output_names[0]]
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-4

    def test_mixed_candidate_runs_close_and_different(
        self, backend_config: tuple[Backend, BuildConfig], models: dict[str, Path],
        feeds: dict[str, np.ndarray],
    ) -> None:  # fmt: skip
        """A mixed candidate runs, stays close to FP32, and is not bit-identical to it."""
        backend, config = backend_config
        with backend.open(backend.build(models["mixed"], config)) as runner:
            got = runner.infer(feeds)[runner.output_names[0]]
        ref = self.reference(models["fp32"], feeds)
        rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        assert np.isfinite(got).all() and 0 < rel < 5e-2

    def test_build_from_memory_matches_the_file(
        self, backend_config: tuple[Backend, BuildConfig], models: dict[str, Path],
        feeds: dict[str, np.ndarray], tmp_path: Path,
    ) -> None:  # fmt: skip
        """From chunks in memory (file not written yet): the outputs the file gives.

        A backend without ``builds_from_memory`` refuses chunks (the evaluator then writes
        the file first).
        """
        backend, config = backend_config
        data = models["mixed"].read_bytes()
        chunks = [data[:100], data[100:1000], data[1000:]]
        pending = tmp_path / "pending" / "model.onnx"  # not there yet
        if not backend.builds_from_memory:
            with pytest.raises(ValueError, match="files only"):
                backend.build(pending, config, model_bytes=chunks)
            return
        with backend.open(backend.build(pending, config, model_bytes=chunks)) as runner:
            got = runner.infer(feeds)[runner.output_names[0]]
        with backend.open(backend.build(models["mixed"], config)) as runner:
            want = runner.infer(feeds)[runner.output_names[0]]
        np.testing.assert_array_equal(got, want)

    def test_timing_through_run_once(
        self, backend_config: tuple[Backend, BuildConfig], models: dict[str, Path],
        feeds: dict[str, np.ndarray],
    ) -> None:  # fmt: skip
        """run_once is timed in windows by the timing module, labelled with its source."""
        backend, config = backend_config
        plan = TimingPlan(window_ms=2.0, min_pairs=3, max_pairs=3)
        with backend.open(backend.build(models["fp32"], config)) as runner:
            runner.bind(feeds)
            stats = measure(runner.run_once, source=runner.source, plan=plan,
                            timer=runner.timer())  # fmt: skip
        assert stats.windows == 3 and stats.n_runs >= 3 * plan.min_window_runs
        assert stats.low_ms is not None and stats.high_ms is not None
        assert 0 < stats.low_ms <= stats.median_ms <= stats.high_ms
        assert stats.source.startswith("measured:")

    def test_runner_refuses_use_outside_with(
        self, backend_config: tuple[Backend, BuildConfig], models: dict[str, Path],
        feeds: dict[str, np.ndarray],
    ) -> None:  # fmt: skip
        """A runner touches nothing before __enter__."""
        backend, config = backend_config
        runner = backend.open(backend.build(models["fp32"], config))
        with pytest.raises(RuntimeError, match="outside"):
            runner.infer(feeds)

    def test_broken_candidate_is_a_build_error(
        self, backend_config: tuple[Backend, BuildConfig], tmp_path: Path
    ) -> None:
        """A model the backend cannot build raises CandidateBuildError, not a crash."""
        backend, config = backend_config
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(b"\x08\x07garbage that is not a model")
        with pytest.raises(CandidateBuildError):
            backend.build(bad, config)

    def test_identity_is_stable_and_names_versions(
        self, backend_config: tuple[Backend, BuildConfig]
    ) -> None:
        """The identity (cache key part) is deterministic and records the device."""
        backend, config = backend_config
        a, b = backend.identity(config), backend.identity(config)
        assert a == b and a["device"] == config.device
