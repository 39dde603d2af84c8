"""Alert history: SQLite store, queries, retention by age and count, survival across restarts."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest

from linnixd.history import AlertHistory
from linnixd.model import Alert, Culprit

NOW = 1_700_000_000.0


def alert(n: int, ts: float, rule: str = "fork_storm", state: str = "firing") -> Alert:
    return Alert(
        id=f"a{n}",
        incident=f"i{n}",
        rule=rule,
        severity="warning",
        state=state,
        ts=ts,
        summary=f"alert {n}",
        culprit=Culprit(
            kind="process",
            pid=100 + n,
            comm="lx-demo",
            cgroup="/x.slice",
            unit="x.service",
            parent_pid=1,
        ),
        evidence={"rate_per_s": 12.5 * n, "top": [{"pid": 7, "forks": 3}]},
    )


def test_store_and_query_round_trip(tmp_path: Path) -> None:
    h = AlertHistory(str(tmp_path / "h.db"), clock=lambda: NOW)
    for n in range(1, 6):
        h.store(alert(n, NOW - 100 + n, rule="fork_storm" if n % 2 else "cpu_spike"))
    assert [a.id for a in h.recent()] == ["a5", "a4", "a3", "a2", "a1"]
    assert [a.id for a in h.recent(since=NOW - 97.5)] == ["a5", "a4", "a3"]
    assert [a.id for a in h.recent(rule="cpu_spike")] == ["a4", "a2"]
    assert [a.id for a in h.recent(limit=2)] == ["a5", "a4"]
    assert h.get("a3") == alert(3, NOW - 97)  # the whole Alert comes back, evidence included
    assert h.get("missing") is None
    resolved = dataclasses.replace(alert(3, NOW - 50), id="a3r", state="resolved")
    h.store(resolved)
    assert [a.state for a in h.incident("i3")] == ["firing", "resolved"]
    h.store(dataclasses.replace(alert(3, NOW - 97), summary="stored twice"))  # same id replaces
    assert h.count() == 6 and h.get("a3").summary == "stored twice"
    h.close()


def test_history_survives_a_restart_and_uses_wal(tmp_path: Path) -> None:
    path = str(tmp_path / "h.db")
    h = AlertHistory(path, clock=lambda: NOW)
    h.store(alert(1, NOW - 10))
    h.store(alert(2, NOW - 5))
    h.close()
    again = AlertHistory(path, clock=lambda: NOW + 60)
    assert [a.id for a in again.recent()] == ["a2", "a1"]
    assert again.get("a1").evidence == {"rate_per_s": 12.5, "top": [{"pid": 7, "forks": 3}]}
    again.close()
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    indexes = {
        r[0]
        for r in sqlite3.connect(path).execute(
            "SELECT name FROM sqlite_master WHERE type = 'index'"
        )
    }
    assert {"alerts_ts", "alerts_rule_ts", "alerts_incident"} <= indexes


def test_retention_by_age_on_open(tmp_path: Path) -> None:
    path = str(tmp_path / "h.db")
    h = AlertHistory(path, max_age_days=30, clock=lambda: NOW)
    h.store(alert(1, NOW - 40 * 86400))  # older than 30 days, but the prune ran before it
    h.store(alert(2, NOW - 20 * 86400))
    h.store(alert(3, NOW - 60))
    assert h.count() == 3
    h.close()
    reopened = AlertHistory(path, max_age_days=30, clock=lambda: NOW)
    assert [a.id for a in reopened.recent()] == ["a3", "a2"]
    assert reopened.pruned == 1


def test_retention_by_count_and_periodic_prune(tmp_path: Path) -> None:
    clock = [NOW]
    h = AlertHistory(
        str(tmp_path / "h.db"), max_count=3, prune_every_s=3600, clock=lambda: clock[0]
    )
    for n in range(1, 6):
        h.store(alert(n, NOW + n))
    assert h.count() == 5  # no prune yet: the last one was at open, less than an hour ago
    clock[0] = NOW + 3601
    h.store(alert(6, NOW + 6))  # this store is past the interval and prunes
    assert [a.id for a in h.recent()] == ["a6", "a5", "a4"]
    assert h.pruned == 3


def test_retention_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="retention must be positive"):
        AlertHistory(str(tmp_path / "h.db"), max_count=0)
