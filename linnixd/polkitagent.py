"""The polkit text agent for privileged linnixctl commands: pkttyagent, started as systemctl starts it."""

from __future__ import annotations

import ctypes
import os
import select
import shutil
import signal
import subprocess
import time
from typing import IO

AGENT = "pkttyagent"  # from polkitd (Debian: /usr/bin/pkttyagent)
REGISTER_TIMEOUT_S = 10.0  # pkttyagent closes its notify fd once registered; never wait forever
_PR_SET_PDEATHSIG = 1


def wanted(euid: int | None = None, stdin_fd: int = 0) -> bool:
    """An agent helps only a user who is not root (root needs no polkit) on a terminal (input)."""
    uid = os.geteuid() if euid is None else euid
    return uid != 0 and os.isatty(stdin_fd)


def _die_with_parent() -> None:
    # the agent must not outlive linnixctl, even when linnixctl is killed (systemd's fork_agent)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class TtyAgent:
    """A running pkttyagent registered for this session; close() ends it."""

    def __init__(self, proc: subprocess.Popen[bytes], tty: IO[bytes] | None) -> None:
        self.proc = proc
        self._tty = tty

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.send_signal(signal.SIGCONT)  # a stopped agent still gets to exit
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._tty is not None:
            self._tty.close()


def start(timeout_s: float = REGISTER_TIMEOUT_S) -> TtyAgent | None:
    """Start `pkttyagent --notify-fd N --fallback` and wait until it says it is registered.

    --fallback: an agent already serving the session (a desktop's, or the caller's own) wins.
    None when no agent is wanted or pkttyagent is not installed: polkit then answers as it
    would without one (the command says authentication is required).
    """
    if not wanted():
        return None
    path = shutil.which(AGENT)
    if path is None:
        return None
    read_end, write_end = os.pipe()
    tty: IO[bytes] | None = None
    out: int | IO[bytes] | None = None
    if not (os.isatty(1) and os.isatty(2)):
        # the prompt must reach the person typing even when linnixctl's output is redirected
        try:
            tty = open("/dev/tty", "wb", buffering=0)  # noqa: SIM115 (closed by TtyAgent.close)
            out = tty
        except OSError:
            out = None
    try:
        proc = subprocess.Popen(
            [path, "--notify-fd", str(write_end), "--fallback"],
            pass_fds=(write_end,),
            stdout=out,
            stderr=out,
            preexec_fn=_die_with_parent,
        )
    except OSError:
        os.close(read_end)
        os.close(write_end)
        if tty is not None:
            tty.close()
        return None
    os.close(write_end)  # the agent holds the only write end: end of file means "registered"
    try:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([read_end], [], [], left)
            if ready and not os.read(read_end, 512):
                break
    finally:
        os.close(read_end)
    return TtyAgent(proc, tty)
