"""ONNX graph handling: load/save, sanitize, units and the mixed-precision rewrite."""

from __future__ import annotations

from amp_search.graph.io import load_model, save_model
from amp_search.graph.precision import (
    ConversionReport,
    LowPrecisionNode,
    MixedPrecisionRewriter,
    apply_assignment,
    summarize_pinned,
)
from amp_search.graph.sanitize import reconcile_shapes, sanitize
from amp_search.graph.units import Unit, find_units, group_units

__all__ = [
    "ConversionReport",
    "LowPrecisionNode",
    "MixedPrecisionRewriter",
    "Unit",
    "apply_assignment",
    "find_units",
    "group_units",
    "load_model",
    "reconcile_shapes",
    "sanitize",
    "save_model",
    "summarize_pinned",
]
