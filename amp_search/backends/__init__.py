"""Backends that build and run mixed-precision candidates (see ``base.py`` for the contract)."""

from __future__ import annotations

from amp_search.backends._registry import available_backends, get_backend
from amp_search.backends.base import Backend, BuildConfig, Candidate, Runner

__all__ = ["Backend", "BuildConfig", "Candidate", "Runner", "available_backends", "get_backend"]
