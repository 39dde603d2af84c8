"""The systemd client and the enforcement D-Bus methods on a real private dbus-daemon.

systemd is python-dbusmock with a small template (the shipped systemd template has no
SetUnitProperties/FreezeUnit); a bus monitor proves the exact calls and signatures linnixd
sends. polkit is dbusmock's polkitd template. Real systemd is proven in the Debian VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_next import Message, MessageType, Variant
from dbus_next.aio import MessageBus

from linnixd.bus import BusService, serve
from linnixd.config import load_policy
from linnixd.constants import ACTION_LEDGER, ENFORCEMENT_STATE, POLKIT_ACT, POLKIT_ENFORCEMENT
from linnixd.enforcement import UINT64_MAX, EnforcementError, Enforcer, UnitGone
from linnixd.systemd_units import SystemdUnits
from linnixd.wire import (
    BUS_NAME,
    ERROR_INVALID_ARGS,
    ERROR_NOT_AUTHORIZED,
    MANAGER_INTERFACE,
    OBJECT_PATH,
)

PYTHON = "/usr/bin/python3"
HERE = Path(__file__).parent
SYSTEMD_PATH = "/org/freedesktop/systemd1"
MOCK_IFACE = "org.freedesktop.DBus.Mock"

TEMPLATE = '''
"""systemd1 for linnixd's tests: GetUnit, SetUnitProperties, FreezeUnit, ThawUnit and unit objects."""
import dbus
from dbusmock import MOCK_IFACE

BUS_NAME = "org.freedesktop.systemd1"
MAIN_OBJ = "/org/freedesktop/systemd1"
MAIN_IFACE = "org.freedesktop.systemd1.Manager"
SYSTEM_BUS = True
NO_SUCH = "raise dbus.exceptions.DBusException('Unit ' + args[0] + ' not loaded.', name='org.freedesktop.systemd1.NoSuchUnit')\\n"


def load(mock, parameters):
    mock.unit_paths = {}
    mock.AddMethods(MAIN_IFACE, [
        ("GetUnit", "s", "o", "if args[0] not in self.unit_paths:\\n  " + NO_SUCH + "ret = self.unit_paths[args[0]]"),
        ("SetUnitProperties", "sba(sv)", "",
         "if args[0] not in self.unit_paths:\\n  " + NO_SUCH +
         "if args[0] == 'stubborn.service':\\n  raise dbus.exceptions.DBusException('Cannot set property CPUQuotaPerSecUSec, or unknown property.', name='org.freedesktop.DBus.Error.PropertyReadOnly')\\n"
         "objects[self.unit_paths[args[0]]].UpdateProperties('org.freedesktop.systemd1.Service', {n: dbus.UInt64(v) for n, v in args[2]})"),
        ("FreezeUnit", "s", "", "objects[self.unit_paths[args[0]]].UpdateProperties('org.freedesktop.systemd1.Unit', {'FreezerState': 'frozen'})"),
        ("ThawUnit", "s", "", "objects[self.unit_paths[args[0]]].UpdateProperties('org.freedesktop.systemd1.Unit', {'FreezerState': 'running'})"),
    ])
    mock.AddMethods(MOCK_IFACE, [("ForgetUnit", "s", "", "del self.unit_paths[args[0]]")])
    for name in ("batch.service", "stubborn.service"):
        path = "/org/freedesktop/systemd1/unit/" + name.replace(".", "_2e")
        mock.unit_paths[name] = path
        mock.AddObject(path, "org.freedesktop.systemd1.Unit", {"Id": name, "FreezerState": "running"}, [])
        from dbusmock.mockobject import objects
        objects[path].AddProperties("org.freedesktop.systemd1.Service", {"CPUQuotaPerSecUSec": dbus.UInt64(500000), "MemoryHigh": dbus.UInt64(2**64 - 1)})
'''


class Bus:
    """dbus-daemon shaped like the system bus (tests/dbus/system-bus.conf) where root may also own systemd1."""

    def __init__(self, tmp: Path) -> None:
        conf = (HERE / "dbus" / "system-bus.conf").read_text()
        conf = conf.replace(
            '<allow own="org.freedesktop.PolicyKit1"/>',
            '<allow own="org.freedesktop.PolicyKit1"/>\n    <allow own="org.freedesktop.systemd1"/>\n    <allow send_destination="org.freedesktop.systemd1"/>',
        )
        conf = conf.replace("<include>../../", f"<include>{HERE.parent}/")
        (tmp / "bus.conf").write_text(conf)
        self.proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={tmp / 'bus.conf'}", "--nofork", "--print-address=1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip()
        assert self.address.startswith("unix:")
        self.mocks: list[subprocess.Popen[bytes]] = []

    def mock(self, name: str, *args: str) -> None:
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.address)
        proc = subprocess.Popen(
            [PYTHON, "-m", "dbusmock", "--system", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.mocks.append(proc)
        deadline = time.monotonic() + 20
        while (
            subprocess.run(
                ["busctl", f"--address={self.address}", "status", name], capture_output=True
            ).returncode
            != 0
        ):
            assert proc.poll() is None, f"dbusmock for {name} exited"
            assert time.monotonic() < deadline, f"{name} did not appear"
            time.sleep(0.1)

    def busctl(self, dest: str, path: str, iface: str, member: str, *args: str) -> None:
        subprocess.run(
            ["busctl", f"--address={self.address}", "call", dest, path, iface, member, *args],
            check=True,
            capture_output=True,
        )

    def stop(self) -> None:
        for proc in self.mocks:
            proc.terminate()
            proc.wait(10)
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    tmp = tmp_path_factory.mktemp("bus")
    (tmp / "systemd_template.py").write_text(TEMPLATE)
    b = Bus(tmp)
    b.mock("org.freedesktop.systemd1", "--template", str(tmp / "systemd_template.py"))
    b.mock("org.freedesktop.PolicyKit1", "--template", "polkitd")
    yield b
    b.stop()


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), 60))


async def monitor(address: str, rule: str) -> tuple[MessageBus, list[Message]]:
    mon = await MessageBus(bus_address=address).connect()
    seen: list[Message] = []

    def watch(m: Message) -> bool:
        if m.message_type != MessageType.METHOD_CALL:
            return False
        seen.append(m)
        return True  # claimed, so dbus-next sends no UnknownMethod reply (a monitor that sends is cut off)

    mon.add_message_handler(watch)
    reply = await mon.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus.Monitoring",
            member="BecomeMonitor",
            signature="asu",
            body=[[rule], 0],
        )
    )
    assert reply.message_type == MessageType.METHOD_RETURN
    return mon, seen


async def stop_monitor(mon: MessageBus) -> None:
    await asyncio.sleep(0.2)
    mon.disconnect()
    with contextlib.suppress(EOFError):
        await mon.wait_for_disconnect()


# ---- the systemd client -------------------------------------------------------------------


def test_client_sends_the_exact_systemd_calls(bus: Bus) -> None:
    async def body() -> None:
        units = SystemdUnits(bus.address)
        mon, seen = await monitor(
            bus.address, "type='method_call',destination='org.freedesktop.systemd1'"
        )
        try:
            assert await units.get_property("batch.service", "CPUQuotaPerSecUSec") == 500_000
            await units.set_property("batch.service", "CPUQuotaPerSecUSec", 200_000)
            assert await units.get_property("batch.service", "CPUQuotaPerSecUSec") == 200_000
            assert await units.get_property("batch.service", "MemoryHigh") == UINT64_MAX
            await units.freeze("batch.service")
            assert await units.get_property("batch.service", "FreezerState") == "frozen"
            await units.thaw("batch.service")
            assert await units.get_property("batch.service", "FreezerState") == "running"
            await units.set_property("batch.service", "CPUQuotaPerSecUSec", 500_000)
        finally:
            await stop_monitor(mon)
            units.close()
        calls = [(m.interface, m.member, m.signature, m.path) for m in seen]
        unit_path = "/org/freedesktop/systemd1/unit/batch_2eservice"
        assert calls[:3] == [
            ("org.freedesktop.systemd1.Manager", "GetUnit", "s", SYSTEMD_PATH),
            ("org.freedesktop.DBus.Properties", "Get", "ss", unit_path),
            ("org.freedesktop.systemd1.Manager", "SetUnitProperties", "sba(sv)", SYSTEMD_PATH),
        ]
        get = seen[1].body
        assert get == ["org.freedesktop.systemd1.Service", "CPUQuotaPerSecUSec"]
        name, runtime, props = seen[2].body
        assert (name, runtime, props) == (
            "batch.service",
            True,
            [["CPUQuotaPerSecUSec", Variant("t", 200_000)]],
        )
        members = [(m.member, m.body) for m in seen if m.member in ("FreezeUnit", "ThawUnit")]
        assert members == [("FreezeUnit", ["batch.service"]), ("ThawUnit", ["batch.service"])]
        freezer = next(m for m in seen if m.member == "Get" and m.body[1] == "FreezerState")
        assert freezer.body[0] == "org.freedesktop.systemd1.Unit"

    run(body)


def test_client_errors_are_one_line_and_typed(bus: Bus) -> None:
    async def body() -> None:
        units = SystemdUnits(bus.address)
        try:
            with pytest.raises(
                UnitGone,
                match=r"org\.freedesktop\.systemd1\.NoSuchUnit: Unit nothere\.service not loaded\.",
            ):
                await units.get_property("nothere.service", "CPUQuotaPerSecUSec")
            with pytest.raises(
                EnforcementError, match="PropertyReadOnly: Cannot set property CPUQuotaPerSecUSec"
            ):
                await units.set_property("stubborn.service", "CPUQuotaPerSecUSec", 1)
            with pytest.raises(EnforcementError, match="linnixd does not set ExecStart"):
                await units.set_property("batch.service", "ExecStart", 1)
            with pytest.raises(EnforcementError, match="not a unit type with cgroup settings"):
                await units.get_property("foo.target", "MemoryHigh")
        finally:
            units.close()
        unreachable = SystemdUnits("unix:path=/nonexistent/bus", timeout_s=2)
        with pytest.raises(
            EnforcementError, match="cannot reach systemd on the unix:path=/nonexistent/bus bus"
        ):
            await unreachable.get_property("batch.service", "MemoryHigh")

    run(body)


# ---- the daemon's enforcement methods over D-Bus -------------------------------------------


class Core:
    """The Daemon API the bus adapts, with a real Enforcer over the mocked systemd."""

    def __init__(self, tmp: Path, address: str) -> None:
        import linnixd
        from linnixd.model import Counters

        (tmp / "rules.yaml").write_text("version: 1\n")
        policy = load_policy(tmp / "rules.yaml")
        self.version = linnixd.__version__
        self.policy_path = str(tmp / "rules.yaml")
        self.started_at = 1.0
        self.enforcer = Enforcer(tmp, SystemdUnits(address), lambda: policy)
        self._counters = Counters()

    @property
    def enforcement_enabled(self) -> bool:
        return bool(self.enforcer.enabled)

    def subscribe(self, *, alerts: Any = None, actions: Any = None) -> None:
        if actions is not None:
            self.enforcer.listeners.append(actions)

    def counters(self) -> Any:
        return self._counters


async def with_core(
    bus: Bus, tmp: Path, body: Callable[[Core, BusService, MessageBus], Awaitable[Any]]
) -> Any:
    core = Core(tmp, bus.address)
    service = await serve(core, bus.address, auth_timeout_s=5)
    client = await MessageBus(bus_address=bus.address).connect()
    try:
        return await body(core, service, client)
    finally:
        client.disconnect()
        service.close()
        core.enforcer.units.close()


async def call(
    client: MessageBus,
    member: str,
    signature: str = "",
    body: Any = None,
    interface: str = MANAGER_INTERFACE,
) -> Message:
    msg = Message(
        destination=BUS_NAME,
        path=OBJECT_PATH,
        interface=interface,
        member=member,
        signature=signature,
        body=body or [],
    )
    return await asyncio.wait_for(client.call(msg), 30)


def allow(bus: Bus, *actions: str) -> None:
    bus.busctl(
        "org.freedesktop.PolicyKit1",
        "/org/freedesktop/PolicyKit1/Authority",
        MOCK_IFACE,
        "SetAllowed",
        "as",
        str(len(actions)),
        *actions,
    )


def test_enable_enforcement_is_denied_without_polkit(bus: Bus, tmp_path: Path) -> None:
    allow(bus)

    async def body(core: Core, service: BusService, client: MessageBus) -> None:
        reply = await call(client, "EnableEnforcement", "b", [False])
        assert reply.error_name == ERROR_NOT_AUTHORIZED
        assert (
            reply.body[0]
            == f"EnableEnforcement needs polkit action {POLKIT_ENFORCEMENT}: denied by polkit"
        )
        throttle = await call(client, "Throttle", "sdd", ["batch.service", 20.0, 60.0])
        assert throttle.error_name == ERROR_NOT_AUTHORIZED and POLKIT_ACT in throttle.body[0]
        assert core.enforcer.enabled is False
        assert not (tmp_path / ENFORCEMENT_STATE).exists()
        listed = await call(client, "ListActions")  # a read: no polkit
        assert json.loads(listed.body[0]) == []

    run(lambda: with_core(bus, tmp_path, body))


def test_enable_with_polkit_persists_names_the_caller_and_shows_in_properties(
    bus: Bus, tmp_path: Path
) -> None:
    allow(bus, POLKIT_ENFORCEMENT)

    async def body(core: Core, service: BusService, client: MessageBus) -> None:
        reply = await call(client, "EnableEnforcement", "b", [True])
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        assert reply.body[0] == "enforcement enabled (dry run: actions are only journaled)"
        props = await call(
            client, "GetAll", "s", [MANAGER_INTERFACE], "org.freedesktop.DBus.Properties"
        )
        got = {k: v.value for k, v in props.body[0].items()}
        assert got["EnforcementEnabled"] is True and got["DryRun"] is True
        state = json.loads((tmp_path / ENFORCEMENT_STATE).read_text())
        assert state["by"] == {
            "bus_name": client.unique_name,
            "uid": os.getuid(),
            "pid": os.getpid(),
        }
        off = await call(client, "DisableEnforcement")
        assert off.body[0] == "enforcement disabled"
        assert json.loads((tmp_path / ENFORCEMENT_STATE).read_text())["enabled"] is False

    run(lambda: with_core(bus, tmp_path, body))


def test_throttle_over_the_bus_signals_and_unthrottle_restores(bus: Bus, tmp_path: Path) -> None:
    allow(bus, POLKIT_ACT)

    async def body(core: Core, service: BusService, client: MessageBus) -> None:
        signals: list[Message] = []
        client.add_message_handler(
            lambda m: (
                signals.append(m)
                if m.message_type == MessageType.SIGNAL
                and m.member in ("ActionTaken", "ActionReverted")
                else None
            )
        )
        match = Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="AddMatch",
            signature="s",
            body=[f"type='signal',sender='{BUS_NAME}',interface='{MANAGER_INTERFACE}'"],
        )
        assert (await client.call(match)).message_type == MessageType.METHOD_RETURN
        reply = await call(client, "Throttle", "sdd", ["batch.service", 20.0, 60.0])
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        assert (
            reply.body[0]
            == "batch.service throttled to 20% of one CPU for 60 s (was 500000 CPUQuotaPerSecUSec)"
        )
        assert (
            await core.enforcer.units.get_property("batch.service", "CPUQuotaPerSecUSec") == 200_000
        )
        rows = json.loads((await call(client, "ListActions")).body[0])
        assert [(r["unit"], r["before"], r["after"], r["rule"]) for r in rows] == [
            ("batch.service", 500_000, 200_000, "manual")
        ]
        assert json.loads((tmp_path / ACTION_LEDGER).read_text())[0]["state"] == "applied"
        protected = await call(client, "Throttle", "sdd", ["dbus.service", 20.0, 60.0])
        assert (
            protected.error_name == ERROR_INVALID_ARGS
            and protected.body[0] == "dbus.service is protected (dbus.service)"
        )
        refused = await call(client, "Throttle", "sdd", ["stubborn.service", 20.0, 60.0])
        assert refused.error_name == ERROR_INVALID_ARGS and "was not throttled" in refused.body[0]
        undo = await call(client, "Unthrottle", "s", ["batch.service"])
        assert undo.body[0] == "batch.service unthrottled: CPUQuotaPerSecUSec back to 500000"
        assert (
            await core.enforcer.units.get_property("batch.service", "CPUQuotaPerSecUSec") == 500_000
        )
        deadline = time.monotonic() + 5
        while len(signals) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert [(m.member, m.signature, m.body) for m in signals] == [
            (
                "ActionTaken",
                "ssssss",
                [
                    "batch.service",
                    "throttle_cpu",
                    "500000",
                    "200000",
                    "manual",
                    f"manual:uid {os.getuid()} pid {os.getpid()} ({client.unique_name})",
                ],
            ),
            (
                "ActionReverted",
                "ssssss",
                [
                    "batch.service",
                    "throttle_cpu",
                    "500000",
                    "200000",
                    "manual",
                    f"manual:uid {os.getuid()} pid {os.getpid()} ({client.unique_name})",
                ],
            ),
        ]
        bad = await call(client, "Throttle", "sdd", ["batch.service", -5.0, 60.0])
        assert bad.error_name == ERROR_INVALID_ARGS

    run(lambda: with_core(bus, tmp_path, body))


def test_vanished_unit_is_not_acted_on_and_the_ledger_stays_empty(bus: Bus, tmp_path: Path) -> None:
    allow(bus, POLKIT_ACT)
    bus.busctl(
        "org.freedesktop.systemd1", SYSTEMD_PATH, MOCK_IFACE, "ForgetUnit", "s", "stubborn.service"
    )

    async def body(core: Core, service: BusService, client: MessageBus) -> None:
        reply = await call(client, "Throttle", "sdd", ["stubborn.service", 20.0, 60.0])
        assert reply.error_name == ERROR_INVALID_ARGS and "was not throttled" in reply.body[0]
        assert core.enforcer.counters.failed == 1
        assert (
            json.loads(
                (tmp_path / ACTION_LEDGER).read_text()
                if (tmp_path / ACTION_LEDGER).exists()
                else "[]"
            )
            == []
        )
        ok = await call(client, "ListActions")
        assert ok.message_type == MessageType.METHOD_RETURN  # the daemon keeps answering

    run(lambda: with_core(bus, tmp_path, body))


async def linnixctl(address: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "linnixd.ctl",
        "--bus",
        address,
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=str(HERE.parent),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


def test_linnixctl_enforcement_commands(bus: Bus, tmp_path: Path) -> None:
    allow(bus, POLKIT_ACT)

    async def body(core: Core, service: BusService, client: MessageBus) -> None:
        rc, out, err = await linnixctl(bus.address, "enable-enforcement", "--dry-run")
        assert rc == 77 and err.startswith(
            "linnixctl: permission denied: EnableEnforcement needs polkit action org.linnix.linnixd1.manage-enforcement"
        )
        rc, out, err = await linnixctl(
            bus.address, "throttle", "batch.service", "--cpu", "30", "--duration", "90"
        )
        assert (rc, out) == (
            0,
            "batch.service throttled to 30% of one CPU for 90 s (was 500000 CPUQuotaPerSecUSec)\n",
        ), err
        rc, out, err = await linnixctl(bus.address, "actions")
        lines = out.splitlines()
        assert rc == 0 and lines[0].split()[:5] == ["UNIT", "ACTION", "BEFORE", "AFTER", "REVERT"]
        assert (
            lines[1].split()[:4] == ["batch.service", "throttle_cpu", "500000", "300000"]
            and len(lines) == 2
        )
        rc, out, err = await linnixctl(bus.address, "actions", "--json")
        assert rc == 0 and [r["after"] for r in json.loads(out)] == [300_000]
        rc, out, err = await linnixctl(bus.address, "unthrottle", "batch.service")
        assert (rc, out) == (0, "batch.service unthrottled: CPUQuotaPerSecUSec back to 500000\n")
        rc, out, err = await linnixctl(bus.address, "unthrottle", "batch.service")
        assert (rc, err) == (64, "linnixctl: no active throttle on batch.service\n")
        rc, out, err = await linnixctl(bus.address, "throttle", "batch.service", "--cpu", "abc")
        assert rc == 64 and "expected a percentage of one CPU like 20, got 'abc'" in err

    run(lambda: with_core(bus, tmp_path, body))
