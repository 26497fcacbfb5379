"""Profiling: FP32 ranges with every tensor exposed, FP16 per-unit deviation, risk rules."""

from __future__ import annotations

from amp_search.profiling.ranges import Profile, UnitDeviation, profile_model
from amp_search.profiling.sensitivity import RiskLevel, UnitRisk, assess_units

__all__ = ["Profile", "RiskLevel", "UnitDeviation", "UnitRisk", "assess_units", "profile_model"]
