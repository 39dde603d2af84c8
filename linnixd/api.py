"""The daemon's operations, transport-free: what each does, which arguments it accepts, what it answers.

linnixd/bus.py binds these to D-Bus (decode the call, run the operation, encode the answer);
a refusal is an ApiError whose `kind` the transport maps to its own error (one table in bus.py).
The argument rules live here and nowhere else: `throttle_problem` is also what the Enforcer
and linnixctl check a throttle with.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from .constants import MAX_ACTION_S, MAX_CPU_PCT
from .historyreader import BadCursor, HistoryBusy, Page
from .model import Alert, Counters

if TYPE_CHECKING:
    from .enforcement import Caller, Enforcer

MAX_ALERTS = 10_000  # rows one RecentAlerts / IncidentHistory answer may hold
MAX_ROWS = 1_000  # rows one TopCgroups / StallTable answer may hold
_RULE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")
_INCIDENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")

# ApiError kinds
INVALID_ARGS = "invalid-args"
NO_SUCH_INCIDENT = "no-such-incident"
POLICY_INVALID = "policy-invalid"
FAILED = "failed"
BUSY = "busy"  # too many slow reads at once: refused now, try again


class ApiError(Exception):
    """An operation refused: `kind` (INVALID_ARGS, NO_SUCH_INCIDENT, POLICY_INVALID, FAILED), one line."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = " ".join(str(message).splitlines())


class DaemonCore(Protocol):
    """What the API needs from the daemon (linnixd.daemon.Daemon; tests use a double)."""

    version: str
    policy_path: str
    started_at: float

    @property
    def enforcement_enabled(self) -> bool: ...

    def counters(self) -> Counters: ...

    def status(self) -> dict[str, Any]: ...

    def recent_alerts(
        self, since: float = 0.0, rule: str = "", limit: int = 100
    ) -> list[Alert]: ...

    def open_incidents(self) -> list[Alert]: ...

    def top_cgroups(self, limit: int = 10) -> list[dict[str, Any]]: ...

    def stall_table(self, limit: int = 20) -> list[dict[str, Any]]: ...

    def reload_policy(self) -> str: ...

    def subscribe(
        self,
        *,
        alerts: Callable[[Alert], None] | None = None,
        actions: Callable[[str, Mapping[str, str]], None] | None = None,
    ) -> None: ...


# ---- argument rules ---------------------------------------------------------------------


def check_limit(value: int, most: int) -> int:
    if not 1 <= value <= most:
        raise ApiError(INVALID_ARGS, f"limit must be between 1 and {most}, got {value}")
    return value


def check_since(since: float) -> float:
    if not math.isfinite(since) or since < 0:
        raise ApiError(INVALID_ARGS, f"since must be an epoch time >= 0, got {since}")
    return since


def check_rule(rule: str) -> str:
    """A rule name filter ("" = any)."""
    if rule and not _RULE_NAME.match(rule):
        raise ApiError(INVALID_ARGS, f"rule must be a rule name like fork_storm, got {rule[:80]!r}")
    return rule


def check_incident(incident: str) -> str:
    if incident != "latest" and not _INCIDENT_ID.match(incident):
        raise ApiError(
            INVALID_ARGS,
            f"incident must be an incident id (letters, digits, - or _) or latest, got {incident[:80]!r}",
        )
    return incident


def _since_text(text: str) -> float:
    """A `since` given as text (Query's where), checked like check_since."""
    try:
        since = float(text)
    except ValueError:
        since = -1.0
    if not math.isfinite(since) or since < 0:
        raise ApiError(INVALID_ARGS, f"since must be an epoch time >= 0, got {text[:40]!r}")
    return since


def cpu_pct_problem(cpu_pct: float) -> str | None:
    """Why `cpu_pct` (percent of one CPU) is no CPU quota, or None."""
    if not (math.isfinite(cpu_pct) and 0 < cpu_pct <= MAX_CPU_PCT):
        return f"cpu_pct must be in (0, {MAX_CPU_PCT:g}] percent of one CPU, got {cpu_pct}"
    return None


def throttle_problem(cpu_pct: float, duration_s: float) -> str | None:
    """Why a throttle's arguments are refused, or None: the one place its bounds are checked."""
    why = cpu_pct_problem(cpu_pct)
    if why is None and not (math.isfinite(duration_s) and 0 < duration_s <= MAX_ACTION_S):
        why = f"duration_s must be in (0, {MAX_ACTION_S:g}], got {duration_s}"
    return why


# ---- the operations ---------------------------------------------------------------------


class Api:
    """Every operation linnixd offers, over a DaemonCore; no transport in here."""

    def __init__(self, core: DaemonCore) -> None:
        self.core = core

    # reads (any local user)

    def status(self) -> dict[str, Any]:
        """The daemon's state: version, policy, rules, counters, open incidents, component health."""
        return self.core.status()

    def recent_alerts(self, since: float, rule: str, limit: int) -> list[dict[str, Any]]:
        """Alerts from the history with ts >= since, of `rule` ("" = any), newest first."""
        alerts = self.core.recent_alerts(
            since=check_since(since), rule=check_rule(rule), limit=check_limit(limit, MAX_ALERTS)
        )
        return [a.to_dict() for a in alerts]

    async def recent_alerts_page(
        self, since: float, rule: str, limit: int, cursor: str = "", caller: str = ""
    ) -> Page:
        """recent_alerts off the tick loop (historyreader): a JSON array under a byte budget, paged.

        BUSY when too many history reads run already; without a reader (tests, no state
        directory) the query runs here, under the same row budget.
        """
        since, rule, limit = check_since(since), check_rule(rule), check_limit(limit, MAX_ALERTS)
        reader = getattr(self.core, "history_reader", None)
        if reader is None:
            if cursor:
                raise ApiError(
                    INVALID_ARGS, "this daemon has no paged history: cursor must be empty"
                )
            rows = self.recent_alerts(since, rule, limit)
            return Page(json.dumps(rows, sort_keys=True, default=str), len(rows), False, "")
        try:
            page: Page = await reader.recent(since, rule, limit, caller=caller, cursor=cursor)
        except HistoryBusy as exc:
            raise ApiError(BUSY, str(exc)) from None
        except BadCursor as exc:
            raise ApiError(INVALID_ARGS, str(exc)) from None
        except Exception as exc:  # the history file went away, the disk failed: one line
            raise ApiError(FAILED, f"alert history read failed: {exc}") from None
        return page

    def open_incidents(self) -> list[dict[str, Any]]:
        """The firing alerts of incidents not yet resolved."""
        return [a.to_dict() for a in self.core.open_incidents()]

    def explain(self, incident: str) -> dict[str, Any]:
        """What happened in an incident ("latest": the newest)."""
        incident = check_incident(incident)
        explain = getattr(self.core, "explain", None)
        if explain is None:
            raise ApiError(NO_SUCH_INCIDENT, "triage is not running in this daemon")
        try:
            return dict(explain(incident))
        except LookupError as exc:
            raise ApiError(NO_SUCH_INCIDENT, str(exc.args[0] if exc.args else exc)) from None

    def incident_history(self, since: float, limit: int) -> list[dict[str, Any]]:
        """Incidents opened at or after `since`, open and resolved, newest first."""
        history = getattr(self.core, "incident_history", None)
        since, limit = check_since(since), check_limit(limit, MAX_ALERTS)
        return [] if history is None else list(history(since=since, limit=limit))

    def top_cgroups(self, limit: int) -> list[dict[str, Any]]:
        """Cgroups by pressure, with their run-queue wait."""
        return self.core.top_cgroups(limit=check_limit(limit, MAX_ROWS))

    def stall_table(self, limit: int) -> list[dict[str, Any]]:
        """Who made whom wait for a CPU over noisy_neighbour's window."""
        return self.core.stall_table(limit=check_limit(limit, MAX_ROWS))

    def query(
        self, table: str, where: dict[str, str], sort: str, limit: int
    ) -> list[dict[str, Any]]:
        """Rows of cgroups, stalls or alerts whose owner passes `where` (namespace, pod, container,
        unit globs, rule; alerts also since), cgroups ordered by `sort`."""
        from .names import QueryError

        limit = check_limit(limit, MAX_ALERTS if table == "alerts" else MAX_ROWS)
        where = dict(where)
        core: Any = self.core  # the filtered forms are the Daemon's own (names.RowFilter)
        try:
            if table == "cgroups":
                return list(core.top_cgroups(limit=limit, where=where, sort=sort or "pressure"))
            if sort:
                raise QueryError(f"{table[:40]!r} rows have one order; sort must be empty")
            if table == "stalls":
                return list(core.stall_table(limit=limit, where=where))
            if table == "alerts":
                since = _since_text(where.pop("since", "0"))
                return [a.to_dict() for a in core.alerts(since=since, limit=limit, where=where)]
        except QueryError as exc:
            raise ApiError(INVALID_ARGS, str(exc)) from None
        raise ApiError(INVALID_ARGS, f"table must be cgroups, stalls or alerts, got {table[:40]!r}")

    def list_actions(self) -> list[dict[str, Any]]:
        """Actions applied and not yet reverted (the ledger)."""
        return list(self._enforcer().list_actions())

    def properties(self) -> dict[str, Any]:
        """The read-only properties: version, enforcement_enabled, policy_path, started_at,
        events, dropped_events, alerts, and dry_run when enforcement is available."""
        c = self.core.counters()
        out: dict[str, Any] = {
            "version": str(self.core.version),
            "enforcement_enabled": bool(self.core.enforcement_enabled),
            "policy_path": str(self.core.policy_path),
            "started_at": float(self.core.started_at),
            "events": int(c.events),
            "dropped_events": int(c.dropped_events),
            "alerts": int(c.alerts),
        }
        enforcer = self._maybe_enforcer()
        if enforcer is not None:
            out["dry_run"] = bool(enforcer.dry_run)
        return out

    def subscribe(
        self,
        *,
        alerts: Callable[[Alert], None] | None = None,
        actions: Callable[[str, Mapping[str, str]], None] | None = None,
    ) -> None:
        """Call `alerts` with every alert, `actions` with every ActionTaken/ActionReverted event."""
        self.core.subscribe(alerts=alerts, actions=actions)

    # changes (each behind its own polkit action in the transport)

    def reload(self) -> str:
        """Re-read the policy file; a bad file is refused and the running policy stays."""
        from .config import PolicyError

        try:
            return str(self.core.reload_policy())
        except PolicyError as exc:
            raise ApiError(POLICY_INVALID, "; ".join(exc.problems) or str(exc)) from None

    async def set_enforcement(self, enabled: bool, dry_run: bool, caller: Caller) -> str:
        """Enable enforcement (dry_run: only journal what it would do) or back to monitor-only."""
        return str(await self._enforcer().set_enabled(enabled, bool(dry_run), caller))

    async def throttle(self, unit: str, cpu_pct: float, duration_s: float, caller: Caller) -> str:
        """CPUQuota= on `unit` for `duration_s` (runtime only, reverted after), by hand."""
        from .enforcement import EnforcementError

        enforcer = self._enforcer()
        why = throttle_problem(cpu_pct, duration_s)
        if why is not None:
            raise ApiError(INVALID_ARGS, why)
        try:
            return str(await enforcer.throttle(unit, cpu_pct, duration_s, caller))
        except EnforcementError as exc:
            raise ApiError(INVALID_ARGS, str(exc)) from None

    async def unthrottle(self, unit: str) -> str:
        """Restore a unit's CPUQuota= from before linnixd throttled it."""
        from .enforcement import EnforcementError

        try:
            return str(await self._enforcer().unthrottle(unit))
        except EnforcementError as exc:
            raise ApiError(INVALID_ARGS, str(exc)) from None

    def _maybe_enforcer(self) -> Enforcer | None:
        enforcer: Enforcer | None = getattr(self.core, "enforcer", None)
        return enforcer

    def _enforcer(self) -> Enforcer:
        enforcer = self._maybe_enforcer()
        if enforcer is None:
            raise ApiError(
                FAILED, "enforcement is unavailable: the daemon runs without a state directory"
            )
        return enforcer
