"""The daemon never alerts on itself: a finding naming its pid or its own unit's cgroup is dropped and counted."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from snapshots import snap

from linnixd.config import load_policy
from linnixd.daemon import Daemon
from linnixd.model import Culprit, Finding, Snapshot

ROOT = Path(__file__).resolve().parent.parent


class Fixed:
    """A detector that names the given culprits every tick."""

    def __init__(self, rule: str, culprits: Sequence[Culprit]) -> None:
        self.rule = rule
        self.culprits = culprits

    def evaluate(self, window: Sequence[Snapshot], cfg: Any) -> list[Finding]:
        return [
            Finding(self.rule, f"k:{c.pid}:{c.cgroup}", "warning", f"{c.pid}", c, {})
            for c in self.culprits
        ]


def test_findings_on_the_daemon_itself_are_dropped_and_counted() -> None:
    policy_path = str(ROOT / "policy" / "rules.yaml")
    daemon = Daemon(policy_path, load_policy(policy_path))
    daemon.own_unit_cgroup = "/system.slice/linnixd.service"  # as under systemd
    mine = Culprit("process", pid=os.getpid(), comm="python3", cgroup="/")
    my_unit = Culprit("cgroup", cgroup="/system.slice/linnixd.service", unit="linnixd.service")
    other = Culprit("process", pid=os.getpid() + 100000, comm="hog", cgroup="/hog.scope")
    daemon.detectors = {"cpu_spike": Fixed("cpu_spike", [mine, my_unit, other])}
    daemon.window.append(snap(0))
    alerts = daemon.evaluate()
    assert [a.culprit.comm for a in alerts] == ["hog"]
    assert daemon.self_findings_dropped == 2
    assert daemon.own_health().counters["self_findings_dropped"] == 2
