"""The incident tracker: findings per tick -> firing/resolved Alerts, with cooldowns and bounds."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .health import Health
from .model import Alert, Finding

MAX_ENTRIES = 10_000  # open incidents, and separately cooldown entries, kept at most

IncidentKey = tuple[str, str]  # (rule, culprit key)


@dataclass
class _Incident:
    """One open incident: the firing alert (None when suppressed) and the latest finding."""

    incident: str
    firing: Alert | None
    finding: Finding
    last_seen: float


class IncidentTracker:
    """Opens an incident on the first finding for (rule, key), resolves it once absent resolve_after_s.

    Times: `ts` is snapshot (monotonic) time and drives resolution and cooldowns; `wall` only
    stamps the alerts.
    """

    def __init__(self, resolve_after_s: float = 2.0, max_entries: int = MAX_ENTRIES) -> None:
        self.resolve_after_s = resolve_after_s
        self.max_entries = max_entries
        self._open: dict[IncidentKey, _Incident] = {}
        self._last_fired: dict[IncidentKey, float] = {}  # ts of the last firing alert
        self._cooldown_s: dict[str, float] = {}  # per rule, as last given to update()
        self._last_ts = 0.0
        self._last_wall = 0.0
        self.suppressed = 0  # incidents held back by a cooldown
        self.evicted_incidents = 0  # open incidents dropped silently by the cap
        self.evicted_cooldowns = 0  # cooldown entries dropped early by the cap

    def health(self) -> Health:
        return Health(
            counters={
                "suppressed": self.suppressed,
                "evicted_incidents": self.evicted_incidents,
                "evicted_cooldowns": self.evicted_cooldowns,
            },
            gauges={"tracked": len(self._open), "cooldowns": len(self._last_fired)},
        )

    def update(
        self, findings: Sequence[Finding], ts: float, wall: float, cooldowns: Mapping[str, float]
    ) -> list[Alert]:
        """Feed one tick's findings; returns the alerts to emit (firing first, then resolved)."""
        self._last_ts, self._last_wall = ts, wall
        self._cooldown_s.update(cooldowns)
        alerts: list[Alert] = []
        seen: set[IncidentKey] = set()
        for f in findings:
            k = (f.rule, f.key)
            if k in seen:
                continue  # one finding per culprit per tick
            seen.add(k)
            inc = self._open.get(k)
            if inc is not None:
                inc.finding, inc.last_seen = f, ts
                continue
            alert = self._open_incident(k, f, ts, wall, float(cooldowns.get(f.rule, 0.0)))
            if alert is not None:
                alerts.append(alert)
        for k in [k for k, inc in self._open.items() if ts - inc.last_seen >= self.resolve_after_s]:
            alert = self._close(k, wall)
            if alert is not None:
                alerts.append(alert)
        return alerts

    def open_incidents(self) -> list[Alert]:
        """The firing alerts of incidents still open (suppressed ones were never announced)."""
        return [inc.firing for inc in self._open.values() if inc.firing is not None]

    def forget(self, rule: str) -> list[Alert]:
        """Resolve every incident of a rule that was disabled, and drop its cooldowns."""
        alerts = []
        for k in [k for k in self._open if k[0] == rule]:
            alert = self._close(k, self._last_wall)
            if alert is not None:
                alerts.append(alert)
        for k in [k for k in self._last_fired if k[0] == rule]:
            del self._last_fired[k]
        return alerts

    def _open_incident(
        self, k: IncidentKey, f: Finding, ts: float, wall: float, cooldown_s: float
    ) -> Alert | None:
        if len(self._open) >= self.max_entries:
            oldest = min(self._open, key=lambda key: self._open[key].last_seen)
            del self._open[oldest]
            self.evicted_incidents += 1
        incident = uuid.uuid4().hex
        last = self._last_fired.get(k)
        if last is not None and ts - last < cooldown_s:
            self.suppressed += 1
            self._open[k] = _Incident(incident, None, f, ts)  # tracked so its end is silent too
            return None
        alert = Alert(
            id=uuid.uuid4().hex,
            incident=incident,
            rule=f.rule,
            severity=f.severity,
            state="firing",
            ts=wall,
            summary=f.summary,
            culprit=f.culprit,
            evidence=dict(f.evidence),
        )
        self._open[k] = _Incident(incident, alert, f, ts)
        self._remember_firing(k, ts)
        return alert

    def _remember_firing(self, k: IncidentKey, ts: float) -> None:
        self._last_fired.pop(k, None)  # re-insert so dict order is firing order
        self._last_fired[k] = ts
        if len(self._last_fired) <= self.max_entries:
            return
        expired = [
            key
            for key, fired in self._last_fired.items()
            if ts - fired >= self._cooldown_s.get(key[0], 0.0)
        ]
        for key in expired:
            del self._last_fired[key]
        while len(self._last_fired) > self.max_entries:
            del self._last_fired[next(iter(self._last_fired))]  # the oldest firing goes first
            self.evicted_cooldowns += 1

    def _close(self, k: IncidentKey, wall: float) -> Alert | None:
        inc = self._open.pop(k)
        if inc.firing is None:
            return None
        f = inc.finding
        return Alert(
            id=uuid.uuid4().hex,
            incident=inc.incident,
            rule=f.rule,
            severity=f.severity,
            state="resolved",
            ts=wall,
            summary=f"resolved: {f.summary}",
            culprit=f.culprit,
            evidence=dict(f.evidence),
        )
