"""The org.freedesktop.systemd1 client enforcement uses: read and set unit properties, freeze and thaw.

The transport edge for linnixd/enforcement.py (which never imports dbus_next). Calls made:

    Manager.GetUnit(s name) -> o                                  the unit's object (NoSuchUnit: gone)
    Properties.Get(s iface, s prop) -> v on that object           iface .Service/.Scope/.Slice/... or .Unit
    Manager.SetUnitProperties(s name, b runtime, a(sv) props)      runtime=true: /run, gone at reboot
    Manager.FreezeUnit(s name), Manager.ThawUnit(s name)

Every D-Bus error becomes an EnforcementError (UnitGone for an unknown unit) with one line.
"""

from __future__ import annotations

from typing import Any

from dbus_next import Message, Variant
from dbus_next.aio import MessageBus

from . import client
from .enforcement import EnforcementError, UnitGone
from .wire import PROPERTIES_INTERFACE

SYSTEMD_NAME = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
MANAGER_INTERFACE = "org.freedesktop.systemd1.Manager"
UNIT_INTERFACE = "org.freedesktop.systemd1.Unit"
CALL_TIMEOUT_S = 10.0
_GONE = {
    "org.freedesktop.systemd1.NoSuchUnit",
    "org.freedesktop.systemd1.LoadFailed",
    "org.freedesktop.DBus.Error.UnknownObject",
}
# Where each property lives: cgroup settings on the unit type's interface, the freezer on Unit.
_TYPE_INTERFACE = {
    "service": "org.freedesktop.systemd1.Service",
    "scope": "org.freedesktop.systemd1.Scope",
    "slice": "org.freedesktop.systemd1.Slice",
    "socket": "org.freedesktop.systemd1.Socket",
    "mount": "org.freedesktop.systemd1.Mount",
    "swap": "org.freedesktop.systemd1.Swap",
}
_UNIT_PROPERTIES = frozenset({"FreezerState", "ActiveState", "SubState"})  # on every unit type
_SIGNATURE = {"CPUQuotaPerSecUSec": "t", "MemoryHigh": "t"}


def property_interface(unit: str, prop: str) -> str:
    if prop in _UNIT_PROPERTIES:
        return UNIT_INTERFACE
    suffix = unit.rsplit(".", 1)[-1]
    if suffix not in _TYPE_INTERFACE:
        raise EnforcementError(f"{unit[:80]} is not a unit type with cgroup settings")
    return _TYPE_INTERFACE[suffix]


class SystemdUnits:
    """Talks to systemd on `bus` ("system" or an address); connects on first use, again after a loss."""

    def __init__(self, bus: str = "system", timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.bus_spec = bus
        self.timeout_s = timeout_s
        self._bus: MessageBus | None = None

    async def _connection(self) -> MessageBus:
        if self._bus is None or not self._bus.connected:
            try:
                self._bus = await client.connect(self.bus_spec, self.timeout_s)
            except client.BusUnreachable as exc:
                raise EnforcementError(
                    f"cannot reach systemd on the {self.bus_spec} bus: {exc.detail}"
                ) from None
        return self._bus

    async def _call(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
    ) -> Message:
        bus = await self._connection()
        msg = client.method_call(SYSTEMD_NAME, path, interface, member, signature, body or [])
        try:
            return await client.call(bus, msg, self.timeout_s)
        except client.CallTimeout:
            raise EnforcementError(
                f"systemd did not answer {member} within {self.timeout_s:g} s"
            ) from None
        except client.ConnectionLost as exc:
            raise EnforcementError(f"{member} failed: {exc.detail}") from None
        except client.ErrorReply as exc:
            error = UnitGone if exc.error_name in _GONE else EnforcementError
            raise error(f"systemd refused {member}: {exc.error_name}: {exc.detail}") from None

    async def unit_path(self, unit: str) -> str:
        reply = await self._call(SYSTEMD_PATH, MANAGER_INTERFACE, "GetUnit", "s", [unit])
        return str(reply.body[0])

    async def get_property(self, unit: str, name: str) -> Any:
        """The unit's current value of `name` (UnitGone when systemd has no such loaded unit)."""
        interface = property_interface(unit, name)
        path = await self.unit_path(unit)
        reply = await self._call(path, PROPERTIES_INTERFACE, "Get", "ss", [interface, name])
        value = reply.body[0]
        return value.value if isinstance(value, Variant) else value

    async def set_property(self, unit: str, name: str, value: int) -> None:
        """SetUnitProperties(unit, runtime=true, [(name, value)]): systemd writes the cgroup file."""
        if name not in _SIGNATURE:
            raise EnforcementError(f"linnixd does not set {name}")
        await self._call(
            SYSTEMD_PATH,
            MANAGER_INTERFACE,
            "SetUnitProperties",
            "sba(sv)",
            [unit, True, [[name, Variant(_SIGNATURE[name], value)]]],
        )

    async def freeze(self, unit: str) -> None:
        await self._call(SYSTEMD_PATH, MANAGER_INTERFACE, "FreezeUnit", "s", [unit])

    async def thaw(self, unit: str) -> None:
        await self._call(SYSTEMD_PATH, MANAGER_INTERFACE, "ThawUnit", "s", [unit])

    def close(self) -> None:
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None
