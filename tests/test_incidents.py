"""IncidentTracker: firing once, resolving after absence, cooldown suppression, forget, bounds."""

from __future__ import annotations

from snapshots import proc, rule_cfg, snap

from linnixd.detectors.cpu import CpuSpikeDetector
from linnixd.incidents import IncidentTracker
from linnixd.model import Culprit, Finding

WALL = 1_700_000_000.0
COOL = {"cpu_spike": 300.0}


def finding(key: str = "pid:1234:12", pct: float = 90.0) -> Finding:
    return Finding(
        rule="cpu_spike",
        key=key,
        severity="warning",
        summary=f"cpu spike: burner[1234] at {pct:.0f}% CPU",
        culprit=Culprit(kind="process", pid=1234, comm="burner"),
        evidence={"cpu_pct": pct},
    )


def test_fires_once_then_resolves_after_clearing() -> None:
    t = IncidentTracker(resolve_after_s=2.0)
    [a] = t.update([finding()], 10.0, WALL, COOL)
    assert (a.state, a.rule, a.ts, a.culprit.pid) == ("firing", "cpu_spike", WALL, 1234)
    assert len(a.id) == 32 and len(a.incident) == 32 and a.id != a.incident
    assert t.update([finding(pct=95.0)], 10.5, WALL + 0.5, COOL) == []  # still found: nothing new
    assert t.open_incidents() == [a]
    assert t.update([], 12.0, WALL + 2.0, COOL) == []  # absent 1.5 s < 2 s
    [r] = t.update([], 12.5, WALL + 2.5, COOL)
    assert (r.state, r.incident, r.ts) == ("resolved", a.incident, WALL + 2.5)
    assert r.id != a.id and r.evidence == {"cpu_pct": 95.0}  # the last evidence
    assert r.summary == "resolved: cpu spike: burner[1234] at 95% CPU"
    assert t.open_incidents() == []


def test_cooldown_suppresses_a_second_incident_and_its_resolution() -> None:
    t = IncidentTracker(resolve_after_s=2.0)
    [a] = t.update([finding()], 10.0, WALL, COOL)
    [r] = t.update([], 12.0, WALL + 2, COOL)
    assert r.state == "resolved"
    assert t.update([finding()], 20.0, WALL + 10, COOL) == []  # 10 s after the firing: within 300 s
    assert t.suppressed == 1 and t.open_incidents() == []
    assert t.update([], 22.0, WALL + 12, COOL) == []  # its resolution is silent too
    # a different culprit is not held back by another's cooldown
    [b] = t.update([finding("pid:1234:99")], 23.0, WALL + 13, COOL)
    assert b.state == "firing" and b.incident != a.incident
    # once the cooldown since the last *firing* alert has passed, the culprit alerts again
    alerts = t.update([finding()], 310.0, WALL + 300, COOL)
    assert [(x.state, x.incident) for x in alerts][1:] == [("resolved", b.incident)]
    c = alerts[0]
    assert c.state == "firing" and c.incident not in (a.incident, b.incident)
    assert t.suppressed == 1


def test_cooldown_boundary_both_sides() -> None:
    t = IncidentTracker(resolve_after_s=1.0)
    t.update([finding()], 0.0, WALL, {"cpu_spike": 5.0})
    t.update([], 1.0, WALL, {"cpu_spike": 5.0})
    assert t.update([finding()], 4.9, WALL, {"cpu_spike": 5.0}) == []
    t.update([], 6.0, WALL, {"cpu_spike": 5.0})
    assert [a.state for a in t.update([finding()], 7.0, WALL, {"cpu_spike": 5.0})] == ["firing"]


def test_forget_resolves_a_disabled_rule() -> None:
    t = IncidentTracker()
    [a] = t.update([finding()], 10.0, WALL, COOL)
    [r] = t.forget("cpu_spike")
    assert (r.state, r.incident) == ("resolved", a.incident)
    assert t.open_incidents() == []
    # re-enabled later: a fresh start, no cooldown left over
    assert [x.state for x in t.update([finding()], 11.0, WALL, COOL)] == ["firing"]


def test_open_incidents_are_bounded_and_evictions_counted() -> None:
    t = IncidentTracker(max_entries=3)
    alerts = t.update([finding(f"pid:{n}:1") for n in range(5)], 1.0, WALL, COOL)
    assert len(alerts) == 5
    assert len(t.open_incidents()) == 3 and t.evicted_incidents == 2
    assert t.evicted_cooldowns == 2  # the two oldest cooldown entries made room


def test_reused_pid_opens_a_separate_incident_end_to_end() -> None:
    detector, cfg = CpuSpikeDetector(), rule_cfg("cpu_spike", sustain_s=1.0)
    t = IncidentTracker(resolve_after_s=1.0)
    window: list = []
    states = []
    for i in range(12):
        start = 12.0 if i < 6 else 99.0  # pid 1234 is a new process from tick 6 on
        window.append(snap(i, [proc(1234, 1, "burner", cpu=90.0, start=start)]))
        newest = window[-1]
        for a in t.update(
            detector.evaluate(window, cfg), newest.ts, newest.wall, {"cpu_spike": 300.0}
        ):
            states.append((a.state, a.culprit.pid, a.incident, i))
    # old process fires at tick 1 (1 s covered); the new one fires on its own at tick 7 despite the
    # cooldown, in the same tick the old one resolves (last seen tick 5, 1 s before)
    assert [(s, pid, i) for s, pid, _, i in states] == [
        ("firing", 1234, 1),
        ("firing", 1234, 7),
        ("resolved", 1234, 7),
    ]
    assert states[2][2] == states[0][2] != states[1][2]
