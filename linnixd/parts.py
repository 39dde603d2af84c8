"""What the daemon core needs from each part it is handed (compose.py builds the real ones).

Protocols, so a test can hand in its own part; each lists only what linnixd/daemon.py uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from .health import Health
from .model import Alert, LifecycleTick, Snapshot


class LifecycleSource(Protocol):
    """bpf/lifecycle.c (collector/lifecycle.py LifecycleCollector)."""

    @property
    def transport(self) -> str | None: ...

    def read(self) -> LifecycleTick: ...

    def set_short_lived(self, seconds: float) -> None: ...

    def health(self) -> Health: ...

    def close(self) -> None: ...


class History(Protocol):
    """The alert history (history.py AlertHistory)."""

    max_age_days: int
    max_count: int

    def store(self, alert: Alert) -> None: ...

    def recent(self, since: float = 0.0, rule: str = "", limit: int = 100) -> list[Alert]: ...

    def incidents(self, since: float = 0.0, limit: int = 100) -> list[dict[str, Any]]: ...

    def prune(self) -> int: ...

    def health(self) -> Health: ...


class Triage(Protocol):
    """A snapshot per incident (triage.py Triage)."""

    def observe(self, snap: Snapshot, only: str | None = None) -> None: ...

    def on_alert(self, alert: Alert, window: Sequence[Snapshot]) -> None: ...

    def on_action(self, signal: str, event: Mapping[str, str]) -> None: ...

    def latest(self) -> str | None: ...

    def lookup(
        self, incident: str
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None] | None: ...

    def health(self) -> Health: ...

    def close(self) -> None: ...


class Sink(Protocol):
    """An alert sink behind a bounded queue (sinks.QueuedSink)."""

    name: str
    drops: int

    def put(self, alert: Alert) -> None: ...

    def health(self) -> Health: ...

    def close(self, timeout: float = 2.0) -> None: ...


class Notifier(Protocol):
    """sd_notify (notify.py Notifier)."""

    @property
    def enabled(self) -> bool: ...  # a service manager listens (NOTIFY_SOCKET)

    def ready(self) -> None: ...

    def reloading(self) -> None: ...

    def status(self, text: str) -> None: ...

    def progress(self, text: str, step_s: float) -> None: ...

    def watchdog(self) -> None: ...

    def stopping(self) -> None: ...

    def health(self) -> Health: ...


class StateInfo(Protocol):
    """The checked state directory (statedir.py StateDir)."""

    def status(self) -> dict[str, Any]: ...


__all__ = ["History", "LifecycleSource", "Notifier", "Sink", "StateInfo", "Triage"]
