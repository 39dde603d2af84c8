"""A reload applies every setting it can and names the ones that need a restart."""

from __future__ import annotations

from pathlib import Path

from linnixd.config import load_policy
from linnixd.daemon import Daemon
from linnixd.history import AlertHistory
from linnixd.hostmodel import HostModel
from linnixd.reload import changed_keys, plan
from tests.test_enforcement import alert

BEFORE = """version: 1
daemon: {tick_s: 0.5, max_processes: 32768, max_cgroups: 4096, history_max: 1000}
rules:
  psi_saturation: {some_pct: 40}
"""
AFTER = """version: 1
daemon: {tick_s: 1.0, max_processes: 16, max_cgroups: 20, history_max: 10}
rules:
  psi_saturation: {some_pct: 55}
  fork_storm: {rate_per_s: 99}
"""


def test_changed_keys_and_plan() -> None:
    old = {"daemon": {"tick_s": 0.5, "x": 1}, "rules": {"a": {"b": [1]}}}
    new = {"daemon": {"tick_s": 1.0, "x": 1}, "rules": {"a": {"b": [2]}}, "extra": {"y": 2}}
    keys = changed_keys(old, new)
    assert keys == ["daemon.tick_s", "extra.y", "rules.a.b"]
    p = plan(keys)
    assert p.applied == ["daemon.tick_s", "rules.a.b"]
    assert p.restart == ["extra.y (read at start only)"]
    # the reload re-arms PSI triggers and attaches sched.c itself (test_reload_collectors.py)
    p = plan(["rules.psi_saturation.some_pct", "rules.noisy_neighbour.enabled"])
    assert p.applied == ["rules.psi_saturation.some_pct", "rules.noisy_neighbour.enabled"]
    assert p.restart == []


def test_reload_applies_caps_history_limits_and_tick_and_names_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(BEFORE)
    policy = load_policy(path)
    history = AlertHistory(str(tmp_path / "h.db"), max_count=1000, clock=lambda: 1000.0)
    for n in range(50):
        history.store(alert(n))
    model = HostModel(max_processes=32768, max_cgroups=4096)
    model.seed()
    events: list[tuple[str, str, dict[str, str]]] = []
    daemon = Daemon(
        str(path),
        policy,
        model=model,
        history=history,
        events=lambda kind, message, fields: events.append((kind, message, dict(fields))),
    )
    daemon.tick()
    daemon.tick()
    assert model.evicted_processes == 0
    path.write_text(AFTER)
    message = daemon.reload_policy()
    assert model.max_processes == 16 and model.max_cgroups == 20
    assert model.resolver.max_cgroups == 20
    assert history.max_count == 10 and history.count() == 10  # pruned at once
    assert daemon.tracker.resolve_after_s == 4.0
    assert daemon.policy.daemon.tick_s == 1.0
    assert message.endswith(
        "applied: daemon.history_max, daemon.max_cgroups, daemon.max_processes, daemon.tick_s, rules.fork_storm.rate_per_s, rules.psi_saturation.some_pct"
    )
    assert events[-1][0] == "policy_reloaded" and events[-1][1] == message
    assert events[-1][2]["LINNIX_RESTART_NEEDED"] == ""
    daemon.tick()  # the lower cap holds from the next tick on, and the overflow is counted
    assert len(daemon.window[-1].processes) <= 16
    assert model.evicted_processes > 0
    history.close()
