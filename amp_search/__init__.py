"""amp-search: search-based FP16 mixed precision for ONNX models headed for TensorRT.

The public API (imports nothing heavy: onnx/onnxruntime load when used)::

    from amp_search import apply_assignment, sanitize, load_model, find_units
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Precision",
    "PrecisionAssignment",
    "__version__",
    "apply_assignment",
    "find_units",
    "inspect_model",
    "load_model",
    "sanitize",
]

from amp_search.types import Precision, PrecisionAssignment

if TYPE_CHECKING:
    from amp_search.graph import apply_assignment, find_units, load_model, sanitize
    from amp_search.profiling.inspection import inspect_model

_LAZY = {
    "apply_assignment": "amp_search.graph",
    "find_units": "amp_search.graph",
    "load_model": "amp_search.graph",
    "sanitize": "amp_search.graph",
    "inspect_model": "amp_search.profiling.inspection",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'amp_search' has no attribute {name!r}")
