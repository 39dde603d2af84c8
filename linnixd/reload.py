"""What a policy reload changes: each changed setting, and whether it took effect or needs a restart."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Read from the policy at each use (detectors, incident cooldowns, enforcement): a reload is enough.
LIVE_PREFIXES = ("rules.", "enforcement.")
# daemon.* settings the daemon applies on reload itself (Daemon.reload_policy)
APPLIED_DAEMON_KEYS = frozenset(
    {
        "daemon.tick_s",
        "daemon.calm_tick_s",
        "daemon.stall_attribution",
        "daemon.max_processes",
        "daemon.max_cgroups",
        "daemon.short_lived_s",
        "daemon.history_days",
        "daemon.history_max",
    }
)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values (an action list is one setting)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(
            flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}")
        )
    return out


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted names of the settings whose value differs between two policies (as_dict())."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


@dataclass
class ReloadPlan:
    """Changed settings, split into those that take effect now and those that need a restart."""

    applied: list[str] = field(default_factory=list)
    restart: list[str] = field(default_factory=list)  # "key (why)"

    def describe(self) -> str:
        parts = []
        if self.applied:
            parts.append(f"applied: {', '.join(self.applied)}")
        if self.restart:
            parts.append(f"needs a restart: {', '.join(self.restart)}")
        return "; ".join(parts) if parts else "no setting changed"


def plan(changed: list[str]) -> ReloadPlan:
    """Which changed settings a reload honours; the rest are named as needing a restart.

    Kernel collectors follow the rules on reload (collector/attach.py: bpf/sched.c attached or
    detached, PSI triggers re-armed with the new resources and threshold), so rules.* is live.
    """
    out = ReloadPlan()
    for key in changed:
        if key in APPLIED_DAEMON_KEYS or key.startswith(LIVE_PREFIXES) or key == "version":
            out.applied.append(key)
        else:
            out.restart.append(f"{key} (read at start only)")
    return out
