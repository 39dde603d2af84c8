"""The one D-Bus client: connect to a bus, call a method with a timeout, failures as typed errors.

linnixctl (ctl.py), the systemd client enforcement uses (systemd_units.py) and the server's own
outgoing calls (polkit, the bus daemon) go through here, so "connect", "wait at most N s" and
"what went wrong" are decided once. Each error carries a one-line `detail`; callers phrase it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from dbus_next import BusType, Message, MessageType
from dbus_next.aio import MessageBus
from dbus_next.constants import MessageFlag


class BusClientError(Exception):
    """A D-Bus call or connection that failed; `detail` is one line."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = " ".join(str(detail).splitlines())


class BusUnreachable(BusClientError):
    """Could not connect to the bus (`timed_out` when it did not answer in time)."""

    def __init__(self, detail: str, *, timed_out: bool = False) -> None:
        super().__init__(detail)
        self.timed_out = timed_out


class CallTimeout(BusClientError):
    """The peer did not answer within the timeout."""


class ConnectionLost(BusClientError):
    """The connection failed while the call was under way."""


class ErrorReply(BusClientError):
    """The peer (or the bus daemon) answered with a D-Bus error."""

    def __init__(self, error_name: str, text: str) -> None:
        super().__init__(text)
        self.error_name = error_name


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).splitlines()) or type(exc).__name__


def bus_label(bus: str) -> str:
    """How messages name a bus: 'the system bus', 'the bus at unix:path=...'."""
    return f"the {bus} bus" if bus in ("system", "session") else f"the bus at {bus}"


def bus_options(bus: str) -> dict[str, Any]:
    """MessageBus keyword arguments for "system", "session" or a D-Bus address."""
    if bus == "system":
        return {"bus_type": BusType.SYSTEM}
    if bus == "session":
        return {"bus_type": BusType.SESSION}
    return {"bus_address": bus}


async def connect(
    bus: str,
    timeout_s: float | None = None,
    *,
    setup: Callable[[MessageBus], Any] | None = None,
) -> MessageBus:
    """A connected MessageBus for "system", "session" or an address; BusUnreachable otherwise.

    `setup` sees the connection before it connects (the daemon installs its bounded writer).
    """
    try:
        connection = MessageBus(**bus_options(bus))
        if setup is not None:
            setup(connection)
        return await asyncio.wait_for(connection.connect(), timeout_s)
    except TimeoutError:
        raise BusUnreachable(f"{bus_label(bus)} did not answer", timed_out=True) from None
    except Exception as exc:
        raise BusUnreachable(_one_line(exc)) from None


def method_call(
    destination: str,
    path: str,
    interface: str,
    member: str,
    signature: str = "",
    body: Sequence[Any] = (),
    *,
    interactive: bool = False,
) -> Message:
    """A method call message; `interactive` lets polkit ask the caller for a password."""
    return Message(
        destination=destination,
        path=path,
        interface=interface,
        member=member,
        signature=signature,
        body=list(body),
        flags=MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if interactive else MessageFlag.NONE,
    )


async def call(bus: MessageBus, msg: Message, timeout_s: float) -> Message:
    """Send `msg` and return its METHOD_RETURN; CallTimeout, ConnectionLost or ErrorReply otherwise."""
    try:
        reply = await asyncio.wait_for(bus.call(msg), timeout_s)
    except TimeoutError:
        raise CallTimeout(f"no answer to {msg.member} within {timeout_s:g} s") from None
    except Exception as exc:
        raise ConnectionLost(_one_line(exc)) from None
    if reply is None:
        raise ConnectionLost(f"no reply to {msg.member}")
    if reply.message_type == MessageType.ERROR:
        text = " ".join(str(reply.body[0]).splitlines()) if reply.body else ""
        raise ErrorReply(reply.error_name or "no error name", text)
    return reply
