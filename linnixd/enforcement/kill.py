"""Killing one process by pidfd, only if it is still the process the alert named."""

from __future__ import annotations

import os
import signal as signals

from .base import EnforcementError, UnitGone

CLK_TCK = os.sysconf("SC_CLK_TCK")


def start_ticks(pid: int) -> int:
    """Field 22 of /proc/PID/stat: the process start time in clock ticks since boot."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def kill_process(pid: int, start_time: float, sig: int) -> None:
    """Signal one process through a pidfd, only if it is still the one that started at start_time.

    The pidfd pins the process, so the start time read after opening it proves the fd holds
    the culprit and not a newcomer that reused its pid.
    """
    if pid <= 1 or pid == os.getpid():
        raise EnforcementError(f"refusing to signal pid {pid}")
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise UnitGone(f"process {pid} is gone") from None
    try:
        try:
            ticks = start_ticks(pid)
        except (OSError, ValueError, IndexError):
            raise UnitGone(f"process {pid} is gone") from None
        if abs(ticks - start_time * CLK_TCK) >= 1.0:
            raise EnforcementError(
                f"pid {pid} now belongs to another process (start time {ticks / CLK_TCK:.2f} s, culprit's {start_time:.2f} s)"
            )
        try:
            signals.pidfd_send_signal(fd, sig)
        except ProcessLookupError:
            raise UnitGone(f"process {pid} is gone") from None
        except PermissionError:
            raise EnforcementError(
                f"not permitted to signal pid {pid}: another user's process needs CAP_KILL, which the packaged "
                "unit does not grant (see linnixd(8), ENFORCEMENT)"
            ) from None
    finally:
        os.close(fd)
