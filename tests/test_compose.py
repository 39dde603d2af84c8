"""The composition root builds the whole daemon; subscriptions fan out and count failing listeners."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from linnixd.collector.procfs import CLK_TCK
from linnixd.compose import BusEndpoint, EnforcerLoop, build
from linnixd.config import load_policy
from linnixd.constants import EXIT_UNAVAILABLE
from linnixd.daemon import Runner, build_parser
from linnixd.health import Health
from linnixd.subscriptions import Subscriptions
from tests.test_enforcement import alert

ROOT = Path(__file__).resolve().parent.parent


class Notes:
    """sd_notify stand-in: records what the daemon would tell systemd."""

    enabled = True

    def __init__(self) -> None:
        self.lines: list[str] = []

    def ready(self) -> None:
        self.lines.append("READY=1")

    def reloading(self) -> None:
        self.lines.append("RELOADING=1")

    def status(self, text: str) -> None:
        self.lines.append(f"STATUS={text}")

    def progress(self, text: str, step_s: float) -> None:
        self.lines.append(f"STATUS={text}")

    def watchdog(self) -> None:
        self.lines.append("WATCHDOG=1")

    def stopping(self) -> None:
        self.lines.append("STOPPING=1")

    def health(self) -> Health:
        return Health()


def test_subscriptions_fan_out_in_order_and_count_a_failing_listener(
    capfd: pytest.CaptureFixture[str],
) -> None:
    subs = Subscriptions()
    heard: list[str] = []

    def broken(_alert: Any) -> None:
        raise RuntimeError("listener bug")

    subs.subscribe(alerts=lambda a: heard.append(f"first {a.id}"))
    subs.subscribe(alerts=broken, actions=lambda name, event: heard.append(name))
    subs.subscribe(alerts=lambda a: heard.append(f"last {a.id}"))
    subs.alert(alert(1))
    subs.alert(alert(2))
    subs.action("ActionTaken", {"unit": "a.service"})
    assert heard == [
        "first a1-firing",
        "last a1-firing",
        "first a2-firing",
        "last a2-firing",
        "ActionTaken",
    ]
    assert subs.failures == 2  # counted every time; the log says it once
    assert capfd.readouterr().err.count("alert listener failed: RuntimeError('listener bug')") == 1


@pytest.mark.bpf
def test_build_wires_every_part_and_a_missing_bus_is_exit_69(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    args = build_parser().parse_args(
        [
            "--policy",
            str(ROOT / "policy" / "rules.yaml"),
            "--state-dir",
            str(state),
            "--bus",
            f"unix:path={tmp_path}/no-such-bus",
            "--no-journal",
            "--metrics-dir",
            "none",
        ]
    )
    policy = load_policy(ROOT / "policy" / "rules.yaml")
    notes = Notes()
    assembly = build(args, str(ROOT / "policy" / "rules.yaml"), policy, notes)
    daemon = assembly.daemon
    try:
        assert [type(s) for s in assembly.services] == [BusEndpoint, EnforcerLoop]
        assert daemon.enforcer is not None and daemon.triage is not None
        assert daemon.history is not None and daemon.namer is not None
        assert daemon.notifier is notes and daemon.sched is not None
        # the enforcer reads the policy in force: a reload's policy, not the one it was built with
        assert daemon.enforcer.policy() is policy
        daemon.policy = load_policy(ROOT / "policy" / "rules.yaml")
        assert daemon.enforcer.policy() is daemon.policy and daemon.policy is not policy
        # enforcement actions reach the daemon's subscribers
        heard: list[str] = []
        daemon.subscribe(actions=lambda name, event: heard.append(name))
        daemon.enforcer._signal("ActionTaken", {"unit": "x.service"})
        assert heard == ["ActionTaken"]
        assert "compiling and attaching BPF: process lifecycle (bpf/lifecycle.c)" in (
            line.removeprefix("STATUS=") for line in notes.lines
        )
        # the enforcer's kill guard reads start times from the host model's newest snapshot
        daemon.tick()
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        assert daemon.model is not None
        assert daemon.model.start_time_of(os.getpid()) == start_ticks / CLK_TCK
        assert daemon.model.start_time_of(2**22 + 1) is None  # above pid_max: never a process
        code = asyncio.run(Runner(assembly, notes).run())
        assert code == EXIT_UNAVAILABLE
        assert "READY=1" not in notes.lines  # never said ready without its bus
    finally:
        daemon.close()
