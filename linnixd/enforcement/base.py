"""What every enforcement module shares: the error types, the systemd backend protocol, the caller."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

UINT64_MAX = 2**64 - 1  # systemd's "infinity" for CPUQuotaPerSecUSec and MemoryHigh


class EnforcementError(Exception):
    """Why an action was not applied or reverted, in one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


class UnitGone(EnforcementError):
    """systemd does not know the unit (it stopped, or never existed)."""


class Units(Protocol):
    """What enforcement needs from systemd (systemd_units.SystemdUnits over D-Bus)."""

    async def get_property(self, unit: str, name: str) -> Any: ...

    async def set_property(self, unit: str, name: str, value: int) -> None: ...

    async def freeze(self, unit: str) -> None: ...

    async def thaw(self, unit: str) -> None: ...


@dataclass(frozen=True)
class Caller:
    """Who asked for a change over D-Bus (None where the bus could not say)."""

    bus_name: str
    uid: int | None = None
    pid: int | None = None

    def label(self) -> str:
        return f"uid {self.uid} pid {self.pid} ({self.bus_name})"
