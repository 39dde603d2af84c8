"""What linnixctl shows (status, top, stalls), computed from the daemon's state: pure functions, no I/O."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .detectors.base import recent
from .detectors.cpu import busy
from .detectors.net import net_rates
from .detectors.stall import stall_by_pair
from .health import Health, to_status
from .model import Counters, LifecycleCounts, Snapshot

NET_RATE_S = 2.0  # per-cgroup TCP connection and retransmit rates in top cover this long


def _window_stall(
    window: Sequence[Snapshot], window_s: float
) -> tuple[dict[str, dict[str, tuple[int, int]]], Counter[str]]:
    """noisy_neighbour's pairing (victim -> culprit -> (stall us, preemptions)) over its window,
    and each cgroup's run-queue wait (us) over the same snapshots."""
    snaps = [s for s in recent(window, window_s) if s.stall is not None]
    waits: Counter[str] = Counter()
    for snap in snaps:
        assert snap.stall is not None
        for path, rq in snap.stall.runqueue.items():
            waits[path] += rq.wait_us
    return stall_by_pair(snaps), waits


def top_cgroups(
    rows: Sequence[Mapping[str, Any]], window: Sequence[Snapshot], window_s: float
) -> list[dict[str, Any]]:
    """The model's cgroup rows, each with its processes' CPU (newest tick) and, while sched.c
    runs, its run-queue wait (newest tick) and the stall it caused and suffered over `window_s`;
    while bpf/net.c runs, its TCP connections and retransmits per second."""
    out = [dict(row) for row in rows]
    newest = window[-1] if window else None
    cpu: dict[str, float] = defaultdict(float)
    if newest is not None:
        for proc in busy(newest):
            cpu[proc.cgroup] += proc.cpu_pct
    pairs, _waits = _window_stall(window, window_s)
    caused: Counter[str] = Counter()
    suffered: Counter[str] = Counter()
    for victim, culprits in pairs.items():
        for culprit, (us, _preemptions) in culprits.items():
            caused[culprit] += us
            suffered[victim] += us
    stall = newest.stall if newest is not None else None
    # while bpf/net.c runs: TCP connections/s and retransmits/s over the last NET_RATE_S
    rates = (
        net_rates(recent(window, NET_RATE_S))
        if newest is not None and newest.net_total is not None
        else None
    )
    for row in out:
        path = str(row.get("path", ""))
        row["cpu_pct"] = round(cpu.get(path, 0.0), 1)
        if rates is not None:
            r = rates.get(path, {})
            row["connects_per_s"] = r.get("connects_per_s", 0.0)
            row["retransmits_per_s"] = r.get("retransmits_per_s", 0.0)
        if stall is not None:
            rq = stall.runqueue.get(path)
            row["runq_wait_ms"] = round(rq.wait_us / 1000, 1) if rq else 0.0
            row["stall_caused_ms"] = round(caused.get(path, 0) / 1000, 1)
            row["stall_suffered_ms"] = round(suffered.get(path, 0) / 1000, 1)
    return out


def stall_table(
    window: Sequence[Snapshot], window_s: float, limit: int | None
) -> list[dict[str, Any]]:
    """Who stalled whom over noisy_neighbour's window, paired as that rule pairs them.

    Rows: victim, culprit, stall_ms, share (of the victim's run-queue wait), window_s; the
    largest stall first, at most `limit` (None: all).
    """
    pairs, waits = _window_stall(window, window_s)
    rows: list[dict[str, Any]] = [
        {
            "victim": victim,
            "culprit": culprit,
            "stall_ms": round(us / 1000, 1),
            "share": round(us / waits[victim], 3) if waits.get(victim) else 0.0,
            "window_s": window_s,
        }
        for victim, row in pairs.items()
        for culprit, (us, _preemptions) in row.items()
    ]
    rows.sort(key=lambda r: float(r["stall_ms"]), reverse=True)
    return rows[:limit]


@dataclass(frozen=True)
class StatusFacts:
    """What the daemon knows at one moment, gathered by Daemon.status() for `status()`."""

    version: str
    started_at: float
    policy_path: str
    tick_s: float
    enabled_rules: Sequence[str]
    transport: str | None
    scheduler_attribution: bool
    network_attribution: bool
    network_problem: str
    psi_mode: str
    enforcement_enabled: bool
    enforcement: Mapping[str, Any] | None  # the enforcer's own status, when there is one
    counters: Counters
    report: Mapping[str, Health]  # every component's health, by name
    totals: LifecycleCounts
    open_incidents: int
    newest: Snapshot | None
    ticks: int
    tick_cost_s: float
    detector_errors: int
    tick_errors: int
    state: Mapping[str, Any]


def status(f: StatusFacts) -> dict[str, Any]:
    """The Status answer (linnixctl status): one JSON-ready object."""
    return {
        "version": f.version,
        "started_at": f.started_at,
        "policy_path": f.policy_path,
        "tick_s": f.tick_s,
        "enabled_rules": list(f.enabled_rules),
        "transport": f.transport,
        "scheduler_attribution": f.scheduler_attribution,
        "network_attribution": f.network_attribution,
        **({"network_problem": f.network_problem} if f.network_problem else {}),
        "psi_mode": f.psi_mode,
        "enforcement_enabled": f.enforcement_enabled,
        **({"enforcement": dict(f.enforcement)} if f.enforcement is not None else {}),
        "counters": asdict(f.counters),
        "health": to_status(f.report),
        "totals": asdict(f.totals),
        "open_incidents": f.open_incidents,
        "processes": len(f.newest.processes) if f.newest else 0,
        "cgroups": len(f.newest.cgroups) if f.newest else 0,
        "ticks": f.ticks,
        "tick_cost_ms": round(f.tick_cost_s * 1000, 2),
        "detector_errors": f.detector_errors,
        "tick_errors": f.tick_errors,
        "state": dict(f.state),
    }
