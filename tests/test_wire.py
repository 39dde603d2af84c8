"""The D-Bus contract's codecs: an Alert encoded by the daemon decodes to the same Alert in a client."""

from __future__ import annotations

import asyncio
import dataclasses

from dbus_next import Message, MessageType, Variant
from dbus_next.aio import MessageBus
from test_bus import PrivateBus, private_bus  # noqa: F401  (fixture)

from linnixd.model import Alert, Culprit
from linnixd.wire import (
    ACTION_SIGNATURE,
    ALERT_SIGNAL,
    ALERT_SIGNATURE,
    MANAGER_INTERFACE,
    OBJECT_PATH,
    alert_details,
    decode_action,
    decode_alert,
    encode_action,
    encode_alert,
)

FULL = Alert(
    id="3f2a",
    incident="inc-9",
    rule="runaway_tree",
    severity="critical",
    state="resolved",
    ts=1_733_190_000.25,
    summary="runaway tree: make[311] and 42 descendants use 390% CPU",
    culprit=Culprit(
        kind="tree",
        pid=311,
        comm="make",
        cgroup="/user.slice/user-1000.slice/session-3.scope",
        unit="session-3.scope",
        parent_pid=300,
        parent_comm="bash",
        root_pid=311,
    ),
    evidence={
        "cpu_pct": 390.5,
        "descendants": 42,
        "over_threshold": True,
        "top": [{"pid": 340, "comm": "cc1", "cpu_pct": 98.0}],
        "note": "sustained 30 s",
        "huge": 2**70,
    },
)
SPARSE = Alert(
    id="a1",
    incident="i1",
    rule="psi_saturation",
    severity="warning",
    state="firing",
    ts=1_733_190_001.0,
    summary="cpu pressure 85%",
    culprit=Culprit(kind="system"),
    evidence={},
)


def test_every_alert_field_survives_encode_and_decode() -> None:
    for alert in (FULL, SPARSE):
        back = decode_alert(encode_alert(alert))
        assert back == alert
        # compare field by field too, so a new Alert/Culprit field fails here until it is carried
        for f in dataclasses.fields(Alert):
            assert getattr(back, f.name) == getattr(alert, f.name), f.name
        for f in dataclasses.fields(Culprit):
            assert getattr(back.culprit, f.name) == getattr(alert.culprit, f.name), f.name


def test_details_are_flat_variants_for_busctl_readers() -> None:
    d = alert_details(FULL)
    assert d["pid"] == Variant("x", 311) and d["root_pid"] == Variant("x", 311)
    assert d["kind"] == Variant("s", "tree") and d["culprit"].value == FULL.culprit.label()
    assert d["parent"] == Variant("s", "bash[300]")
    assert d["evidence.cpu_pct"] == Variant("d", 390.5)
    assert d["evidence.descendants"] == Variant("x", 42)
    assert d["evidence.huge"] == Variant("d", float(2**70))  # beyond int64: a double
    assert "evidence.over_threshold" not in d and "evidence.top" not in d  # JSON only
    sparse = alert_details(SPARSE)
    assert not {"pid", "comm", "unit", "cgroup", "parent", "root_pid"} & set(sparse)


def test_action_body_round_trip() -> None:
    event = {
        "unit": "batch.service",
        "action": "cpu_quota",
        "before": "infinity",
        "after": "200000",
        "rule": "noisy_neighbour",
        "incident": "inc-2",
        "extra": "not sent",
    }
    body = encode_action(event)
    assert len(body) == len(ACTION_SIGNATURE)
    expected = {k: v for k, v in event.items() if k != "extra"}
    assert decode_action("ActionTaken", body) == {"signal": "ActionTaken", **expected}


def test_alert_signal_through_a_real_dbus_daemon(private_bus: PrivateBus) -> None:
    """Marshalled by dbus-next, routed by dbus-daemon, decoded by the client side: the same Alert."""

    async def run() -> list[Alert]:
        sender = await MessageBus(bus_address=private_bus.address).connect()
        receiver = await MessageBus(bus_address=private_bus.address).connect()
        got: list[Alert] = []
        done = asyncio.Event()

        def on_message(msg: Message) -> None:
            if msg.message_type == MessageType.SIGNAL and msg.member == ALERT_SIGNAL:
                assert msg.signature == ALERT_SIGNATURE
                got.append(decode_alert(msg.body))
                if len(got) == 2:
                    done.set()

        receiver.add_message_handler(on_message)
        await receiver.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[f"type='signal',interface='{MANAGER_INTERFACE}'"],
            )
        )
        for alert in (FULL, SPARSE):
            await sender.send(
                Message.new_signal(
                    OBJECT_PATH,
                    MANAGER_INTERFACE,
                    ALERT_SIGNAL,
                    ALERT_SIGNATURE,
                    encode_alert(alert),
                )
            )
        await asyncio.wait_for(done.wait(), 10)
        sender.disconnect()
        receiver.disconnect()
        return got

    assert asyncio.run(run()) == [FULL, SPARSE]
