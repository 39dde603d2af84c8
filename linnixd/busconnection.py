"""The daemon's own bus connection: a bounded writer that survives a full socket, Peer answers, reconnects.

dbus-next 0.2.3's writer sends queued messages back to back and treats EAGAIN (the socket
buffer is full: the bus daemon reads slower than we write) as a fatal error: it closes the
connection, the daemon's name goes away and never comes back. BoundedWriter keeps the unsent
rest and waits for the socket to become writable again (loop.add_writer), and bounds the bytes
queued on the connection: a message that would exceed the bound is dropped and counted (a
reply dropped this way is a caller's timeout, never the daemon's loss of the bus).

BusSupervisor owns the connection's life: connect, start the service on it, and when the
connection is lost anyway, reconnect with backoff and start the service again (the name is
requested again). If that keeps failing for GIVE_UP_S, it gives up and says so: the daemon
stops feeding the watchdog and exits 69 so that systemd restarts it.
"""

from __future__ import annotations

import array
import asyncio
import collections
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from dbus_next import Message, MessageType

from .daemonlog import LOG_ERR, LOG_NOTICE, LOG_WARNING, log

MAX_QUEUED_BYTES = 32 << 20  # one bus-sized message (the bus refuses one above 32 MiB)
BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)  # then 8 s between tries
GIVE_UP_S = 60.0  # no bus for this long: exit so that systemd restarts the daemon
PEER_INTERFACE = "org.freedesktop.DBus.Peer"
MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


class BusOverloaded(Exception):
    """A message was not queued: the connection already holds MAX_QUEUED_BYTES unsent."""


class BoundedWriter:
    """Replaces dbus-next's _MessageWriter: EAGAIN waits for writability; queued bytes are bounded."""

    def __init__(self, bus: Any, max_queued_bytes: int = MAX_QUEUED_BYTES) -> None:
        self.bus = bus
        self.loop = bus._loop
        self.sock: socket.socket = bus._sock
        self.fd = bus._fd
        self.negotiate_unix_fd = bus._negotiate_unix_fd
        self.max_queued_bytes = max_queued_bytes
        self.queue: collections.deque[tuple[bytes, list[int], asyncio.Future[Any] | None]] = (
            collections.deque()
        )
        self.queued_bytes = 0  # marshalled bytes not yet written, the current message included
        self.peak_queued_bytes = 0
        self.dropped = 0  # messages refused by the bound
        self.would_block = 0  # times the socket was full and the writer waited
        self._buf: memoryview | None = None
        self._fds: list[int] = []
        self._fut: asyncio.Future[Any] | None = None
        self._waiting = False  # registered with loop.add_writer

    def buffer_message(self, msg: Message, future: asyncio.Future[Any] | None = None) -> None:
        data = msg._marshall(negotiate_unix_fd=self.negotiate_unix_fd)
        if self.queued_bytes + len(data) > self.max_queued_bytes:
            self.dropped += 1
            if future is not None and not future.done():
                future.set_exception(
                    BusOverloaded(
                        f"{len(data)} bytes not sent: {self.queued_bytes} bytes already queued"
                    )
                )
            return
        self.queue.append((data, list(msg.unix_fds or ()), future))
        self.queued_bytes += len(data)
        self.peak_queued_bytes = max(self.peak_queued_bytes, self.queued_bytes)

    def schedule_write(
        self, msg: Message | None = None, future: asyncio.Future[Any] | None = None
    ) -> None:
        if msg is not None:
            self.buffer_message(msg, future)
        if self.bus.unique_name and not self._waiting and (self.queue or self._buf is not None):
            self._waiting = True
            self.loop.add_writer(self.fd, self.write_callback)

    def write_callback(self) -> None:
        try:
            while True:
                if self._buf is None:
                    if not self.queue:
                        self._waiting = False
                        self.loop.remove_writer(self.fd)
                        return
                    data, self._fds, self._fut = self.queue.popleft()
                    self._buf = memoryview(data)
                try:
                    if self._fds and self.negotiate_unix_fd:
                        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", self._fds))]
                        sent = self.sock.sendmsg([self._buf], anc)
                        self._fds = []
                    else:
                        sent = self.sock.send(self._buf)
                except (BlockingIOError, InterruptedError):
                    self.would_block += 1
                    return  # still registered: called again when the socket drains
                self.queued_bytes -= sent
                self._buf = self._buf[sent:]
                if len(self._buf) == 0:
                    self._buf = None
                    if self._fut is not None and not self._fut.done():
                        self._fut.set_result(None)
                    self._fut = None
        except Exception as exc:  # a real socket error: the connection is gone
            if self._fut is not None and not self._fut.done():
                self._fut.set_exception(exc)
            self._waiting = False
            self.bus._finalize(exc)

    def health(self) -> dict[str, int]:
        return {
            "queued_bytes": self.queued_bytes,
            "peak_queued_bytes": self.peak_queued_bytes,
            "dropped_messages": self.dropped,
            "would_block": self.would_block,
        }


def harden(bus: Any, max_queued_bytes: int = MAX_QUEUED_BYTES) -> BoundedWriter:
    """Give a connected-or-not dbus-next aio MessageBus the bounded writer (before anything is sent)."""
    writer = BoundedWriter(bus, max_queued_bytes)
    bus._writer = writer
    return writer


def machine_id() -> str | None:
    """This host's machine id (what Peer.GetMachineId answers), None when the host has none."""
    for path in MACHINE_ID_FILES:
        try:
            with open(path, encoding="ascii") as fh:
                value = fh.read(64).strip()
        except (OSError, UnicodeDecodeError):
            continue
        if len(value) == 32 and all(c in "0123456789abcdef" for c in value):
            return value
    return None


def peer_reply(msg: Message, mid: str | None) -> Message | None:
    """The answer to org.freedesktop.DBus.Peer on any path, or None when msg is not a Peer call."""
    if msg.message_type != MessageType.METHOD_CALL or msg.interface != PEER_INTERFACE:
        return None
    if msg.member == "Ping" and msg.signature == "":
        return Message.new_method_return(msg)
    if msg.member == "GetMachineId" and msg.signature == "":
        if mid is None:
            return Message.new_error(
                msg, "org.freedesktop.DBus.Error.FileNotFound", "this host has no machine id"
            )
        return Message.new_method_return(msg, "s", [mid])
    return Message.new_error(
        msg,
        "org.freedesktop.DBus.Error.UnknownMethod",
        f"{PEER_INTERFACE} has no method {str(msg.member)[:64]}({str(msg.signature)[:32]})",
    )


Connect = Callable[[], Awaitable[Any]]  # -> a connected MessageBus
Start = Callable[[Any], Awaitable[Any]]  # MessageBus -> a started service with close()


class BusSupervisor:
    """Keeps the daemon on the bus: reconnects with backoff, restarts the service, gives up loudly."""

    def __init__(
        self,
        connect: Connect,
        start: Start,
        *,
        on_give_up: Callable[[str], None] = lambda why: None,
        on_lost: Callable[[Any], None] = lambda service: None,
        backoff_s: tuple[float, ...] = BACKOFF_S,
        give_up_s: float = GIVE_UP_S,
    ) -> None:
        self.connect = connect
        self.start_service = start
        self.on_give_up = on_give_up
        self.on_lost = on_lost
        self.backoff_s = backoff_s
        self.give_up_s = give_up_s
        self.service: Any = None
        self.bus: Any = None
        self.disconnects = 0
        self.reconnects = 0
        self.last_error = ""
        self.down_since: float | None = None  # monotonic; None while connected
        self.given_up = False
        self._task: asyncio.Task[Any] | None = None
        self._closed = False

    @property
    def healthy(self) -> bool:
        return self.down_since is None and not self.given_up

    async def start(self) -> None:
        """The first connection: failures raise (the daemon cannot start without its bus)."""
        await self._up()
        self._task = asyncio.ensure_future(self._watch())

    async def _up(self) -> None:
        bus = await self.connect()
        try:
            service = await self.start_service(bus)
        except BaseException:
            bus.disconnect()
            raise
        self.bus, self.service = bus, service

    async def _watch(self) -> None:
        while not self._closed:
            try:
                await self.bus.wait_for_disconnect()
                why = "the bus closed the connection"
            except Exception as exc:
                why = f"{type(exc).__name__}: {exc}"
            if self._closed:
                return
            self.disconnects += 1
            self.down_since = time.monotonic()
            self.last_error = why
            log(f"lost the bus connection ({why}); reconnecting", LOG_WARNING)
            self._drop_service()
            if not await self._reconnect():
                return

    async def _reconnect(self) -> bool:
        attempt = 0
        assert self.down_since is not None
        while not self._closed:
            delay = self.backoff_s[min(attempt, len(self.backoff_s) - 1)]
            await asyncio.sleep(delay)
            attempt += 1
            try:
                await self._up()
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                down = time.monotonic() - self.down_since
                if down >= self.give_up_s:
                    self.given_up = True
                    why = f"no bus for {down:.0f} s after {attempt} attempts: {self.last_error}"
                    log(f"giving up on the bus: {why}", LOG_ERR)
                    self.on_give_up(why)
                    return False
                continue
            self.reconnects += 1
            log(
                f"back on the bus after {time.monotonic() - self.down_since:.1f} s "
                f"({attempt} attempt(s)); name owned again",
                LOG_NOTICE,
            )
            self.down_since = None
            return True
        return False

    def _drop_service(self) -> None:
        service, self.service = self.service, None
        if service is not None:
            self.on_lost(service)
            try:
                service.close()
            except Exception as exc:  # the connection is gone already
                log(f"closing the lost bus service: {exc!r}", LOG_WARNING)

    def health(self) -> dict[str, Any]:
        writer = getattr(self.bus, "_writer", None)
        return {
            "connected": self.healthy,
            "disconnects": self.disconnects,
            "reconnects": self.reconnects,
            "last_error": self.last_error,
            **(writer.health() if isinstance(writer, BoundedWriter) else {}),
        }

    def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        self._drop_service()
