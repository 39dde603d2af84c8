"""sd_notify for the daemon: READY, RELOADING, STOPPING, WATCHDOG and STATUS through sdnotify."""

from __future__ import annotations

import os
import time

import sdnotify

from .health import Health


class Notifier:
    """Tells the service manager about the daemon's state; does nothing without NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self._notifier: sdnotify.SystemdNotifier | None = None
        self.failures = 0  # notifications the socket refused (counted, never raised)
        if os.environ.get("NOTIFY_SOCKET"):
            try:
                # debug=True makes sdnotify raise instead of swallowing, so failures get counted
                self._notifier = sdnotify.SystemdNotifier(debug=True)
            except OSError:
                self.failures += 1

    def health(self) -> Health:
        return Health(counters={"failures": self.failures})

    @property
    def enabled(self) -> bool:
        return self._notifier is not None

    def _send(self, state: str) -> None:
        if self._notifier is not None:
            try:
                self._notifier.notify(state)
            except OSError:
                self.failures += 1

    def ready(self) -> None:
        self._send("READY=1")

    def status(self, text: str) -> None:
        # one line: STATUS ends at the first newline
        self._send("STATUS=" + " ".join(text.splitlines()))

    def progress(self, text: str, step_s: float) -> None:
        """STATUS for a start-up step that may take a while, and step_s more for it to finish.

        EXTEND_TIMEOUT_USEC (systemd >= 236) moves the start deadline to step_s from now, so a
        slow but progressing start (BPF compiles under emulation or load) is not killed by
        TimeoutStartSec, while a start stuck in one step still is.
        """
        line = " ".join(text.splitlines())
        self._send(f"STATUS={line}\nEXTEND_TIMEOUT_USEC={int(step_s * 1_000_000)}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match the reload to its READY=1
        self._send(
            f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        )

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")
