"""The TensorRT backend (registry name ``tensorrt``): strongly typed engines, CUDA-event timing.

Importing this package imports neither ``tensorrt``/``tensorrt_rtx`` nor cuda-python: they are
imported inside the functions that need them (``builder.py``, ``runner.py``, ``_cuda.py``).
"""

from __future__ import annotations

from amp_search.backends.trt.backend import TensorRTBackend
from amp_search.backends.trt.builder import BuiltEngine, build_engine, layer_precisions
from amp_search.backends.trt.runner import TensorRTRunner

__all__ = ["BuiltEngine", "TensorRTBackend", "TensorRTRunner", "build_engine", "layer_precisions"]
