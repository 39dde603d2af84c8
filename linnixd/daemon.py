"""The linnixd daemon: one asyncio loop ticking collectors -> host model -> detectors -> alerts -> sinks."""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from . import __version__, views
from .collector.attach import Attachments, NetSource, SchedSource, TriggerSource
from .constants import (
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_SOFTWARE,
    EXIT_UNAVAILABLE,
    HISTORY_DB,
    KTHREADD_PID,
    PRESSURE_GATE_PCT,
    STATE_DIR,
)
from .daemonlog import LOG_ERR, LOG_NOTICE, LOG_WARNING, log
from .detectors.stall import PRESSURE_FLOOR_PCT, NoisyNeighbour
from .health import Health, Reporter, collect
from .metrics import StallTotals, TickHistogram
from .model import (
    Alert,
    Counters,
    LifecycleCounts,
    LifecycleTick,
    NetTick,
    Snapshot,
    StallSnapshot,
)
from .names import QueryError, alert_matches
from .parts import History, LifecycleSource, Notifier, Sink, StateInfo, Triage
from .registry import RULES
from .subscriptions import ActionListener, AlertListener, Subscriptions

if TYPE_CHECKING:
    from .compose import Assembly, Service
    from .config import Policy
    from .enforcement import Enforcer
    from .hostmodel import HostModel
    from .names import AlertNamer


class CurrentPolicy:
    """The policy in force: the daemon swaps it on reload; the enforcer reads it at each action."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def get(self) -> Policy:
        return self.policy


# Query(cgroups) sort orders (linnixctl top's): the row field each sorts on (None: the model's pressure order).
TOP_SORTS: dict[str, str | None] = {
    "pressure": None,
    "caused": "stall_caused_ms",
    "suffered": "stall_suffered_ms",
    "cpu": "cpu_pct",
    "memory": "memory_bytes",
    "connections": "connects_per_s",
    "retransmits": "retransmits_per_s",
}
HISTORY_SCAN = 10_000  # alerts read from the history at most to answer one filtered query
# A calm tick (daemon.calm_tick_s apart): in the last tick the processes together used less
# than CALM_CPU_PCT of one CPU and the host less than CALM_CPU_PCT of its CPUs, kernel threads
# left out of both (kswapd, kdamond, kworkers: housekeeping that shows as pressure when it
# matters, and a CPU rule still sees them at calm_tick_s), nothing was
# created, exec'd or exited, no connection opened or segment was retransmitted, system
# pressure stayed under the gate, MemAvailable fell slower than CALM_MEM_FALL_BPS and no
# incident is open. The kernel counts on in between, so a calm tick loses nothing.
CALM_CPU_PCT = 5.0
CALM_MEM_FALL_BPS = 4 * 1024 * 1024


def window_length(policy: Policy) -> int:
    """Snapshots the detectors need: the longest enabled window or sustain, in ticks, plus slack."""
    tick = policy.daemon.tick_s
    longest = max([2.0, *(policy.rule(name).lookback_s() for name in policy.enabled_rules())])
    return math.ceil(longest / tick) + 3


class Daemon:
    """The daemon core: owns the tick and the pipeline; the bus and CLI adapt it, never the reverse."""

    def __init__(
        self,
        policy_path: str,
        policy: Policy,
        *,
        current: CurrentPolicy | None = None,
        lifecycle: LifecycleSource | None = None,
        attachments: Attachments | None = None,
        model: HostModel | None = None,
        history: History | None = None,
        events: Callable[[str, str, Mapping[str, str]], None] | None = None,
        triage: Triage | None = None,
        namer: AlertNamer | None = None,
        enforcer: Enforcer | None = None,
        sinks: Sequence[Sink] = (),
        notifier: Notifier | None = None,
        state: StateInfo | None = None,
        state_problem: str = "",
        history_problem: str = "",
    ) -> None:
        """Every part is handed in (compose.build makes them); None where it is not in use."""
        from .incidents import IncidentTracker

        self.version = __version__
        self.policy_path = policy_path
        # the policy in force: shared with the enforcer, which reads it at each action
        self.current = current or CurrentPolicy(policy)
        self.current.policy = policy
        self.started_at = time.time()
        self.enforcer = enforcer  # enforcement, when there is a state directory
        self.triage = triage  # a snapshot per incident, for explain()
        self.lifecycle = lifecycle
        # bpf/sched.c and PSI triggers, attached while an enabled rule needs them
        self.attachments = attachments or Attachments(make_sched=None, make_triggers=None)
        self.collectors_changed: list[Callable[[], None]] = []  # called after a reload's sync
        self.model = model
        self.history = history
        # daemon_started / policy_reloaded entries (journald with MESSAGE_ID, else a log line)
        self.events = events or (lambda _kind, message, _fields: log(message))
        self.namer = namer  # pod, namespace, container on alerts and rows
        # own instances: a detector may keep state across ticks (memory_leak's slow series)
        self.detectors = {rule.name: type(rule.detector)() for rule in RULES}
        self.tracker = IncidentTracker(resolve_after_s=max(2.0, 4 * policy.daemon.tick_s))
        self.window: collections.deque[Snapshot] = collections.deque(maxlen=window_length(policy))
        self.sinks: list[Sink] = list(sinks)
        self.notifier = notifier  # sd_notify: reloads say RELOADING=1
        self.subscriptions = Subscriptions()  # who hears alerts and actions (subscribe())
        if enforcer is not None:
            enforcer.listeners.append(self.subscriptions.action)
        self.totals = LifecycleCounts()
        self.alert_count = 0
        self.ticks = 0
        self.detector_errors = 0
        self.tick_errors = 0
        self.own_pid = os.getpid()
        self.own_unit_cgroup = _own_unit_cgroup()
        self.self_findings_dropped = 0  # findings that named the daemon itself (dropped)
        self.calm_ticks = 0  # ticks that came calm_tick_s after the previous one
        self._cpu_pressure_seen: float | None = None  # last tick with CPU pressure (monotonic s)
        self.last_tick_mono = time.monotonic()
        self.last_tick_cost_s = 0.0
        self.longest_tick_gap_s = 0.0  # end to end, since start (a blocked loop shows here)
        self.baseline_tick_s = 0.0  # the first tick: every process sampled once (not in tick_costs)
        self.tick_costs: collections.deque[float] = collections.deque(
            maxlen=1200
        )  # seconds, newest last
        self.state = state  # the state directory, when one is in use
        self.state_problem = state_problem  # why the state directory was refused
        self.history_problem = history_problem  # why the alert history is unavailable
        self.history_write_failures = 0
        self.history_reader: Any = None  # historyreader.HistoryReader: history reads off the loop
        self._history_failing = False
        self.alerts_fired: collections.Counter[tuple[str, str]] = collections.Counter()
        self.tick_histogram = TickHistogram()
        self.stall_totals = StallTotals(policy.daemon.metrics_top_k)
        self.health_sources: dict[str, Reporter | None] = {}  # parts wired in from outside
        self._reported_errors: set[str] = set()

    @property
    def sched(self) -> SchedSource | None:
        return self.attachments.sched

    @property
    def net(self) -> NetSource | None:
        return self.attachments.net

    @property
    def psi_mode(self) -> str:
        return self.attachments.psi_mode

    # ---- the pipeline -------------------------------------------------------------------

    def tick(self) -> Snapshot:
        """Read every collector once, update the model, run the detectors, emit alerts."""
        started = time.monotonic()
        model = self.model
        if model is None:
            raise RuntimeError("a daemon without a host model cannot tick")
        lt: LifecycleTick | None = None
        if self.lifecycle is not None:
            read: LifecycleTick = self.lifecycle.read()
            self.totals = self.totals + read.total
            model.apply(read)
            lt = read
        stall: StallSnapshot | None = None
        if self.sched is not None:
            stall = fresh = self.sched.read(model.resolve_cgroup)
            self.stall_totals.add(fresh)
        nt: NetTick | None = None
        if self.net is not None:
            nt = self.net.read()
        snap: Snapshot = model.snapshot(lt, time.monotonic(), time.time(), stall, nt)
        if self.sched is not None:
            self.sched.set_attribution(self.wants_attribution(snap))
        if self.ticks > 0:
            if self.window:  # only the newest snapshot keeps every process (Snapshot.slim)
                self.window[-1] = self.window[-1].slim()
            self.window.append(snap)
            if self.triage is not None:
                self.triage.observe(snap)  # before evaluate: a new incident's capture adds its own
            self.evaluate()
        # else: the first read covers everything since attach (compile time included), not one
        # tick: it sets the baselines and its counts go into the totals, but rates would be wrong.
        self.ticks += 1
        if self.ticks > 1:  # from the end of one tick to the end of the next: what a stall shows
            self.longest_tick_gap_s = max(
                self.longest_tick_gap_s, time.monotonic() - self.last_tick_mono
            )
        self.last_tick_mono = time.monotonic()
        self.last_tick_cost_s = self.last_tick_mono - started
        if self.ticks == 1:  # the baseline read is start-up work (every process sampled once)
            self.baseline_tick_s = self.last_tick_cost_s
        else:
            self.tick_costs.append(self.last_tick_cost_s)
            self.tick_histogram.observe(self.last_tick_cost_s)
        return snap

    def next_tick_s(self) -> float:
        """Seconds to the next tick: tick_s, or calm_tick_s while the last tick found the host
        calm (see CALM_CPU_PCT). A PSI trigger still wakes the loop at once; the first busy
        tick after a calm one brings tick_s back."""
        d = self.policy.daemon
        calm_s = max(d.tick_s, d.calm_tick_s)
        if calm_s > d.tick_s and self._calm():
            self.calm_ticks += 1
            return calm_s
        return float(d.tick_s)

    def wants_attribution(self, snap: Snapshot) -> bool:
        """Whether bpf/sched.c should attribute stalls after this tick (daemon.stall_attribution).

        "pressure": from a tick whose system CPU pressure reaches the noisy_neighbour floor
        (PRESSURE_FLOOR_PCT, "some", this interval or avg10) until noisy_neighbour's window has
        passed without it, so the rule's whole window is measured; always on without CPU PSI.
        What it costs: the waits of an episode's first tick, counted as no_enqueue.
        """
        if self.policy.daemon.stall_attribution == "always":
            return True
        cpu = snap.system_pressure.get("cpu")
        if cpu is None:
            return True  # no PSI to gate on: attribute as before
        if max(cpu.some_pct, cpu.some_avg10) >= PRESSURE_FLOOR_PCT:
            self._cpu_pressure_seen = snap.ts
        if self._cpu_pressure_seen is None:
            return False
        return snap.ts - self._cpu_pressure_seen <= float(
            self.policy.settings(NoisyNeighbour).window_s
        )

    def longest_tick_s(self) -> float:
        """The longest time between two ticks of a healthy loop (a calm tick's)."""
        d = self.policy.daemon
        return float(max(d.tick_s, d.calm_tick_s))

    def _calm(self) -> bool:
        if len(self.window) < 2:
            return False
        now, before = self.window[-1], self.window[-2]
        t = now.total
        if t.forks or t.threads or t.execs or t.exits:
            return False
        n = now.net_total
        if n is not None and (n.connects or n.accepts or n.failed or n.retransmits):
            return False
        gate = self.model.pressure_gate_pct if self.model is not None else PRESSURE_GATE_PCT
        if any(max(ps.some_avg10, ps.some_pct) >= gate for ps in now.system_pressure.values()):
            return False
        fell = before.mem_available_bytes - now.mem_available_bytes
        if now.mem_available_bytes and fell > CALM_MEM_FALL_BPS * max(now.interval_s, 0.001):
            return False
        procs = now.processes
        ran = procs.keys() if now.changed is None else now.changed
        user = kernel = 0.0
        for pid in ran:
            p = procs.get(pid)
            if p is None:
                continue
            if p.ppid == KTHREADD_PID or p.pid == KTHREADD_PID:
                kernel += p.cpu_pct
            else:
                user += p.cpu_pct
        if user >= CALM_CPU_PCT or now.cpu_util_pct - kernel / max(now.ncpu, 1) >= CALM_CPU_PCT:
            return False
        return not self.tracker.open_incidents()

    def evaluate(self) -> list[Alert]:
        """Run the enabled detectors over the window and turn findings into alerts."""
        if not self.window:
            return []
        window = list(self.window)
        findings = []
        cooldowns: dict[str, float] = {}
        for name in self.policy.enabled_rules():
            detector = self.detectors.get(name)
            if detector is None:
                continue
            cfg = self.policy.rule(name)
            cooldowns[name] = cfg.cooldown_s
            try:
                findings.extend(detector.evaluate(window, cfg))
            except Exception as exc:  # one broken detector must not stop the others
                self.detector_errors += 1
                self._report_once(f"detector {name}", f"detector {name} failed: {exc!r}")
        own = [f for f in findings if self._is_self(f.culprit)]
        if own:  # the monitor's own cost is not an incident; counted, never silent
            self.self_findings_dropped += len(own)
            findings = [f for f in findings if not self._is_self(f.culprit)]
        newest = window[-1]
        alerts = self.tracker.update(findings, newest.ts, newest.wall, cooldowns)
        return [self.emit(alert) for alert in alerts]

    def _is_self(self, culprit: Any) -> bool:
        """The daemon itself: its pid, or the cgroup of its own unit (nothing else runs there)."""
        if culprit is None:
            return False
        if culprit.pid == self.own_pid:
            return True
        return self.own_unit_cgroup is not None and culprit.cgroup == self.own_unit_cgroup

    def name(self, alert: Alert) -> Alert:
        """The alert with the pod, namespace and container names the node knows (when it knows)."""
        if self.namer is None:
            return alert
        try:
            return self.namer.name(alert)
        except Exception as exc:  # names are a courtesy: the alert goes out without them
            self._report_once("names", f"naming an alert failed: {exc!r}")
            return alert

    def emit(self, alert: Alert) -> Alert:
        """Name, store first (so nothing signalled is ever missing from history), then fan out."""
        alert = self.name(alert)
        self.alert_count += 1
        if alert.state == "firing":
            self.alerts_fired[(alert.rule, alert.severity)] += 1
        if self.history is not None:
            try:
                self.history.store(alert)
            except Exception as exc:  # full disk, I/O error: counted, the alert still goes out
                self.history_write_failures += 1
                if not self._history_failing:
                    self._history_failing = True
                    log(
                        f"alert history write failed, alerts are not stored until it recovers: {exc}",
                        LOG_ERR,
                    )
            else:
                if self._history_failing:
                    self._history_failing = False
                    log(
                        f"alert history writes recovered ({self.history_write_failures} alerts not stored so far)",
                        LOG_NOTICE,
                    )
        if self.triage is not None:  # after the history has the incident, before anyone asks
            self.triage.on_alert(alert, self.window)
        for sink in self.sinks:
            sink.put(alert)
        self.subscriptions.alert(alert)
        return alert

    def _report_once(self, key: str, message: str) -> None:
        if key not in self._reported_errors:
            self._reported_errors.add(key)
            log(message, LOG_ERR)

    # ---- the API the bus and linnixctl adapt ---------------------------------------------

    @property
    def policy(self) -> Policy:
        return self.current.policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self.current.policy = policy

    def subscribe(
        self, *, alerts: AlertListener | None = None, actions: ActionListener | None = None
    ) -> None:
        """The one way to hear alerts (after history and sinks) and enforcement actions."""
        self.subscriptions.subscribe(alerts=alerts, actions=actions)

    @property
    def enforcement_enabled(self) -> bool:
        return self.enforcer is not None and bool(self.enforcer.enabled)

    def register_health(self, name: str, part: Reporter) -> None:
        """A part built outside the daemon (the bus, the metrics writer) reports with the rest."""
        self.health_sources[name] = part

    def own_health(self) -> Health:
        return Health(
            counters={
                "ticks": self.ticks,
                "alerts": self.alert_count,
                "detector_errors": self.detector_errors,
                "tick_errors": self.tick_errors,
                "self_findings_dropped": self.self_findings_dropped,
                "calm_ticks": self.calm_ticks,
                "listener_errors": self.subscriptions.failures,
                "history_write_failures": self.history_write_failures,
            },
            gauges={
                "started_at_seconds": self.started_at,
                "longest_tick_gap_seconds": round(self.longest_tick_gap_s, 3),
                "baseline_tick_seconds": round(self.baseline_tick_s, 3),
            },
        )

    def health(self) -> dict[str, Health]:
        """Every component's counters by component name: what Status, the bus and the metrics show."""
        parts: dict[str, Reporter | None] = {
            "daemon": _Own(self),
            "lifecycle": self.lifecycle,
            "sched": self.sched,
            "psi_triggers": self.attachments.triggers,
            "net": self.net,
            "model": self.model,
            **(self.model.parts() if self.model is not None else {}),
            "history": self.history,
            "incidents": self.tracker,
            "enforcer": self.enforcer,
            "triage": self.triage,
            "names": self.namer.resolver if self.namer is not None else None,
            "notify": self.notifier,
            **{"sink_" + re.sub(r"[^a-z0-9]+", "_", s.name.lower()): s for s in self.sinks},
            **self.health_sources,
            **{
                f"detector_{name}": cast(Reporter, d)
                for name, d in self.detectors.items()
                if callable(getattr(d, "health", None))
            },
        }
        return collect(parts)

    def alerts_by_rule(self) -> dict[tuple[str, str], int]:
        return dict(self.alerts_fired)

    def open_by_rule(self) -> dict[str, int]:
        out = {name: 0 for name in self.policy.enabled_rules()}
        for alert in self.tracker.open_incidents():
            out[alert.rule] = out.get(alert.rule, 0) + 1
        return out

    def counters(self, report: dict[str, Health] | None = None) -> Counters:
        """The headline counters, taken from the merged health report."""
        h = report if report is not None else self.health()

        def get(component: str, name: str) -> int:
            part = h.get(component)
            return int(part.counters.get(name, 0)) if part is not None else 0

        return Counters(
            events=get("lifecycle", "events"),
            dropped_events=get("lifecycle", "dropped_events"),
            aggregation_overflows=get("lifecycle", "aggregation_overflows"),
            untracked_exits=get("lifecycle", "untracked_exits"),
            evicted_processes=get("model", "evicted_processes"),
            evicted_cgroups=get("model", "evicted_cgroups") + get("cgroups", "evicted"),
            unresolved_cgroups=get("cgroups", "unresolved"),
            alerts=get("daemon", "alerts"),
            suppressed_alerts=get("incidents", "suppressed"),
            sink_drops=sum(
                int(part.counters.get("drops", 0))
                for name, part in h.items()
                if name.startswith("sink_")
            ),
        )

    def status(self) -> dict[str, Any]:
        """The Status answer (views.status over what the daemon knows now)."""
        report = self.health()
        return views.status(
            views.StatusFacts(
                version=self.version,
                started_at=self.started_at,
                policy_path=self.policy_path,
                tick_s=self.policy.daemon.tick_s,
                enabled_rules=list(self.policy.enabled_rules()),
                transport=getattr(self.lifecycle, "transport", None),
                scheduler_attribution=self.sched is not None,
                network_attribution=self.net is not None,
                network_problem=self.attachments.net_problem,
                psi_mode=self.psi_mode,
                enforcement_enabled=self.enforcement_enabled,
                enforcement=self.enforcer.status() if self.enforcer is not None else None,
                counters=self.counters(report),
                report=report,
                totals=self.totals,
                open_incidents=len(self.tracker.open_incidents()),
                newest=self.window[-1] if self.window else None,
                ticks=self.ticks,
                tick_cost_s=self.last_tick_cost_s,
                detector_errors=self.detector_errors,
                tick_errors=self.tick_errors,
                state=self.state_status(),
            )
        )

    def state_status(self) -> dict[str, Any]:
        """The state directory and the alert history: refusals, failures and why."""
        out: dict[str, Any] = self.state.status() if self.state is not None else {}
        if self.state_problem:
            out["refused_dir"] = self.state_problem
        out["history"] = (
            "ok"
            if self.history is not None
            else ("unavailable: " + self.history_problem if self.history_problem else "off")
        )
        out["history_write_failures"] = self.history_write_failures
        return out

    def recent_alerts(self, since: float = 0.0, rule: str = "", limit: int = 100) -> list[Alert]:
        if self.history is None:
            return []
        return list(self.history.recent(since=since, rule=rule, limit=limit))

    def open_incidents(self) -> list[Alert]:
        return [self.name(a) for a in self.tracker.open_incidents()]

    def explain(self, incident: str) -> dict[str, Any]:
        """The explanation of an incident ("latest": the newest); LookupError names what is missing."""
        from .explain import explain

        if self.triage is None:
            raise LookupError("triage is not running in this daemon")
        ident = self.triage.latest() if incident == "latest" else incident
        if ident is None:
            raise LookupError("no incident has been recorded yet")
        found = self.triage.lookup(ident)
        if found is None:
            raise LookupError(f"no incident {ident} in the history")
        snapshot, resolution = found
        if snapshot is None:
            raise LookupError(
                f"incident {ident} has no snapshot (recorded before triage existed, or pruned by retention)"
            )
        return explain(snapshot, resolution)

    def incident_history(self, since: float = 0.0, limit: int = 100) -> list[dict[str, Any]]:
        """Past and open incidents from the history, newest first (empty without a history)."""
        if self.history is None:
            return []
        return list(self.history.incidents(since=since, limit=limit))

    def _names_of(self, path: str) -> Any:
        """The names the node gives the owner of cgroup `path` (names.Names), or None."""
        if self.namer is None:
            return None
        try:
            return self.namer.resolver.names(path)
        except Exception as exc:
            self._report_once("names", f"naming cgroup {path} failed: {exc!r}")
            return None

    def top_cgroups(
        self, limit: int = 10, where: Mapping[str, str] | None = None, sort: str = "pressure"
    ) -> list[dict[str, Any]]:
        """Cgroups by pressure, each with its CPU use (its own processes, last tick), its run-queue
        wait (last tick), the stall it caused to others and suffered from them (stall window) and
        the pod, namespace and container names the node knows.

        `where` keeps the cgroups whose owner passes it (names.RowFilter); `sort` orders by
        another column (TOP_SORTS). Names are looked up for the rows returned, and for every
        candidate only when filtering by them.
        """
        if self.model is None:
            return []
        from .collector.cgroups import owner_of
        from .names import RowFilter, row_names

        filt = RowFilter.parse(where or {})
        if sort not in TOP_SORTS:
            raise QueryError(f"sort must be one of {', '.join(TOP_SORTS)}, got {sort[:40]!r}")
        everything = bool(filt) or sort != "pressure"
        rows = views.top_cgroups(
            self.model.top_cgroups(self.model.max_cgroups if everything else limit),
            list(self.window),
            self.policy.settings(NoisyNeighbour).window_s,
        )
        if filt:
            rows = [
                r for r in rows if filt.owner(self._names_of(r["path"]), owner_of(r["path"]).unit)
            ]
        column = TOP_SORTS[sort]
        if column is not None:
            by = column
            rows.sort(key=lambda r: float(r.get(by) or 0), reverse=True)
        rows = rows[:limit]
        for row in rows:
            row.update(row_names(self._names_of(row["path"])))
        return rows

    def stall_table(
        self, limit: int = 20, where: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """Who stalls whom over the stall window: victim, culprit, stall_ms, share of victim's wait,
        and the names of both sides; with `where`, the rows whose victim or culprit passes it."""
        from .collector.cgroups import owner_of
        from .names import RowFilter, row_names

        filt = RowFilter.parse(where or {})
        window_s = self.policy.settings(NoisyNeighbour).window_s
        rows = views.stall_table(list(self.window), window_s, None if filt else limit)
        if filt:
            rows = [
                row
                for row in rows
                if any(
                    filt.owner(self._names_of(p), owner_of(p).unit)
                    for p in (row["victim"], row["culprit"])
                )
            ][:limit]
        for row in rows:
            row.update(row_names(self._names_of(row["victim"]), "victim_"))
            row.update(row_names(self._names_of(row["culprit"]), "culprit_"))
        return rows

    def alerts(
        self, since: float = 0.0, limit: int = 100, where: Mapping[str, str] | None = None
    ) -> list[Alert]:
        """Alerts from the history, newest first, whose culprit or victim passes `where`."""
        from .names import RowFilter

        filt = RowFilter.parse(where or {})
        rule = filt.rule or ""
        if not (filt.namespace or filt.pod or filt.container or filt.unit):
            return self.recent_alerts(since=since, rule=rule, limit=limit)
        out = []
        for alert in self.recent_alerts(since=since, rule=rule, limit=HISTORY_SCAN):
            if alert_matches(alert, filt):
                out.append(alert)
                if len(out) >= limit:
                    break
        return out

    def reload_policy(self) -> str:
        """Load the policy file again; a bad file raises PolicyError and the old policy stays."""
        from .config import load_policy

        if self.notifier is not None:
            self.notifier.reloading()
        try:
            new = load_policy(self.policy_path)
        finally:
            if self.notifier is not None:
                self.notifier.ready()
        from .reload import changed_keys, plan

        old, old_enabled = self.policy, set(self.policy.enabled_rules())
        changes = plan(changed_keys(old.as_dict(), new.as_dict()))
        self.policy = new
        for rule in old_enabled - set(new.enabled_rules()):
            for alert in self.tracker.forget(rule):
                self.emit(alert)
        self.window = collections.deque(self.window, maxlen=window_length(new))
        self.tracker.resolve_after_s = max(2.0, 4 * new.daemon.tick_s)
        if self.lifecycle is not None:
            self.lifecycle.set_short_lived(new.daemon.short_lived_s)
        if self.model is not None:  # caps: a lower one evicts (counted) at the next tick
            self.model.max_processes = new.daemon.max_processes
            self.model.max_cgroups = new.daemon.max_cgroups
            if getattr(self.model, "resolver", None) is not None:
                self.model.resolver.max_cgroups = new.daemon.max_cgroups
        if self.history is not None and (
            (old.daemon.history_days, old.daemon.history_max)
            != (new.daemon.history_days, new.daemon.history_max)
        ):
            self.history.max_age_days = new.daemon.history_days
            self.history.max_count = new.daemon.history_max
            try:
                self.history.prune()
            except Exception as exc:  # the new limits apply at the next prune anyway
                log(f"alert history prune after reload failed: {exc}", LOG_WARNING)
        self.sync_collectors()
        enabled = list(new.enabled_rules())
        message = (
            f"policy {self.policy_path} reloaded: {len(enabled)} rules enabled "
            f"({', '.join(enabled)}); {changes.describe()}"
        )
        self.events(
            "policy_reloaded",
            message,
            {
                "LINNIX_POLICY": self.policy_path,
                "LINNIX_RULES": " ".join(enabled),
                "LINNIX_RESTART_NEEDED": " ".join(k.split(" ")[0] for k in changes.restart),
            },
        )
        if changes.restart:
            log(
                f"reload: {len(changes.restart)} setting(s) take effect only after a restart",
                LOG_WARNING,
            )
        return message

    def sync_collectors(self) -> None:
        """Attach or detach bpf/sched.c and the PSI triggers for the policy's enabled rules.

        The host model follows: per-process CPU from the kernel while sched.c runs, from a full
        /proc scan otherwise. A program that cannot be attached is logged; monitoring goes on.
        """
        from .collector.bpfload import KernelFeatureError

        had = self.sched
        try:
            changes = self.attachments.sync(self.policy)
        except KernelFeatureError as exc:
            changes = [(LOG_ERR, f"cannot attach bpf/sched.c, going on without it: {exc}")]
        if self.sched is not had:
            _release_compiler_memory()
            if self.model is not None:
                self.model.use_cpu(self.sched.task_cpu() if self.sched is not None else None)
        for priority, line in changes:
            log(line, priority)
        if changes:
            for fn in self.collectors_changed:
                fn()

    def stats(self) -> dict[str, Any]:
        """Final figures for --stats-on-exit and SIGUSR1 (benchmarks read them)."""
        out = self.status()
        costs = sorted(self.tick_costs)
        if costs:
            out["tick_p50_ms"] = round(costs[len(costs) // 2] * 1000, 2)
            out["tick_p99_ms"] = round(costs[min(len(costs) - 1, int(len(costs) * 0.99))] * 1000, 2)
        out["rss_kb"] = _vm_kb("VmRSS")
        out["hwm_kb"] = _vm_kb("VmHWM")
        return out

    def close(self) -> None:
        if self.triage is not None:
            self.triage.close()
        if self.history_reader is not None:
            self.history_reader.close()
        for sink in self.sinks:
            sink.close()
        self.attachments.close()
        if self.lifecycle is not None:
            self.lifecycle.close()


def open_state_dir(state_dir: str | None) -> tuple[Any, str]:
    """The checked state directory, or (None, why): the daemon then runs without history or enforcement."""
    if not state_dir:
        return None, ""
    from .statedir import StateDir, StateError

    try:
        return StateDir(state_dir), ""
    except StateError as exc:
        log(f"{exc}: running without alert history and enforcement", LOG_ERR)
        return None, str(exc)


def open_history(state: Any, policy: Any) -> tuple[Any, str]:
    """The alert history in the state directory, or (None, why): monitoring goes on without it."""
    from .history import AlertHistory
    from .statedir import StateError

    try:
        return (
            AlertHistory(
                state.sqlite_path(HISTORY_DB),
                max_age_days=policy.daemon.history_days,
                max_count=policy.daemon.history_max,
            ),
            "",
        )
    except StateError as exc:  # already logged by the state directory
        why = str(exc)
    except Exception as exc:  # full disk, corrupt file, newer schema: degraded, said so
        why = f"{state.where(HISTORY_DB)}: {exc}"
        log(f"alert history unavailable, running without it: {why}", LOG_ERR)
    return None, why


class _Own:
    """The daemon's own counters as a health part (the daemon is also the one that merges)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def health(self) -> Health:
        return self.daemon.own_health()


MADV_DONTNEED = 4
MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now; contents are kept (re-read on use)
COMPILER_LIBS = ("libLLVM", "libclang")


def _compiler_mappings() -> list[tuple[int, int, bool]]:
    """(start, end, pristine) of the compiler libraries' read-only mappings in this process.

    Pristine: no page of the mapping is a private copy (smaps Anonymous: 0 kB), so every
    resident page equals the file's and can be dropped and faulted back in unchanged.
    """
    out: list[tuple[int, int, bool]] = []
    current: list[int] | None = None
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
                current = None
                perms = head[1]
                readonly = perms.startswith("r") and "w" not in perms
                if readonly and len(head) >= 6 and any(lib in head[5] for lib in COMPILER_LIBS):
                    start, end = (int(x, 16) for x in head[0].split("-"))
                    current = [start, end]
            elif current is not None and head and head[0] == "Anonymous:":
                out.append((current[0], current[1], int(head[1]) == 0))
                current = None
    return out


def _release_compiler_memory() -> int:
    """Give the compiler's memory back once the BPF programs are loaded; returns kB released.

    LLVM's freed compile-time heap goes back with malloc_trim. The code of libLLVM and
    libclang-cpp the compile touched (~75 MB) stays mapped but leaves this process's RSS: a
    mapping with no private page is dropped (MADV_DONTNEED; the pages are the file's and fault
    back in unchanged), any other is paged out (MADV_PAGEOUT keeps contents). A later compile
    (a reload attaching a program) faults what it needs back in from the page cache.
    """
    before = _vm_kb("VmRSS")
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.malloc_trim(0)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        mappings = _compiler_mappings()
    except (OSError, AttributeError, ValueError):
        return 0
    for start, end, pristine in mappings:
        # a refusal (EINVAL for PAGEOUT before 5.4) leaves that mapping as it was
        libc.madvise(start, end - start, MADV_DONTNEED if pristine else MADV_PAGEOUT)
    return max(0, before - _vm_kb("VmRSS"))


def _own_unit_cgroup() -> str | None:
    """This process's cgroup when it is linnixd's own systemd unit (the packaged service)."""
    try:
        with open("/proc/self/cgroup") as fh:
            for line in fh:
                if line.startswith("0::"):
                    path = line[3:].strip()
                    return path if path.endswith("/linnixd.service") else None
    except OSError:
        pass
    return None


def _where(exc: BaseException) -> str:
    """Where an exception was raised, as file:line in function (one line for the log)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "unknown place"
    code = tb.tb_frame.f_code
    return f"{os.path.basename(code.co_filename)}:{tb.tb_lineno} in {code.co_name}"


def _vm_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# ---- the event loop ---------------------------------------------------------------------


class Runner:
    """Drives a built daemon in time: its services around the tick loop, signals, PSI wake-ups,
    sd_notify and the watchdog. Everything it drives was made by compose.build()."""

    def __init__(self, assembly: Assembly, notifier: Notifier) -> None:
        self.daemon = assembly.daemon
        self.assembly = assembly
        self.notifier = notifier
        self.triggers: TriggerSource | None = None  # the PSI triggers whose fd the loop watches
        self.stopping = False
        self.woken = False  # a PSI trigger fired since the last tick
        self._waiter: asyncio.Future[None] | None = None  # the tick loop's wait, while it waits
        self.exit_code = EXIT_OK

    async def run(self) -> int:
        from .compose import StartupError

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGUSR1, self.dump_stats)
        self._watch_triggers()
        self.daemon.collectors_changed.append(self._watch_triggers)

        started: list[Service] = []
        try:
            for service in self.assembly.services:
                if hasattr(service, "fatal"):  # a service that can fail for good (the bus)
                    service.fatal = self._fatal
                await service.start()
                started.append(service)
        except StartupError as exc:
            log(str(exc), LOG_ERR)
            for service in reversed(started):
                service.stop()
            return exc.code

        d = self.daemon
        self.notifier.status("reading the host: the baseline tick")
        self._tick()  # before READY: the first read samples every process (start-up work)
        rules = list(d.policy.enabled_rules())
        transport = getattr(d.lifecycle, "transport", None) or "none"
        tracked = len(d.model.scanner.procs) if d.model is not None else 0
        self.notifier.status(
            f"ready: {len(rules)} rules, {tracked} processes tracked, "
            f"transport {transport}, psi {d.psi_mode}"
        )
        self.notifier.ready()
        d.events(
            "daemon_started",
            f"ready: pid {os.getpid()}, policy {d.policy_path}, {len(rules)} rules, "
            f"transport {transport}, psi {d.psi_mode}, bus {self.assembly.bus}",
            {
                "LINNIX_POLICY": d.policy_path,
                "LINNIX_RULES": " ".join(rules),
                "LINNIX_TRANSPORT": transport,
                "LINNIX_VERSION": d.version,
            },
        )
        watchdog = asyncio.ensure_future(self._watchdog())
        try:
            await self._tick_loop()
        finally:
            watchdog.cancel()
            self.notifier.stopping()
            for service in reversed(started):
                service.stop()
        return self.exit_code

    def _fatal(self, why: str) -> None:
        """A service cannot go on (the bus stayed away): stop, exit 69, let systemd restart us."""
        self.exit_code = EXIT_UNAVAILABLE
        self.notifier.status(f"stopping: {why}")
        self.stop()

    def stop(self) -> None:
        """SIGTERM, SIGINT or a fatal service: the tick loop ends at its next wait."""
        self.stopping = True
        self._wake_waiter()

    def _wake_waiter(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _tick(self) -> None:
        try:
            self.daemon.tick()
        except Exception as exc:  # a bad tick is counted and reported; the next one tries again
            self.daemon.tick_errors += 1
            self.daemon._report_once(
                f"tick {type(exc).__name__}", f"tick failed: {exc!r} ({_where(exc)})"
            )

    async def _tick_loop(self) -> None:
        """Tick, wait until the next tick is due (or a PSI trigger fires), repeat. The baseline
        tick ran before READY, so the loop starts with a wait. One future and one timer per
        wait: the loop's own cost on a calm host is a tick a second."""
        loop = asyncio.get_running_loop()
        next_at = loop.time() + float(self.daemon.policy.daemon.tick_s)
        while not self.stopping:
            if not self.woken:
                waiter = self._waiter = loop.create_future()
                timer = loop.call_at(next_at, self._wake_waiter)
                try:
                    await waiter
                finally:
                    timer.cancel()
                    self._waiter = None
            if self.stopping:
                break
            if self.woken:
                self.woken = False
                next_at = loop.time()
            self._tick()
            tick_s = self.daemon.next_tick_s()
            next_at = max(next_at + tick_s, loop.time() + tick_s / 4)

    def _on_pressure(self) -> None:
        """A kernel PSI trigger fired: tick now instead of waiting for the next tick."""
        triggers = self.daemon.attachments.triggers
        fired = triggers.drain() if triggers is not None else []
        if fired:
            self.woken = True
            self._wake_waiter()

    def _watch_triggers(self) -> None:
        """Watch the fd of the PSI triggers the daemon has now (a reload may arm or disarm them)."""
        current = self.daemon.attachments.triggers
        if current is self.triggers:
            return
        loop = asyncio.get_running_loop()
        if self.triggers is not None and self.triggers.mode == "triggers":
            loop.remove_reader(self.triggers.fileno())
        self.triggers = current
        if current is not None and current.mode == "triggers":
            loop.add_reader(current.fileno(), self._on_pressure)

    async def _watchdog(self) -> None:
        """WATCHDOG=1 only while ticks complete and the bus is up: a stuck loop or a daemon
        that cannot get back on its bus gets the service restarted. With no service manager
        listening there is no one to tell: no loop."""
        if not self.notifier.enabled:
            return
        interval = int(os.environ.get("WATCHDOG_USEC", "0") or 0) / 1e6 or 5.0
        while True:
            await asyncio.sleep(interval / 2)
            stale = time.monotonic() - self.daemon.last_tick_mono
            down = [s.name for s in self.assembly.services if not getattr(s, "healthy", True)]
            if down:
                self.notifier.status(f"degraded: {', '.join(down)} down, reconnecting")
            elif stale < max(3 * self.daemon.longest_tick_s(), interval / 2):
                self.notifier.watchdog()
                c = self.daemon.counters()
                self.notifier.status(
                    f"{c.events} events, {c.dropped_events} dropped, {c.alerts} alerts, "
                    f"{len(self.daemon.tracker.open_incidents())} open incidents"
                )

    def reload(self) -> None:
        from .config import PolicyError

        try:
            self.daemon.reload_policy()  # says so itself (policy_reloaded)
        except PolicyError as exc:
            for problem in exc.problems:
                log(f"reload refused, keeping the running policy: {problem}", LOG_WARNING)

    def dump_stats(self) -> None:
        print(json.dumps({"stats": self.daemon.stats()}), file=sys.stderr, flush=True)


# ---- command line -----------------------------------------------------------------------

DESCRIPTION = """\
linnixd watches the kernel (eBPF tracepoints and Pressure Stall Information) and names the
process, cgroup or systemd unit that makes the host stall: fork storms, crash loops, CPU
spikes, runaway process trees, memory leaks, fd exhaustion, pressure saturation, noisy
neighbours, TCP connection churn, retransmits and local port exhaustion. It only reports (stdout, journald, D-Bus); it never acts unless enforcement
was enabled through polkit.
"""

EPILOG = """\
exit status:
  0   clean stop            69  bus unavailable       71  kernel feature missing
  1   other failure         70  internal error        78  invalid policy

files:
  /etc/linnixd/rules.yaml   the policy (linnixd-policy(5))
  /var/lib/linnixd          alert history, enforcement state and action ledger
  /var/lib/prometheus/node-exporter/linnixd.prom
                            metrics for node_exporter's textfile collector

see also: linnixctl(1), linnixd-policy(5), journalctl(1)
"""


def _directory(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="linnixd",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--foreground",
        action="store_true",
        help="print alerts on stdout (interactive use); the daemon never forks either way",
    )
    p.add_argument(
        "--output",
        choices=("text", "json"),
        default="text",
        help="stdout format with --foreground: readable lines or one JSON object per alert (default: text)",
    )
    p.add_argument(
        "--policy",
        metavar="FILE",
        help="policy file (default: /etc/linnixd/rules.yaml, else the checkout's policy/rules.yaml)",
    )
    p.add_argument(
        "--check-config",
        metavar="FILE",
        help="validate a policy file and exit (0 valid, 78 invalid)",
    )
    p.add_argument(
        "--dump-bpf",
        action="store_true",
        help="print the BPF C that would be compiled, with its -D settings, and exit",
    )
    p.add_argument(
        "--bus",
        default=None,
        metavar="BUS",
        help="D-Bus to serve on: system, session, none or an address (default: system, or none with --foreground)",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help=f"alert history directory (default: {STATE_DIR}; none with --foreground unless given)",
    )
    p.add_argument(
        "--metrics-dir",
        metavar="DIR",
        help="write DIR/linnixd.prom for node_exporter's textfile collector every "
        "metrics_interval_s; 'none' turns it off (default: the policy's metrics_dir when that "
        "directory exists; none with --foreground unless given)",
    )
    p.add_argument(
        "--no-journal",
        action="store_true",
        help="do not send alerts to journald even when it is running",
    )
    p.add_argument(
        "--no-sched",
        action="store_true",
        help="do not attach the scheduler (stall attribution) program",
    )
    p.add_argument(
        "--host-root",
        default="/",
        type=_directory,
        metavar="DIR",
        help="where the node's /run, /var/lib and /var/log are, for pod and container names "
        "(default: /; e.g. /host when linnixd runs in a container with the host mounted there)",
    )
    p.add_argument(
        "--no-net",
        action="store_true",
        help="do not attach the TCP connection program (the network rules stay silent)",
    )
    p.add_argument(
        "--stats-on-exit",
        action="store_true",
        help='print {"stats": {...}} as JSON on stderr at exit (also on SIGUSR1)',
    )
    p.add_argument("--version", action="version", version=f"linnixd {__version__}")
    return p


def _load_policy_or_exit(path: str, notifier: Any = None) -> Any:
    """The policy, or one line saying what is wrong and exit 78 (RestartPreventExitStatus=)."""
    from .config import PolicyError, load_policy

    try:
        return load_policy(path)
    except PolicyError as exc:
        more = len(exc.problems) - 1
        line = f"invalid policy, not starting: {exc.problems[0] if exc.problems else path}" + (
            f" (and {more} more: linnixctl check-config {path})" if more > 0 else ""
        )
        log(line, LOG_ERR)
        if notifier is not None:
            notifier.status(line)
        raise SystemExit(EXIT_CONFIG) from None


def _dump_bpf(policy: Any) -> int:
    from .collector.lifecycle import LifecycleCollector
    from .collector.sched import SchedCollector

    print(LifecycleCollector(policy.daemon.short_lived_s).dump_source())
    print(SchedCollector().dump_source())
    from .collector.net import NetCollector

    print(NetCollector(policy.daemon.short_lived_s).dump_source())
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    from .compose import StartupError, build
    from .notify import Notifier as SdNotifier
    from .paths import default_policy

    notifier = SdNotifier()
    policy_path = str(args.policy or default_policy())
    notifier.status(f"loading policy {policy_path}")
    policy = _load_policy_or_exit(policy_path, notifier)
    if args.dump_bpf:
        return _dump_bpf(policy)
    try:
        assembly = build(args, policy_path, policy, notifier)
    except StartupError as exc:
        log(str(exc), LOG_ERR)
        return exc.code
    runner = Runner(assembly, notifier)
    try:
        code = asyncio.run(runner.run())
    finally:
        if args.stats_on_exit:
            runner.dump_stats()
        assembly.daemon.close()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.check_config:
        from .config import main_check_config

        return main_check_config([args.check_config])
    try:
        return run(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:  # the last line of defence: one line, never a traceback
        log(f"internal error: {exc!r}", LOG_ERR)
        return EXIT_SOFTWARE


if __name__ == "__main__":
    sys.exit(main())
