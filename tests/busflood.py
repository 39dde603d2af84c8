"""A hostile local user's flood of linnixd's bus name (run unprivileged, through setpriv).

    busflood.py ADDRESS CONNECTIONS NAME_BYTES PARALLEL_HISTORY

Opens CONNECTIONS connections that each ask Properties.Get for a NAME_BYTES-long property
name, all at once; then PARALLEL_HISTORY connections that each call RecentAlerts for 10,000
alerts, all at once. Prints one JSON line: replies and errors by name, and their sizes.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time

from dbus_next import Message, MessageType
from dbus_next.aio import MessageBus

BUS_NAME = "org.linnix.linnixd1"
OBJECT_PATH = "/org/linnix/linnixd1"
TIMEOUT_S = 60.0


async def one_call(address: str, msg: Message) -> tuple[str, int]:
    bus = await MessageBus(bus_address=address).connect()
    try:
        reply = await asyncio.wait_for(bus.call(msg), TIMEOUT_S)
    except TimeoutError:
        return "timeout", 0
    except Exception as exc:
        return f"failed: {type(exc).__name__}", 0
    finally:
        bus.disconnect()
    if reply.message_type == MessageType.ERROR:
        return str(reply.error_name), len(str(reply.body[0]) if reply.body else "")
    return "ok", len(str(reply.body[0])) if reply.body else 0


async def wave(address: str, msgs: list[Message]) -> dict[str, object]:
    started = time.monotonic()
    results = await asyncio.gather(*(one_call(address, m) for m in msgs))
    kinds = collections.Counter(kind for kind, _ in results)
    return {
        "replies": dict(kinds),
        "largest_reply": max(size for _, size in results),
        "seconds": round(time.monotonic() - started, 2),
    }


def main() -> None:
    address, connections, name_bytes, parallel = sys.argv[1:5]
    props = [
        Message(
            destination=BUS_NAME,
            path=OBJECT_PATH,
            interface="org.freedesktop.DBus.Properties",
            member="Get",
            signature="ss",
            body=["org.linnix.linnixd1.Manager", "x" * int(name_bytes)],
        )
        for _ in range(int(connections))
    ]
    history = [
        Message(
            destination=BUS_NAME,
            path=OBJECT_PATH,
            interface="org.linnix.linnixd1.Manager",
            member="RecentAlerts",
            signature="dsu",
            body=[0.0, "", 10_000],
        )
        for _ in range(int(parallel))
    ]
    out = {
        "properties": asyncio.run(wave(address, props)),
        "recent_alerts": asyncio.run(wave(address, history)),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
