"""Who hears the daemon's alerts and enforcement actions: one typed place to subscribe, one fan-out.

The enforcer, triage and the D-Bus service subscribe here (compose.py and Api.subscribe); a
listener that raises is counted and reported once, and the others still hear the event.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from .daemonlog import LOG_ERR, log
from .model import Alert

AlertListener = Callable[[Alert], None]
# ActionTaken / ActionReverted with {unit, action, before, after, rule, incident}
ActionListener = Callable[[str, Mapping[str, str]], None]


class Subscriptions:
    """The alert and action listeners, called in subscription order."""

    def __init__(self) -> None:
        self._alerts: list[AlertListener] = []
        self._actions: list[ActionListener] = []
        self.failures = 0  # listener calls that raised
        self._reported: set[str] = set()

    def subscribe(
        self, *, alerts: AlertListener | None = None, actions: ActionListener | None = None
    ) -> None:
        """Call `alerts` with every alert and `actions` with every enforcement action event."""
        if alerts is not None:
            self._alerts.append(alerts)
        if actions is not None:
            self._actions.append(actions)

    def alert(self, alert: Alert) -> None:
        for fn in self._alerts:
            self._call(fn, "alert", alert)

    def action(self, name: str, event: Mapping[str, str]) -> None:
        for fn in self._actions:
            self._call(fn, "action", name, event)

    def _call(self, fn: Callable[..., None], what: str, *args: object) -> None:
        try:
            fn(*args)
        except Exception as exc:
            self.failures += 1
            key = f"{what} {fn!r}"
            if key not in self._reported:  # once per listener: a broken one must not flood the log
                self._reported.add(key)
                log(f"{what} listener failed: {exc!r}", LOG_ERR)
