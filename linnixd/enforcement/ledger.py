"""The action ledger's record: what was changed on which unit, and its validation when read back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import UINT64_MAX


@dataclass
class ActionRecord:
    """One action in the ledger: enough to revert it exactly, even from another process."""

    id: str
    unit: str
    action: str  # throttle_cpu, limit_memory, freeze
    prop: str  # the systemd property changed
    before: Any  # its value before we changed it (restored on revert)
    after: Any
    rule: str
    incident: str
    applied_at: float  # epoch
    expires_at: float  # epoch
    state: str = "pending"  # pending (systemd asked) -> applied (systemd answered)
    revert_failures: int = 0
    retry_at: float = 0.0

    def event(self) -> dict[str, str]:
        """The ActionTaken / ActionReverted payload."""
        return {
            "unit": self.unit,
            "action": self.action,
            "before": show(self.before),
            "after": show(self.after),
            "rule": self.rule,
            "incident": self.incident,
        }


def show(value: Any) -> str:
    return "infinity" if value == UINT64_MAX else str(value)


# the property each action changes; a ledger entry must pair them the same way
PROPERTY = {
    "throttle_cpu": "CPUQuotaPerSecUSec",
    "limit_memory": "MemoryHigh",
    "freeze": "FreezerState",
}
_FIELDS = frozenset(ActionRecord.__dataclass_fields__)


def _uint64(value: Any) -> bool:
    return type(value) is int and 0 <= value <= UINT64_MAX


def _number(value: Any) -> bool:
    return type(value) in (int, float) and value == value  # not NaN


def record_problem(entry: Any) -> str | None:
    """Why a ledger entry read back from disk is not an action this daemon could have recorded."""
    if not isinstance(entry, dict):
        return "not an object"
    if set(entry) - _FIELDS or set(entry) < {
        f for f in _FIELDS if f not in {"state", "revert_failures", "retry_at"}
    }:
        return f"fields {sorted(entry)[:12]} are not an action record's"
    for key in ("id", "unit", "action", "prop", "rule", "incident", "state"):
        if key in entry and not isinstance(entry[key], str):
            return f"{key} is not a string"
    if len(entry["id"]) > 64 or len(entry["rule"]) > 200 or len(entry["incident"]) > 300:
        return "id, rule or incident too long"
    if PROPERTY.get(entry["action"]) != entry["prop"]:
        return f"action {entry['action'][:40]!r} does not change {entry['prop'][:40]!r}"
    if entry.get("state", "pending") not in ("pending", "applied"):
        return f"state {entry['state'][:40]!r} is not pending or applied"
    if entry["action"] == "freeze":
        if entry["before"] != "running" or entry["after"] != "frozen":
            return "a freeze must go from running to frozen"
    elif not (_uint64(entry["before"]) and _uint64(entry["after"])):
        return f"{entry['prop']} values must be integers in 0..{UINT64_MAX}"
    for key in ("applied_at", "expires_at", "retry_at"):
        if key in entry and not _number(entry[key]):
            return f"{key} is not a number"
    if "revert_failures" in entry and not (
        type(entry["revert_failures"]) is int and entry["revert_failures"] >= 0
    ):
        return "revert_failures is not a count"
    return None
