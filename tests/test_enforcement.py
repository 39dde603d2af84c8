"""Enforcement core: guard, rate limit, ledger (atomic, crash recovery), reverts, dry run, pidfd kill."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from linnixd.config import load_policy
from linnixd.constants import ACTION_LEDGER, ENFORCEMENT_STATE
from linnixd.enforcement import UINT64_MAX, Caller, EnforcementError, Enforcer, UnitGone
from linnixd.enforcement.guard import RateLimiter, refusal
from linnixd.enforcement.kill import CLK_TCK, kill_process, start_ticks
from linnixd.model import Alert, Culprit
from linnixd.statedir import StateDir

WHO = Caller(bus_name=":1.42", uid=0, pid=4242)


class RecordingUnits:
    """An in-process systemd stand-in: unit -> properties; records every call (the D-Bus client is tested on a real bus)."""

    def __init__(self) -> None:
        self.props: dict[str, dict[str, Any]] = {
            "batch.service": {
                "CPUQuotaPerSecUSec": UINT64_MAX,
                "MemoryHigh": UINT64_MAX,
                "FreezerState": "running",
                "MemoryCurrent": 0,
            }
        }
        self.calls: list[tuple[Any, ...]] = []
        self.refuse_set = False
        self.cpu_pct: dict[str, float] = {}  # CPUUsageNSec grows at this rate (percent of one CPU)

    def _unit(self, unit: str) -> dict[str, Any]:
        if unit not in self.props:
            raise UnitGone(
                f"systemd refused GetUnit: org.freedesktop.systemd1.NoSuchUnit: Unit {unit} not loaded."
            )
        return self.props[unit]

    async def get_property(self, unit: str, name: str) -> Any:
        self.calls.append(("get", unit, name))
        props = self._unit(unit)
        if name == "CPUUsageNSec":
            return int(time.monotonic() * 1e9 * self.cpu_pct.get(unit, 0.0) / 100)
        return props[name]

    async def set_property(self, unit: str, name: str, value: int) -> None:
        self.calls.append(("set", unit, name, value))
        props = self._unit(unit)
        if self.refuse_set:
            raise EnforcementError(
                "systemd refused SetUnitProperties: org.freedesktop.DBus.Error.InvalidArgs: nope"
            )
        props[name] = value

    async def freeze(self, unit: str) -> None:
        self.calls.append(("freeze", unit))
        self._unit(unit)["FreezerState"] = "frozen"

    async def thaw(self, unit: str) -> None:
        self.calls.append(("thaw", unit))
        self._unit(unit)["FreezerState"] = "running"

    def changes(self) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] != "get"]


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def policy_file(tmp_path: Path, actions: str, extra: str = "") -> Any:
    path = tmp_path / "rules.yaml"
    path.write_text(
        f"version: 1\nenforcement:\n  max_actions_per_min: 3\n{extra}  actions:\n{actions}"
    )
    return load_policy(path)


THROTTLE = "    - {rule: cpu_spike, type: throttle_cpu, cpu_pct: 20, duration_s: 60}\n"


def alert(
    n: int = 1,
    state: str = "firing",
    rule: str = "cpu_spike",
    unit: str | None = "batch.service",
    pid: int = 4321,
) -> Alert:
    return Alert(
        id=f"a{n}-{state}",
        incident=f"i{n}",
        rule=rule,
        severity="warning",
        state=state,
        ts=1.0,
        summary="cpu",
        culprit=Culprit(
            kind="process", pid=pid, comm="burn", cgroup="/system.slice/batch.service", unit=unit
        ),
        evidence={},
    )


def make(
    tmp_path: Path,
    actions: str = THROTTLE,
    units: RecordingUnits | None = None,
    clock: Clock | None = None,
    **kw: Any,
) -> tuple[Enforcer, RecordingUnits, list[tuple[str, str, dict[str, str]]]]:
    pol = policy_file(tmp_path, actions)
    units = units or RecordingUnits()
    journal: list[tuple[str, str, dict[str, str]]] = []
    kw.setdefault("usage_window_s", 0.2)
    enf = Enforcer(
        tmp_path,
        units,
        lambda: pol,
        journal=lambda k, m, f: journal.append((m, k, f)),
        clock=clock or Clock(),
        **kw,
    )
    return enf, units, journal


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


# ---- guard and rate limit ---------------------------------------------------------------


@pytest.mark.parametrize(
    "unit, reason",
    [
        ("init.scope", "init.scope is protected (init.scope)"),
        ("-.slice", "-.slice is protected (-.slice)"),
        ("system.slice", "system.slice is protected (system.slice)"),
        ("user.slice", "user.slice is protected (user.slice)"),
        ("linnixd.service", "linnixd.service is protected (linnixd.service)"),
        ("dbus-broker.service", "dbus-broker.service is protected (dbus-broker.service)"),
        ("systemd-journald.service", "systemd-journald.service is protected (systemd-*)"),
        ("sshd.service", "sshd.service is protected (sshd.service)"),
        ("polkit.service", "polkit.service is protected (polkit.service)"),
        ("db.service", "db.service is protected (db*.service)"),
        (None, "the culprit has no systemd unit"),
        ("../etc/passwd", "'../etc/passwd' is not a unit name linnixd acts on"),
        ("foo.target", "'foo.target' is not a unit name linnixd acts on"),
    ],
)
def test_guard_refuses_protected_and_odd_units(unit: str | None, reason: str) -> None:
    assert refusal(unit, ("db*.service",)) == reason


def test_guard_lets_ordinary_units_through() -> None:
    assert refusal("batch.service") is None
    assert refusal("session-3.scope") is None
    assert refusal("user-1000.slice") is None  # only user.slice itself is protected
    assert refusal("docker-0123abcd.scope") is None


def test_rate_limiter_allows_n_per_minute_then_refuses() -> None:
    now = [100.0]
    limiter = RateLimiter(3, clock=lambda: now[0])
    assert [limiter.allow() for _ in range(4)] == [True, True, True, False]
    now[0] = 159.9
    assert limiter.allow() is False
    now[0] = 160.0  # the first three are a minute old
    assert [limiter.allow() for _ in range(4)] == [True, True, True, False]


# ---- monitor-only default, enabling, persistence ------------------------------------------


def test_nothing_happens_unless_enabled_and_configured(tmp_path: Path) -> None:
    enf, units, _ = make(tmp_path)
    assert enf.enabled is False
    assert run(enf.handle(alert())) is None  # configured but not enabled
    run(enf.set_enabled(True, False, WHO))
    assert run(enf.handle(alert(2, rule="fork_storm"))) is None  # enabled, rule without action
    assert units.changes() == []
    assert not (tmp_path / ACTION_LEDGER).exists()


def test_enable_state_persists_and_is_journaled_with_the_caller(tmp_path: Path) -> None:
    enf, _, journal = make(tmp_path)
    assert (
        run(enf.set_enabled(True, True, WHO))
        == "enforcement enabled (dry run: actions are only journaled)"
    )
    saved = json.loads((tmp_path / ENFORCEMENT_STATE).read_text())
    assert saved["enabled"] is True and saved["dry_run"] is True
    assert saved["by"] == {"bus_name": ":1.42", "uid": 0, "pid": 4242}
    message, kind, fields = journal[-1]
    assert kind == "enforcement_changed" and "by uid 0 pid 4242 (:1.42)" in message
    assert fields["LINNIX_CALLER_UID"] == "0" and fields["LINNIX_DRY_RUN"] == "1"
    again, _, _ = make(tmp_path)  # a restarted daemon
    assert again.enabled is True and again.dry_run is True
    run(again.set_enabled(False, False, WHO))
    assert make(tmp_path)[0].enabled is False


# ---- apply and revert ----------------------------------------------------------------------


def test_throttle_records_before_and_reverts_after_its_duration(tmp_path: Path) -> None:
    clock = Clock()
    enf, units, journal = make(tmp_path, clock=clock)
    signalled: list[tuple[str, dict[str, str]]] = []
    enf.listeners.append(lambda name, event: signalled.append((name, event)))
    units.props["batch.service"]["CPUQuotaPerSecUSec"] = (
        500_000  # a quota set by the admin: restored exactly
    )
    run(enf.set_enabled(True, False, WHO))
    record = run(enf.handle(alert()))
    assert record is not None and record.state == "applied"
    assert units.changes() == [("set", "batch.service", "CPUQuotaPerSecUSec", 200_000)]
    ledger = json.loads((tmp_path / ACTION_LEDGER).read_text())
    assert [(e["unit"], e["before"], e["after"], e["state"], e["incident"]) for e in ledger] == [
        ("batch.service", 500_000, 200_000, "applied", "i1")
    ]
    assert signalled == [
        (
            "ActionTaken",
            {
                "unit": "batch.service",
                "action": "throttle_cpu",
                "before": "500000",
                "after": "200000",
                "rule": "cpu_spike",
                "incident": "i1",
            },
        )
    ]
    clock.now += 59.0
    assert run(enf.revert_due()) == 0
    clock.now += 1.0
    assert run(enf.revert_due()) == 1
    assert units.changes()[-1] == ("set", "batch.service", "CPUQuotaPerSecUSec", 500_000)
    assert json.loads((tmp_path / ACTION_LEDGER).read_text()) == []
    assert signalled[-1][0] == "ActionReverted" and signalled[-1][1]["before"] == "500000"
    assert journal[-1][1] == "action_reverted" and "duration over" in journal[-1][0]
    assert enf.counters.applied == 1 and enf.counters.reverted == 1


def test_resolved_incident_reverts_its_action(tmp_path: Path) -> None:
    enf, units, _ = make(
        tmp_path, actions="    - {rule: memory_leak, type: limit_memory, memory_high_mb: 256}\n"
    )
    run(enf.set_enabled(True, False, WHO))
    run(enf.handle(alert(rule="memory_leak")))
    assert units.props["batch.service"]["MemoryHigh"] == 256 << 20
    run(enf.handle(alert(9, state="resolved")))  # another incident: nothing
    assert units.props["batch.service"]["MemoryHigh"] == 256 << 20
    run(enf.handle(alert(1, state="resolved", rule="memory_leak")))
    assert units.props["batch.service"]["MemoryHigh"] == UINT64_MAX
    assert enf.list_actions() == []


def test_resolution_caused_by_the_action_keeps_it_until_its_duration(tmp_path: Path) -> None:
    """A throttled hog stops spiking because of the throttle: still pressing, it stays throttled."""
    clock = Clock()
    enf, units, journal = make(tmp_path, clock=clock)
    run(enf.set_enabled(True, False, WHO))
    run(enf.handle(alert()))
    units.cpu_pct["batch.service"] = 19.0  # at its 20% quota
    run(enf.handle(alert(1, state="resolved")))
    assert units.props["batch.service"]["CPUQuotaPerSecUSec"] == 200_000 and enf.counters.kept == 1
    clock.now += 60.0
    assert run(enf.revert_due()) == 1 and "duration over" in journal[-1][0]
    assert units.props["batch.service"]["CPUQuotaPerSecUSec"] == UINT64_MAX
    # the condition really cleared: well under the quota, the resolution reverts at once
    run(enf.handle(alert(2)))
    units.cpu_pct["batch.service"] = 3.0
    run(enf.handle(alert(2, state="resolved")))
    assert (
        units.props["batch.service"]["CPUQuotaPerSecUSec"] == UINT64_MAX
        and "incident resolved" in journal[-1][0]
    )
    assert enf.counters.kept == 1 and enf.counters.reverted == 2


def test_memory_limit_is_kept_while_the_unit_sits_at_it(tmp_path: Path) -> None:
    enf, units, _ = make(
        tmp_path, actions="    - {rule: memory_leak, type: limit_memory, memory_high_mb: 256}\n"
    )
    run(enf.set_enabled(True, False, WHO))
    run(enf.handle(alert(rule="memory_leak")))
    units.props["batch.service"]["MemoryCurrent"] = 250 << 20
    run(enf.handle(alert(1, state="resolved", rule="memory_leak")))
    assert units.props["batch.service"]["MemoryHigh"] == 256 << 20 and enf.counters.kept == 1


def test_freeze_thaws_on_revert_and_disable_reverts_rule_actions(tmp_path: Path) -> None:
    enf, units, _ = make(tmp_path, actions="    - {rule: cpu_spike, type: freeze}\n")
    run(enf.set_enabled(True, False, WHO))
    run(enf.handle(alert()))
    assert units.props["batch.service"]["FreezerState"] == "frozen"
    assert run(enf.handle(alert(2))) is None  # already acted on: not stacked
    assert enf.counters.refused == 1
    run(enf.set_enabled(False, False, WHO))
    assert units.changes() == [("freeze", "batch.service"), ("thaw", "batch.service")]
    assert enf.list_actions() == []


def test_dry_run_journals_exactly_and_changes_nothing(tmp_path: Path) -> None:
    enf, units, journal = make(tmp_path)
    run(enf.set_enabled(True, True, WHO))
    assert run(enf.handle(alert())) is None
    assert units.changes() == []
    assert (
        json.loads(
            (tmp_path / ACTION_LEDGER).read_text() if (tmp_path / ACTION_LEDGER).exists() else "[]"
        )
        == []
    )
    message, kind, fields = journal[-1]
    assert kind == "action_taken"
    assert (
        message
        == "dry run: would throttle_cpu batch.service: CPUQuotaPerSecUSec infinity -> 200000 for 60 s (rule cpu_spike, incident i1)"
    )
    assert fields["LINNIX_DRY_RUN"] == "1" and fields["LINNIX_ACTION_UNIT"] == "batch.service"
    assert enf.counters.dry_run == 1 and enf.counters.applied == 0


def test_rate_limit_and_protected_units_are_refused_and_counted(tmp_path: Path) -> None:
    units = RecordingUnits()
    for i in range(5):
        units.props[f"w{i}.service"] = {"CPUQuotaPerSecUSec": UINT64_MAX}
    enf, units, _ = make(tmp_path, units=units)
    run(enf.set_enabled(True, False, WHO))
    assert run(enf.handle(alert(50, unit="sshd.service"))) is None
    for i in range(5):
        run(enf.handle(alert(i, unit=f"w{i}.service")))
    assert [c[1] for c in units.changes()] == [
        "w0.service",
        "w1.service",
        "w2.service",
    ]  # 3 per minute
    assert enf.counters.refused == 1 and enf.counters.rate_limited == 2


# ---- bad input: the action is not applied, the ledger stays consistent ---------------------


def test_vanished_unit_and_refused_property_apply_nothing(tmp_path: Path) -> None:
    enf, units, _ = make(tmp_path)
    run(enf.set_enabled(True, False, WHO))
    assert run(enf.handle(alert(unit="gone.service"))) is None
    units.refuse_set = True
    assert run(enf.handle(alert(2))) is None
    assert (
        json.loads((tmp_path / ACTION_LEDGER).read_text()) == []
    )  # the write-ahead entry was taken back
    assert enf.counters.failed == 2 and enf.counters.applied == 0


def test_failed_revert_is_kept_and_retried_and_a_gone_unit_is_dropped(tmp_path: Path) -> None:
    clock = Clock()
    enf, units, _ = make(tmp_path, clock=clock)
    run(enf.set_enabled(True, False, WHO))
    run(enf.handle(alert()))
    units.refuse_set = True
    clock.now += 61
    assert run(enf.revert_due()) == 0
    assert [r.revert_failures for r in enf.records] == [1]
    assert json.loads((tmp_path / ACTION_LEDGER).read_text())[0]["revert_failures"] == 1
    clock.now += 10
    assert run(enf.revert_due()) == 0 and enf.records[0].revert_failures == 1  # not before RETRY_S
    del units.props["batch.service"]  # the unit stopped: its runtime quota went with it
    clock.now += 30
    assert run(enf.revert_due()) == 1
    assert enf.records == [] and enf.counters.dropped_records == 1


# ---- ledger: atomic writes and crash recovery -----------------------------------------------


def test_atomic_write_leaves_no_temporary_and_replaces_whole(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    state = StateDir(tmp_path)
    state.write_json("x.json", [1, 2])
    state.write_json("x.json", {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_a_restarted_daemon_reverts_what_a_killed_one_left(tmp_path: Path) -> None:
    """kill -9 after systemd applied (applied) and after the write-ahead only (pending): both reverted."""
    units = RecordingUnits()
    units.props["half.service"] = {"MemoryHigh": 1 << 30}
    first, _, _ = make(tmp_path, units=units)
    run(first.set_enabled(True, False, WHO))
    run(first.handle(alert()))
    ledger = json.loads((tmp_path / ACTION_LEDGER).read_text())
    ledger.append(
        dict(
            ledger[0],
            id="p1",
            unit="half.service",
            action="limit_memory",
            prop="MemoryHigh",
            before=1 << 30,
            after=64 << 20,
            state="pending",
        )
    )
    (tmp_path / ACTION_LEDGER).write_text(json.dumps(ledger))
    del first  # the process died: nothing ran at exit
    units.calls.clear()
    second, _, journal = make(tmp_path, units=units)
    assert [r.state for r in second.records] == ["applied", "pending"]
    assert run(second.recover()) == 2
    assert units.changes() == [
        ("set", "batch.service", "CPUQuotaPerSecUSec", UINT64_MAX),
        ("set", "half.service", "MemoryHigh", 1 << 30),
    ]
    assert json.loads((tmp_path / ACTION_LEDGER).read_text()) == []
    assert all(
        "left behind by a previous run" in m for m, k, _ in journal if k == "action_reverted"
    )


def test_corrupt_ledger_is_set_aside_not_fatal(tmp_path: Path) -> None:
    (tmp_path / ACTION_LEDGER).write_text('[{"id": "x", "unit": "a.serv')
    enf, _, _ = make(tmp_path)
    assert enf.records == []
    assert (tmp_path / (ACTION_LEDGER + ".corrupt")).read_text().startswith('[{"id"')


# ---- manual throttle -----------------------------------------------------------------------


def test_manual_throttle_and_unthrottle(tmp_path: Path) -> None:
    enf, units, _ = make(tmp_path)
    text = run(enf.throttle("batch.service", 35, 120, WHO))
    assert (
        text
        == "batch.service throttled to 35% of one CPU for 120 s (was infinity CPUQuotaPerSecUSec)"
    )
    assert units.props["batch.service"]["CPUQuotaPerSecUSec"] == 350_000
    with pytest.raises(EnforcementError, match=r"sshd\.service is protected"):
        run(enf.throttle("sshd.service", 35, 120, WHO))
    assert (
        run(enf.unthrottle("batch.service"))
        == "batch.service unthrottled: CPUQuotaPerSecUSec back to infinity"
    )
    assert units.props["batch.service"]["CPUQuotaPerSecUSec"] == UINT64_MAX
    with pytest.raises(EnforcementError, match=r"no active throttle on batch\.service"):
        run(enf.unthrottle("batch.service"))


# ---- kill by pidfd against real processes --------------------------------------------------


@pytest.fixture
def child() -> Any:
    proc = subprocess.Popen(["sleep", "30"])
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(5)


def test_pidfd_kill_signals_the_culprit(child: subprocess.Popen[bytes]) -> None:
    start = start_ticks(child.pid) / CLK_TCK
    kill_process(child.pid, start, signal.SIGTERM)
    assert child.wait(5) == -signal.SIGTERM


def test_pidfd_kill_refuses_a_process_that_started_at_another_time(
    child: subprocess.Popen[bytes],
) -> None:
    start = start_ticks(child.pid) / CLK_TCK
    with pytest.raises(EnforcementError, match=f"pid {child.pid} now belongs to another process"):
        kill_process(child.pid, start - 5.0, signal.SIGKILL)
    time.sleep(0.2)
    assert child.poll() is None  # still running
    with pytest.raises(EnforcementError, match="refusing to signal pid 1"):
        kill_process(1, 0.0, signal.SIGTERM)
    with pytest.raises(UnitGone):
        kill_process(2**22 + 1, 0.0, signal.SIGTERM)  # above PID_MAX_LIMIT: never a process


def test_kill_action_goes_through_the_enforcer(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    start = start_ticks(child.pid) / CLK_TCK
    starts = {child.pid: start}
    enf, _, journal = make(
        tmp_path,
        actions="    - {rule: cpu_spike, type: kill, signal: KILL}\n",
        start_time_of=starts.get,
    )
    run(enf.set_enabled(True, False, WHO))
    run(enf.handle(alert(pid=os.getpid() + 10**6)))  # start time unknown: refused
    assert child.poll() is None and enf.counters.refused == 1
    run(enf.handle(alert(2, pid=child.pid)))
    assert child.wait(5) == -signal.SIGKILL
    assert (
        journal[-1][1] == "action_taken"
        and f"SIGKILL sent to burn[{child.pid}] in batch.service" in journal[-1][0]
    )
    assert enf.records == []  # a kill has nothing to revert
