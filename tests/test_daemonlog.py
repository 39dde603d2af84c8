"""The daemon's log lines: a syslog priority prefix exactly when stderr is journald's stream."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

PYTHON = "/usr/bin/python3"
ROOT = Path(__file__).resolve().parent.parent
PROGRAM = (
    "from linnixd.daemonlog import LOG_ERR, LOG_WARNING, log\n"
    "log('ready: pid 1')\n"
    "log('reload refused, keeping the running policy: x', LOG_WARNING)\n"
    "log('tick failed:\\nline two', LOG_ERR)\n"
)


def run_logging(tmp_path: Path, journal_stream: str | None) -> str:
    """Run the program with stderr on a file; JOURNAL_STREAM names that file or not."""
    out = tmp_path / "stderr"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with out.open("w") as fh:
        if journal_stream == "this file":
            st = os.fstat(fh.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif journal_stream is not None:
            env["JOURNAL_STREAM"] = journal_stream
        subprocess.run([PYTHON, "-c", PROGRAM], stderr=fh, env=env, cwd=ROOT, check=True)
    return out.read_text()


def test_priority_prefix_on_the_journal_stream(tmp_path: Path) -> None:
    assert run_logging(tmp_path, "this file").splitlines() == [
        "<6>linnixd: ready: pid 1",
        "<4>linnixd: reload refused, keeping the running policy: x",
        "<3>linnixd: tick failed: line two",
    ]


def test_plain_lines_elsewhere(tmp_path: Path) -> None:
    expected = [
        "linnixd: ready: pid 1",
        "linnixd: reload refused, keeping the running policy: x",
        "linnixd: tick failed: line two",
    ]
    assert run_logging(tmp_path, None).splitlines() == expected
    # another stream is the journal (stdout, say): stderr lines stay plain
    assert run_logging(tmp_path, "1:2").splitlines() == expected
    assert run_logging(tmp_path, "garbage").splitlines() == expected
