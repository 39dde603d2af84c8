"""The D-Bus interface on a real private dbus-daemon, with python-dbusmock's polkitd for the auth path."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_next import Message, MessageType, Variant
from dbus_next.aio import MessageBus
from dbus_next.constants import MessageFlag

import linnixd
from linnixd.bus import BusService, serve
from linnixd.constants import POLKIT_RELOAD
from linnixd.history import AlertHistory
from linnixd.model import Alert, Counters, Culprit
from linnixd.wire import (
    BUS_NAME,
    ERROR_FAILED,
    ERROR_INVALID_ARGS,
    ERROR_NOT_AUTHORIZED,
    MANAGER_INTERFACE,
    OBJECT_PATH,
    alert_details,
)

PYTHON = "/usr/bin/python3"
BUS_CONFIG = Path(__file__).parent / "dbus" / "system-bus.conf"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
MOCK_IFACE = "org.freedesktop.DBus.Mock"


# ---- a private bus and a mocked polkitd -------------------------------------------------


class PrivateBus:
    """dbus-daemon with the system-like test config; stopped (and its socket removed) on exit."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={BUS_CONFIG}", "--nofork", "--print-address=1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip()
        assert self.address.startswith("unix:"), "dbus-daemon did not print an address"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class PolkitMock:
    """python-dbusmock's polkitd template on the private bus (denies everything until told)."""

    def __init__(self, address: str) -> None:
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address, DBUS_SESSION_BUS_ADDRESS=address)
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "dbusmock", "--system", "--template", "polkitd"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while (
            subprocess.run(
                ["busctl", f"--address={address}", "status", "org.freedesktop.PolicyKit1"],
                capture_output=True,
            ).returncode
            != 0
        ):
            assert self.proc.poll() is None, "dbusmock polkitd exited"
            assert time.monotonic() < deadline, "dbusmock polkitd did not appear on the bus"
            time.sleep(0.1)
        self.address = address

    def control(self, member: str, signature: str = "", *args: str) -> None:
        """Call one of the mock's control methods (SetAllowed, SimulateHang, ...) with busctl."""
        subprocess.run(
            [
                "busctl",
                f"--address={self.address}",
                "call",
                "org.freedesktop.PolicyKit1",
                POLKIT_PATH,
                MOCK_IFACE,
                member,
                *([signature, *args] if signature else []),
            ],
            check=True,
            capture_output=True,
        )

    def reset(self) -> None:
        self.control("ReleaseHangingCalls")
        self.control("SimulateHang", "b", "false")
        self.control("AllowUnknown", "b", "false")
        self.control("SetAllowed", "as", "0")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def private_bus() -> Iterator[PrivateBus]:
    bus = PrivateBus()
    yield bus
    bus.stop()


@pytest.fixture(scope="module")
def polkit(private_bus: PrivateBus) -> Iterator[PolkitMock]:
    mock = PolkitMock(private_bus.address)
    yield mock
    mock.stop()


@pytest.fixture
def reset_polkit(polkit: PolkitMock) -> PolkitMock:
    polkit.reset()
    return polkit


# ---- a small real core for the bus-layer tests ------------------------------------------


def make_alert(
    n: int = 1, rule: str = "fork_storm", state: str = "firing", ts: float | None = None
) -> Alert:
    return Alert(
        id=f"a{n}",
        incident=f"i{n}",
        rule=rule,
        severity="warning",
        state=state,
        ts=1_700_000_000.0 + n if ts is None else ts,
        summary=f"fork storm: {800 + n} process creations/s",
        culprit=Culprit(
            kind="process",
            pid=4200 + n,
            comm="lx-forkstorm",
            cgroup="/system.slice/foo.service",
            unit="foo.service",
            parent_pid=1,
            parent_comm="systemd",
        ),
        evidence={"rate_per_s": 812.5, "forks": 1625, "window": {"s": 2}},
    )


class CoreDouble:
    """The Daemon API the bus adapts, over a real AlertHistory; records what the bus made it do."""

    def __init__(self, tmp: Path) -> None:
        self.version = linnixd.__version__
        self.policy_path = str(tmp / "rules.yaml")
        self.started_at = 1_700_000_000.5
        self.enforcement_enabled = False
        self.history = AlertHistory(str(tmp / "alerts.sqlite3"))
        self.events = 0
        self.alerts = 0
        self.open: dict[str, Alert] = {}
        self.reloads = 0
        self.reload_problems: list[str] = []
        self.fail_status = False
        self._listeners: list[Callable[[Alert], None]] = []

    def emit(self, alert: Alert) -> None:
        self.history.store(alert)
        self.alerts += 1
        if alert.state == "firing":
            self.open[alert.incident] = alert
        else:
            self.open.pop(alert.incident, None)
        for fn in self._listeners:
            fn(alert)

    def subscribe(
        self, *, alerts: Callable[[Alert], None] | None = None, actions: Any = None
    ) -> None:
        if alerts is not None:
            self._listeners.append(alerts)

    def counters(self) -> Counters:
        return Counters(events=self.events, dropped_events=3, alerts=self.alerts)

    def status(self) -> dict[str, Any]:
        if self.fail_status:
            raise RuntimeError("collector went away\nsecond line")
        return {
            "version": self.version,
            "policy_path": self.policy_path,
            "started_at": self.started_at,
            "open_incidents": len(self.open),
            "counters": {"events": self.events, "alerts": self.alerts},
        }

    def recent_alerts(self, since: float = 0.0, rule: str = "", limit: int = 100) -> list[Alert]:
        return self.history.recent(since=since, rule=rule, limit=limit)

    def open_incidents(self) -> list[Alert]:
        return list(self.open.values())

    def top_cgroups(self, limit: int = 10) -> list[dict[str, Any]]:
        rows = [
            {
                "path": f"/system.slice/s{i}.service",
                "unit": f"s{i}.service",
                "cpu_some_pct": 50.0 - i,
                "io_some_pct": 0.0,
                "memory_some_pct": 0.0,
                "runq_wait_ms": 12.5,
                "memory_bytes": 1 << 20,
            }
            for i in range(5)
        ]
        return rows[:limit]

    def stall_table(self, limit: int = 20) -> list[dict[str, Any]]:
        return [
            {
                "victim": "/system.slice/a.service",
                "culprit": "/system.slice/b.service",
                "stall_ms": 420.0,
                "share": 0.8,
                "window_s": 10.0,
            }
        ][:limit]

    def reload_policy(self) -> str:
        if self.reload_problems:
            from linnixd.config import PolicyError

            raise PolicyError(self.reload_problems)
        self.reloads += 1
        return f"policy {self.policy_path} reloaded"


async def client(address: str) -> MessageBus:
    return await MessageBus(bus_address=address).connect()


async def call(
    bus: MessageBus,
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
    interface: str = MANAGER_INTERFACE,
    flags: MessageFlag = MessageFlag.NONE,
) -> Message:
    return await asyncio.wait_for(
        bus.call(
            Message(
                destination=BUS_NAME,
                path=OBJECT_PATH,
                interface=interface,
                member=member,
                signature=signature,
                body=body or [],
                flags=flags,
            )
        ),
        30,
    )


async def run_tool(*cmd: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a program without blocking the loop that serves the bus; (exit code, stdout)."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode() + err.decode()


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), 60))


async def with_service(
    address: str,
    core: CoreDouble,
    body: Callable[[BusService, MessageBus], Awaitable[Any]],
    auth_timeout_s: float = 25.0,
) -> Any:
    service = await serve(core, address, auth_timeout_s=auth_timeout_s)
    bus = await client(address)
    try:
        return await body(service, bus)
    finally:
        bus.disconnect()
        service.close()


# ---- tests ------------------------------------------------------------------------------


def test_alert_details_are_flat_and_readable() -> None:
    d = alert_details(make_alert(7))
    assert (
        d["state"] == Variant("s", "firing") and "rule" not in d
    )  # rule is the signal's own argument
    assert d["id"] == Variant("s", "a7") and d["incident"] == Variant("s", "i7")
    assert d["pid"] == Variant("x", 4207) and d["comm"].value == "lx-forkstorm"
    assert d["unit"].value == "foo.service" and d["cgroup"].value == "/system.slice/foo.service"
    assert d["parent"].value == "systemd[1]"
    assert d["ts"] == Variant("d", 1_700_000_007.0)
    assert json.loads(d["evidence"].value) == {
        "rate_per_s": 812.5,
        "forks": 1625,
        "window": {"s": 2},
    }
    assert d["evidence.rate_per_s"] == Variant("d", 812.5) and d["evidence.forks"] == Variant(
        "x", 1625
    )
    assert "evidence.window" not in d  # nested evidence stays in the JSON only
    assert "root_pid" not in d  # absent culprit fields are left out, not sent as ""


def test_reads_properties_and_introspection(private_bus: PrivateBus, tmp_path: Path) -> None:
    core = CoreDouble(tmp_path)
    core.events = 41

    async def body(service: BusService, bus: MessageBus) -> None:
        st = await call(bus, "Status")
        assert st.message_type == MessageType.METHOD_RETURN
        assert json.loads(st.body[0])["policy_path"] == core.policy_path
        props = await call(
            bus, "GetAll", "s", [MANAGER_INTERFACE], "org.freedesktop.DBus.Properties"
        )
        got = {k: v.value for k, v in props.body[0].items()}
        assert got == {
            "Version": linnixd.__version__,
            "EnforcementEnabled": False,
            "PolicyPath": core.policy_path,
            "StartedAt": 1_700_000_000.5,
            "Events": 41,
            "DroppedEvents": 3,
            "Alerts": 0,
        }
        one = await call(
            bus, "Get", "ss", [MANAGER_INTERFACE, "Events"], "org.freedesktop.DBus.Properties"
        )
        assert one.body[0] == Variant("t", 41)
        xml = (await call(bus, "Introspect", interface="org.freedesktop.DBus.Introspectable")).body[
            0
        ]
        assert (
            '<method name="RecentAlerts">' in xml
            and '<arg name="limit" type="u" direction="in"/>' in xml
        )
        assert "polkit org.linnix.linnixd1.reload-policy" in xml and '<signal name="Alert">' in xml
        rc, tree = await run_tool("busctl", f"--address={private_bus.address}", "tree", BUS_NAME)
        assert rc == 0 and OBJECT_PATH in tree

    run(lambda: with_service(private_bus.address, core, body))


def test_alert_signal_reaches_another_connection_and_properties_change(
    private_bus: PrivateBus, tmp_path: Path
) -> None:
    core = CoreDouble(tmp_path)

    async def body(service: BusService, bus: MessageBus) -> None:
        got: asyncio.Queue[Message] = asyncio.Queue()
        bus.add_message_handler(
            lambda m: (
                got.put_nowait(m)
                if m.message_type == MessageType.SIGNAL and m.path == OBJECT_PATH
                else None
            )
        )
        match = Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="AddMatch",
            signature="s",
            body=[f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}'"],
        )
        assert (await bus.call(match)).message_type == MessageType.METHOD_RETURN
        core.events = 99
        core.emit(make_alert(3))
        signals: list[Message] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(
            m.member == "PropertiesChanged" for m in signals
        ):
            signals.append(await asyncio.wait_for(got.get(), 5))
        alert = next(m for m in signals if m.member == "Alert")
        assert alert.interface == MANAGER_INTERFACE and alert.signature == "sssa{sv}"
        rule, severity, summary, details = alert.body
        assert (rule, severity, summary) == (
            "fork_storm",
            "warning",
            "fork storm: 803 process creations/s",
        )
        assert (
            details["pid"].value == 4203
            and details["state"].value == "firing"
            and details["incident"].value == "i3"
        )
        changed = next(m for m in signals if m.member == "PropertiesChanged")
        iface, props, invalidated = changed.body
        assert iface == MANAGER_INTERFACE and invalidated == []
        assert props["Events"].value == 99 and props["Alerts"].value == 1
        assert "Version" not in props  # only what changed

    run(lambda: with_service(private_bus.address, core, body))


def test_malformed_calls_get_named_errors_and_the_service_keeps_answering(
    private_bus: PrivateBus, tmp_path: Path
) -> None:
    core = CoreDouble(tmp_path)

    async def body(service: BusService, bus: MessageBus) -> None:
        wrong_sig = await call(bus, "RecentAlerts", "s", ["x"])
        assert (
            wrong_sig.error_name == ERROR_INVALID_ARGS
            and "takes (dsu), got (s)" in wrong_sig.body[0]
        )
        huge = await call(bus, "RecentAlerts", "dsu", [0.0, "", 4_000_000_000])
        assert huge.error_name == ERROR_INVALID_ARGS and "between 1 and 10000" in huge.body[0]
        nan = await call(bus, "RecentAlerts", "dsu", [math.nan, "", 5])
        assert nan.error_name == ERROR_INVALID_ARGS
        bad_rule = await call(bus, "RecentAlerts", "dsu", [0.0, "x'; DROP TABLE alerts", 5])
        assert bad_rule.error_name == ERROR_INVALID_ARGS
        zero = await call(bus, "TopCgroups", "u", [0])
        assert zero.error_name == ERROR_INVALID_ARGS
        unknown = await call(bus, "Bogus")
        assert unknown.error_name == "org.freedesktop.DBus.Error.UnknownMethod"
        setp = await call(
            bus,
            "Set",
            "ssv",
            [MANAGER_INTERFACE, "PolicyPath", Variant("s", "/tmp/evil")],
            "org.freedesktop.DBus.Properties",
        )
        assert (
            setp.error_name == "org.freedesktop.DBus.Error.AccessDenied"
        )  # the shipped bus policy stops it
        core.fail_status = True
        failed = await call(bus, "Status")
        assert failed.error_name == ERROR_FAILED
        assert (
            failed.body[0] == "Status failed: collector went away second line"
        )  # one line, no traceback
        assert service.internal_errors == 1
        core.fail_status = False
        ok = await call(bus, "TopCgroups", "u", [2])
        assert [r["path"] for r in json.loads(ok.body[0])] == [
            "/system.slice/s0.service",
            "/system.slice/s1.service",
        ]

    run(lambda: with_service(private_bus.address, core, body))


def test_recent_alerts_and_incidents_come_from_history(
    private_bus: PrivateBus, tmp_path: Path
) -> None:
    core = CoreDouble(tmp_path)
    for n in range(1, 6):
        core.emit(make_alert(n, rule="fork_storm" if n % 2 else "cpu_spike"))
    core.emit(dataclasses.replace(make_alert(1), id="a1r", state="resolved", ts=1_700_000_010.0))

    async def body(service: BusService, bus: MessageBus) -> None:
        rows = json.loads(
            (await call(bus, "RecentAlerts", "dsu", [1_700_000_002.5, "fork_storm", 10])).body[0]
        )
        assert [r["id"] for r in rows] == [
            "a1r",
            "a5",
            "a3",
        ]  # newest first, since and rule applied
        assert rows[0]["state"] == "resolved" and rows[1]["evidence"]["forks"] == 1625
        limited = json.loads((await call(bus, "RecentAlerts", "dsu", [0.0, "", 2])).body[0])
        assert [r["id"] for r in limited] == ["a1r", "a5"]
        open_ids = sorted(
            r["incident"] for r in json.loads((await call(bus, "OpenIncidents")).body[0])
        )
        assert open_ids == ["i2", "i3", "i4", "i5"]

    run(lambda: with_service(private_bus.address, core, body))


async def _monitor_checks(address: str) -> tuple[MessageBus, list[Message]]:
    """A monitor connection that records every CheckAuthorization call on the bus."""
    mon = await client(address)
    seen: list[Message] = []

    def observe(m: Message) -> bool:
        if m.message_type != MessageType.METHOD_CALL:
            return False  # replies to our own calls (BecomeMonitor) go on to dbus_next
        if m.member == "CheckAuthorization":
            seen.append(m)
        return True  # a monitored call is handled here: a monitor that answers is dropped

    mon.add_message_handler(observe)
    reply = await mon.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus.Monitoring",
            member="BecomeMonitor",
            signature="asu",
            body=[["type='method_call',member='CheckAuthorization'"], 0],
        )
    )
    assert reply.message_type == MessageType.METHOD_RETURN
    return mon, seen


def test_reload_allowed_by_polkit_runs_for_the_callers_name(
    private_bus: PrivateBus, reset_polkit: PolkitMock, tmp_path: Path
) -> None:
    core = CoreDouble(tmp_path)
    reset_polkit.control("SetAllowed", "as", "1", POLKIT_RELOAD)

    async def body(service: BusService, bus: MessageBus) -> None:
        mon, seen = await _monitor_checks(private_bus.address)
        reply = await call(bus, "ReloadPolicy")
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        assert reply.body[0] == f"policy {core.policy_path} reloaded"
        assert core.reloads == 1
        # a caller that allows interactive authorization lets polkit ask (linnixctl's default)
        reply = await call(bus, "ReloadPolicy", flags=MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)
        assert reply.message_type == MessageType.METHOD_RETURN and core.reloads == 2
        await asyncio.sleep(0.2)
        mon.disconnect()
        with contextlib.suppress(EOFError, TimeoutError):  # the monitor's end is not the point
            await asyncio.wait_for(mon.wait_for_disconnect(), 5)
        assert len(seen) == 2, [m.body[3] for m in seen]
        subject, action, _details, flags, _cancel = seen[0].body
        assert subject[0] == "system-bus-name" and subject[1]["name"].value == bus.unique_name
        assert (action, flags) == (POLKIT_RELOAD, 0)  # no interaction the caller did not allow
        assert seen[1].body[3] == 1  # AllowUserInteraction

    run(lambda: with_service(private_bus.address, core, body))


def test_reload_denied_by_polkit(
    private_bus: PrivateBus, reset_polkit: PolkitMock, tmp_path: Path
) -> None:
    core = CoreDouble(tmp_path)
    reset_polkit.control("SetAllowed", "as", "1", "org.linnix.linnixd1.read")

    async def body(service: BusService, bus: MessageBus) -> None:
        reply = await call(bus, "ReloadPolicy")
        assert reply.error_name == ERROR_NOT_AUTHORIZED
        assert (
            reply.body[0] == f"ReloadPolicy needs polkit action {POLKIT_RELOAD}: denied by polkit"
        )
        assert core.reloads == 0

    run(lambda: with_service(private_bus.address, core, body))


def test_hung_polkit_is_a_denial_and_reads_keep_working(
    private_bus: PrivateBus, reset_polkit: PolkitMock, tmp_path: Path
) -> None:
    core = CoreDouble(tmp_path)
    reset_polkit.control("SetAllowed", "as", "1", POLKIT_RELOAD)
    reset_polkit.control("SimulateHang", "b", "true")

    async def body(service: BusService, bus: MessageBus) -> None:
        started = time.monotonic()
        pending = asyncio.ensure_future(call(bus, "ReloadPolicy"))
        await asyncio.sleep(0.3)
        assert not pending.done()
        st = await call(bus, "Status")  # the loop is not blocked while polkit hangs
        assert st.message_type == MessageType.METHOD_RETURN
        reply = await pending
        elapsed = time.monotonic() - started
        assert reply.error_name == ERROR_NOT_AUTHORIZED
        assert "polkit did not answer within 1.5 s" in reply.body[0]
        assert 1.4 <= elapsed < 10.0
        assert core.reloads == 0

    run(lambda: with_service(private_bus.address, core, body, auth_timeout_s=1.5))
    reset_polkit.reset()


def test_without_polkit_privileged_calls_fail_closed(tmp_path: Path) -> None:
    bus_without_polkit = PrivateBus()
    core = CoreDouble(tmp_path)

    async def body(service: BusService, bus: MessageBus) -> None:
        reply = await call(bus, "ReloadPolicy")
        assert reply.error_name == ERROR_NOT_AUTHORIZED and "polkit check failed" in reply.body[0]
        assert core.reloads == 0

    try:
        run(lambda: with_service(bus_without_polkit.address, core, body))
    finally:
        bus_without_polkit.stop()


def test_unknown_caller_never_runs_a_privileged_method(
    private_bus: PrivateBus, reset_polkit: PolkitMock, tmp_path: Path
) -> None:
    core = CoreDouble(tmp_path)
    reset_polkit.control("AllowUnknown", "b", "true")

    async def body(service: BusService, bus: MessageBus) -> None:
        for sender in (None, "", "org.example.wellknown"):
            allowed, why = await service.check_authorization(sender, POLKIT_RELOAD)
            assert (allowed, why) == (False, "the caller has no unique bus name")

    run(lambda: with_service(private_bus.address, core, body))


def test_an_unmarked_export_needs_authorization() -> None:
    from linnixd.bus import collect_exports, exported
    from linnixd.constants import POLKIT_ACT

    class Extended(BusService):
        @exported("Forgotten")
        def Forgotten(self) -> str:
            return "ran"

    exports = collect_exports(Extended)
    assert exports["Forgotten"].read_only is False and exports["Forgotten"].action == POLKIT_ACT
    assert (
        exports["ReloadPolicy"].read_only is False
        and exports["ReloadPolicy"].action == POLKIT_RELOAD
    )
    assert {n for n, e in collect_exports(BusService).items() if e.read_only} == {
        "Status",
        "RecentAlerts",
        "RecentAlertsPage",
        "OpenIncidents",
        "Explain",
        "IncidentHistory",
        "TopCgroups",
        "StallTable",
        "Query",
        "ListActions",
    }


def test_second_instance_cannot_take_the_name(private_bus: PrivateBus, tmp_path: Path) -> None:
    async def body(service: BusService, bus: MessageBus) -> None:
        with pytest.raises(RuntimeError, match="is taken: is another linnixd running"):
            await serve(CoreDouble(tmp_path / "b"), private_bus.address)

    (tmp_path / "b").mkdir()
    run(lambda: with_service(private_bus.address, CoreDouble(tmp_path), body))
