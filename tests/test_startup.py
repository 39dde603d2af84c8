"""Start-up as systemd sees it: STATUS= progress on a real notify socket, one-line refusals, the unit's exit codes."""

from __future__ import annotations

import configparser
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from linnixd.constants import EXIT_CONFIG, EXIT_OSERR

ROOT = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"
READY_TIMEOUT_S = 120.0  # bcc compiles at start-up; slow when the shared host is busy


def notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(1.0)
    return sock, path


def receive_until(sock: socket.socket, proc: subprocess.Popen[str], want: str) -> list[str]:
    """Every datagram until one equals `want` (or the daemon exits, or time runs out)."""
    got: list[str] = []
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            if proc.poll() is not None:
                break
            continue
        if got[-1] == want:
            return got
    raise AssertionError(f"no {want!r} from the daemon; received {got}")


def test_bad_policy_at_start_is_one_line_exit_78_and_a_status(tmp_path: Path) -> None:
    policy = tmp_path / "rules.yaml"
    policy.write_text("daemon:\n  tick_s: -1\nrules:\n  fork_storm:\n    rate_per_s: lots\n")
    sock, path = notify_socket(tmp_path)
    with sock:
        proc = subprocess.run(
            [PYTHON, "-m", "linnixd", "--foreground", "--policy", str(policy)],
            cwd=ROOT,
            env={**os.environ, "NOTIFY_SOCKET": path},
            capture_output=True,
            text=True,
            timeout=60,
        )
        messages = []
        sock.settimeout(0.2)
        try:
            while True:
                messages.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
    assert proc.returncode == EXIT_CONFIG
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("linnixd: invalid policy, not starting: ") or line.startswith(
        "<3>linnixd: invalid policy, not starting: "
    ), line
    # the first problem names the file, and the second one is counted, not lost
    assert str(policy) in line and "(and 1 more: linnixctl check-config " in line, line
    assert "Traceback" not in proc.stderr
    assert messages[0] == f"STATUS=loading policy {policy}"
    assert messages[-1].startswith("STATUS=invalid policy, not starting: "), messages
    assert not any(m.startswith("READY=1") for m in messages)


def test_unit_prevents_restart_loops_on_the_documented_codes() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(ROOT / "packaging" / "systemd" / "linnixd.service")
    codes = {int(c) for c in unit["Service"]["RestartPreventExitStatus"].split()}
    assert codes == {EXIT_CONFIG, EXIT_OSERR}
    man = (ROOT / "packaging" / "man" / "linnixd.8").read_text()
    assert "RestartPreventExitStatus=" in man


@pytest.mark.bpf
@pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF: needs root")
def test_status_tells_progress_until_ready(tmp_path: Path) -> None:
    sock, path = notify_socket(tmp_path)
    policy = ROOT / "policy" / "rules.yaml"
    with sock:
        proc = subprocess.Popen(
            [PYTHON, "-m", "linnixd", "--foreground", "--no-journal", "--policy", str(policy)],
            cwd=ROOT,
            env={**os.environ, "NOTIFY_SOCKET": path},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            messages = receive_until(sock, proc, "READY=1")
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    statuses = [
        m.split("\n")[0].removeprefix("STATUS=") for m in messages if m.startswith("STATUS=")
    ]
    assert statuses[0] == f"loading policy {policy}"
    lifecycle = "compiling and attaching BPF: process lifecycle (bpf/lifecycle.c)"
    assert lifecycle in statuses
    # the default policy enables the stall and network rules: their programs are compiled after
    later = (
        "compiling and attaching BPF: scheduler stalls (bpf/sched.c), TCP connections (bpf/net.c)"
    )
    assert statuses.index(later) > statuses.index(lifecycle)
    # each slow step moves systemd's start deadline ahead (180 s per program to compile)
    extends = {
        m.split("\n")[0].removeprefix("STATUS="): m.split("\n")[1]
        for m in messages
        if "\nEXTEND_TIMEOUT_USEC=" in m
    }
    assert extends[lifecycle] == "EXTEND_TIMEOUT_USEC=180000000"
    assert extends[later] == "EXTEND_TIMEOUT_USEC=360000000"
    assert "reading the process table" in extends
    ready = statuses[-1]
    assert messages[-2] == "STATUS=" + ready, "the ready status comes right before READY=1"
    from linnixd.config import load_policy

    assert ready.startswith(f"ready: {len(list(load_policy(str(policy)).enabled_rules()))} rules, ")
    tracked = int(ready.split(", ")[1].split()[0])
    assert tracked > 10, ready  # at least pytest, the daemon and the host's own processes
    # without journald (none here), the daemon_started event is the ready log line
    assert any(line.startswith("linnixd: ready: pid ") for line in err.splitlines()), err
