"""The alert history: every alert the daemon emitted, and each incident's triage snapshot, in SQLite.

Schema versions (PRAGMA user_version), migrated in place on open:
    0  alerts (id, ts, rule, state, incident, body)
    1  + incidents (incident, rule, opened_ts, resolved_ts, summary, culprit, snapshot, resolution),
       back-filled from the alerts already stored
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from .health import Health
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
_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS incidents (
    incident TEXT PRIMARY KEY,
    rule TEXT NOT NULL,
    opened_ts REAL NOT NULL,
    resolved_ts REAL,
    summary TEXT NOT NULL,
    culprit TEXT NOT NULL,
    snapshot TEXT,
    resolution TEXT
);
CREATE INDEX IF NOT EXISTS incidents_opened ON incidents (opened_ts);
"""
SCHEMA_VERSION = 1
SNAPSHOTS_KEPT = 1000  # incidents whose snapshot is kept (<= 64 KiB each: at most ~64 MiB)


class AlertHistory:
    """SQLite (WAL) store of Alert.to_dict() records with indexed ts, rule, state and incident.

    Retention: records older than `max_age_days` go, and only the newest `max_count` stay; an
    incident goes with its last alert record, and only the newest `snapshots_kept` incidents
    keep their triage snapshot.
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
        snapshots_kept: int = SNAPSHOTS_KEPT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_age_days <= 0 or max_count <= 0:
            raise ValueError("alert history retention must be positive (days and count)")
        self.path = path
        self.max_age_days = max_age_days
        self.max_count = max_count
        self.prune_every_s = prune_every_s
        self.snapshots_kept = snapshots_kept
        self._clock = clock
        self.pruned = 0  # records removed by retention since open
        self.stored = 0
        self.write_errors = 0  # alerts the database refused (the daemon journals why)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a crash can lose the last commits but never corrupts the file
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self.migrate()
        self.snapshots_pruned = 0  # snapshots dropped by SNAPSHOTS_KEPT since open
        self._last_prune = 0.0
        self.prune()

    def migrate(self) -> None:
        """Bring an older database up to SCHEMA_VERSION in one transaction (a failure changes nothing)."""
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has history schema {version}, newer than this linnixd's {SCHEMA_VERSION}"
            )
        if version == SCHEMA_VERSION:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if version < 1:
                for statement in _SCHEMA_V1.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                rows = self._db.execute("SELECT body FROM alerts ORDER BY ts, rowid").fetchall()
                for (body,) in rows:
                    self._index_incident(Alert.from_dict(json.loads(body)))
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _index_incident(self, alert: Alert) -> None:
        """Keep the incidents table in step with one alert record."""
        if alert.state == "firing":
            self._db.execute(
                "INSERT OR IGNORE INTO incidents (incident, rule, opened_ts, summary, culprit) "
                "VALUES (?, ?, ?, ?, ?)",
                (alert.incident, alert.rule, alert.ts, alert.summary, alert.culprit.label()),
            )
        elif alert.state == "resolved":
            self._db.execute(
                "UPDATE incidents SET resolved_ts = ? WHERE incident = ?",
                (alert.ts, alert.incident),
            )

    def store(self, alert: Alert) -> None:
        """Insert (or replace, by id) one alert; prunes when the last prune is old enough."""
        try:
            self._index_incident(alert)
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
        except sqlite3.Error:
            self.write_errors += 1
            raise
        self.stored += 1
        if self._clock() - self._last_prune >= self.prune_every_s:
            self.prune()

    def health(self) -> Health:
        return Health(
            counters={
                "stored": self.stored,
                "pruned": self.pruned,
                "snapshots_pruned": self.snapshots_pruned,
                "write_errors": self.write_errors,
            }
        )

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

    def store_snapshot(self, incident_id: str, snapshot: str) -> bool:
        """Keep an incident's triage snapshot (JSON text); False when the incident is not stored."""
        cur = self._db.execute(
            "UPDATE incidents SET snapshot = ? WHERE incident = ?", (snapshot, incident_id)
        )
        return cur.rowcount > 0

    def store_resolution(self, incident_id: str, resolution: str) -> bool:
        """Keep what was measured at resolve (JSON text) with the incident."""
        cur = self._db.execute(
            "UPDATE incidents SET resolution = ? WHERE incident = ?", (resolution, incident_id)
        )
        return cur.rowcount > 0

    def triage(
        self, incident_id: str
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None] | None:
        """(snapshot, resolution) of an incident, either None when not kept; None: no such incident."""
        row = self._db.execute(
            "SELECT snapshot, resolution FROM incidents WHERE incident = ?", (incident_id,)
        ).fetchone()
        if row is None:
            return None
        return (
            json.loads(row[0]) if row[0] else None,
            json.loads(row[1]) if row[1] else None,
        )

    def latest_incident(self) -> str | None:
        """The id of the incident opened last (ties: the one stored last)."""
        row = self._db.execute(
            "SELECT incident FROM incidents ORDER BY opened_ts DESC, rowid DESC LIMIT 1"
        ).fetchone()
        return str(row[0]) if row else None

    def incidents(self, since: float = 0.0, limit: int = 100) -> list[dict[str, Any]]:
        """Incidents opened at or after `since`, newest first: id, rule, times, culprit, summary."""
        rows = self._db.execute(
            "SELECT incident, rule, opened_ts, resolved_ts, summary, culprit, "
            "snapshot IS NOT NULL FROM incidents WHERE opened_ts >= ? "
            "ORDER BY opened_ts DESC, rowid DESC LIMIT ?",
            (since, limit),
        )
        return [
            {
                "incident": r[0],
                "rule": r[1],
                "opened_ts": r[2],
                "resolved_ts": r[3],
                "state": "resolved" if r[3] is not None else "open",
                "summary": r[4],
                "culprit": r[5],
                "has_snapshot": bool(r[6]),
            }
            for r in rows
        ]

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
        self._db.execute(
            "DELETE FROM incidents WHERE incident NOT IN (SELECT incident FROM alerts)"
        )
        self.snapshots_pruned += self._db.execute(
            "UPDATE incidents SET snapshot = NULL WHERE snapshot IS NOT NULL AND rowid NOT IN "
            "(SELECT rowid FROM incidents WHERE snapshot IS NOT NULL "
            "ORDER BY opened_ts DESC, rowid DESC LIMIT ?)",
            (self.snapshots_kept,),
        ).rowcount
        self._last_prune = now
        self.pruned += removed
        return removed

    def close(self) -> None:
        self._db.close()
