"""The daemon's one log function: a line on stderr, with its syslog priority when journald reads it.

Under systemd, stderr is a journald stream and JOURNAL_STREAM names it (device:inode).
journald's stream protocol takes a leading `<N>` as the line's priority (SyslogLevelPrefix=,
on by default), so `journalctl -p err -u linnixd` shows the errors. On a terminal or a pipe
the prefix is left out and the line reads as before.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

# syslog(3) priorities
LOG_ERR = 3
LOG_WARNING = 4
LOG_NOTICE = 5
LOG_INFO = 6


def stream_is_journal(stream: TextIO) -> bool:
    """True when `stream` is the journald stream systemd announced in JOURNAL_STREAM."""
    announced = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = announced.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def log(message: str, priority: int = LOG_INFO) -> None:
    """One line `linnixd: message` on stderr; `<priority>` first when stderr is journald's."""
    line = " ".join(str(message).splitlines())
    prefix = f"<{priority}>" if stream_is_journal(sys.stderr) else ""
    print(f"{prefix}linnixd: {line}", file=sys.stderr, flush=True)
