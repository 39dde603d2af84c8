"""Triage: the incident snapshot (real /proc tree, window figures, size bound), its resolve, explain, history."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from snapshots import T0, WALL0, cgroup, exit_record, proc, psi, snap

from linnixd.explain import explain, render
from linnixd.history import SCHEMA_VERSION, AlertHistory
from linnixd.model import (
    Alert,
    CgroupRunqueue,
    Culprit,
    LifecycleCounts,
    Snapshot,
    StallEdge,
    StallSnapshot,
)
from linnixd.triage import MAX_SNAPSHOT_BYTES, TREE_READ, Triage, bound, encode

HOG_CG = "/system.slice/hog.service"
VICTIM_CG = "/system.slice/web.service"
NO_PID = 9_999_999  # above any pid_max: never a live process


@pytest.fixture
def tree() -> Iterator[list[int]]:
    """A real process tree: a shell with two sleeping children; [parent, child, child]."""
    parent = subprocess.Popen(
        ["/bin/sh", "-c", "sleep 300 & sleep 300 & echo ready; wait"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
    children = sorted(
        int(p) for p in Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()
    )
    assert len(children) == 2
    yield [parent.pid, *children]
    for pid in children:
        subprocess.run(["kill", str(pid)], check=False)
    parent.kill()
    parent.wait()


def window_for(pids: list[int], *, n: int = 20, rss_growth: int = 0) -> list[Snapshot]:
    """n ticks in which pids[0] and its children burn CPU in HOG_CG and stall VICTIM_CG."""
    root, *children = pids
    out = []
    for i in range(n):
        procs = [
            proc(
                root,
                1,
                "sh",
                cpu=80.0 + i,
                rss=(20 << 20) + i * rss_growth,
                cgroup=HOG_CG,
                unit="hog.service",
            ),
            *(
                proc(c, root, "sleep", cpu=10.0, cgroup=HOG_CG, unit="hog.service")
                for c in children
            ),
            proc(7000, 1, "nginx", cpu=5.0, rss=300 << 20, cgroup=VICTIM_CG, unit="web.service"),
        ]
        s = snap(
            i,
            procs,
            by_parent={root: LifecycleCounts(forks=3, execs=3, exits=2, short_exits=2)},
            by_cgroup={HOG_CG: LifecycleCounts(forks=4, execs=3, exits=2, short_exits=2)},
            cgroups=[
                cgroup(HOG_CG, memory=64 << 20, pressure={"cpu": psi(5.0)}),
                cgroup(VICTIM_CG, memory=400 << 20, pressure={"cpu": psi(40.0)}),
            ],
            system_pressure={"cpu": psi(30.0), "memory": psi(0.0), "io": psi(1.0)},
            exits=[exit_record(50_000 + i, root, "false", 1, code=1)],
        )
        stall = StallSnapshot(
            runqueue={
                VICTIM_CG: CgroupRunqueue(VICTIM_CG, 200_000, 40),
                HOG_CG: CgroupRunqueue(HOG_CG, 20_000, 9),
            },
            edges=(StallEdge(VICTIM_CG, HOG_CG, 150_000, 12),),
            unattributed_us=5_000,
            migrated_waits=7,
        )
        out.append(dataclasses.replace(s, stall=stall, cpu_util_pct=95.0))
    return out


def alert_for(
    root: int, *, kind: str = "process", state: str = "firing", ts: float | None = None
) -> Alert:
    return Alert(
        id=f"a-{state}",
        incident="inc1",
        rule="cpu_spike",
        severity="warning",
        state=state,
        ts=ts if ts is not None else WALL0 + 9.5,
        summary=f"cpu spike: sh[{root}] in hog.service at 90% CPU",
        culprit=Culprit(kind=kind, pid=root, comm="sh", cgroup=HOG_CG, unit="hog.service"),
        evidence={"cpu_pct": 89.5, "max_cpu_pct": 99.0, "samples": 10, "threads": 1},
    )


def test_capture_reads_the_culprits_real_tree_and_the_window(
    tree: list[int], tmp_path: Path
) -> None:
    history = AlertHistory(str(tmp_path / "h.db"))
    triage = Triage(history)
    window = window_for(tree)
    alert = alert_for(tree[0])
    history.store(alert)
    triage.on_alert(alert, window)

    stored, resolution = history.triage("inc1")  # type: ignore[misc]
    assert resolution is None
    s = stored
    assert s["incident"] == "inc1" and s["rule"] == "cpu_spike"
    members = {m["pid"]: m for m in s["tree"]["members"]}
    assert list(members) == tree  # breadth first: the root, then its children by pid
    assert members[tree[0]]["comm"] == "sh" and members[tree[0]]["cpu_pct"] == 99.0
    assert members[tree[0]]["cmdline"].startswith("/bin/sh -c sleep 300")
    for child in tree[1:]:  # what /proc says now, not what the model said
        assert members[child]["comm"] == "sleep" and members[child]["state"] == "sleeping"
        assert members[child]["ppid"] == tree[0] and members[child]["threads"] == 1
        assert members[child]["fds"] is not None and members[child]["fds"] >= 3
        assert members[child]["rss_bytes"] > 0
    assert s["tree"]["total"] == 3 and s["tree"]["gone"] == 0 and s["tree"]["truncated"] == 0
    # window figures: top lists, stall, pressure, lifecycle, series
    assert s["top_processes"]["cpu"][0]["pid"] == tree[0]
    assert s["top_processes"]["memory"][0]["comm"] == "nginx"
    assert s["top_cgroups"]["stall_caused"] == [HOG_CG]
    assert s["top_cgroups"]["stall_suffered"] == [VICTIM_CG]
    assert s["victims"] == [VICTIM_CG]
    # the stall window is 10 s = 20 ticks of 0.5 s: 20 x 150 ms caused
    assert s["cgroups"][HOG_CG]["stall_caused_ms"] == 3000.0
    assert s["cgroups"][VICTIM_CG]["stall_suffered_ms"] == 3000.0
    assert s["cgroups"][VICTIM_CG]["runq_wait_ms"] == 4000.0
    assert s["cgroups"][HOG_CG]["extra"] == {}
    assert s["stall"]["edges"][0] == {
        "victim": VICTIM_CG,
        "culprit": HOG_CG,
        "stall_ms": 3000.0,
        "share_of_victim_wait": 0.75,
    }
    assert s["stall"]["unattributed_ms"] == 100.0 and s["stall"]["migrated_waits"] == 7
    assert s["pressure"]["system"]["cpu"]["some_pct"] == 30.0
    assert s["pressure"]["culprit_cgroup"]["cpu"]["some_pct"] == 5.0
    lc = s["lifecycle"]
    assert lc["window_s"] == 10.0
    assert lc["by_parent"]["forks"] == 60 and lc["by_parent"]["forks_per_s"] == 6.0
    assert lc["by_cgroup"]["forks_per_s"] == 8.0
    assert lc["exit_statuses"] == [{"status": "exit 1", "count": 20}]
    assert len(lc["recent_exits"]) == 20 and lc["recent_exits"][-1]["comm"] == "false"
    assert s["series"]["of"] == "process" and len(s["series"]["cpu_pct"]) == 20
    assert s["series"]["cpu_pct"][0] == 80.0 and s["series"]["cpu_pct"][-1] == 99.0
    assert s["series"]["t_s"][0] == -9.5 and s["series"]["t_s"][-1] == 0.0
    assert s["series"]["wait_ms"][-1] == 20.0  # the culprit cgroup's own run-queue wait
    assert s["unit"] == {"name": "hog.service", "state": "unknown", "error": "no systemd client"}
    assert len(encode(s).encode()) <= MAX_SNAPSHOT_BYTES
    assert triage.health().counters["captures"] == 1


def test_explain_names_the_culprit_with_numbered_sourced_facts(tree: list[int]) -> None:
    triage = Triage()
    window = window_for(tree)
    triage.on_alert(alert_for(tree[0]), window)
    snapshot, _ = triage.lookup("inc1")  # type: ignore[misc]
    e = explain(snapshot)
    assert e["headline"] == (
        f"CPU spike: sh[{tree[0]}] in hog.service, since 2023-11-14 22:13:29 UTC, "
        "still open when the snapshot was taken"
    )
    facts = {f["id"]: f for f in e["facts"]}
    assert [f["n"] for f in e["facts"]] == list(range(1, len(e["facts"]) + 1))
    assert facts["evidence.cpu_pct"]["figure"] == 89.5
    assert "/proc/PID/stat" in facts["evidence.cpu_pct"]["source"]
    assert facts["culprit.tree"]["figure"] == 3
    assert facts["stall.caused"]["figure"] == 3000.0
    assert facts["lifecycle.by_parent"]["figure"] == 6.0
    assert all(f["source"] for f in e["facts"])
    assert e["suffered"] == [
        {
            "cgroup": VICTIM_CG,
            "unit": "web.service",
            "stall_from_culprit_ms": 3000.0,
            "runq_wait_ms": 4000.0,
            "cpu_some_avg10": 40.0,
        }
    ]
    commands = [a["command"] for a in e["actions"]]
    assert "linnixctl throttle hog.service --cpu 40 --duration 300" in commands
    assert "systemctl set-property --runtime hog.service CPUQuota=40%" in commands
    assert any("100.0 ms of run-queue wait could not be attributed" in u for u in e["uncertain"])
    assert any("state of hog.service is unknown" in u for u in e["uncertain"])
    # deterministic: the same snapshot, also after a JSON round trip, gives the same text
    again = explain(json.loads(encode(snapshot)))
    assert again == e
    assert render(again) == render(e)
    assert render(e)[2] == "Facts:" and render(e)[3].startswith("   1. cpu spike: sh[")


def test_vanished_culprit_and_thousands_of_children_are_bounded() -> None:
    base = window_for([NO_PID])[-1]
    kids = [proc(NO_PID + 1 + i, NO_PID, "kid", cgroup=HOG_CG) for i in range(5000)]
    procs = {**base.processes, **{p.pid: p for p in kids}}
    window = [dataclasses.replace(base, processes=procs)]
    triage = Triage()
    started = time.monotonic()
    triage.on_alert(alert_for(NO_PID), window)
    took = time.monotonic() - started
    s, _ = triage.lookup("inc1")  # type: ignore[misc]
    tree = s["tree"]
    assert tree["total"] == 5001 and len(tree["members"]) == TREE_READ
    assert tree["read"] == TREE_READ and tree["truncated"] == 5001 - TREE_READ
    assert tree["gone"] == TREE_READ  # none of them is in /proc: kept from the model, marked gone
    assert all(m["state"] == "gone" for m in tree["members"])
    assert took < 2.0  # 5,000 members in the model, 64 /proc reads
    e = explain(s)
    assert f"{TREE_READ} processes of its tree exited before /proc was read" in e["uncertain"]
    assert (
        f"{5001 - TREE_READ} processes of its tree are not in the snapshot (bounded)"
        in e["uncertain"]
    )
    assert not any(a["command"].startswith("ps ") for a in e["actions"])  # nothing to look at


def test_huge_cmdline_and_oversized_extras_stay_within_the_bound(tmp_path: Path) -> None:
    long_arg = "x" * 100_000
    hog = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", long_arg])
    try:
        window = window_for([hog.pid])
        triage = Triage()
        triage.add_cgroup_fields(lambda snap, path: {"pod": "web-7d9f", "blob": "y" * 40_000})
        triage.on_alert(alert_for(hog.pid), window)
        s, _ = triage.lookup("inc1")  # type: ignore[misc]
    finally:
        hog.kill()
        hog.wait()
    root = s["tree"]["members"][0]
    assert root["pid"] == hog.pid and len(root["cmdline"]) <= 512 + 3
    assert len(encode(s).encode()) <= MAX_SNAPSHOT_BYTES
    assert "cgroup extras dropped" in s["omitted"]
    assert triage.counters.shrunk == 1
    assert any("cut to fit 64 KiB" in u for u in explain(s)["uncertain"])


def test_bound_cuts_in_order_and_never_exceeds_the_limit() -> None:
    snapshot: dict[str, Any] = {
        "format": 1,
        "incident": "i",
        "rule": "cpu_spike",
        "captured_at": 1.0,
        "culprit": {"cgroup": "/a"},
        "alert": {"evidence": {"x": "z" * 5000}},
        "series": {"t_s": list(range(400)), "cpu_pct": [1.5] * 400},
        "tree": {"members": [{"pid": i, "cmdline": "c" * 500} for i in range(64)], "truncated": 0},
        "lifecycle": {"recent_exits": [{"pid": i} for i in range(20)]},
        "stall": {"edges": [{"victim": "/v"}] * 20},
        "cgroups": {"/a": {"extra": {}}, "/b": {"extra": {}}},
        "victims": [],
        "omitted": [],
    }
    out, text = bound(snapshot, limit=4096)
    assert len(text.encode()) <= 4096
    assert out["omitted"][:3] == [
        "series thinned to every 4th tick",
        "tree cmdlines cut to 80 characters",
        "tree cut to 16 members",
    ]


def test_resolve_records_duration_peaks_and_the_effect_of_an_action(tree: list[int]) -> None:
    triage = Triage()
    window = window_for(tree)
    triage.on_alert(alert_for(tree[0], ts=WALL0 + 9.5), window)
    # 10 more ticks at high pressure, an action, then 10 calmer ticks
    for i in range(20, 30):
        triage.observe(dataclasses.replace(window[-1], ts=T0 + i / 2, wall=WALL0 + i / 2))
    triage.on_action(
        "ActionTaken",
        {
            "unit": "hog.service",
            "action": "throttle_cpu",
            "before": "infinity",
            "after": "200000",
            "incident": "inc1",
        },
    )
    entry = triage._open["inc1"]
    action_at = entry.actions[0]["at"]
    calm = dataclasses.replace(
        window[-1],
        system_pressure={"cpu": psi(4.0)},
        stall=StallSnapshot(runqueue={VICTIM_CG: CgroupRunqueue(VICTIM_CG, 10_000, 4)}),
    )
    for i in range(10):
        triage.observe(dataclasses.replace(calm, wall=action_at + i * 0.5))
    triage.on_alert(
        dataclasses.replace(alert_for(tree[0], state="resolved"), ts=WALL0 + 9.5 + 42.0), window
    )
    s, r = triage.lookup("inc1")  # type: ignore[misc]
    assert r["duration_s"] == 42.0 and r["ticks"] == 21
    assert r["peak"]["cpu_pct"] == 99.0 and r["peak"]["system_cpu_some_pct"] == 30.0
    assert r["peak"]["stall_caused_ms_per_s"] == 300.0
    assert r["effect"]["action"] == "throttle_cpu"
    assert r["effect"]["before"] == {
        "samples": 11,
        "cpu_some_pct": 30.0,
        "victims_wait_ms_per_s": 400.0,
    }
    assert r["effect"]["after"] == {
        "samples": 10,
        "cpu_some_pct": 4.0,
        "victims_wait_ms_per_s": 20.0,
    }
    e = explain(s, r)
    assert e["state"] == "resolved" and e["headline"].endswith("resolved after 42 s")
    effect = next(f for f in e["facts"] if f["id"] == "resolution.effect")
    assert "30.0% -> 4.0%" in effect["text"] and "400.0 -> 20.0 ms/s" in effect["text"]


def test_unit_state_is_unknown_when_systemd_does_not_answer(
    tree: list[int], tmp_path: Path
) -> None:
    class HangingSystemd:
        async def get_property(self, unit: str, name: str) -> Any:
            await asyncio.sleep(3600)

    history = AlertHistory(str(tmp_path / "h.db"))

    async def run() -> None:
        triage = Triage(history, HangingSystemd(), unit_timeout_s=0.2)
        alert = alert_for(tree[0])
        history.store(alert)
        started = time.monotonic()
        triage.on_alert(alert, window_for(tree))
        assert time.monotonic() - started < 0.15  # the tick does not wait for systemd
        assert history.triage("inc1")[0]["unit"]["state"] == "pending"  # type: ignore[index]
        await asyncio.sleep(0.5)
        assert triage.counters.unit_unknown == 1

    asyncio.run(run())
    unit = history.triage("inc1")[0]["unit"]  # type: ignore[index]
    assert unit == {
        "name": "hog.service",
        "state": "unknown",
        "error": "systemd did not answer within 0.2 s",
    }


# ---- history --------------------------------------------------------------------------

OLD_SCHEMA = """
CREATE TABLE alerts (id TEXT PRIMARY KEY, ts REAL NOT NULL, rule TEXT NOT NULL,
    state TEXT NOT NULL, incident TEXT NOT NULL, body TEXT NOT NULL);
CREATE INDEX alerts_ts ON alerts (ts);
CREATE INDEX alerts_rule_ts ON alerts (rule, ts);
CREATE INDEX alerts_incident ON alerts (incident);
"""


def test_history_migrates_a_schema_0_database_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    now = time.time()
    for n, (state, ts) in enumerate(
        [("firing", now - 100), ("resolved", now - 40), ("firing", now - 10)]
    ):
        a = dataclasses.replace(alert_for(100 + n), id=f"a{n}", state=state, ts=ts)
        if n == 2:
            a = dataclasses.replace(a, incident="inc2")
        db.execute(
            "INSERT INTO alerts VALUES (?, ?, ?, ?, ?, ?)",
            (a.id, a.ts, a.rule, a.state, a.incident, json.dumps(a.to_dict())),
        )
    db.commit()
    db.close()

    h = AlertHistory(str(path))
    assert h._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 1
    rows = h.incidents()
    assert [(r["incident"], r["state"]) for r in rows] == [("inc2", "open"), ("inc1", "resolved")]
    assert rows[1]["resolved_ts"] - rows[1]["opened_ts"] == pytest.approx(60.0)
    assert rows[1]["culprit"] == "sh[100] in hog.service" and rows[1]["has_snapshot"] is False
    assert h.triage("inc1") == (None, None) and h.triage("nope") is None
    assert h.count() == 3  # the alerts are untouched
    assert h.latest_incident() == "inc2"
    h.store(dataclasses.replace(alert_for(5), id="a9", incident="inc3", ts=now))
    assert h.store_snapshot("inc3", '{"x": 1}') and not h.store_snapshot("nope", "{}")
    h.close()
    again = AlertHistory(str(path))  # opening a current database changes nothing
    assert [r["incident"] for r in again.incidents()] == ["inc3", "inc2", "inc1"]
    assert again.triage("inc3") == ({"x": 1}, None)


def test_history_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 7")
    db.close()
    with pytest.raises(RuntimeError, match="history schema 7, newer than this linnixd's 1"):
        AlertHistory(str(path))


def test_snapshot_retention_keeps_the_newest_and_incidents_go_with_their_alerts(
    tmp_path: Path,
) -> None:
    now = time.time()
    h = AlertHistory(str(tmp_path / "h.db"), snapshots_kept=2, max_count=6, clock=lambda: now)
    for n in range(4):
        h.store(dataclasses.replace(alert_for(n), id=f"a{n}", incident=f"i{n}", ts=now - 100 + n))
        assert h.store_snapshot(f"i{n}", json.dumps({"n": n}))
    h.prune()
    assert h.snapshots_pruned == 2
    assert [h.triage(f"i{n}")[0] for n in range(4)] == [None, None, {"n": 2}, {"n": 3}]  # type: ignore[index]
    for n in range(4, 10):
        h.store(dataclasses.replace(alert_for(n), id=f"a{n}", incident=f"i{n}", ts=now - 50 + n))
    h.prune()
    assert h.count() == 6
    assert [r["incident"] for r in h.incidents()] == [f"i{n}" for n in range(9, 3, -1)]
    assert h.triage("i2") is None  # gone with its alert


def test_a_snapshot_the_history_cannot_take_is_counted(tree: list[int], tmp_path: Path) -> None:
    history = AlertHistory(str(tmp_path / "h.db"))
    logged: list[str] = []
    triage = Triage(history, log=logged.append)
    triage.on_alert(alert_for(tree[0]), window_for(tree))  # its alert was never stored
    assert triage.counters.store_errors == 1 and triage.counters.captures == 1
    assert logged == [
        "triage: store_snapshot for incident inc1 failed: "
        "the history has no such incident (its alert was not stored)"
    ]
    assert triage.lookup("inc1") is not None  # still explainable from memory


def test_a_host_wide_incident_is_explained_without_a_process() -> None:
    window = window_for([NO_PID])
    alert = dataclasses.replace(
        alert_for(NO_PID),
        rule="psi_saturation",
        summary="cpu pressure: host stalled 30% of the time for 5 s",
        culprit=Culprit(kind="system"),
        evidence={"resource": "cpu", "some_pct": 30.0, "stall_ms": 750.0},
    )
    triage = Triage()
    triage.on_alert(alert, window)
    s, _ = triage.lookup("inc1")  # type: ignore[misc]
    assert s["tree"] is None and s["culprit"]["pid"] is None and s["culprit"]["cgroup"] is None
    assert s["series"] == {"of": None, "t_s": s["series"]["t_s"], "wait_ms": s["series"]["wait_ms"]}
    e = explain(s)
    assert e["headline"].startswith("Pressure saturation: host, since ")
    assert [f["id"] for f in e["facts"]][:2] == ["alert.summary", "evidence.some_pct"]
    assert [a["command"] for a in e["actions"]] == ["linnixctl stalls", "linnixctl top"]


def test_explain_after_a_restart_reads_the_history(tree: list[int], tmp_path: Path) -> None:
    path = str(tmp_path / "h.db")
    history = AlertHistory(path, max_age_days=10_000)  # the synthetic alerts are from 2023
    first = Triage(history)
    alert = alert_for(tree[0])
    history.store(alert)
    first.on_alert(alert, window_for(tree))
    resolved = dataclasses.replace(alert_for(tree[0], state="resolved"), ts=alert.ts + 30)
    history.store(resolved)
    first.on_alert(resolved, window_for(tree))
    history.close()
    again = Triage(AlertHistory(path, max_age_days=10_000))  # a new daemon: nothing in memory
    assert again.latest() == "inc1"
    snapshot, resolution = again.lookup("inc1")  # type: ignore[misc]
    assert snapshot == first.lookup("inc1")[0]  # type: ignore[index]
    assert resolution is not None and resolution["duration_s"] == 30.0
    assert explain(snapshot, resolution)["headline"].endswith("resolved after 30 s")
    assert again.lookup("nope") is None


def test_many_incidents_in_one_tick_take_trees_from_the_model(tree: list[int]) -> None:
    window = window_for(tree)
    triage = Triage(tick_budget_ms=0.0)  # the budget is spent before the first capture
    triage.observe(window[-1])
    triage.on_alert(alert_for(tree[0]), window)
    s, _ = triage.lookup("inc1")  # type: ignore[misc]
    t = s["tree"]
    assert t["from_proc"] is False and t["read"] == 0 and t["gone"] == 0
    assert [m["state"] for m in t["members"]] == ["not read"] * 3
    assert [m["pid"] for m in t["members"]] == tree and t["members"][0]["cpu_pct"] == 99.0
    assert triage.counters.budget_skips == 1 and triage.counters.processes_gone == 0
    assert any("not read from /proc" in u for u in explain(s)["uncertain"])
    normal = Triage()
    normal.observe(window[-1])
    normal.on_alert(alert_for(tree[0]), window)
    assert normal.lookup("inc1")[0]["tree"]["from_proc"] is True  # type: ignore[index]
