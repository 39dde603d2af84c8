"""linnixd's D-Bus contract: names, signal signatures and the Alert/action codecs, for server and client.

bus.py (the server) encodes with these; ctl.py and any other client decode with them, so a
change to the signal shape is made, and tested (tests/test_wire.py), in one place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from dbus_next import Variant

from .model import CULPRIT_FIELDS, Alert, Culprit

BUS_NAME = "org.linnix.linnixd1"
OBJECT_PATH = "/org/linnix/linnixd1"
MANAGER_INTERFACE = "org.linnix.linnixd1.Manager"

ERROR_PREFIX = "org.linnix.linnixd1.Error"
ERROR_NOT_AUTHORIZED = ERROR_PREFIX + ".NotAuthorized"
ERROR_INVALID_ARGS = ERROR_PREFIX + ".InvalidArgs"
ERROR_POLICY = ERROR_PREFIX + ".PolicyInvalid"
ERROR_FAILED = ERROR_PREFIX + ".Failed"
ERROR_NO_SUCH_INCIDENT = ERROR_PREFIX + ".NoSuchIncident"
ERROR_BUSY = ERROR_PREFIX + ".Busy"  # too many slow reads at once; try again

# The freedesktop names both sides use.
DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
DBUS_INTERFACE = "org.freedesktop.DBus"
PROPERTIES_INTERFACE = "org.freedesktop.DBus.Properties"
INTROSPECTABLE_INTERFACE = "org.freedesktop.DBus.Introspectable"

# Signals: Alert(rule, severity, summary, details) and the enforcement pair.
ALERT_SIGNAL = "Alert"
ALERT_SIGNATURE = "sssa{sv}"
ACTION_SIGNALS = ("ActionTaken", "ActionReverted")
ACTION_FIELDS = ("unit", "action", "before", "after", "rule", "incident")
ACTION_SIGNATURE = "s" * len(ACTION_FIELDS)
PROPERTIES_CHANGED_SIGNATURE = "sa{sv}as"


def to_variant(value: Any) -> Variant | None:
    """A D-Bus variant for a plain value (None and containers have no flat form)."""
    if isinstance(value, bool):
        return Variant("b", value)
    if isinstance(value, int):
        return Variant("x", value) if -(2**63) <= value < 2**63 else Variant("d", float(value))
    if isinstance(value, float):
        return Variant("d", value)
    if isinstance(value, str):
        return Variant("s", value)
    return None


def to_json(value: Any) -> str:
    """The JSON text every method answer and the evidence detail use (sorted keys)."""
    return json.dumps(value, sort_keys=True, default=str)


def alert_details(alert: Alert) -> dict[str, Variant]:
    """The Alert signal's a{sv}: identity, culprit, evidence as JSON and each numeric evidence flat."""
    c = alert.culprit
    plain: dict[str, Any] = {
        "state": alert.state,
        "id": alert.id,
        "incident": alert.incident,
        "ts": float(alert.ts),
        **{name: getattr(c, name) for name in CULPRIT_FIELDS},  # absent ones are left out
        "culprit": c.label(),
    }
    if c.parent_pid is not None:
        plain["parent"] = f"{c.parent_comm or '?'}[{c.parent_pid}]"
    details = {k: v for k, v in ((k, to_variant(v)) for k, v in plain.items()) if v is not None}
    details["evidence"] = Variant("s", to_json(dict(alert.evidence)))
    for key, value in alert.evidence.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            flat = to_variant(value)
            if flat is not None:
                details[f"evidence.{key}"] = flat
    return details


def encode_alert(alert: Alert) -> list[Any]:
    """The Alert signal's body (ALERT_SIGNATURE)."""
    return [alert.rule, alert.severity, alert.summary, alert_details(alert)]


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Variant) else value


def decode_alert(body: Sequence[Any]) -> Alert:
    """The Alert an Alert signal's body describes (the inverse of encode_alert)."""
    rule, severity, summary, details = body
    plain: Mapping[str, Any] = {k: _plain(v) for k, v in details.items()}
    evidence = plain.get("evidence")
    return Alert(
        id=str(plain.get("id", "")),
        incident=str(plain.get("incident", "")),
        rule=str(rule),
        severity=str(severity),
        state=str(plain.get("state", "")),
        ts=float(plain.get("ts", 0.0)),
        summary=str(summary),
        culprit=Culprit.from_fields(plain),
        evidence=json.loads(evidence) if isinstance(evidence, str) else {},
    )


def encode_action(event: Mapping[str, str]) -> list[str]:
    """An ActionTaken / ActionReverted body (ACTION_SIGNATURE) from the enforcer's event."""
    return [str(event[k]) for k in ACTION_FIELDS]


def decode_action(member: str, body: Sequence[Any]) -> dict[str, str]:
    """{"signal": member, unit, action, before, after, rule, incident} from an action signal."""
    return {"signal": member, **dict(zip(ACTION_FIELDS, (str(v) for v in body), strict=True))}


def signal_match(member: str) -> str:
    """The AddMatch rule for one of linnixd's signals."""
    return (
        f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}',"
        f"interface='{MANAGER_INTERFACE}',member='{member}'"
    )
