"""The Enforcer: turns alerts and commands into guarded, ledgered, reverted actions on systemd units."""

from __future__ import annotations

import asyncio
import os
import signal as signals
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..api import throttle_problem
from ..constants import ACTION_LEDGER, ENFORCEMENT_STATE
from ..daemonlog import LOG_ERR, LOG_NOTICE, LOG_WARNING, log
from ..health import Health
from ..model import Alert
from ..sinks.journal import EventWriter
from ..statedir import StateDir, StateError
from .base import UINT64_MAX, Caller, EnforcementError, UnitGone, Units
from .guard import RateLimiter, refusal
from .kill import kill_process
from .ledger import PROPERTY, ActionRecord, record_problem, show

USEC_PER_PCT = 10_000  # CPUQuotaPerSecUSec per percent of one CPU (100 % = 1 s per s)
RETRY_S = 30.0  # a revert that failed is tried again this much later
# An incident whose culprit is under an action usually resolves *because* of the action: a unit
# throttled to 20% no longer spikes. The action is therefore kept (until its duration is over)
# while the unit still presses against it: CPU use at or above HOLD_SHARE of the quota, memory
# at or above HOLD_SHARE of MemoryHigh. A frozen unit shows nothing, so a freeze is always kept.
HOLD_SHARE = 0.5
USAGE_WINDOW_S = 1.0  # CPU use is measured over this long (CPUUsageNSec read twice)
MANUAL_RULE = "manual"

ActionListener = Callable[[str, dict[str, str]], None]  # ("ActionTaken" | "ActionReverted", event)


@dataclass
class EnforcementCounters:
    applied: int = 0
    reverted: int = 0
    refused: int = 0  # guard refusals (protected unit, no unit, already acted on)
    rate_limited: int = 0
    failed: int = 0  # systemd (or the kernel) refused; nothing applied
    revert_failures: int = 0
    dry_run: int = 0  # actions only journaled
    dropped_records: int = 0  # ledger entries dropped because the unit was gone at revert
    kept: int = 0  # incident resolutions that did not revert because the unit still presses against the action
    revert_refused: int = 0  # reverts the guard refused (protected unit): the record is dropped
    ledger_rejected: int = 0  # ledger entries read back that no action of ours could have written
    state_rejected: int = 0  # enforcement.json refused: enforcement starts disabled


@dataclass
class _State:
    enabled: bool = False
    dry_run: bool = False
    changed_at: float = 0.0
    by: dict[str, Any] = field(default_factory=dict)


class Enforcer:
    """Applies, records and reverts actions; the daemon feeds it alerts, the bus its commands."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str] | StateDir,
        units: Units,
        policy: Callable[[], Any],
        *,
        journal: EventWriter | None = None,
        start_time_of: Callable[[int], float | None] = lambda pid: None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        usage_window_s: float = USAGE_WINDOW_S,
    ) -> None:
        self.state_dir = state_dir if isinstance(state_dir, StateDir) else StateDir(state_dir)
        self.units = units
        self.policy = policy
        self.journal: EventWriter = journal or (
            lambda kind, message, fields: log(message, LOG_NOTICE)
        )
        self.start_time_of = start_time_of
        self.clock = clock
        self.monotonic = monotonic
        self.usage_window_s = usage_window_s
        self.counters = EnforcementCounters()
        self.listeners: list[ActionListener] = []
        self.limiter = RateLimiter(policy().enforcement.max_actions_per_min, monotonic)
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.state = self._load_state()
        self.records: list[ActionRecord] = self._load_ledger()

    # ---- state ------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.state.enabled

    @property
    def dry_run(self) -> bool:
        return self.state.dry_run

    def _load_state(self) -> _State:
        """enforcement.json as this daemon wrote it (0600, ours, a caller on record), else disabled."""
        try:
            raw = self.state_dir.read_json(ENFORCEMENT_STATE, private=True)
        except StateError:  # a link, not ours, not 0600, ...: logged by the state directory
            self.counters.state_rejected += 1
            return _State()
        if raw is None:
            return _State()
        why = _state_problem(raw)
        if why is not None:
            self.counters.state_rejected += 1
            self.state_dir.refuse(ENFORCEMENT_STATE, f"{why}; enforcement starts disabled")
            return _State()
        return _State(
            enabled=raw["enabled"],
            dry_run=raw["dry_run"] and raw["enabled"],
            changed_at=float(raw["changed_at"]),
            by=dict(raw["by"]),
        )

    def _load_ledger(self) -> list[ActionRecord]:
        """actions.json: only entries an action of ours could have written, on units we may touch."""
        try:
            raw = self.state_dir.read_json(ACTION_LEDGER)
        except StateError:
            self.counters.ledger_rejected += 1
            return []
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.counters.ledger_rejected += 1
            self.state_dir.refuse(ACTION_LEDGER, "not a list of action records; nothing reverted")
            return []
        records = []
        protected = self.policy().enforcement.protected_units
        for n, entry in enumerate(raw):
            why = record_problem(entry)
            if why is None:
                why = refusal(entry["unit"], protected)
            if why is not None:
                self.counters.ledger_rejected += 1
                self.state_dir.refuse(ACTION_LEDGER, f"entry {n} dropped, never reverted: {why}")
                continue
            records.append(ActionRecord(**entry))
        return records

    def _save_ledger(self) -> None:
        self.state_dir.write_json(ACTION_LEDGER, [asdict(r) for r in self.records])

    async def set_enabled(self, enabled: bool, dry_run: bool, caller: Caller) -> str:
        """Enable (optionally dry-run) or disable; persisted, journaled with who asked."""
        async with self._lock:
            self.state = _State(
                enabled=enabled,
                dry_run=dry_run and enabled,
                changed_at=self.clock(),
                by=asdict(caller),
            )
            self.state_dir.write_json(ENFORCEMENT_STATE, asdict(self.state))
            mode = (
                (
                    "enabled (dry run: actions are only journaled)"
                    if self.state.dry_run
                    else "enabled"
                )
                if enabled
                else "disabled"
            )
            self.journal(
                "enforcement_changed",
                f"enforcement {mode} by {caller.label()}",
                {
                    "LINNIX_ENFORCEMENT": "enabled" if enabled else "disabled",
                    "LINNIX_DRY_RUN": "1" if self.state.dry_run else "0",
                    "LINNIX_CALLER_UID": str(caller.uid),
                    "LINNIX_CALLER_PID": str(caller.pid),
                    "LINNIX_CALLER_BUS_NAME": caller.bus_name,
                },
            )
        if not enabled:
            automatic = [r for r in self.records if r.rule != MANUAL_RULE]
            for record in automatic:
                await self.revert(record, "enforcement disabled")
        return f"enforcement {mode}"

    def health(self) -> Health:
        return Health(
            counters=asdict(self.counters),
            gauges={
                "enabled": int(self.enabled),
                "dry_run_mode": int(self.dry_run),
                "active_actions": len(self.records),
            },
        )

    def list_actions(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.records]

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "dry_run": self.dry_run,
            "changed_at": self.state.changed_at,
            "changed_by": self.state.by,
            "active_actions": len(self.records),
            "counters": asdict(self.counters),
        }

    # ---- alerts -----------------------------------------------------------------------

    def on_alert(self, alert: Alert) -> None:
        """Daemon alert listener: schedules handle() on the running loop."""
        if alert.state == "resolved" and not any(
            r.incident == alert.incident for r in self.records
        ):
            return
        if alert.state == "firing" and (
            not self.enabled or self.policy().action_for(alert.rule) is None
        ):
            return  # monitor only: the default
        task = asyncio.ensure_future(self.handle(alert))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def handle(self, alert: Alert) -> ActionRecord | None:
        """Act on a firing alert (when enabled and configured), revert on its resolution."""
        if alert.state == "resolved":
            for record in [r for r in self.records if r.incident == alert.incident]:
                held = await self._held_by_action(record)
                if held:
                    self.counters.kept += 1
                    log(
                        f"incident {alert.incident} resolved but {record.action} on {record.unit} is kept until its duration is over: {held}"
                    )
                else:
                    await self.revert(record, "incident resolved")
            return None
        if not self.enabled:
            return None
        action = self.policy().action_for(alert.rule)
        if action is None:
            return None
        c = alert.culprit
        what = f"{action.type} for {alert.rule} incident {alert.incident} on {c.label()}"
        why = refusal(c.unit, self.policy().enforcement.protected_units)
        if why is None and action.type == "kill" and c.pid is None:
            why = "the culprit is not one process"
        if why is not None:
            self.counters.refused += 1
            log(f"not acting ({what}): {why}", LOG_NOTICE)
            return None
        self.limiter.per_min = self.policy().enforcement.max_actions_per_min
        if not self.limiter.allow():
            self.counters.rate_limited += 1
            log(
                f"not acting ({what}): rate limit of {self.limiter.per_min} actions per minute reached",
                LOG_WARNING,
            )
            return None
        if action.type == "kill":
            await self._kill(alert, action.signal)
            return None
        after = (
            int(action.cpu_pct * USEC_PER_PCT)
            if action.type == "throttle_cpu"
            else (
                int(action.memory_high_mb * 1024 * 1024)
                if action.type == "limit_memory"
                else "frozen"
            )
        )
        return await self.apply(
            str(c.unit),
            action.type,
            after,
            alert.rule,
            alert.incident,
            action.duration_s,
            dry_run=self.dry_run,
        )

    async def _kill(self, alert: Alert, sig_name: str) -> None:
        c = alert.culprit
        assert c.pid is not None
        sig = signals.SIGKILL if sig_name == "KILL" else signals.SIGTERM
        start = self.start_time_of(c.pid)
        event = {
            "unit": str(c.unit),
            "action": "kill",
            "before": f"pid {c.pid}",
            "after": f"SIG{sig_name}",
            "rule": alert.rule,
            "incident": alert.incident,
        }
        if start is None:
            self.counters.refused += 1
            log(
                f"not killing {c.label()}: its start time is unknown, so a reused pid cannot be ruled out",
                LOG_NOTICE,
            )
            return
        if self.dry_run:
            self.counters.dry_run += 1
            self.journal(
                "action_taken",
                f"dry run: would send SIG{sig_name} to {c.label()} (rule {alert.rule}, incident {alert.incident})",
                _fields(event, dry_run=True),
            )
            return
        try:
            kill_process(c.pid, start, sig)
        except EnforcementError as exc:
            self.counters.failed += 1
            log(f"not killing {c.label()}: {exc}", LOG_WARNING)
            return
        self.counters.applied += 1
        self.journal(
            "action_taken",
            f"action taken: SIG{sig_name} sent to {c.label()} (rule {alert.rule}, incident {alert.incident})",
            _fields(event),
        )
        self._signal("ActionTaken", event)

    # ---- apply and revert -------------------------------------------------------------

    async def apply(
        self,
        unit: str,
        action: str,
        after: Any,
        rule: str,
        incident: str,
        duration_s: float,
        *,
        dry_run: bool = False,
    ) -> ActionRecord | None:
        """Read the unit's current value, record it, change it through systemd. None if not applied."""
        prop = PROPERTY[action]
        async with self._lock:
            if any(r.unit == unit and r.prop == prop for r in self.records):
                self.counters.refused += 1
                log(
                    f"not acting ({action} on {unit}): an earlier {action} on it is still active",
                    LOG_NOTICE,
                )
                return None
            try:
                before = await self.units.get_property(unit, prop)
            except EnforcementError as exc:
                self.counters.failed += 1
                log(f"not acting ({action} on {unit}): {exc}", LOG_WARNING)
                return None
            if action == "freeze" and before != "running":
                self.counters.refused += 1
                log(
                    f"not freezing {unit}: its freezer state is {before!r}, not 'running'",
                    LOG_NOTICE,
                )
                return None
            now = self.clock()
            record = ActionRecord(
                id=uuid.uuid4().hex,
                unit=unit,
                action=action,
                prop=prop,
                before=before,
                after=after,
                rule=rule,
                incident=incident,
                applied_at=now,
                expires_at=now + duration_s,
            )
            if dry_run:
                self.counters.dry_run += 1
                self.journal(
                    "action_taken",
                    f"dry run: would {action} {unit}: {prop} {show(before)} -> {show(after)} for {duration_s:g} s (rule {rule}, incident {incident})",
                    _fields(record.event(), dry_run=True),
                )
                return None
            self.records.append(record)
            self._save_ledger()  # write-ahead: a crash from here on is reverted at the next start
            try:
                if action == "freeze":
                    await self.units.freeze(unit)
                else:
                    await self.units.set_property(unit, prop, int(after))
            except EnforcementError as exc:
                self.records.remove(record)
                self._save_ledger()
                self.counters.failed += 1
                log(f"not acting ({action} on {unit}): {exc}", LOG_WARNING)
                return None
            record.state = "applied"
            self._save_ledger()
            self.counters.applied += 1
        self.journal(
            "action_taken",
            f"action taken: {action} {unit}: {prop} {show(before)} -> {show(after)}, reverted in {duration_s:g} s or when incident {incident or '-'} resolves (rule {rule})",
            _fields(record.event()),
        )
        self._signal("ActionTaken", record.event())
        return record

    async def _held_by_action(self, record: ActionRecord) -> str:
        """Why the resolution is the action's own doing (keep it), or "" when the condition cleared."""
        if record.action == "freeze":
            return "a frozen unit cannot show whether it would misbehave again"
        try:
            if record.action == "throttle_cpu":
                t0, used0 = (
                    self.monotonic(),
                    await self.units.get_property(record.unit, "CPUUsageNSec"),
                )
                await asyncio.sleep(self.usage_window_s)
                t1, used1 = (
                    self.monotonic(),
                    await self.units.get_property(record.unit, "CPUUsageNSec"),
                )
                if UINT64_MAX in (used0, used1) or t1 <= t0:
                    return ""  # no CPU accounting for the unit: take the resolution as it is
                pct, cap = (used1 - used0) / 1e9 / (t1 - t0) * 100, int(record.after) / USEC_PER_PCT
                return (
                    f"it uses {pct:.0f}% of one CPU under its {cap:g}% quota"
                    if pct >= HOLD_SHARE * cap
                    else ""
                )
            if record.action == "limit_memory":
                current = await self.units.get_property(record.unit, "MemoryCurrent")
                high = int(record.after)
                return (
                    f"it uses {current >> 20} MB under its {high >> 20} MB MemoryHigh"
                    if current != UINT64_MAX and current >= HOLD_SHARE * high
                    else ""
                )
        except EnforcementError:
            return ""  # gone or unreadable: the revert says what happened
        return ""

    async def revert(self, record: ActionRecord, reason: str) -> bool:
        """Restore the recorded before value; a failure keeps the record and retries later."""
        async with self._lock:
            if record not in self.records:
                return True
            why = refusal(record.unit, self.policy().enforcement.protected_units)
            if why is not None:  # the same guard as an action: a protected unit is never touched
                self.counters.revert_refused += 1
                self.records.remove(record)
                self._save_ledger()
                log(
                    f"not reverting {record.action} on {record.unit[:80]} ({reason}): {why}",
                    LOG_WARNING,
                )
                return True
            try:
                if record.action == "freeze":
                    await self.units.thaw(record.unit)
                else:
                    await self.units.set_property(record.unit, record.prop, int(record.before))
            except UnitGone as exc:
                self.counters.dropped_records += 1
                log(f"{record.action} on {record.unit} needs no revert: {exc}")
            except EnforcementError as exc:
                record.revert_failures += 1
                record.retry_at = self.clock() + RETRY_S
                self.counters.revert_failures += 1
                self._save_ledger()
                log(
                    f"revert of {record.action} on {record.unit} failed ({reason}), retrying in {RETRY_S:g} s: {exc}",
                    LOG_WARNING,
                )
                return False
            else:
                self.counters.reverted += 1
            self.records.remove(record)
            self._save_ledger()
        self.journal(
            "action_reverted",
            f"action reverted ({reason}): {record.action} {record.unit}: {record.prop} back to {show(record.before)} (rule {record.rule})",
            _fields(record.event(), reason=reason),
        )
        self._signal("ActionReverted", record.event())
        return True

    async def revert_due(self) -> int:
        """Revert every action whose duration is over (or whose failed revert is due again)."""
        now = self.clock()
        done = 0
        for record in [r for r in self.records if r.expires_at <= now and r.retry_at <= now]:
            done += await self.revert(record, "duration over")
        return done

    async def recover(self) -> int:
        """At start: revert what a previous run left applied (or half-applied) in the ledger."""
        left = list(self.records)
        if left:
            log(f"{len(left)} action(s) left behind by a previous run: reverting them", LOG_NOTICE)
        done = 0
        for record in left:
            done += await self.revert(record, "left behind by a previous run")
        return done

    async def run(self, interval_s: float = 1.0) -> None:
        """Recover, then revert due actions every interval until cancelled."""
        await self.recover()
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.revert_due()
            except Exception as exc:  # a broken pass must not end the reverts
                log(f"enforcement revert pass failed: {exc!r}", LOG_ERR)

    # ---- manual -------------------------------------------------------------------------

    async def throttle(self, unit: str, cpu_pct: float, duration_s: float, caller: Caller) -> str:
        """Manual CPUQuota= (linnixctl throttle); guarded, ledgered and reverted like the rest."""
        why = throttle_problem(cpu_pct, duration_s) or refusal(
            unit, self.policy().enforcement.protected_units
        )
        if why is not None:
            raise EnforcementError(why)
        record = await self.apply(
            unit,
            "throttle_cpu",
            int(cpu_pct * USEC_PER_PCT),
            MANUAL_RULE,
            f"manual:{caller.label()}",
            duration_s,
        )
        if record is None:
            raise EnforcementError(f"{unit} was not throttled (see the daemon log)")
        return f"{unit} throttled to {cpu_pct:g}% of one CPU for {duration_s:g} s (was {show(record.before)} CPUQuotaPerSecUSec)"

    async def unthrottle(self, unit: str) -> str:
        records = [r for r in self.records if r.unit == unit and r.action == "throttle_cpu"]
        if not records:
            raise EnforcementError(f"no active throttle on {unit[:80]}")
        for record in records:
            if not await self.revert(record, "unthrottled by hand"):
                raise EnforcementError(f"restoring {unit} failed; retrying in {RETRY_S:g} s")
        return f"{unit} unthrottled: CPUQuotaPerSecUSec back to {show(records[0].before)}"

    def _signal(self, name: str, event: dict[str, str]) -> None:
        for listener in self.listeners:
            try:
                listener(name, event)
            except Exception as exc:
                log(f"action listener failed: {exc!r}", LOG_ERR)


def _fields(event: dict[str, str], *, dry_run: bool = False, reason: str = "") -> dict[str, str]:
    fields = {f"LINNIX_ACTION_{k.upper()}": v for k, v in event.items()}
    fields["LINNIX_DRY_RUN"] = "1" if dry_run else "0"
    if reason:
        fields["LINNIX_REVERT_REASON"] = reason
    return fields


def _state_problem(raw: Any) -> str | None:
    """Why enforcement.json is not a state this daemon wrote after a polkit-authorised call."""
    if not isinstance(raw, dict) or set(raw) != {"enabled", "dry_run", "changed_at", "by"}:
        return "not an enforcement state record"
    if type(raw["enabled"]) is not bool or type(raw["dry_run"]) is not bool:
        return "enabled and dry_run must be true or false"
    if type(raw["changed_at"]) not in (int, float) or not raw["changed_at"] > 0:
        return "changed_at is not a time"
    by = raw["by"]
    if not isinstance(by, dict) or not (
        set(by) == {"uid", "pid", "bus_name"}
        and all(by[k] is None or (type(by[k]) is int and by[k] >= 0) for k in ("uid", "pid"))
        and isinstance(by["bus_name"], str)
        and by["bus_name"].startswith(":")
    ):
        return "no authorised caller on record (by: uid, pid, bus_name)"
    return None
