"""Optional imports: the one place heavy or optional packages are imported from.

``require`` imports a module a backend needs or raises :class:`BackendUnavailableError` with
the install command. ``try_import`` is Optuna's context manager for optional features such as
plots: the import error is kept and raised only when the feature is used.
"""

from __future__ import annotations

import importlib
import importlib.util
import types
from typing import Any

from amp_search.errors import BackendUnavailableError

__all__ = ["is_importable", "require", "try_import"]


def is_importable(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it."""
    import sys

    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def require(name: str, *, extra: str, what: str | None = None) -> types.ModuleType:
    """Imports ``name`` or raises :class:`BackendUnavailableError` saying how to install it.

    Args:
        name: Module to import, e.g. ``"tensorrt"``.
        extra: The amp-search extra that installs it, e.g. ``"tensorrt"``.
        what: The feature that needs it (for the message); defaults to ``name``.
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # also covers sys.modules[name] = None
        feature = what or name
        raise BackendUnavailableError(
            f"{feature} needs the '{name}' package. "
            f"Install with: pip install 'amp-search[{extra}]'",
            notes=[f"import failed with: {exc}"],
        ) from exc


class try_import:  # noqa: N801 - mirrors optuna._imports.try_import
    """Context manager that defers an ImportError until :meth:`check` is called."""

    def __init__(self) -> None:
        self._error: ImportError | None = None

    def __enter__(self) -> try_import:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is not None and issubclass(exc_type, ImportError):
            self._error = exc
            return True
        return False

    def is_successful(self) -> bool:
        """Whether the imports inside the block succeeded."""
        return self._error is None

    def check(self) -> None:
        """Raises :class:`BackendUnavailableError` if an import inside the block failed."""
        if self._error is not None:
            raise BackendUnavailableError(
                f"This feature needs the '{self._error.name}' package. "
                "Install with: pip install 'amp-search[plots]'",
                notes=[f"import failed with: {self._error}"],
            )
