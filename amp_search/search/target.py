"""Fitting the model to the target before anything is searched.

A node the target cannot run in FP16 (ONNX Runtime's CUDA EP has no float16 ``Clip`` at
opset 11) would run on the CPU in every candidate that puts it in FP16: a copy each way, no
CUDA graph, ten times slower on a 1 ms model. :func:`fit_to_target`:

1. asks the backend which FP16 nodes of the all-FP16 rewrite the target cannot run
   (``Backend.low_precision_gaps``);
2. if there are some and the model's opset is below :data:`UPGRADE_OPSET`, upgrades it with
   ``onnx.version_converter`` (a later version of an op often has the kernel), checks that the
   upgraded model computes the same outputs on one calibration batch (ONNX Runtime CPU), and
   asks again; it keeps the upgrade only if fewer nodes are left out;
3. pins what is left FP32 in every candidate (:class:`~amp_search.graph.MixedPrecisionRewriter`
   ``pinned``), and says so in one line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from amp_search.backends import Backend, BuildConfig
from amp_search.graph import (
    MixedPrecisionRewriter,
    Unit,
    find_units,
    group_units,
    sanitize,
    summarize_pinned,
)

__all__ = ["UPGRADE_OPSET", "Fitted", "fit_to_target"]

logger = logging.getLogger(__name__)

#: The opset a model below it is upgraded to when that lets more nodes run FP16 on the target
#: (ModelOpt AutoCast also moves models to 13).
UPGRADE_OPSET = 13


@dataclass
class Fitted:
    """The model as the search will rewrite it.

    Attributes:
        model: The sanitized model (upgraded when that helped).
        units: Its units (grouped as asked).
        rewriter: Its rewriter, with the pins.
        pinned: Node name -> why it stays FP32 in every candidate.
        upgraded_from: The original opset when the model was upgraded, else None.
    """

    model: onnx.ModelProto
    units: list[Unit]
    rewriter: MixedPrecisionRewriter
    pinned: dict[str, str] = field(default_factory=dict)
    upgraded_from: int | None = None

    @property
    def notes(self) -> list[str]:
        """What the user should know about the fit (for the log and ``front.json``)."""
        out = []
        if self.upgraded_from is not None:
            out.append(
                f"The model was upgraded from opset {self.upgraded_from} to {UPGRADE_OPSET} "
                "(onnx.version_converter; same outputs on the calibration batch) so that more "
                "nodes run FP16 on the target; the candidates are at that opset."
            )
        if self.pinned:
            out.append(summarize_pinned(self.pinned))
        return out


def fit_to_target(
    model: onnx.ModelProto,
    units: list[Unit],
    backend: Backend,
    feeds: Mapping[str, np.ndarray],
    config: BuildConfig,
    max_units: int | None = None,
) -> Fitted:
    """Pins what ``config``'s device cannot run in FP16, upgrading the opset where it helps.

    Args:
        model: The sanitized model.
        units: Its units, grouped to ``max_units`` already.
        backend: The search's backend.
        feeds: One calibration batch.
        config: The build configuration (device and options).
        max_units: The grouping, for the units of an upgraded model.
    """
    rewriter = MixedPrecisionRewriter(model, units)
    pinned = backend.low_precision_gaps(rewriter, feeds, config)
    fitted = Fitted(model, units, rewriter, pinned)
    opset = _opset(model)
    if pinned and opset < UPGRADE_OPSET:
        upgraded = _upgrade(model, feeds)
        if upgraded is not None:
            new_units = find_units(upgraded)
            if max_units:
                new_units = group_units(new_units, max_units)
            new_rewriter = MixedPrecisionRewriter(upgraded, new_units)
            left = backend.low_precision_gaps(new_rewriter, feeds, config)
            if len(left) < len(pinned):
                fitted = Fitted(upgraded, new_units, new_rewriter, left, upgraded_from=opset)
    if fitted.pinned:
        fitted.rewriter = MixedPrecisionRewriter(fitted.model, fitted.units, fitted.pinned)
    for note in fitted.notes:
        logger.warning("%s", note)
    return fitted


def _opset(model: onnx.ModelProto) -> int:
    return next((int(i.version) for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)


def _upgrade(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> onnx.ModelProto | None:
    """``model`` at :data:`UPGRADE_OPSET`, if the converter manages and the outputs agree."""
    import onnxruntime as ort
    from onnx import version_converter

    try:
        upgraded = sanitize(version_converter.convert_version(model, UPGRADE_OPSET))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        runs = [
            ort.InferenceSession(
                m.SerializeToString(), so, providers=["CPUExecutionProvider"]
            ).run(None, dict(feeds))
            for m in (model, upgraded)
        ]
    except Exception as exc:  # the converter or a session: keep the model as it is
        logger.info("Opset upgrade to %d not used: %s", UPGRADE_OPSET, str(exc).splitlines()[0])
        return None
    for a, b in zip(*runs, strict=True):
        if np.asarray(a).shape != np.asarray(b).shape or not np.allclose(
            a, b, rtol=1e-4, atol=1e-6, equal_nan=True
        ):
            logger.info("Opset upgrade to %d not used: its outputs differ.", UPGRADE_OPSET)
            return None
    return upgraded
