"""Who enforcement never touches (protected units) and how often it may act (rate limit)."""

from __future__ import annotations

import collections
import fnmatch
import re
import time
from collections.abc import Callable

BUILTIN_PROTECTED = (
    "init.scope",
    "-.slice",
    "system.slice",
    "user.slice",
    "linnixd.service",
    "dbus.service",
    "dbus-broker.service",
    "systemd-*",
    "polkit.service",
    "ssh.service",
    "sshd.service",
)
_UNIT_NAME = re.compile(r"[A-Za-z0-9:_.\\@-]{1,250}\.(service|scope|slice|socket|mount|swap)\Z")


def refusal(unit: str | None, extra_protected: tuple[str, ...] = ()) -> str | None:
    """Why `unit` must never be acted on, or None when it may be."""
    if not unit:
        return "the culprit has no systemd unit"
    if not _UNIT_NAME.match(unit):
        return f"{unit[:80]!r} is not a unit name linnixd acts on"
    for pattern in BUILTIN_PROTECTED + tuple(extra_protected):
        if fnmatch.fnmatchcase(unit, pattern):
            return f"{unit} is protected ({pattern})"
    return None


class RateLimiter:
    """At most `per_min` actions in any 60 s (monotonic clock)."""

    def __init__(self, per_min: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_min = per_min
        self.clock = clock
        self.stamps: collections.deque[float] = collections.deque()

    def allow(self) -> bool:
        now = self.clock()
        while self.stamps and now - self.stamps[0] >= 60.0:
            self.stamps.popleft()
        if len(self.stamps) >= self.per_min:
            return False
        self.stamps.append(now)
        return True
