"""Sinks: journald field mapping, stdout formats, and the bounded queue that counts drops."""

from __future__ import annotations

import io
import json
import threading

from linnixd.constants import MESSAGE_IDS
from linnixd.model import Alert, Culprit
from linnixd.sinks import QueuedSink
from linnixd.sinks.journal import journal_fields
from linnixd.sinks.stdout import StdoutSink, format_text


def make_alert(state: str = "firing", severity: str = "warning") -> Alert:
    return Alert(
        id="a1",
        incident="i1",
        rule="fork_storm",
        severity=severity,
        state=state,
        ts=1_700_000_000.0,
        summary="fork storm: 812 process creations/s for 2.0 s",
        culprit=Culprit(
            kind="process",
            pid=4242,
            comm="lx-forkstorm",
            cgroup="/system.slice/foo.service",
            unit="foo.service",
            parent_pid=1,
        ),
        evidence={"rate_per_s": 812.5, "forks": 1625},
    )


def test_journal_fields_for_a_firing_alert() -> None:
    f = journal_fields(make_alert())
    assert f["MESSAGE_ID"] == MESSAGE_IDS["fork_storm"]
    assert f["PRIORITY"] == "4"
    assert f["LINNIX_RULE"] == "fork_storm"
    assert f["LINNIX_PID"] == "4242"
    assert f["LINNIX_COMM"] == "lx-forkstorm"
    assert f["LINNIX_UNIT"] == "foo.service"
    assert f["LINNIX_CGROUP"] == "/system.slice/foo.service"
    assert f["LINNIX_PARENT_PID"] == "1"
    assert "LINNIX_ROOT_PID" not in f  # absent culprit fields are not sent as "None"
    assert json.loads(f["LINNIX_EVIDENCE"]) == {"rate_per_s": 812.5, "forks": 1625}
    assert f["MESSAGE"].startswith("fork_storm firing: fork storm: 812")


def test_journal_fields_for_a_resolved_alert_and_critical_priority() -> None:
    f = journal_fields(make_alert(state="resolved"))
    assert f["MESSAGE_ID"] == MESSAGE_IDS["resolved"]
    assert f["PRIORITY"] == "6"
    assert f["LINNIX_RULE"] == "fork_storm"  # resolved records stay selectable by rule
    assert journal_fields(make_alert(severity="critical"))["PRIORITY"] == "2"


def test_stdout_json_has_the_documented_keys() -> None:
    out = io.StringIO()
    StdoutSink("json", out).write(make_alert())
    obj = json.loads(out.getvalue())
    for key in (
        "rule",
        "severity",
        "ts",
        "summary",
        "pid",
        "comm",
        "cgroup",
        "unit",
        "evidence",
        "state",
    ):
        assert key in obj
    assert obj["pid"] == 4242 and obj["evidence"]["forks"] == 1625
    assert Alert.from_dict(obj) == make_alert()


def test_stdout_text_is_one_line_with_culprit_and_evidence() -> None:
    line = format_text(make_alert())
    assert "\n" not in line
    assert "WARNING" in line and "fork_storm firing" in line
    assert "pid=4242" in line and "unit=foo.service" in line and "rate_per_s=812" in line


class BlockingSink:
    name = "blocking"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.written: list[Alert] = []

    def write(self, alert: Alert) -> None:
        self.release.wait(5)
        self.written.append(alert)


def test_queued_sink_counts_drops_instead_of_blocking() -> None:
    sink = BlockingSink()
    q = QueuedSink(sink, maxsize=3)
    for _ in range(10):
        q.put(make_alert())  # returns at once even though the sink is stuck
    # one alert is held by the blocked writer, three wait in the queue, the rest are dropped
    assert q.drops in (6, 7)
    sink.release.set()
    q.close()
    assert len(sink.written) + q.drops == 10


def test_journal_sink_with_a_real_journald(tmp_path) -> None:
    """A real systemd-journald (started here when none runs) stores the alert's fields."""
    import os
    import shutil
    import subprocess
    import time
    import uuid

    import pytest

    from linnixd.sinks.journal import JOURNAL_SOCKET, JournalSink

    journald = "/lib/systemd/systemd-journald"
    if not os.path.exists(journald) or shutil.which("journalctl") is None:
        pytest.skip("systemd-journald is not installed")
    started = None
    if not os.path.exists(JOURNAL_SOCKET):
        os.makedirs("/run/systemd/journal", exist_ok=True)
        started = subprocess.Popen([journald], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(JOURNAL_SOCKET) and time.monotonic() < deadline:
            time.sleep(0.05)
    try:
        alert = make_alert()
        marker = uuid.uuid4().hex
        alert = Alert(**{**alert.__dict__, "id": marker})
        JournalSink().write(alert)
        entries: list[dict] = []
        deadline = time.monotonic() + 10
        while not entries and time.monotonic() < deadline:
            out = subprocess.run(
                ["journalctl", "--no-pager", "-o", "json", f"LINNIX_ALERT_ID={marker}"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            entries = [json.loads(line) for line in out.splitlines() if line.strip()]
            time.sleep(0.1)
        assert len(entries) == 1
        e = entries[0]
        assert e["MESSAGE_ID"] == MESSAGE_IDS["fork_storm"]
        assert e["PRIORITY"] == "4"
        assert e["LINNIX_RULE"] == "fork_storm"
        assert e["LINNIX_PID"] == "4242"
        assert e["LINNIX_UNIT"] == "foo.service"
        assert e["SYSLOG_IDENTIFIER"] == "linnixd"
    finally:
        if started is not None:
            started.terminate()
            started.wait(10)
            for name in ("socket", "stdout", "dev-log", "io.systemd.journal"):
                try:
                    os.unlink(os.path.join("/run/systemd/journal", name))
                except FileNotFoundError:
                    pass
