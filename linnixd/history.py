"""The alert history: every alert the daemon emitted, kept in SQLite across restarts."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable

from .model import Alert

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    rule TEXT NOT NULL,
    state TEXT NOT NULL,
    incident TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_ts ON alerts (ts);
CREATE INDEX IF NOT EXISTS alerts_rule_ts ON alerts (rule, ts);
CREATE INDEX IF NOT EXISTS alerts_incident ON alerts (incident);
"""


class AlertHistory:
    """SQLite (WAL) store of Alert.to_dict() records with indexed ts, rule, state and incident.

    Retention: records older than `max_age_days` go, and only the newest `max_count` stay.
    Pruning runs on open and then at most every `prune_every_s` from store(), so the daemon
    needs no timer of its own. One instance is used from one thread (the daemon's loop).
    """

    def __init__(
        self,
        path: str,
        *,
        max_age_days: float = 30.0,
        max_count: int = 100_000,
        prune_every_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_age_days <= 0 or max_count <= 0:
            raise ValueError("alert history retention must be positive (days and count)")
        self.path = path
        self.max_age_days = max_age_days
        self.max_count = max_count
        self.prune_every_s = prune_every_s
        self._clock = clock
        self.pruned = 0  # records removed by retention since open
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a crash can lose the last commits but never corrupts the file
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._last_prune = 0.0
        self.prune()

    def store(self, alert: Alert) -> None:
        """Insert (or replace, by id) one alert; prunes when the last prune is old enough."""
        self._db.execute(
            "INSERT OR REPLACE INTO alerts (id, ts, rule, state, incident, body) VALUES (?, ?, ?, ?, ?, ?)",
            (
                alert.id,
                alert.ts,
                alert.rule,
                alert.state,
                alert.incident,
                json.dumps(alert.to_dict(), sort_keys=True, default=str),
            ),
        )
        if self._clock() - self._last_prune >= self.prune_every_s:
            self.prune()

    def recent(self, since: float = 0.0, rule: str = "", limit: int = 100) -> list[Alert]:
        """Alerts with ts >= since (and of `rule` when given), newest first, at most `limit`."""
        if rule:
            rows = self._db.execute(
                "SELECT body FROM alerts WHERE ts >= ? AND rule = ? ORDER BY ts DESC, rowid DESC LIMIT ?",
                (since, rule, limit),
            )
        else:
            rows = self._db.execute(
                "SELECT body FROM alerts WHERE ts >= ? ORDER BY ts DESC, rowid DESC LIMIT ?",
                (since, limit),
            )
        return [Alert.from_dict(json.loads(body)) for (body,) in rows]

    def get(self, alert_id: str) -> Alert | None:
        row = self._db.execute("SELECT body FROM alerts WHERE id = ?", (alert_id,)).fetchone()
        return Alert.from_dict(json.loads(row[0])) if row else None

    def incident(self, incident_id: str) -> list[Alert]:
        """Every record of one incident (firing, then resolved), oldest first."""
        rows = self._db.execute(
            "SELECT body FROM alerts WHERE incident = ? ORDER BY ts, rowid", (incident_id,)
        )
        return [Alert.from_dict(json.loads(body)) for (body,) in rows]

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM alerts").fetchone()[0])

    def prune(self) -> int:
        """Apply the retention now; returns how many records were removed."""
        now = self._clock()
        cutoff = now - self.max_age_days * 86400.0
        removed = self._db.execute("DELETE FROM alerts WHERE ts < ?", (cutoff,)).rowcount
        removed += self._db.execute(
            "DELETE FROM alerts WHERE rowid NOT IN "
            "(SELECT rowid FROM alerts ORDER BY ts DESC, rowid DESC LIMIT ?)",
            (self.max_count,),
        ).rowcount
        self._last_prune = now
        self.pruned += removed
        return removed

    def close(self) -> None:
        self._db.close()
