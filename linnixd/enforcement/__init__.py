"""Guarded enforcement: opt-in actions on the systemd units alerts blame, their ledger and their revert.

Nothing is acted on unless enforcement was enabled (through polkit) AND the rule that fired has
an action in the policy. Every action passes the guard (protected units) and the rate limit,
records the unit's value BEFORE it changes it (write-ahead, in a ledger under the state dir),
and is reverted after its duration, when its incident resolves, when enforcement is disabled,
or at the next start when a previous run died with it applied. systemd stays the owner of the
cgroup tree: changes go through its D-Bus API (a `Units` backend, see systemd_units.py).
"""

from __future__ import annotations

from .base import UINT64_MAX, Caller, EnforcementError, UnitGone, Units
from .core import Enforcer

__all__ = [
    "UINT64_MAX",
    "Caller",
    "EnforcementError",
    "Enforcer",
    "UnitGone",
    "Units",
]
