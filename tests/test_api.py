"""The transport-free API: argument rules in one place, errors by kind, and the pure views."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
from snapshots import proc, snap
from test_enforcement import WHO, make

from linnixd import views
from linnixd.api import (
    FAILED,
    INVALID_ARGS,
    MAX_ALERTS,
    MAX_ROWS,
    NO_SUCH_INCIDENT,
    POLICY_INVALID,
    Api,
    ApiError,
    throttle_problem,
)
from linnixd.config import PolicyError
from linnixd.constants import EXIT_USAGE, MAX_ACTION_S, MAX_CPU_PCT
from linnixd.ctl import main as ctl_main
from linnixd.enforcement import EnforcementError
from linnixd.model import CgroupRunqueue, Counters, StallEdge, StallSnapshot


class Core:
    """A DaemonCore with nothing behind it; records the arguments the API passed on."""

    version = "0.1.0"
    policy_path = "/etc/linnixd/rules.yaml"
    started_at = 1.0
    enforcement_enabled = False

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.reload_problems: list[str] = []

    def counters(self) -> Counters:
        return Counters(events=5, dropped_events=1, alerts=2)

    def status(self) -> dict[str, Any]:
        return {"version": self.version}

    def recent_alerts(self, since: float = 0.0, rule: str = "", limit: int = 100) -> list[Any]:
        self.calls.append(("recent_alerts", (since, rule, limit)))
        return []

    def open_incidents(self) -> list[Any]:
        return []

    def top_cgroups(self, limit: int = 10) -> list[dict[str, Any]]:
        self.calls.append(("top_cgroups", limit))
        return []

    def stall_table(self, limit: int = 20) -> list[dict[str, Any]]:
        self.calls.append(("stall_table", limit))
        return []

    def reload_policy(self) -> str:
        if self.reload_problems:
            raise PolicyError(self.reload_problems)
        return "reloaded"

    def subscribe(self, *, alerts: Any = None, actions: Any = None) -> None:
        self.calls.append(("subscribe", (alerts, actions)))
        enforcer = getattr(self, "enforcer", None)
        if actions is not None and enforcer is not None:
            enforcer.listeners.append(actions)


def refused(kind: str, fn: Any, *args: Any) -> str:
    with pytest.raises(ApiError) as info:
        result = fn(*args)
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    assert info.value.kind == kind
    return info.value.message


def test_throttle_bounds_are_one_function() -> None:
    assert throttle_problem(MAX_CPU_PCT, MAX_ACTION_S) is None
    assert throttle_problem(0.5, 1) is None
    for cpu in (0.0, -1.0, MAX_CPU_PCT * 1.0001, math.nan, math.inf):
        assert str(throttle_problem(cpu, 300)).startswith("cpu_pct must be in (0, 819200]")
    for duration in (0.0, -5.0, MAX_ACTION_S + 1, math.nan):
        assert str(throttle_problem(20, duration)).startswith("duration_s must be in (0, 86400]")


def test_the_enforcer_checks_a_throttle_with_the_same_function(tmp_path: Path) -> None:
    enf, units, _ = make(tmp_path)
    with pytest.raises(EnforcementError, match=r"cpu_pct must be in \(0, 819200\]"):
        asyncio.run(enf.throttle("batch.service", 0.0, 120, WHO))
    with pytest.raises(EnforcementError, match=r"duration_s must be in \(0, 86400\]"):
        asyncio.run(enf.throttle("batch.service", 20, 90000, WHO))
    assert units.calls == []  # systemd was not asked anything


def test_linnixctl_refuses_the_same_cpu_bound(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("0", "819201"):
        with pytest.raises(SystemExit) as info:
            ctl_main(["throttle", "batch.service", "--cpu", bad])
        assert info.value.code == EXIT_USAGE
        assert f"must be more than 0 and at most 819200, got {bad}" in capsys.readouterr().err


def test_argument_rules_and_error_kinds() -> None:
    core = Core()
    api = Api(core)
    assert "between 1 and 10000, got 0" in refused(INVALID_ARGS, api.recent_alerts, 0.0, "", 0)
    assert refused(INVALID_ARGS, api.recent_alerts, -1.0, "", 5).startswith("since must be")
    assert "rule name" in refused(INVALID_ARGS, api.recent_alerts, 0.0, "Fork Storm", 5)
    refused(INVALID_ARGS, api.top_cgroups, MAX_ROWS + 1)
    refused(INVALID_ARGS, api.incident_history, 0.0, MAX_ALERTS + 1)
    assert api.recent_alerts(10.0, "fork_storm", 3) == []
    assert api.top_cgroups(MAX_ROWS) == [] and api.stall_table(1) == []
    assert core.calls == [
        ("recent_alerts", (10.0, "fork_storm", 3)),
        ("top_cgroups", MAX_ROWS),
        ("stall_table", 1),
    ]
    assert (
        refused(NO_SUCH_INCIDENT, api.explain, "latest") == "triage is not running in this daemon"
    )
    refused(INVALID_ARGS, api.explain, "../etc/passwd")
    assert "without a state directory" in refused(FAILED, api.list_actions)
    assert "without a state directory" in refused(FAILED, api.throttle, "a.service", 20, 60, WHO)
    core.reload_problems = ["rules.yaml:3: rules.x: unknown rule", "rules.yaml:4: y"]
    assert (
        refused(POLICY_INVALID, api.reload)
        == "rules.yaml:3: rules.x: unknown rule; rules.yaml:4: y"
    )
    assert api.properties() == {
        "version": "0.1.0",
        "enforcement_enabled": False,
        "policy_path": "/etc/linnixd/rules.yaml",
        "started_at": 1.0,
        "events": 5,
        "dropped_events": 1,
        "alerts": 2,
    }


def test_api_throttle_is_checked_before_the_enforcer_is_asked(tmp_path: Path) -> None:
    enf, _, _ = make(tmp_path)
    core = Core()
    core.enforcer = enf  # type: ignore[attr-defined]
    api = Api(core)
    assert refused(INVALID_ARGS, api.throttle, "batch.service", 20, 0, WHO).startswith("duration_s")
    assert "is protected" in refused(INVALID_ARGS, api.throttle, "sshd.service", 20, 60, WHO)
    text = asyncio.run(api.throttle("batch.service", 35, 120, WHO))
    assert text.startswith("batch.service throttled to 35% of one CPU for 120 s")
    assert api.properties()["dry_run"] is False
    seen: list[str] = []
    api.subscribe(actions=lambda name, event: seen.append(name))
    asyncio.run(api.unthrottle("batch.service"))
    assert seen == ["ActionReverted"]


def stall_snap(i: int, edges: list[tuple[str, str, int]], waits: dict[str, int]) -> Any:
    s = snap(i)
    return dataclasses.replace(
        s,
        stall=StallSnapshot(
            runqueue={p: CgroupRunqueue(p, us, 1) for p, us in waits.items()},
            edges=[StallEdge(v, c, us) for v, c, us in edges],
        ),
    )


def test_stall_table_pairs_over_the_rules_window() -> None:
    window = [
        stall_snap(0, [("/a", "/b", 900_000)], {"/a": 900_000}),  # outside a 2 s window
        stall_snap(1, [("/a", "/b", 300_000), ("/c", "/b", 50_000)], {"/a": 400_000, "/c": 50_000}),
        dataclasses.replace(snap(2), stall=None),  # sched.c detached for a tick: skipped
        stall_snap(3, [("/a", "/b", 100_000), ("/a", "/c", 100_000)], {"/a": 400_000}),
        stall_snap(4, [("/c", "/b", 25_000)], {"/c": 100_000}),
    ]
    rows = views.stall_table(window[1:], window_s=2.0, limit=10)
    assert rows == views.stall_table(window, window_s=2.0, limit=10)  # snapshot 0 is too old
    assert rows == [
        {"victim": "/a", "culprit": "/b", "stall_ms": 400.0, "share": 0.5, "window_s": 2.0},
        {"victim": "/a", "culprit": "/c", "stall_ms": 100.0, "share": 0.125, "window_s": 2.0},
        {"victim": "/c", "culprit": "/b", "stall_ms": 75.0, "share": 0.5, "window_s": 2.0},
    ]
    assert views.stall_table(window, window_s=2.0, limit=1) == rows[:1]
    assert views.stall_table([], window_s=2.0, limit=5) == []


def test_top_cgroups_adds_cpu_run_queue_wait_and_stall_caused_and_suffered() -> None:
    rows = [{"path": "/a", "cpu_some_pct": 5.0}, {"path": "/z", "cpu_some_pct": 1.0}]
    busy_a = proc(10, comm="hog", cpu=150.0, cgroup="/a")
    window = [
        stall_snap(0, [("/z", "/a", 40_000)], {"/z": 40_000}),
        dataclasses.replace(
            stall_snap(1, [("/z", "/a", 60_000)], {"/a": 12_345, "/z": 60_000}),
            processes={10: busy_a},
            changed=frozenset({10}),
        ),
    ]
    assert views.top_cgroups(rows, window, window_s=10.0) == [
        {
            "path": "/a",
            "cpu_some_pct": 5.0,
            "cpu_pct": 150.0,
            "runq_wait_ms": 12.3,
            "stall_caused_ms": 100.0,
            "stall_suffered_ms": 0.0,
        },
        {
            "path": "/z",
            "cpu_some_pct": 1.0,
            "cpu_pct": 0.0,
            "runq_wait_ms": 60.0,
            "stall_caused_ms": 0.0,
            "stall_suffered_ms": 100.0,
        },
    ]
    # without sched.c (no stall data) only the CPU column is added
    plain = [dataclasses.replace(window[1], stall=None)]
    assert views.top_cgroups(rows, plain, window_s=10.0)[0] == {
        "path": "/a",
        "cpu_some_pct": 5.0,
        "cpu_pct": 150.0,
    }
    assert "cpu_pct" not in rows[0]  # the model's rows are not changed


def test_status_view_reports_what_the_daemon_knows() -> None:
    from linnixd.health import Health
    from linnixd.model import LifecycleCounts

    newest = dataclasses.replace(snap(3, [proc(1), proc(2)]), cgroups={})
    facts = views.StatusFacts(
        version="0.1.0",
        started_at=10.0,
        policy_path="/etc/linnixd/rules.yaml",
        tick_s=0.5,
        enabled_rules=("fork_storm",),
        transport="ringbuf",
        scheduler_attribution=True,
        network_attribution=False,
        network_problem="",
        psi_mode="triggers",
        enforcement_enabled=False,
        enforcement=None,
        counters=Counters(events=7, alerts=1),
        report={"lifecycle": Health(counters={"events": 7}, gauges={"tracked": 2})},
        totals=LifecycleCounts(forks=3),
        open_incidents=1,
        newest=newest,
        ticks=4,
        tick_cost_s=0.012345,
        detector_errors=0,
        tick_errors=0,
        state={"history": "off"},
    )
    out = views.status(facts)
    assert out["enabled_rules"] == ["fork_storm"] and out["psi_mode"] == "triggers"
    assert out["counters"]["events"] == 7 and out["totals"]["forks"] == 3
    assert out["health"] == {"lifecycle": {"events": 7, "tracked": 2}}
    assert (out["processes"], out["cgroups"], out["tick_cost_ms"]) == (2, 0, 12.35)
    assert "enforcement" not in out and "network_problem" not in out
    bad_net = views.status(dataclasses.replace(facts, network_problem="bpf/net.c: no BTF"))
    assert bad_net["network_problem"] == "bpf/net.c: no BTF"
    assert views.status(dataclasses.replace(facts, newest=None))["processes"] == 0
