"""Backend registry: user-facing name -> ``"module:Class"``, imported only when chosen.

Third-party backends register through the ``amp_search.backends`` entry-point group. A backend
whose module fails to import becomes a :class:`MissingBackend` that reports the import error
when used (Polygraphy's ``MissingTool``).
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points
from typing import Any

from amp_search.backends.base import Backend
from amp_search.errors import BackendUnavailableError, UserInputError

__all__ = ["BUILTIN_BACKENDS", "MissingBackend", "available_backends", "get_backend"]

logger = logging.getLogger(__name__)

BUILTIN_BACKENDS: dict[str, str] = {
    "onnxruntime": "amp_search.backends.ort:OnnxRuntimeBackend",
    "tensorrt": "amp_search.backends.trt:TensorRTBackend",
}
ALIASES = {"ort": "onnxruntime", "trt": "tensorrt"}


class MissingBackend:
    """Stands in for a backend whose module could not be imported."""

    def __init__(self, name: str, error: BaseException) -> None:
        self.name = name
        self.error = error

    def unavailable_reason(self) -> str:
        """The import error, as text."""
        return f"failed to load: {self.error}"

    def __getattr__(self, attr: str) -> Any:
        raise BackendUnavailableError(
            f"Backend '{self.name}' could not be loaded: {self.error}. "
            "Check its installation (amp-search backends lists what is available)."
        )


def _all_specs() -> dict[str, str]:
    specs = dict(BUILTIN_BACKENDS)
    try:
        for ep in entry_points(group="amp_search.backends"):
            specs.setdefault(ep.name, ep.value)
    except Exception as exc:  # broken third-party metadata must not break amp-search
        logger.warning("Could not read amp_search.backends entry points: %s", exc)
    return specs


def get_backend(name: str) -> Backend:
    """An instance of the backend called ``name`` (``onnxruntime``, ``tensorrt``, ...)."""
    key = ALIASES.get(name, name)
    specs = _all_specs()
    if key not in specs:
        raise UserInputError(
            f"Unknown backend {name!r}; choose one of: {', '.join(sorted(specs))}."
        )
    module_name, _, cls_name = specs[key].partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except Exception as exc:
        return MissingBackend(key, exc)  # type: ignore[return-value]
    instance: Backend = cls()
    return instance


def available_backends() -> dict[str, str | None]:
    """Backend name -> None if usable here, else the reason it is not."""
    out: dict[str, str | None] = {}
    for name in sorted(_all_specs()):
        backend = get_backend(name)
        reason = backend.unavailable_reason()
        out[name] = reason
    return out
