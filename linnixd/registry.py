"""The rule registry: every rule's detector, its settings model and the collectors it needs.

A rule is one detector module under linnixd/detectors/ (a RuleSettings subclass and a detector
class declaring `rule`, `settings` and `needs`) plus one line in RULES below. The policy
schema (config.Rules), RULE_NAMES, the daemon's detectors and which kernel programs it
attaches all come from here; tests/test_registry.py checks MESSAGE_IDS and the shipped policy
against it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .detectors.base import COLLECTORS, Detector
from .detectors.cpu import CpuSpikeDetector, RunawayTreeDetector
from .detectors.fds import FdExhaustionDetector
from .detectors.forks import ForkStormDetector, ShortLivedJobsDetector
from .detectors.memory import MemoryLeakDetector
from .detectors.net import ConnectionChurnDetector, PortExhaustionDetector, TcpRetransmitsDetector
from .detectors.pressure import PsiSaturationDetector
from .detectors.stall import CircuitBreakerDetector, NoisyNeighbourDetector
from .settings import RuleSettings


@dataclass(frozen=True)
class Rule:
    """One rule as the daemon knows it."""

    name: str
    detector: Detector[Any]
    settings: type[RuleSettings]
    needs: frozenset[str]


def _rule(detector: Detector[Any]) -> Rule:
    unknown = set(detector.needs) - set(COLLECTORS)
    if unknown:
        raise ValueError(f"rule {detector.rule} needs unknown collectors {sorted(unknown)}")
    return Rule(detector.rule, detector, detector.settings, frozenset(detector.needs))


# The policy's canonical order (check-config, Status and `linnixctl status` list rules so).
RULES: tuple[Rule, ...] = (
    _rule(ForkStormDetector()),
    _rule(ShortLivedJobsDetector()),
    _rule(CpuSpikeDetector()),
    _rule(RunawayTreeDetector()),
    _rule(MemoryLeakDetector()),
    _rule(FdExhaustionDetector()),
    _rule(PsiSaturationDetector()),
    _rule(NoisyNeighbourDetector()),
    _rule(CircuitBreakerDetector()),
    _rule(ConnectionChurnDetector()),
    _rule(TcpRetransmitsDetector()),
    _rule(PortExhaustionDetector()),
)

RULE_NAMES: tuple[str, ...] = tuple(r.name for r in RULES)
BY_NAME: dict[str, Rule] = {r.name: r for r in RULES}
if len(BY_NAME) != len(RULES):
    raise ValueError("two rules share a name")


def rule_of(settings: type[RuleSettings]) -> Rule:
    """The rule whose settings model is `settings`."""
    for rule in RULES:
        if rule.settings is settings:
            return rule
    raise KeyError(f"{settings.__name__} is no rule's settings")


def collectors_for(enabled: Iterable[str]) -> frozenset[str]:
    """The collectors the enabled rules need (unknown names are ignored)."""
    out: set[str] = set()
    for name in enabled:
        rule = BY_NAME.get(name)
        if rule is not None:
            out |= rule.needs
    return frozenset(out)
