"""linnixctl starts a polkit text agent the way systemctl does, checked in a real pseudo-terminal.

The agent here is a fake `pkttyagent` on PATH that records how it was started: the real one
registers for the caller's logind session, and this host has no logind or system polkitd.
The real pkttyagent prompting a sudo member for a password is checked in the VM
(vm-tests/vm_assert.py, `operator_tools`). The privileged call goes over a real dbus-daemon
to a responder that records the message flags linnixctl sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_next import Message, MessageType
from dbus_next.aio import MessageBus
from dbus_next.constants import MessageFlag
from test_bus import PrivateBus

from linnixd.wire import BUS_NAME

ROOT = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"
NOBODY = 65534

FAKE_AGENT = """#!/usr/bin/python3
import json, os, signal, sys, time
log = os.environ["FAKE_AGENT_LOG"]
def record(event, **more):
    with open(log, "a") as fh:
        fh.write(json.dumps({"event": event, "t": time.monotonic(), **more}) + "\\n")
fd = int(sys.argv[sys.argv.index("--notify-fd") + 1])
try:
    os.fstat(fd)
    fd_open = True
except OSError:
    fd_open = False
record("started", argv=sys.argv[1:], uid=os.getuid(), fd_open=fd_open, stdin_tty=os.isatty(0))
signal.signal(signal.SIGTERM, lambda *_: (record("terminated"), sys.exit(0)))
time.sleep(0.5)  # registering takes a while: linnixctl must wait for the notify fd to close
record("registered")
os.close(fd)
while True:
    signal.pause()
"""

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="runs linnixctl as another user: needs root"
)


@pytest.fixture(scope="module")
def private_bus() -> Iterator[PrivateBus]:
    bus = PrivateBus()
    yield bus
    bus.stop()


@pytest.fixture
def fake_agent() -> Iterator[Path]:
    """A directory (readable by nobody) with a fake pkttyagent and the log it writes."""
    d = Path(tempfile.mkdtemp(prefix="linnix-agent-"))
    d.chmod(0o755)
    agent = d / "pkttyagent"
    agent.write_text(FAKE_AGENT)
    agent.chmod(0o755)
    log = d / "agent.log"
    log.touch()
    log.chmod(0o666)
    yield d
    shutil.rmtree(d)


def agent_events(d: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (d / "agent.log").read_text().splitlines()]


async def run_ctl(
    address: str,
    agent_dir: Path,
    *argv: str,
    tty: bool = True,
    uid: int = NOBODY,
    path: str | None = None,
) -> tuple[int, str, list[tuple[int, float]]]:
    """linnixctl (on a pty unless tty=False) against a responder that owns linnixd's name."""
    bus = await MessageBus(bus_address=address).connect()
    await bus.request_name(BUS_NAME)
    calls: list[tuple[int, float]] = []

    def respond(msg: Message) -> Message | None:
        if msg.message_type == MessageType.METHOD_CALL and msg.member == "ReloadPolicy":
            calls.append((int(msg.flags), time.monotonic()))
            return Message.new_method_return(msg, "s", ["policy reloaded (test responder)"])
        return None

    bus.add_message_handler(respond)
    master, slave = pty.openpty() if tty else (None, None)
    env = {
        "PATH": path if path is not None else f"{agent_dir}:/usr/bin:/bin",
        "FAKE_AGENT_LOG": str(agent_dir / "agent.log"),
        "PYTHONPATH": str(ROOT),
        "TERM": "xterm",
    }

    def become() -> None:
        os.setsid()
        if slave is not None:
            import fcntl
            import termios

            fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the pty is the controlling terminal (/dev/tty)
        if uid != 0:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    stdio: Any = slave if slave is not None else subprocess.DEVNULL
    proc = subprocess.Popen(
        [PYTHON, "-m", "linnixd.ctl", "--bus", address, *argv],
        cwd=ROOT,
        env=env,
        stdin=stdio,
        stdout=slave if slave is not None else subprocess.PIPE,
        stderr=slave if slave is not None else subprocess.STDOUT,
        preexec_fn=become,
    )
    if slave is not None:
        os.close(slave)
    output = b""
    deadline = time.monotonic() + 60
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            if master is not None:
                output += _drain(master)
        assert proc.poll() is not None, "linnixctl did not finish"
        if master is not None:
            output += _drain(master)
        elif proc.stdout is not None:
            output = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        if master is not None:
            os.close(master)
        bus.disconnect()
    return proc.returncode, output.decode(errors="replace"), calls


def _drain(fd: int) -> bytes:
    import select

    out = b""
    while select.select([fd], [], [], 0)[0]:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the terminal's last holder closed it
            break
        if not chunk:
            break
        out += chunk
    return out


INTERACTIVE = int(MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)


def test_privileged_command_on_a_terminal_starts_the_agent_first(
    private_bus: PrivateBus, fake_agent: Path
) -> None:
    rc, out, calls = asyncio.run(run_ctl(private_bus.address, fake_agent, "reload"))
    assert rc == 0, out
    assert "policy reloaded (test responder)" in out
    events = agent_events(fake_agent)
    assert [e["event"] for e in events] == ["started", "registered", "terminated"], events
    started = events[0]
    notify_fd = started["argv"][1]
    assert started["argv"] == ["--notify-fd", notify_fd, "--fallback"]
    assert started["fd_open"], "the notify fd must be passed to the agent"
    assert started["uid"] == NOBODY and started["stdin_tty"]
    # linnixctl waited for the agent to register before calling, and ended it after the answer
    assert len(calls) == 1
    flags, called_at = calls[0]
    assert flags & INTERACTIVE, (
        f"ReloadPolicy sent without ALLOW_INTERACTIVE_AUTHORIZATION ({flags:#x})"
    )
    assert events[1]["t"] < called_at < events[2]["t"]


def test_no_ask_password_skips_the_agent_and_interaction(
    private_bus: PrivateBus, fake_agent: Path
) -> None:
    rc, out, calls = asyncio.run(
        run_ctl(private_bus.address, fake_agent, "--no-ask-password", "reload")
    )
    assert rc == 0, out
    assert agent_events(fake_agent) == []
    assert len(calls) == 1 and not calls[0][0] & INTERACTIVE


def test_no_terminal_or_root_or_a_read_only_command_starts_no_agent(
    private_bus: PrivateBus, fake_agent: Path
) -> None:
    rc, out, calls = asyncio.run(run_ctl(private_bus.address, fake_agent, "reload", tty=False))
    assert rc == 0 and len(calls) == 1, out
    assert calls[0][0] & INTERACTIVE  # polkit may still ask another agent of the session
    rc, out, calls = asyncio.run(run_ctl(private_bus.address, fake_agent, "reload", uid=0))
    assert rc == 0 and len(calls) == 1, out
    # status is read-only: no agent (the responder does not answer Status; that is not the point)
    asyncio.run(run_ctl(private_bus.address, fake_agent, "status"))
    assert agent_events(fake_agent) == []


def test_missing_agent_is_not_an_error(private_bus: PrivateBus, fake_agent: Path) -> None:
    # no pkttyagent on PATH (polkitd not installed): the call is made, polkit decides alone
    (fake_agent / "pkttyagent").unlink()
    rc, out, calls = asyncio.run(
        run_ctl(private_bus.address, fake_agent, "reload", path=str(fake_agent))
    )
    assert rc == 0 and len(calls) == 1, out
