"""The daemon's bus connection on a real dbus-daemon: a full socket, a bounded queue, Peer, reconnects."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from dbus_next import Message, MessageType
from dbus_next.aio import MessageBus

from linnixd import client
from linnixd.busconnection import BoundedWriter, BusOverloaded, BusSupervisor, harden, peer_reply
from linnixd.wire import BUS_NAME
from tests.test_bus import PrivateBus

NAME = BUS_NAME  # root may own it on the test bus, and anyone may send it Peer calls


@pytest.fixture(scope="module")
def private_bus() -> Iterator[PrivateBus]:
    bus = PrivateBus()
    yield bus
    bus.stop()


def burst(bus: MessageBus, count: int, size: int) -> list[asyncio.Future[Any]]:
    """Signals sent back to back: faster than the bus daemon reads them."""
    return [
        bus.send(Message.new_signal("/burst", "org.linnix.test", "Burst", "s", ["x" * size]))
        for _ in range(count)
    ]


async def outcome(
    futures: list[asyncio.Future[Any]], timeout_s: float = 30
) -> tuple[int, int, list[BaseException]]:
    done, pending = await asyncio.wait(futures, timeout=timeout_s)
    errors = [f.exception() for f in done if f.exception() is not None]
    for f in pending:
        f.cancel()
    return len(done) - len(errors), len(pending), [e for e in errors if e is not None]


def test_stock_writer_drops_the_connection_on_a_full_socket(private_bus: PrivateBus) -> None:
    """The failure BoundedWriter exists for (dbus-next 0.2.3): EAGAIN closes the connection."""

    async def main() -> tuple[int, int, list[BaseException], bool]:
        bus = await MessageBus(bus_address=private_bus.address).connect()
        # the stock writer leaves the messages queued after the failure unresolved
        sent, pending, errors = await outcome(burst(bus, 3000, 10_000), 3)
        connected = bus.connected
        bus.disconnect()
        return sent, pending, errors, connected

    sent, pending, errors, connected = asyncio.run(main())
    assert any(isinstance(e, BlockingIOError) for e in errors), (sent, pending, errors)
    assert not connected and sent < 3000


def test_bounded_writer_waits_for_the_socket_and_keeps_the_connection(
    private_bus: PrivateBus,
) -> None:
    async def main() -> tuple[int, int, list[BaseException], dict[str, int], str]:
        bus = await client.connect(private_bus.address, setup=harden)
        writer = bus._writer
        assert isinstance(writer, BoundedWriter)
        sent, pending, errors = await outcome(burst(bus, 3000, 10_000))
        reply = await client.call(
            bus,
            client.method_call(
                "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetId"
            ),
            10,
        )
        bus.disconnect()
        return sent, pending, errors, writer.health(), reply.body[0]

    sent, pending, errors, health, bus_id = asyncio.run(main())
    assert (sent, pending, errors) == (3000, 0, [])
    assert health["would_block"] > 0  # the socket was full, and the writer waited for it
    assert health["dropped_messages"] == 0 and health["queued_bytes"] == 0
    assert len(bus_id) == 32  # the connection still answers


def test_bounded_writer_drops_past_its_bound_and_counts(private_bus: PrivateBus) -> None:
    async def main() -> tuple[int, list[BaseException], dict[str, int], bool]:
        bus = await client.connect(
            private_bus.address, setup=lambda b: harden(b, max_queued_bytes=1 << 20)
        )
        sent, _, errors = await outcome(burst(bus, 3000, 10_000))
        health = bus._writer.health()
        connected = bus.connected
        bus.disconnect()
        return sent, errors, health, connected

    sent, errors, health, connected = asyncio.run(main())
    assert connected
    assert health["dropped_messages"] == len(errors) > 0
    assert all(isinstance(e, BusOverloaded) for e in errors)
    assert sent + len(errors) == 3000
    assert health["peak_queued_bytes"] <= 1 << 20


def test_peer_ping_and_machine_id_answer_on_any_path(private_bus: PrivateBus) -> None:
    mid = "0123456789abcdef0123456789abcdef"

    async def main() -> list[Message]:
        server = await client.connect(private_bus.address, setup=harden)

        def on_message(msg: Message) -> Any:
            return peer_reply(msg, mid) or False

        server.add_message_handler(on_message)
        await server.request_name(NAME)
        caller = await client.connect(private_bus.address)
        replies = []
        for path, member in (("/", "Ping"), ("/any/path", "GetMachineId"), ("/", "GetMachineId")):
            replies.append(
                await caller.call(
                    Message(
                        destination=NAME,
                        path=path,
                        interface="org.freedesktop.DBus.Peer",
                        member=member,
                    )
                )
            )
        replies.append(
            await caller.call(
                Message(
                    destination=NAME,
                    path="/",
                    interface="org.freedesktop.DBus.Peer",
                    member="x" * 200,
                )
            )
        )
        caller.disconnect()
        server.disconnect()
        return replies

    ping, first, second, unknown = asyncio.run(main())
    assert ping.message_type == MessageType.METHOD_RETURN and ping.body == []
    assert first.body == [mid] and second.body == [mid]
    assert unknown.error_name == "org.freedesktop.DBus.Error.UnknownMethod"
    assert len(unknown.body[0]) < 150  # the caller's 200-character name is not echoed whole


async def owner(address: str) -> str:
    bus = await client.connect(address)
    try:
        reply = await client.call(
            bus,
            client.method_call(
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "NameHasOwner",
                "s",
                [NAME],
            ),
            10,
        )
        return "owned" if reply.body[0] else "free"
    finally:
        bus.disconnect()


def test_supervisor_reconnects_and_owns_the_name_again(private_bus: PrivateBus) -> None:
    started: list[MessageBus] = []

    class Service:
        def __init__(self, bus: MessageBus) -> None:
            self.bus = bus

        def close(self) -> None:
            self.bus.disconnect()

    async def start(bus: MessageBus) -> Service:
        await bus.request_name(NAME)
        started.append(bus)
        return Service(bus)

    async def main() -> tuple[list[str], dict[str, Any]]:
        sup = BusSupervisor(
            lambda: client.connect(private_bus.address, setup=harden),
            start,
            backoff_s=(0.1,),
        )
        await sup.start()
        seen = [await owner(private_bus.address)]
        sup.bus._sock.shutdown(socket.SHUT_RDWR)  # the connection breaks under the daemon
        for _ in range(100):
            await asyncio.sleep(0.05)
            if sup.reconnects:
                break
        seen.append(await owner(private_bus.address))
        health = sup.health()
        sup.close()
        await asyncio.sleep(0.1)
        seen.append(await owner(private_bus.address))
        return seen, health

    seen, health = asyncio.run(main())
    assert seen == ["owned", "owned", "free"]
    assert len(started) == 2
    assert health["disconnects"] == 1 and health["reconnects"] == 1 and health["connected"]


def test_supervisor_gives_up_when_the_bus_stays_away() -> None:
    gone = PrivateBus()
    reasons: list[str] = []

    async def start(bus: MessageBus) -> Any:
        class Service:
            def close(self) -> None:
                bus.disconnect()

        return Service()

    async def main() -> dict[str, Any]:
        sup = BusSupervisor(
            lambda: client.connect(gone.address, 2),
            start,
            on_give_up=reasons.append,
            backoff_s=(0.1,),
            give_up_s=0.5,
        )
        await sup.start()
        gone.stop()  # the bus daemon dies: no reconnect can succeed
        for _ in range(100):
            await asyncio.sleep(0.05)
            if sup.given_up:
                break
        health = sup.health()
        sup.close()
        return health

    health = asyncio.run(main())
    assert health["connected"] is False and health["disconnects"] == 1
    assert len(reasons) == 1 and reasons[0].startswith("no bus for ")
