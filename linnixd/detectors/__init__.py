"""The detectors: pure rules over windows of snapshots (one module per family of rules).

Which detectors exist, and in what order, is linnixd/registry.py's RULES.
"""

from __future__ import annotations

from .base import Detector


def all_detectors() -> list[Detector]:
    """One instance of every registered detector, in the policy's order."""
    from ..registry import RULES

    return [rule.detector for rule in RULES]
