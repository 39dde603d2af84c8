"""sd_notify: the messages the daemon sends, read from a real AF_UNIX datagram socket."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from linnixd.notify import Notifier


def test_messages_reach_the_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    try:
        n = Notifier()
        assert n.enabled
        n.ready()
        n.status("12 events, 0 dropped\n3 alerts")
        n.watchdog()
        n.reloading()
        n.stopping()
        got = [sock.recv(4096).decode() for _ in range(5)]
    finally:
        sock.close()
    assert got[:3] == ["READY=1", "STATUS=12 events, 0 dropped 3 alerts", "WATCHDOG=1"]
    first, second = got[3].split("\n")
    assert (
        first == "RELOADING=1"
        and second.startswith("MONOTONIC_USEC=")
        and int(second.split("=")[1]) > 0
    )
    assert got[4] == "STOPPING=1"
    assert n.failures == 0


def test_abstract_socket_address(monkeypatch: pytest.MonkeyPatch) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0linnixd-test-notify")
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@linnixd-test-notify")
    try:
        Notifier().ready()
        assert sock.recv(64) == b"READY=1"
    finally:
        sock.close()


def test_no_socket_is_a_no_op_and_a_gone_socket_is_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    quiet = Notifier()
    quiet.ready()
    assert not quiet.enabled and quiet.failures == 0
    path = str(tmp_path / "gone.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    n = Notifier()
    sock.close()
    Path(path).unlink()
    n.watchdog()
    assert n.failures == 1
