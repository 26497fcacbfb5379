"""FP16 risk rules: from ranges and measured FP16 (BF16) deviation to a risk level per unit.

Rules follow a ``NodeRuleBase`` shape: each looks at one unit's facts and may return a
finding (level + reason). A unit's risk is its worst finding. The order of units by risk is
both the report users read and the prior that seeds the search (keep the k riskiest FP32).

Built-in rules:

- ``weight-overflow`` (critical): a weight above 65504; the unit can only stay FP32.
- ``activation-range``: critical when an activation exceeds 65504 on the calibration data;
  high when it exceeds the threshold (10000 by default, "near overflow"); info when it
  holds magnitudes >= 1e30, the float32 minimum that attention masks add (-3.4e38): FP16
  turns them into -inf, harmless after Softmax unless a row is fully masked, and the
  measured FP16 deviation tells which.
- ``fp16-nonfinite`` (critical): the all-FP16 model's output of this unit holds inf/NaN.
- ``fp16-deviation`` (high/medium): its measured FP16 relative L2 error is above 1e-1/1e-2.
- ``bf16-rescue`` (info): FP16 overflows here (a critical ``activation-range`` or
  ``fp16-nonfinite`` finding) while the all-BF16 model's deviation here is finite: BF16
  keeps FP32's range, so searching with ``--precisions fp16,bf16`` may keep the unit low.
  Only with a BF16 pass (``inspect --precisions fp16,bf16``); it never raises the level.
- ``weight-flush`` (medium): weights that flush to zero in FP16 (below 5.96e-8).
- ``weight-subnormal`` (low): more than 1% of nonzero weights in the FP16 subnormal range.
- ``activation-underflow`` (low): more than 5% of nonzero activations flush to zero.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from amp_search.graph.units import Unit
from amp_search.profiling.ranges import Profile, UnitDeviation
from amp_search.types import TensorRanges

__all__ = [
    "BF16_RESCUE",
    "DEFAULT_THRESHOLD",
    "RiskLevel",
    "UnitRisk",
    "assess_units",
    "default_rules",
]

DEFAULT_THRESHOLD = 10000.0
SENTINEL = 1e30
#: The name of the rule that finds units where BF16 rescues an FP16 overflow.
BF16_RESCUE = "bf16-rescue"


class RiskLevel(IntEnum):
    """How likely FP16 breaks a unit (higher is worse)."""

    NONE = 0
    INFO = 1
    LOW = 2
    MEDIUM = 3
    HIGH = 4
    CRITICAL = 5

    def __str__(self) -> str:
        return self.name.lower()


@dataclass
class UnitFacts:
    """What the rules see about one unit.

    Attributes:
        unit: The unit.
        activations: Ranges of every float tensor it produces.
        weights: Ranges of its float weights.
        deviation: Its outputs' deviation in the all-FP16 model.
        upstream: Deviations of the units that feed it (to tell an error it makes from one
            it inherits).
        bf16_deviation: Its outputs' deviation in the all-BF16 model (None: not measured).
    """

    unit: Unit
    activations: list[TensorRanges]
    weights: list[TensorRanges]
    deviation: UnitDeviation | None
    upstream: list[UnitDeviation] = field(default_factory=list)
    bf16_deviation: UnitDeviation | None = None


@dataclass
class UnitRisk:
    """A unit's risk: its worst finding, every finding, and the figures behind them.

    ``deviation`` and ``bf16_deviation`` are the unit's measured deviations in the all-FP16
    and all-BF16 models (None: that pass did not run); ``bf16_withheld`` says why the rewrite
    withholds BF16 from the unit (None: it does not, or BF16 was not asked for).
    """

    unit: Unit
    level: RiskLevel = RiskLevel.NONE
    findings: list[tuple[RiskLevel, str, str]] = field(default_factory=list)
    max_abs: float = 0.0
    act_subnormal_fraction: float = 0.0
    act_flush_fraction: float = 0.0
    weight_max_abs: float = 0.0
    weight_subnormal: int = 0
    weight_flush: int = 0
    weight_numel: int = 0
    deviation: UnitDeviation | None = None
    bf16_deviation: UnitDeviation | None = None
    bf16_withheld: str | None = None

    @property
    def reason(self) -> str:
        """The reasons of the findings at the worst level, joined."""
        worst = [r for lvl, _, r in self.findings if lvl == self.level]
        return "; ".join(worst)

    @property
    def locked_fp32(self) -> bool:
        """Whether the unit can only stay FP32 (a weight overflows FP16)."""
        return any(rule == "weight-overflow" for _, rule, _ in self.findings)

    @property
    def bf16_rescue(self) -> str | None:
        """The ``bf16-rescue`` finding's reason (None: it did not fire)."""
        return next((r for _, rule, r in self.findings if rule == BF16_RESCUE), None)

    def sort_key(self) -> tuple[float, ...]:
        """Riskiest first: level, then measured deviation, then magnitude."""
        dev = self.deviation.rel_l2 if self.deviation else 0.0
        return (-int(self.level), -min(dev, 1e300), -self.max_abs)

    def to_json(self, bf16: bool = False) -> dict[str, Any]:
        """Plain-data form; with ``bf16``, the keys ``bf16`` and ``bf16_withheld`` too."""
        out: dict[str, Any] = {
            "unit": self.unit.name,
            "nodes": list(self.unit.nodes),
            "op_types": list(self.unit.op_types),
            "risk": str(self.level),
            "reason": self.reason,
            "findings": [
                {"level": str(lv), "rule": rule, "reason": r} for lv, rule, r in self.findings
            ],
            "locked_fp32": self.locked_fp32,
            "max_abs": self.max_abs,
            "activation_subnormal_fraction": self.act_subnormal_fraction,
            "activation_flush_fraction": self.act_flush_fraction,
            "weight_max_abs": self.weight_max_abs,
            "weight_numel": self.weight_numel,
            "weight_subnormal": self.weight_subnormal,
            "weight_flush_to_zero": self.weight_flush,
            "fp16": self.deviation.to_json() if self.deviation else None,
        }
        if bf16:
            out["bf16"] = self.bf16_deviation.to_json() if self.bf16_deviation else None
            out["bf16_withheld"] = self.bf16_withheld
        return out


class NodeRuleBase(abc.ABC):
    """A rule: looks at one unit's facts and returns a finding or None."""

    name: str = ""

    @abc.abstractmethod
    def check(self, facts: UnitFacts) -> tuple[RiskLevel, str] | None:
        """(level, reason) if the rule fires."""


class WeightOverflowRule(NodeRuleBase):
    name = "weight-overflow"

    def check(self, facts: UnitFacts) -> tuple[RiskLevel, str] | None:
        bad = [w for w in facts.weights if w.n_overflow]
        if bad:
            w = max(bad, key=lambda t: t.max_abs)
            return (
                RiskLevel.CRITICAL,
                f"weight {w.name} reaches {w.max_abs:.3g} > 65504: FP32 only",
            )
        return None


class ActivationRangeRule(NodeRuleBase):
    """Overflow, sentinel and near-overflow in one pass over the activations."""

    name = "activation-range"

    def __init__(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        self.threshold = threshold

    def check(self, facts: UnitFacts) -> tuple[RiskLevel, str] | None:
        if not facts.activations:
            return None
        t = max(facts.activations, key=lambda a: a.max_abs)
        if t.max_abs >= SENTINEL:
            return RiskLevel.INFO, (
                f"{t.name} holds sentinel values ({t.max_abs:.3g}, e.g. an attention mask): "
                "-inf in FP16, harmless unless a row is fully masked"
            )
        if t.n_overflow:
            return RiskLevel.CRITICAL, f"{t.name} reaches {t.max_abs:.4g} > 65504: overflows FP16"
        if t.max_abs > self.threshold:
            return RiskLevel.HIGH, (
                f"{t.name} reaches {t.max_abs:.4g} > {self.threshold:g} "
                f"({t.max_abs / 65504:.0%} of the FP16 maximum)"
            )
        return None


class MeasuredDeviationRule(NodeRuleBase):
    name = "fp16-deviation"

    def check(self, facts: UnitFacts) -> tuple[RiskLevel, str] | None:
        d = facts.deviation
        if d is None or not d.numel:
            return None
        if d.nonfinite:
            bad = [u.unit for u in facts.upstream if u.nonfinite]
            if bad:
                return RiskLevel.LOW, f"inherits inf/NaN from {bad[0]} in the all-FP16 model"
            return RiskLevel.CRITICAL, f"all-FP16 model gives {d.nonfinite} inf/NaN here"
        if d.rel_l2 > 1e-1:
            return RiskLevel.HIGH, f"all-FP16 rel. L2 {d.rel_l2:.2g} here"
        if d.rel_l2 > 1e-2:
            return RiskLevel.MEDIUM, f"all-FP16 rel. L2 {d.rel_l2:.2g} here"
        return None


class Bf16RescueRule(NodeRuleBase):
    """FP16 overflows here (the critical findings above) while BF16 stays finite."""

    name = BF16_RESCUE

    def check(self, facts: UnitFacts) -> tuple[RiskLevel, str] | None:
        b = facts.bf16_deviation
        if b is None or not b.numel or b.nonfinite:
            return None
        for rule in (ActivationRangeRule(), MeasuredDeviationRule()):
            found = rule.check(facts)
            if found is not None and found[0] == RiskLevel.CRITICAL:
                return RiskLevel.INFO, (
                    f"BF16 rescues the FP16 overflow: all-BF16 rel. L2 {b.rel_l2:.2g} here, "
                    f"finite where FP16 fails ({found[1]}); search with --precisions fp16,bf16"
                )
        return None


class WeightFlushRule(NodeRuleBase):
    name = "weight-flush"

    def check(self, facts: UnitFacts) -> tuple[RiskLevel, str] | None:
        flush = sum(w.n_flush for w in facts.weights)
        if flush:
            return RiskLevel.MEDIUM, f"{flush} weight(s) flush to zero in FP16"
        return None


class WeightSubnormalRule(NodeRuleBase):
    name = "weight-subnormal"

    def check(self, facts: UnitFacts) -> tuple[RiskLevel, str] | None:
        sub = sum(w.n_subnormal for w in facts.weights)
        nonzero = sum(w.nonzero for w in facts.weights)
        if nonzero and sub / nonzero > 0.01:
            return RiskLevel.LOW, f"{sub / nonzero:.1%} of weights FP16-subnormal"
        return None


class ActivationUnderflowRule(NodeRuleBase):
    name = "activation-underflow"

    def check(self, facts: UnitFacts) -> tuple[RiskLevel, str] | None:
        for a in facts.activations:
            if a.flush_fraction > 0.05:
                return RiskLevel.LOW, f"{a.flush_fraction:.1%} of {a.name} flushes to zero"
        return None


def default_rules(threshold: float = DEFAULT_THRESHOLD) -> list[NodeRuleBase]:
    """The built-in rules, in reporting order."""
    return [
        WeightOverflowRule(),
        ActivationRangeRule(threshold),
        MeasuredDeviationRule(),
        Bf16RescueRule(),
        WeightFlushRule(),
        WeightSubnormalRule(),
        ActivationUnderflowRule(),
    ]


def assess_units(
    units: list[Unit],
    profile: Profile,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    rules: list[NodeRuleBase] | None = None,
) -> list[UnitRisk]:
    """Every unit's risk, riskiest first."""
    rules = rules if rules is not None else default_rules(threshold)
    out: list[UnitRisk] = []
    for unit in units:
        acts = [profile.tensors[n] for n in unit.tensors or unit.outputs if n in profile.tensors]
        weights = [profile.tensors[n] for n in unit.weights if n in profile.tensors]
        upstream = [profile.deviations[f] for f in unit.feeders if f in profile.deviations]
        facts = UnitFacts(unit, acts, weights, profile.deviations.get(unit.name), upstream,
                          profile.bf16_deviations.get(unit.name))  # fmt: skip
        risk = UnitRisk(unit=unit, deviation=facts.deviation,
                        bf16_deviation=facts.bf16_deviation,
                        bf16_withheld=profile.bf16_withheld.get(unit.name))  # fmt: skip
        if acts:
            risk.max_abs = max(a.max_abs for a in acts)
            risk.act_subnormal_fraction = max(a.subnormal_fraction for a in acts)
            risk.act_flush_fraction = max(a.flush_fraction for a in acts)
        if weights:
            risk.weight_max_abs = max(w.max_abs for w in weights)
            risk.weight_subnormal = sum(w.n_subnormal for w in weights)
            risk.weight_flush = sum(w.n_flush for w in weights)
            risk.weight_numel = sum(w.numel for w in weights)
        for rule in rules:
            found = rule.check(facts)
            if found is not None:
                level, reason = found
                risk.findings.append((level, rule.name, reason))
                risk.level = max(risk.level, level)
        out.append(risk)
    out.sort(key=UnitRisk.sort_key)
    return out
